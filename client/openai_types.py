"""OpenAI's shapes for the gateway: the request bodies of `/v1/chat/completions` and `/v1/completions` as
pydantic models (OpenAI's defaults and ranges, vLLM's sampling extras), and the replies: whole responses,
stream chunks (`chat.completion.chunk`, `text_completion`), usage, log-probabilities and errors, built from
`Delta`s.

Bodies are read as clients send them (vLLM reads them so too): an explicit `null` is the field's default, and
a field this gateway does not know is kept aside (`unknown_fields`, for the gateway to log) rather than
refused; a known field it cannot honour (`tools`, `response_format` json) is refused."""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from client.completions import Delta, Plan, TokenLogprob

MAX_CHOICES = 16  # n (times the prompts of a /v1/completions request)
MAX_STOP = 4  # stop sequences, as OpenAI allows
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS = 20  # alternatives per token (chat); /v1/completions allows 5, as OpenAI does
MAX_LOGIT_BIAS = 300  # entries of logit_bias
MAX_TOOL_CALLS = 128  # tool calls of one assistant message


class _Lenient(BaseModel):
    """An explicit `null` means the field's default (chat UIs and SDKs send them); unknown fields are kept in
    `model_extra` for `unknown_fields` instead of being refused."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {name: value for name, value in data.items() if value is not None}
        return data


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class FunctionCall(_Lenient):
    name: str = Field(max_length=256)
    arguments: str | dict[str, Any] = "{}"  # OpenAI sends a JSON string; chat templates take a dict


class ToolCall(_Lenient):
    """A tool call an assistant message made earlier in the conversation (the model's own, replayed)."""

    id: str | None = Field(default=None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_input(self) -> dict[str, Any]:
        """As transformers' chat templates take a tool call: the arguments as a dict where they parse."""
        arguments: Any = self.function.arguments
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments)
            except ValueError:
                parsed = None
            arguments = parsed if isinstance(parsed, dict) else arguments
        call = {"type": "function", "function": {"name": self.function.name, "arguments": arguments}}
        return call | ({"id": self.id} if self.id is not None else {})


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_call_id: str | None = Field(default=None, max_length=256)  # the call a `tool` message answers
    tool_calls: list[ToolCall] | None = Field(default=None, max_length=MAX_TOOL_CALLS)

    def template_input(self) -> dict[str, Any]:
        """The message as transformers' chat templates take it: the text parts joined; `developer` is a
        system message; a tool message keeps its `tool_call_id`, an assistant message its `tool_calls`."""
        content = self.content
        text = "".join(part.text for part in content) if isinstance(content, list) else content or ""
        message: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": text,
        }
        if self.name:
            message["name"] = self.name
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [call.template_input() for call in self.tool_calls]
        return message


class StreamOptions(_Lenient):
    include_usage: bool = False


class ResponseFormat(_Lenient):
    type: Literal["text"]  # json_object / json_schema need constrained decoding: refused by validation


