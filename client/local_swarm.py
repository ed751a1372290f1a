"""A swarm of local processes on 127.0.0.1 (a DHT bootstrap and peers), started through the `corolla` CLI
for demos, benchmarks and tests; every process is stopped by PID.

A process is ready when it has written its `--ready-file` (JSON); its log is only for people to read.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

STARTUP_TIMEOUT = 180.0
READY_POLL_PERIOD = 0.1  # seconds between looks at a starting process's ready file
LOG_TAIL_CHARS = 3000  # of a failed process's log, shown in the error
LOCALHOST = "127.0.0.1"  # where processes listen unless a caller gives another `host`


class ProcessHandle(Protocol):
    """What this module needs of a started process: `subprocess.Popen`, or a launcher's own handle."""

    pid: int
    returncode: int | Any

    def poll(self) -> int | None: ...

    def wait(self, timeout: float | None = None) -> int: ...

    def send_signal(self, sig: int) -> None: ...

    def kill(self) -> None: ...


class Launcher(Protocol):
    """Starts `python -m MODULE ARGV` (`MODULE.main(ARGV)`) behind `prefix`, with environment `env` and its
    output in `log`; None leaves it to a new process."""

    def __call__(
        self, argv: list[str], log: Path, env: dict[str, str], *, prefix: Sequence[str], module: str
    ) -> ProcessHandle | None: ...


_launcher: Launcher | None = None


def use_launcher(launcher: Launcher | None) -> None:
    """Start the processes of this module through `launcher` where it accepts them (tests fork them from a
    process that has imported everything once); None: a new process each."""
    global _launcher
    _launcher = launcher


