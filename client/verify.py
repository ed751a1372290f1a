"""Spot checks of an inference session (`ClientConfig.verify_every`): one step in N, every hop's output is
recomputed by another peer serving the same blocks, a stateless Forward of all the hop's cache holds plus
the step, and compared within the dtype's spot-check tolerance. Knows nothing of streams or replays: a hop
found wrong is raised as `WrongOutput`, which the session's failure loop bans and replaces.

    hop [a, b) cache:  step 0 inputs │ step 1 │ ... │ this step ──▶ output held by the client (last t)
    verifier:          Forward(the same sequence, blocks [a, b)) ──▶ output[:, -t:]  ≈ held?
A disagreement is settled by a third peer for the blocks when there is one (whoever disagrees with it is
wrong); with two peers it cannot be settled, and the checked hop (whose outputs the generation uses) goes.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from client.checks import result_problem, spot_check_agrees
from client.errors import PeerFailure, SwarmError, short_id
from client.route import Hop, Needs, usable_peers
from protos import peer_pb2
from protos.errors import CorollaError
from protos.records import PeerRecord
from protos.tensors import decoded_dtype, dtype_from_name, from_message, to_message, wire_dtype_from_name

if TYPE_CHECKING:
    from client.discovery import SwarmView
    from client.session import StepLog
    from client.swarm import SwarmConnection

logger = logging.getLogger(__name__)

MAX_VERIFIER_TRIES = 2  # peers asked in turn for one recomputation before the check is skipped


class WrongOutput(PeerFailure):
    """A hop's output that a recomputation on other peers refuted. The session bans the peer and replaces
    the route from its hop to the end: the later hops' caches were built from its outputs, which are
    forgotten (see `forget_outputs`), so the replacements replay them from the last trusted boundary."""

    def __init__(self, message: str, peer_id: str, *, block: int) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, message, peer_id)
        self.block = block  # the first block of the refuted hop


@dataclass
class SpotCheckStats:
    """What one session's spot checks did, counted per hop output due a check."""

    checked: int = 0  # recomputed by another peer and compared
    skipped: int = 0  # not checkable: no other peer for the blocks, none answered, positions Forward lacks
    mismatches: int = 0  # recomputations that disagreed (a banned verifier's included)


