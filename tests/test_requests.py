"""Request parsing without gRPC: good requests parse exactly; each bad field raises its error class, and a
request beyond this peer's own limits names the limit."""

from __future__ import annotations

import pytest
import torch

from peer.pushes import check_shape, max_step_bytes
from peer.requests import (
    MAX_CARRIED,
    MAX_SESSION_ID_CHARS,
    Limits,
    OpenRequest,
    PositionMismatch,
    PushRefused,
    Served,
    backward_bytes,
    parse_backward,
    parse_forward,
    parse_hops,
    parse_open,
    parse_push,
    parse_reroute,
    parse_step,
)
from peer.sessions import PeerSession
from protos import peer_pb2
from protos.errors import InvalidInputError, PeerLimitError
from protos.tensors import to_message

HIDDEN = 8
SERVED = Served(start=2, end=6, num_blocks=8, hidden_size=HIDDEN, dtype=torch.float32)
LIMITS = Limits(max_batch_size=4, max_length=128, max_forward_tokens=64, max_message_bytes=1 << 16)


TOKEN = bytes(range(16))


def _hop(start: int, end: int, address: str = "127.0.0.1:5000", **overrides: object) -> peer_pb2.Hop:
    fields: dict[str, object] = dict(
        peer_id="P", address=address, start=start, end=end, session_id=f"h{start}", push_token=TOKEN
    )
    fields.update(overrides)
    return peer_pb2.Hop(**fields)  # type: ignore[arg-type]


def _open(**overrides: object) -> peer_pb2.OpenSession:
    fields: dict[str, object] = dict(session_id="s", start=2, end=6, batch_size=1, max_length=64)
    fields.update(overrides)
    return peer_pb2.OpenSession(**fields)  # type: ignore[arg-type]


def _zeros(*shape: int, dtype: torch.dtype = torch.float32) -> peer_pb2.Tensor:
    return to_message(torch.zeros(*shape, dtype=dtype))


# ---- open ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (
            _open(),
            OpenRequest("s", 2, 6, 1, 64, torch.float32, next_hops=(), report_outputs=False),
        ),
        (
            _open(start=3, end=5, batch_size=4, max_length=128, dtype="bfloat16", report_outputs=True),
            OpenRequest("s", 3, 5, 4, 128, torch.bfloat16, next_hops=(), report_outputs=True),
        ),
        (
            _open(end=4, next_hops=[_hop(4, 6), _hop(6, 8, "[::1]:80")], dtype="float16"),
            OpenRequest("s", 2, 4, 1, 64, torch.float16, (_hop(4, 6), _hop(6, 8, "[::1]:80")), False),
        ),
        (
            _open(push_token=TOKEN),
            OpenRequest("s", 2, 6, 1, 64, torch.float32, (), False, push_token=TOKEN),
        ),
    ],
    ids=["defaults", "limits and bf16", "next hops", "push token"],
)
def test_open_parses(request_: peer_pb2.OpenSession, expected: OpenRequest) -> None:
    assert parse_open(request_, served=SERVED, limits=LIMITS) == expected