@dataclass
class LocalProcess:
    popen: ProcessHandle
    log: Path
    ready_file: Path
    address: str = ""
    peer_id: str = ""
    span: tuple[int, int] = (0, 0)  # the span it served when it started; `served_span()` for now
    maddrs: list[str] = field(default_factory=list)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> dict[str, Any] | None:
        """The process's ready file, or None while it has not written one (or after it stopped)."""
        try:
            content = json.loads(self.ready_file.read_text())
        except FileNotFoundError:
            return None
        return content if isinstance(content, dict) else None

    def served_span(self) -> tuple[int, int] | None:
        """The span a peer serves now (its ready file is rewritten after each move); None if not ready."""
        content = self.ready()
        return None if content is None else (int(content["start"]), int(content["end"]))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal by PID and wait; SIGKILL if it does not exit in time. Returns the exit code."""
        self.signal(sig)
        return self.wait(timeout)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` by PID unless it has exited (a frozen process is continued first: it could not exit)."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGCONT)
            self.popen.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        """Its exit code, after at most `timeout` seconds (then SIGKILL)."""
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        return int(self.popen.returncode)


def stop_all(processes: Sequence[LocalProcess], timeout: float = 30.0) -> None:
    """Stop `processes` together: SIGTERM to each by PID, then wait for all within `timeout` seconds (each
    drains at the same time as the others), SIGKILL for any still running."""
    for process in processes:
        process.signal()
    deadline = time.monotonic() + timeout
    for process in processes:
        process.wait(max(deadline - time.monotonic(), 0.1))


def launch(
    argv: list[str],
    log: Path,
    env: dict[str, str] | None = None,
    *,
    prefix: Sequence[str] = (),
    module: str = "protos.cli",
) -> ProcessHandle:
    """Start `python -m MODULE ARGV` (`corolla ARGV` by default) behind the argv `prefix` (e.g. `ip netns exec
    NS`, which execs: the PID stays the process's own), in a session of its own, its output in `log`; through
    the launcher (`use_launcher`) where it takes it."""
    environment = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    if _launcher is not None:
        log.write_bytes(b"")  # now, not when the child opens it: `_peer_log` counts the logs present
        launched = _launcher(argv, log, environment, prefix=prefix, module=module)
        if launched is not None:
            return launched
    with log.open("w") as handle:
        return subprocess.Popen(
            [*prefix, sys.executable, "-m", module, *argv],
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            env=environment,
            start_new_session=True,
        )


def _spawn(
    args: list[str],
    log: Path,
    env: dict[str, str] | None,
    *,
    prefix: Sequence[str] = (),
    module: str = "protos.cli",
) -> LocalProcess:
    """`launch` a command that writes a ready file (next to `log`) once it serves."""
    ready_file = log.with_suffix(".ready.json")
    ready_file.unlink(missing_ok=True)  # left by an earlier run in the same folder
    handle = launch([*args, "--ready-file", str(ready_file)], log, env, prefix=prefix, module=module)
    return LocalProcess(handle, log, ready_file)


def _wait_ready(process: LocalProcess, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = process.ready()
        if content is not None:
            return content
        if process.popen.poll() is not None:
            raise RuntimeError(
                f"process exited with {process.popen.returncode}:\n{process.text()[-LOG_TAIL_CHARS:]}"
            )
        time.sleep(READY_POLL_PERIOD)
    process.stop(signal.SIGKILL)
    raise TimeoutError(f"not ready within {timeout}s:\n{process.text()[-LOG_TAIL_CHARS:]}")


def _peer_log(log_dir: Path, blocks: str, name: str | None) -> Path:
    """`peer-NAME.log`, or `peer-N-START-END.log` with the lowest N not used yet in `log_dir`: a peer started
    later in the same folder (a replacement, another call) gets its own log and ready file."""
    if name is not None:
        return log_dir / f"peer-{name}.log"
    taken = {log.name.split("-")[1] for log in log_dir.glob("peer-*.log")}
    number = next(n for n in itertools.count() if str(n) not in taken)
    return log_dir / f"peer-{number}-{blocks.replace(':', '-')}.log"


def _peer_args(
    model: Path | str, blocks: str, initial_peers: list[str], extra: tuple[str, ...], *, host: str = LOCALHOST
) -> list[str]:
    """`START:END` serves a fixed span; a bare number K lets the peer choose K blocks (`--span-length`).
    Without initial peers the peer starts a swarm of its own (`--new-swarm`)."""
    placement = ["--blocks", blocks] if ":" in blocks else ["--span-length", blocks]
    swarm = ["--initial-peers", *initial_peers] if initial_peers else ["--new-swarm"]
    return ["serve", str(model), *placement, "--host", host, *swarm, *extra]


def _serving(process: LocalProcess) -> None:
    content = _wait_ready(process, STARTUP_TIMEOUT)
    process.address, process.peer_id = str(content["address"]), str(content["peer_id"])
    process.span = (int(content["start"]), int(content["end"]))


def start_dht(
    log_dir: Path,
    *options: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str = LOCALHOST,
) -> LocalProcess:
    """A `corolla dht` on `host` (with `options`, e.g. `--swarm-key FILE`), ready to be joined; `prefix` runs
    it through another command (e.g. `ip netns exec NS`)."""
    process = _spawn(["dht", "--host", host, *options], log_dir / "dht.log", env, prefix=prefix)
    process.maddrs = [str(maddr) for maddr in _wait_ready(process, STARTUP_TIMEOUT)["maddrs"]]
    return process


def start_peer(
    log_dir: Path,
    model: Path | str,
    blocks: str,
    initial_peers: list[str],
    *extra: str,
    name: str | None = None,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str = LOCALHOST,
) -> LocalProcess:
    args = _peer_args(model, blocks, initial_peers, extra, host=host)
    process = _spawn(args, _peer_log(log_dir, blocks, name), env, prefix=prefix)
    _serving(process)
    return process


def start_peers(
    log_dir: Path,
    model: Path | str,
    spans: list[str],
    initial_peers: list[str],
    *extra: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str = LOCALHOST,
) -> list[LocalProcess]:
    """Start several peers at once (they load in parallel), then wait for each to serve. Each entry of
    `spans` is START:END, or a number of blocks the peer places itself."""
    started = []
    try:
        for blocks in spans:
            args = _peer_args(model, blocks, initial_peers, extra, host=host)
            started.append(_spawn(args, _peer_log(log_dir, blocks, None), env, prefix=prefix))
        for process in started:
            _serving(process)
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


def start_api(
    log_dir: Path,
    model: Path | str,
    initial_peers: list[str],
    *extra: str,
    env: dict[str, str] | None = None,
    prefix: Sequence[str] = (),
    host: str = LOCALHOST,
) -> LocalProcess:
    """A `corolla api` gateway on a free port of `host` (with `extra` options), ready to be called; its
    `address` is the base URL (http://HOST:PORT/v1)."""
    args = ["api", str(model), "--host", host, "--port", "0", "--initial-peers", *initial_peers]
    args += extra
    process = _spawn(args, log_dir / "api.log", env, prefix=prefix)
    process.address = str(_wait_ready(process, STARTUP_TIMEOUT)["url"])
    return process


@dataclass
class LocalSwarm:
    """A DHT bootstrap and the peers started under it, all serving `model`; `running()` stops them."""

    model: Path | str
    log_dir: Path
    dht: LocalProcess
    env: dict[str, str] | None = None
    peers: list[LocalProcess] = field(default_factory=list)

    @property
    def initial_peers(self) -> list[str]:
        return self.dht.maddrs

    def start_peers(self, spans: list[str], *options: str) -> list[LocalProcess]:
        """More peers under the same DHT (see `start_peers`), stopped with the swarm if not before."""
        started = start_peers(self.log_dir, self.model, spans, self.initial_peers, *options, env=self.env)
        self.peers += started
        return started

    def stop(self) -> None:
        """Stop every process by PID: the peers together, then the DHT."""
        stop_all(self.peers)
        self.dht.stop()


@contextlib.contextmanager
def running(
    model: Path | str,
    spans: list[str],
    *peer_options: str,
    log_dir: Path | None = None,
    env: dict[str, str] | None = None,
    dht_options: Sequence[str] = (),
) -> Iterator[LocalSwarm]:
    """A DHT (with `dht_options`) and one peer per entry of `spans` (all with `peer_options`), logging to
    `log_dir` (default: a temporary folder, removed afterwards); every process is stopped by PID on the way
    out."""
    with contextlib.ExitStack() as stack:
        if log_dir is None:
            log_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="corolla-swarm-")))
        swarm = LocalSwarm(model, log_dir, start_dht(log_dir, *dht_options, env=env), env)
        try:
            swarm.start_peers(spans, *peer_options)
            yield swarm
        finally:
            swarm.stop()
