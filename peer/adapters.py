"""LoRA on a peer's span: the adapters it serves (PEFT folders, only its own blocks' weights loaded) and a
client's own low-rank weights, carried by a Forward or Backward and checked here before anything is
allocated. Both are a `Lora`: (block, layer) -> (A, B, scaling), applied by forward hooks on the hosted
blocks' linear layers for the forward that names it, and differentiable (a Backward returns the gradients
of a client's A and B). Peers batch steps of the same adapter together, never of two."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peer.quant import Int8Linear
from protos import lora as lora_format
from protos import peer_pb2
from protos.errors import InvalidInputError
from protos.lora import Key, Layer
from protos.tensors import WIRE_DTYPES, from_message, to_message

logger = logging.getLogger(__name__)

MAX_ADAPTERS = 16  # what a record announces (`protos.records.MAX_ADAPTERS`)
MAX_SCALING = 1e4  # |scaling| of a client's module: alpha / rank is rarely above a few dozen
LORA_DTYPES = frozenset(WIRE_DTYPES[name] for name in ("float32", "float16", "bfloat16"))


@dataclass(frozen=True, eq=False)
class LoraWeights:
    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float


@dataclass(frozen=True, eq=False)
class Lora:
    """Low-rank updates for some layers of a span; `name` is the served adapter's ("" for a client's)."""

    modules: Mapping[Key, LoraWeights]
    name: str = ""

    def leaves(self) -> tuple[Lora, list[torch.Tensor]]:
        """A copy whose A and B are fresh autograd leaves, and those leaves in `modules` order (A, B, ...)."""
        modules, leaves = {}, []
        for key, w in self.modules.items():
            a, b = w.a.detach().clone().requires_grad_(True), w.b.detach().clone().requires_grad_(True)
            modules[key] = LoraWeights(a, b, w.scaling)
            leaves += [a, b]
        return Lora(modules, self.name), leaves


@dataclass
class LoraHooks:
    """Forward hooks on the hosted blocks' LoRA-able layers, installed on first use; `active` is the
    `Lora` of the running forward (set by the span under its forward lock), None: the base model."""

    blocks: nn.ModuleList
    active: Lora | None = None
    _installed: set[Key] = field(default_factory=set)

    def install(self, lora: Lora) -> None:
        for key in lora.modules:
            if key not in self._installed:
                block, path = key
                layer = self.blocks[block].get_submodule(path)
                layer.register_forward_hook(self._hook(key))
                self._installed.add(key)

    def _hook(self, key: Key) -> Any:
        def apply(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            lora = self.active
            weights = None if lora is None else lora.modules.get(key)
            if weights is None:
                return None
            x = args[0].to(weights.a.dtype)
            delta = nn.functional.linear(nn.functional.linear(x, weights.a), weights.b) * weights.scaling
            return output + delta.to(output.dtype)

        return apply


def span_layers(blocks: nn.ModuleList, start: int, end: int) -> dict[Key, Layer]:
    """Every layer of blocks [start, end) a LoRA may target: (block, path) -> (in, out)."""
    return {
        (index, path): shape
        for index in range(start, end)
        for path, shape in lora_format.lora_layers(blocks[index], (Int8Linear,)).items()
    }


def parse_adapter_spec(spec: str) -> tuple[str, Path]:
    """`NAME=DIR` or `DIR` (named after the folder), as `corolla serve --adapters` takes them."""
    name, sep, folder = spec.partition("=")
    path = Path(folder if sep else spec).expanduser()
    name = name if sep else path.resolve().name
    if not name or len(name) > 128 or not all(c.isalnum() or c in "._+/-" for c in name):
        raise InvalidInputError(f"adapter name {name!r}: use 1..128 of letters, digits and ._+/-")
    return name, path


def load_adapter(
    spec: str,
    *,
    layers_path: str,
    layers: Mapping[Key, Layer],
    start: int,
    end: int,
    dtype: torch.dtype,
    device: torch.device,
) -> Lora:
    """The served adapter `spec` (`parse_adapter_spec`) for blocks [start, end): its PEFT config and only
    those blocks' weights, checked against the hosted layers, in the span's dtype and device."""
    name, folder = parse_adapter_spec(spec)
    config = lora_format.load_config(folder)
    modules = {}
    for key, (a, b) in lora_format.read_weights(folder, layers_path, blocks=range(start, end)).items():
        rank, scaling = lora_format.rank_and_scaling(config, layers_path, *key)
        _check_shapes(key, tuple(a.shape), tuple(b.shape), layers, max_rank=None, rank=rank)
        modules[key] = LoraWeights(a.to(device, dtype), b.to(device, dtype), scaling)
    logger.info("adapter loaded name=%s blocks=[%d,%d) modules=%d", name, start, end, len(modules))
    return Lora(modules, name)


def parse_lora(
    messages: Sequence[peer_pb2.LoraModule],
    *,
    start: int,
    end: int,
    layers: Mapping[Key, Layer],
    max_rank: int,
    max_bytes: int,
) -> Lora | None:
    """A client's own LoRA for blocks [start, end) from a request, every field checked (count, block,
    layer, rank, shapes from the declared sizes, dtype, finite values and scaling) before its tensors are
    decoded; None when the request carries none."""
    if not messages:
        return None
    wanted = sum(1 for block, _ in layers if start <= block < end)
    if len(messages) > wanted:
        raise InvalidInputError(
            f"lora: {len(messages)} modules for blocks [{start}, {end}) of {wanted} layers"
        )
    modules: dict[Key, LoraWeights] = {}
    total = 0
    for message in messages:
        key = (message.block, message.module)
        if not start <= message.block < end:
            raise InvalidInputError(f"lora: block {message.block} is outside the request's [{start}, {end})")
        if key not in layers:
            raise InvalidInputError(f"lora: block {message.block} has no layer {message.module[:128]!r}")
        if key in modules:
            raise InvalidInputError(f"lora: block {message.block} {message.module} appears twice")
        if not (math.isfinite(message.scaling) and abs(message.scaling) <= MAX_SCALING):
            raise InvalidInputError(
                f"lora: scaling of block {message.block} {message.module} is not finite or above "
                f"{MAX_SCALING:g} in magnitude"
            )
        if message.lora_a.dtype != message.lora_b.dtype:
            raise InvalidInputError(f"lora: lora_a and lora_b of block {message.block} differ in dtype")
        shapes = tuple(message.lora_a.shape), tuple(message.lora_b.shape)
        _check_shapes(key, *shapes, layers, max_rank=max_rank)
        a = from_message(message.lora_a, max_bytes=max_bytes, expected_dtypes=LORA_DTYPES, name="lora_a")
        b = from_message(message.lora_b, max_bytes=max_bytes, expected_dtypes=LORA_DTYPES, name="lora_b")
        total += a.nbytes + b.nbytes
        if total > max_bytes:
            raise InvalidInputError(f"lora: more than {max_bytes} bytes of weights")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidInputError(f"lora: block {message.block} {message.module} has non-finite weights")
        modules[key] = LoraWeights(a, b, float(message.scaling))
    return Lora(modules)


def _check_shapes(
    key: Key,
    a: tuple[int, ...],
    b: tuple[int, ...],
    layers: Mapping[Key, Layer],
    *,
    max_rank: int | None,
    rank: int | None = None,
) -> None:
    block, path = key
    if key not in layers:
        raise InvalidInputError(f"lora: block {block} has no linear layer {path!r}")
    in_features, out_features = layers[key]
    if len(a) != 2 or len(b) != 2 or a[0] != b[1] or a[1] != in_features or b[0] != out_features:
        raise InvalidInputError(
            f"lora: block {block} {path} takes lora_a [rank, {in_features}] and lora_b "
            f"[{out_features}, rank], got {list(a)} and {list(b)}"
        )
    if a[0] < 1 or (max_rank is not None and a[0] > max_rank):
        raise InvalidInputError(f"lora: rank {a[0]} of block {block} {path} is outside 1..{max_rank}")
    if rank is not None and a[0] != rank:
        raise InvalidInputError(f"lora: block {block} {path} has rank {a[0]}, its config says {rank}")


def gradient_messages(lora: Lora, grads: Sequence[torch.Tensor | None]) -> list[peer_pb2.LoraModule]:
    """Backward's `grad_lora`: one entry per module of `lora` (its order), the gradients of A and B in their
    dtype (zeros for a layer the forward never reached)."""
    messages = []
    for index, ((block, module), weights) in enumerate(lora.modules.items()):
        grad_a = torch.zeros_like(weights.a) if grads[2 * index] is None else grads[2 * index]
        grad_b = torch.zeros_like(weights.b) if grads[2 * index + 1] is None else grads[2 * index + 1]
        messages.append(
            peer_pb2.LoraModule(
                block=block,
                module=module,
                lora_a=to_message(grad_a.to(weights.a.dtype)),  # type: ignore[union-attr]
                lora_b=to_message(grad_b.to(weights.b.dtype)),  # type: ignore[union-attr]
            )
        )
    return messages
