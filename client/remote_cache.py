"""What the family's forward is handed as `past_key_values` when the blocks run on peers: `RemoteCache` (a
session's: holds no K/V, only the length of the peers' caches, and passes cache edits, beam reorder and
rollback, on to the inference session with the next step), `RowsCache` (the gateway's engine: row i of the
batch is the single row of session i) or `SwarmPass` (one stateless pass). Each carries the call's attention
mask to block 0's slot, which sends it with the hidden states."""

from __future__ import annotations

import asyncio
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from client.runtime import Runtime
from client.session import InferenceSession
from protos.errors import InvalidInputError


class _LengthLayer(CacheLayerMixin):
    """A cache layer that holds no K/V, only the number of positions the peers hold."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the remote cache holds no K/V: the blocks run on peers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


class RemoteCache(Cache):
    """What `generate()` sees as `past_key_values`: the length of the peers' caches, and the cache edits
    (beam reorder, rollback) it asks for, sent to the peers with the next step."""

    def __init__(self, session: InferenceSession) -> None:
        self._length = _LengthLayer()
        super().__init__(layers=[self._length])
        self.session = session
        self._length.length = session.position
        self.pending_beam: torch.Tensor | None = None
        self.pending_rollback: int | None = None
        # the 2D attention mask [batch, positions] of the model call running now, set by the distributed
        # model's forward as it hands this cache to the family's; None: no position is padding
        self.mask: torch.Tensor | None = None

    def crop(self, max_length: int) -> None:
        # transformers 5: crop(-n) drops the last n positions; crop(0) only trims sliding windows
        if max_length > 0:
            raise InvalidInputError("crop() takes the negative number of positions to drop")
        if max_length < 0:
            self.pending_rollback = self.get_seq_length() + max_length
            self._length.length = self.pending_rollback

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam = beam_idx.to(torch.int64).cpu()
        self.pending_beam = beam if self.pending_beam is None else self.pending_beam[beam]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("repeating the batch of a remote cache is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("selecting rows of a remote cache is not supported")

    def step(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        runtime: Runtime,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Send a step of new positions (with their attention `mask`, None: all real) through the swarm."""
        beam, rollback = self.pending_beam, self.pending_rollback
        step = self.session.astep(hidden, positions, beam_indices=beam, rollback_to=rollback, mask=mask)
        output = runtime.run(step)
        self.pending_beam = self.pending_rollback = None
        self._length.length = self.session.position
        return output


class SwarmPass(Cache):
    """What the family's forward is handed as `past_key_values` for one stateless pass through the swarm
    (a Forward per hop, differentiable): no K/V and no length; it carries the call's 2D attention `mask`
    [batch, positions] (None: no padding) and the tuned prompts of every block (None: none) to block 0's
    slot. It never leaves the distributed model's forward."""

    def __init__(self, mask: torch.Tensor | None, prompts: torch.Tensor | None) -> None:
        super().__init__(layers=[_LengthLayer()])
        self.mask = mask
        self.prompts = prompts

    def crop(self, max_length: int) -> None:
        raise NotImplementedError("a stateless pass holds no positions to crop")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        raise NotImplementedError("a stateless pass holds no positions to reorder")


class RowsCache(RemoteCache):
    """`past_key_values` of one batched forward whose row i is the single row of `sessions[i]`: block 0's
    slot calls `step`, which sends every row to its own session concurrently and gathers the outputs.

    Row i's first `lengths[i]` positions are real (the rest pad a shorter draft: never sent, zeros out) and
    start at `bases[i]`, its own session's length (rows hold different lengths; the slot's positions are
    not used); a base below what the session holds rolls back the rejected positions of its last draft with
    this step. A row whose session failed (after its own failover) gets zeros and its error in `errors`."""

    def __init__(self, sessions: list[InferenceSession], bases: list[int], lengths: list[int]) -> None:
        super().__init__(sessions[0])
        self.sessions, self.bases, self.lengths = sessions, bases, lengths
        self.errors: dict[int, BaseException] = {}
        self._length.length = max(bases)  # only shapes the client's own (unused) attention masks

    def step(
        self,
        hidden: torch.Tensor,  # [rows, new_positions, hidden]
        positions: torch.Tensor,
        runtime: Runtime,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if hidden.shape[0] != len(self.sessions):
            raise InvalidInputError(f"{hidden.shape[0]} rows for {len(self.sessions)} sessions")
        if mask is not None:
            raise InvalidInputError("the engine's rows carry no padding")

        async def every_row() -> list[torch.Tensor | BaseException]:
            steps = []
            for i, (session, base, length) in enumerate(
                zip(self.sessions, self.bases, self.lengths, strict=True)
            ):
                rollback = base if base < session.position else None
                positions = torch.arange(base, base + length)[None]
                steps.append(session.astep(hidden[i : i + 1, :length], positions, rollback_to=rollback))
            return await asyncio.gather(*steps, return_exceptions=True)

        output = torch.zeros_like(hidden)
        for row, result in enumerate(runtime.run(every_row())):
            if isinstance(result, BaseException):
                self.errors[row] = result
            else:
                output[row, : self.lengths[row]] = result[0].to(hidden.device, hidden.dtype)
        return output
