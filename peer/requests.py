"""Parsing and validation of every request a peer receives: protobuf messages in, frozen dataclasses out.

Pure: no gRPC server, no asyncio, no compute; knows this peer's limits and span shape, not its caches.
A bad field raises `InvalidInputError`; a request beyond this peer's own limits raises `PeerLimitError`.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from protos import peer_pb2
from protos.errors import CorollaError, InvalidInputError, PeerLimitError
from protos.records import validate_address
from protos.relay import validate_relay_maddrs
from protos.tensors import (
    HIDDEN_WIRE_DTYPES,
    INDEX_DTYPES,
    INT8,
    INT8_BLOCK,
    WIRE_DTYPES,
    WIRE_FORMAT_NAMES,
    from_message,
    int8_outlier_limit,
    optional_from_message,
    wire_dtype_from_name,
    wire_dtype_of,
)

if TYPE_CHECKING:
    from peer.adapters import Lora
    from peer.blocks import HostedSpan
    from peer.config import PeerConfig
    from peer.sessions import PeerSession

MAX_SESSION_ID_CHARS = 128
PUSH_TOKEN_BYTES = 16
TOKEN_BYTES = 16  # a kept forward's token (`peer.gradients.TOKEN_BYTES`)
MAX_CARRIED = 64  # hop outputs one pushed step may carry (Step.carried), whatever the model's depth
BACKWARD_ACTIVATIONS_PER_BLOCK = 16  # hidden-sized tensors autograd keeps per block (attention, MLP, norms)


class PositionMismatch(CorollaError):
    """A step does not start where the session's cache ends: the client reopens the session and replays."""


@dataclass(frozen=True)
class Limits:
    """What this peer accepts; the same numbers it announces in its `PeerRecord`."""

    max_batch_size: int
    max_length: int
    max_forward_tokens: int
    max_message_bytes: int
    max_backward_bytes: int = 8 * 2**30
    max_lora_rank: int = 64

    @classmethod
    def from_config(cls, config: PeerConfig) -> Limits:
        return cls(
            max_batch_size=config.max_batch_size,
            max_length=config.max_length,
            max_forward_tokens=config.max_forward_tokens,
            max_message_bytes=config.max_message_bytes,
            max_backward_bytes=config.max_backward_bytes,
            max_lora_rank=config.max_lora_rank,
        )


@dataclass(frozen=True)
class Served:
    """The shape of what this peer hosts now: its span `[start, end)` of a model of `num_blocks` blocks."""

    start: int
    end: int
    num_blocks: int
    hidden_size: int
    dtype: torch.dtype  # compute dtype, the default wire dtype of a session
    adapters: Mapping[str, Lora] = field(default_factory=dict)  # the LoRA adapters it serves, by name
    # (block, path inside it) -> (in, out) of each hosted layer a client's LoRA may target
    lora_layers: Mapping[tuple[int, str], tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def of(cls, span: HostedSpan) -> Served:
        return cls(
            span.start,
            span.end,
            span.anatomy.num_blocks,
            span.hidden_size,
            span.dtype,
            span.adapters,
            span.lora_layers,
        )


@dataclass(frozen=True)
class OpenRequest:
    session_id: str
    start: int
    end: int
    batch_size: int
    max_length: int
    wire_dtype: torch.dtype  # dtype of the hidden states this peer sends on (BLOCKWISE_INT8: "int8")
    next_hops: tuple[peer_pb2.Hop, ...]
    report_outputs: bool
    push_token: bytes = b""  # empty: the session takes no pushes
    adapter: Lora | None = None  # the served LoRA adapter of every step; None: the base model


class PushRefused(CorollaError):
    """A push without the session's token, or for no session here: the two are indistinguishable."""


@dataclass(frozen=True, eq=False)
class StepRequest:
    step_id: int
    base: int  # positions the cache keeps before this step (after a rollback)
    hidden: torch.Tensor  # [batch, seq, hidden], in the dtype it arrived in (float32 for int8)
    position_ids: torch.Tensor | None  # [batch, seq]
    beam_indices: torch.LongTensor | None  # [batch]
    # the session's whole mask after this step [batch, base + seq] (bool); None: no padding anywhere
    attention_mask: torch.Tensor | None = None


@dataclass(frozen=True, eq=False)
class ForwardRequest:
    start: int
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden]
    prompts: torch.Tensor | None  # [end - start, batch or 1, pre_seq_len, hidden]; checked by HostedSpan
    wire_dtype: torch.dtype | None = None  # what `hidden` travelled as (BLOCKWISE_INT8); None: its dtype
    attention_mask: torch.Tensor | None = None  # [batch, seq] bool; None: no padding
    lora: Lora | None = None  # a served adapter, or the client's own LoRA (`trainable`)
    trainable: bool = False
    keep: bool = False  # keep the forward's graph for its Backward (`peer.gradients`)

    @property
    def reply_dtype(self) -> torch.dtype:
        """The wire dtype of the reply: the one the hidden states came in."""
        return self.hidden.dtype if self.wire_dtype is None else self.wire_dtype


