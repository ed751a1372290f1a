"""A fork server for the test run: one process imports what `corolla dht`, `serve` and `api` load (torch,
transformers, hivemind, the peer, the gateway) once, then forks every such process a test starts.

A peer process spends most of its start importing (8 of 13 s when three start together on two cores);
forked from a warm server it starts serving in about a second. The children are the same commands, run by
their module's `main` (`protos.cli` for `corolla`, or a test's own entry point such as `tests.hostile_peer`)
with the command line and environment the test gave; each is its own session (its own process group) with its
log on stdout and stderr, and tests signal it by PID as any process they start.
The server reaps its children and writes each one's exit code (as `Popen.returncode` has it) to a file the
test's handle reads.

Only processes whose environment agrees with the server's in every variable that libraries read at import
time are forked; others start as before. Behind the prefix `ip netns exec NS` (`tests/networld.py`'s hosts)
the child joins namespace NS itself; any other prefix starts a new process.

Run as a script, this file is the server: it reads one JSON request per line on stdin and answers each with
the child's PID on stdout; it exits when stdin closes.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)
# what the commands import on their way to serving, loaded once by the server
WARM_MODULES = (
    "protos.cli",
    "protos.dht",
    "tests.hostile_peer",
    "tests.wan_client",
    "peer.main",
    "client.cli",
    "client.gateway",
    "transformers.models.llama.modeling_llama",
    "transformers.models.gpt2.modeling_gpt2",
    "transformers.models.mistral.modeling_mistral",
    "transformers.models.mixtral.modeling_mixtral",
)
# variables a library reads when it is imported: a process that sets them otherwise is not forked
IMPORT_TIME_PREFIXES = (
    "HF_",
    "TRANSFORMERS_",
    "TORCH_",
    "PYTORCH_",
    "OMP_",
    "MKL_",
    "GRPC_",
    "CUDA_",
    "PYTHON",
)
NETNS_DIR = "/run/netns"  # where `ip netns add` keeps a namespace's handle
CLONE_NEWNET = 0x40000000  # setns(2): the handle is a network namespace
START_TIMEOUT = 120.0  # seconds for the server to import everything and say it is ready
REAP_PERIOD = 0.05  # seconds between the server's looks for exited children
EXIT_POLL_PERIOD = 0.02  # seconds between a handle's looks at its exit file


class Forked:
    """A forked process, used as `subprocess.Popen` is: `pid`, `poll`, `wait`, `send_signal`, `kill`,
    `terminate`, `returncode` (negative: the signal that ended it)."""

    def __init__(self, pid: int, argv: list[str], exit_file: Path) -> None:
        self.pid, self.args, self._exit_file = pid, argv, exit_file
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                self.returncode = int(self._exit_file.read_text())
            except (FileNotFoundError, ValueError):
                return None
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while (code := self.poll()) is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
            time.sleep(EXIT_POLL_PERIOD)
        return code

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:  # not reaped yet, so the PID is still this process's
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """The server process, started with `env`, and the way to ask it for children."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = dict(env)
        self._lock = threading.Lock()
        self._count = 0
        self.popen = subprocess.Popen(
            [sys.executable, __file__],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=self.env,
            cwd=os.getcwd(),
        )
        ready = self._reply(START_TIMEOUT)
        if ready.get("ready") is not True:
            self.close()
            raise RuntimeError(f"fork server did not start: {ready}")

    def launch(
        self, argv: list[str], log: Path, env: dict[str, str], *, prefix: Sequence[str], module: str
    ) -> Forked | None:
        """`MODULE.main(ARGV)` forked with `env` and its output in `log`, inside the network namespace NS for
        the prefix `ip netns exec NS`; None when `env` differs from the server's in a variable read at import
        time, or for any other prefix (start that one as a new process)."""
        namespace = _namespace(prefix)
        if prefix and namespace is None:
            return None
        if self.popen.poll() is not None:
            return None
        ours, theirs = _import_time(self.env), _import_time(env)
        if ours != theirs:
            differ = sorted(key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key))
            logger.info("a new process, not forked: %s differ from the fork server's", ", ".join(differ))
            return None
        with self._lock:
            self._count += 1
            exit_file = log.with_name(f"{log.name}.exit-{os.getpid()}-{self._count}")
            exit_file.unlink(missing_ok=True)
            request = {
                "argv": argv,
                "module": module,
                "netns": namespace,
                "log": str(log),
                "env": env,
                "exit_file": str(exit_file),
            }
            stdin = self.popen.stdin
            if stdin is None:
                return None
            stdin.write((json.dumps(request) + "\n").encode())
            stdin.flush()
            reply = self._reply(30.0)
        if "pid" not in reply:
            raise RuntimeError(f"fork server refused {argv}: {reply}")
        return Forked(int(reply["pid"]), [module, *argv], exit_file)

    def close(self) -> None:
        if self.popen.stdin is not None:
            self.popen.stdin.close()
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def _reply(self, timeout: float) -> dict[str, Any]:
        stdout = self.popen.stdout
        if stdout is None:
            return {"error": "no pipe"}
        readable, _, _ = select.select([stdout], [], [], timeout)
        line = stdout.readline() if readable else b""
        return json.loads(line) if line else {"error": "no answer"}


