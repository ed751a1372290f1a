"""The gateway's engine loop over in-process peers of tiny models (byte-level tokenizer): requests of
different lengths joining at different steps decode together in one batched step, and each gives the tokens
it gives alone (greedy: transformers' own `generate()`; seeded sampling: the per-request `generate()`
path); a cancelled request closes its sessions on every peer while the others go on."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_checkpoint import tokenizer as byte_tokenizer
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from transformers import AutoModelForCausalLM

from client.completions import Delta, Plan, Stop, end_ids, run_plan
from client.config import ClientConfig
from client.engine import Engine, Job
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection

WAIT = 60.0  # seconds a request may take on the test machine's shared cores


@dataclass
class Request:
    """One request's Job and what the engine hands back; `then(k, action)` runs `action` (on the engine's
    thread) at the first delta of choice 0 once it has made k tokens, so joins and cancellations happen at
    exact steps."""

    plan: Plan
    stop: Stop = field(default_factory=Stop)
    deltas: list[Delta] = field(default_factory=list)
    ended: threading.Event = field(default_factory=threading.Event)
    completion_tokens: int = 0
    error: BaseException | None = None
    hooks: dict[int, Callable[[], None]] = field(default_factory=dict)
    job: Job | None = None

    def __post_init__(self) -> None:
        self.job = Job(self.plan, self._emit, self.stop, self._end)

    def then(self, num_tokens: int, action: Callable[[], None]) -> Request:
        self.hooks[num_tokens] = action
        return self

    def _emit(self, delta: Delta) -> None:
        self.deltas.append(delta)
        assert self.job is not None
        made = self.job.rows()[0].choice.tokens
        for due in sorted(k for k in self.hooks if k <= made):
            self.hooks.pop(due)()

    def _end(self, completion_tokens: int, error: BaseException | None) -> None:
        self.completion_tokens, self.error = completion_tokens, error
        self.ended.set()

    def wait(self) -> None:
        assert self.ended.wait(WAIT), "the request did not end"
        if self.error is not None:
            raise self.error

    def tokens(self, choice: int = 0) -> list[int]:
        assert self.job is not None
        rows = self.job.rows()
        return rows[choice].ids[len(self.plan.prompts[choice // self.plan.n]) :]

    def text(self, choice: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.index == choice)

    def finish(self, choice: int = 0) -> str | None:
        return next((d.finish_reason for d in self.deltas if d.index == choice and d.finish_reason), None)


def plan(prompt: list[int], max_tokens: int, **options: Any) -> Plan:
    fields: dict[str, Any] = dict(
        prompts=[prompt],
        n=1,
        max_tokens=max_tokens,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias={},
        stop=[],
        logprobs=None,
    )
    return Plan(**(fields | options))


@contextlib.contextmanager
def engine_over(folder: Path, **options: Any) -> Iterator[tuple[Engine, Any, FakeSwarm]]:
    swarm = FakeSwarm(folder)
    swarm.add_many([(0, 2), (2, 4)])
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    remote = AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection)
    engine = Engine(remote, byte_tokenizer(), max_requests=16, **options)
    try:
        yield engine, remote, swarm
    finally:
        engine.close()
        remote.shutdown()
        swarm.close()


def greedy_alone(folder: Path, prompt: list[int], max_tokens: int, ends: frozenset[int]) -> list[int]:
    """transformers' own greedy generation of the whole model, cut after the first end-of-turn token."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens, do_sample=False)
    tokens = out[0, len(prompt) :].tolist()
    end = next((i for i, t in enumerate(tokens) if t in ends), None)
    return tokens if end is None else tokens[: end + 1]


def sessions_closed(swarm: FakeSwarm) -> bool:
    deadline = time.monotonic() + WAIT
    while any(peer.num_sessions for peer in swarm.peers) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not any(peer.num_sessions for peer in swarm.peers)


