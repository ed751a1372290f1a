"""Spot checks of an inference session (`ClientConfig.verify_every`): at random steps, every hop's outputs
for all the positions its cache holds are recomputed by other peers serving its blocks (client/recompute.py,
a chain of sub-spans when nobody serves the hop's span) and compared within the verifiers' tolerance.
Knows nothing of streams or replays: a hop found wrong is raised as `WrongOutput`, which the session's
failure loop bans and replaces.

    hop [a, b) cache:  step 0 inputs │ step 1 │ ... │ this step ──▶ outputs held by the client (all positions)
    verifiers:         Forward(the same sequence, blocks [a, c) then [c, b)) ──▶ outputs ≈ held?
Comparing every position, not only the step's, means a lie at an unchecked step is caught at the next
check. Which steps are checked is drawn from the OS's random source (probability 1/`verify_every`), and
never more than `verify_max_gap` steps in a row go unchecked. A disagreement is settled by a second chain
avoiding the first one's peers (whoever disagrees with it is wrong); without one it cannot be settled, and
the checked hop (whose outputs the generation uses) goes. A hop whose checks cannot be done
`verify_max_skips` times in a row is replaced where other peers serve its blocks.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import torch

from client.checks import spot_check_agrees
from client.errors import PeerFailure, SwarmError, short_id
from client.recompute import Recomputed, Recomputer
from client.route import Hop, Needs, missing_blocks
from protos.tensors import wire_dtype_from_name

if TYPE_CHECKING:
    from client.discovery import SwarmView
    from client.session import StepLog
    from client.swarm import SwarmConnection
    from protos.records import PeerRecord

logger = logging.getLogger(__name__)


class WrongOutput(PeerFailure):
    """A hop's output that a recomputation on other peers refuted (or that could not be checked too many
    times). The session bans the peer and replaces the route from its hop to the end: the later hops'
    caches were built from its outputs, which are forgotten (see `forget_outputs`), so the replacements
    replay them from the last trusted boundary."""

    def __init__(self, message: str, peer_id: str, *, block: int) -> None:
        super().__init__(grpc.StatusCode.INTERNAL, message, peer_id)
        self.block = block  # the first block of the refuted hop


@dataclass
class SpotCheckStats:
    """What one session's spot checks did, counted per hop output due a check."""

    checked: int = 0  # recomputed by other peers and compared
    skipped: int = 0  # not checkable: no verifier for the blocks, none answered, positions Forward lacks
    mismatches: int = 0  # recomputations that disagreed (a banned verifier's included)
    unchecked: int = 0  # hops replaced because their checks could not be done `verify_max_skips` times


class _Outcome(enum.Enum):
    AGREED = "agreed"
    SKIPPED = "skipped"  # for a reason of the session's own (padding, position ids): not the hop's doing
    UNVERIFIED = "unverified"  # no chain of verifiers answered for its blocks: counts against the hop
    WRONG = "wrong"  # `_Verdict.wrong` names the peer found wrong (the hop's, or a verifier)


@dataclass(frozen=True)
class _Verdict:
    hop: Hop
    outcome: _Outcome
    wrong: str | None = None
    reason: str = ""


