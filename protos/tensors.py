"""`torch.Tensor` <-> `Tensor` wire message: dtype names, shapes, raw little-endian bytes, lossy casts.

The only code that knows byte layouts. Decoding validates every field before it allocates anything.
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


def to_message(t: torch.Tensor, *, dtype: torch.dtype | None = None) -> peer_pb2.Tensor:
    """Encode `t` as a `Tensor` message, optionally cast to the wire `dtype` first.

    A cast is allowed from a float dtype to a float wire dtype only (fp32 -> fp16/bf16 halves the
    bytes at a precision cost; fp16 overflows to inf beyond +-65504). The cast runs on `t`'s device,
    before the copy to CPU.
    """
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


def from_message(
    msg: peer_pb2.Tensor,
    *,
    max_bytes: int,
    expected_dtypes: Collection[torch.dtype] | None = None,
    expected_ndim: int | None = None,
    name: str = "tensor",
) -> torch.Tensor:
    """Decode a `Tensor` message into a tensor that owns its (writable) memory.

    Checks, before allocating: the dtype is a wire dtype (and in `expected_dtypes` when given), the
    number of dims is `expected_ndim` (or at most `MAX_NDIM`), no dim is negative, the claimed size
    is at most `max_bytes` and `data` holds exactly that many bytes. `name` prefixes every error.
    """
    dtype = WIRE_DTYPES.get(msg.dtype)
    if dtype is None:
        raise InvalidInputError(f"{name}: unknown dtype {msg.dtype!r}; expected one of {sorted(WIRE_DTYPES)}")
    if expected_dtypes is not None and dtype not in expected_dtypes:
        allowed = sorted(WIRE_DTYPE_NAMES[d] for d in expected_dtypes if d in WIRE_DTYPE_NAMES)
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
    data = msg.data  # each access is a fresh copy out of the message: read it once
    if len(data) != nbytes:
        raise InvalidInputError(
            f"{name}: shape {list(shape)} of {msg.dtype} needs {nbytes} bytes, but data holds {len(data)}"
        )
    try:
        if nbytes == 0:
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
        if msg.shape or msg.data:
            raise InvalidInputError(f"{name}: has shape or data but no dtype")
        return None
    return from_message(
        msg, max_bytes=max_bytes, expected_dtypes=expected_dtypes, expected_ndim=expected_ndim, name=name
    )
