"""A swarm of local processes on 127.0.0.1 (a DHT bootstrap and peers), started through the `corolla` CLI
for demos, benchmarks and tests; every process is stopped by PID."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_TIMEOUT = 180.0
_SERVING = re.compile(r"serving model=(\S+) blocks=\[(\d+),(\d+)\) address=(\S+) peer_id=(\S+)")
_MADDR = re.compile(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", re.M)


@dataclass
class LocalProcess:
    popen: subprocess.Popen[bytes]
    log: Path
    address: str = ""
    peer_id: str = ""
    span: tuple[int, int] = (0, 0)  # the span it served when it started
    maddrs: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal by PID and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)  # a frozen process cannot exit
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return int(self.popen.returncode)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None) -> subprocess.Popen[bytes]:
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    with log.open("w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "protos.cli", *args],
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )


def _wait_for(process: LocalProcess, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        match = pattern.search(process.text())
        if match:
            return match
        if process.popen.poll() is not None:
            raise RuntimeError(f"process exited with {process.popen.returncode}:\n{process.text()[-3000:]}")
        time.sleep(0.1)
    process.stop(signal.SIGKILL)
    raise TimeoutError(f"no {pattern.pattern!r} within {timeout}s:\n{process.text()[-3000:]}")


def _placement(blocks: str) -> list[str]:
    """`START:END` serves a fixed span; a bare number K lets the peer choose K blocks (`--num-blocks`)."""
    return ["--blocks", blocks] if ":" in blocks else ["--num-blocks", blocks]


def _serving(process: LocalProcess) -> None:
    match = _wait_for(process, _SERVING, STARTUP_TIMEOUT)
    process.address, process.peer_id = match.group(4), match.group(5)
    process.span = (int(match.group(2)), int(match.group(3)))


def start_dht(log_dir: Path, *, env: dict[str, str] | None = None) -> LocalProcess:
    log = log_dir / "dht.log"
    process = LocalProcess(_spawn(["dht", "--host", "127.0.0.1"], log, env), log)
    _wait_for(process, _MADDR, STARTUP_TIMEOUT)
    process.maddrs = _MADDR.findall(process.text())
    return process


def start_peer(
    log_dir: Path,
    model: Path | str,
    blocks: str,
    initial_peers: list[str],
    *extra: str,
    name: str | None = None,
    env: dict[str, str] | None = None,
) -> LocalProcess:
    log = log_dir / f"peer-{name or blocks.replace(':', '-')}.log"
    args = [
        "serve",
        str(model),
        *_placement(blocks),
        "--host",
        "127.0.0.1",
        "--initial-peers",
        *initial_peers,
    ]
    process = LocalProcess(_spawn([*args, *extra], log, env), log)
    _serving(process)
    return process


def start_peers(
    log_dir: Path,
    model: Path | str,
    spans: list[str],
    initial_peers: list[str],
    *extra: str,
    env: dict[str, str] | None = None,
) -> list[LocalProcess]:
    """Start several peers at once (they load in parallel), then wait for each to serve. Each entry of
    `spans` is START:END, or a number of blocks the peer places itself."""
    started = []
    try:
        for number, blocks in enumerate(spans):
            log = log_dir / f"peer-{number}-{blocks.replace(':', '-')}.log"
            args = ["serve", str(model), *_placement(blocks), "--host", "127.0.0.1"]
            started.append(
                LocalProcess(_spawn([*args, "--initial-peers", *initial_peers, *extra], log, env), log)
            )
        for process in started:
            _serving(process)
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started
