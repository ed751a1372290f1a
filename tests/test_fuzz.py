"""Property-based fuzzing of every RPC of an in-process peer (the real servicer, tests/fakes.py) with random
and hostile messages: every call ends with a clear status (never INTERNAL, never a hang), and afterwards the
peer still serves a well-behaved client exactly. The DHT record validator gets random, oversized and tampered
records: it never raises, and what it accepts is within its caps. Bounded and derandomized, so CI runs the
same cases."""

from __future__ import annotations

import math

import grpc
import pytest
import torch
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import DHTRecord
from hivemind.utils.serializer import MSGPackSerializer
from hivemind.utils.timed_storage import get_dht_time
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from records_factory import peer_record
from test_inprocess import ONE_PER_SPAN, assert_exact, reference, run

from protos import peer_pb2, peer_pb2_grpc
from protos.identity import Identity
from protos.records import block_key, record_to_dht
from protos.tensors import to_message
from protos.validation import (
    CLOCK_SKEW_MARGIN,
    INDEX_KEY_ID,
    MAX_NUM_BLOCKS,
    MAX_RECORD_TTL,
    MAX_VALUE_BYTES,
    SIGNATURE_MAGIC,
    SignedRecordValidator,
    schema_error_of,
)

HIDDEN = 64  # the tiny Llama's width
CALL_TIMEOUT = 10.0  # seconds; a call still running then counts as a hang
# what a peer may answer to a hostile request: all but INTERNAL/UNKNOWN (its own bug) and a hang
ALLOWED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.CANCELLED,
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

_int64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_uint32 = st.integers(min_value=0, max_value=2**32 - 1)
_small = st.integers(min_value=0, max_value=6)


@st.composite
def tensors(draw: st.DrawFn) -> peer_pb2.Tensor:
    """Garbage, near-valid (a right shape with wrong bytes or odd values) or valid hidden states."""
    kind = draw(st.sampled_from(["garbage", "hidden", "huge"]))
    if kind == "garbage":
        dtype = draw(
            st.sampled_from(["float32", "float16", "bfloat16", "int64", "int32", "", "float64", "x" * 40])
        )
        shape = draw(st.lists(st.one_of(_int64, _small), max_size=10))
        return peer_pb2.Tensor(dtype=dtype, shape=shape, data=draw(st.binary(max_size=2048)))
    if kind == "huge":  # zero elements claimed with enormous dims, or a few bytes claiming a lot
        return peer_pb2.Tensor(
            dtype="float32", shape=[0, 2**62, 2**62] if draw(st.booleans()) else [2**31, 2**31]
        )
    batch, seq = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    value = draw(st.sampled_from([0.0, 1.0, -1e30, math.inf, math.nan]))
    width = draw(st.sampled_from([HIDDEN, HIDDEN, 63, 1]))
    return to_message(torch.full((batch, seq, width), value))


def _hops() -> st.SearchStrategy[list[peer_pb2.Hop]]:
    hop = st.builds(
        peer_pb2.Hop,
        peer_id=st.text(max_size=20),
        address=st.sampled_from(
            ["127.0.0.1:1", "unix:/tmp/x:1", "dns:///a:1", "h:0", "", "[::1]:70000", "a" * 300]
        ),
        start=_small,
        end=_small,
        session_id=st.text(max_size=20),
        push_token=st.binary(max_size=20),
    )
    return st.lists(hop, max_size=4)


@st.composite
def steps(draw: st.DrawFn) -> peer_pb2.Step:
    step = peer_pb2.Step(
        session_id=draw(st.text(max_size=40)),
        step_id=draw(st.integers(0, 2**64 - 1)),
        position=draw(st.one_of(_small, _uint32)),
        hidden=draw(tensors()),
        local_only=draw(st.booleans()),
    )
    if draw(st.booleans()):
        step.position_ids.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        step.beam_indices.CopyFrom(draw(tensors()))
    if draw(st.booleans()):
        step.rollback_to = draw(st.one_of(_small, _uint32))
    return step


