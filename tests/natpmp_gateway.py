"""A home router's NAT-PMP service (RFC 6886) for tests: answers the external address and TCP mappings, and
with `--nft` forwards each mapped port to the home host (nftables DNAT in the router's namespace, where
tests/networld.py's `corolla_nat` table masquerades). Run: python natpmp_gateway.py --listen 192.168.2.1
--public 10.77.0.5 --home 192.168.2.2 --nft; or `serve` in a thread on loopback."""

from __future__ import annotations

import argparse
import shutil
import socket
import struct
import subprocess
import threading
import time

RULES = """
table ip corolla_pmp {
    chain prerouting {
        type nat hook prerouting priority dstnat; policy accept;
    }
}
"""


def _nft(*args: str, stdin: str | None = None) -> None:
    subprocess.run([shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin") or "nft", *args], input=stdin,
                   text=True, check=True, timeout=10)  # fmt: skip


def answer(
    request: bytes, *, public: str, home: str, epoch: int, forward: bool, refuse: bool = False
) -> bytes:
    """The reply to one request (empty: none is sent)."""
    if len(request) < 2 or request[0] != 0:
        return b""
    opcode = request[1]
    if refuse:
        return struct.pack("!BBHI", 0, 128 + opcode, 2, epoch) + bytes(8)
    if opcode == 0:
        return struct.pack("!BBHI", 0, 128, 0, epoch) + socket.inet_aton(public)
    if opcode == 2 and len(request) >= 12:
        _, _, _, internal, suggested, lifetime = struct.unpack("!BBHHHI", request[:12])
        external = suggested or internal
        if forward and lifetime:
            rule = f"ip daddr {public} tcp dport {external} dnat to {home}:{internal}"
            _nft("add", "rule", "ip", "corolla_pmp", "prerouting", *rule.split())
            _nft(
                "add",
                "rule",
                "ip",
                "corolla_nat",
                "forward",
                *f"ip daddr {home} tcp dport {internal} accept".split(),
            )
        return struct.pack("!BBHIHHI", 0, 130, 0, epoch, internal, external, lifetime)
    return struct.pack("!BBHI", 0, 128 + opcode, 5, epoch)


def serve(
    udp: socket.socket,
    *,
    public: str,
    home: str,
    forward: bool = False,
    refuse: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Answer requests on `udp` until `stop` is set (looked at every 0.1 s) or the socket fails."""
    started = time.monotonic()
    udp.settimeout(0.1)
    while stop is None or not stop.is_set():
        try:
            request, sender = udp.recvfrom(64)
        except TimeoutError:
            continue
        except OSError:
            return
        reply = answer(
            request,
            public=public,
            home=home,
            epoch=int(time.monotonic() - started),
            forward=forward,
            refuse=refuse,
        )
        if reply:
            udp.sendto(reply, sender)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=5351)
    parser.add_argument("--public", required=True)
    parser.add_argument("--home", required=True)
    parser.add_argument("--nft", action="store_true", help="forward mapped ports with nftables DNAT")
    options = parser.parse_args()
    if options.nft:
        _nft("-f", "-", stdin=RULES)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind((options.listen, options.port))
        print("ready", flush=True)
        serve(udp, public=options.public, home=options.home, forward=options.nft)


if __name__ == "__main__":
    main()
