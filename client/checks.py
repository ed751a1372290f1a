"""What the client accepts from a peer: a result of the expected shape and wire dtype with only finite
values, and a recomputation that agrees within the dtype's tolerance. Pure tensor checks; knows nothing
of routes, streams or bans (the caller turns a refusal into a failure of the peer that sent it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

# (rtol, atol) of a recomputation by another peer, per wire dtype: torch.testing's defaults
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
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


def agrees(computed: torch.Tensor, held: torch.Tensor) -> bool:
    """Whether a recomputation matches what the client holds, within the tolerance of `held`'s dtype."""
    if computed.shape != held.shape or computed.dtype != held.dtype:
        return False
    rtol, atol = TOLERANCES.get(held.dtype, (0.0, 0.0))
    return torch.allclose(computed, held, rtol=rtol, atol=atol)
