"""A test world of real hosts: Linux network namespaces on an emulated internet (10.77.0.0/24) whose links a
userspace router (`tests/wan_router.py`) delays, rate-limits, drops and cuts, and home hosts behind NAT
routers (nftables masquerade). It makes and removes namespaces, devices and processes; it knows nothing of
what the processes say to each other.

    public host a (10.77.0.2) ─tun─┐
    public host b (10.77.0.3) ─tun─┼─ wan_router, in the test's own namespace: per link delay, rate, loss, cut
    NAT router of h (10.77.0.4) ─tun─┘
        └ veth 192.168.1.1 ── 192.168.1.2 home host h (dials out; nobody dials in)

A NAT router may forward TCP ports from its WAN address to its home host (`nat_host(forwards=...)`), as
Docker's published ports (`docker run -p 31337:31337`) do: public hosts dial 10.77.0.4:31337 and reach h.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from shutil import which
from typing import IO, Any

from client import local_swarm
from client.local_swarm import LocalProcess, ProcessHandle

logger = logging.getLogger(__name__)

_SBIN_PATH = f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin"
IP = which("ip", path=_SBIN_PATH) or "ip"
NFT = which("nft", path=_SBIN_PATH)  # None: no NAT hosts here
ROUTER = Path(__file__).with_name("wan_router.py")
REPO = Path(__file__).resolve().parent.parent

WAN_NETWORK = "10.77.0"  # the emulated internet: 10.77.0.0/24, one address per public host or NAT router
WAN_PREFIX_LEN = 24
FIRST_HOST, LAST_HOST = 2, 254  # host numbers in the WAN (10.77.0.N)
FIRST_HOME, LAST_HOME = 1, 254  # home networks: 192.168.K.0/24
MTU = 65000  # bytes: large packets keep the router's per-packet work low
NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
MAX_PORT = 65535  # of a TCP port a NAT router forwards

IP_TIMEOUT = 10.0  # seconds for one `ip` / `nft` command
COMMAND_TIMEOUT = 15.0  # seconds for the router to answer (adding a host runs three `ip` commands)
RUN_TIMEOUT = 60.0  # default limit of `Host.run`
STOP_TIMEOUT = 10.0  # seconds processes have to exit after SIGTERM before SIGKILL
KILL_TIMEOUT = 5.0  # seconds to wait for a SIGKILLed process

# the processes `start_dht` / `start_peer` run: offline, one thread each (several share 2 cores)
SWARM_ENV = {
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
}

# a home router: masquerade what leaves through the WAN device; forward what the home started and what
# arrives on a forwarded port (`{dnat}`, `{published}`: DNAT_RULE and PUBLISHED_RULE, or nothing)
NAT_RULESET = """
table ip corolla_nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {dnat}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        oifname "{wan}" masquerade
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "{home}" oifname "{wan}" accept
        {published}
    }}
}}
"""
# a published port (`docker run -p PORT:PORT`): what reaches the router's WAN address on one of `ports` goes
# on to the same port of the home host
DNAT_RULE = 'iifname "{wan}" tcp dport {{ {ports} }} dnat to {home_address}'
PUBLISHED_RULE = "ip daddr {home_address} tcp dport {{ {ports} }} ct status dnat accept"


class NetWorldError(RuntimeError):
    """The world could not be built or controlled: a command failed or the router stopped answering."""


def require_networld() -> None:
    """In a test: skip where namespaces cannot be made; under CI a missing nftables fails (CI installs it)."""
    import pytest  # only tests call this; the benchmark imports the world without pytest

    problem = networld_problem()
    if problem is None:
        return
    if os.environ.get("CI") and NFT is None:
        pytest.fail(f"CI must provide nftables (make nftables): {problem}")
    pytest.skip(problem)


def networld_problem() -> str | None:
    """Why hosts in network namespaces cannot be made here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if which("ip", path=_SBIN_PATH) is None:
        return "needs `ip` (apt-get install iproute2)"
    if NFT is None:
        return "needs `nft` for NAT (apt-get install nftables, or `make nftables`)"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as e:
        return f"cannot open /dev/net/tun: {e}"
    probe = f"cw{secrets.token_hex(3)}-probe"
    result = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True, timeout=IP_TIMEOUT)
    if result.returncode != 0:
        return f"`ip netns add` fails: {result.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True, timeout=IP_TIMEOUT)
    return None


def _ip(*args: str, check: bool = True, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [IP, *args], input=stdin, capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
    )
    if check and result.returncode != 0:
        raise NetWorldError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