@pytest.mark.parametrize(
    ("request_", "error", "limit", "message"),
    [
        (_open(session_id=""), InvalidInputError, None, "session_id must be 1..128 printable characters"),
        (_open(session_id="a" * (MAX_SESSION_ID_CHARS + 1)), InvalidInputError, None, "session_id"),
        (_open(session_id="a\nb"), InvalidInputError, None, "session_id"),
        (_open(start=1), InvalidInputError, None, "span [1, 6) is not served here; this peer hosts [2, 6)"),
        (_open(end=7), InvalidInputError, None, "span [2, 7) is not served here"),
        (_open(start=4, end=4), InvalidInputError, None, "span [4, 4) is not served here"),
        (_open(batch_size=0), InvalidInputError, None, "batch_size 0 is outside 1..4"),
        (_open(batch_size=5), PeerLimitError, "max_batch_size", "batch_size 5 is outside 1..4"),
        (_open(max_length=0), InvalidInputError, None, "max_length 0 is outside 1..128"),
        (_open(max_length=129), PeerLimitError, "max_length", "max_length 129 is outside 1..128"),
        (_open(dtype="float64"), InvalidInputError, None, "unknown wire dtype 'float64'"),
        (_open(dtype="int64"), InvalidInputError, None, "unknown wire dtype 'int64'"),
        (
            _open(next_hops=[_hop(6, 8)] * 9),
            InvalidInputError,
            None,
            "more next hops than blocks in the model",
        ),
        (
            _open(end=4, next_hops=[_hop(5, 6)]),
            InvalidInputError,
            None,
            "next hops must continue the route: expected a span from 4, got [5, 6)",
        ),
        (_open(next_hops=[_hop(6, 9)]), InvalidInputError, None, "got [6, 9)"),
        (_open(next_hops=[_hop(6, 6)]), InvalidInputError, None, "got [6, 6)"),
        (
            _open(next_hops=[_hop(6, 8, "localhost")]),
            InvalidInputError,
            None,
            "next hop: address 'localhost' is not host:port",
        ),
        (_open(next_hops=[_hop(6, 8, "h:0")]), InvalidInputError, None, "is not host:port"),
        (_open(next_hops=[_hop(6, 8, "bad host:80")]), InvalidInputError, None, "has an invalid host"),
        (_open(next_hops=[_hop(6, 8, "a" * 300 + ":80")]), InvalidInputError, None, "longer than 260"),
        (_open(push_token=b"x" * 15), InvalidInputError, None, "push_token must be 16 bytes, or empty"),
        (_open(push_token=b"x" * 17), InvalidInputError, None, "push_token must be 16 bytes"),
        (_open(next_hops=[_hop(6, 8, session_id="")]), InvalidInputError, None, "next hop: session_id"),
        (_open(next_hops=[_hop(6, 8, session_id="a\nb")]), InvalidInputError, None, "next hop: session_id"),
        (
            _open(next_hops=[_hop(6, 8, session_id="a" * (MAX_SESSION_ID_CHARS + 1))]),
            InvalidInputError,
            None,
            "next hop: session_id must be 1..128 printable characters",
        ),
        (_open(next_hops=[_hop(6, 8, push_token=b"")]), InvalidInputError, None, "push_token must be 16"),
        (_open(next_hops=[_hop(6, 8, push_token=b"x" * 32)]), InvalidInputError, None, "push_token"),
        (
            _open(next_hops=[_hop(6, 7), _hop(7, 8)] * 500_000),  # counted before a single hop is copied
            InvalidInputError,
            None,
            "more next hops than blocks in the model",
        ),
    ],
)
def test_bad_open_raises(
    request_: peer_pb2.OpenSession, error: type[Exception], limit: str | None, message: str
) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_open(request_, served=SERVED, limits=LIMITS)
    assert type(caught.value) is error
    assert getattr(caught.value, "limit", None) == limit
    assert message in str(caught.value)


def test_reroute_parses_like_next_hops() -> None:
    hops = [_hop(6, 7), _hop(7, 8)]
    assert parse_reroute(peer_pb2.Reroute(next_hops=hops), end=6, num_blocks=8) == tuple(hops)
    assert parse_hops([], end=6, num_blocks=8) == ()
    with pytest.raises(InvalidInputError, match="expected a span from 6"):
        parse_reroute(peer_pb2.Reroute(next_hops=[_hop(7, 8)]), end=6, num_blocks=8)
    for bad in (_hop(6, 8, push_token=b""), _hop(6, 8, session_id="")):
        with pytest.raises(InvalidInputError, match="next hop"):
            parse_reroute(peer_pb2.Reroute(next_hops=[bad]), end=6, num_blocks=8)
    with pytest.raises(InvalidInputError, match="more next hops than blocks"):
        parse_reroute(peer_pb2.Reroute(next_hops=[peer_pb2.Hop()] * 10**6), end=6, num_blocks=8)


# ---- Push ----------------------------------------------------------------------------------------------


def _push(token: bytes = TOKEN, **step: object) -> peer_pb2.PushRequest:
    return peer_pb2.PushRequest(step=peer_pb2.Step(**{"session_id": "s", **step}), push_token=token)  # type: ignore[arg-type]


