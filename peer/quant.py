"""Quantized spans (`corolla serve --quant int8`): every `nn.Linear` inside the hosted blocks becomes an
`Int8Linear`, which keeps its weight as int8 with one scale per output channel (a decode step is bound by
reading weights: it reads 1 byte per weight instead of 4) and computes through torch's dynamic-quantization
kernel (fbgemm / x86). Embeddings, norms, the LM head (never
on a peer) and fused expert tensors (Mixtral's 3D parameters are not `nn.Linear`) stay as loaded.

Outputs differ from the float32 model: the quality is measured (`bench/quality.py`, `tests/test_quant.py`),
and the mode is announced in the peer's record so that a client can require unquantized routes.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from peer.config import QUANT_MODES
from protos.errors import InvalidInputError

logger = logging.getLogger(__name__)


OUTLIER_THRESHOLD = 3.0  # |input| above which a channel is computed in float (measured on SmolLM2-135M)


class _Int8Function(torch.autograd.Function):
    """The quantized product forward; the input gradient through the dequantized weight backward (the
    weights stay frozen: peers compute gradients of inputs only)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, layer: Int8Linear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return layer.product(hidden)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        layer = ctx.layer
        weight = layer.columns.float() * layer.scales  # [in, out], built for this backward only
        return grad @ weight.T.to(grad.dtype), None


class Int8Linear(nn.Module):
    """An `nn.Linear` with an int8 weight (symmetric, one scale per output channel) and a float bias.

    The product follows LLM.int8() on torch's CPU kernel: input channels holding a value beyond
    `OUTLIER_THRESHOLD` (the few "massive activation" channels of LLMs) are multiplied in float with their
    dequantized weight columns; the rest goes through the int8 kernel, each row (token) scaled to one range
    first, so that the kernel's per-tensor activation quantization acts per token. Without both, SmolLM2's
    perplexity nearly triples; with them it rises by about 1%. The int8 weight is held twice: packed for the
    kernel and by input channel for the outlier columns and the backward (2 bytes per weight in all, against
    4 in float32).
    """

    columns: torch.Tensor
    scales: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
        from torch.ao.quantization import per_channel_dynamic_qconfig

        self.in_features, self.out_features = linear.in_features, linear.out_features
        source = nn.Linear(self.in_features, self.out_features, bias=False)
        source.weight = nn.Parameter(linear.weight.detach().float(), requires_grad=False)
        source.qconfig = per_channel_dynamic_qconfig  # type: ignore[assignment]
        with warnings.catch_warnings():  # torch 2.13 warns that eager-mode quantization moves to torchao
            warnings.simplefilter("ignore")
            self.quantized: nn.Module = DynamicLinear.from_float(source)
        weight = self.quantized.weight()  # type: ignore[operator]
        self.register_buffer("columns", weight.int_repr().T.contiguous())  # [in, out] int8
        self.register_buffer("scales", weight.q_per_channel_scales().float())  # [out]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and hidden.requires_grad:
            return _Int8Function.apply(hidden, self)
        return self.product(hidden)

    def product(self, hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, self.in_features)
        outliers = (flat.abs() > OUTLIER_THRESHOLD).any(0).nonzero().squeeze(1)
        exact = None
        if outliers.numel():
            weights = self.columns.index_select(0, outliers).float() * self.scales  # [k, out]
            exact = hidden.index_select(-1, outliers) @ weights
            hidden = hidden.index_fill(-1, outliers, 0.0)
        rows = hidden.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
        output = self.quantized(hidden / rows) * rows
        if exact is not None:
            output = output + exact
        return output if self.bias is None else output + self.bias

    def packed_bytes(self) -> int:
        """Bytes of the kernel's packed weight and scales, which no parameter or buffer shows."""
        return self.columns.numel() + self.scales.numel() * 4

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def check_quant(mode: str, *, dtype: torch.dtype, device: torch.device) -> None:
    """`InvalidInputError` unless `mode` can run in `dtype` on `device`."""
    if mode not in QUANT_MODES:
        raise InvalidInputError(f"unknown quantization {mode!r}; expected one of {', '.join(QUANT_MODES)}")
    if mode == "int8" and (device.type != "cpu" or dtype != torch.float32):
        raise InvalidInputError(
            f"--quant int8 runs on the CPU in float32 (torch's int8 kernels); got {device.type} {dtype}"
        )


def quantize_blocks(blocks: list[nn.Module], mode: str) -> int:
    """Replace the `nn.Linear` modules inside `blocks` in place; returns how many were replaced."""
    if mode == "none":
        return 0
    replaced = 0
    for block in blocks:
        targets = [(name, module) for name, module in block.named_modules() if type(module) is nn.Linear]
        for name, module in targets:
            parent_name, _, child = name.rpartition(".")
            parent = block.get_submodule(parent_name) if parent_name else block
            setattr(parent, child, Int8Linear(module))
            replaced += 1
    logger.debug("quantized linear layers=%d mode=%s", replaced, mode)
    return replaced
