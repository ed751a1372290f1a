"""The dial-back probe: a node asks a few swarm members to dial its announced gRPC address (a TLS handshake
pinned to its own key) and learns which host they see it at; each node answers such probes, bounded. Knows
nothing of relays (`protos.relay`) or of what a peer does with the verdict (`peer.reach`)."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from dataclasses import dataclass
from typing import Any

import grpc
from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from protos import tls
from protos.errors import InvalidInputError
from protos.records import is_loopback, maddr_host, validate_address

logger = logging.getLogger(__name__)

DIALBACK_PROTOCOL = "/corolla/dialback/1"
MAX_PROBERS = 5  # swarm members asked to dial a peer back
PROBE_TIMEOUT = 3.0  # seconds a prober spends on one dial-back (TLS handshake included)
MAX_DIALBACK_BYTES = 8192  # a request: an address and a certificate (about 720 bytes)
MAX_CONCURRENT_PROBES = 4  # dial-backs one node runs at once, for everyone


@dataclass(frozen=True)
class Reachability:
    """What the probers said: how many answered, how many reached the address, what they saw of us."""

    asked: int
    answered: int
    reached: int
    observed_hosts: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()

    @property
    def reachable(self) -> bool | None:
        """True when at least half of the probers that answered reached the address; None: none answered."""
        if self.answered == 0:
            return None
        return 2 * self.reached >= self.answered


class DialBack:
    """A node's answer to `check_reachability`: it dials the address a peer names, with TLS pinned to the
    certificate that peer's libp2p key (the stream's authenticated sender) vouched for, and reports whether
    the handshake succeeded and which host it saw the request come from. Bounded: one probe per sender at
    a time, `MAX_CONCURRENT_PROBES` in all, `PROBE_TIMEOUT` each; loopback targets only from loopback."""

    def __init__(self, p2p: P2P, *, timeout: float = PROBE_TIMEOUT) -> None:
        self.p2p = p2p
        self.timeout = timeout
        self._busy: set[str] = set()
        self._slots = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    async def start(self) -> None:
        await self.p2p.add_binary_stream_handler(DIALBACK_PROTOCOL, self._handle)

    async def _handle(
        self, info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        sender = info.peer_id.to_base58()
        observed = maddr_host(info.addr)
        try:
            if sender in self._busy:
                reply: dict[str, Any] = {"error": "a probe for this sender is under way"}
            else:
                self._busy.add(sender)
                try:
                    line = await asyncio.wait_for(reader.readline(), self.timeout)
                    reply = await self._probe(sender, observed, line)
                finally:
                    self._busy.discard(sender)
            reply["observed"] = observed
            writer.write(json.dumps(reply).encode() + b"\n")
            await asyncio.wait_for(writer.drain(), self.timeout)
        except (TimeoutError, ConnectionError, OSError, ValueError) as e:  # ValueError: line over the limit
            logger.debug("dial-back request dropped sender=%s reason=%r", sender, e)
        finally:
            writer.close()

    async def _probe(self, sender: str, observed: str | None, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_DIALBACK_BYTES:
            return {"error": "request too large"}
        try:
            request = json.loads(line)
            if request.get("address") is None:  # only asks which host we see it at
                return {}
            address = validate_address(str(request["address"]))
            certificate = request.get("certificate")
        except (ValueError, KeyError, TypeError, InvalidInputError) as e:
            return {"error": f"bad request: {e}"}
        host = address.rpartition(":")[0].strip("[]")
        if is_loopback(host) and not (observed is not None and is_loopback(observed)):
            return {"error": "loopback addresses are probed for loopback senders only"}
        if certificate is not None and not (
            isinstance(certificate, str) and tls.binds(certificate.encode(), sender)
        ):
            return {"error": "the certificate is not the sender's"}
        async with self._slots:
            reached, error = await _handshake(address, certificate, self.timeout)
        return {"reached": reached, "error": error}


async def _handshake(address: str, certificate: str | None, timeout: float) -> tuple[bool, str]:
    """Whether a gRPC channel to `address` becomes ready (TLS pinned to `certificate`; a TCP connect for a
    plaintext peer) within `timeout`; no call is made."""
    target = f"dns:///{address}"
    if certificate is None:
        channel = grpc.aio.insecure_channel(target)
    else:
        credentials = tls.channel_credentials(certificate.encode())
        channel = grpc.aio.secure_channel(target, credentials, options=tls.channel_options())
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout)
        return True, ""
    except TimeoutError:
        return False, f"no handshake within {timeout:g}s"
    finally:
        await channel.close(grace=None)


async def check_reachability(
    p2p: P2P,
    address: str | None,
    *,
    certificate: bytes | None,
    max_probers: int = MAX_PROBERS,
    timeout: float = PROBE_TIMEOUT,
) -> Reachability:
    """Ask up to `max_probers` connected swarm members to dial `address` back (None: only say which host they
    see us at). Probers are picked at random among the libp2p peers this node is connected to."""
    own = p2p.peer_id
    peers = [info.peer_id for info in await p2p.list_peers() if info.peer_id != own]
    probers = random.sample(peers, min(max_probers, len(peers)))
    request = {"address": address, "certificate": certificate.decode() if certificate else None}
    answers = await asyncio.gather(*(_ask(p2p, peer, request, timeout + 2.0) for peer in probers))
    replies = [answer for answer in answers if isinstance(answer, dict)]
    return Reachability(
        asked=len(probers),
        answered=sum(1 for reply in replies if "reached" in reply),
        reached=sum(1 for reply in replies if reply.get("reached") is True),
        observed_hosts=tuple(
            str(reply["observed"]) for reply in replies if isinstance(reply.get("observed"), str)
        ),
        errors=tuple(str(reply["error"])[:200] for reply in replies if reply.get("error")),
    )


async def _ask(p2p: P2P, peer: PeerID, request: dict[str, Any], timeout: float) -> dict[str, Any] | None:
    try:
        async with asyncio.timeout(timeout):
            _, reader, writer = await p2p.call_binary_stream_handler(peer, DIALBACK_PROTOCOL)
            try:
                writer.write(json.dumps(request).encode() + b"\n")
                await writer.drain()
                line = await reader.readline()
            finally:
                writer.close()
        reply = json.loads(line[:MAX_DIALBACK_BYTES])
        return reply if isinstance(reply, dict) else None
    except Exception as e:  # an old node without the handler, a dead one, a garbled answer: no answer
        logger.debug("dial-back ask failed prober=%s reason=%r", peer, e)
        return None