def test_push_parses_its_claim() -> None:
    assert parse_push(_push()) == ("s", TOKEN)
    assert parse_push(_push(rollback_to=2)) == ("s", TOKEN)  # speculative rollbacks travel down the route


@pytest.mark.parametrize(
    ("request_", "error", "message"),
    [
        (_push(local_only=True), InvalidInputError, "a push cannot be local_only"),
        (_push(token=b""), PushRefused, "push refused"),
        (_push(token=TOKEN[:15]), PushRefused, "push refused"),
        (_push(token=TOKEN * 2), PushRefused, "push refused"),
        (_push(session_id=""), PushRefused, "push refused"),
        (_push(session_id="x" * (MAX_SESSION_ID_CHARS + 1)), PushRefused, "push refused"),
        (_push(session_id="a\x00b"), PushRefused, "push refused"),
    ],
    ids=["local only", "no token", "short token", "long token", "no id", "long id", "unprintable id"],
)
def test_bad_push_raises(request_: peer_pb2.PushRequest, error: type[Exception], message: str) -> None:
    with pytest.raises(Exception) as caught:
        parse_push(request_)
    assert type(caught.value) is error and str(caught.value) == message


# ---- steps ---------------------------------------------------------------------------------------------


def _session(*, batch: int = 2, position: int = 3, max_length: int = 16) -> PeerSession:
    return PeerSession(
        session_id="s",
        start=2,
        end=6,
        batch_size=batch,
        max_length=max_length,
        wire_dtype=torch.float32,
        position=position,
    )


def _step(hidden: peer_pb2.Tensor | None = None, **overrides: object) -> peer_pb2.Step:
    fields: dict[str, object] = dict(
        step_id=9, position=3, hidden=_zeros(2, 1, HIDDEN) if hidden is None else hidden
    )
    fields.update(overrides)
    return peer_pb2.Step(**fields)  # type: ignore[arg-type]


def test_step_parses_exactly() -> None:
    hidden = torch.randn(2, 2, HIDDEN)
    positions = torch.tensor([[3, 4], [3, 4]])
    beam = torch.tensor([1, 0])
    step = _step(
        to_message(hidden), position_ids=to_message(positions), beam_indices=to_message(beam), session_id="s"
    )
    parsed = parse_step(step, session=_session(), served=SERVED, limits=LIMITS)
    assert (parsed.step_id, parsed.base) == (9, 3)
    assert torch.equal(parsed.hidden, hidden)
    assert parsed.position_ids is not None and torch.equal(parsed.position_ids, positions)
    assert parsed.beam_indices is not None and torch.equal(parsed.beam_indices, beam)


def test_step_rollback_sets_the_base() -> None:
    parsed = parse_step(_step(position=1, rollback_to=1), session=_session(), served=SERVED, limits=LIMITS)
    assert parsed.base == 1 and parsed.position_ids is None and parsed.beam_indices is None