PROMPTS = [
    [1, 72, 101, 108, 108, 111],
    [1, 87, 104, 97, 116, 32, 105, 115, 32, 50, 43, 50, 63, 32, 65, 110, 100],
    [1, 65],
    [1, 84, 101, 108, 108, 32, 109, 101, 32, 97, 32, 115, 116, 111, 114, 121],
]
LENGTHS = [30, 12, 25, 18]


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral"])
def test_requests_joining_at_different_steps_give_their_greedy_tokens_alone(checkpoint, family) -> None:
    folder = checkpoint(family)
    with engine_over(folder) as (engine, remote, swarm):
        ends = end_ids(remote, byte_tokenizer())
        requests = [Request(plan(p, n)) for p, n in zip(PROMPTS, LENGTHS, strict=True)]

        def join(i: int) -> Callable[[], None]:
            return lambda: engine.submit(requests[i].job)  # type: ignore[arg-type]

        # 0 alone; 1 joins at its 3rd token, 2 at 1's 2nd, 3 at 0's 10th: prefills between decode steps
        requests[0].then(3, join(1)).then(10, join(3))
        requests[1].then(2, join(2))
        engine.submit(requests[0].job)  # type: ignore[arg-type]
        for request in requests:
            request.wait()
        for request, prompt, length in zip(requests, PROMPTS, LENGTHS, strict=True):
            expected = greedy_alone(folder, prompt, length, ends)
            assert request.tokens() == expected
            assert request.finish() == ("stop" if expected[-1] in ends else "length")
            assert request.completion_tokens == len(expected)
        assert engine.stats.requests == 4 and engine.stats.prefills == 4
        assert engine.stats.max_rows >= 3  # they decoded together, one forward for all rows
        assert engine.stats.steps < sum(len(r.tokens()) for r in requests) - 4
        assert sessions_closed(swarm)


def test_seeded_sampling_gives_the_same_tokens_as_alone_whatever_runs_beside(checkpoint) -> None:
    folder = checkpoint("llama")
    sampled = dict(temperature=1.0, top_p=0.9, seed=7, presence_penalty=0.5, logit_bias={65: 2.0})
    with engine_over(folder) as (engine, remote, _):
        tokenizer = byte_tokenizer()
        alone = Request(plan(PROMPTS[0], 20, **sampled))
        engine.submit(alone.job)  # type: ignore[arg-type]
        alone.wait()
        # the per-request generate() path, same plan
        deltas: list[Delta] = []
        run_plan(remote, tokenizer, plan(PROMPTS[0], 20, **sampled), deltas.append, Stop())
        assert alone.text() == "".join(d.text for d in deltas)

        beside = [Request(plan(p, n)) for p, n in zip(PROMPTS[1:], LENGTHS[1:], strict=True)]
        again = Request(plan(PROMPTS[0], 20, **sampled))
        beside[0].then(4, lambda: engine.submit(again.job))  # type: ignore[arg-type]
        for request in beside:
            engine.submit(request.job)  # type: ignore[arg-type]
        for request in [*beside, again]:
            request.wait()
        assert again.tokens() == alone.tokens() and again.text() == alone.text()

        three = Request(plan(PROMPTS[0], 12, **(sampled | {"n": 3})))
        engine.submit(three.job)  # type: ignore[arg-type]
        three.wait()
        assert len({tuple(three.tokens(i)) for i in range(3)}) > 1  # three rows, one generator


def test_a_cancelled_request_closes_its_sessions_while_the_others_go_on(checkpoint) -> None:
    folder = checkpoint("llama")
    with engine_over(folder) as (engine, remote, swarm):
        ends = end_ids(remote, byte_tokenizer())
        prompt = [1, 97, 98, 99]
        expected = greedy_alone(folder, PROMPTS[3], 40, ends)
        long = Request(plan(prompt, 400))
        other = Request(plan(PROMPTS[3], 40))
        seen: list[int] = []
        long.then(2, lambda: engine.submit(other.job))  # type: ignore[arg-type]
        long.then(6, lambda: long.stop.request("cancelled"))
        # sampled on the engine's thread well after the cancel: only `other`'s session is open
        other.then(min(len(expected), 30), lambda: seen.extend(p.num_sessions for p in swarm.peers))
        engine.submit(long.job)  # type: ignore[arg-type]
        long.wait()
        other.wait()
        assert long.finish() == "cancelled" and long.completion_tokens < 40
        assert other.tokens() == expected
        assert seen == [1, 1]
        assert sessions_closed(swarm)