def cache_contents(logs: Sequence[StepLog], start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """What the cache of a hop starting at block `start` holds after `logs` (a session's steps in order):
    hidden states [batch, positions, hidden] and position ids [batch, positions], with the rollbacks and
    beam reorders applied as the peer applies them. None when a step's input at `start` is not held.
    With `start` a hop's end, the hidden states are that hop's outputs for the same positions."""
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


class SpotChecker:
    """The spot checks of one session: `due` draws whether its next step is checked, `check` verifies one
    step's outputs on the route that computed it. Runs on the swarm connection's loop."""

    def __init__(self, swarm: SwarmConnection, *, rng: random.Random | None = None) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.every = swarm.config.verify_every
        self.stats = SpotCheckStats()
        # which steps are checked (here) and which peers verify (the recomputer's): the OS's random source,
        # which no peer can predict, unless a test seeds them
        self.rng = rng or random.SystemRandom()
        self.recomputer = Recomputer(swarm, wire_dtype_from_name(swarm.wire_dtype), random.SystemRandom())
        self._unchecked_steps = 0  # steps in a row not checked
        self._told: set[tuple[int, int]] = set()  # blocks whose missing verifier was logged at INFO
        self._kept: set[str] = set()  # unverifiable peers kept for want of another (logged once)

    def due(self) -> bool:
        """Whether the session's next step is checked: with probability 1/`verify_every`, and always after
        `verify_max_gap` unchecked steps in a row."""
        if self.every <= 0:
            return False
        gap = self._unchecked_steps >= self.config.verify_max_gap
        if self.every == 1 or gap or self.rng.random() * self.every < 1:
            self._unchecked_steps = 0
            return True
        self._unchecked_steps += 1
        return False

    async def check(
        self, log: StepLog, history: Sequence[StepLog], route: Sequence[Hop], *, needs: Needs | None = None
    ) -> None:
        """Recompute every hop's outputs after `log` (the step just run on `route`, after `history`) on
        other peers. Raises `WrongOutput` for the first hop found wrong, after forgetting the outputs from
        its hop on, or for the first that went unverified too often (and that a peer able to take the session,
        `needs`, can replace); bans a verifier found wrong; a check that cannot be done is skipped, never
        failed."""
        try:
            view = await self.swarm.discovery.view()
        except SwarmError as e:  # no records right now: nobody to ask, and the step itself went through
            for hop in route:
                self._skip(hop, str(e))
            return
        logs = [*history, log]
        adapter = needs.adapter if needs is not None else ""  # verifiers must run the session's adapter
        verdicts = await asyncio.gather(*(self._check_hop(view, logs, hop, adapter) for hop in route))
        for verdict in verdicts:  # in route order: a hop's check means something only if its input held
            hop = verdict.hop
            if verdict.outcome is _Outcome.AGREED:
                self.swarm.bans.verified(hop.peer_id)
            if verdict.outcome is not _Outcome.WRONG or verdict.wrong is None:
                continue
            if verdict.wrong != hop.peer_id:
                self.swarm.bans.ban(verdict.wrong, f"spot check: {verdict.reason}")
                continue
            self._refute(logs, hop, verdict.reason)
        for index, verdict in enumerate(verdicts):
            if verdict.outcome is _Outcome.UNVERIFIED:
                self._count_against(view, logs, verdict.hop, route[:index], needs)

    def _refute(self, logs: list[StepLog], hop: Hop, reason: str, *, event: str = "mismatch") -> None:
        logger.warning(
            "spot check %s peer=%s blocks=[%d,%d) position=%d reason=%s",
            event,
            short_id(hop.peer_id),
            hop.start,
            hop.end,
            logs[-1].position,
            reason,
        )
        forget_outputs(logs, after=hop.start)
        raise WrongOutput(f"spot check: {reason}", hop.peer_id, block=hop.start)

    def _count_against(
        self, view: SwarmView, logs: list[StepLog], hop: Hop, before: Sequence[Hop], needs: Needs | None
    ) -> None:
        """One more check of `hop` that could not be done; at `verify_max_skips` in a row the hop is
        replaced, unless no other peer that can take the session (`needs`) serves its blocks (then it stays,
        unchecked, and is logged once).
        Verifiers that failed a call do not count as others: a hop is not replaced by peers that are down."""
        skips = self.swarm.bans.unverified(hop.peer_id)
        if skips < self.config.verify_max_skips:
            return
        failed = self.recomputer.unreachable | self.recomputer.distrusted
        banned = self.swarm.bans.banned() | failed | {hop.peer_id} | {h.peer_id for h in before}
        if missing_blocks(view, start=hop.start, end=hop.end, banned=banned, needs=needs):
            if hop.peer_id not in self._kept:
                self._kept.add(hop.peer_id)
                logger.info(
                    "spot checks impossible and no other peer serves blocks=[%d,%d) peer=%s",
                    hop.start,
                    hop.end,
                    short_id(hop.peer_id),
                )
            return
        self.stats.unchecked += 1
        self._refute(logs, hop, f"could not be checked {skips} times in a row", event="unverifiable")

    async def _check_hop(self, view: SwarmView, logs: list[StepLog], hop: Hop, adapter: str) -> _Verdict:
        outputs = cache_contents(
            logs, hop.end
        )  # the hop's outputs at every position [batch, positions, hidden]
        contents = cache_contents(logs, hop.start)
        if outputs is None or contents is None:
            return self._skip(hop, "the hop's inputs are not all held")
        (held, _), (hidden, positions) = outputs, contents
        if any(step.mask is not None for step in logs):
            return self._skip(hop, "a padded session (Forward carries no session's mask history)")
        if not torch.equal(positions, torch.arange(hidden.shape[1]).expand_as(positions)):
            return self._skip(hop, "position ids other than 0..n-1 (Forward cannot express them)")
        checked = view.peers().get(hop.peer_id)
        if checked is None:
            return self._unverified(hop, "the hop's record is gone")
        first = await self.recomputer.recompute(view, hop, checked, hidden, adapter=adapter)
        if first is None:
            self._tell_no_verifier(view, hop, checked, hidden.shape)
            return self._unverified(hop, "no chain of verifiers answered")
        self.stats.checked += 1
        wire = [self.recomputer.wire_dtype]
        if _agrees(first, held, wire):
            return _Verdict(hop, _Outcome.AGREED)
        self.stats.mismatches += 1
        reason = f"recomputed by {first.describe()}, differs at position {logs[-1].position}"
        arbiter = await self.recomputer.recompute(
            view, hop, checked, hidden, exclude=first.peer_ids, adapter=adapter
        )
        if arbiter is None:  # undecidable: the hop's outputs are not to be built on
            return _Verdict(hop, _Outcome.WRONG, hop.peer_id, reason)
        with_hop = _agrees(arbiter, held, wire)
        with_first = _agrees(arbiter, first.output, [*wire, *first.dtypes], quantized=first.quantized)
        judge = arbiter.describe()
        if with_hop and with_first:  # a borderline difference: the hop's output stands
            logger.info("spot check: %s accepts both blocks=[%d,%d)", judge, hop.start, hop.end)
            return _Verdict(hop, _Outcome.AGREED)
        if not with_hop:
            return _Verdict(
                hop, _Outcome.WRONG, hop.peer_id, f"{reason}; {judge} agrees" if with_first else reason
            )
        outvoted = f"outvoted by {judge} on blocks [{hop.start},{hop.end})"
        if len(first.links) == 1:
            return _Verdict(hop, _Outcome.WRONG, first.links[0][0], outvoted)
        # one link of the chain lied, which one is not known: none of them verifies again in this session
        logger.warning("spot check chain %s %s", first.describe(), outvoted)
        self.recomputer.distrusted |= first.peer_ids
        return _Verdict(hop, _Outcome.AGREED)

    def _skip(self, hop: Hop, reason: str) -> _Verdict:
        self.stats.skipped += 1
        logger.debug("spot check skipped blocks=[%d,%d) reason=%s", hop.start, hop.end, reason)
        return _Verdict(hop, _Outcome.SKIPPED)

    def _unverified(self, hop: Hop, reason: str) -> _Verdict:
        self._skip(hop, reason)
        return _Verdict(hop, _Outcome.UNVERIFIED, reason=reason)

    def _tell_no_verifier(self, view: SwarmView, hop: Hop, checked: PeerRecord, shape: torch.Size) -> None:
        if (hop.start, hop.end) in self._told:
            return
        self._told.add((hop.start, hop.end))
        verifiers = self.recomputer.verifiers(view, hop, checked, shape, exclude=())
        logger.info(
            "spot checks skipped blocks=[%d,%d) reason=%s",
            hop.start,
            hop.end,
            "verifiers failed" if verifiers else "no other peer computing as precisely serves them",
        )


def _agrees(
    recomputed: Recomputed, held: torch.Tensor, dtypes: list[torch.dtype], *, quantized: bool = False
) -> bool:
    """Whether `held` matches the recomputation within the tolerance of what the verifiers compute in."""
    return spot_check_agrees(
        recomputed.output,
        held,
        dtypes=[*dtypes, *recomputed.dtypes],
        quantized=quantized or recomputed.quantized,
    )
