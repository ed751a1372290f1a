"""What the OpenAI-compatible gateway (`client/gateway.py`) asks of the model: a request's prompts as token
ids checked against the model (`Plan`), and its generation by transformers' own `generate()` over the swarm on
a worker thread, its text, stop sequences, finish reasons and log-probabilities handed out token by token as
`Delta`s. The gateway's engine loop (`client/engine.py`) reuses the choices, processors and stop rules
for its batched decode; `run_plan` is the per-request path (`--no-engine`). A plan names the served LoRA
adapter it runs (`Plan.adapter`); its sessions open with it, whatever the model's `active_adapter`.

Sampling draws from a generator of the request's own (`seed`), so a seeded request gives the same text
whatever runs beside it; greedy requests (`temperature=0`) are transformers' greedy search, unchanged.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    PreTrainedTokenizerBase,
    RepetitionPenaltyLogitsProcessor,
    StoppingCriteria,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from client.openai_types import ChatCompletionRequest, CompletionRequest, Message
from client.remote_cache import RemoteCache
from protos.errors import InvalidInputError


@dataclass(frozen=True)
class Plan:
    """One request's generation, checked against the model: prompts as token ids and how to decode."""

    prompts: list[list[int]]
    n: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    presence_penalty: float
    frequency_penalty: float
    logit_bias: dict[int, float]
    stop: list[str]
    logprobs: int | None  # alternatives per token (0: the chosen token's only); None: no log-probabilities
    echo: bool = False
    adapter: str = ""  # the LoRA adapter peers serve that every session of the plan runs; "": the base model
    top_k: int = 0  # sampling from the k likeliest tokens only; 0: all
    min_p: float = 0.0  # sampling from tokens at least min_p x the likeliest's probability; 0: all
    repetition_penalty: float = 1.0  # over prompt and completion, as transformers' (greedy too); 1: none


def chat_prompt(
    tokenizer: PreTrainedTokenizerBase, messages: Sequence[Message], *, chat_template: str | None = None
) -> list[int]:
    """The messages through the chat template (`chat_template`, else the model's own), ending with the
    assistant's turn."""
    if chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise InvalidInputError("this model has no chat template: use /v1/completions or --chat-template")
    try:
        text = tokenizer.apply_chat_template(
            [m.template_input() for m in messages],
            chat_template=chat_template,
            add_generation_prompt=True,
            tokenize=False,
        )
    except Exception as e:  # jinja's raise_exception() in the template, e.g. roles that must alternate
        raise InvalidInputError(f"the chat template refused the messages: {e}") from e
    return list(tokenizer(str(text), add_special_tokens=False)["input_ids"])


def check_chat_template(tokenizer: PreTrainedTokenizerBase, chat_template: str) -> None:
    """InvalidInputError unless `chat_template` renders a one-message conversation into a non-empty prompt
    (checked at startup, so a broken `--chat-template` file is not met by the first request)."""
    try:
        ids = chat_prompt(tokenizer, [Message(role="user", content="Hello")], chat_template=chat_template)
    except InvalidInputError as e:
        raise InvalidInputError(f"the chat template does not render a simple conversation: {e}") from e
    if not ids:
        raise InvalidInputError("the chat template renders a simple conversation as an empty prompt")


def completion_prompts(tokenizer: PreTrainedTokenizerBase, prompt: CompletionRequest) -> list[list[int]]:
    """A /v1/completions prompt (text, texts, token ids, lists of token ids) as lists of token ids."""
    value = prompt.prompt
    if isinstance(value, str):
        return [list(tokenizer(value)["input_ids"])]
    if isinstance(value[0], int):
        return [list(value)]  # type: ignore[arg-type]
    return [list(tokenizer(p)["input_ids"]) if isinstance(p, str) else list(p) for p in value]  # type: ignore[union-attr]


