"""The gateway's engine loop (as vLLM's): one thread owns every running request. Each iteration admits the
requests that arrived (each prompt prefilled in its choices' own inference sessions), then runs ONE decode
step for every running choice: a single forward of the family's client model over all rows [rows, 1] whose
block-0 slot sends each row to its own session, all at once on the swarm's loop (the peers batch them).
Requests join and leave between steps. Each session runs its request's served LoRA adapter (`Plan.adapter`):
rows of different adapters share the client's forward (the adapters live on the peers, which never batch
two adapters together). It knows nothing of HTTP (`client/gateway.py` feeds it).

    iteration:  admit ──▶ prefill [n, prompt] per new prompt ──▶ decode [rows, 1] ──▶ retire finished
                          (its n sessions)                       row i ─▶ session i (concurrently)

A choice decides its tokens as it would in `generate()` alone: its prompt's logits processors (penalties,
bias, temperature, top-p, the request's own seeded generator) run over that prompt's live rows only, so
what runs beside a request never changes its tokens. With `speculative="ngram"`, a plain greedy row sends
its last token and a prompt-lookup draft [1 + k] in the same step (the batch is as wide as its longest
row; shorter rows are padded on the client only), keeps the model's picks up to the first that differs
from the draft, and rolls the rejected positions back with its next step: the tokens of plain greedy.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import LogitsProcessorList, PreTrainedTokenizerBase

from client.completions import (
    Delta,
    Plan,
    Stop,
    TokenLogprob,
    _Choice,
    _Logprobs,
    end_ids,
    processors_for,
    request_generator,
)
from client.remote_cache import RowsCache
from client.runtime import Runtime
from client.session import InferenceSession
from client.speculative import DraftLength, ngram_draft
from protos.errors import InvalidInputError

logger = logging.getLogger(__name__)

CLOSE_TIMEOUT = 30.0  # seconds `Engine.close` waits for the step in flight and the sessions to close


@dataclass
class _Row:
    """One choice: its session and the ids its prompt's processors see (prompt and generated tokens; all but
    the last are in the session's cache once a step is done). `draft`: its draft length when it decodes
    speculatively."""

    choice: _Choice
    session: InferenceSession
    ids: list[int]
    draft: DraftLength | None = None


@dataclass
class _Prompt:
    """The choices of one prompt of a request: they share its processors and are decided together."""

    rows: list[_Row]
    processors: LogitsProcessorList
    logprobs: _Logprobs | None

    def live(self) -> list[_Row]:
        return [row for row in self.rows if row.choice.finish_reason is None]


@dataclass
class Job:
    """One request handed to the engine: `emit` gets its `Delta`s (on the engine's thread), `stop` is read
    after each step, and `on_end(completion_tokens, error)` is called once, when it leaves the engine."""

    plan: Plan
    emit: Callable[[Delta], None]
    stop: Stop
    on_end: Callable[[int, BaseException | None], None]
    prompts: list[_Prompt] = field(default_factory=list)
    error: BaseException | None = None

    def rows(self) -> list[_Row]:
        return [row for prompt in self.prompts for row in prompt.rows]

    @property
    def done(self) -> bool:
        return self.error is not None or all(row.choice.finish_reason is not None for row in self.rows())


@dataclass
class EngineStats:
    """What the engine did since it started (for tests and logs)."""

    requests: int = 0
    prefills: int = 0  # prompts prefilled
    prefill_forwards: int = 0  # forwards that prefilled them (the prompts that arrived together share one)
    steps: int = 0  # decode forwards
    rows: int = 0  # rows of all decode forwards
    max_rows: int = 0  # the most rows one decode forward carried
    drafted: int = 0  # tokens drafted by prompt lookup (speculative rows)
    accepted: int = 0  # of them, the ones the model confirmed


class Engine:
    """The loop on its own thread; `submit` hands it a request from any thread, `close` stops it (requests
    still running end with finish_reason "cancelled")."""

    def __init__(
        self,
        model: Any,
        tokenizer: PreTrainedTokenizerBase,
        *,
        max_requests: int,
        speculative: str = "none",
        max_draft_tokens: int = 8,
    ) -> None:
        if speculative not in ("none", "ngram"):
            raise InvalidInputError(f"speculative must be none or ngram, not {speculative!r}")
        self.model, self.tokenizer = model, tokenizer
        self.speculative, self.max_draft_tokens = speculative, max_draft_tokens
        self.runtime: Runtime = model.swarm.runtime
        self.end_ids = end_ids(model, tokenizer)
        parameters = inspect.signature(model.forward).parameters
        self._positions = "position_ids" in parameters
        self._logits_to_keep = "logits_to_keep" in parameters
        self.inbox: queue.Queue[Job | None] = queue.Queue(maxsize=max_requests + 1)  # +1: the close
        self.running: list[Job] = []
        self.stats = EngineStats()
        self.closed = False
        self._thread = threading.Thread(target=self._loop, name="corolla-engine", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue `job` for the next iteration; InvalidInputError when the engine is closed or full."""
        if self.closed:
            raise InvalidInputError("the engine is closed")
        try:
            self.inbox.put_nowait(job)
        except queue.Full:
            raise InvalidInputError("the engine holds its maximum of requests") from None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.inbox.put(None, timeout=CLOSE_TIMEOUT)
        except queue.Full:
            logger.warning("engine inbox full at close")
        self._thread.join(CLOSE_TIMEOUT)

    # ---- the loop ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        logger.info("engine started speculative=%s", self.speculative)
        with torch.no_grad():
            closing = False
            while not closing:
                try:
                    arrived, closing = self._arrivals()
                    if arrived:
                        self._admit(arrived)
                    if self.running and not closing:
                        self._run_step()
                    self._retire()
                except Exception as e:  # outside any one request's step: all fail, the loop goes on
                    logger.exception("engine iteration failed")
                    self._fail_all(e)
            for job in self.running:
                job.stop.request("cancelled")
            try:
                self._retire()
            except Exception as e:
                logger.exception("engine close failed")
                self._fail_all(e)
        logger.info("engine stopped requests=%d steps=%d", self.stats.requests, self.stats.steps)

    def _fail_all(self, error: BaseException) -> None:
        jobs, self.running = self.running, []
        for job in jobs:
            for row in job.rows():
                self._close(row.session)
            try:
                job.on_end(0, job.error or error)
            except Exception:  # the caller's callback: logged, the engine goes on
                logger.exception("engine on_end failed")

    def _arrivals(self) -> tuple[list[Job], bool]:
        """The jobs queued since the last iteration (waiting for one when nothing runs), and whether the
        engine is closing."""
        jobs: list[Job] = []
        try:
            item = self.inbox.get() if not self.running else self.inbox.get_nowait()
            while True:
                if item is None:
                    return jobs, True
                jobs.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            return jobs, False

    def _run_step(self) -> None:
        try:
            self._decode()
        except Exception as e:  # a fault of the step itself (not of one row): every running request fails
            logger.exception("engine step failed")
            for job in self.running:
                job.error = job.error or e

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill every prompt of the arrived `jobs` in one forward (each choice's prompt in its own session,
        all sent at once; shorter prompts padded on the client only) and decide their first tokens."""
        prompts: list[tuple[Job, _Prompt]] = []
        for job in jobs:
            self.stats.requests += 1
            self.running.append(job)
            try:
                prompts += [(job, prompt) for prompt in self._open(job)]
            except Exception as e:  # answered to the request; the engine goes on with the others
                job.error = e
        if not prompts:
            return
        rows = [(job, row) for job, prompt in prompts for row in prompt.rows]
        lengths = [len(row.ids) for _, row in rows]
        width = max(lengths)
        inputs = [row.ids + [row.ids[-1]] * (width - len(row.ids)) for _, row in rows]
        sessions = [row.session for _, row in rows]
        try:
            logits, errors = self._forward(
                torch.tensor(inputs, dtype=torch.long), sessions, [0] * len(rows), lengths, keep=lengths
            )
        except Exception as e:  # the new requests fail; those already running go on
            logger.exception("engine prefill failed")
            for job, _ in prompts:
                job.error = job.error or e
            return
        self.stats.prefills += len(prompts)
        self.stats.prefill_forwards += 1
        for i, error in errors.items():
            rows[i][0].error = rows[i][0].error or error
        start = 0
        for job, prompt in prompts:
            end = start + len(prompt.rows)
            if job.error is None:
                try:
                    self._decide(job, prompt, prompt.rows, logits[start:end, 0])
                except Exception as e:
                    job.error = e
            start = end

    def _open(self, job: Job) -> list[_Prompt]:
        """The prompts of `job` with their choices' rows and new sessions (none when it is stopping)."""
        plan = job.plan
        if job.stop.reason is not None:
            return []
        generator = request_generator(plan)
        for index, ids in enumerate(plan.prompts):
            processors, logprobs = processors_for(plan, self.tokenizer, len(ids), generator)
            # greedy with nothing between the logits and the pick: drafts can be verified by argmax alone
            speculative = self.speculative == "ngram" and not processors and plan.temperature == 0
            rows = [
                _Row(
                    _Choice(index * plan.n + j, self.tokenizer, plan.stop),
                    self.model.swarm.new_session(len(ids) + plan.max_tokens, adapter=plan.adapter),
                    list(ids),
                    DraftLength(self.max_draft_tokens) if speculative else None,
                )
                for j in range(plan.n)
            ]
            job.prompts.append(_Prompt(rows, processors, logprobs))
            if plan.echo:
                text = str(self.tokenizer.decode(ids, skip_special_tokens=True))
                for row in rows:
                    job.emit(Delta(row.choice.index, text))
        return job.prompts

    def _decode(self) -> None:
        """One step of every live row of every running request, as one forward."""
        batch = [
            (job, prompt, row)
            for job in self.running
            if job.error is None
            for prompt in job.prompts
            for row in prompt.live()
        ]
        if not batch:
            return
        started = time.perf_counter()
        drafts = [self._draft(job, row) for job, _, row in batch]
        width = 1 + max(len(draft) for draft in drafts)
        # a shorter row is padded with its last token: the client's modules work position by position
        inputs = [
            [row.ids[-1], *draft] + [row.ids[-1]] * (width - 1 - len(draft))
            for (_, _, row), draft in zip(batch, drafts, strict=True)
        ]
        sessions = [row.session for _, _, row in batch]
        bases = [len(row.ids) - 1 for _, _, row in batch]
        lengths = [1 + len(draft) for draft in drafts]
        logits, errors = self._forward(
            torch.tensor(inputs, dtype=torch.long),
            sessions,
            bases,
            lengths,
            keep=[1] * len(batch) if width == 1 else None,
        )
        logger.debug(
            "engine step rows=%d width=%d seconds=%.4f", len(batch), width, time.perf_counter() - started
        )
        self.stats.steps += 1
        self.stats.rows += len(batch)
        self.stats.max_rows = max(self.stats.max_rows, len(batch))
        for i, error in errors.items():
            batch[i][0].error = batch[i][0].error or error
        start = 0
        while start < len(batch):  # a prompt's live rows are consecutive in the batch
            job, prompt, _ = batch[start]
            end = start + 1
            while end < len(batch) and batch[end][1] is prompt:
                end += 1
            rows = [row for _, _, row in batch[start:end]]
            if job.error is None and rows[0].draft is None:
                self._decide(job, prompt, rows, logits[start:end, 0])
            elif job.error is None:
                for i, row in enumerate(rows, start):
                    self._verify(job, row, drafts[i], logits[i, : lengths[i]])
            start = end

    def _forward(
        self,
        input_ids: torch.Tensor,
        sessions: list[InferenceSession],
        bases: list[int],
        lengths: list[int],
        *,
        keep: list[int] | None,
    ) -> tuple[torch.Tensor, dict[int, BaseException]]:
        """The client model over `input_ids` [rows, width], row i through `sessions[i]` from position
        `bases[i]` (its first `lengths[i]` positions are real): the logits [rows, width, vocab] (float32;
        [rows, 1, vocab] of row i's position keep[i] - 1 alone with `keep`) and the rows whose session
        failed."""
        cache = RowsCache(sessions, bases, lengths)
        device = self.model.device
        width = input_ids.shape[1]
        kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": True}
        if self._positions:
            kwargs["position_ids"] = (torch.tensor(bases)[:, None] + torch.arange(width)).to(device)
        index = None if keep is None else torch.tensor(keep)[:, None] - 1  # [rows, 1]
        if self._logits_to_keep:  # the LM head over the kept positions only; 0: every position
            kwargs["logits_to_keep"] = 0 if index is None else index.to(device)
        logits = self.model(input_ids=input_ids.to(device), **kwargs).logits
        if index is not None and not self._logits_to_keep:
            logits = torch.take_along_dim(logits, index[..., None].to(logits.device), dim=1)
        return logits.to("cpu", torch.float32), cache.errors

    def _decide(self, job: Job, prompt: _Prompt, rows: list[_Row], logits: torch.Tensor) -> None:
        """Each row's next token from its prompt's processors (as `generate()`'s greedy pick after them),
        handed to its choice; the row's id list grows by it."""
        input_ids = torch.tensor([row.ids for row in rows], dtype=torch.long)
        scores = prompt.processors(input_ids, logits)  # type: ignore[arg-type]
        tokens = torch.argmax(scores, dim=-1).tolist()
        for i, (row, token) in enumerate(zip(rows, tokens, strict=True)):
            logprob = prompt.logprobs.of(i, token) if prompt.logprobs is not None else None
            self._append(job, row, token, logprob)

    def _draft(self, job: Job, row: _Row) -> list[int]:
        """Prompt lookup's draft for a speculative row, no longer than its completion has room for."""
        room = job.plan.max_tokens - row.choice.tokens - 1
        if row.draft is None or room < 1:
            return []
        return ngram_draft(row.ids, num_tokens=min(row.draft.current, room))

    def _verify(self, job: Job, row: _Row, draft: list[int], logits: torch.Tensor) -> None:
        """Greedy verification of `draft` from the logits of its positions [1 + drafted, vocab]: the model's
        picks up to and including the first that differs from the draft are the row's next tokens (as plain
        greedy decoding would give them); the rejected positions roll back with the row's next step."""
        picks = torch.argmax(logits, dim=-1).tolist()
        accepted = next((j for j, token in enumerate(draft) if picks[j] != token), len(draft))
        if row.draft is not None:
            row.draft.update(len(draft), accepted)
        self.stats.drafted += len(draft)
        self.stats.accepted += accepted
        for token in picks[: accepted + 1]:
            if not self._append(job, row, token, None):
                return  # an end of text or a stop string inside the draft: what follows is not the answer's

    def _append(self, job: Job, row: _Row, token: int, logprob: TokenLogprob | None) -> bool:
        """Hand `token` to the row's choice; False once the choice has finished (its session then closes, and
        its peers' cache is freed for the others at once)."""
        delta = row.choice.add(token, token in self.end_ids, logprob)
        if delta is not None:
            job.emit(delta)
        row.ids.append(token)
        if row.choice.finish_reason is None and row.choice.tokens >= job.plan.max_tokens:
            job.emit(row.choice.finish("length"))
        if row.choice.finish_reason is None:
            return True
        self._close(row.session)
        return False

    def _retire(self) -> None:
        """End the requests that finished, failed or were asked to stop; the others go on."""
        staying: list[Job] = []
        for job in self.running:
            reason = job.stop.reason
            if job.error is None and reason is not None:
                for row in job.rows():
                    if row.choice.finish_reason is None:
                        job.emit(row.choice.finish(reason))
                # prompts not reached yet (stopped while admitting) end too
                for index in range(len(job.prompts) * job.plan.n, len(job.plan.prompts) * job.plan.n):
                    job.emit(Delta(index, finish_reason=reason))
            if not (job.done or reason is not None):
                staying.append(job)
                continue
            for row in job.rows():
                self._close(row.session)
            tokens = sum(row.choice.tokens for row in job.rows())
            try:
                job.on_end(tokens, job.error)
            except Exception:  # the caller's callback: logged, the engine goes on
                logger.exception("engine on_end failed")
        self.running = staying

    def _close(self, session: InferenceSession) -> None:
        if not session.closed:
            session.closed = True  # no step more; the close goes out on the swarm's loop
            asyncio.run_coroutine_threadsafe(session.aclose(), self.runtime.loop)