class SamplingRequest(_Lenient):
    """The fields both endpoints share, with OpenAI's defaults and ranges, and vLLM's sampling extras
    (`top_k`, `min_p`, `repetition_penalty`: transformers' processors of the same names)."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # what torch.Generator.manual_seed takes
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = Field(default=None, max_length=MAX_LOGIT_BIAS)
    user: str | None = Field(default=None, max_length=256)
    top_k: int = Field(default=-1, ge=-1)  # -1 or 0: every token
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=100.0)  # 1: none; > 1 discourages repeats

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        if any(not 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"each stop sequence has 1..{MAX_STOP_CHARS} characters")
        return stops

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias: dict[int, float] | None) -> dict[int, float] | None:
        if bias and any(not -100.0 <= value <= 100.0 for value in bias.values()):
            raise ValueError("logit_bias values are in -100..100")
        return bias

    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(SamplingRequest):
    messages: list[Message] = Field(min_length=1, max_length=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None  # refused: the model's tool calls are not parsed out of its text

    @field_validator("tools")
    @classmethod
    def _tools(cls, tools: list[Any] | None) -> None:
        if tools is not None:
            raise ValueError(
                "tool calling is not supported by this gateway (tool and assistant tool_calls messages "
                "are; the model's own calls would come back as plain text): leave tools out or null"
            )
        return None

    @model_validator(mode="after")
    def _consistent(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def logprob_alternatives(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(min_length=1)
    max_tokens: int | None = Field(default=16, ge=1)  # OpenAI's default for this endpoint
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> CompletionRequest:
        prompts = 1 if isinstance(self.prompt, str) or isinstance(self.prompt[0], int) else len(self.prompt)
        if prompts * self.n > MAX_CHOICES:
            raise ValueError(f"prompts x n is at most {MAX_CHOICES}")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo with logprobs (log-probabilities of the prompt) is not supported")
        return self

    def token_limit(self) -> int | None:
        return self.max_tokens


def unknown_fields(body: SamplingRequest) -> list[str]:
    """The names of the fields of `body` this gateway does not know (nested ones as `messages[].name`)."""
    names = list(body.model_extra or {})
    for message in getattr(body, "messages", []):
        names += [f"messages[].{name}" for name in message.model_extra or {}]
        for call in message.tool_calls or []:
            names += [f"messages[].tool_calls[].{name}" for name in call.model_extra or {}]
        if isinstance(message.content, list):
            names += [
                f"messages[].content[].{name}" for part in message.content for name in part.model_extra or {}
            ]
    if body.stream_options is not None:
        names += [f"stream_options.{name}" for name in body.stream_options.model_extra or {}]
    return list(dict.fromkeys(names))


class GatewayError(Exception):
    """An HTTP error in OpenAI's shape: status, message, `type` (kind), `code` and `param`."""

    def __init__(
        self, status: int, message: str, *, kind: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param


def sse_event(payload: dict[str, Any]) -> str:
    """One server-sent event carrying `payload` as compact JSON."""
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def error_body(message: str, kind: str, code: str | None, param: str | None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Replies:
    """What both endpoints share: the response id, creation time, model name and the usage chunk."""

    prefix = ""
    object_name = ""

    def __init__(self, model: str, include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage

    def _head(self, object_name: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def opening(self, plan: Plan) -> list[dict[str, Any]]:
        """Chunks sent before the first token."""
        return []

    def chunk(self, delta: Delta) -> dict[str, Any]:
        raise NotImplementedError

    def delta_logprobs(self, delta: Delta) -> dict[str, Any] | None:
        raise NotImplementedError

    def size(self, delta: Delta) -> int:
        """About the bytes `delta` adds to a whole response: its text and log-probabilities as JSON."""
        logprobs = self.delta_logprobs(delta) if delta.logprobs else None
        return len(json.dumps(delta.text)) + (len(json.dumps(logprobs)) if logprobs is not None else 0)

    def whole(
        self, plan: Plan, deltas: dict[int, list[Delta]], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        raise NotImplementedError

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._head(self.object_name) | {
            "choices": [],
            "usage": usage(prompt_tokens, completion_tokens),
        }


def _choices(plan: Plan, deltas: dict[int, list[Delta]]) -> list[tuple[int, str, list[TokenLogprob], str]]:
    """(index, text, log-probabilities, finish reason) of every choice, in index order."""
    merged = []
    for index in range(len(plan.prompts) * plan.n):
        parts = deltas.get(index, [])
        finish = next((d.finish_reason for d in reversed(parts) if d.finish_reason), "length")
        merged.append(
            (index, "".join(d.text for d in parts), [lp for d in parts for lp in d.logprobs], finish)
        )
    return merged


def _token_entry(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


class ChatReplies(Replies):
    prefix = "chatcmpl"
    object_name = "chat.completion.chunk"

    def __init__(self, model: str, include_usage: bool, *, logprobs: bool) -> None:
        super().__init__(model, include_usage)
        self.logprobs = logprobs

    def _logprobs(self, entries: list[TokenLogprob]) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        return {
            "content": [
                _token_entry(e.token, e.logprob) | {"top_logprobs": [_token_entry(t, lp) for t, lp in e.top]}
                for e in entries
            ]
        }

    def delta_logprobs(self, delta: Delta) -> dict[str, Any] | None:
        return self._logprobs(delta.logprobs)

    def opening(self, plan: Plan) -> list[dict[str, Any]]:
        return [
            self._head(self.object_name)
            | {
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ]
            }
            for index in range(len(plan.prompts) * plan.n)
        ]

    def chunk(self, delta: Delta) -> dict[str, Any]:
        content = {"content": delta.text} if delta.text or delta.finish_reason is None else {}
        choice = {
            "index": delta.index,
            "delta": content,
            "logprobs": self._logprobs(delta.logprobs) if delta.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        return self._head(self.object_name) | {"choices": [choice]}

    def whole(
        self, plan: Plan, deltas: dict[int, list[Delta]], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "message": {"role": "assistant", "content": text},
                "logprobs": self._logprobs(entries),
                "finish_reason": finish,
            }
            for index, text, entries, finish in _choices(plan, deltas)
        ]
        return self._head("chat.completion") | {
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }


class CompletionReplies(Replies):
    prefix = "cmpl"
    object_name = "text_completion"

    def __init__(self, model: str, include_usage: bool, *, logprobs: bool) -> None:
        super().__init__(model, include_usage)
        self.logprobs = logprobs
        self.offsets: dict[int, int] = {}  # characters of each choice's text so far (text_offset)

    def _logprobs(self, entries: list[TokenLogprob], start: int) -> dict[str, Any] | None:
        if not self.logprobs:
            return None
        offsets, at = [], start
        for entry in entries:
            offsets.append(at)
            at += len(entry.token)
        return {
            "tokens": [e.token for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries],
            "text_offset": offsets,
        }

    def delta_logprobs(self, delta: Delta) -> dict[str, Any] | None:
        return self._logprobs(delta.logprobs, 0)

    def chunk(self, delta: Delta) -> dict[str, Any]:
        start = self.offsets.get(delta.index, 0)
        self.offsets[delta.index] = start + len(delta.text)
        choice = {
            "index": delta.index,
            "text": delta.text,
            "logprobs": self._logprobs(delta.logprobs, start) if delta.logprobs else None,
            "finish_reason": delta.finish_reason,
        }
        return self._head(self.object_name) | {"choices": [choice]}

    def whole(
        self, plan: Plan, deltas: dict[int, list[Delta]], prompt_tokens: int, completion_tokens: int
    ) -> dict[str, Any]:
        choices = [
            {
                "index": index,
                "text": text,
                "logprobs": self._logprobs(entries, 0),
                "finish_reason": finish,
            }
            for index, text, entries, finish in _choices(plan, deltas)
        ]
        return self._head("text_completion") | {
            "choices": choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }
