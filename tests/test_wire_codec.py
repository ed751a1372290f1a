"""Compressed hidden states on the wire: the blockwise int8 codec (error bound, outliers, special values,
determinism, every refusal of a hostile message), its parsing by a peer, the client's checks, and sessions,
generation and stateless passes against in-process peers over float16, bfloat16 and int8 wires."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
import torch
from conftest import FAST_CLIENT
from fakes import FakeSwarm, hidden_states
from pydantic import ValidationError
from test_inprocess import ONE_PER_SPAN, TWO_PER_SPAN, hop, reference, run
from test_inprocess_model import _model, _prompt
from test_requests import HIDDEN, LIMITS, SERVED, _open, _session, _step

from client.checks import SPOT_CHECK_TOLERANCES, agrees, block_absmax, spot_check_agrees
from client.config import ClientConfig
from client.session import InferenceSession
from client.swarm import SwarmConnection
from peer.requests import parse_backward, parse_forward, parse_open, parse_step
from protos import peer_pb2, peer_pb2_grpc, tensors
from protos.errors import InvalidInputError
from protos.tensors import (
    BLOCKWISE_INT8,
    FLOAT_DTYPES,
    INDEX_DTYPES,
    INT8_BLOCK,
    MAX_SCALE,
    MIN_SCALE,
    decoded_dtype,
    from_message,
    optional_from_message,
    to_message,
    wire_dtype_from_name,
)

MAX_BYTES = 1 << 24
WIRES = ["float32", "float16", "bfloat16", "int8"]


def _encode(t: torch.Tensor) -> peer_pb2.Tensor:
    return to_message(t, dtype=BLOCKWISE_INT8)


def _decode(msg: peer_pb2.Tensor, **kwargs: Any) -> torch.Tensor:
    return from_message(peer_pb2.Tensor.FromString(msg.SerializeToString()), max_bytes=MAX_BYTES, **kwargs)


def _scales(msg: peer_pb2.Tensor) -> torch.Tensor:
    return torch.frombuffer(bytearray(msg.scales), dtype=torch.float32) if msg.scales else torch.zeros(0)


def _outliers(msg: peer_pb2.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat indices (int64) and exact values of a message's outliers."""
    if not msg.outlier_index:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0)
    index = torch.frombuffer(bytearray(msg.outlier_index), dtype=torch.int32).long()
    return index, torch.frombuffer(bytearray(msg.outlier_values), dtype=torch.float32)


def _per_element(scales: torch.Tensor, numel: int) -> torch.Tensor:
    return scales.repeat_interleave(INT8_BLOCK)[:numel]


def _scale_of(absmax: torch.Tensor) -> torch.Tensor:
    """The encoder's scale of a block absmax: absmax / 127, one ulp less where 127 * that exceeds absmax."""
    scales = absmax / 127
    return torch.where(scales * 127 > absmax, torch.nextafter(scales, torch.zeros_like(scales)), scales)


def _largest_per_row(x: torch.Tensor, k: int) -> torch.Tensor:
    """A mask of the values of each row (last dim) above its (k + 1)-th largest magnitude."""
    magnitudes = x.abs()
    return magnitudes > magnitudes.topk(k + 1, dim=-1).values[..., -1:]


