"""Real `corolla dht` / `corolla serve` processes on 127.0.0.1 for tests; each stopped by PID."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from client import local_swarm
from client.local_swarm import LocalProcess as Process
from client.local_swarm import LocalSwarm

__all__ = ["LocalSwarm", "Process", "running", "start_dht", "start_peer", "start_peers"]

# one thread per peer: tests run several processes on a 2-core machine
_ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
}


@contextlib.contextmanager
def running(log_dir: Path, model: Path, spans: list[str], *options: str) -> Iterator[LocalSwarm]:
    """A DHT and peers serving `spans` (started at once, all with `options`); more join through
    `swarm.start_peers`; every process is stopped by PID at exit (a module fixture yields inside)."""
    with local_swarm.running(model, spans, *options, log_dir=log_dir, env=_ENV) as swarm:
        yield swarm


def start_dht(log_dir: Path) -> Process:
    return local_swarm.start_dht(log_dir, env=_ENV)


def start_peer(
    log_dir: Path, model: Path, blocks: str, initial_peers: list[str], *extra: str, name=None
) -> Process:
    return local_swarm.start_peer(log_dir, model, blocks, initial_peers, *extra, name=name, env=_ENV)


def start_peers(
    log_dir: Path, model: Path, spans: list[str], initial_peers: list[str], *extra: str
) -> list[Process]:
    """Several peers started at once (they load in parallel)."""
    return local_swarm.start_peers(log_dir, model, spans, initial_peers, *extra, env=_ENV)
