"""Recomputing a hop's span on other peers for a spot check (client/verify.py): a chain of stateless
Forwards whose sub-spans cover the hop's blocks, so that no peer needs to serve the hop's span exactly.
Knows nothing of schedules or verdicts: it returns the chain's output, or None when it could not be built.

    hop [a, b) held inputs ─▶ V1 [a, c) ─▶ V2 [c, b) ─▶ output, rounded as the hop's report was  ≈ held?
Every link but a whole-span one travels in float32, which carries the client's decoded wire values and the
peers' outputs exactly: the chain computes what one peer serving [a, b) computes, up to the summation
order, and its last output is rounded through the wire codec as the hop's own report was.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from client.checks import SPOT_CHECK_TOLERANCES, result_problem
from client.errors import short_id
from client.prefixes import address_prefix
from client.route import Hop, Needs, usable_peers
from protos import peer_pb2
from protos.errors import CorollaError
from protos.records import PeerRecord
from protos.tensors import decoded_dtype, dtype_from_name, from_message, to_message

if TYPE_CHECKING:
    from client.discovery import SwarmView
    from client.swarm import SwarmConnection

logger = logging.getLogger(__name__)

MAX_VERIFIER_TRIES = 2  # peers asked in turn for one link of a recomputation before it is given up
MAX_CHAIN_CALLS = 8  # Forwards (answered or not) one recomputation may take: bounds a check's latency


@dataclass(frozen=True)
class Recomputed:
    """A hop's output recomputed by a chain of verifiers [batch, positions, hidden], rounded as sent."""

    links: tuple[tuple[str, PeerRecord, int, int], ...]  # (peer_id, record, start, end) in block order
    output: torch.Tensor

    @property
    def peer_ids(self) -> frozenset[str]:
        return frozenset(peer_id for peer_id, *_ in self.links)

    @property
    def dtypes(self) -> list[torch.dtype]:
        """What the verifiers compute in: with the wire dtype, what sets the comparison's tolerance."""
        return [dtype_from_name(record.dtype) for _, record, _, _ in self.links]

    @property
    def quantized(self) -> bool:
        return any(record.quantization != "none" for _, record, _, _ in self.links)

    def describe(self) -> str:
        return " ".join(f"{short_id(peer_id)}[{start},{end})" for peer_id, _, start, end in self.links)


def can_verify(verifier: PeerRecord, checked: PeerRecord) -> bool:
    """Whether `verifier` may recompute blocks of `checked`: the same weights, and a compute dtype whose
    spot-check tolerance is at least that of the dtype `checked` announces. The comparison then uses the
    verifiers' tolerance, which covers an honest checked peer; a peer announcing a coarse dtype to widen
    it only finds coarse verifiers, or none (its checks are skipped, and skips count against it)."""
    tolerance = SPOT_CHECK_TOLERANCES[dtype_from_name(verifier.dtype)]
    return (
        verifier.quantization == checked.quantization
        and tolerance >= SPOT_CHECK_TOLERANCES[dtype_from_name(checked.dtype)]
    )


def order_verifiers(
    serving: list[tuple[str, PeerRecord]], checked: PeerRecord, rng: random.Random
) -> list[tuple[str, PeerRecord]]:
    """`serving` (peer_id, record) in the order to ask them: at random (no peer can tell who will verify
    it), those in the address prefix of `checked` last (a Sybil of its host is no independent witness)."""
    prefix = address_prefix(checked.address)
    ordered = list(serving)
    rng.shuffle(ordered)
    ordered.sort(key=lambda item: prefix is not None and address_prefix(item[1].address) == prefix)
    return ordered