@dataclass(frozen=True, eq=False)
class BackwardRequest:
    start: int
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden], the forward's input
    grad_output: torch.Tensor  # [batch, seq, hidden]
    prompts: torch.Tensor | None
    attention_mask: torch.Tensor | None = None  # [batch, seq] bool; None: no padding
    lora: Lora | None = None  # as in ForwardRequest: a client's own (`trainable`) gets gradients
    trainable: bool = False
    token: bytes = b""  # the kept forward's token (`peer.gradients.KeptGraphs`); b"": recompute


def client_key(peer: str) -> str:
    """Who a call comes from, for quotas: grpc's `context.peer()` ("ipv4:1.2.3.4:5678", "ipv6:[::1]:5678")
    reduced to the IPv4 address or the IPv6 /64 (one host's whole range, as providers hand them out); an
    IPv4-mapped IPv6 address counts as its IPv4 address."""
    family, _, rest = peer.partition(":")
    if family not in ("ipv4", "ipv6"):
        return family or "unknown"
    host = rest.rsplit(":", 1)[0].strip("[]")
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return f"ipv4:{address.ipv4_mapped}"
        return f"ipv6:{ipaddress.IPv6Network((address, 64), strict=False)}"
    return f"ipv4:{address}"


def step_deadline(step: peer_pb2.Step, received: float) -> float | None:
    """When the client stops waiting for `step` (the clock of `received`), or None when it did not say."""
    return received + step.timeout_ms / 1000 if step.timeout_ms else None


def parse_span(start: int, end: int, served: Served) -> tuple[int, int]:
    if not served.start <= start < end <= served.end:
        raise InvalidInputError(
            f"span [{start}, {end}) is not served here; this peer hosts [{served.start}, {served.end})"
        )
    return start, end


def valid_session_id(session_id: str) -> bool:
    return 0 < len(session_id) <= MAX_SESSION_ID_CHARS and session_id.isprintable()


def parse_hops(hops: Sequence[peer_pb2.Hop], *, end: int, num_blocks: int) -> tuple[peer_pb2.Hop, ...]:
    """The hops after a span that ends at `end`: contiguous, inside the model, each at a host:port with its
    own session id and push token. The count is checked first: O(1) on a repeated field, before any copy."""
    if len(hops) > num_blocks:
        raise InvalidInputError("more next hops than blocks in the model")
    previous_end = end
    for hop in hops:
        if hop.start != previous_end or hop.end <= hop.start or hop.end > num_blocks:
            raise InvalidInputError(
                f"next hops must continue the route: expected a span from {previous_end}, "
                f"got [{hop.start}, {hop.end})"
            )
        try:
            validate_address(hop.address)
            validate_relay_maddrs(hop.relay_maddrs)
        except InvalidInputError as e:
            raise InvalidInputError(f"next hop: {e}") from None
        if not valid_session_id(hop.session_id):
            raise InvalidInputError(
                f"next hop: session_id must be 1..{MAX_SESSION_ID_CHARS} printable characters"
            )
        if len(hop.push_token) != PUSH_TOKEN_BYTES:
            raise InvalidInputError(f"next hop: push_token must be {PUSH_TOKEN_BYTES} bytes")
        previous_end = hop.end
    return tuple(hops)


