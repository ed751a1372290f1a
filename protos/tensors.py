"""`torch.Tensor` <-> `Tensor` wire message: dtype names, shapes, raw little-endian bytes, lossy casts and
the blockwise int8 format of hidden states. The only code that knows byte layouts. Decoding validates
every field before it allocates anything.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping
from types import MappingProxyType

import torch

from protos import peer_pb2
from protos.errors import InvalidInputError

if (
    sys.byteorder != "little"
):  # raw bytes are sent as laid out in memory; every supported host is little-endian
    raise ImportError("corolla's tensor wire format needs a little-endian host")

WIRE_DTYPES: Mapping[str, torch.dtype] = MappingProxyType(
    {
        "float32": torch.float32,
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "int64": torch.int64,
        "int32": torch.int32,
    }
)
WIRE_DTYPE_NAMES: Mapping[torch.dtype, str] = MappingProxyType({v: k for k, v in WIRE_DTYPES.items()})

FLOAT_DTYPE_NAMES = ("float32", "float16", "bfloat16")  # dtypes of weights and hidden states
FLOAT_DTYPES: frozenset[torch.dtype] = frozenset(WIRE_DTYPES[name] for name in FLOAT_DTYPE_NAMES)
INDEX_DTYPES: frozenset[torch.dtype] = frozenset({torch.int64})
MAX_NDIM = 8

# numpy has no bfloat16: raw bytes go through an integer view of the same width
_BYTES_VIEW: Mapping[torch.dtype, torch.dtype] = MappingProxyType({torch.bfloat16: torch.int16})

# Blockwise int8: a float tensor as int8 values plus one float32 scale (absmax / 127) per block of
# INT8_BLOCK consecutive values of the flattened tensor, decoded to float32; and per row (the last dim) of
# n values its n // INT8_OUTLIER_SPACING largest magnitudes sent exactly (int32 index + float32 value) and
# as 0 in their blocks, so that a "massive activation" does not set its block's scale. About 1.3 bytes per
# value. Where a wire dtype is passed around (a session's, `to_message(dtype=...)`), torch.int8 stands for it.
# Measured on SmolLM2-135M, hidden states round-tripped at a 3-peer route's 4 boundaries (entering blocks 0,
# 10, 20, leaving 29), 8 x 128 tokens of the-tempest: perplexity against float32's 72.127, mean KL(float32 ||
# wire) of next-token distributions, greedy 32-token continuations of 6 prompts equal to float32's, and bytes
# of a [1, 1, 576] hidden state in a Step (float32: 2325):
#   float16 +0.003% KL 8.3e-7 6/6 1173 B; bfloat16 -0.008% KL 5.0e-5 4/6 1174 B
#   int8, no outliers  -0.71%  KL 5.7e-3  1/6  634 B (channels 507 and 247 reach 30-400x a row's rms)
#   int8, n // 32      +0.04%  KL 1.4e-4  6/6  782 B (n // 64: KL 2.1e-4, 710 B; n // 16: 9.2e-5, 926 B)
# Perplexity moves within noise (int8 without outliers came out 0.7% *below* float32); KL tracks the error
# (2 outliers a row: 6.1e-4, 8: 2.2e-4).
INT8 = "int8"
BLOCKWISE_INT8 = torch.int8
INT8_BLOCK = 64
INT8_OUTLIER_SPACING = 32  # a row of n values sends up to n // 32 outliers; rows of < 32 values none
MAX_INT8_NUMEL = 2**31 - 1  # outlier indices are int32
MIN_SCALE, MAX_SCALE = 2.0**-120, 2.0**120  # a block with a smaller absmax / 127 is sent as zeros
WIRE_FORMAT_NAMES = (*FLOAT_DTYPE_NAMES, INT8)  # what hidden states may travel as
HIDDEN_WIRE_DTYPES: frozenset[torch.dtype] = FLOAT_DTYPES | {BLOCKWISE_INT8}  # a float may arrive as these


def dtype_from_name(name: str) -> torch.dtype:
    """The torch dtype of a wire dtype name; `InvalidInputError` for a name not on the wire."""
    dtype = WIRE_DTYPES.get(name)
    if dtype is None:
        raise InvalidInputError(f"unknown dtype {name!r}; expected one of {sorted(WIRE_DTYPES)}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    """The wire name of a torch dtype; `InvalidInputError` for a dtype the wire does not carry."""
    name = WIRE_DTYPE_NAMES.get(dtype)
    if name is None:
        raise InvalidInputError(f"dtype {dtype} cannot be sent; expected one of {sorted(WIRE_DTYPES)}")
    return name


def wire_dtype_from_name(name: str) -> torch.dtype:
    """The wire dtype of a name of `WIRE_FORMAT_NAMES`: a float dtype, or `BLOCKWISE_INT8` for "int8"."""
    if name == INT8:
        return BLOCKWISE_INT8
    if name not in FLOAT_DTYPE_NAMES:
        raise InvalidInputError(f"unknown wire dtype {name!r}; expected one of {list(WIRE_FORMAT_NAMES)}")
    return WIRE_DTYPES[name]


def decoded_dtype(wire_dtype: torch.dtype) -> torch.dtype:
    """The dtype a tensor sent as `wire_dtype` decodes to: float32 for blockwise int8, else itself."""
    return torch.float32 if wire_dtype == BLOCKWISE_INT8 else wire_dtype


def wire_dtype_of(msg: peer_pb2.Tensor) -> torch.dtype:
    """The wire dtype `msg` travelled as (`BLOCKWISE_INT8` for "int8"); for a message `from_message` took."""
    return BLOCKWISE_INT8 if msg.dtype == INT8 else dtype_from_name(msg.dtype)


def to_message(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> peer_pb2.Tensor:
    """Encode `t` as a `Tensor` message, optionally cast to the wire `dtype` first.

    A cast is allowed from a float dtype to a float wire dtype only (fp32 -> fp16/bf16 halves the
    bytes at a precision cost; fp16 overflows to inf beyond +-65504). The cast runs on `t`'s device,
    before the copy to CPU. `dtype=BLOCKWISE_INT8` sends a float tensor as blockwise int8 (see
    `_int8_message`); it refuses non-finite values.
    """
    if dtype == BLOCKWISE_INT8:
        if not t.dtype.is_floating_point:
            raise InvalidInputError(f"cannot send a {t.dtype} tensor as int8: only floats are quantized")
        return _int8_message(t)
    if dtype is not None and dtype != t.dtype:
        if not t.dtype.is_floating_point or dtype not in FLOAT_DTYPES:
            raise InvalidInputError(
                f"cannot send a {t.dtype} tensor as {dtype}: only float casts are allowed"
            )
        t = t.to(dtype)
    name = dtype_name(t.dtype)
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    view = t.view(_BYTES_VIEW.get(t.dtype, t.dtype))
    # tobytes(order="C") makes the single copy and lays out non-contiguous tensors row-major
    data = view.resolve_conj().resolve_neg().numpy().tobytes(order="C")
    return peer_pb2.Tensor(dtype=name, shape=list(t.shape), data=data)


def int8_outlier_limit(shape: tuple[int, ...]) -> int:
    """The most outliers a blockwise int8 tensor of `shape` carries: n // 32 per row of n values."""
    row = shape[-1] if shape else 1
    return math.prod(shape) // row * (row // INT8_OUTLIER_SPACING) if row else 0


