"""Continuous batching keeps every session's answer: the steps of several sessions computed as one forward
(`Scheduler.step` -> `HostedSpan.forward_batch`) give each session the output it gets run alone, for every
family that batches, with sessions of different lengths (one past the sliding window), a beam search that
reorders its cache rows and a speculative rollback in the same batch: hidden states within 1e-4 in fp32,
greedy tokens (of a fixed random head) identical. Families that cannot batch run one step at a time,
bit-exact; a bad item fails alone; the token budget caps a batch; a lone step is a plain `forward`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest
import torch
from families import FAMILIES, HIDDEN, VOCAB, WINDOW, build

from peer import attention
from peer.blocks import BatchItem, HostedSpan, SpanCache
from peer.cache import RollbackTooFar
from peer.scheduler import Priority, Scheduler, StepWork
from protos.errors import InvalidInputError

TOLERANCE = 1e-4  # fp32: batched vs alone, max abs difference of hidden states
ROUNDS = 6  # the prompts, then 5 steps
GATE_TIMEOUT = 10.0  # seconds the blocking job waits for its test to open the gate
SESSIONS = {  # name: (rows, prompt tokens)
    "short": (1, 1),
    "long": (1, WINDOW + 4),  # past the sliding window
    "beam": (3, 5),  # a beam search of 3
    # each round drops 2 of the 3 positions its last step drafted, then drafts 3 more: past the window too
    "speculative": (1, WINDOW + 1),
}
BEAMS = [torch.tensor([0, 0, 2]), torch.tensor([1, 2, 2]), torch.tensor([2, 0, 1])]
HEAD = torch.randn(HIDDEN, VOCAB, generator=torch.Generator().manual_seed(123))  # a fixed "LM head"


def _families(batching: bool) -> list[str]:
    """By the model class (no model built at collection); each test checks its span's `batches`."""
    return [
        n for n in FAMILIES if getattr(FAMILIES[n]()[1], "_supports_attention_backend", False) == batching
    ]


BATCHING, NOT_BATCHING = _families(True), _families(False)


@dataclass(frozen=True)
class Op:
    """One session's step: edits of its cache (on the compute thread, before the forward), then `hidden`."""

    hidden: torch.Tensor
    positions: torch.Tensor | None = None  # absolute ids; None: after the cache
    rollback: int = 0  # positions dropped first
    beam: torch.Tensor | None = None  # the rows' new order

    def prepare(self, cache: SpanCache) -> Callable[[], None]:
        def edit() -> None:
            # as the peer does before every step: a rollback, or (0) sliding layers trimmed to the window
            cache.rollback(cache.get_seq_length() - self.rollback)
            if self.beam is not None:
                cache.reorder_cache(self.beam)  # type: ignore[arg-type]  # any int64 tensor

        return edit


def _script(seed: int = 0) -> list[list[Op]]:
    """Per round, one op per session in `SESSIONS` order; the beam and speculative steps pass position ids."""
    generator = torch.Generator().manual_seed(seed)

    def hidden(rows: int, seq: int) -> torch.Tensor:
        return torch.randn(rows, seq, HIDDEN, generator=generator)

    def ids(rows: int, base: int, seq: int) -> torch.Tensor:
        # row r starts r positions later: ids that differ from the cache length, which rotary families see
        return torch.arange(base, base + seq) + torch.arange(rows).unsqueeze(1)

    rows, prompt = SESSIONS["beam"]
    spec = SESSIONS["speculative"][1]
    rounds = [
        [
            Op(hidden(1, SESSIONS["short"][1])),
            Op(hidden(1, SESSIONS["long"][1])),
            Op(hidden(rows, prompt), ids(rows, 0, prompt)),
            Op(hidden(1, spec), ids(1, 0, spec)),
        ]
    ]
    for step in range(1, ROUNDS):
        base = spec + step - 1 - 2  # the speculative session grows by one position a round
        rounds.append(
            [
                Op(hidden(1, 1)),
                Op(hidden(1, 1)),
                Op(hidden(rows, 1), ids(rows, prompt + step - 1, 1), beam=BEAMS[step % len(BEAMS)]),
                Op(hidden(1, 3), ids(1, base, 3), rollback=2),
            ]
        )
    return rounds


def _alone(span: HostedSpan, rounds: list[list[Op]]) -> list[list[torch.Tensor]]:
    """Each session run by itself through `span.forward`, with the same cache edits."""
    caches = [span.new_cache() for _ in rounds[0]]
    outputs = []
    for ops in rounds:
        row = []
        for op, cache in zip(ops, caches, strict=True):
            op.prepare(cache)()
            row.append(span.forward(op.hidden, cache, op.positions))
        outputs.append(row)
    return outputs


def _blocker(gate: threading.Event, started: threading.Event) -> Callable[[], None]:
    def block() -> None:
        started.set()
        gate.wait(GATE_TIMEOUT)

    return block


async def _wait_for(condition: Callable[[], bool], what: str) -> None:
    for _ in range(500):  # bounded: 5 s
        if condition():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError(what)


Outcome = torch.Tensor | BaseException  # a step's output, or what it raised


async def _round(
    scheduler: Scheduler, span: HostedSpan, items: Sequence[tuple[BatchItem, Callable[[], None] | None]]
) -> list[Outcome]:
    """Queue every step behind a job that holds the compute thread, then let them all run."""
    gate, started = threading.Event(), threading.Event()
    blocker = asyncio.create_task(scheduler.run(_blocker(gate, started), priority=Priority.BACKGROUND))
    await _wait_for(started.is_set, "the blocking job never started")
    steps = [
        asyncio.create_task(
            scheduler.step(StepWork(span, span.start, span.end, item, prepare), cost=item.hidden.shape[1])
        )
        for item, prepare in items
    ]
    await _wait_for(lambda: scheduler.in_flight == 1 + len(items), "the steps never reached the queue")
    gate.set()
    await blocker
    return await asyncio.gather(*steps, return_exceptions=True)


def _batched(span: HostedSpan, rounds: list[list[Op]], scheduler: Scheduler) -> list[list[Outcome]]:
    """The same script with each round's steps queued together on a real scheduler."""

    async def main() -> list[list[Outcome]]:
        caches = [span.new_cache() for _ in rounds[0]]
        outputs = []
        for ops in rounds:
            items = [
                (BatchItem(op.hidden, cache, op.positions), op.prepare(cache))
                for op, cache in zip(ops, caches, strict=True)
            ]
            outputs.append(await _round(scheduler, span, items))
        return outputs

    try:
        return asyncio.run(main())
    finally:
        scheduler.shutdown()


def _tokens(hidden: torch.Tensor) -> torch.Tensor:
    return (hidden[:, -1] @ HEAD).argmax(-1)


@pytest.mark.parametrize("family", BATCHING)
def test_a_batch_gives_each_session_its_alone_output(family: str) -> None:
    span = HostedSpan.from_model(build(family), 0, 4)
    assert span.batches
    rounds, scheduler = _script(), Scheduler()
    expected = _alone(span, rounds)
    actual = _batched(span, rounds, scheduler)
    # every round ran as one forward of all the sessions
    assert (scheduler.stats.batches, scheduler.stats.largest) == (ROUNDS, len(SESSIONS))
    assert scheduler.stats.steps == ROUNDS * len(SESSIONS)
    for number, (alone, batched) in enumerate(zip(expected, actual, strict=True)):
        for name, want, got in zip(SESSIONS, alone, batched, strict=True):
            assert isinstance(got, torch.Tensor), f"round {number} {name}: {got!r}"
            assert got.shape == want.shape
            worst = (got - want).abs().max().item()
            assert worst < TOLERANCE, f"round {number} {name}: differs by {worst:.2e}"
            assert torch.equal(_tokens(got), _tokens(want)), f"round {number} {name}: greedy tokens differ"


@pytest.mark.parametrize("family", NOT_BATCHING)
def test_a_family_that_cannot_batch_runs_its_steps_one_by_one(family: str) -> None:
    span = HostedSpan.from_model(build(family), 0, 4)
    assert not span.batches
    rounds, scheduler = _script()[:3], Scheduler()
    expected = _alone(span, rounds)
    actual = _batched(span, rounds, scheduler)
    assert scheduler.stats.largest == 1 and scheduler.stats.batches == len(rounds) * len(SESSIONS)
    for alone, batched in zip(expected, actual, strict=True):
        for want, got in zip(alone, batched, strict=True):
            assert isinstance(got, torch.Tensor) and torch.equal(got, want)


