"""Where a peer computes (`corolla serve --device auto|cpu|cuda[:N]|mps`), in which dtype by default
(float32 on the CPU, the exact path; bfloat16 on a CUDA GPU that supports it, float16 on other
accelerators), and how many blocks fit its memory (`--num-blocks auto`, from the config alone)."""

from __future__ import annotations

import logging
import os
import platform
import re
from dataclasses import dataclass

import psutil
import torch
from torch import nn

from peer.config import DEVICE_PATTERN
from protos.checkpoint import build_skeleton, load_config, resolve_model_path
from protos.errors import InvalidInputError
from protos.partition import locate

logger = logging.getLogger(__name__)

GIB = 2**30
# Petals' estimate of a forward's and backward's activations: 2 GiB for BLOOM-176B's hidden size of 14336,
# proportional for others; never under MIN_RESERVE_BYTES (the allocator's slack, temporary copies at load)
ACTIVATION_BYTES_PER_HIDDEN = 2 * GIB / 14336
MIN_RESERVE_BYTES = GIB // 2
INT8_BYTES_PER_WEIGHT = 2  # peer.quant.Int8Linear keeps its int8 weight twice (packed and by column)


def resolve_device(name: str) -> torch.device:
    """The torch device of a `--device` value; `InvalidInputError` for one this machine does not have."""
    if not re.match(DEVICE_PATTERN, name):
        raise InvalidInputError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {name}: this torch build or machine has no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("--device mps: Apple's Metal backend is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name of a `--dtype` value; `auto` is float32 on the CPU and 16-bit on an accelerator."""
    if name != "auto":
        return name
    if device.type == "cpu":
        return "float32"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float16"


def device_name(device: torch.device) -> str:
    """What a throughput measurement depends on besides the model: the device and, on the CPU, threads."""
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device).replace(' ', '_')}"
    if device.type == "cpu":
        return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on an accelerator would measure only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass(frozen=True)
class BlockMemory:
    """What serving one more block costs, and what the peer needs once whatever it serves."""

    weight_bytes: int  # the largest block's weights and buffers, as the peer holds them
    cache_bytes: int  # one block's K/V for the whole cache pool (--max-cache-tokens)
    reserve_bytes: int  # activations and slack, once


def free_memory_bytes(device: torch.device) -> int:
    """Memory `device` can still give: free GPU memory, or on the CPU the RAM available to new processes."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory())
    return int(psutil.virtual_memory().available)


def block_memory(
    model: str | os.PathLike[str], *, dtype: torch.dtype, quant: str, cache_tokens: int
) -> BlockMemory:
    """A block's bytes in `dtype` (int8 linear layers with `quant`), its cache and the reserve, from the
    model's config on the meta device: no weight is read."""
    config = load_config(resolve_model_path(model))
    skeleton = build_skeleton(config, dtype)
    anatomy = locate(skeleton)
    weights = max(_block_bytes(block, dtype=dtype, quant=quant) for block in anatomy.blocks(skeleton))
    text = config.get_text_config(decoder=True)
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    itemsize = torch.empty((), dtype=dtype).element_size()
    cache = 2 * kv_heads * head_dim * itemsize * cache_tokens  # K and V
    reserve = max(int(ACTIVATION_BYTES_PER_HIDDEN * anatomy.hidden_size), MIN_RESERVE_BYTES)
    return BlockMemory(weight_bytes=weights, cache_bytes=cache, reserve_bytes=reserve)


def _block_bytes(block: nn.Module, *, dtype: torch.dtype, quant: str) -> int:
    itemsize = torch.empty((), dtype=dtype).element_size()
    total = sum(t.numel() for t in block.parameters()) * itemsize
    total += sum(b.numel() * b.element_size() for b in block.buffers())
    if quant == "int8":  # each nn.Linear's weight becomes int8 plus a float32 scale per output channel
        for linear in (m for m in block.modules() if type(m) is nn.Linear):
            total -= linear.weight.numel() * itemsize
            total += linear.weight.numel() * INT8_BYTES_PER_WEIGHT + linear.out_features * 4
    return total


def auto_num_blocks(free_bytes: int, memory: BlockMemory, *, num_blocks: int) -> int:
    """How many blocks (at most the model's `num_blocks`) fit in `free_bytes`: the reserve first, then each
    block with its cache. `InvalidInputError` when not even one does."""
    per_block = memory.weight_bytes + memory.cache_bytes
    fits = (free_bytes - memory.reserve_bytes) // per_block
    if fits < 1:
        raise InvalidInputError(
            f"--num-blocks auto: not even one block fits: {free_bytes / GIB:.2f} GiB free, one block needs "
            f"{per_block / GIB:.2f} GiB (weights and cache) beyond a reserve of "
            f"{memory.reserve_bytes / GIB:.2f} GiB; lower --max-cache-tokens or pick a smaller dtype"
        )
    return min(int(fits), num_blocks)