def make_plan(
    request: ChatCompletionRequest | CompletionRequest,
    prompts: list[list[int]],
    *,
    context_length: int,
    vocab_size: int,
    max_request_tokens: int,
    adapter: str = "",
) -> Plan:
    """Check the prompts and the budget against the model before anything is sent to the swarm. A request
    asks for max_tokens x n x prompts completion tokens, at most `max_request_tokens`; without max_tokens
    it gets the context's rest or its share of that budget, whichever is less. `adapter`: the served LoRA
    adapter the request's `model` names ("": the base model)."""
    for ids in prompts:
        if not ids:
            raise InvalidInputError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab_size:
            raise InvalidInputError(f"prompt token ids must be in 0..{vocab_size - 1}")
    longest = max(len(ids) for ids in prompts)
    choices = len(prompts) * request.n
    limit = request.token_limit()
    max_tokens = context_length - longest if limit is None else limit
    if longest + max_tokens > context_length or max_tokens < 1:
        raise ContextLengthError(
            f"This model's maximum context length is {context_length} tokens. However, you requested "
            f"{longest + max(max_tokens, 1)} tokens ({longest} in the prompt, {max(max_tokens, 1)} for the "
            "completion). Please reduce the prompt or the completion length."
        )
    if limit is None:
        max_tokens = min(max_tokens, max_request_tokens // choices)
    if max_tokens * choices > max_request_tokens or max_tokens < 1:
        raise TokenBudgetError(
            f"this request asks for {max(max_tokens, 1) * choices} completion tokens or more "
            f"({max(max_tokens, 1)} max_tokens x {choices} choices); this gateway allows "
            f"{max_request_tokens} per request"
        )
    bias = request.logit_bias or {}
    if any(not 0 <= token < vocab_size for token in bias):
        raise InvalidInputError(f"logit_bias token ids must be in 0..{vocab_size - 1}")
    chat = isinstance(request, ChatCompletionRequest)
    return Plan(
        prompts=prompts,
        n=request.n,
        max_tokens=max_tokens,
        temperature=request.temperature,
        top_p=request.top_p,
        seed=request.seed,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logit_bias=bias,
        stop=list(request.stop or []),
        logprobs=request.logprob_alternatives() if chat else request.logprobs,  # type: ignore[union-attr]
        echo=not chat and request.echo,  # type: ignore[union-attr]
        adapter=adapter,
        top_k=max(request.top_k, 0),
        min_p=request.min_p,
        repetition_penalty=request.repetition_penalty,
    )


class ContextLengthError(InvalidInputError):
    """The prompt and the completion would not fit the model's context (HTTP 400, code context_length)."""


class TokenBudgetError(InvalidInputError):
    """max_tokens x n x prompts is beyond the gateway's per-request budget (HTTP 400, param max_tokens)."""


class Stop:
    """Why a generation ends before its choices do, set on the server's loop and read by the worker thread
    after each step: the client left ("cancelled"), or the gateway's time or byte budget is spent ("length":
    OpenAI clients keep the text so far, as when max_tokens is reached)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reason: str | None = None
        self.deadline: float | None = None  # time.monotonic() past which the run ends with "length"

    def request(self, reason: str) -> bool:
        """Ask the run to stop for `reason`; False when it was already stopping (the first reason stays)."""
        with self._lock:
            if self._reason is not None:
                return False
            self._reason = reason
            return True

    @property
    def reason(self) -> str | None:
        if self._reason is None and self.deadline is not None and time.monotonic() >= self.deadline:
            self.request("length")
        return self._reason


@dataclass(frozen=True)
class TokenLogprob:
    token: str
    logprob: float
    top: list[tuple[str, float]]  # the most likely tokens at this position, best first


@dataclass
class Delta:
    """New output of one choice: text, the log-probabilities of the tokens behind it, and (last) why it
    finished: "stop" (end of turn or a stop sequence), "length" (max_tokens, or the gateway's time or byte
    budget) or "cancelled"."""

    index: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


class _Choice:
    """One row's text, decoded incrementally (a prefix window, so multi-byte characters and word-initial
    spaces come out as a full decode gives them), cut at the first stop sequence, holding back any tail that
    may begin one."""

    def __init__(self, index: int, tokenizer: PreTrainedTokenizerBase, stop: list[str]) -> None:
        self.index = index
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""
        self.sent = 0  # characters of `text` handed out
        self.tokens = 0  # generated tokens, the one that ended the choice included
        self.pending: list[TokenLogprob] = []
        self.finish_reason: str | None = None

    def add(self, token: int, is_end: bool, logprob: TokenLogprob | None) -> Delta | None:
        self.tokens += 1
        if logprob is not None:
            self.pending.append(logprob)
        if is_end:
            return self.finish("stop")
        self.ids.append(token)
        self.text += self._decode_next()
        cut = min((i for i in (self.text.find(s, self.sent) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text = self.text[:cut]
            return self.finish("stop", flush=False)
        held = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        return self._release(len(self.text) - held)

    def finish(self, reason: str, *, flush: bool = True) -> Delta:
        if flush:  # the bytes of a character left unfinished, as a full decode shows them
            decode = self._decode
            before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
            self.text += decode(self.ids[self.prefix_offset :], skip_special_tokens=True)[len(before) :]
            self.prefix_offset = self.read_offset = len(self.ids)
        delta = self._release(len(self.text)) or Delta(self.index)
        delta.finish_reason = self.finish_reason = reason
        return delta

    def _decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens))

    def _decode_next(self) -> str:
        decode = self._decode
        before = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        after = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(after) <= len(before) or after.endswith("\ufffd"):  # an incomplete character: wait
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return after[len(before) :]

    def _release(self, end: int) -> Delta | None:
        if end <= self.sent and not self.pending:
            return None
        delta = Delta(self.index, self.text[self.sent : end], self.pending)
        self.sent, self.pending = max(self.sent, end), []
        return delta


class _Choices(StoppingCriteria):
    """Runs inside `generate()` after each step (transformers calls stopping criteria with the new tokens
    appended): turns each row's new token into a `Delta`, and tells `generate()` which rows are done (end of
    turn, a stop sequence) or that the request must stop (all rows)."""

    def __init__(
        self,
        choices: list[_Choice],
        end_ids: frozenset[int],
        emit: Callable[[Delta], None],
        stop: Stop,
        logprobs: _Logprobs | None,
    ) -> None:
        self.choices = choices
        self.end_ids = end_ids
        self.emit = emit
        self.stop = stop
        self.logprobs = logprobs

    def __call__(self, input_ids: torch.LongTensor, scores: Any, **kwargs: Any) -> torch.BoolTensor:
        tokens = input_ids[:, -1].tolist()
        for row, (choice, token) in enumerate(zip(self.choices, tokens, strict=True)):
            if choice.finish_reason is not None:
                continue
            logprob = self.logprobs.of(row, token) if self.logprobs is not None else None
            delta = choice.add(token, token in self.end_ids, logprob)
            if delta is not None:
                self.emit(delta)
        stopping = self.stop.reason is not None
        done = [c.finish_reason is not None or stopping for c in self.choices]
        return torch.tensor(done, dtype=torch.bool)  # type: ignore[return-value]


class _Logprobs(LogitsProcessor):
    """First of the processors: keeps the model's log-probabilities of the step (before penalties and
    temperature, as OpenAI and vLLM report them) for `_Choices` to read once the token is chosen."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, alternatives: int) -> None:
        self.tokenizer = tokenizer
        self.alternatives = alternatives
        self.last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.last = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def of(self, row: int, token: int) -> TokenLogprob | None:
        if self.last is None:
            return None
        values = self.last[row]
        top: list[tuple[str, float]] = []
        if self.alternatives:
            best = values.topk(self.alternatives)
            top = [(self._text(i), float(v)) for v, i in zip(best.values, best.indices.tolist(), strict=True)]
        return TokenLogprob(self._text(token), float(values[token]), top)

    def _text(self, token: int) -> str:
        return str(self.tokenizer.decode([token]))