@pytest.mark.parametrize(
    ("step", "error", "message"),
    [
        (_step(session_id="other"), InvalidInputError, "step for another session"),
        (
            _step(_zeros(2, 1, HIDDEN, dtype=torch.int64)),
            InvalidInputError,
            "hidden: dtype 'int64' not allowed",
        ),
        (_step(_zeros(2, HIDDEN)), InvalidInputError, "hidden: expected 3 dims"),
        (
            _step(_zeros(1, 1, HIDDEN)),
            InvalidInputError,
            "hidden batch 1 does not match the session's batch 2",
        ),
        (_step(_zeros(2, 1, HIDDEN + 1)), InvalidInputError, "hidden size 9 does not match the model's 8"),
        (_step(_zeros(2, 0, HIDDEN)), InvalidInputError, "a step needs at least one new position"),
        (_step(rollback_to=4), InvalidInputError, "rollback_to 4 is past the cache's 3 positions"),
        (_step(position=2), PositionMismatch, "step starts at position 2 but the cache holds 3 positions"),
        (_step(position=0, rollback_to=1), PositionMismatch, "but the cache holds 1 positions"),
        (_step(_zeros(2, 14, HIDDEN)), InvalidInputError, "17 positions exceed the session's max_length 16"),
        (
            _step(position_ids=to_message(torch.tensor([[3], [3], [3]]))),
            InvalidInputError,
            "position_ids must be [2, 1], got [3, 1]",
        ),
        (
            _step(position_ids=to_message(torch.tensor([[128], [3]]))),
            InvalidInputError,
            "position_ids are outside 0..max_length",
        ),
        (
            _step(position_ids=to_message(torch.tensor([[3.0], [3.0]]))),
            InvalidInputError,
            "position_ids: dtype 'float32' not allowed",
        ),
        (
            _step(beam_indices=to_message(torch.tensor([0, 2]))),
            InvalidInputError,
            "beam_indices must be 2 indices in 0..1",
        ),
        (
            _step(beam_indices=to_message(torch.tensor([0]))),
            InvalidInputError,
            "beam_indices must be 2 indices in 0..1",
        ),
        (
            _step(peer_pb2.Tensor(dtype="float32", shape=[2, 10**6, 10**6], data=b"")),
            InvalidInputError,
            "more than the limit of 65536",
        ),
    ],
)
def test_bad_step_raises(step: peer_pb2.Step, error: type[Exception], message: str) -> None:
    with pytest.raises((InvalidInputError, PositionMismatch)) as caught:
        parse_step(step, session=_session(), served=SERVED, limits=LIMITS)
    assert type(caught.value) is error
    assert message in str(caught.value)


# ---- Forward / Backward --------------------------------------------------------------------------------


def test_forward_and_backward_parse_exactly() -> None:
    hidden, grad = torch.randn(2, 3, HIDDEN), torch.randn(2, 3, HIDDEN)
    prompts = torch.randn(2, 1, 1, HIDDEN)
    forward = parse_forward(
        peer_pb2.ForwardRequest(start=3, end=5, hidden=to_message(hidden), prompts=to_message(prompts)),
        served=SERVED,
        limits=LIMITS,
    )
    assert (forward.start, forward.end) == (3, 5) and torch.equal(forward.hidden, hidden)
    assert forward.prompts is not None and torch.equal(forward.prompts, prompts)
    request = peer_pb2.BackwardRequest(
        start=2, end=6, hidden=to_message(hidden), grad_output=to_message(grad)
    )
    backward = parse_backward(request, served=SERVED, limits=LIMITS)
    assert (backward.start, backward.end, backward.prompts) == (2, 6, None)
    assert torch.equal(backward.hidden, hidden) and torch.equal(backward.grad_output, grad)


@pytest.mark.parametrize(
    ("fields", "error", "limit", "message"),
    [
        (dict(start=0, end=4), InvalidInputError, None, "span [0, 4) is not served here"),
        (dict(hidden=_zeros(5, 1, HIDDEN)), PeerLimitError, "max_batch_size", "batch 5 x 1 positions exceed"),
        (dict(hidden=_zeros(2, 33, HIDDEN)), PeerLimitError, "max_forward_tokens", "batch x positions <= 64"),
        (dict(hidden=_zeros(1, 1, HIDDEN + 1)), InvalidInputError, None, "hidden size 9 does not match"),
        (dict(hidden=_zeros(1, 1, HIDDEN, dtype=torch.int64)), InvalidInputError, None, "not allowed"),
        (dict(prompts=_zeros(1, 1, HIDDEN)), InvalidInputError, None, "prompts: expected 4 dims"),
    ],
)
def test_bad_forward_raises(
    fields: dict[str, object], error: type[Exception], limit: str | None, message: str
) -> None:
    request = peer_pb2.ForwardRequest(**{"start": 2, "end": 6, "hidden": _zeros(1, 2, HIDDEN), **fields})
    with pytest.raises(InvalidInputError) as caught:
        parse_forward(request, served=SERVED, limits=LIMITS)
    assert type(caught.value) is error
    assert getattr(caught.value, "limit", None) == limit
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("shape", "num_blocks", "itemsize", "expected"),
    [
        ((1, 1, 8), 1, 4, 1 * 1 * 8 * 4 * 1 * 16),
        ((2, 3, 8), 4, 4, 2 * 3 * 8 * 4 * 4 * 16),
        ((2, 3, 8), 4, 2, 2 * 3 * 8 * 2 * 4 * 16),
        ((16, 1024, 4096), 10, 2, 16 * 1024 * 4096 * 2 * 10 * 16),
    ],
)
def test_backward_bytes_estimate(
    shape: tuple[int, int, int], num_blocks: int, itemsize: int, expected: int
) -> None:
    assert backward_bytes(shape, num_blocks, itemsize=itemsize) == expected


def test_backward_over_the_memory_bound_names_the_limit() -> None:
    # [1, 2, 8] fp32 through 4 blocks: 1 * 2 * 8 * 4 * 4 * 16 = 4096 bytes
    request = peer_pb2.BackwardRequest(
        start=2, end=6, hidden=_zeros(1, 2, HIDDEN), grad_output=_zeros(1, 2, HIDDEN)
    )
    at_limit = Limits(
        max_batch_size=4,
        max_length=128,
        max_forward_tokens=64,
        max_message_bytes=1 << 16,
        max_backward_bytes=4096,
    )
    assert parse_backward(request, served=SERVED, limits=at_limit).hidden.shape == (1, 2, HIDDEN)
    below = Limits(
        max_batch_size=4,
        max_length=128,
        max_forward_tokens=64,
        max_message_bytes=1 << 16,
        max_backward_bytes=4095,
    )
    with pytest.raises(
        PeerLimitError, match="needs about 4096 bytes of activations, more than this peer's 4095"
    ) as caught:
        parse_backward(request, served=SERVED, limits=below)
    assert caught.value.limit == "max_backward_bytes"
    narrower = peer_pb2.BackwardRequest(
        start=2, end=3, hidden=_zeros(1, 2, HIDDEN), grad_output=_zeros(1, 2, HIDDEN)
    )
    assert parse_backward(narrower, served=SERVED, limits=below).end == 3  # one block needs a quarter


def test_backward_needs_a_gradient_shaped_like_hidden() -> None:
    request = peer_pb2.BackwardRequest(
        start=2, end=6, hidden=_zeros(1, 2, HIDDEN), grad_output=_zeros(1, 3, HIDDEN)
    )
    with pytest.raises(
        InvalidInputError, match=r"grad_output shape \[1, 3, 8\] does not match hidden \[1, 2, 8\]"
    ):
        parse_backward(request, served=SERVED, limits=LIMITS)
    request = peer_pb2.BackwardRequest(
        start=2, end=6, hidden=_zeros(9, 1, HIDDEN), grad_output=_zeros(9, 1, HIDDEN)
    )
    with pytest.raises(PeerLimitError) as caught:
        parse_backward(request, served=SERVED, limits=LIMITS)
    assert caught.value.limit == "max_batch_size"


# ---- carried outputs (Step.carried) ----------------------------------------------------------------------


def _carried(count: int, *, start: int = 2, **overrides: object) -> peer_pb2.Step:
    """A pushed step into a span starting at `start`, carrying `count` earlier hops' outputs."""
    outputs = [to_message(torch.full((2, 1, HIDDEN), float(i))) for i in range(count)]
    fields: dict[str, object] = dict(carried=outputs, carried_seconds=[0.001] * count)
    fields.update(overrides)
    return _step(**fields)


def _pushed_into(start: int) -> PeerSession:
    session = _session()
    session.start = start
    return session


def test_a_pushed_step_carries_earlier_outputs_undecoded() -> None:
    step = _carried(2)
    parsed = parse_step(step, session=_session(), served=SERVED, limits=LIMITS, pushed=True)
    assert parsed.base == 3 and tuple(parsed.hidden.shape) == (2, 1, HIDDEN)
    # int8 outputs carry their scales and outliers: sizes are checked, values never read
    int8 = [to_message(torch.randn(2, 1, HIDDEN), dtype=torch.int8) for _ in range(2)]
    step = _step(int8[0], carried=int8[1:], carried_seconds=[0.5])
    parse_step(step, session=_session(), served=SERVED, limits=LIMITS, pushed=True)
    # a hop deep in a long model: one output per block before it, at most MAX_CARRIED
    parse_step(
        _carried(MAX_CARRIED, start=100), session=_pushed_into(100), served=SERVED, limits=LIMITS, pushed=True
    )