@st.composite
def session_requests(draw: st.DrawFn) -> list[peer_pb2.SessionRequest]:
    opened = peer_pb2.OpenSession(
        session_id=draw(st.text(max_size=200)),
        start=draw(_small),
        end=draw(_small),
        max_length=draw(st.one_of(_small, _uint32)),
        batch_size=draw(st.one_of(_small, _uint32)),
        dtype=draw(st.sampled_from(["", "float32", "bfloat16", "int64", "nope"])),
        next_hops=draw(_hops()),
        report_outputs=draw(st.booleans()),
        push_token=draw(st.binary(max_size=20)),
    )
    later = st.one_of(
        st.builds(lambda step: peer_pb2.SessionRequest(step=step), steps()),
        st.builds(lambda hops: peer_pb2.SessionRequest(reroute=peer_pb2.Reroute(next_hops=hops)), _hops()),
        st.just(peer_pb2.SessionRequest(close=peer_pb2.Close())),
        st.builds(lambda o: peer_pb2.SessionRequest(open=o), st.just(opened)),
    )
    first = peer_pb2.SessionRequest(open=opened) if draw(st.booleans()) else draw(later)
    return [first, *draw(st.lists(later, max_size=4))]


def _check(error: grpc.RpcError) -> None:
    code = error.code()  # type: ignore[attr-defined]
    assert code in ALLOWED, f"{code}: {error.details()}"  # type: ignore[attr-defined]


@pytest.fixture
def peer(fake_swarm):
    swarm = fake_swarm(ONE_PER_SPAN)
    target = swarm.peers[1]  # blocks [1, 3): pushes may name the others as next hops
    channel = grpc.insecure_channel(target.address)
    yield swarm, target, peer_pb2_grpc.PeerStub(channel)
    channel.close()


def _still_exact(swarm, connect) -> None:
    assert_exact(run(connect(swarm)).outputs, reference(swarm))


def test_fuzzed_sessions(peer, connect) -> None:
    swarm, target, stub = peer

    @FUZZ
    @given(session_requests())
    def one_stream(requests: list[peer_pb2.SessionRequest]) -> None:
        try:
            for reply in stub.Session(iter(requests), timeout=CALL_TIMEOUT):
                if reply.WhichOneof("kind") == "error":
                    assert grpc.StatusCode.INTERNAL.value[0] != reply.error.code, reply.error.message
        except grpc.RpcError as error:
            _check(error)

    one_stream()
    _still_exact(swarm, connect)
    assert target.num_sessions == 0  # every fuzzed stream ended and released its session