# ---- the codec -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape", [(), (0,), (1,), (63,), (64,), (65,), (3, 100), (2, 0, 4), (4, 31), (1, 1, 576)], ids=str
)
@pytest.mark.parametrize("dtype", sorted(FLOAT_DTYPES, key=str), ids=str)
def test_round_trip_is_exact_at_outliers_and_within_half_a_step_elsewhere(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    x = (torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 5).to(dtype)
    msg = _encode(x)
    numel, row = x.numel(), (shape[-1] if shape else 1)
    num_blocks = math.ceil(numel / INT8_BLOCK)
    assert (msg.dtype, tuple(msg.shape), msg.block) == ("int8", shape, INT8_BLOCK)
    assert len(msg.data) == numel and len(msg.scales) == 4 * num_blocks
    index, values = _outliers(msg)
    flat = x.float().reshape(-1)
    expected = _largest_per_row(x.float(), row // 32).reshape(-1) if row >= 32 else torch.zeros_like(flat) > 0
    assert torch.equal(index, expected.nonzero().view(-1)) and len(index) <= (
        numel // row * (row // 32) if row else 0
    )
    assert torch.equal(values, flat[index])  # exactly, as float32
    out = _decode(msg)
    assert out.dtype == torch.float32 and out.shape == shape and out.is_contiguous()
    assert torch.equal(out.reshape(-1)[index], flat[index])
    rest = flat.index_fill(0, index, 0.0)  # what the blocks quantize
    scales = _scales(msg)
    assert torch.equal(scales, _scale_of(block_absmax(rest)[::INT8_BLOCK]))
    assert bool((scales * 127 <= block_absmax(rest)[::INT8_BLOCK]).all())
    error = (out.reshape(-1) - flat).abs()
    assert bool((error <= _per_element(scales, numel) / 2).all())
    if numel > 1:
        assert not torch.equal(out, x.float())  # it is lossy


def test_outliers_are_exact_and_their_neighbours_keep_their_precision() -> None:
    """SmolLM2's massive activations (channels 507 and 247 of 576, up to ~2e4 where the rest is ~1-10) go
    exactly; every other value keeps the precision of its block without them."""
    x = torch.randn(2, 3, 576, generator=torch.Generator().manual_seed(0))
    x[..., 507], x[..., 247], x[0, 1, 70] = 2.2e4, -3e3, 400.0
    out = _decode(_encode(x))
    assert torch.equal(out[..., 507], x[..., 507]) and torch.equal(out[..., 247], x[..., 247])
    assert out[0, 1, 70] == 400.0
    spikes = torch.zeros_like(x, dtype=torch.bool)
    spikes[..., 507] = spikes[..., 247] = True
    spikes[0, 1, 70] = True
    calm = torch.where(spikes, 0.0, x)  # an outlier does not count in its block's absmax
    assert bool(((out - x).abs() <= block_absmax(calm) / 254).all())
    assert float(block_absmax(calm).max()) < 5.0  # a step of at most 0.04, where 2.2e4 / 127 would be 173
    relative = (out - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(relative.max()) < 1e-4  # the spikes dominate the norm and are exact
    relative_calm = (out - x).norm(dim=-1) / calm.norm(dim=-1)
    assert float(relative_calm.max()) < 6e-3


def test_a_row_sends_its_largest_magnitudes_up_to_one_per_32_values() -> None:
    row = torch.linspace(0.5, 1.0, 64)  # rows of 64: 2 outliers each
    x = row.repeat(4, 1)
    x[0, 10], x[0, 20], x[0, 30] = -100.0, 90.0, 80.0  # three spikes in one row: the largest two go exactly
    x[2, 5] = x[2, 6] = x[2, 7] = 50.0  # a tie at the boundary: none of the three goes exactly
    x[3] = 0.0
    x[3, 1] = 1e-30  # tiny, but the largest: exact too
    index, values = _outliers(_encode(x))
    assert index.tolist() == [10, 20, 64 + 62, 64 + 63, 192 + 1]
    assert torch.equal(values, x.reshape(-1)[index]) and values[-1] == x[3, 1]
    assert len(index) < 4 * (64 // 32)  # at most: ties and zeros send fewer
    out = _decode(_encode(x))
    assert out[3, 1] == 1e-30 and out[0, 30] == 80.0 and out[2, 5] == 50.0  # 80 and 50 set their blocks
    assert _outliers(_encode(torch.randn(10, 31)))[0].numel() == 0  # rows of fewer than 32 values: none
    assert _outliers(_encode(torch.randn(576)))[0].numel() == 18
    assert _outliers(_encode(torch.full((2, 576), 3.0)))[0].numel() == 0  # all tied


def test_zeros_and_values_too_small_for_a_scale_are_sent_as_zeros() -> None:
    x = torch.zeros(3, INT8_BLOCK)
    x[1] = 100 * MIN_SCALE  # absmax / 127 below MIN_SCALE, and all tied (no outliers): sent as zeros
    x[2] = torch.linspace(-1, 1, INT8_BLOCK)
    msg = _encode(x)
    index, values = _outliers(msg)
    assert index.tolist() == [128, 191] and values.tolist() == [-1.0, 1.0]
    assert torch.equal(_scales(msg), torch.tensor([0.0, 0.0, (1 - 2 / 63) / 127]))
    out = _decode(msg)
    assert torch.equal(out[:2], torch.zeros(2, INT8_BLOCK))
    assert out[2].abs().max() == 1.0


@pytest.mark.parametrize("value", [float("inf"), float("-inf"), float("nan")], ids=str)
@pytest.mark.parametrize("count", [1, 5])  # one: an outlier; five: more than a row's 3 outliers
@pytest.mark.parametrize("width", [100, 10])  # rows with and without outliers
def test_non_finite_values_are_refused(value: float, count: int, width: int) -> None:
    x = torch.randn(2, width)
    x[1, 3 : 3 + count] = value
    with pytest.raises(InvalidInputError, match="cannot send non-finite values as int8"):
        _encode(x)


def test_magnitudes_beyond_the_largest_scale_and_integers_are_refused() -> None:
    assert _decode(_encode(torch.tensor([127 * MAX_SCALE, -1.0]))).tolist() == [127 * MAX_SCALE, 0.0]
    with pytest.raises(InvalidInputError, match="cannot send values beyond"):
        _encode(torch.tensor([3e38]))
    as_outlier = torch.randn(32)
    as_outlier[5] = 3e38  # exact as an outlier: no scale needed
    assert _decode(_encode(as_outlier))[5] == as_outlier[5]
    with pytest.raises(InvalidInputError, match="only floats are quantized"):
        _encode(torch.arange(4))


def test_more_values_than_an_int32_index_reaches_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tensors, "MAX_INT8_NUMEL", 100)  # 2**31 - 1 in truth: 8 GiB to test
    assert _encode(torch.randn(100)).shape == [100]
    with pytest.raises(InvalidInputError, match="cannot send 101 values as int8: at most 100"):
        _encode(torch.randn(101))


def _tricky_rows() -> torch.Tensor:
    """Rows of 64 (2 outliers each) that tempt a re-encoding to pick other outliers: ties at the boundary,
    and a value one float32 ulp above a boundary absmax a whose a / 127 * 127 exceeds a."""
    gen = torch.Generator().manual_seed(11)
    candidates = torch.rand(10_000, generator=gen) + 1
    a = candidates[(candidates / 127 * 127 > candidates).nonzero()[0, 0]]
    above = torch.nextafter(a, torch.tensor(2.0))
    rows = (torch.randn(6, 64, generator=gen) * 0.3).clamp(-0.9, 0.9)
    rows[0, 3], rows[0, 7], rows[0, 40] = above, a, 9.0  # outliers 9 and a + ulp; a sets block 0's scale
    rows[1, [3, 40, 41]] = torch.tensor([5.0, 5.0, 5.0])  # three tied at the top: no outliers
    rows[2, [3, 40, 41]] = torch.tensor([9.0, -5.0, 5.0])  # 9 goes; the tie at 5 stays
    rows[3] = torch.randint(-3, 4, (64,), generator=gen).float()  # integers: ties everywhere
    rows[4] = 1e-37 * torch.randn(64, generator=gen)  # scales near the smallest
    return rows


def test_encoding_is_deterministic_and_a_decoded_tensor_encodes_to_the_same_bytes() -> None:
    """What a replay relies on: the client re-encodes a hop's decoded output, and the replacement peer must
    get the bytes the previous hop pushed. Magnitudes over 20 orders of ten, spikes, ties, ulp-close
    boundaries, rows of several widths."""
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2000, INT8_BLOCK, generator=gen) * torch.exp(torch.randn(2000, 1, generator=gen) * 10)
    spiky = torch.randn(64, 576, generator=gen)
    spiky[:, [247, 507]] *= torch.exp(torch.rand(64, 2, generator=gen) * 10)
    for t in (x, spiky, _tricky_rows(), torch.randn(7, 33, generator=gen), torch.randn(5, 100, 3)):
        msg = _encode(t)
        assert _encode(t.clone()) == msg
        once = _decode(msg)
        assert _encode(once) == msg
        assert torch.equal(_decode(_encode(once)), once)
        assert _encode(_decode(_encode(once))) == msg
    index = _outliers(_encode(_tricky_rows()))[0]
    assert index[:3].tolist() == [3, 40, 128 + 3] and not bool(((index >= 64) & (index < 128)).any())


def test_every_scale_is_given_back_by_its_decoded_absmax() -> None:
    """Why a decoded tensor encodes to the same scales and outliers: a block's absmax a decodes to
    127 * scale(a), which is at most a (so no other value overtakes an outlier) and has the same scale
    (checked exhaustively over every float32 a once; here on a million random bit patterns). a / 127
    alone is sometimes one ulp too large, and scales not of either form do not all have it."""
    bits = torch.randint(0x00800000, 0x7E000000, (1_000_000,), generator=torch.Generator().manual_seed(0))
    absmax = bits.to(torch.int32).view(torch.float32)
    scales = _scale_of(absmax)
    assert bool((scales * 127 <= absmax).all()) and torch.equal(_scale_of(scales * 127), scales)
    assert bool((absmax / 127 * 127 > absmax).any())
    arbitrary = torch.linspace(1, 2, 10_000)
    assert not torch.equal(_scale_of(arbitrary * 127), arbitrary)


def test_bytes_per_token_per_hop() -> None:
    """A [1, 1, 576] hidden state (SmolLM2's width) in each wire format, as a Step carries it: float32
    2325 bytes, float16 1173, int8 782 (634 without the 18 outliers)."""
    hidden = torch.randn(1, 1, 576)
    sizes = {
        wire: len(
            peer_pb2.Step(hidden=to_message(hidden, dtype=wire_dtype_from_name(wire))).SerializeToString()
        )
        for wire in WIRES
    }
    data = {wire: len(to_message(hidden, dtype=wire_dtype_from_name(wire)).data) for wire in WIRES}
    assert data == {"float32": 2304, "float16": 1152, "bfloat16": 1152, "int8": 576}
    msg = _encode(hidden)
    assert len(msg.scales) == 36  # 9 blocks
    assert len(msg.outlier_index) == len(msg.outlier_values) == 4 * 18  # 576 // 32: about 1.3 bytes a value
    assert sizes["int8"] < 0.35 * sizes["float32"]
    assert sizes["int8"] < 0.7 * sizes["float16"] and sizes["float16"] == sizes["bfloat16"] - 1  # the name


# ---- hostile messages ----------------------------------------------------------------------------------


def _int8(
    shape: list[int],
    *,
    data: int | None = None,
    scales: Any = None,
    block: int = INT8_BLOCK,
    index: Any = b"",
    values: Any = None,
) -> peer_pb2.Tensor:
    numel = math.prod(shape)
    if scales is None:
        scales = [1.0] * math.ceil(numel / INT8_BLOCK)
    if values is None:
        values = [2.0] * (len(index) if isinstance(index, list) else len(index) // 4)
    index_bytes = (
        index if isinstance(index, bytes) else torch.tensor(index, dtype=torch.int32).numpy().tobytes()
    )
    return peer_pb2.Tensor(
        dtype="int8",
        shape=shape,
        data=b"\x01" * (numel if data is None else data),
        scales=_float32_bytes(scales),
        block=block,
        outlier_index=index_bytes,
        outlier_values=_float32_bytes(values),
    )


def _float32_bytes(values: Any) -> bytes:
    return (
        values if isinstance(values, bytes) else torch.tensor(values, dtype=torch.float32).numpy().tobytes()
    )


@pytest.mark.parametrize(
    ("msg", "kwargs", "match"),
    [
        (_int8([2, 70], data=139), {}, "needs 140 bytes, but data holds 139"),
        (_int8([2, 70], data=141), {}, "needs 140 bytes, but data holds 141"),
        (
            _int8([2, 70], scales=[1.0, 1.0]),
            {},
            "3 blocks of int8 need 12 bytes of scales, but scales hold 8",
        ),
        (_int8([2, 70], scales=[1.0] * 4), {}, "but scales hold 16"),
        (_int8([2, 70], scales=b"\x00" * 13), {}, "but scales hold 13"),
        (_int8([2, 70], scales=[1.0, -1.0, 1.0]), {}, r"scale -1.0 of block 1 is neither 0 nor in"),
        (_int8([2, 70], scales=[float("nan"), 1.0, 1.0]), {}, "scale nan of block 0"),
        (_int8([2, 70], scales=[1.0, 1.0, float("inf")]), {}, "scale inf of block 2"),
        (_int8([70], scales=[4 * MAX_SCALE, 1.0]), {}, "of block 0 is neither 0 nor in"),
        (_int8([70], scales=[1.0, MIN_SCALE / 2]), {}, "of block 1 is neither 0 nor in"),
        (_int8([64], block=32), {}, "int8 block of 32 values; only 64 is allowed"),
        (_int8([64], block=0), {}, "int8 block of 0 values"),
        (_int8([64], block=2**32 - 1), {}, "int8 block of 4294967295 values"),
        (_int8([1000]), {"max_bytes": 3999}, r"shape \[1000\] of int8 is more than the limit of 3999 bytes"),
        (_int8([2, 70]), {"expected_ndim": 3}, "expected 3 dims, got 2"),
        (_int8([2, -70], data=0, scales=b""), {}, "negative dim"),
        (
            _int8([2, 2]),
            {"expected_dtypes": INDEX_DTYPES},
            r"dtype 'int8' not allowed here; expected one of \['int64'\]",
        ),
        (_int8([2, 2]), {"expected_dtypes": FLOAT_DTYPES}, "dtype 'int8' not allowed here"),
        (
            peer_pb2.Tensor(dtype="float32", shape=[1], data=b"\x00" * 4, scales=b"\x00" * 4),
            {},
            "block, scales and outliers are for dtype 'int8' only, not 'float32'",
        ),
        (
            peer_pb2.Tensor(dtype="float16", shape=[1], data=b"\x00" * 2, block=64),
            {},
            "for dtype 'int8' only",
        ),
        (
            peer_pb2.Tensor(dtype="int8", shape=[2], data=b"\x80\x00", scales=b"\x00" * 4, block=64),
            {},
            "int8 value -128 is outside -127..127",
        ),
        (
            peer_pb2.Tensor(dtype="bfloat16", shape=[1], data=b"\x00" * 2, outlier_index=b"\x00" * 4),
            {},
            "block, scales and outliers are for dtype 'int8' only, not 'bfloat16'",
        ),
        (
            peer_pb2.Tensor(dtype="float32", shape=[1], data=b"\x00" * 4, outlier_values=b"\x00" * 4),
            {},
            "for dtype 'int8' only",
        ),
        (
            _int8([2, 70], index=b"\x00" * 5, values=b"\x00" * 5),
            {},
            "outlier_index holds 5 bytes and outlier_values 5: each outlier needs 4 bytes in both",
        ),
        (_int8([2, 70], index=[1, 2], values=[1.0]), {}, "outlier_index holds 8 bytes and outlier_values 4"),
        (_int8([2, 70], index=[1], values=b""), {}, "outlier_index holds 4 bytes and outlier_values 0"),
        (
            _int8([2, 70], index=[0, 1, 2, 3, 4]),
            {},
            r"5 outliers is more than the limit of 4 for shape \[2, 70\] \(n // 32 per row of n values\)",
        ),
        (_int8([4, 31], index=[0]), {}, r"1 outliers is more than the limit of 0 for shape \[4, 31\]"),
        (_int8([], index=[0]), {}, r"more than the limit of 0 for shape \[\]"),
        (_int8([2, 70], index=[-1, 5]), {}, r"outlier index out of range \[0, 140\)"),
        (_int8([2, 70], index=[5, 140]), {}, r"outlier index out of range \[0, 140\)"),
        (_int8([2, 70], index=[-(2**31), 5]), {}, "out of range"),
        (_int8([2, 70], index=[3, 3]), {}, "outlier indices are not strictly increasing"),
        (_int8([2, 70], index=[1, 9, 5, 12]), {}, "outlier indices are not strictly increasing"),
        (_int8([2, 70], index=[1, 9], values=[1.0, math.nan]), {}, "outlier values must be finite"),
        (_int8([2, 70], index=[1, 9], values=[-math.inf, 1.0]), {}, "outlier values must be finite"),
    ],
    ids=[
        "data-short",
        "data-long",
        "scales-short",
        "scales-long",
        "scales-ragged",
        "scale-negative",
        "scale-nan",
        "scale-inf",
        "scale-huge",
        "scale-subnormal",
        "block-32",
        "block-0",
        "block-max",
        "decoded-over-max-bytes",
        "wrong-ndim",
        "negative-dim",
        "int8-for-index",
        "int8-for-strict-float",
        "scales-on-float32",
        "block-on-float16",
        "value-128",
        "outliers-on-bfloat16",
        "outlier-values-on-float32",
        "outliers-ragged",
        "outlier-values-short",
        "outlier-values-missing",
        "outliers-over-limit",
        "outliers-in-short-rows",
        "outliers-in-a-scalar",
        "outlier-index-negative",
        "outlier-index-past-end",
        "outlier-index-int32-min",
        "outlier-index-repeated",
        "outlier-index-unsorted",
        "outlier-value-nan",
        "outlier-value-inf",
    ],
)
def test_hostile_int8_messages_are_refused(msg: peer_pb2.Tensor, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        from_message(msg, **{"max_bytes": MAX_BYTES, **kwargs})


@pytest.mark.parametrize(
    ("max_bytes", "match"),
    [(MAX_BYTES, "more than the limit"), (2**200, "needs 1000000000000 bytes, but data holds 64")],
    ids=["limited", "unlimited"],
)
def test_huge_int8_claim_is_refused_without_allocating(max_bytes: int, match: str) -> None:
    msg = _int8([10**12], data=64, scales=[1.0])  # 4 TB decoded, carried in 68 bytes
    started = time.perf_counter()
    with pytest.raises(InvalidInputError, match=match):
        from_message(msg, max_bytes=max_bytes)
    with pytest.raises(InvalidInputError):
        from_message(_int8([0, 2**62, 2**62], data=0, scales=b""), max_bytes=max_bytes)
    assert time.perf_counter() - started < 1.0


def test_decoded_float32_size_counts_against_max_bytes() -> None:
    msg = _encode(torch.randn(1000))
    assert msg.ByteSize() < 1350  # the wire holds a third of it (31 outliers: 1000 // 32)
    assert from_message(msg, max_bytes=4000).shape == (1000,)
    with pytest.raises(InvalidInputError, match="more than the limit of 3999"):
        from_message(msg, max_bytes=3999)


def test_an_absent_optional_tensor_has_no_scales_or_outliers_either() -> None:
    for stray in (
        peer_pb2.Tensor(scales=b"\x00" * 4),
        peer_pb2.Tensor(block=64),
        peer_pb2.Tensor(outlier_index=b"\x00" * 4),
        peer_pb2.Tensor(outlier_values=b"\x00" * 4),
    ):
        with pytest.raises(InvalidInputError, match="has shape or data but no dtype"):
            optional_from_message(stray, max_bytes=MAX_BYTES)


def test_a_hand_built_message_with_outliers_decodes() -> None:
    """Outliers overwrite whatever their int8 value says (the encoder sends 0 there)."""
    msg = _int8([2, 70], index=[0, 69, 139], values=[5.0, -7.5, 1e30])
    out = from_message(msg, max_bytes=MAX_BYTES)
    expected = torch.ones(2, 70)
    expected[0, 0], expected[0, 69], expected[1, 69] = 5.0, -7.5, 1e30
    assert torch.equal(out, expected)


def test_wire_dtype_names() -> None:
    assert [wire_dtype_from_name(name) for name in WIRES] == [
        *(getattr(torch, n) for n in WIRES[:3]),
        BLOCKWISE_INT8,
    ]
    assert decoded_dtype(BLOCKWISE_INT8) == torch.float32 and decoded_dtype(torch.float16) == torch.float16
    for name in ("int64", "float64", "INT8", ""):
        with pytest.raises(InvalidInputError, match="unknown wire dtype"):
            wire_dtype_from_name(name)
    assert ClientConfig(wire_dtype="int8").wire_dtype == "int8"
    with pytest.raises(ValidationError, match="'float32', 'float16', 'bfloat16' or 'int8'"):
        ClientConfig(wire_dtype="int4")


# ---- a peer parses int8 wherever it takes a float ------------------------------------------------------


def test_peer_parses_int8_hidden_states_prompts_and_gradients() -> None:
    assert parse_open(_open(dtype="int8"), served=SERVED, limits=LIMITS).wire_dtype == BLOCKWISE_INT8
    hidden = torch.randn(2, 1, HIDDEN)
    step = parse_step(_step(_encode(hidden)), session=_session(), served=SERVED, limits=LIMITS)
    assert step.hidden.dtype == torch.float32 and torch.equal(step.hidden, _decode(_encode(hidden)))
    prompts, grad = torch.randn(4, 1, 1, HIDDEN), torch.randn(2, 1, HIDDEN)
    request = peer_pb2.ForwardRequest(start=2, end=6, hidden=_encode(hidden), prompts=_encode(prompts))
    forward = parse_forward(request, served=SERVED, limits=LIMITS)
    assert forward.reply_dtype == BLOCKWISE_INT8 and forward.hidden.dtype == torch.float32
    assert forward.prompts is not None and torch.equal(forward.prompts, _decode(_encode(prompts)))
    as_float16 = peer_pb2.ForwardRequest(start=2, end=6, hidden=to_message(hidden, dtype=torch.float16))
    assert parse_forward(as_float16, served=SERVED, limits=LIMITS).reply_dtype == torch.float16
    backward = parse_backward(
        peer_pb2.BackwardRequest(start=2, end=6, hidden=_encode(hidden), grad_output=_encode(grad)),
        served=SERVED,
        limits=LIMITS,
    )
    assert torch.equal(backward.grad_output, _decode(_encode(grad)))


@pytest.mark.parametrize("field", ["position_ids", "beam_indices"])
def test_peer_refuses_int8_where_indices_are_expected(field: str) -> None:
    shape = (2, 1) if field == "position_ids" else (2,)
    step = _step(**{field: _encode(torch.zeros(shape))})
    with pytest.raises(InvalidInputError, match=f"{field}: dtype 'int8' not allowed here"):
        parse_step(step, session=_session(), served=SERVED, limits=LIMITS)


# ---- the client's checks -------------------------------------------------------------------------------


def test_a_recomputation_over_int8_may_differ_by_one_step_of_its_block() -> None:
    held = _decode(_encode(torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(1))))
    step = block_absmax(held) / 127
    one_off, two_off = held.clone(), held.clone()
    one_off[1, 2, 5] += step[1, 2, 5]
    two_off[1, 2, 5] += 2 * step[1, 2, 5]
    assert agrees(one_off, held, wire_dtype=BLOCKWISE_INT8)
    assert not agrees(two_off, held, wire_dtype=BLOCKWISE_INT8)
    assert not agrees(one_off, held)  # as float32 values they differ
    position = held[1, 2]
    assert SPOT_CHECK_TOLERANCES[BLOCKWISE_INT8] == 1e-2
    assert spot_check_agrees(one_off, held, dtypes=[BLOCKWISE_INT8, torch.float32])
    assert not spot_check_agrees(held + 0.02 * position.norm() / 8, held, dtypes=[BLOCKWISE_INT8])


# ---- in-process peers ----------------------------------------------------------------------------------


@pytest.fixture
def over() -> Iterator[Callable[..., SwarmConnection]]:
    """`over(swarm, wire, **client_config)` -> a connection whose hidden states travel as `wire`."""
    connections: list[SwarmConnection] = []

    def make(swarm: FakeSwarm, wire: str, **options: Any) -> SwarmConnection:
        config = ClientConfig(**(FAST_CLIENT | options))
        connection = SwarmConnection.from_discovery(swarm.discovery, config, wire_dtype=wire)
        connections.append(connection)
        return connection

    yield make
    for connection in connections:
        connection.close()


def _relative(output: torch.Tensor, expected: torch.Tensor) -> float:
    return float(((output.float() - expected).norm(dim=-1) / expected.norm(dim=-1)).max())


# largest relative error ||output - float32|| / ||float32|| of a position's hidden state after 3 hops (and
# the input's trip to the first), per wire; measured on the tiny Llama over test_inprocess's STEPS: float16
# 5.6e-4, bfloat16 4.0e-3, int8 1.2e-2 (1.8e-2 before outliers went exactly)
SESSION_ERROR = {"float32": 0.0, "float16": 1e-3, "bfloat16": 1e-2, "int8": 4e-2}


@pytest.mark.parametrize("wire", WIRES)
def test_session_over_each_wire_stays_close_to_float32(fake_swarm, over, wire: str) -> None:
    swarm = fake_swarm(ONE_PER_SPAN)
    result = run(over(swarm, wire))
    errors = [_relative(out, want) for out, want in zip(result.outputs, reference(swarm), strict=True)]
    assert max(errors) <= SESSION_ERROR[wire]
    assert (max(errors) > 0) == (wire != "float32")
    opens = [r.open for peer in swarm.peers for r in peer.faults.received if r.WhichOneof("kind") == "open"]
    assert len(opens) == 3 and {o.dtype for o in opens} == {wire}


def test_replay_over_int8_reproduces_the_hop_bit_for_bit(fake_swarm, over, caplog) -> None:
    """A killed middle hop is replayed from the client's decoded copies of its inputs: they encode to the
    bytes the previous hop pushed, so the replacement's cache and every later output are exactly those of
    a run without the failure (no "replay differs", not even within tolerance)."""
    clean = run(over(fake_swarm(TWO_PER_SPAN), "int8"))
    swarm = fake_swarm(TWO_PER_SPAN)

    def kill(session: InferenceSession) -> None:
        hop(swarm, session, 1).kill()

    with caplog.at_level(logging.WARNING, logger="client.session"):
        failed = run(over(swarm, "int8"), {4: kill})
    assert failed.num_failovers == 1
    assert "replay differs" not in caplog.text
    for output, want in zip(failed.outputs, clean.outputs, strict=True):
        assert torch.equal(output, want)


def test_a_peer_whose_output_int8_cannot_carry_is_failed_over(fake_swarm, over) -> None:
    """Non-finite outputs cannot travel as int8: the peer says INTERNAL (its own fault, as a NaN result is on
    a float wire), so the client moves the session to another peer instead of raising to the caller."""
    swarm = fake_swarm([])
    broken = swarm.add(0, 4, throughput=1000.0)
    swarm.add(0, 4, throughput=1.0)

    def nan_outputs(items: list[Any], **kwargs: Any) -> list[torch.Tensor]:
        return [torch.full_like(item.hidden, float("nan")) for item in items]

    broken.span.forward_batch = nan_outputs  # type: ignore[method-assign]
    result = run(over(swarm, "int8"))
    assert result.num_failovers == 1 and result.route[0][0] != broken.peer_id
    assert (
        max(_relative(out, want) for out, want in zip(result.outputs, reference(swarm), strict=True)) < 4e-2
    )


@pytest.mark.parametrize("wire", ["float16", "bfloat16", "int8"])
def test_greedy_generation_over_a_lossy_wire_agrees_with_float32(fake_swarm, over, local, wire: str) -> None:
    """16 greedy tokens equal transformers' in float32 for these prompts. Not for every prompt: a lossy wire
    flips near-ties (of prompt seeds 0-11, int8 flips a token of seeds 1, 7 and 10, where the float32 logits
    of the top two are 0.008, 0.004 and 0.003 apart; bfloat16 none). On SmolLM2 int8 kept 6 of 6 greedy
    32-token continuations once its massive activations went exactly, 1 of 6 before (protos/tensors.py)."""
    swarm = fake_swarm(ONE_PER_SPAN)
    model = _model(swarm, over(swarm, wire))
    for seed in (0, 2, 3):
        prompt = _prompt(seed=seed)
        options = dict(
            attention_mask=torch.ones_like(prompt), max_new_tokens=16, min_new_tokens=16, do_sample=False
        )
        got = model.generate(prompt, **options)
        want = local.generate(prompt, **options)
        assert torch.equal(got, want)


def test_stateless_passes_over_int8(fake_swarm, over) -> None:
    """Forward and Backward through `RemoteSpans`: hidden states go as int8, gradients stay float32."""
    swarm = fake_swarm(ONE_PER_SPAN)
    connection = over(swarm, "int8")
    hidden = hidden_states(2, 5, seed=1).requires_grad_(True)
    output = connection.remote(hidden)
    output.backward(hidden_states(2, 5, seed=2))
    span = swarm.local_span()
    expected = span.forward(hidden_states(2, 5, seed=1))
    expected_grad, _ = span.backward(hidden_states(2, 5, seed=1), hidden_states(2, 5, seed=2))
    assert _relative(output.detach(), expected) <= 4e-2  # measured 1.1e-2
    assert hidden.grad is not None and _relative(hidden.grad, expected_grad) <= 1e-2  # measured 2.4e-3


def test_a_peer_answers_in_the_wire_format_it_was_asked_in(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)])
    (peer,) = swarm.peers
    hidden = hidden_states(1, 3, seed=0)
    with grpc.insecure_channel(peer.address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        forward = stub.Forward(peer_pb2.ForwardRequest(start=0, end=4, hidden=_encode(hidden)), timeout=10)
        assert forward.hidden.dtype == "int8" and forward.hidden.block == INT8_BLOCK
        expected = swarm.local_span().forward(_decode(_encode(hidden)))
        assert torch.equal(_decode(forward.hidden), _decode(_encode(expected)))
        request = peer_pb2.BackwardRequest(
            start=0, end=4, hidden=_encode(hidden), grad_output=_encode(hidden)
        )
        backward = stub.Backward(request, timeout=10)
        assert backward.grad_input.dtype == "float32"  # the dtype an int8 `hidden` decodes to


def test_spot_checks_over_int8_pass_honest_hops_and_catch_a_perturbing_one(fake_swarm, over) -> None:
    """Every step checked: honest peers agree within the int8 spot-check tolerance at every position (20
    positions, two peers per span); a middle hop off by 0.01 is caught, banned and replaced, and the outputs
    are then those of the honest route."""
    honest = fake_swarm(TWO_PER_SPAN)
    connection = over(honest, "int8", verify_every=1)
    clean = run(connection)
    assert connection.bans.banned() == set() and clean.num_failovers == 0
    swarm = fake_swarm([])
    swarm.add(0, 1)
    liar = swarm.add(1, 3, throughput=100.0)  # the route prefers it
    swarm.add(1, 3, throughput=1.0)
    swarm.add(3, 4)
    liar.corrupt_outputs(mode="perturb")
    connection = over(swarm, "int8", verify_every=1)
    result = run(connection)
    assert connection.bans.banned() == {liar.peer_id}
    assert all(torch.equal(out, want) for out, want in zip(result.outputs, clean.outputs, strict=True))