def _int8_message(t: torch.Tensor) -> peer_pb2.Tensor:
    """`t` as blockwise int8. Outliers: in each row of n values, those whose magnitude is above the
    (n // 32 + 1)-th largest (ties at that magnitude stay in the blocks, so at most n // 32), sent exactly
    and as 0 in the blocks. Then per block of `INT8_BLOCK` values, scale = absmax / 127 (one float32 ulp
    less where 127 * scale would exceed absmax) and value = round(x / scale), so |x - value * scale| <=
    scale / 2 and no value decodes above its block's absmax. Deterministic (IEEE division and rounding), on
    `t`'s device.

    A decoded tensor encodes to the very same bytes again, so a replayed hidden state reaches a peer bit for
    bit as the previous hop pushed it: the outliers come back exactly and every other value decodes to at
    most the (n // 32 + 1)-th magnitude, which the values equal to it give back, so the same outliers are
    picked; a block's absmax a decodes to a' = 127 * scale(a) <= a with scale(a') == scale(a) (both checked
    over every float32 a)."""
    flat = t.detach().reshape(-1).float()
    numel, row = flat.numel(), (t.shape[-1] if t.dim() else 1)
    if numel > MAX_INT8_NUMEL:
        raise InvalidInputError(f"cannot send {numel} values as int8: at most {MAX_INT8_NUMEL}")
    per_row = row // INT8_OUTLIER_SPACING
    index = torch.zeros(0, dtype=torch.int64, device=flat.device)
    if per_row and numel:
        magnitudes = flat.abs().view(-1, row)
        # the (per_row + 1)-th largest of a row; a NaN compares False and stays for absmax to catch
        bound = magnitudes.topk(per_row + 1, dim=1).values[:, -1:]
        index = (magnitudes > bound).view(-1).nonzero().view(-1)  # ascending
        outliers = flat[index]
        flat = flat.index_fill(0, index, 0.0)
    else:
        outliers = flat[:0]
    num_blocks = -(-numel // INT8_BLOCK)
    blocks = torch.nn.functional.pad(flat, (0, num_blocks * INT8_BLOCK - numel)).view(num_blocks, INT8_BLOCK)
    absmax = blocks.abs().amax(dim=1)  # [num_blocks]; NaN propagates
    if not (bool(torch.isfinite(absmax).all()) and bool(torch.isfinite(outliers).all())):
        raise InvalidInputError("cannot send non-finite values as int8")
    scales = absmax / 127
    scales = torch.where(scales * 127 > absmax, torch.nextafter(scales, torch.zeros_like(scales)), scales)
    scales = torch.where(scales < MIN_SCALE, 0.0, scales)
    if bool((scales > MAX_SCALE).any()):
        raise InvalidInputError(f"cannot send values beyond +-{127 * MAX_SCALE:.3g} as int8")
    divisor = torch.where(scales > 0, scales, 1.0)[:, None]
    values = torch.where(scales[:, None] > 0, blocks / divisor, 0.0).round_().clamp_(-127, 127)
    return peer_pb2.Tensor(
        dtype=INT8,
        shape=list(t.shape),
        data=values.to(torch.int8).reshape(-1)[:numel].cpu().numpy().tobytes(),
        scales=scales.cpu().numpy().tobytes(),
        block=INT8_BLOCK,
        outlier_index=index.to(torch.int32).cpu().numpy().tobytes(),
        outlier_values=outliers.cpu().numpy().tobytes(),
    )


def from_message(
    msg: peer_pb2.Tensor,
    *,
    max_bytes: int,
    expected_dtypes: Collection[torch.dtype] | None = None,
    expected_ndim: int | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode a `Tensor` message into a tensor that owns its (writable) memory.

    Checks, before allocating: the dtype is a wire dtype (and in `expected_dtypes` when given; "int8" is
    accepted only where `BLOCKWISE_INT8` is), the number of dims is `expected_ndim` (or at most
    `MAX_NDIM`), no dim is negative, the decoded size is at most `max_bytes` (float32 for "int8") and
    `data` (and `scales`) hold exactly that many values; for "int8" also the scales, the outliers' number
    (`int8_outlier_limit`), indices and values. `name` prefixes every error.
    """
    int8 = msg.dtype == INT8
    dtype = torch.float32 if int8 else WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        known = sorted([*WIRE_DTYPES, INT8])
        raise InvalidInputError(f"{name}: unknown dtype {msg.dtype!r}; expected one of {known}")
    wire_dtype = BLOCKWISE_INT8 if int8 else dtype
    if expected_dtypes is not None and wire_dtype not in expected_dtypes:
        names = {**WIRE_DTYPE_NAMES, BLOCKWISE_INT8: INT8}
        allowed = sorted(names[d] for d in expected_dtypes if d in names)
        raise InvalidInputError(f"{name}: dtype {msg.dtype!r} not allowed here; expected one of {allowed}")
    if expected_ndim is not None and len(msg.shape) != expected_ndim:  # len() first: O(1), copies nothing
        raise InvalidInputError(f"{name}: expected {expected_ndim} dims, got {len(msg.shape)}")
    if len(msg.shape) > MAX_NDIM:
        raise InvalidInputError(f"{name}: {len(msg.shape)} dims is more than the maximum of {MAX_NDIM}")
    shape = tuple(msg.shape)
    if any(dim < 0 for dim in shape):
        raise InvalidInputError(f"{name}: negative dim in shape {list(shape)}")
    itemsize = dtype.itemsize
    nbytes = math.prod(shape) * itemsize  # Python ints: no overflow for any claimed shape
    # a zero-element shape still has strides: its other dims are held to the same size limit
    if nbytes > max_bytes or math.prod(max(dim, 1) for dim in shape) * itemsize > max_bytes:
        raise InvalidInputError(
            f"{name}: shape {list(shape)} of {msg.dtype} is more than the limit of {max_bytes} bytes"
        )
    if int8:
        return _from_int8(msg, shape, name)
    if msg.block or msg.scales or msg.outlier_index or msg.outlier_values:
        raise InvalidInputError(
            f"{name}: block, scales and outliers are for dtype 'int8' only, not {msg.dtype!r}"
        )
    data = msg.data  # each access is a fresh copy out of the message: read it once
    if len(data) != nbytes:
        raise InvalidInputError(
            f"{name}: shape {list(shape)} of {msg.dtype} needs {nbytes} bytes, but data holds {len(data)}"
        )
    return _from_buffer(data, shape, dtype, name)


def _from_buffer(data: bytes, shape: tuple[int, ...], dtype: torch.dtype, name: str) -> torch.Tensor:
    try:
        if not data:
            return torch.empty(shape, dtype=dtype)
        # bytearray is the one copy: a writable buffer the tensor keeps alive after the message is gone
        return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
    except (
        RuntimeError,
        ValueError,
        TypeError,
        OverflowError,
    ) as e:  # whatever torch makes of a hostile shape
        raise InvalidInputError(f"{name}: cannot decode shape {list(shape)}: {type(e).__name__}") from None


def _from_int8(msg: peer_pb2.Tensor, shape: tuple[int, ...], name: str) -> torch.Tensor:
    """The float32 tensor of a blockwise int8 message whose dtype, shape and decoded size are checked."""
    if msg.block != INT8_BLOCK:
        raise InvalidInputError(f"{name}: int8 block of {msg.block} values; only {INT8_BLOCK} is allowed")
    numel = math.prod(shape)
    num_blocks = -(-numel // INT8_BLOCK)
    data, scale_bytes = msg.data, msg.scales  # each read once: every access is a fresh copy
    if len(data) != numel:
        raise InvalidInputError(
            f"{name}: shape {list(shape)} of int8 needs {numel} bytes, but data holds {len(data)}"
        )
    if len(scale_bytes) != 4 * num_blocks:
        raise InvalidInputError(
            f"{name}: {num_blocks} blocks of int8 need {4 * num_blocks} bytes of scales, "
            f"but scales hold {len(scale_bytes)}"
        )
    index_bytes, outlier_bytes = msg.outlier_index, msg.outlier_values
    count, limit = len(index_bytes) // 4, int8_outlier_limit(shape)
    if len(index_bytes) % 4 or len(outlier_bytes) != len(index_bytes):
        raise InvalidInputError(
            f"{name}: outlier_index holds {len(index_bytes)} bytes and outlier_values "
            f"{len(outlier_bytes)}: each outlier needs 4 bytes in both"
        )
    if count > limit:
        raise InvalidInputError(
            f"{name}: {count} outliers is more than the limit of {limit} for shape {list(shape)} "
            f"(n // {INT8_OUTLIER_SPACING} per row of n values)"
        )
    scales = _from_buffer(scale_bytes, (num_blocks,), torch.float32, name)
    valid = (scales == 0) | ((scales >= MIN_SCALE) & (scales <= MAX_SCALE))  # False for NaN
    if not bool(valid.all()):
        block = int((~valid).nonzero()[0, 0])
        raise InvalidInputError(
            f"{name}: scale {float(scales[block])!r} of block {block} is neither 0 nor in [2**-120, 2**120]"
        )
    if not numel:  # no outliers either: their limit is 0
        return _from_buffer(b"", shape, torch.float32, name)  # torch.empty refuses what no view could hold
    index = _from_buffer(index_bytes, (count,), torch.int32, name).long()
    if count and not (index[0] >= 0 and index[-1] < numel):
        raise InvalidInputError(f"{name}: outlier index out of range [0, {numel})")
    if not bool((index[1:] > index[:-1]).all()):
        raise InvalidInputError(f"{name}: outlier indices are not strictly increasing")
    outliers = _from_buffer(outlier_bytes, (count,), torch.float32, name)
    if not bool(torch.isfinite(outliers).all()):
        raise InvalidInputError(f"{name}: outlier values must be finite")
    values = _from_buffer(data, (numel,), torch.int8, name)
    if int(values.min()) < -127:
        raise InvalidInputError(f"{name}: int8 value -128 is outside -127..127")
    out = values.to(torch.float32)
    full = numel - numel % INT8_BLOCK
    out[:full].view(-1, INT8_BLOCK).mul_(scales[: full // INT8_BLOCK, None])
    out[full:].mul_(scales[-1:])  # the last, partial block (empty when numel is a multiple of the block)
    out[index] = outliers
    return out.view(shape)  # numel and every dim's size were checked by the caller


def optional_from_message(
    msg: peer_pb2.Tensor,
    *,
    max_bytes: int,
    expected_dtypes: Collection[torch.dtype] | None = None,
    expected_ndim: int | None = None,
    name: str = "tensor",
) -> torch.Tensor | None:
    """`from_message` for an optional field: an unset or empty message (no dtype) decodes to None."""
    if not msg.dtype:
        if msg.shape or msg.data or msg.scales or msg.block or msg.outlier_index or msg.outlier_values:
            raise InvalidInputError(f"{name}: has shape or data but no dtype")
        return None
    return from_message(
        msg, max_bytes=max_bytes, expected_dtypes=expected_dtypes, expected_ndim=expected_ndim, name=name
    )
