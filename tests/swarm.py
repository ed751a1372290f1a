"""Real `corolla dht` / `corolla serve` processes on 127.0.0.1 for tests; each stopped by PID."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from client import local_swarm
from client.local_swarm import LocalProcess as Process
from client.local_swarm import LocalSwarm, stop_all
from protos import peer_pb2_grpc, tls

__all__ = [
    "ENV",
    "LocalSwarm",
    "Process",
    "certificate",
    "channel",
    "push_flood",
    "running",
    "start_dht",
    "start_peer",
    "start_peers",
    "stop_all",
]

# one thread per peer: tests run several processes on a 2-core machine
ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")]),
}


@contextlib.contextmanager
def running(
    log_dir: Path, model: Path, spans: list[str], *options: str, dht_options: Sequence[str] = ()
) -> Iterator[LocalSwarm]:
    """A DHT (with `dht_options`) and peers serving `spans` (started at once, all with `options`); more join
    through `swarm.start_peers`; every process is stopped by PID at exit (a module fixture yields inside)."""
    with local_swarm.running(
        model, spans, *options, log_dir=log_dir, env=ENV, dht_options=dht_options
    ) as swarm:
        yield swarm


def start_dht(log_dir: Path, *options: str) -> Process:
    return local_swarm.start_dht(log_dir, *options, env=ENV)


def start_peer(
    log_dir: Path, model: Path, blocks: str, initial_peers: list[str], *extra: str, name=None
) -> Process:
    return local_swarm.start_peer(log_dir, model, blocks, initial_peers, *extra, name=name, env=ENV)


def start_peers(
    log_dir: Path, model: Path, spans: list[str], initial_peers: list[str], *extra: str
) -> list[Process]:
    """Several peers started at once (they load in parallel)."""
    return local_swarm.start_peers(log_dir, model, spans, initial_peers, *extra, env=ENV)


def certificate(process: Process) -> bytes:
    """The TLS certificate a peer process serves with (as its record announces it); b"" for `--insecure`."""
    ready = process.ready() or {}
    return (ready.get("certificate") or "").encode()


def channel(
    process: Process,
    *,
    address: str | None = None,
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = False,
) -> Any:
    """A channel (blocking, or `grpc.aio` with `aio`) to a peer process at `address` (default its own): TLS
    trusting the certificate from its ready file, as a client that read its record would; plaintext for an
    `--insecure` peer."""
    ready = process.ready()
    if ready is None:
        raise RuntimeError(f"{process} is not serving")
    target = address or ready["address"]
    certificate = ready.get("certificate")
    grpc_module: Any = grpc.aio if aio else grpc
    if certificate is None:
        return grpc_module.insecure_channel(target, options=list(options))
    credentials = tls.channel_credentials(certificate.encode())
    return grpc_module.secure_channel(target, credentials, options=[*options, *tls.channel_options()])


async def push_flood(
    process: Process, request: Any, count: int, *, options: Sequence[tuple[str, Any]] = ()
) -> list[grpc.StatusCode]:
    """`count` concurrent Push calls of `request` to a peer process over one connection (gRPC multiplexes
    them on it); the status code of each."""
    async with channel(process, options=options, aio=True) as opened:
        push = peer_pb2_grpc.PeerStub(opened).Push

        async def one() -> grpc.StatusCode:
            try:
                await push(request, timeout=60)
                return grpc.StatusCode.OK
            except grpc.aio.AioRpcError as e:
                return e.code()

        return list(await asyncio.gather(*(one() for _ in range(count))))