def parse_reroute(request: peer_pb2.Reroute, *, end: int, num_blocks: int) -> tuple[peer_pb2.Hop, ...]:
    return parse_hops(request.next_hops, end=end, num_blocks=num_blocks)


def parse_open(request: peer_pb2.OpenSession, *, served: Served, limits: Limits) -> OpenRequest:
    session_id = request.session_id
    if not valid_session_id(session_id):
        raise InvalidInputError(f"session_id must be 1..{MAX_SESSION_ID_CHARS} printable characters")
    if len(request.push_token) not in (0, PUSH_TOKEN_BYTES):
        raise InvalidInputError(f"push_token must be {PUSH_TOKEN_BYTES} bytes, or empty for no pushes")
    start, end = parse_span(request.start, request.end, served)
    if request.batch_size < 1:
        raise InvalidInputError(f"batch_size {request.batch_size} is outside 1..{limits.max_batch_size}")
    if request.batch_size > limits.max_batch_size:
        raise PeerLimitError(
            "max_batch_size", f"batch_size {request.batch_size} is outside 1..{limits.max_batch_size}"
        )
    if request.max_length < 1:
        raise InvalidInputError(f"max_length {request.max_length} is outside 1..{limits.max_length}")
    if request.max_length > limits.max_length:
        raise PeerLimitError(
            "max_length", f"max_length {request.max_length} is outside 1..{limits.max_length}"
        )
    if request.dtype and request.dtype not in WIRE_FORMAT_NAMES:
        raise InvalidInputError(f"unknown wire dtype {request.dtype!r}")
    wire_dtype = wire_dtype_from_name(request.dtype) if request.dtype else served.dtype
    return OpenRequest(
        session_id=session_id,
        start=start,
        end=end,
        batch_size=request.batch_size,
        max_length=request.max_length,
        wire_dtype=wire_dtype,
        next_hops=parse_hops(request.next_hops, end=end, num_blocks=served.num_blocks),
        report_outputs=request.report_outputs,
        push_token=request.push_token,
        adapter=served_adapter(request.adapter, served),
    )


def served_adapter(name: str, served: Served) -> Lora | None:
    """The served adapter a request names (None for ""), or INVALID_ARGUMENT saying which ones are served."""
    if not name:
        return None
    adapter = served.adapters.get(name)
    if adapter is None:
        offered = ", ".join(sorted(served.adapters)) or "none"
        raise InvalidInputError(f"adapter {name[:128]!r} is not served by this peer (it serves: {offered})")
    return adapter


def _lora(
    request: peer_pb2.ForwardRequest | peer_pb2.BackwardRequest,
    start: int,
    end: int,
    *,
    served: Served,
    limits: Limits,
) -> tuple[Lora | None, bool]:
    """(the LoRA a Forward or Backward runs with, whether it is the client's own and trainable)."""
    from peer.adapters import parse_lora

    if request.adapter and len(request.lora):
        raise InvalidInputError("a request takes a served adapter or its own lora, not both")
    if request.adapter:
        return served_adapter(request.adapter, served), False
    lora = parse_lora(
        request.lora,
        start=start,
        end=end,
        layers=served.lora_layers,
        max_rank=limits.max_lora_rank,
        max_bytes=limits.max_message_bytes,
    )
    return lora, lora is not None


def parse_push(request: peer_pb2.PushRequest) -> tuple[str, bytes]:
    """The (session id, push token) a push claims. Checks nothing that depends on this peer's sessions, so
    its answers tell a stranger nothing about which ids exist; the token is compared by the caller."""
    if request.step.local_only:
        raise InvalidInputError("a push cannot be local_only")
    session_id, token = request.step.session_id, request.push_token
    if not valid_session_id(session_id) or len(token) != PUSH_TOKEN_BYTES:
        raise PushRefused("push refused")
    return session_id, token