def test_a_bad_item_fails_alone() -> None:
    """Items that fail validation get their own InvalidInputError; the others run batched, right."""
    span = HostedSpan.from_model(build("llama"), 0, 4)
    generator = torch.Generator().manual_seed(1)
    good = [torch.randn(1, seq, HIDDEN, generator=generator) for seq in (4, 1)]
    foreign = span.new_cache(start=1, end=3)  # a cache of other blocks
    caches = [span.new_cache() for _ in good]
    items = [
        BatchItem(good[0], caches[0]),
        BatchItem(torch.randn(1, 2, HIDDEN // 2, generator=generator), span.new_cache()),  # wrong width
        BatchItem(torch.randn(1, 2, HIDDEN, generator=generator), foreign),
        BatchItem(good[1], caches[1]),
    ]
    results = span.forward_batch(items)
    assert isinstance(results[1], InvalidInputError) and "hidden size 32" in str(results[1])
    assert isinstance(results[2], InvalidInputError) and "not one of blocks [0, 4)" in str(results[2])
    assert foreign.get_seq_length() == 0
    for hidden, result in zip(good, [results[0], results[3]], strict=True):
        assert isinstance(result, torch.Tensor)
        torch.testing.assert_close(result, span.forward(hidden, span.new_cache()), rtol=0, atol=TOLERANCE)
    assert [cache.get_seq_length() for cache in caches] == [4, 1]


def test_the_token_budget_caps_a_batch() -> None:
    """Three queued one-token steps under a budget of 2 tokens: a batch of 2, then one of 1."""
    span = HostedSpan.from_model(build("llama"), 0, 4)
    hidden = [torch.randn(1, 1, HIDDEN, generator=torch.Generator().manual_seed(seed)) for seed in range(3)]
    scheduler = Scheduler(max_batch_tokens=2)

    async def main() -> list[Outcome]:
        items = [(BatchItem(h, span.new_cache()), None) for h in hidden]
        return await _round(scheduler, span, items)

    try:
        outputs = asyncio.run(main())
    finally:
        scheduler.shutdown()
    assert (scheduler.stats.largest, scheduler.stats.batches, scheduler.stats.steps) == (2, 2, 3)
    for h, output in zip(hidden, outputs, strict=True):
        torch.testing.assert_close(output, span.forward(h, span.new_cache()), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("family", ["llama", "gemma2", "bloom"])
def test_a_lone_step_is_a_plain_forward(family: str) -> None:
    """A batch of one runs `forward` unchanged: bit-exact, for families that batch (sdpa, eager) or not."""
    span = HostedSpan.from_model(build(family), 0, 4)
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randn(2, 5, HIDDEN, generator=generator)
    step = torch.randn(2, 1, HIDDEN, generator=generator)
    mine, reference = span.new_cache(), span.new_cache()
    for cache in (mine, reference):
        span.forward(prompt, cache)
    [output] = span.forward_batch([BatchItem(step, mine)])
    assert isinstance(output, torch.Tensor)
    assert torch.equal(output, span.forward(step, reference))
    assert mine.get_seq_length() == reference.get_seq_length() == 6


def test_a_failed_batched_forward_restores_every_cache_and_runs_each_step_alone(monkeypatch) -> None:
    """The batched forward breaks at the second block, after the first appended its K/V: each cache is
    put back as it was and each step runs alone, with the output it would have had."""
    span = HostedSpan.from_model(build("mistral"), 0, 4)
    generator = torch.Generator().manual_seed(3)
    prompts = [torch.randn(1, n, HIDDEN, generator=generator) for n in (3, WINDOW + 2)]
    steps = [torch.randn(1, 1, HIDDEN, generator=generator) for _ in prompts]
    caches, references = [span.new_cache() for _ in prompts], [span.new_cache() for _ in prompts]
    for prompt, cache, reference in zip(prompts, caches, references, strict=True):
        span.forward(prompt, cache)
        span.forward(prompt, reference)
    inner = attention._inner_function

    def failing(module, implementation):
        if module.layer_idx == 1:
            raise RuntimeError("simulated failure of the batched forward")
        return inner(module, implementation)

    monkeypatch.setattr(attention, "_inner_function", failing)
    results = span.forward_batch([BatchItem(step, cache) for step, cache in zip(steps, caches, strict=True)])
    for step, result, reference in zip(steps, results, references, strict=True):
        assert isinstance(result, torch.Tensor)
        assert torch.equal(result, span.forward(step, reference))
    assert [c.get_seq_length() for c in caches] == [r.get_seq_length() for r in references] == [4, WINDOW + 3]


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_a_rollback_past_the_sliding_window_gives_what_the_whole_sequence_gives(family: str) -> None:
    """Speculative decoding on a sliding-window family: draft 4, keep 1, again and again, far past the
    window; the accepted positions equal one forward of the whole sequence. Rolling back more than the last
    step drafted is refused and changes nothing (the client replays the session instead)."""
    span = HostedSpan.from_model(build(family), 0, 4)
    generator = torch.Generator().manual_seed(4)
    sequence = torch.randn(1, 3 * WINDOW, HIDDEN, generator=generator)
    expected = span.forward(sequence, span.new_cache())
    cache, position = span.new_cache(), 0
    while position < sequence.shape[1]:
        drafted = torch.cat([sequence[:, position : position + 1], torch.randn(1, 3, HIDDEN)], dim=1)
        cache.rollback(position)
        output = span.forward(drafted, cache)
        torch.testing.assert_close(
            output[:, :1], expected[:, position : position + 1], rtol=0, atol=TOLERANCE
        )
        position += 1  # the first drafted position is accepted, the 3 others are dropped next round
    length = cache.get_seq_length()
    with pytest.raises(RollbackTooFar, match="cannot roll back"):
        cache.rollback(length - 5)
    assert cache.get_seq_length() == length
    cache.rollback(length - 3)
    assert cache.get_seq_length() == length - 3
