"""Shared fixtures: tiny checkpoints built once per test session, quiet transformers logging, in-process
fake swarms, and a reaper that kills whatever child process a test left behind."""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import pytest
from families import save
from forkserver import LazyLauncher
from swarm import ENV, start_dht

from client import local_swarm

if TYPE_CHECKING:
    from fakes import FakeSwarm

# gRPC's core logs every closed connection at INFO on stderr: noise around any failing test. Set before grpc
# loads (conftest is imported before the test modules), inherited by the processes the tests start.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

REAP_GRACE = 3.0  # seconds a left-behind child has to exit after SIGTERM before SIGKILL
_REAPED = pytest.StashKey[list[str]]()
# helpers of the standard library that exit with the interpreter; not leaks of a test
_NOT_LEAKS = ("multiprocessing.resource_tracker", "multiprocessing.forkserver")


@pytest.fixture(autouse=True, scope="session")
def _reap_children(request: pytest.FixtureRequest) -> Iterator[None]:
    """At the end of the run, kill (by PID) every child process still alive, and name them in the summary."""
    yield
    children = []
    for child in psutil.Process().children(recursive=True):
        try:
            if not any(helper in " ".join(child.cmdline()) for helper in _NOT_LEAKS):
                children.append(child)
        except psutil.Error:  # it exited meanwhile
            continue
    reaped = []
    for child in children:
        try:
            reaped.append(f"pid={child.pid} {' '.join(child.cmdline())[:200]}")
            child.terminate()
        except psutil.Error:
            continue
    _, alive = psutil.wait_procs(children, timeout=REAP_GRACE)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            continue
    request.config.stash[_REAPED] = reaped


@pytest.fixture(autouse=True, scope="session")
def _fork_processes(_reap_children: None) -> Iterator[None]:
    """The `corolla` processes tests start are forked from one process that imported everything once (see
    `forkserver.py`); COROLLA_TEST_NO_FORK=1 starts each as a new process instead."""
    if os.environ.get("COROLLA_TEST_NO_FORK") == "1":
        yield
        return
    launcher = LazyLauncher(dict(os.environ, PYTHONUNBUFFERED="1", **ENV))
    local_swarm.use_launcher(launcher)
    try:
        yield
    finally:
        local_swarm.use_launcher(None)
        launcher.close()


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    reaped = config.stash.get(_REAPED, [])
    if reaped:
        terminalreporter.section("child processes left behind (killed)", yellow=True)
        for line in reaped:
            terminalreporter.line(line)


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint(family)` -> folder with the family's tiny model saved as safetensors (built once)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def local(checkpoint):
    """The tiny Llama as plain transformers loads it: the reference every swarm run is compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


@pytest.fixture
def fake_swarm(checkpoint) -> Iterator[Callable[..., FakeSwarm]]:
    """`fake_swarm([(0, 1), (1, 4)], **peer_config)` -> in-process peers of the tiny Llama serving those spans
    (see tests/fakes.py), all stopped after the test."""
    from fakes import FakeSwarm

    swarms: list[FakeSwarm] = []

    def make(spans: list[tuple[int, int]], **peer_config: Any) -> FakeSwarm:
        swarm = FakeSwarm(checkpoint("llama"), **peer_config)
        swarms.append(swarm)
        swarm.add_many(spans)
        return swarm

    yield make
    for swarm in swarms:
        swarm.close()


# a client that gives up on a silent hop within about a second and retries quickly: in-process tests
FAST_CLIENT = dict(
    connect_timeout=2.0,
    min_hop_timeout=0.2,
    max_hop_timeout=1.0,
    ping_timeout=1.0,
    forward_timeout=20.0,
    max_retries=4,
    retry_delay=0.05,
    max_retry_delay=0.2,
    insecure=True,  # in-process peers speak plaintext
)


@pytest.fixture
def connect() -> Iterator[Callable[..., Any]]:
    """`connect(fake_swarm, **client_config)` -> a `SwarmConnection` over the fake swarm's discovery (no
    DHT), patient as `FAST_CLIENT` unless told otherwise; closed after the test."""
    from client.config import ClientConfig
    from client.swarm import SwarmConnection

    connections: list[SwarmConnection] = []

    def make(swarm: FakeSwarm, **options: Any) -> SwarmConnection:
        config = ClientConfig(**(FAST_CLIENT | options))
        connection = SwarmConnection.from_discovery(swarm.discovery, config, wire_dtype="float32")
        connections.append(connection)
        return connection

    yield make
    for connection in connections:
        connection.close()


@pytest.fixture(scope="module")
def dht(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[str]]:
    """The multiaddresses of a bare `corolla dht` process (modules with a richer DHT define their own)."""
    process = start_dht(tmp_path_factory.mktemp("dht"))
    try:
        yield process.maddrs
    finally:
        assert process.stop() == 0
