"""Real `corolla dht` / `corolla serve` processes on 127.0.0.1 for tests; each stopped by PID."""

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

STARTUP_TIMEOUT = 120.0
_SERVING = re.compile(r"serving model=(\S+) blocks=\[(\d+),(\d+)\) address=(\S+) peer_id=(\S+)")


@dataclass
class Process:
    popen: subprocess.Popen
    log: Path
    address: str = ""
    peer_id: str = ""
    maddrs: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal by PID and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        if self.popen.poll() is None:
            if self.popen.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGCONT)  # a frozen process cannot exit
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def _spawn(args: list[str], log: Path) -> subprocess.Popen:
    handle = log.open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "protos.cli", *args],
        stdout=handle,
        stderr=subprocess.STDOUT,
        env=_env(),
        start_new_session=True,
    )


def _wait_for(process: Process, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
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


def start_dht(log_dir: Path) -> Process:
    process = Process(_spawn(["dht", "--host", "127.0.0.1"], log_dir / "dht.log"), log_dir / "dht.log")
    _wait_for(process, re.compile(r"^/ip4/127\.0\.0\.1/tcp/\d+/p2p/\w+$", re.M), STARTUP_TIMEOUT)
    process.maddrs = re.findall(r"^/ip4/\S+$", process.text(), re.M)
    return process


def start_peer(
    log_dir: Path, model: Path, blocks: str, initial_peers: list[str], *extra: str, name: str | None = None
) -> Process:
    log = log_dir / f"peer-{name or blocks.replace(':', '-')}.log"
    args = ["serve", str(model), "--blocks", blocks, "--host", "127.0.0.1", "--initial-peers", *initial_peers]
    process = Process(_spawn([*args, *extra], log), log)
    match = _wait_for(process, _SERVING, STARTUP_TIMEOUT)
    process.address, process.peer_id = match.group(4), match.group(5)
    return process