def check_rows(batch: int, width: int, *, session: PeerSession, hidden_size: int) -> None:
    """A step's hidden states must have the session's batch and the model's width."""
    if batch != session.batch_size:
        raise InvalidInputError(
            f"hidden batch {batch} does not match the session's batch {session.batch_size}"
        )
    if width != hidden_size:
        raise InvalidInputError(f"hidden size {width} does not match the model's {hidden_size}")


def max_carried(start: int) -> int:
    """The most hop outputs a step pushed into a span starting at block `start` may carry: one per block
    before it at most (each earlier hop serves at least one), and never more than `MAX_CARRIED`."""
    return min(start, MAX_CARRIED)


def check_carried(step: peer_pb2.Step, *, start: int, pushed: bool) -> None:
    """The hop outputs a step carries (`Step.carried`, passed on undecoded): only on a push, at most
    `max_carried(start)`, none with report_outputs, one `carried_seconds` each, and each exactly the shape,
    wire dtype and byte sizes of the step's hidden states (whose message `from_message` has checked)."""
    count = len(step.carried)  # len() first: O(1) on a repeated field, copies nothing
    if not pushed:
        if count or len(step.carried_seconds):
            raise InvalidInputError("carried outputs come only with a push, never from a client")
        return
    if count > max_carried(start):
        raise InvalidInputError(
            f"{count} carried outputs: a step into block {start} can have at most {max_carried(start)}"
        )
    if len(step.carried_seconds) != count:
        raise InvalidInputError(f"{len(step.carried_seconds)} carried_seconds for {count} carried outputs")
    if count and step.report_outputs:
        raise InvalidInputError("a step with report_outputs carries no outputs")
    shape, dtype = list(step.hidden.shape), step.hidden.dtype
    for index, carried in enumerate(step.carried):
        name = f"carried[{index}]"
        if carried.dtype != dtype:
            raise InvalidInputError(f"{name}: dtype {carried.dtype!r}, expected the hidden's {dtype!r}")
        if len(carried.shape) != len(shape) or list(carried.shape) != shape:
            raise InvalidInputError(f"{name}: shape {list(carried.shape[:8])}, expected {shape}")
        _check_sizes(carried, name)