class _Penalties(LogitsProcessor):
    """OpenAI's presence and frequency penalties over the tokens generated so far (not the prompt):
    logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_length: int, presence: float, frequency: float) -> None:
        self.prompt_length = prompt_length
        self.presence = presence
        self.frequency = frequency

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        generated = input_ids[:, self.prompt_length :]
        counts = torch.zeros_like(scores).scatter_add_(
            1, generated, torch.ones_like(generated, dtype=scores.dtype)
        )
        return scores - self.frequency * counts - self.presence * (counts > 0).to(scores.dtype)  # type: ignore[return-value]


class _LogitBias(LogitsProcessor):
    def __init__(self, bias: dict[int, float]) -> None:
        self.tokens = torch.tensor(list(bias), dtype=torch.long)
        self.values = torch.tensor(list(bias.values()), dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()  # type: ignore[assignment]
        scores[:, self.tokens] += self.values.to(scores.dtype)
        return scores


class _Sample(LogitsProcessor):
    """Last of the processors: draws each row's token from the request's own generator and leaves it the
    only candidate, so `generate()`'s greedy pick takes it (the global RNG is shared by other requests)."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)
        chosen = torch.multinomial(probs, 1, generator=self.generator)
        picked = torch.full_like(scores, float("-inf"))
        return picked.scatter_(1, chosen, 0.0)  # type: ignore[return-value]


def end_ids(model: Any, tokenizer: PreTrainedTokenizerBase) -> frozenset[int]:
    """The tokens that end a turn: the generation config's EOS ids and the tokenizer's."""
    ids = model.generation_config.eos_token_id
    found = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    return frozenset(found)


def request_generator(plan: Plan) -> torch.Generator:
    """The request's own random generator: seeded by `plan.seed`, else from the system's entropy."""
    generator = torch.Generator()
    if plan.seed is not None:
        generator.manual_seed(plan.seed)
    else:
        generator.seed()
    return generator


