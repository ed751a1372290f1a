"""Wire layer: tensor codec round trips and rejections, generated code freshness."""

from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch

from protos import codegen, peer_pb2
from protos.errors import InvalidInputError
from protos.tensors import (
    FLOAT_DTYPES,
    INDEX_DTYPES,
    MAX_NDIM,
    WIRE_DTYPE_NAMES,
    WIRE_DTYPES,
    dtype_from_name,
    dtype_name,
    from_message,
    optional_from_message,
    to_message,
)

MAX_BYTES = 1 << 20
SHAPES = [(), (0,), (3,), (2, 3), (2, 0, 4), (1, 5, 7), (2, 3, 4, 5)]


def _sample(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(shape, generator=gen).to(dtype)
    return torch.randint(-(2**30), 2**30, shape, generator=gen, dtype=dtype)


def test_wire_dtypes_are_a_bijection() -> None:
    assert set(WIRE_DTYPES) == {"float32", "float16", "bfloat16", "int64", "int32"}
    for name, dtype in WIRE_DTYPES.items():
        assert WIRE_DTYPE_NAMES[dtype] == name
        assert dtype_from_name(name) is dtype
        assert dtype_name(dtype) == name
    with pytest.raises(InvalidInputError, match="float64"):
        dtype_name(torch.float64)
    with pytest.raises(InvalidInputError, match="unknown dtype 'int8'"):
        dtype_from_name("int8")


@pytest.mark.parametrize("dtype", list(WIRE_DTYPES.values()), ids=list(WIRE_DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_is_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    t = _sample(shape, dtype)
    msg = to_message(t)
    assert msg.dtype == WIRE_DTYPE_NAMES[dtype]
    assert tuple(msg.shape) == shape
    assert len(msg.data) == t.numel() * dtype.itemsize  # bf16 and fp16: 2 bytes per value, not widened
    out = from_message(peer_pb2.Tensor.FromString(msg.SerializeToString()), max_bytes=MAX_BYTES)
    assert out.dtype == dtype and out.shape == shape
    assert torch.equal(out, t)


def test_bfloat16_is_bit_exact_including_special_values() -> None:
    bits = torch.tensor([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC1, 0x0001, 0x3F80, 0xC2F7], dtype=torch.int32)
    t = bits.to(torch.int16).view(torch.bfloat16)  # +0, -0, inf, -inf, a NaN payload, a subnormal, 1.0, ...
    msg = to_message(t)
    assert len(msg.data) == 2 * t.numel()
    assert msg.data[:4] == b"\x00\x00\x00\x80"  # little-endian
    out = from_message(msg, max_bytes=MAX_BYTES)
    assert torch.equal(out.view(torch.int16), t.view(torch.int16))


def test_little_endian_layout() -> None:
    msg = to_message(torch.tensor([1, 256], dtype=torch.int32))
    assert msg.data == b"\x01\x00\x00\x00\x00\x01\x00\x00"


def test_non_contiguous_and_grad_tensors_encode_row_major() -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    t = base.t()  # [4, 3], non-contiguous
    out = from_message(to_message(t), max_bytes=MAX_BYTES)
    assert torch.equal(out, t) and out.is_contiguous()
    leaf = torch.ones(2, 2, requires_grad=True)
    assert torch.equal(from_message(to_message(leaf * 2), max_bytes=MAX_BYTES), torch.full((2, 2), 2.0))


def test_decoded_tensor_owns_writable_memory() -> None:
    msg = to_message(torch.arange(6, dtype=torch.int64).reshape(2, 3))
    # torch warns (once per process unless warn_always) when a tensor wraps a read-only buffer
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = from_message(msg, max_bytes=MAX_BYTES)
            again = from_message(msg, max_bytes=MAX_BYTES)
    finally:
        torch.set_warn_always(warn_always)
    msg.Clear()
    del msg
    out += 1
    assert out.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert again.tolist() == [[0, 1, 2], [3, 4, 5]]


@pytest.mark.parametrize(
    ("wire_dtype", "rtol"),
    [(torch.float16, 2**-11), (torch.bfloat16, 2**-8)],
    ids=["float16", "bfloat16"],
)
def test_lossy_float32_compression(wire_dtype: torch.dtype, rtol: float) -> None:
    t = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    msg = to_message(t, dtype=wire_dtype)
    assert msg.dtype == WIRE_DTYPE_NAMES[wire_dtype]
    assert len(msg.data) == 2 * t.numel()
    out = from_message(msg, max_bytes=MAX_BYTES, expected_dtypes=FLOAT_DTYPES)
    assert out.dtype == wire_dtype
    torch.testing.assert_close(out.float(), t, rtol=rtol, atol=1e-5)
    assert not torch.equal(out.float(), t)  # it is lossy


def test_cast_to_same_dtype_is_a_no_op_and_int_casts_are_refused() -> None:
    t = torch.randn(3)
    assert to_message(t, dtype=torch.float32) == to_message(t)
    with pytest.raises(InvalidInputError, match="only float casts"):
        to_message(torch.arange(3), dtype=torch.float16)
    with pytest.raises(InvalidInputError, match="only float casts"):
        to_message(torch.randn(3), dtype=torch.int64)


def _msg(
    dtype: str = "float32", shape: tuple[int, ...] = (2, 2), nbytes: int | None = None
) -> peer_pb2.Tensor:
    if nbytes is None:
        nbytes = 4
        for dim in shape:
            nbytes *= max(dim, 0)
    return peer_pb2.Tensor(dtype=dtype, shape=list(shape), data=b"\x00" * nbytes)


@pytest.mark.parametrize(
    ("msg", "kwargs", "match"),
    [
        (_msg(dtype="float64", nbytes=32), {}, "unknown dtype 'float64'"),
        (_msg(dtype=""), {}, "unknown dtype ''"),
        (_msg(dtype="FLOAT32"), {}, "unknown dtype"),
        (_msg(shape=(2, -1), nbytes=0), {}, "negative dim"),
        (_msg(nbytes=15), {}, "needs 16 bytes, but data holds 15"),
        (_msg(nbytes=17), {}, "needs 16 bytes, but data holds 17"),
        (_msg(nbytes=0), {}, "needs 16 bytes, but data holds 0"),
        (_msg(shape=(), nbytes=8), {}, "needs 4 bytes, but data holds 8"),
        (_msg(shape=(64, 64)), {"max_bytes": 16383}, "more than the limit of 16383"),
        (_msg(), {"expected_ndim": 3}, "expected 3 dims"),
        (_msg(shape=(1,) * (MAX_NDIM + 1)), {}, "more than the maximum"),
        (
            _msg(),
            {"expected_dtypes": INDEX_DTYPES},
            r"dtype 'float32' not allowed here; expected one of \['int64'\]",
        ),
        (_msg(dtype="int32"), {"expected_dtypes": INDEX_DTYPES}, "not allowed here"),
        (_msg(dtype="int64", nbytes=8), {"expected_dtypes": FLOAT_DTYPES}, "not allowed here"),
    ],
    ids=[
        "unknown-dtype",
        "empty-dtype",
        "dtype-case",
        "negative-dim",
        "truncated",
        "padded",
        "no-data",
        "scalar-padded",
        "over-max-bytes",
        "wrong-ndim",
        "too-many-dims",
        "float-for-index",
        "int32-for-index",
        "index-for-float",
    ],
)
def test_rejects_invalid_messages(msg: peer_pb2.Tensor, kwargs: dict[str, object], match: str) -> None:
    kwargs = {"max_bytes": MAX_BYTES, **kwargs}
    with pytest.raises(InvalidInputError, match=match):
        from_message(msg, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("max_bytes", "match"),
    [(MAX_BYTES, "more than the limit"), (2**200, "needs 8000000000000 bytes, but data holds 8")],
    ids=["limited", "unlimited"],
)
def test_huge_claim_is_rejected_without_allocating(max_bytes: int, match: str) -> None:
    msg = peer_pb2.Tensor(dtype="int64", shape=[10**12], data=b"\x00" * 8)  # claims 8 TB, carries 8 bytes
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=match):
        from_message(msg, max_bytes=max_bytes)
    assert (
        time.perf_counter() - started < 1.0
    )  # microseconds in practice; allocating 8 TB would fail or crawl


def test_shape_product_beyond_int64_is_rejected() -> None:
    msg = peer_pb2.Tensor(dtype="float32", shape=[2**62, 2**62, 2**62], data=b"\x00" * 8)
    with pytest.raises(InvalidInputError, match="more than the limit"):
        from_message(msg, max_bytes=MAX_BYTES)


@pytest.mark.parametrize("max_bytes", [MAX_BYTES, 2**200], ids=["limited", "unlimited"])
def test_zero_element_shape_with_huge_dims_is_invalid_input(max_bytes: int) -> None:
    # torch.empty((0, 2**62, 2**62)) raises "Stride calculation overflowed": never to reach a caller
    msg = peer_pb2.Tensor(dtype="float32", shape=[0, 2**62, 2**62])
    with pytest.raises(InvalidInputError):
        from_message(msg, max_bytes=max_bytes)


def test_zero_element_shape_within_limits_decodes() -> None:
    decoded = from_message(peer_pb2.Tensor(dtype="float32", shape=[0, 3, 4]), max_bytes=MAX_BYTES)
    assert decoded.shape == (0, 3, 4) and decoded.dtype == torch.float32


def test_too_many_dims_is_refused_before_the_shape_is_copied() -> None:
    msg = peer_pb2.Tensor(dtype="float32", shape=[1] * 1_000_000)
    with pytest.raises(InvalidInputError, match="expected 3 dims, got 1000000"):
        from_message(msg, max_bytes=MAX_BYTES, expected_ndim=3)
    with pytest.raises(InvalidInputError, match="1000000 dims is more than the maximum"):
        from_message(msg, max_bytes=MAX_BYTES)


def test_optional_field_absent_or_present() -> None:
    step = peer_pb2.Step(session_id="s", hidden=to_message(torch.zeros(1, 2, 4)))
    assert optional_from_message(step.position_ids, max_bytes=MAX_BYTES) is None
    assert optional_from_message(peer_pb2.Tensor(), max_bytes=MAX_BYTES) is None
    step.beam_indices.CopyFrom(to_message(torch.tensor([1, 0])))
    beams = optional_from_message(
        step.beam_indices,
        max_bytes=MAX_BYTES,
        expected_dtypes=INDEX_DTYPES,
        expected_ndim=1,
        name="beam_indices",
    )
    assert beams is not None and beams.tolist() == [1, 0]
    empty = optional_from_message(to_message(torch.zeros(0, dtype=torch.int64)), max_bytes=MAX_BYTES)
    assert empty is not None and empty.shape == (0,)
    with pytest.raises(InvalidInputError, match="position_ids: has shape or data but no dtype"):
        optional_from_message(peer_pb2.Tensor(shape=[1]), max_bytes=MAX_BYTES, name="position_ids")
    with pytest.raises(InvalidInputError, match="beam_indices: expected 1 dims"):
        optional_from_message(
            to_message(torch.zeros(2, 2, dtype=torch.int64)),
            max_bytes=MAX_BYTES,
            expected_ndim=1,
            name="beam_indices",
        )


def test_step_rollback_has_field_presence() -> None:
    step = peer_pb2.Step(session_id="s")
    assert not step.HasField("rollback_to")
    step.rollback_to = 0
    assert step.HasField("rollback_to") and step.rollback_to == 0
    again = peer_pb2.Step.FromString(step.SerializeToString())
    assert again.HasField("rollback_to")


def test_generated_grpc_module_imports_as_package() -> None:
    from protos import peer_pb2_grpc

    assert peer_pb2_grpc.protos_dot_peer__pb2 is peer_pb2
    assert peer_pb2.DESCRIPTOR.package == "corolla.peer.v1"
    methods = {m.name for m in peer_pb2.DESCRIPTOR.services_by_name["Peer"].methods}
    assert methods == {"Session", "Push", "PushStream", "Forward", "Backward", "Info"}


def test_generated_code_is_current() -> None:
    assert codegen.stale_files() == []


def test_stale_check_detects_edits(tmp_path: Path) -> None:
    (tmp_path / "protos").mkdir()
    shutil.copy(codegen.ROOT / codegen.PROTO, tmp_path / codegen.PROTO)
    codegen.generate(tmp_path, root=tmp_path)
    assert codegen.stale_files(root=tmp_path) == []
    with (tmp_path / "protos/peer_pb2.py").open("a") as f:
        f.write("# edited\n")
    (tmp_path / "protos/peer_pb2.pyi").unlink()
    assert codegen.stale_files(root=tmp_path) == ["protos/peer_pb2.py", "protos/peer_pb2.pyi"]
