"""What a `HostedSpan` runs, checked before it runs: hidden states of the span's size and dtype, positions
and an attention mask of their shapes, a cache of the called blocks holding the same batch, deep prompts.
`InvalidInputError` for anything else, whoever calls the span (the peer's requests, tests, benchmarks)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from peer.cache import SpanCache
from protos.errors import InvalidInputError

if TYPE_CHECKING:
    from peer.blocks import HostedSpan


def check_prompts(
    span: HostedSpan, prompts: torch.Tensor | None, hidden: torch.Tensor, start: int, end: int
) -> None:
    """Deep prompts [end - start, batch or 1, pre_seq_len <= seq, hidden_size] in the span's dtype."""
    if prompts is None:
        return
    batch, seq, width = hidden.shape
    if (
        prompts.ndim != 4
        or prompts.shape[0] != end - start
        or prompts.shape[1] not in (1, batch)
        or not 1 <= prompts.shape[2] <= seq
        or prompts.shape[3] != width
    ):
        raise InvalidInputError(
            f"prompts must be [{end - start}, 1 or {batch}, 1..{seq}, {width}] for blocks "
            f"[{start}, {end}), "
            f"got {tuple(prompts.shape)}"
        )
    if prompts.dtype != span.dtype:
        raise InvalidInputError(f"prompts dtype {prompts.dtype} does not match the span's {span.dtype}")


def check_inputs(
    span: HostedSpan,
    hidden: torch.Tensor,
    cache: SpanCache | None,
    positions: torch.Tensor | None,
    start: int,
    end: int,
    mask: torch.Tensor | None = None,
) -> None:
    """What `HostedSpan` runs: hidden states of its size and dtype, positions and `mask` of their shape
    (the mask over the cached and new positions), a cache of these blocks holding this batch."""
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 3:
        raise InvalidInputError("hidden must be a tensor [batch, seq, hidden_size]")
    batch, seq, width = hidden.shape
    if width != span.hidden_size:
        raise InvalidInputError(f"hidden size {width} does not match the model's {span.hidden_size}")
    if batch < 1 or seq < 1:
        raise InvalidInputError(f"hidden has an empty batch or sequence: shape {tuple(hidden.shape)}")
    if hidden.dtype != span.dtype:
        raise InvalidInputError(f"hidden dtype {hidden.dtype} does not match the span's {span.dtype}")
    if positions is not None and (
        positions.shape != (batch, seq) or positions.dtype not in (torch.int64, torch.int32)
    ):
        raise InvalidInputError(
            f"positions must be integer ids of shape {(batch, seq)}, got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    if cache is not None:
        if not isinstance(cache, SpanCache) or (cache.start, cache.end) != (start, end):
            raise InvalidInputError(f"the cache is not one of blocks [{start}, {end})")
        cached_batch = cache.cached_batch()
        if cached_batch is not None and cached_batch != batch:
            raise InvalidInputError(f"batch {batch} does not match the session's batch {cached_batch}")
    if mask is not None:
        cached = cache.get_seq_length() if cache is not None else 0
        if mask.ndim != 2 or tuple(mask.shape) != (batch, cached + seq):
            raise InvalidInputError(
                f"mask must be [{batch}, {cached + seq}] (cached and new positions), got {list(mask.shape)}"
            )
