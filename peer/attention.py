"""Attention over a ragged batch: the steps of many sessions packed into one forward of a span.

    packed hidden [1, T, hidden]:  | session a: 1 row x 1 token | session b: 2 rows x 1 | session c: 1 x 37 |
    every Linear, norm and MLP runs once on all T tokens; attention runs per segment, each against its own
    session's KV cache (or, for a stateless segment, only its own tokens)

transformers calls the attention function named by `config._attn_implementation` with the query, key and
value of the new tokens and passes the layer's kwargs through (`AttentionInterface`). `RAGGED` is such a
function: it cuts the packed tokens back into segments, appends each segment's keys and values to its
session's cache, and calls the family's own attention function (the one the span uses when it runs one
session: sdpa, or the family's eager code with its softcapping) on each segment with an explicit causal
mask, sliding windows included. Because the name has no mask function, the model builds no mask of its
own for the packed sequence. Families whose attention does not go through the interface (Bloom, Falcon)
are never batched (`supports_batching`).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

if TYPE_CHECKING:
    from peer.blocks import SpanCache

RAGGED = "corolla_ragged"
BATCH_KWARG = "corolla_batch"  # the keyword that carries the `RaggedBatch` through the model to attention


@dataclass(frozen=True)
class Segment:
    """One session's rows in the packed sequence: tokens [offset, offset + rows * seq), row after row."""

    offset: int
    rows: int
    seq: int
    cache: SpanCache | None  # None: a stateless segment that attends to its own tokens only

    @property
    def tokens(self) -> int:
        return self.rows * self.seq


@dataclass(frozen=True)
class RaggedBatch:
    segments: tuple[Segment, ...]
    implementation: str  # the span's own attention implementation, called per segment


def supports_batching(model: PreTrainedModel) -> bool:
    """Whether the family's attention goes through transformers' attention interface."""
    return bool(getattr(model, "_supports_attention_backend", False))


def segment_mask(
    queries: int, keys: int, window: int | None, *, additive: bool, dtype: torch.dtype
) -> torch.Tensor | None:
    """Causal mask [1, 1, queries, keys] of a segment whose `queries` new tokens are the last of its `keys`
    (a sliding window keeps `window` keys per query); None when every key is visible."""
    if queries == 1 and (window is None or keys <= window):
        return None
    query_at = torch.arange(keys - queries, keys).unsqueeze(1)
    key_at = torch.arange(keys).unsqueeze(0)
    allowed = key_at <= query_at
    if window is not None:
        allowed &= key_at > query_at - window
    allowed = allowed.view(1, 1, queries, keys)
    if not additive:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)


def _inner_function(module: torch.nn.Module, implementation: str) -> Callable[..., Any]:
    """The attention function the module would call on its own: a registered one, or its family's eager."""
    if implementation != "eager" and implementation in ALL_ATTENTION_FUNCTIONS:
        return ALL_ATTENTION_FUNCTIONS[implementation]  # type: ignore[no-any-return]
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise RuntimeError(f"{type(module).__name__} has no eager attention function to batch with")
    return eager  # type: ignore[no-any-return]


def ragged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, T, head_dim], key/value [1, kv_heads, T, head_dim] of the packed new tokens; returns
    the attention output [1, T, heads, head_dim] as the attention modules expect."""
    batch: RaggedBatch | None = kwargs.pop(BATCH_KWARG, None)
    if batch is None:
        raise RuntimeError("ragged attention runs only inside HostedSpan.forward_batch")
    inner = _inner_function(module, batch.implementation)
    additive = batch.implementation == "eager"
    window = kwargs.get("sliding_window")
    layer = int(getattr(module, "layer_idx", 0))
    outputs = []
    for segment in batch.segments:
        parts = [
            tensor[0, :, segment.offset : segment.offset + segment.tokens]
            .unflatten(1, (segment.rows, segment.seq))
            .transpose(0, 1)  # [rows, heads, seq, head_dim]
            for tensor in (query, key, value)
        ]
        q, k, v = parts
        if segment.cache is not None:
            k, v = segment.cache.update(k, v, layer)
        mask = segment_mask(segment.seq, k.shape[2], window, additive=additive, dtype=q.dtype)
        out, _ = inner(module, q, k, v, mask, **kwargs)  # [rows, seq, heads, head_dim]
        outputs.append(out.reshape(segment.tokens, *out.shape[2:]))
    return torch.cat(outputs).unsqueeze(0), None


def pack(
    items: Sequence[tuple[torch.Tensor, SpanCache | None, torch.Tensor | None]],
    lengths: Sequence[int],
    implementation: str,
) -> tuple[torch.Tensor, torch.Tensor, RaggedBatch]:
    """(hidden [1, T, hidden], position ids [1, T], the batch) of items given as (hidden [rows, seq, hidden],
    cache, position ids [rows, seq] or None: after the `lengths` positions each cache holds)."""
    segments, positions, offset = [], [], 0
    for (hidden, cache, ids), length in zip(items, lengths, strict=True):
        rows, seq, _ = hidden.shape
        segments.append(Segment(offset, rows, seq, cache))
        offset += rows * seq
        if ids is None:  # after what the cache holds, as the family derives them for one session
            ids = torch.arange(length, length + seq).expand(rows, seq)
        positions.append(ids.reshape(-1).to(torch.int64))
    packed = torch.cat([hidden.reshape(-1, hidden.shape[-1]) for hidden, _, _ in items]).unsqueeze(0)
    return packed, torch.cat(positions).unsqueeze(0), RaggedBatch(tuple(segments), implementation)


def unpack(output: torch.Tensor, batch: RaggedBatch) -> list[torch.Tensor]:
    """Each segment's rows [rows, seq, hidden] of a packed output [1, T, hidden]."""
    pieces = output[0].split([segment.tokens for segment in batch.segments])
    return [
        piece.view(segment.rows, segment.seq, -1)
        for piece, segment in zip(pieces, batch.segments, strict=True)
    ]


AttentionInterface.register(RAGGED, ragged_attention)
