"""A userspace WAN router for `tests/networld.py`: one TUN device per public host, IPv4 packets moved
between them by destination address after each link's delay, rate limit, loss and cuts.

Run as its own process in the test's network namespace; controlled by JSON lines on stdin (one JSON reply
line on stdout per command); exits when stdin closes or on SIGTERM. It knows hosts by name and address,
not namespaces' contents: NAT, routes behind a host and processes are `networld`'s business.

    host A's TUN --read--> [link A>B: loss? cut? token bucket -> delay] --heap--> write --> host B's TUN
"""

from __future__ import annotations

import argparse
import fcntl
import heapq
import itertools
import json
import logging
import os
import random
import selectors
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("wan_router")

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000  # bare IPv4 packets, no 4-byte packet-information header
MAX_PACKET_BYTES = 65535
MAX_READS_PER_WAKE = 64  # packets read from one TUN before the others get a turn
IP_TIMEOUT = 10.0  # seconds for one `ip` command
IP = shutil.which("ip", path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin") or "ip"


class CommandError(ValueError):
    """A control command that cannot be carried out; the reply says why and the router goes on."""


@dataclass(frozen=True)
class Link:
    """One link's behaviour, the same in both directions; `rate_mbit=None` is unlimited."""

    delay_ms: float = 0.0  # one way
    rate_mbit: float | None = None
    loss: float = 0.0  # probability that a packet is dropped, per packet

    @classmethod
    def parse(cls, command: dict[str, Any]) -> Link:
        delay_ms = float(command.get("delay_ms", 0.0))
        rate = command.get("rate_mbit")
        rate_mbit = None if rate is None else float(rate)
        loss = float(command.get("loss", 0.0))
        if delay_ms < 0 or not 0.0 <= loss <= 1.0 or (rate_mbit is not None and rate_mbit <= 0):
            raise CommandError(f"bad link: delay_ms={delay_ms} rate_mbit={rate_mbit} loss={loss}")
        return cls(delay_ms, rate_mbit, loss)


@dataclass
class Direction:
    """The state of one direction of a link: its queue (as the time its last packet finishes leaving) and
    counters."""

    free_at: float = 0.0  # monotonic seconds when the queued packets have all been sent at the link rate
    last_delivery: float = 0.0  # keeps a link FIFO when its delay is lowered while packets are in flight
    packets: int = 0
    bytes: int = 0
    dropped_loss: int = 0
    dropped_cut: int = 0
    dropped_queue: int = 0

    def counters(self) -> dict[str, int]:
        names = ("packets", "bytes", "dropped_loss", "dropped_cut", "dropped_queue")
        return {name: getattr(self, name) for name in names}


@dataclass
class Node:
    name: str
    address: bytes  # 4 bytes, as in the IPv4 header
    fd: int


@dataclass
class Router:
    max_queue: float  # seconds of sending a link's queue may hold before it drops (tail drop)
    nodes: dict[str, Node] = field(default_factory=dict)
    by_address: dict[bytes, Node] = field(default_factory=dict)
    links: dict[frozenset[str], Link] = field(default_factory=dict)
    default: Link = field(default_factory=Link)
    cuts: set[frozenset[str]] = field(default_factory=set)
    directions: dict[tuple[str, str], Direction] = field(default_factory=dict)
    # (deliver_at, sequence, source, destination, packet): sequence keeps equal times FIFO
    pending: list[tuple[float, int, str, Node, bytes]] = field(default_factory=list)
    unroutable: int = 0
    sequence: itertools.count = field(default_factory=itertools.count)

    # ---- packets ------------------------------------------------------------------------------------

    def route(self, source: Node, packet: bytes, now: float) -> None:
        destination = (
            self.by_address.get(packet[16:20]) if len(packet) >= 20 and packet[0] >> 4 == 4 else None
        )
        if destination is None:
            self.unroutable += 1
            return
        pair = frozenset((source.name, destination.name))
        direction = self.directions.setdefault((source.name, destination.name), Direction())
        link = self.links.get(pair, self.default)
        if pair in self.cuts:
            direction.dropped_cut += 1
            return
        if link.loss and random.random() < link.loss:
            direction.dropped_loss += 1
            return
        start = max(now, direction.free_at)
        if start - now > self.max_queue:
            direction.dropped_queue += 1
            return
        # a token bucket one packet deep: each packet leaves its transmission time after the one before
        direction.free_at = start + (len(packet) * 8 / (link.rate_mbit * 1e6) if link.rate_mbit else 0.0)
        deliver_at = max(direction.free_at + link.delay_ms / 1000, direction.last_delivery)
        direction.last_delivery = deliver_at
        heapq.heappush(self.pending, (deliver_at, next(self.sequence), source.name, destination, packet))

    def deliver_due(self, now: float) -> None:
        while self.pending and self.pending[0][0] <= now:
            _, _, source, destination, packet = heapq.heappop(self.pending)
            direction = self.directions[(source, destination.name)]
            if frozenset((source, destination.name)) in self.cuts:  # cut while in flight: lost
                direction.dropped_cut += 1
                continue
            try:
                os.write(destination.fd, packet)
            except OSError as e:  # the host's device is down or its queue full: a lost packet
                logger.debug("write failed destination=%s error=%s", destination.name, e)
                direction.dropped_queue += 1
                continue
            direction.packets += 1
            direction.bytes += len(packet)

    def next_timeout(self, now: float) -> float | None:
        return max(0.0, self.pending[0][0] - now) if self.pending else None

    # ---- control ------------------------------------------------------------------------------------

    def command(self, command: dict[str, Any], selector: selectors.BaseSelector) -> dict[str, Any]:
        op = command.get("op")
        if op == "add":
            node = self.add(command)
            selector.register(node.fd, selectors.EVENT_READ, node)
        elif op == "link":
            self.links[self.pair(command)] = Link.parse(command)
        elif op == "default":
            self.default = Link.parse(command)
        elif op == "cut":
            self.cuts.add(self.pair(command))
        elif op == "heal":
            self.cuts.discard(self.pair(command))
        elif op == "stats":
            directions = {f"{a}>{b}": d.counters() for (a, b), d in sorted(self.directions.items())}
            return {"ok": True, "directions": directions, "unroutable": self.unroutable}
        else:
            raise CommandError(f"unknown op {op!r}")
        return {"ok": True}

    def pair(self, command: dict[str, Any]) -> frozenset[str]:
        a, b = str(command.get("a")), str(command.get("b"))
        for name in (a, b):
            if name not in self.nodes:
                raise CommandError(f"unknown host {name!r}")
        if a == b:
            raise CommandError(f"a link joins two hosts, got {a!r} twice")
        return frozenset((a, b))

    def add(self, command: dict[str, Any]) -> Node:
        """Make a TUN device, move it into the host's namespace and give it the host's address; the prefix
        route through it is the host's way to the WAN."""
        name, device, namespace = str(command["name"]), str(command["device"]), str(command["namespace"])
        address, prefix_len, mtu = str(command["address"]), int(command["prefix_len"]), int(command["mtu"])
        if name in self.nodes:
            raise CommandError(f"host {name!r} exists")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", device.encode(), IFF_TUN | IFF_NO_PI))
            _ip("link", "set", device, "netns", namespace)
            _ip("-n", namespace, "link", "set", device, "mtu", str(mtu), "up")
            _ip("-n", namespace, "addr", "add", f"{address}/{prefix_len}", "dev", device)
        except BaseException:
            os.close(fd)  # the device vanishes with its only fd, wherever it is
            raise
        node = Node(name, bytes(int(part) for part in address.split(".")), fd)
        self.nodes[name] = node
        self.by_address[node.address] = node
        logger.info("host added name=%s address=%s device=%s namespace=%s", name, address, device, namespace)
        return node


def _ip(*args: str) -> None:
    result = subprocess.run([IP, *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False)
    if result.returncode != 0:
        raise CommandError(f"ip {' '.join(args)}: {result.stderr.strip()}")


def _reply(content: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(content) + "\n")
    sys.stdout.flush()


def _read_packets(router: Router, node: Node) -> None:
    now = time.monotonic()
    for _ in range(MAX_READS_PER_WAKE):
        try:
            packet = os.read(node.fd, MAX_PACKET_BYTES)
        except BlockingIOError:
            return
        router.route(node, packet, now)


def _read_commands(router: Router, selector: selectors.BaseSelector, buffer: bytearray) -> bool:
    """Carry out the complete command lines read from stdin; False once stdin is closed."""
    try:
        chunk = os.read(sys.stdin.fileno(), 65536)
    except BlockingIOError:
        return True
    buffer += chunk
    while b"\n" in buffer:
        line, _, rest = bytes(buffer).partition(b"\n")
        buffer[:] = rest
        if not line.strip():
            continue
        try:
            _reply(router.command(json.loads(line), selector))
        except (CommandError, ValueError, KeyError, TypeError, OSError) as e:
            logger.warning("command refused line=%s error=%s", line[:200], e)
            _reply({"ok": False, "error": f"{type(e).__name__}: {e}"})
    return bool(chunk)


def run(router: Router) -> None:
    selector = selectors.DefaultSelector()
    os.set_blocking(sys.stdin.fileno(), False)
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ, None)
    buffer = bytearray()
    try:
        while True:
            for key, _ in selector.select(router.next_timeout(time.monotonic())):
                if key.data is None:
                    if not _read_commands(router, selector, buffer):
                        logger.info("stdin closed: exiting")
                        return
                else:
                    _read_packets(router, key.data)
            router.deliver_due(time.monotonic())
    finally:
        for node in router.nodes.values():
            os.close(node.fd)
        selector.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--max-queue-ms",
        type=float,
        default=200.0,
        help="a link drops a packet that would wait longer than this to be sent at its rate (an empty "
        "queue always takes one)",
    )
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    run(Router(max_queue=options.max_queue_ms / 1000))


if __name__ == "__main__":
    main()