@dataclass(frozen=True)
class Host:
    """A host: one namespace. `address` is its own IP, `public_address` the one public hosts see (its NAT
    router's for a home host, else the same)."""

    name: str
    namespace: str
    address: str
    public_address: str
    nat_namespace: str | None = None  # the home router's namespace, for a host behind NAT
    _register: Callable[[subprocess.Popen[Any]], None] = field(
        default=lambda _: None, repr=False, compare=False
    )

    @property
    def exec_prefix(self) -> list[str]:
        return [IP, "netns", "exec", self.namespace]

    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[Any]:
        """`subprocess.run` inside the namespace (within RUN_TIMEOUT unless `timeout` says otherwise)."""
        kw.setdefault("timeout", RUN_TIMEOUT)
        return subprocess.run([*self.exec_prefix, *argv], **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """`subprocess.Popen` inside the namespace (`ip netns exec` execs, so its PID is the command's); the
        world stops it at exit."""
        popen = subprocess.Popen([*self.exec_prefix, *argv], **kw)
        self._register(popen)
        return popen


class NetWorld:
    """Hosts in namespaces joined by the userspace WAN router; a context manager that removes, on the way
    out, every process (by PID), device and namespace (by name) it made, also when the body raised."""

    def __init__(self, log_dir: Path, *, mtu: int = MTU, max_queue_ms: float = 200.0) -> None:
        self.log_dir = Path(log_dir)
        self.mtu = mtu
        self.max_queue_ms = max_queue_ms
        self.prefix = f"cw{secrets.token_hex(3)}"  # of every namespace and device name: worlds never clash
        self.hosts: dict[str, Host] = {}
        self._namespaces: list[str] = []
        self._veths: list[tuple[str, str]] = []  # (namespace, device)
        self._processes: list[subprocess.Popen[Any]] = []
        self.router: subprocess.Popen[bytes] | None = None  # the WAN router process, kept after it stops
        self.router_log = self.log_dir / f"wan_router-{self.prefix}.log"
        self._router_log: IO[bytes] | None = None
        self._replies = b""
        self._lock = threading.Lock()
        self._next_wan = FIRST_HOST
        self._next_home = FIRST_HOME
        self._num_tuns = 0

    def __enter__(self) -> NetWorld:
        try:
            self._start_router()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- hosts --------------------------------------------------------------------------------------

    def host(self, name: str) -> Host:
        """A public host: its own namespace with one WAN address, reachable from every other public host."""
        self._check_new(name)
        namespace = self._add_namespace(name)
        address = self._wan_address()
        self._add_to_wan(name, namespace, address)
        host = Host(name, namespace, address, address, _register=self._processes.append)
        self.hosts[name] = host
        return host

    def nat_host(self, name: str, *, forwards: Sequence[int] = ()) -> Host:
        """A home host (192.168.K.2) behind its own NAT router (192.168.K.1 inside, a WAN address outside):
        it dials any public host; no public host can dial it, except on the TCP ports in `forwards`, which
        its router forwards (DNAT) from its WAN address to the same port of the home host: a container's
        published ports. Its links are its router's."""
        self._check_new(name)
        if not all(isinstance(port, int) and 0 < port <= MAX_PORT for port in forwards):
            raise ValueError(f"forwarded ports are TCP ports 1-{MAX_PORT}: {list(forwards)}")
        if self._next_home > LAST_HOME:
            raise NetWorldError(f"at most {LAST_HOME - FIRST_HOME + 1} home networks")
        number, self._next_home = self._next_home, self._next_home + 1
        inside, private = f"192.168.{number}.1", f"192.168.{number}.2"
        namespace = self._add_namespace(name)
        gateway = self._add_namespace(f"{name}.nat")
        home_device, gateway_device = f"{self.prefix}h{number}", f"{self.prefix}g{number}"
        _ip("link", "add", home_device, "netns", namespace, "type", "veth", "peer", "name", gateway_device,
            "netns", gateway)  # fmt: skip
        self._veths.append((namespace, home_device))
        for ns, device, address in ((namespace, home_device, private), (gateway, gateway_device, inside)):
            _ip("-n", ns, "link", "set", device, "mtu", str(self.mtu), "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", device)
        _ip("-n", namespace, "route", "add", "default", "via", inside)
        _ip("netns", "exec", gateway, "sh", "-c", "echo 1 > /proc/sys/net/ipv4/ip_forward")
        public = self._wan_address()
        wan_device = self._next_tun()
        dnat = published = ""
        if forwards:
            ports = ", ".join(str(port) for port in sorted(set(forwards)))
            dnat = DNAT_RULE.format(wan=wan_device, ports=ports, home_address=private)
            published = PUBLISHED_RULE.format(ports=ports, home_address=private)
        ruleset = NAT_RULESET.format(wan=wan_device, home=gateway_device, dnat=dnat, published=published)
        _ip("netns", "exec", gateway, NFT or "nft", "-f", "-", stdin=ruleset)
        self._add_to_wan(name, gateway, public, device=wan_device)
        host = Host(name, namespace, private, public, gateway, _register=self._processes.append)
        self.hosts[name] = host
        return host

    # ---- links --------------------------------------------------------------------------------------

    def link(
        self,
        a: Host | str,
        b: Host | str,
        *,
        delay_ms: float = 0.0,
        rate_mbit: float | None = None,
        loss: float = 0.0,
    ) -> None:
        """Set the link between a and b, the same each way: `delay_ms` one way, `rate_mbit` (None:
        unlimited), `loss` the probability a packet is dropped. Replaces its earlier setting."""
        self._command(op="link", a=_name(a), b=_name(b), delay_ms=delay_ms, rate_mbit=rate_mbit, loss=loss)

    def default_link(
        self, *, delay_ms: float = 0.0, rate_mbit: float | None = None, loss: float = 0.0
    ) -> None:
        """The link of every pair that has no setting of its own."""
        self._command(op="default", delay_ms=delay_ms, rate_mbit=rate_mbit, loss=loss)

    def cut(self, a: Host | str, b: Host | str) -> None:
        """Drop every packet between a and b (also those in flight) until `heal`."""
        self._command(op="cut", a=_name(a), b=_name(b))

    def heal(self, a: Host | str, b: Host | str) -> None:
        self._command(op="heal", a=_name(a), b=_name(b))

    def stats(self) -> dict[str, Any]:
        """The router's counters per direction ("a>b": packets, bytes, dropped_loss/cut/queue)."""
        return self._command(op="stats")

    # ---- processes ----------------------------------------------------------------------------------

    def spawn(
        self, host: Host, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `argv` inside `host` (stdout and stderr to `log`), stopped by PID when the world closes."""
        with log.open("wb") as handle:
            return host.popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                env=dict(os.environ, **(env or {})),
                start_new_session=True,
            )

    def run_module(
        self, host: Host, module: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
    ) -> ProcessHandle:
        """`python -m MODULE ARGV` inside `host` (output to `log`; forked where the test run forks processes,
        see `client.local_swarm.launch`), stopped by PID when the world closes."""
        process = local_swarm.launch(
            list(argv), log, self._swarm_env(env), prefix=host.exec_prefix, module=module
        )
        self._processes.append(process)  # type: ignore[arg-type]  # used as a Popen: pid, poll, wait, kill
        return process

    def start_dht(self, host: Host, *options: str, env: Mapping[str, str] | None = None) -> LocalProcess:
        """A `corolla dht` listening on the host's address, ready (its `maddrs` set); logs in LOG_DIR/NAME."""
        process = local_swarm.start_dht(
            self._logs(host), *options, env=self._swarm_env(env), prefix=host.exec_prefix, host=host.address
        )
        self._processes.append(process.popen)
        return process

    def start_peer(
        self,
        host: Host,
        model: Path | str,
        blocks: str,
        initial_peers: list[str],
        *options: str,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> LocalProcess:
        """A `corolla serve` of `blocks` (START:END, or a count it places itself) on the host's address,
        serving (its `address`, `peer_id` and `span` set)."""
        process = local_swarm.start_peer(
            self._logs(host),
            model,
            blocks,
            initial_peers,
            *options,
            name=name,
            env=self._swarm_env(env),
            prefix=host.exec_prefix,
            host=host.address,
        )
        self._processes.append(process.popen)
        return process

    # ---- teardown -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every process (SIGTERM, then SIGKILL by PID), then the router (its TUN devices go with it),
        then delete the veths and namespaces; safe to call twice."""
        _stop(self._processes)
        self._processes.clear()
        self._stop_router()
        for namespace, device in self._veths:
            _ip("-n", namespace, "link", "del", device, check=False)
        self._veths.clear()
        for namespace in reversed(self._namespaces):
            _kill_remaining(namespace)
            _ip("netns", "del", namespace, check=False)
        self._namespaces.clear()

    # ---- internals ----------------------------------------------------------------------------------

    def _check_new(self, name: str) -> None:
        if not NAME.fullmatch(name):
            raise ValueError(f"a host name is 1-32 letters, digits or _: {name!r}")
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")

    def _add_namespace(self, name: str) -> str:
        namespace = f"{self.prefix}-{name}"
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def _wan_address(self) -> str:
        if self._next_wan > LAST_HOST:
            raise NetWorldError(f"at most {LAST_HOST - FIRST_HOST + 1} WAN addresses")
        number, self._next_wan = self._next_wan, self._next_wan + 1
        return f"{WAN_NETWORK}.{number}"

    def _next_tun(self) -> str:
        self._num_tuns += 1
        return f"{self.prefix}t{self._num_tuns}"

    def _add_to_wan(self, name: str, namespace: str, address: str, *, device: str | None = None) -> None:
        self._command(
            op="add",
            name=name,
            device=device or self._next_tun(),
            namespace=namespace,
            address=address,
            prefix_len=WAN_PREFIX_LEN,
            mtu=self.mtu,
        )

    def _logs(self, host: Host) -> Path:
        folder = self.log_dir / host.name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    @staticmethod
    def _swarm_env(env: Mapping[str, str] | None) -> dict[str, str]:
        return {**SWARM_ENV, **(env or {})}

    def _start_router(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._router_log = self.router_log.open("wb")
        self.router = subprocess.Popen(
            [sys.executable, str(ROUTER), "--max-queue-ms", str(self.max_queue_ms)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._router_log,
            bufsize=0,
            start_new_session=True,
        )
        self._command(op="stats")  # answers once its loop runs

    def _command(self, **command: Any) -> dict[str, Any]:
        with self._lock:
            router = self.router
            if router is None or router.stdin is None or router.stdin.closed:
                raise NetWorldError("the WAN router is not running")
            try:
                router.stdin.write(json.dumps(command).encode() + b"\n")
            except BrokenPipeError as e:
                raise NetWorldError(f"the WAN router exited ({router.poll()}); see {self.router_log}") from e
            reply = self._read_reply(router)
        if not reply.get("ok"):
            raise NetWorldError(f"the WAN router refused {command['op']}: {reply.get('error')}")
        return reply

    def _read_reply(self, router: subprocess.Popen[bytes]) -> dict[str, Any]:
        if router.stdout is None:
            raise NetWorldError("the WAN router has no reply pipe")
        deadline = time.monotonic() + COMMAND_TIMEOUT
        while b"\n" not in self._replies:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([router.stdout], [], [], left)[0]:
                raise NetWorldError(f"the WAN router did not answer within {COMMAND_TIMEOUT}s")
            chunk = os.read(router.stdout.fileno(), 65536)
            if not chunk:
                raise NetWorldError(f"the WAN router exited ({router.poll()}); see {self.router_log}")
            self._replies += chunk
        line, _, self._replies = self._replies.partition(b"\n")
        return dict(json.loads(line))

    def _stop_router(self) -> None:
        router = self.router
        if router is not None:
            if router.stdin is not None and not router.stdin.closed:
                with contextlib.suppress(BrokenPipeError):
                    router.stdin.close()  # it exits when stdin closes
            try:
                router.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                _stop([router])
            if router.stdout is not None and not router.stdout.closed:
                router.stdout.close()
        if self._router_log is not None:
            self._router_log.close()
            self._router_log = None


def _name(host: Host | str) -> str:
    return host.name if isinstance(host, Host) else host


def _stop(processes: Sequence[subprocess.Popen[Any]]) -> None:
    """SIGTERM each by PID (SIGCONT first: a frozen process cannot exit), SIGKILL those alive after
    STOP_TIMEOUT."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGCONT)
            process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in running:
        try:
            process.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("process ignored SIGTERM pid=%s args=%s", process.pid, process.args)
            process.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(KILL_TIMEOUT)


def _kill_remaining(namespace: str) -> None:
    """SIGKILL what still runs in one of this world's namespaces (a child a stopped process left behind,
    like a DHT's p2pd): only processes ours started can be there."""
    listed = _ip("netns", "pids", namespace, check=False).stdout.split()
    pids = [int(pid) for pid in listed if pid.isdigit()]
    if not pids:
        return
    logger.warning("killing leftover processes namespace=%s pids=%s", namespace, pids)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + KILL_TIMEOUT
    while time.monotonic() < deadline and _ip("netns", "pids", namespace, check=False).stdout.strip():
        time.sleep(0.05)