def test_fuzzed_pushes(peer, connect) -> None:
    swarm, _, stub = peer

    @FUZZ
    @given(steps(), st.binary(max_size=20))
    def one_push(step: peer_pb2.Step, token: bytes) -> None:
        try:
            stub.Push(peer_pb2.PushRequest(step=step, push_token=token), timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            _check(error)

    one_push()
    _still_exact(swarm, connect)


def test_fuzzed_forward_and_backward(peer, connect) -> None:
    swarm, _, stub = peer

    @FUZZ
    @given(st.booleans(), _small, _small, tensors(), tensors(), st.one_of(st.none(), tensors()))
    def one_call(backward: bool, start: int, end: int, hidden, grad, prompts) -> None:
        try:
            if backward:
                request = peer_pb2.BackwardRequest(start=start, end=end, hidden=hidden, grad_output=grad)
                if prompts is not None:
                    request.prompts.CopyFrom(prompts)
                stub.Backward(request, timeout=CALL_TIMEOUT)
            else:
                forward = peer_pb2.ForwardRequest(start=start, end=end, hidden=hidden)
                if prompts is not None:
                    forward.prompts.CopyFrom(prompts)
                stub.Forward(forward, timeout=CALL_TIMEOUT)
        except grpc.RpcError as error:
            _check(error)

    one_call()
    _still_exact(swarm, connect)


# ---- the DHT record validator (protos.validation): every replica and reader runs it on network input ----

_SIGNER = Identity.load_or_create(None)
_BLOCK_KEY_ID = DHTID.generate(block_key("fuzz-model", 0)).to_bytes()
_msgpack_values = st.recursive(
    st.none() | st.booleans() | _int64 | st.floats() | st.text(max_size=40) | st.binary(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _values(draw: st.DrawFn, *, valid: bool = False) -> object:
    """A value before signing: a valid record or index entry, one with a field changed, or junk."""
    record = record_to_dht(peer_record(0, draw(st.integers(1, 4))))
    index = {"model_id": "fuzz-model", "num_blocks": draw(st.integers(1, MAX_NUM_BLOCKS))}
    base = draw(st.sampled_from([record, index]))
    kind = "valid" if valid else draw(st.sampled_from(["valid", "changed", "padded", "junk"]))
    if kind == "changed":
        return base | {draw(st.sampled_from([*base, "extra"])): draw(_msgpack_values)}
    if kind == "padded":  # beyond the size cap, however valid the rest
        return base | {"public_name": "x" * draw(st.integers(MAX_VALUE_BYTES, 4 * MAX_VALUE_BYTES))}
    return base if kind == "valid" else draw(_msgpack_values)


def _mostly(usual: st.SearchStrategy, unusual: st.SearchStrategy) -> st.SearchStrategy:
    """`usual` three times in four: most records get far enough to reach the schema and signature checks."""
    return st.sampled_from([True, True, True, False]).flatmap(lambda take: usual if take else unusual)


@st.composite
def dht_records(draw: st.DrawFn) -> DHTRecord:
    key = draw(_mostly(st.sampled_from([INDEX_KEY_ID, _BLOCK_KEY_ID]), st.binary(max_size=24)))
    subkey = draw(
        _mostly(
            st.just(MSGPackSerializer.dumps(_SIGNER.peer_id)),
            st.sampled_from([b"", MSGPackSerializer.dumps(None)])
            | st.binary(max_size=60)
            | st.builds(MSGPackSerializer.dumps, st.text(max_size=60)),
        )
    )
    ahead = st.sampled_from([60.0, MAX_RECORD_TTL + 5, MAX_RECORD_TTL + CLOCK_SKEW_MARGIN + 1, 1e9, -10.0])
    expiration = draw(
        _mostly(
            ahead.map(lambda seconds: get_dht_time() + seconds),
            st.floats(allow_nan=True, allow_infinity=True) | _int64,
        )
    )
    kind = draw(
        st.sampled_from(["signed", "signed", "signed", "flipped", "random", "oversized", "not bytes"])
    )
    if kind == "random":
        value: object = draw(st.binary(max_size=512))
    elif kind == "oversized":
        value = (
            draw(st.binary(min_size=1, max_size=64)) * (MAX_VALUE_BYTES // 32) + SIGNATURE_MAGIC + bytes(64)
        )
    elif kind == "not bytes":
        value = draw(_msgpack_values.filter(lambda value: not isinstance(value, bytes)))
    else:
        plain = draw(_values(valid=kind in ("flipped", "replayed")))  # tampered after signing
        unsigned = DHTRecord(key, subkey, MSGPackSerializer.dumps(plain), expiration)
        value = SignedRecordValidator(_SIGNER).sign_value(unsigned)
        if kind == "flipped" and value:
            at = draw(st.integers(0, len(value) - 1) | st.integers(max(0, len(value) - 64), len(value) - 1))
            value = value[:at] + bytes([value[at] ^ 1]) + value[at + 1 :]
        if kind == "replayed":  # a signed entry given another lifetime
            expiration = draw(st.sampled_from([1.0, -1.0])) + expiration
    return DHTRecord(key, subkey, value, expiration)  # type: ignore[arg-type]


def test_fuzzed_dht_records() -> None:
    validator = SignedRecordValidator()
    accepted: list[DHTRecord] = []

    @settings(FUZZ, max_examples=400)  # no RPC per example: cheap
    @given(dht_records())
    def one_record(record: DHTRecord) -> None:
        valid = validator.validate(record)  # must not raise, whatever the record holds
        stripped = validator.strip_value(record)
        if not valid:
            return
        accepted.append(record)
        assert isinstance(record.value, bytes) and len(record.value) <= MAX_VALUE_BYTES
        assert record.expiration_time <= get_dht_time() + MAX_RECORD_TTL + CLOCK_SKEW_MARGIN
        assert MSGPackSerializer.loads(record.subkey) == _SIGNER.peer_id
        assert schema_error_of(record.key, stripped) is None

    one_record()
    assert accepted  # the strategy reaches valid records too: the checks above ran
