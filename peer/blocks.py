"""A peer's span of blocks: loads only the span's weights and runs `forward(hidden, cache, positions)` through
the family's own transformers code. Pure torch: no asyncio, no gRPC, no I/O besides reading weights."""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from peer.adapters import Lora, LoraHooks, load_adapter, span_layers
from peer.attention import BATCH_KWARG, RAGGED, pack, supports_batching, unpack
from peer.cache import SpanCache
from peer.gradients import SpanGradients
from peer.inputs import check_inputs, check_prompts
from peer.quant import Int8Linear, check_quant, quantize_blocks
from protos.checkpoint import build_skeleton, load_config, load_weights, parse_dtype, resolve_model_path
from protos.errors import InvalidInputError
from protos.partition import (
    Anatomy,
    Role,
    StopForward,
    checkpoint_key_filter,
    detect_tuple_output,
    hidden_argument,
    install_slots,
    locate,
    materialized_bytes,
    module_filter,
    move_loaded,
    replace_hidden,
)

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class BatchItem:
    """One session's step (or one stateless forward) in a batch: `hidden` [rows, seq, hidden_size], the
    session's `cache` (None: stateless), absolute `positions` [rows, seq] (None: after the cache) and the
    attention `mask` [rows, cached + seq] of 0/1 (None: no padding; such an item runs alone) and the
    `lora` applied to the span for it (None: the base model; items of one batch share it)."""

    hidden: torch.Tensor
    cache: SpanCache | None = None
    positions: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    lora: Lora | None = None


@dataclass
class _Call:
    start: int
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden]
    prompts: torch.Tensor | None = None  # [end - start, batch or 1, pre_seq_len, hidden]


def count_blocks(name_or_path: str | os.PathLike[str]) -> int:
    """Number of blocks of a model, from its config alone (nothing is loaded)."""
    folder = resolve_model_path(name_or_path)
    return locate(build_skeleton(load_config(folder), torch.float32)).num_blocks


