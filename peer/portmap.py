"""A port mapping for the gRPC port on the home router, with NAT-PMP (RFC 6886): `--nat-port-map` asks for
it, next to the mapping p2pd makes for the DHT port. Renewed at half its lifetime, removed at stop. A router
without NAT-PMP leaves the peer as it was: the dial-back check then decides (`peer.reach`)."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

from protos.errors import CorollaError

logger = logging.getLogger(__name__)

NATPMP_PORT = 5351
LIFETIME = 3600  # seconds a mapping is asked for; renewed at half of what the router grants
FIRST_WAIT = 0.25  # seconds before the first retransmission (RFC 6886 3.1), doubling after each
TRIES = 4  # about 4 seconds in all: a router that speaks NAT-PMP answers in milliseconds
_OP_ADDRESS, _OP_MAP_TCP = 0, 2
_RESULTS = {
    1: "unsupported version",
    2: "refused",
    3: "network failure",
    4: "out of resources",
    5: "bad opcode",
}


class PortMapError(CorollaError):
    """The router did not map the port: it has no NAT-PMP, refused, or answered nonsense."""


@dataclass(frozen=True)
class PortMapping:
    gateway: str
    external_host: str
    internal_port: int
    external_port: int
    lifetime: int  # seconds, as the router granted


def default_gateway(route_file: Path = Path("/proc/net/route")) -> str | None:
    """The IPv4 gateway of the default route (Linux), or None."""
    with contextlib.suppress(OSError):
        for line in route_file.read_text().splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[1] == "00000000" and fields[2] != "00000000":
                return str(ipaddress.IPv4Address(struct.pack("<I", int(fields[2], 16))))
    return None


def _exchange(gateway: str, request: bytes, *, opcode: int, size: int, port: int = NATPMP_PORT) -> bytes:
    """Send `request` to the gateway until an answer to `opcode` of `size` bytes comes from it."""
    wait = FIRST_WAIT
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.connect((gateway, port))  # only the gateway's answers are read
        for _ in range(TRIES):
            udp.send(request)
            udp.settimeout(wait)
            try:
                while True:
                    answer = udp.recv(64)
                    if len(answer) >= 4 and answer[0] == 0 and answer[1] == 128 + opcode:
                        break
            except TimeoutError:
                wait *= 2
                continue
            except OSError as e:  # ICMP port unreachable: nothing listens there
                raise PortMapError(f"no NAT-PMP at {gateway}: {e}") from None
            result = struct.unpack("!H", answer[2:4])[0]
            if result != 0:
                raise PortMapError(f"NAT-PMP at {gateway}: {_RESULTS.get(result, f'result {result}')}")
            if len(answer) < size:
                raise PortMapError(f"NAT-PMP at {gateway}: a short answer ({len(answer)} bytes)")
            return answer
    raise PortMapError(f"no NAT-PMP answer from {gateway}")


def map_tcp_port(
    port: int, *, gateway: str, lifetime: int = LIFETIME, nat_pmp_port: int = NATPMP_PORT
) -> PortMapping:
    """Ask `gateway` to forward TCP `port` (the same external port if it can) for `lifetime` seconds; 0
    removes the mapping."""
    answer = _exchange(gateway, bytes([0, _OP_ADDRESS]), opcode=_OP_ADDRESS, size=12, port=nat_pmp_port)
    external = str(ipaddress.IPv4Address(answer[8:12]))
    request = struct.pack("!BBHHHI", 0, _OP_MAP_TCP, 0, port, port, lifetime)
    answer = _exchange(gateway, request, opcode=_OP_MAP_TCP, size=16, port=nat_pmp_port)
    internal, mapped, granted = struct.unpack("!HHI", answer[8:16])
    if internal != port or (lifetime and not 0 < mapped < 65536):
        raise PortMapError(f"NAT-PMP at {gateway} mapped another port ({internal} -> {mapped})")
    return PortMapping(gateway, external, port, mapped, granted)


class PortMapper:
    """Holds the gRPC port's mapping while the peer runs."""

    def __init__(self, *, gateway: str | None = None, nat_pmp_port: int = NATPMP_PORT) -> None:
        self.gateway = gateway
        self.nat_pmp_port = nat_pmp_port
        self.mapping: PortMapping | None = None
        self._renewing: asyncio.Task[None] | None = None

    async def start(self, port: int) -> PortMapping | None:
        """Map `port` and keep it mapped; None (logged) when the router does not."""
        gateway = self.gateway or default_gateway()
        if gateway is None:
            logger.warning("port mapping skipped port=%d reason=no default gateway", port)
            return None
        try:
            self.mapping = await asyncio.to_thread(
                map_tcp_port, port, gateway=gateway, nat_pmp_port=self.nat_pmp_port
            )
        except (PortMapError, OSError) as e:
            logger.warning("port mapping failed port=%d gateway=%s reason=%s", port, gateway, e)
            return None
        logger.info(
            "port mapped port=%d external=%s:%d lifetime=%d",
            port,
            self.mapping.external_host,
            self.mapping.external_port,
            self.mapping.lifetime,
        )
        self._renewing = asyncio.create_task(self._renew_forever(), name="corolla-portmap")
        return self.mapping

    async def _renew_forever(self) -> None:
        while self.mapping is not None:
            await asyncio.sleep(max(self.mapping.lifetime / 2, 1.0))
            mapping = self.mapping
            try:
                self.mapping = await asyncio.to_thread(
                    map_tcp_port,
                    mapping.internal_port,
                    gateway=mapping.gateway,
                    nat_pmp_port=self.nat_pmp_port,
                )
            except (PortMapError, OSError) as e:  # kept: the router may answer the next time
                logger.warning("port mapping renewal failed port=%d reason=%s", mapping.internal_port, e)

    async def close(self) -> None:
        if self._renewing is not None:
            self._renewing.cancel()
            await asyncio.gather(self._renewing, return_exceptions=True)
        mapping, self.mapping = self.mapping, None
        if mapping is not None:
            with contextlib.suppress(PortMapError, OSError):
                await asyncio.to_thread(
                    map_tcp_port,
                    mapping.internal_port,
                    gateway=mapping.gateway,
                    lifetime=0,
                    nat_pmp_port=self.nat_pmp_port,
                )