def processors_for(
    plan: Plan,
    tokenizer: PreTrainedTokenizerBase,
    prompt_length: int,
    generator: torch.Generator,
    *,
    pads: list[int] | None = None,
) -> tuple[LogitsProcessorList, _Logprobs | None]:
    """The logits processors of one prompt's choices, in the order they run (log-probabilities first,
    sampling last, transformers' order between), and the one that keeps the log-probabilities (None when
    the plan asks none). `pads`: each row's left padding in a padded batch, which the repetition penalty
    leaves out (`prompt_length` is then the padded width)."""
    processors = LogitsProcessorList()
    logprobs = _Logprobs(tokenizer, plan.logprobs) if plan.logprobs is not None else None
    if logprobs is not None:
        processors.append(logprobs)
    if plan.repetition_penalty != 1.0:
        ignored = torch.tensor(pads) if pads is not None and any(pads) else None
        processors.append(
            RepetitionPenaltyLogitsProcessor(plan.repetition_penalty, prompt_ignore_length=ignored)
        )
    if plan.presence_penalty or plan.frequency_penalty:
        processors.append(_Penalties(prompt_length, plan.presence_penalty, plan.frequency_penalty))
    if plan.logit_bias:
        processors.append(_LogitBias(plan.logit_bias))
    if plan.temperature > 0:
        processors.append(TemperatureLogitsWarper(plan.temperature))
        if plan.top_k > 0:
            processors.append(TopKLogitsWarper(plan.top_k))
        if plan.top_p < 1.0:
            processors.append(TopPLogitsWarper(plan.top_p))
        if plan.min_p > 0.0:
            processors.append(MinPLogitsWarper(plan.min_p))
        processors.append(_Sample(generator))
    return processors, logprobs


def run_plan(
    model: Any,
    tokenizer: PreTrainedTokenizerBase,
    plan: Plan,
    emit: Callable[[Delta], None],
    stop: Stop,
) -> int:
    """Generate every choice of `plan` (blocking; on a worker thread), handing out `Delta`s as tokens come,
    until the choices finish or `stop` says why not (checked after each step). Returns the completion tokens
    generated. Choices of prompt i are numbered i * n .. i * n + n - 1.

    All the choices of all the prompts run as one batch in one session opened here with `plan.adapter` and
    handed to `generate()`: the prompts left-padded to the longest, the padding masked (`attention_mask`) and
    left out of the repetition penalty, so each row gets the tokens its prompt gets alone. Requests on other
    threads may run other adapters on the same model at the same time, so its `active_adapter` (one per
    model) is neither read nor set."""
    ends = end_ids(model, tokenizer)
    rows = [ids for ids in plan.prompts for _ in range(plan.n)]
    width = max(len(ids) for ids in rows)
    pads = [width - len(ids) for ids in rows]
    choices = [_Choice(index, tokenizer, plan.stop) for index in range(len(rows))]
    if plan.echo:
        for choice, ids in zip(choices, rows, strict=True):
            emit(Delta(choice.index, str(tokenizer.decode(ids, skip_special_tokens=True))))
    processors, logprobs = processors_for(plan, tokenizer, width, request_generator(plan), pads=pads)
    tracker = _Choices(choices, ends, emit, stop, logprobs)
    pad_id = _pad_id(model, tokenizer, ends)
    input_ids = torch.tensor(
        [[pad_id] * pad + ids for pad, ids in zip(pads, rows, strict=True)]
    )  # [rows, width]
    attention_mask = torch.tensor([[0] * pad + [1] * len(ids) for pad, ids in zip(pads, rows, strict=True)])
    if stop.reason is None:
        session = model.swarm.new_session(width + plan.max_tokens, adapter=plan.adapter)
        try:
            model.generate(
                input_ids,
                attention_mask=attention_mask,
                past_key_values=RemoteCache(session),
                max_new_tokens=plan.max_tokens,
                do_sample=False,
                pad_token_id=pad_id,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        finally:
            model.swarm.runtime.run(session.aclose())
    for choice in choices:
        if choice.finish_reason is None:
            emit(choice.finish(stop.reason or "length"))
    return sum(choice.tokens for choice in choices)


def _pad_id(model: Any, tokenizer: PreTrainedTokenizerBase, ends: frozenset[int]) -> int:
    """The token that pads a batch (masked: its value never reaches the model's outputs)."""
    for candidate in (model.generation_config.pad_token_id, tokenizer.pad_token_id, min(ends, default=None)):
        if isinstance(candidate, int):
            return candidate
    return 0