class Recomputer:
    """Builds and runs verifier chains for one session; remembers the verifiers that failed a call (not
    asked again in the session) and those it was told not to trust."""

    def __init__(self, swarm: SwarmConnection, wire_dtype: torch.dtype, rng: random.Random) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.wire_dtype = wire_dtype
        self.rng = rng
        self.unreachable: set[str] = set()
        self.distrusted: set[str] = set()  # members of a chain that was outvoted: one of them lied

    def verifiers(
        self,
        view: SwarmView,
        hop: Hop,
        checked: PeerRecord,
        shape: torch.Size,
        *,
        exclude: Collection[str],
        adapter: str = "",
    ) -> dict[str, PeerRecord]:
        """Peers that may recompute some of `hop`'s blocks on hidden states of `shape`: ONLINE, not banned,
        not failed or distrusted before, admitting the Forward, and computing at most as precisely as
        `checked` announces (`can_verify`), so that the verifier's own tolerance covers an honest hop; with
        an `adapter`, only peers serving it."""
        batch, seq = shape[:2]
        needs = Needs(batch_size=batch, forward_tokens=batch * seq, adapter=adapter)
        banned = self.swarm.bans.banned() | self.unreachable | self.distrusted | {hop.peer_id, *exclude}
        return {
            peer_id: record
            for peer_id, record in usable_peers(view, banned=banned, needs=needs).items()
            if record.start < hop.end and hop.start < record.end and can_verify(record, checked)
        }

    async def recompute(
        self,
        view: SwarmView,
        hop: Hop,
        checked: PeerRecord,
        hidden: torch.Tensor,
        *,
        exclude: Collection[str] = (),
        adapter: str = "",
    ) -> Recomputed | None:
        """`hop`'s output on `hidden` [batch, positions, hidden] (its whole cache) by a chain of verifiers, or
        None when no chain of those answering covers its blocks; `adapter`: the served LoRA adapter the hop
        ran, which the verifiers run too."""
        candidates = self.verifiers(view, hop, checked, hidden.shape, exclude=exclude, adapter=adapter)
        links: list[tuple[str, PeerRecord, int, int]] = []
        current, point, calls = hidden, hop.start, 0
        deadline = time.monotonic() + self.config.verify_timeout  # for the whole chain: a check's latency
        while point < hop.end:
            serving = [(p, r) for p, r in candidates.items() if r.start <= point < r.end]
            for peer_id, record in order_verifiers(serving, checked, self.rng)[:MAX_VERIFIER_TRIES]:
                remaining = deadline - time.monotonic()
                if calls == MAX_CHAIN_CALLS or remaining <= 0:
                    return None
                calls += 1
                end = min(record.end, hop.end)
                whole = point == hop.start and end == hop.end
                output = await self._forward(
                    peer_id, record, point, end, current, whole=whole, timeout=remaining, adapter=adapter
                )
                if output is not None:
                    links.append((peer_id, record, point, end))
                    current, point = output, end
                    break
                del candidates[peer_id]
            else:
                return None
        if len(links) > 1:  # float32 links: round the last output as the hop's report was
            max_bytes = self.config.max_message_bytes
            current = from_message(to_message(current, dtype=self.wire_dtype), max_bytes=max_bytes)
        return Recomputed(tuple(links), current)

    async def _forward(
        self,
        peer_id: str,
        record: PeerRecord,
        start: int,
        end: int,
        hidden: torch.Tensor,
        *,
        whole: bool,
        timeout: float,
        adapter: str = "",
    ) -> torch.Tensor | None:
        """Blocks [start, end) of `hidden` on one verifier: in the wire dtype for a whole-span link (its reply
        comes rounded as the hop's did), float32 otherwise. None if the call failed (the peer is not asked
        again in this session) or the reply is garbage (the peer is banned)."""
        dtype = self.wire_dtype if whole else torch.float32
        request = peer_pb2.ForwardRequest(
            start=start, end=end, hidden=to_message(hidden, dtype=dtype), adapter=adapter
        )
        try:
            stub = self.swarm.channels.record_stub(peer_id, record)
            reply = await stub.Forward(request, timeout=timeout)
        except (grpc.aio.AioRpcError, CorollaError) as e:  # down, busy, or not reachable safely
            reason = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
            logger.info("spot check verifier failed peer=%s reason=%s", short_id(peer_id), reason)
            self.unreachable.add(peer_id)
            return None
        try:
            output = from_message(
                reply.hidden, max_bytes=self.config.max_message_bytes, expected_ndim=3, name="hidden"
            )
        except Exception as e:  # a garbled reply, not the session's fault
            self.swarm.bans.ban(peer_id, f"spot check: bad reply: {e}")
            return None
        problem = result_problem(output, shape=hidden.shape, dtype=decoded_dtype(dtype))
        if problem is not None:
            self.swarm.bans.ban(peer_id, f"spot check: bad reply: {problem}")
            return None
        return output
