"""The KV cache of one session on a span: transformers' own cache layers for the hosted blocks (full or
sliding window, as the family defines them), dummies elsewhere, plus the rollback, snapshot and restore
the peer's steps need."""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DummyLayer,
    DynamicCache,
    DynamicLayer,
    DynamicSlidingWindowLayer,
    get_layer_types_and_kwargs,
)

from protos.errors import CorollaError


class RollbackTooFar(CorollaError):
    """A rollback past what the cache still holds: the session must be replayed from its history."""


class SpanCache(DynamicCache):
    """K/V of blocks [start, end) for one session; `DummyLayer` (no memory) at every other block index.

    Indices stay global because attention modules call `update(k, v, self.layer_idx)`. transformers
    redirects `get_seq_length()` and mask sizing on a dummy layer 0 to the first real attention layer.
    """

    def __init__(self, config: Any, start: int, end: int) -> None:
        layer_types, layer_kwargs = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
        layers = [
            DYNAMIC_LAYER_TYPE_MAPPING[kind](**kwargs) if start <= i < end else DummyLayer()
            for i, (kind, kwargs) in enumerate(zip(layer_types, layer_kwargs, strict=True))
        ]
        Cache.__init__(self, layers=layers)
        self.start, self.end = start, end
        for layer in self.layers[start:end]:
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.activate_past_recording()  # keeps the last step's positions until `rollback`

    def rollback(self, positions: int) -> None:
        """Keep the first `positions` cached positions, before the next step (a speculative rollback); with
        `positions` equal to the length, sliding layers only drop what their window no longer needs. A
        sliding layer can give back the positions of its last step only: asking for more raises
        `RollbackTooFar` and changes nothing (the client replays the session instead)."""
        length = self.get_seq_length()
        if not 0 <= positions <= length:
            raise RollbackTooFar(f"cannot keep {positions} positions of {length}")
        remove = length - positions
        for layer in self.layers[self.start : self.end]:
            if _full_window(layer):
                window, stored = getattr(layer, "sliding_window", 0), _tensors(layer)[0].shape[-2]
                if stored - remove < min(positions, window - 1):
                    raise RollbackTooFar(
                        f"a sliding-window layer holds the last {stored} positions: it cannot roll back "
                        f"{remove}"
                    )
        for layer in self.layers[self.start : self.end]:
            if not isinstance(layer, DynamicLayer) or not layer.is_initialized:
                continue
            if remove or _full_window(layer):
                layer.crop(-remove)  # a sliding layer takes them from its recorded past; 0 trims it

    def snapshot(self) -> list[tuple[Any, Any, int]]:
        """What `restore` needs to undo the steps run after it (updates build new tensors: references)."""
        hosted = self.layers[self.start : self.end]
        return [(*_tensors(layer), getattr(layer, "cumulative_length", 0)) for layer in hosted]

    def restore(self, snapshot: list[tuple[Any, Any, int]]) -> None:
        hosted = self.layers[self.start : self.end]
        for layer, (keys, values, cumulative) in zip(hosted, snapshot, strict=True):
            if isinstance(layer, DynamicLayer):
                layer.keys, layer.values = keys, values
            if isinstance(layer, DynamicSlidingWindowLayer):
                layer.cumulative_length = cumulative

    def nbytes(self) -> int:
        total = 0
        for layer in self.layers[self.start : self.end]:
            for tensor in _tensors(layer):
                if isinstance(tensor, torch.Tensor):
                    total += tensor.numel() * tensor.element_size()
        return total

    def cached_batch(self) -> int | None:
        """Batch size of the cached positions; None while the cache is empty."""
        for layer in self.layers[self.start : self.end]:
            keys = getattr(layer, "keys", None)
            if isinstance(keys, torch.Tensor) and keys.numel():
                return int(keys.shape[0])
        return None


def _full_window(layer: Any) -> bool:
    """A sliding-window layer that has seen a whole window: it holds only the last positions."""
    return (
        isinstance(layer, DynamicSlidingWindowLayer)
        and layer.is_initialized
        and layer.cumulative_length >= layer.sliding_window
    )


def _tensors(layer: Any) -> tuple[Any, Any]:
    return getattr(layer, "keys", None), getattr(layer, "values", None)
