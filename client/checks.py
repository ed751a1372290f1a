"""What the client accepts from a peer: a result of the expected shape and wire dtype with only finite
values, and a recomputation that agrees within the dtype's tolerance. Pure tensor checks; knows nothing
of routes, streams or bans (the caller turns a refusal into a failure of the peer that sent it)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from protos.tensors import BLOCKWISE_INT8, INT8_BLOCK

# (rtol, atol) of a recomputation by another peer, per wire dtype: torch.testing's defaults. For blockwise
# int8 rtol is relative to the absmax of the element's block, not to the element: one quantization step
# (absmax / 127: float noise flipped a rounding) plus 1%. Measured: float32 outputs of the same hop's inputs
# by the cached and the stateless path (1e-6 apart) differ after quantization by at most 1.000 step (tiny
# Llama over 8 x 34 positions, SmolLM2-135M over 2 x 40). Outliers sent exactly (protos/tensors.py) still
# count in this absmax, so the bound is loose in their blocks; re-measured with them, SmolLM2's cached and
# full-sequence outputs of blocks 10, 20, 29 (2 x 40 positions) differ by at most 0.93 step.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
    BLOCKWISE_INT8: (1.01 / 127, 1e-5),
}

# Largest relative difference of one position's hidden state, ||computed - held|| / ||held||, that a spot
# check (client/verify.py) accepts, per dtype: a stateless Forward of a hop's whole cache is not the cached
# decode path bit for bit (other attention shapes and summation orders). Largest honest differences
# measured over 8-40 decode steps: float32 5e-7 (the tests' tiny random Llama), 3.7e-6 (SmolLM2-135M, 30
# blocks); float16 1.1e-3 (tiny); bfloat16 1e-2 (tiny), 1.6e-2 (SmolLM2). Elementwise tolerances do not
# work in 16 bits: honest bfloat16 SmolLM2 outputs differ by up to 38, and by 10% of an element plus 6.
# Hidden states off by 0.01 everywhere differ by 0.029 or more on the tiny model: caught in float32 and
# float16, not in bfloat16, and within noise on SmolLM2 (2e-4: its hidden states reach 2e4). Blockwise int8
# (both sides quantized, so only flipped roundings differ): honest 2.8e-3 (tiny, one step of a 64-value
# position), 5.9e-4 (SmolLM2 float32; 6.5e-4 with outliers sent exactly), 2.1e-2 (SmolLM2 bfloat16, under
# bfloat16's own tolerance); off by 0.01 and then quantized, 0.019 or more on the tiny model: caught.
SPOT_CHECK_TOLERANCES: dict[torch.dtype, float] = {
    torch.float32: 1e-3,
    torch.float16: 2e-2,
    torch.bfloat16: 1e-1,
    BLOCKWISE_INT8: 1e-2,
}


def result_problem(
    tensor: torch.Tensor, *, shape: Sequence[int], dtype: torch.dtype, finite: bool = True
) -> str | None:
    """Why `tensor` is not an acceptable result, or None: it must have `shape` and `dtype` and, with
    `finite`, only finite values."""
    if tuple(tensor.shape) != tuple(shape):
        return f"shape {list(tensor.shape)}, expected {list(shape)}"
    if tensor.dtype != dtype:
        return f"dtype {tensor.dtype}, expected {dtype}"
    if finite and not bool(torch.isfinite(tensor).all()):
        return "non-finite values"
    return None


def agrees(computed: torch.Tensor, held: torch.Tensor, *, wire_dtype: torch.dtype | None = None) -> bool:
    """Whether a recomputation matches what the client holds, within the tolerance of the wire dtype they
    came in (default: `held`'s dtype; both are float32 when it is `BLOCKWISE_INT8`)."""
    if computed.shape != held.shape or computed.dtype != held.dtype:
        return False
    wire_dtype = held.dtype if wire_dtype is None else wire_dtype
    rtol, atol = TOLERANCES.get(wire_dtype, (0.0, 0.0))
    if wire_dtype == BLOCKWISE_INT8:
        return bool(((computed - held).abs() <= atol + rtol * block_absmax(held)).all())
    return torch.allclose(computed, held, rtol=rtol, atol=atol)


def block_absmax(t: torch.Tensor) -> torch.Tensor:
    """The absmax of each element's int8 block (`INT8_BLOCK` consecutive values of flattened `t`), in
    `t`'s shape and as float32."""
    flat = t.detach().reshape(-1).float()
    num_blocks = -(-flat.numel() // INT8_BLOCK)
    blocks = torch.nn.functional.pad(flat, (0, num_blocks * INT8_BLOCK - flat.numel())).view(-1, INT8_BLOCK)
    return blocks.abs().amax(dim=1).repeat_interleave(INT8_BLOCK)[: flat.numel()].view(t.shape)


# Peers with quantized weights (`--quant int8`, used by clients with quant="any" or "int8"): a 10-block span
# of SmolLM2-135M in int8 differs from float32 on the same inputs by 6-7% per position on average and up to
# 46% (Shakespeare, spans 0:10, 10:20, 20:30). Replays and spot checks that may involve such a peer accept a
# position within this relative difference: garbage and large lies are caught, subtle ones are not.
QUANTIZED_TOLERANCE = 0.75


def spot_check_agrees(
    computed: torch.Tensor, held: torch.Tensor, *, dtypes: Iterable[torch.dtype], quantized: bool = False
) -> bool:
    """Whether another peer's recomputation [..., hidden] matches what the client holds: at every position,
    within the loosest spot-check tolerance of `dtypes` (the wire dtype and the dtypes both peers run in),
    or `QUANTIZED_TOLERANCE` when a peer involved has quantized weights."""
    if computed.shape != held.shape:
        return False
    tolerance = max(SPOT_CHECK_TOLERANCES[dtype] for dtype in dtypes)
    if quantized:
        tolerance = max(tolerance, QUANTIZED_TOLERANCE)
    held = held.float()
    difference = (computed.float() - held).norm(dim=-1)
    scale = held.norm(dim=-1).clamp_min(torch.finfo(torch.float32).tiny)
    return bool((difference <= tolerance * scale).all())