def _check_sizes(message: peer_pb2.Tensor, name: str) -> None:
    """The byte fields of a tensor message of a checked wire dtype and shape hold what they must (lengths
    only: the values are never read here)."""
    shape = tuple(message.shape)
    numel = math.prod(shape)
    if message.dtype != INT8:
        extra = message.block or message.scales or message.outlier_index or message.outlier_values
        if extra or len(message.data) != numel * WIRE_DTYPES[message.dtype].itemsize:
            raise InvalidInputError(f"{name}: its bytes do not match shape {list(shape)} of {message.dtype}")
        return
    outliers = len(message.outlier_index)
    if (
        message.block != INT8_BLOCK
        or len(message.data) != numel
        or len(message.scales) != 4 * -(-numel // INT8_BLOCK)
        or outliers % 4
        or len(message.outlier_values) != outliers
        or outliers // 4 > int8_outlier_limit(shape)
    ):
        raise InvalidInputError(f"{name}: its bytes do not match shape {list(shape)} of int8")


def parse_step(
    step: peer_pb2.Step, *, session: PeerSession, served: Served, limits: Limits, pushed: bool = False
) -> StepRequest:
    """Decode and check a step against its session's state before anything changes; a `pushed` one may
    carry the outputs of earlier hops (checked, not decoded)."""
    if step.session_id not in ("", session.session_id):
        raise InvalidInputError("step for another session")
    max_bytes = limits.max_message_bytes
    hidden = from_message(
        step.hidden, max_bytes=max_bytes, expected_dtypes=HIDDEN_WIRE_DTYPES, expected_ndim=3, name="hidden"
    )
    check_carried(step, start=session.start, pushed=pushed)
    batch, seq, width = hidden.shape
    check_rows(batch, width, session=session, hidden_size=served.hidden_size)
    if seq < 1:
        raise InvalidInputError("a step needs at least one new position")
    base = session.position
    if step.HasField("rollback_to"):
        if step.rollback_to > session.position:
            raise InvalidInputError(
                f"rollback_to {step.rollback_to} is past the cache's {session.position} positions"
            )
        base = step.rollback_to
    if step.position != base:
        raise PositionMismatch(
            f"step starts at position {step.position} but the cache holds {base} positions"
        )
    if base + seq > session.max_length:
        raise InvalidInputError(
            f"{base + seq} positions exceed the session's max_length {session.max_length}"
        )
    positions = optional_from_message(
        step.position_ids,
        max_bytes=max_bytes,
        expected_dtypes=INDEX_DTYPES,
        expected_ndim=2,
        name="position_ids",
    )
    if positions is not None and tuple(positions.shape) != (batch, seq):
        raise InvalidInputError(f"position_ids must be [{batch}, {seq}], got {list(positions.shape)}")
    if positions is not None and (positions.min() < 0 or positions.max() >= limits.max_length):
        raise InvalidInputError("position_ids are outside 0..max_length")
    beam = optional_from_message(
        step.beam_indices,
        max_bytes=max_bytes,
        expected_dtypes=INDEX_DTYPES,
        expected_ndim=1,
        name="beam_indices",
    )
    if beam is not None and (beam.shape[0] != batch or beam.min() < 0 or beam.max() >= batch):
        raise InvalidInputError(f"beam_indices must be {batch} indices in 0..{batch - 1}")
    beam = cast("torch.LongTensor | None", beam)  # int64: checked by optional_from_message
    new = attention_mask(step.attention_mask, batch, seq, max_bytes=max_bytes, whole=False)
    return StepRequest(
        step_id=step.step_id,
        base=base,
        hidden=hidden,
        position_ids=positions,
        beam_indices=beam,
        attention_mask=session_mask(session.attention_mask, base, beam, new, seq),
    )


def attention_mask(
    message: peer_pb2.Tensor, batch: int, seq: int, *, max_bytes: int, whole: bool = True
) -> torch.Tensor | None:
    """An optional int64 mask [batch, seq] of 0 and 1, as bool; with `whole` (a stateless pass), every row
    needs a real position."""
    mask = optional_from_message(
        message, max_bytes=max_bytes, expected_dtypes=INDEX_DTYPES, expected_ndim=2, name="attention_mask"
    )
    if mask is None:
        return None
    if tuple(mask.shape) != (batch, seq):
        raise InvalidInputError(f"attention_mask must be [{batch}, {seq}], got {list(mask.shape)}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidInputError("attention_mask holds values other than 0 and 1")
    mask = mask.bool()
    if whole:
        _every_row_real(mask)
    return mask


def session_mask(
    held: torch.Tensor | None,
    base: int,
    beam: torch.Tensor | None,
    new: torch.Tensor | None,
    seq: int,
) -> torch.Tensor | None:
    """A session's mask after a step: the `held` mask of its cached positions cut to `base` and reordered
    by `beam`, then `new` (all real when None) for the step's `seq` positions. None while nothing is
    padding. Refuses a row that would hold no real position."""
    if held is None and new is None:
        return None
    batch = (new if new is not None else held).shape[0]  # type: ignore[union-attr]
    past = torch.ones(batch, base, dtype=torch.bool) if held is None else held[:, :base]
    if beam is not None:
        past = past[beam]
    step = torch.ones(batch, seq, dtype=torch.bool) if new is None else new
    mask = torch.cat([past, step], dim=1)
    _every_row_real(mask)
    return mask


def _every_row_real(mask: torch.Tensor) -> None:
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise InvalidInputError(f"attention_mask rows {empty[:8]} are all padding")


def parse_forward(request: peer_pb2.ForwardRequest, *, served: Served, limits: Limits) -> ForwardRequest:
    start, end = parse_span(request.start, request.end, served)
    hidden = _stateless_hidden(request.hidden, "hidden", served=served, limits=limits)
    batch, seq, _ = hidden.shape
    mask = attention_mask(request.attention_mask, batch, seq, max_bytes=limits.max_message_bytes)
    prompts = _prompts(request.prompts, limits)
    lora, trainable = _lora(request, start, end, served=served, limits=limits)
    return ForwardRequest(
        start,
        end,
        hidden,
        prompts,
        wire_dtype_of(request.hidden),
        mask,
        lora=lora,
        trainable=trainable,
        keep=request.keep_for_backward,
    )


def parse_backward(request: peer_pb2.BackwardRequest, *, served: Served, limits: Limits) -> BackwardRequest:
    start, end = parse_span(request.start, request.end, served)
    hidden = _stateless_hidden(request.hidden, "hidden", served=served, limits=limits)
    needed = backward_bytes(hidden.shape, end - start, itemsize=served.dtype.itemsize)
    if needed > limits.max_backward_bytes:
        raise PeerLimitError(
            "max_backward_bytes",
            f"a backward of {list(hidden.shape)} through {end - start} blocks needs about {needed} bytes of "
            f"activations, more than this peer's {limits.max_backward_bytes}",
        )
    grad_output = _float_tensor(request.grad_output, "grad_output", limits)
    if grad_output.shape != hidden.shape:
        raise InvalidInputError(
            f"grad_output shape {list(grad_output.shape)} does not match hidden {list(hidden.shape)}"
        )
    batch, seq, _ = hidden.shape
    mask = attention_mask(request.attention_mask, batch, seq, max_bytes=limits.max_message_bytes)
    prompts = _prompts(request.prompts, limits)
    lora, trainable = _lora(request, start, end, served=served, limits=limits)
    if len(request.forward_token) not in (0, TOKEN_BYTES):
        raise InvalidInputError(f"forward_token must be {TOKEN_BYTES} bytes, or empty")
    token = request.forward_token
    return BackwardRequest(
        start, end, hidden, grad_output, prompts, mask, lora=lora, trainable=trainable, token=token
    )


def backward_bytes(shape: Sequence[int], num_blocks: int, *, itemsize: int) -> int:
    """Activation memory a Backward of hidden `shape` [batch, seq, hidden] holds through `num_blocks` blocks
    computed in a dtype of `itemsize` bytes: an estimate, linear in every factor."""
    batch, seq, width = shape
    return batch * seq * width * itemsize * num_blocks * BACKWARD_ACTIVATIONS_PER_BLOCK


def _float_tensor(message: peer_pb2.Tensor, name: str, limits: Limits) -> torch.Tensor:
    return from_message(
        message,
        max_bytes=limits.max_message_bytes,
        expected_dtypes=HIDDEN_WIRE_DTYPES,
        expected_ndim=3,
        name=name,
    )


def _stateless_hidden(message: peer_pb2.Tensor, name: str, *, served: Served, limits: Limits) -> torch.Tensor:
    hidden = _float_tensor(message, name, limits)
    batch, seq, width = hidden.shape
    if batch > limits.max_batch_size or batch * seq > limits.max_forward_tokens:
        raise PeerLimitError(
            "max_batch_size" if batch > limits.max_batch_size else "max_forward_tokens",
            f"batch {batch} x {seq} positions exceed the peer's limits (batch <= {limits.max_batch_size}, "
            f"batch x positions <= {limits.max_forward_tokens})",
        )
    if width != served.hidden_size:
        raise InvalidInputError(f"hidden size {width} does not match the model's {served.hidden_size}")
    return hidden


def _prompts(message: peer_pb2.Tensor, limits: Limits) -> torch.Tensor | None:
    # shapes are checked against the hidden states and the span by `HostedSpan` before any compute
    return optional_from_message(
        message,
        max_bytes=limits.max_message_bytes,
        expected_dtypes=HIDDEN_WIRE_DTYPES,
        expected_ndim=4,
        name="prompts",
    )