def cache_contents(logs: Sequence[StepLog], start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the cache of a hop starting at block `start` holds after `logs` (a session's steps in order):
    hidden states [batch, positions, hidden] and position ids [batch, positions], with the rollbacks and
    beam reorders applied as the peer applies them. None when a step's input at `start` is not held."""
    hidden: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    for log in logs:
        new = log.inputs.get(start)
        if new is None:
            return None
        new_positions = log.positions.expand(new.shape[0], -1)
        if hidden is None or positions is None:
            if log.position != 0:
                return None
            hidden, positions = new, new_positions
            continue
        if hidden.shape[1] < log.position:
            return None
        hidden, positions = hidden[:, : log.position], positions[:, : log.position]
        if log.beam_indices is not None:
            hidden, positions = hidden[log.beam_indices], positions[log.beam_indices]
        hidden = torch.cat([hidden, new.to(hidden.dtype)], dim=1)
        positions = torch.cat([positions, new_positions], dim=1)
    return None if hidden is None or positions is None else (hidden, positions)


def forget_outputs(logs: Sequence[StepLog], *, after: int) -> None:
    """Drop every hidden state entering a block past `after` from `logs`: they came from a refuted hop or
    from hops that ran on its outputs."""
    for log in logs:
        for block in [b for b in log.inputs if b > after]:
            del log.inputs[block]


@dataclass(frozen=True)
class _Verdict:
    hop: Hop
    wrong: str | None = None  # the peer found wrong (the hop's or a verifier), None: agreed or skipped
    reason: str = ""


@dataclass(frozen=True)
class _Recomputed:
    peer_id: str
    record: PeerRecord
    output: torch.Tensor  # [batch, positions, hidden], the whole sequence


class SpotChecker:
    """The spot checks of one session: `due` counts its steps (0, N, 2N, ... are checked), `check` verifies
    one step's outputs on the route that computed it. Runs on the swarm connection's loop."""

    def __init__(self, swarm: SwarmConnection, *, rng: random.Random | None = None) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.every = swarm.config.verify_every
        self.rng = rng or random.Random()  # which peers verify: not predictable by the peers
        self.stats = SpotCheckStats()
        self._wire_dtype = wire_dtype_from_name(swarm.wire_dtype)  # BLOCKWISE_INT8 for "int8"
        self._num_steps = 0
        self._unreachable: set[str] = set()  # verifiers whose Forward failed in this session
        self._told: set[tuple[int, int]] = set()  # blocks whose missing verifier was logged at INFO

    def due(self) -> bool:
        """Whether the session's next step is checked; counts the step."""
        index, self._num_steps = self._num_steps, self._num_steps + 1
        return self.every > 0 and index % self.every == 0

    async def check(self, log: StepLog, history: Sequence[StepLog], route: Sequence[Hop]) -> None:
        """Recompute every hop's output of `log` (the step just run on `route`, after `history`) on other
        peers. Raises `WrongOutput` for the first hop found wrong, after forgetting the outputs from its hop
        on; bans a verifier found wrong; a check that cannot be done is skipped, never failed."""
        try:
            view = await self.swarm.discovery.view()
        except SwarmError as e:  # no records right now: nobody to ask, and the step itself went through
            for hop in route:
                self._skip(hop, str(e))
            return
        logs = [*history, log]
        verdicts = await asyncio.gather(*(self._check_hop(view, logs, hop) for hop in route))
        for verdict in verdicts:  # in route order: a hop's check means something only if its input held
            hop = verdict.hop
            if verdict.wrong is None:
                continue
            if verdict.wrong != hop.peer_id:
                self.swarm.bans.ban(verdict.wrong, f"spot check: {verdict.reason}")
                continue
            logger.warning(
                "spot check mismatch peer=%s blocks=[%d,%d) position=%d reason=%s",
                short_id(hop.peer_id),
                hop.start,
                hop.end,
                log.position,
                verdict.reason,
            )
            forget_outputs(logs, after=hop.start)
            raise WrongOutput(f"spot check: {verdict.reason}", hop.peer_id, block=hop.start)

    async def _check_hop(self, view: SwarmView, logs: list[StepLog], hop: Hop) -> _Verdict:
        held = logs[-1].inputs.get(hop.end)  # the hop's output of the step [batch, new positions, hidden]
        contents = cache_contents(logs, hop.start)
        if held is None or contents is None:
            return self._skip(hop, "the hop's inputs are not all held")
        hidden, positions = contents
        if any(step.mask is not None for step in logs):
            return self._skip(hop, "a padded session (Forward carries no session's mask history)")
        if not torch.equal(positions, torch.arange(hidden.shape[1]).expand_as(positions)):
            return self._skip(hop, "position ids other than 0..n-1 (Forward cannot express them)")
        checked = view.peers().get(hop.peer_id)
        if checked is None:
            return self._skip(hop, "the hop's record is gone")
        candidates = self._verifiers(view, hop, checked, hidden.shape)
        verifier = await self._recompute(candidates, hop, hidden)
        if verifier is None:
            if not candidates:
                self._tell_no_verifier(hop)
            return self._skip(hop, "no verifier answered" if candidates else "no verifier")
        self.stats.checked += 1
        new = held.shape[1]
        dtypes = [self._wire_dtype, *(dtype_from_name(r.dtype) for r in (checked, verifier.record))]
        quantized = any(r.quantization != "none" for r in (checked, verifier.record))
        if spot_check_agrees(verifier.output[:, -new:], held, dtypes=dtypes, quantized=quantized):
            return _Verdict(hop)
        self.stats.mismatches += 1
        reason = f"recomputed by {short_id(verifier.peer_id)}, differs at position {logs[-1].position}"
        excluded = self.swarm.bans.banned() | self._unreachable | {verifier.peer_id}
        rest = [candidate for candidate in candidates if candidate[0] not in excluded]
        arbiter = await self._recompute(rest, hop, hidden)
        if arbiter is None:  # undecidable: the hop's outputs are not to be built on
            return _Verdict(hop, hop.peer_id, reason)
        dtypes.append(dtype_from_name(arbiter.record.dtype))
        quantized = quantized or arbiter.record.quantization != "none"
        with_hop = spot_check_agrees(arbiter.output[:, -new:], held, dtypes=dtypes, quantized=quantized)
        with_verifier = spot_check_agrees(arbiter.output, verifier.output, dtypes=dtypes, quantized=quantized)
        judge = short_id(arbiter.peer_id)
        if with_hop and with_verifier:  # a borderline difference: the hop's output stands
            logger.info("spot check: %s accepts both blocks=[%d,%d)", judge, hop.start, hop.end)
            return _Verdict(hop)
        if with_hop:
            return _Verdict(hop, verifier.peer_id, f"outvoted by {judge} on blocks [{hop.start},{hop.end})")
        return _Verdict(hop, hop.peer_id, f"{reason}; {judge} agrees" if with_verifier else reason)

    def _verifiers(
        self, view: SwarmView, hop: Hop, checked: PeerRecord, shape: torch.Size
    ) -> list[tuple[str, PeerRecord]]:
        """Peers that may recompute `hop`: ONLINE, not banned, not unreachable before, serving its blocks with
        the checked peer's quantization and admitting a Forward of `shape`; in random order."""
        batch, seq = shape[:2]
        needs = Needs(batch_size=batch, forward_tokens=batch * seq)
        excluded = self.swarm.bans.banned() | self._unreachable | {hop.peer_id}
        candidates = [
            (peer_id, record)
            for peer_id, record in usable_peers(view, banned=excluded, needs=needs).items()
            if record.start <= hop.start <= hop.end <= record.end
            and record.quantization == checked.quantization
        ]
        self.rng.shuffle(candidates)
        return candidates

    async def _recompute(
        self, candidates: list[tuple[str, PeerRecord]], hop: Hop, hidden: torch.Tensor
    ) -> _Recomputed | None:
        """The first of `candidates` (at most `MAX_VERIFIER_TRIES` asked) to run blocks [hop.start, hop.end)
        on `hidden` [batch, positions, hidden], with its output; None if none answered.
        A peer that fails the call is not asked again in this session; one that replies garbage is banned."""
        request = peer_pb2.ForwardRequest(
            start=hop.start, end=hop.end, hidden=to_message(hidden, dtype=self._wire_dtype)
        )
        for peer_id, record in candidates[:MAX_VERIFIER_TRIES]:
            certificate = record.certificate.encode() if record.certificate is not None else None
            try:
                stub = self.swarm.channels.stub(record.address, certificate)
                reply = await stub.Forward(request, timeout=self.config.verify_timeout)
            except (grpc.aio.AioRpcError, CorollaError) as e:  # down, busy, or not reachable safely
                reason = e.code().name if isinstance(e, grpc.aio.AioRpcError) else str(e)
                logger.info("spot check verifier failed peer=%s reason=%s", short_id(peer_id), reason)
                self._unreachable.add(peer_id)
                continue
            try:
                output = from_message(
                    reply.hidden, max_bytes=self.config.max_message_bytes, expected_ndim=3, name="hidden"
                )
            except Exception as e:  # a garbled reply, not the session's fault
                self.swarm.bans.ban(peer_id, f"spot check: bad reply: {e}")
                continue
            problem = result_problem(output, shape=hidden.shape, dtype=decoded_dtype(self._wire_dtype))
            if problem is not None:
                self.swarm.bans.ban(peer_id, f"spot check: bad reply: {problem}")
                continue
            return _Recomputed(peer_id, record, output)
        return None

    def _skip(self, hop: Hop, reason: str) -> _Verdict:
        self.stats.skipped += 1
        logger.debug("spot check skipped blocks=[%d,%d) reason=%s", hop.start, hop.end, reason)
        return _Verdict(hop)

    def _tell_no_verifier(self, hop: Hop) -> None:
        if (hop.start, hop.end) not in self._told:
            self._told.add((hop.start, hop.end))
            logger.info(
                "spot checks skipped blocks=[%d,%d) reason=no other peer serves them", hop.start, hop.end
            )