class LazyLauncher:
    """A `client.local_swarm` launcher that starts the server at its first use (runs without swarm tests
    never pay for it); if the server cannot start, every process starts as a new one."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.server: ForkServer | None = None
        self.failed = False

    def __call__(
        self, argv: list[str], log: Path, env: dict[str, str], *, prefix: Sequence[str], module: str
    ) -> Forked | None:
        if self.failed:
            return None
        if self.server is None:
            try:
                self.server = ForkServer(self.env)
            except (OSError, RuntimeError) as e:
                logger.warning("no fork server (%s): processes start on their own", e)
                self.failed = True
                return None
        return self.server.launch(argv, log, env, prefix=prefix, module=module)

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


def _namespace(prefix: Sequence[str]) -> str | None:
    """NS of the prefix `ip netns exec NS` (as `tests/networld.py` runs processes in its hosts), else None."""
    if len(prefix) == 4 and Path(prefix[0]).name == "ip" and list(prefix[1:3]) == ["netns", "exec"]:
        return str(prefix[3])
    return None


def _import_time(env: dict[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.startswith(IMPORT_TIME_PREFIXES)}


# ---- the server ----


def _child(request: dict[str, Any]) -> None:
    """In the forked child: become the command and exit with its code (never returns)."""
    code = 1
    try:
        os.setsid()
        if request.get("netns"):
            _enter_namespace(request["netns"])
        signal.signal(signal.SIGINT, signal.default_int_handler)  # the server ignores it; a command does not
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        os.close(null)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115 (the process's own streams)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
        os.environ.clear()
        os.environ.update(request["env"])
        if "numpy" in sys.modules:  # seeded once in the server; each child draws its own
            sys.modules["numpy"].random.seed()
        entry = importlib.import_module(request["module"])
        sys.argv = [request["module"], *request["argv"]]
        code = int(entry.main(request["argv"]) or 0)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:  # any failure is the child's exit code, with the traceback in its log
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        try:
            import atexit

            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _enter_namespace(name: str) -> None:
    """Join the network namespace `ip netns` made as NAME (what `ip netns exec` does for networking; a forked
    child has one thread, as setns(2) needs)."""
    libc = ctypes.CDLL(None, use_errno=True)
    handle = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY)
    try:
        if libc.setns(handle, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns into network namespace {name}")
    finally:
        os.close(handle)


def _reap(exit_files: dict[int, str]) -> None:
    while exit_files:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        path = exit_files.pop(pid, None)
        if path is not None:
            temporary = f"{path}.tmp"
            Path(temporary).write_text(str(os.waitstatus_to_exitcode(status)))
            os.replace(temporary, path)


def _serve() -> None:
    for module in WARM_MODULES:
        importlib.import_module(module)
    if threading.active_count() != 1:  # forking a process with threads copies locks some thread held
        print(json.dumps({"error": f"{threading.active_count()} threads after imports"}), flush=True)
        return
    print(json.dumps({"ready": True}), flush=True)
    exit_files: dict[int, str] = {}
    pending = b""
    while True:
        readable, _, _ = select.select([0], [], [], REAP_PERIOD)
        _reap(exit_files)
        if not readable:
            continue
        chunk = os.read(0, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            request = json.loads(line)
            pid = os.fork()
            if pid == 0:
                _child(request)
            exit_files[pid] = request["exit_file"]
            print(json.dumps({"pid": pid}), flush=True)
    deadline = time.monotonic() + 30.0  # the test stops its processes; wait a little for stragglers
    while exit_files and time.monotonic() < deadline:
        _reap(exit_files)
        time.sleep(REAP_PERIOD)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in the test run stops the tests, which stop this
    _serve()