class HostedSpan(SpanGradients):
    """Blocks [start, end) of one model, loaded alone, run through the family's own forward.

    The owner's block list is replaced by slots for good: slots before the called sub-span pass their input
    through (the family's pre-block code still runs: masks, rotary, alibi, from the session's cache), the
    first called block receives the real hidden states, and the last one stops the forward with its output.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        anatomy: Anatomy,
        start: int,
        end: int,
        dtype: torch.dtype,
        *,
        device: torch.device | None = None,
        quant: str = "none",
    ) -> None:
        self.model = model
        self.anatomy = anatomy
        self.start, self.end = start, end
        self.dtype = dtype
        self.device = device or torch.device("cpu")  # weights, caches and compute; inputs move here once
        self.quant = quant  # "none" or the `peer.quant` mode of the hosted blocks' linear layers
        self.config = model.config
        self._call: _Call | None = None
        self._lock = threading.Lock()  # one forward at a time: `_call` is per forward
        self.blocks = install_slots(model, anatomy, self._dispatch)
        for parameter in [*model.parameters(), *self.blocks.parameters()]:
            parameter.requires_grad_(False)  # frozen and shared: a backward computes input grads only
        self.tuple_output = detect_tuple_output(model, anatomy)
        # the family's attention goes through transformers' interface, and the model takes position ids and
        # passes extra keywords down to it: then steps of many sessions run as one forward
        self.batches = supports_batching(model) and {"position_ids", "kwargs"} <= anatomy.owner_params
        self.adapters: dict[str, Lora] = {}  # served LoRA adapters by name (`load_adapters`)
        self._lora = LoraHooks(self.blocks)
        self._lora_layers: dict[tuple[int, str], tuple[int, int]] | None = None

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike[str],
        start: int,
        end: int,
        *,
        dtype: str | torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        quant: str = "none",
    ) -> HostedSpan:
        """Load blocks [start, end) and the small modules around the block loop; never the vocabulary-sized
        embeddings or LM head. `device` holds the weights, caches and compute; `quant` (`peer.quant`)
        replaces the hosted blocks' linear layers."""
        torch_dtype = parse_dtype(dtype)
        torch_device = torch.device(device)
        check_quant(quant, dtype=torch_dtype, device=torch_device)
        folder = resolve_model_path(name_or_path)
        skeleton = build_skeleton(load_config(folder), torch_dtype)
        anatomy = locate(skeleton)
        if not 0 <= start < end <= anatomy.num_blocks:
            raise InvalidInputError(
                f"span [{start}, {end}) is outside the model's blocks [0, {anatomy.num_blocks})"
            )
        load_weights(
            skeleton,
            Path(folder),
            wanted_key=checkpoint_key_filter(anatomy, Role.PEER, start, end),
            wanted_module=module_filter(anatomy, Role.PEER, start, end),
            dtype=torch_dtype,
        )
        span = cls(skeleton, anatomy, start, end, torch_dtype, device=torch_device, quant=quant)
        quantize_blocks(list(span.blocks[start:end]), quant)
        move_loaded(skeleton, torch_device)
        logger.info(
            "span loaded model=%s blocks=[%d,%d) dtype=%s device=%s quant=%s bytes=%d",
            folder.name,
            start,
            end,
            str(torch_dtype).removeprefix("torch."),
            torch_device,
            quant,
            span.parameter_bytes(),
        )
        return span

    @classmethod
    def from_model(cls, model: PreTrainedModel, start: int, end: int, *, quant: str = "none") -> HostedSpan:
        """Wrap an already loaded full model (tests, benchmarks); the model's block list is replaced (and its
        span's linear layers quantized with `quant`)."""
        anatomy = locate(model)
        if not 0 <= start < end <= anatomy.num_blocks:
            raise InvalidInputError(
                f"span [{start}, {end}) is outside the model's blocks [0, {anatomy.num_blocks})"
            )
        parameter = next(model.parameters())
        check_quant(quant, dtype=parameter.dtype, device=parameter.device)
        span = cls(model, anatomy, start, end, parameter.dtype, device=parameter.device, quant=quant)
        quantize_blocks(list(span.blocks[start:end]), quant)
        return span

    @property
    def hidden_size(self) -> int:
        return self.anatomy.hidden_size

    @property
    def lora_layers(self) -> dict[tuple[int, str], tuple[int, int]]:
        """(block, path inside it) -> (in, out) of every hosted layer a LoRA may target."""
        if self._lora_layers is None:
            self._lora_layers = span_layers(self.blocks, self.start, self.end)
        return self._lora_layers

    def load_adapters(self, specs: list[str]) -> None:
        """Serve the PEFT adapters `specs` (`NAME=DIR` or `DIR`): only the hosted blocks' weights load."""
        for spec in specs:
            lora = load_adapter(
                spec,
                layers_path=self.anatomy.layers_path,
                layers=self.lora_layers,
                start=self.start,
                end=self.end,
                dtype=self.dtype,
                device=self.device,
            )
            if lora.name in self.adapters:
                raise InvalidInputError(f"two adapters are named {lora.name!r}")
            self.adapters[lora.name] = lora

    def parameter_bytes(self) -> int:
        """Bytes of weights and buffers this span holds in memory."""
        hosted = self.blocks[self.start : self.end]
        packed = sum(
            m.packed_bytes() for block in hosted for m in block.modules() if isinstance(m, Int8Linear)
        )
        return materialized_bytes(self.model) + sum(materialized_bytes(block) for block in hosted) + packed

    def new_cache(self, *, start: int | None = None, end: int | None = None) -> SpanCache:
        start, end = self._check_span(start, end)
        return SpanCache(self.config, start, end)

    @torch.inference_mode()
    def forward(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None = None,
        positions: torch.Tensor | None = None,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lora: Lora | None = None,
    ) -> torch.Tensor:
        """Run blocks [start, end) (default: the hosted span) on `hidden` [batch, seq, hidden_size].

        `cache` (from `new_cache`) holds earlier positions and is extended in place; without it the call is
        stateless. `positions` are absolute position ids [batch, seq]; without them the family derives them
        from the cache length. `prompts` [end - start, batch or 1, pre_seq_len, hidden_size] are added to the
        first positions of the hidden states entering each block (deep prompt tuning). `mask` [batch, cached
        + seq] marks padding (0) as transformers' attention_mask does; the family's own mask code applies it.
        `lora` (a served adapter or a client's, `peer.adapters`) updates the blocks' linear layers.
        Returns the hidden states after block end-1 [batch, seq, hidden_size].
        """
        start, end = self._check_span(start, end)
        check_inputs(self, hidden, cache, positions, start, end, mask)
        check_prompts(self, prompts, hidden, start, end)
        return self._run(hidden, cache, positions, start, end, prompts, mask=mask, lora=lora)

    @torch.inference_mode()
    def forward_batch(
        self, items: list[BatchItem], *, start: int | None = None, end: int | None = None
    ) -> list[torch.Tensor | Exception]:
        """Run blocks [start, end) once for all `items` (steps of different sessions, lengths and positions)
        and return each item's output [rows, seq, hidden_size], or the error that item alone raised.

        One item runs through `forward` unchanged. Several are packed into one sequence, through which every
        weight is read once, with attention per item (`peer.attention`); each output equals that item run
        alone within float rounding. An item that fails validation fails alone; should the batched forward
        fail, every cache is cut back to its length before it and each item runs alone.
        """
        start, end = self._check_span(start, end)
        results: list[torch.Tensor | Exception] = [RuntimeError("not run")] * len(items)
        valid: list[int] = []
        for index, item in enumerate(items):
            try:
                check_inputs(self, item.hidden, item.cache, item.positions, start, end, item.mask)
            except InvalidInputError as e:
                results[index] = e
            else:
                valid.append(index)
        shared = len({id(items[i].lora) for i in valid}) == 1  # one adapter (or none) for the whole forward
        if len(valid) > 1 and self.batches and shared and all(items[i].mask is None for i in valid):
            lengths = [cache.get_seq_length() if (cache := items[i].cache) else 0 for i in valid]
            saved = [cache.snapshot() if (cache := items[i].cache) else [] for i in valid]
            try:
                outputs = self._run_packed([items[i] for i in valid], lengths, start, end)
            except Exception:  # one item's fault must not cost the others their step
                logger.exception("batched forward of %d items failed: running them one by one", len(valid))
                for i, snapshot in zip(valid, saved, strict=True):
                    if (cache := items[i].cache) is not None:
                        cache.restore(snapshot)
            else:
                for i, output in zip(valid, outputs, strict=True):
                    results[i] = output
                return results
        for i in valid:
            item = items[i]
            try:
                results[i] = self._run(
                    item.hidden, item.cache, item.positions, start, end, None, mask=item.mask, lora=item.lora
                )
            except Exception as e:
                results[i] = e
        return results

    def _run_packed(
        self, items: list[BatchItem], lengths: list[int], start: int, end: int
    ) -> list[torch.Tensor]:
        config = self.model.config
        own = config._attn_implementation
        packed, positions, batch = pack(
            [(item.hidden, item.cache, item.positions) for item in items], lengths, own or "eager"
        )
        config._attn_implementation = RAGGED
        try:
            output = self._run(
                packed, None, positions, start, end, None, {BATCH_KWARG: batch}, lora=items[0].lora
            )
        finally:
            config._attn_implementation = own
        return unpack(output, batch)

    def _run(
        self,
        hidden: torch.Tensor,
        cache: SpanCache | None,
        positions: torch.Tensor | None,
        start: int,
        end: int,
        prompts: torch.Tensor | None,
        extra: dict[str, Any] | None = None,
        *,
        mask: torch.Tensor | None = None,
        lora: Lora | None = None,
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {"past_key_values": cache, "use_cache": cache is not None, **(extra or {})}
        if mask is not None:  # as transformers takes it: int64 0/1 over the cached and new positions
            kwargs["attention_mask"] = mask.to(self.device, torch.int64)
        hidden = hidden.to(self.device)  # no copy when it is there already
        if prompts is not None:
            prompts = prompts.to(self.device)
        if positions is not None and "position_ids" in self.anatomy.owner_params:
            kwargs["position_ids"] = positions.to(self.device)
        dummy = hidden.new_zeros(*hidden.shape[:-1], self.anatomy.embed_dim)
        with self._lock:
            self._call = _Call(start, end, hidden, prompts)
            if lora is not None:
                self._lora.install(lora)
            self._lora.active = lora
            try:
                self.anatomy.owner(self.model)(inputs_embeds=dummy, **kwargs)
            except StopForward as stop:
                return stop.value
            finally:
                self._call = None
                self._lora.active = None
        raise RuntimeError("the model's forward returned before reaching the span's last block")

    def _dispatch(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        call = self._call
        if call is None or index < call.start:
            # before the span: the value is replaced at the first block, only its structure matters
            hidden = hidden_argument(args, kwargs)
            return (hidden, None) if self.tuple_output else hidden
        if index >= call.end:
            raise RuntimeError(f"block {index} runs after the span's last block")
        if index == call.start or call.prompts is not None:
            hidden = call.hidden if index == call.start else hidden_argument(args, kwargs)
            if call.prompts is not None:
                prompt = call.prompts[index - call.start]  # [batch or 1, pre_seq_len, hidden]
                length = prompt.shape[1]
                hidden = torch.cat([hidden[:, :length] + prompt, hidden[:, length:]], dim=1)
            args, kwargs = replace_hidden(args, kwargs, hidden)
        output = self.blocks[index](*args, **kwargs)
        if index == call.end - 1:
            raise StopForward(output[0] if isinstance(output, tuple) else output)
        return output

    def _check_span(self, start: int | None, end: int | None) -> tuple[int, int]:
        start = self.start if start is None else start
        end = self.end if end is None else end
        if not self.start <= start < end <= self.end:
            raise InvalidInputError(
                f"span [{start}, {end}) is not inside the hosted span [{self.start}, {self.end})"
            )
        return start, end