def test_a_closed_engine_refuses_requests_and_cancels_the_running(checkpoint) -> None:
    folder = checkpoint("llama")
    with engine_over(folder) as (engine, _, swarm):
        running = Request(plan([1, 97], 400))
        running.then(3, lambda: threading.Thread(target=engine.close).start())
        engine.submit(running.job)  # type: ignore[arg-type]
        running.wait()
        assert running.finish() == "cancelled"
        with pytest.raises(Exception, match="closed"):
            engine.submit(Request(plan([1, 97], 4)).job)  # type: ignore[arg-type]
        assert sessions_closed(swarm)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_speculative_rows_give_plain_greedy_tokens_beside_sampled_rows(checkpoint, family) -> None:
    folder = checkpoint(family)
    tokenizer = byte_tokenizer()
    sampled = dict(temperature=1.0, top_p=0.9, seed=3)
    repeat = [1, *tokenizer("one two three one two three one two", add_special_tokens=False)["input_ids"]]
    with engine_over(folder, speculative="ngram", max_draft_tokens=6) as (engine, remote, swarm):
        ends = end_ids(remote, tokenizer)
        deltas: list[Delta] = []
        run_plan(remote, tokenizer, plan(PROMPTS[1], 24, **sampled), deltas.append, Stop())
        greedy = [Request(plan(repeat, 40)), Request(plan(PROMPTS[0], 30)), Request(plan(PROMPTS[2], 25))]
        beside = Request(plan(PROMPTS[1], 24, **sampled))  # sampled: one position per step in the same batch
        greedy[0].then(2, lambda: engine.submit(beside.job)).then(5, lambda: engine.submit(greedy[1].job))  # type: ignore[arg-type]
        beside.then(3, lambda: engine.submit(greedy[2].job))  # type: ignore[arg-type]
        engine.submit(greedy[0].job)  # type: ignore[arg-type]
        for request in [*greedy, beside]:
            request.wait()
        for request, prompt, length in zip(
            greedy, [repeat, PROMPTS[0], PROMPTS[2]], [40, 30, 25], strict=True
        ):
            assert request.tokens() == greedy_alone(folder, prompt, length, ends)
        assert beside.text() == "".join(d.text for d in deltas)
        assert engine.stats.accepted > 0  # drafts were confirmed: fewer steps than tokens
        assert engine.stats.drafted > engine.stats.accepted  # and some rejected: their positions rolled back
        assert sessions_closed(swarm)


def test_requests_arriving_together_are_prefilled_in_one_forward(checkpoint) -> None:
    folder = checkpoint("llama")
    with engine_over(folder) as (engine, remote, _):
        ends = end_ids(remote, byte_tokenizer())
        blocker = Request(plan([1, 97], 3))
        together = [Request(plan(p, n)) for p, n in zip(PROMPTS, LENGTHS, strict=True)]
        # queued while the engine is busy with `blocker`'s first step: admitted in the same iteration
        blocker.then(1, lambda: [engine.submit(r.job) for r in together])  # type: ignore[arg-type]
        engine.submit(blocker.job)  # type: ignore[arg-type]
        for request in [blocker, *together]:
            request.wait()
        for request, prompt, length in zip(together, PROMPTS, LENGTHS, strict=True):
            assert request.tokens() == greedy_alone(folder, prompt, length, ends)
        assert engine.stats.prefills == 5 and engine.stats.prefill_forwards == 2