def _short(message: peer_pb2.Tensor) -> peer_pb2.Tensor:
    message.data = message.data[:-1]
    return message


def _with_scales(message: peer_pb2.Tensor) -> peer_pb2.Tensor:
    message.scales = b"\0" * 4
    return message


BAD_CARRIED = {
    "a client's own step": (_carried(1), False, 2, "carried outputs come only with a push"),
    "a client's seconds alone": (_step(carried_seconds=[1.0]), False, 2, "only with a push"),
    "more than blocks before": (_carried(3), True, 2, "a step into block 2 can have at most 2"),
    "more than the cap": (_carried(MAX_CARRIED + 1), True, 100, f"can have at most {MAX_CARRIED}"),
    "seconds missing": (_carried(2, carried_seconds=[0.1]), True, 2, "1 carried_seconds for 2 carried"),
    "and reported": (_carried(1, report_outputs=True), True, 2, "with report_outputs carries no outputs"),
    "another dtype": (
        _step(carried=[_zeros(2, 1, HIDDEN, dtype=torch.float16)], carried_seconds=[0.0]),
        True,
        2,
        "carried[0]: dtype 'float16', expected the hidden's 'float32'",
    ),
    "another shape": (
        _step(carried=[_zeros(2, 2, HIDDEN)], carried_seconds=[0.0]),
        True,
        2,
        "carried[0]: shape [2, 2, 8], expected [2, 1, 8]",
    ),
    "more dims": (
        _step(carried=[_zeros(2, 1, HIDDEN, 1)], carried_seconds=[0.0]),
        True,
        2,
        "carried[0]: shape [2, 1, 8, 1]",
    ),
    "a byte short": (
        _step(carried=[_short(_zeros(2, 1, HIDDEN))], carried_seconds=[0.0]),
        True,
        2,
        "carried[0]: its bytes do not match shape [2, 1, 8] of float32",
    ),
    "scales on a float": (
        _step(carried=[_with_scales(_zeros(2, 1, HIDDEN))], carried_seconds=[0.0]),
        True,
        2,
        "carried[0]: its bytes do not match",
    ),
    "int8 without its scales": (
        _step(
            to_message(torch.randn(2, 1, HIDDEN), dtype=torch.int8),
            carried=[peer_pb2.Tensor(dtype="int8", shape=[2, 1, HIDDEN], data=b"\0" * 16, block=64)],
            carried_seconds=[0.0],
        ),
        True,
        2,
        "carried[0]: its bytes do not match shape [2, 1, 8] of int8",
    ),
}


@pytest.mark.parametrize(("step", "pushed", "start", "message"), BAD_CARRIED.values(), ids=BAD_CARRIED.keys())
def test_bad_carried_outputs_raise(step: peer_pb2.Step, pushed: bool, start: int, message: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        parse_step(step, session=_pushed_into(start), served=SERVED, limits=LIMITS, pushed=pushed)
    assert message in str(caught.value)


def test_a_push_carrying_outputs_is_admitted_by_its_size() -> None:
    """The push budget counts carried outputs: a push may be as large as its hidden states times the hops it
    carries, no more, and never carries more outputs than blocks come before its hop."""
    session = PeerSession(
        session_id="s", start=2, end=6, batch_size=2, max_length=16, wire_dtype=torch.float32
    )
    step = _carried(2, position=0)
    nbytes = step.ByteSize() + 64
    check_shape(step, session=session, hidden_size=HIDDEN, nbytes=nbytes)
    assert max_step_bytes(2, 1, HIDDEN, carried=2) - max_step_bytes(2, 1, HIDDEN) >= 2 * 2 * HIDDEN * 4
    with pytest.raises(InvalidInputError, match="is more than a"):
        check_shape(
            step, session=session, hidden_size=HIDDEN, nbytes=max_step_bytes(2, 1, HIDDEN, carried=2) + 1
        )
    with pytest.raises(InvalidInputError, match="cannot carry 3 outputs"):
        check_shape(_carried(3, position=0), session=session, hidden_size=HIDDEN, nbytes=nbytes)
