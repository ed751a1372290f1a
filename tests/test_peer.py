"""A real `corolla dht` and real `corolla serve` processes on 127.0.0.1, driven over gRPC."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Iterator

import grpc
import psutil
import pytest
import torch
from swarm import Process, certificate, channel, running, start_peer

from peer.blocks import HostedSpan
from protos import peer_pb2, peer_pb2_grpc, tls
from protos.dht import start_dht_node
from protos.errors import LIMIT_METADATA_KEY
from protos.records import PeerState, block_key, record_from_dht
from protos.tensors import from_message, to_message

HIDDEN = 64
MAX_MESSAGE = 1 << 20
LIMITS = ["--max-batch-size", "4", "--max-length", "128", "--max-message-bytes", str(MAX_MESSAGE)]
LIMITS += ["--max-forward-tokens", "256", "--max-cache-tokens", "1024", "--throughput", "100"]
LIMITS += ["--announce-period", "2", "--max-client-cache-tokens", "1024"]
LIMITS += ["--model-id", "llama"]  # the id the records are read under

pytestmark = pytest.mark.swarm  # real DHT and peer processes


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT ("dht"), "full" serving [0,4), "first" [0,2) and "second" [2,4), all with LIMITS."""
    logs = tmp_path_factory.mktemp("peer-logs")
    with running(logs, checkpoint("llama"), ["0:4", "0:2", "2:4"], *LIMITS) as swarm:
        yield {"dht": swarm.dht, **dict(zip(["full", "first", "second"], swarm.peers, strict=True))}


@pytest.fixture(scope="module")
def local_span(checkpoint) -> HostedSpan:
    return HostedSpan.load(checkpoint("llama"), 0, 4)


def stub(process: Process) -> peer_pb2_grpc.PeerStub:
    return peer_pb2_grpc.PeerStub(
        channel(process, options=[("grpc.max_send_message_length", 4 * MAX_MESSAGE)])
    )


class Stream:
    """A Session stream driven one message at a time."""

    def __init__(self, process: Process) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub(process).Session(iter(self._requests.get, None), timeout=60)
        self.error: grpc.RpcError | None = None

    def send(self, **kind) -> None:
        self._requests.put(peer_pb2.SessionRequest(**kind))

    def receive(self) -> peer_pb2.SessionReply:
        return next(self._replies)

    def open(self, session_id: str, *, start=0, end=4, batch=1, max_length=64, next_hops=(), push_token=b""):
        self.send(
            open=peer_pb2.OpenSession(
                session_id=session_id,
                start=start,
                end=end,
                batch_size=batch,
                max_length=max_length,
                dtype="float32",
                next_hops=list(next_hops),
                push_token=push_token,
            )
        )
        return self.receive()

    def step(self, step_id: int, position: int, hidden: torch.Tensor, **fields) -> peer_pb2.SessionReply:
        self.send(step=peer_pb2.Step(step_id=step_id, position=position, hidden=to_message(hidden), **fields))
        return self.receive()

    def close(self) -> None:
        self._requests.put(None)


def _wait_idle(process: Process, timeout: float = 10.0) -> peer_pb2.InfoReply:
    """Info once no session is open: a session closes on the peer shortly after its stream ends."""
    deadline = time.monotonic() + timeout
    while (info := stub(process).Info(peer_pb2.InfoRequest(), timeout=30)).num_sessions:
        assert time.monotonic() < deadline, f"{info.num_sessions} sessions still open after {timeout}s"
        time.sleep(0.05)
    return info


def _limit(error: grpc.RpcError) -> str | None:
    """The peer limit an INVALID_ARGUMENT names in its trailing metadata; None for a protocol error."""
    return dict(error.trailing_metadata() or ()).get(LIMIT_METADATA_KEY)


def _hidden(batch: int, seq: int, seed: int) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _result(reply: peer_pb2.SessionReply) -> torch.Tensor:
    assert reply.WhichOneof("kind") == "result", reply
    return from_message(reply.result.hidden, max_bytes=MAX_MESSAGE)


@pytest.mark.parametrize("batch", [1, 2])
def test_session_prefill_and_decode_match_local_span(swarm, local_span: HostedSpan, batch: int) -> None:
    stream = Stream(swarm["full"])
    assert stream.open(f"parity-{batch}", batch=batch).opened.max_length == 64
    cache = local_span.new_cache()
    position = 0
    for step_id, seq in enumerate([7] + [1] * 10):
        hidden = _hidden(batch, seq, step_id)
        positions = torch.arange(position, position + seq).expand(batch, -1)
        reply = stream.step(step_id, position, hidden, position_ids=to_message(positions))
        torch.testing.assert_close(
            _result(reply), local_span.forward(hidden, cache, positions), atol=1e-5, rtol=0
        )
        position += seq
        assert reply.result.position == position
    stream.close()


def test_forward_matches_local_span(swarm, local_span: HostedSpan) -> None:
    hidden = _hidden(2, 9, 42)
    reply = stub(swarm["full"]).Forward(peer_pb2.ForwardRequest(start=1, end=3, hidden=to_message(hidden)))
    expected = local_span.forward(hidden, start=1, end=3)
    torch.testing.assert_close(from_message(reply.hidden, max_bytes=MAX_MESSAGE), expected, atol=1e-5, rtol=0)


def _hop_to(process: Process, session_id: str, token: bytes, pem: bytes) -> peer_pb2.Hop:
    """A next hop at `process` serving blocks [2, 4), trusted with certificate `pem`."""
    return peer_pb2.Hop(
        peer_id=process.peer_id,
        address=process.address,
        start=2,
        end=4,
        session_id=session_id,
        push_token=token,
        certificate=pem,
    )


def test_push_chain_matches_both_spans_locally(swarm, local_span: HostedSpan) -> None:
    first, second = swarm["first"], swarm["second"]
    last = Stream(second)
    token = os.urandom(16)
    assert last.open("chain-b", start=2, end=4, push_token=token).WhichOneof("kind") == "opened"
    head = Stream(first)
    # the pushing peer trusts only this certificate for that peer
    hop = _hop_to(second, "chain-b", token, certificate(second))
    assert head.open("chain-a", start=0, end=2, next_hops=[hop]).WhichOneof("kind") == "opened"
    cache = local_span.new_cache()
    position = 0
    for step_id, seq in enumerate([6, 1, 1, 1]):
        hidden = _hidden(1, seq, 100 + step_id)
        head.send(step=peer_pb2.Step(step_id=step_id, position=position, hidden=to_message(hidden)))
        reply = last.receive()  # the last hop answers the client on its own stream
        assert reply.result.step_id == step_id and reply.result.peer_id == second.peer_id
        torch.testing.assert_close(_result(reply), local_span.forward(hidden, cache), atol=1e-5, rtol=0)
        position += seq
    head.close()
    last.close()


def test_a_push_to_a_hop_whose_certificate_is_another_peers_is_refused(swarm) -> None:
    """A client (or a forged record) naming `second` at its address with `full`'s certificate: the first peer
    refuses to push there, and the client hears it as a failure of that hop (UNAUTHENTICATED)."""
    first, second = swarm["first"], swarm["second"]
    last = Stream(second)
    token = os.urandom(16)
    assert last.open("tls-b", start=2, end=4, push_token=token).WhichOneof("kind") == "opened"
    head = Stream(first)
    hop = _hop_to(second, "tls-b", token, certificate(swarm["full"]))
    assert head.open("tls-a", start=0, end=2, next_hops=[hop]).WhichOneof("kind") == "opened"
    head.send(step=peer_pb2.Step(step_id=7, position=0, hidden=to_message(_hidden(1, 3, 5))))
    error = head.receive().error
    assert error.code == grpc.StatusCode.UNAUTHENTICATED.value[0] and error.peer_id == second.peer_id
    head.close()
    last.close()


def test_dht_shows_records_and_offline_after_sigterm(checkpoint, swarm, tmp_path) -> None:
    _wait_idle(swarm["full"])  # the announced free cache is then the whole budget, once re-announced
    deadline = time.monotonic() + 30
    while True:
        records = _read_records(swarm["dht"].maddrs, "llama", 4)
        full = records[0].get(swarm["full"].peer_id)
        if (full is not None and full.free_cache_tokens == 1024) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert full is not None, "the full peer's record is missing"
    assert (full.start, full.end, full.address, full.dtype) == (0, 4, swarm["full"].address, "float32")
    assert full.state is PeerState.ONLINE and full.throughput == 25.0  # 100 steps/s per block, 4 blocks
    assert (full.free_cache_tokens, full.max_length) == (1024, 128)
    assert (full.max_batch_size, full.max_forward_tokens) == (4, 256)
    assert all(swarm["second"].peer_id in records[block] for block in (2, 3))
    assert swarm["second"].peer_id not in records[0]

    extra = start_peer(tmp_path, checkpoint("llama"), "1:2", swarm["dht"].maddrs, *LIMITS, name="extra")
    try:
        assert extra.peer_id in _read_records(swarm["dht"].maddrs, "llama", 4)[1]
    finally:
        assert extra.stop() == 0
    after = _read_records(swarm["dht"].maddrs, "llama", 4)[1].get(extra.peer_id)
    assert after is None or after.state is PeerState.OFFLINE
    assert "stopped" in extra.text()
    assert extra.ready() is None  # a stopped peer removes its ready file


def test_ready_file_describes_the_peer(swarm) -> None:
    full = swarm["full"]
    expected = {"address": full.address, "start": 0, "end": 4, "model_id": "llama", "pid": full.popen.pid}
    expected["metrics_port"] = None  # no --metrics-port
    expected["relay_maddrs"] = []  # dialed directly: loopback peers are not checked
    ready = full.ready()
    assert ready is not None and tls.binds(ready.pop("certificate").encode(), full.peer_id)
    assert ready == {"peer_id": full.peer_id, **expected}
    assert full.peer_id == stub(full).Info(peer_pb2.InfoRequest(), timeout=30).peer_id
    dht = swarm["dht"].ready()
    assert dht == {"maddrs": swarm["dht"].maddrs, "pid": swarm["dht"].popen.pid} and dht["maddrs"]


def _read_records(maddrs: list[str], model_id: str, num_blocks: int) -> list[dict]:
    async def read() -> list[dict]:
        node = await start_dht_node(initial_peers=maddrs, client_mode=True)
        try:
            keys = [block_key(model_id, block) for block in range(num_blocks)]
            found = await node.get_many(keys, sufficient_expiration_time=float("inf"))
            blocks = []
            for key in keys:
                entry = found.get(key)
                value = entry.value if entry is not None else {}
                blocks.append(
                    {sub: record_from_dht(item.value) for sub, item in (value or {}).items()}
                    if isinstance(value, dict)
                    else {}
                )
            return blocks
        finally:
            await node.shutdown()

    return asyncio.run(read())


def _open(**overrides) -> peer_pb2.SessionRequest:
    fields = dict(session_id="bad", start=0, end=4, batch_size=1, max_length=64, dtype="float32")
    fields.update(overrides)
    return peer_pb2.SessionRequest(open=peer_pb2.OpenSession(**fields))


def _step(hidden=None, **overrides) -> peer_pb2.SessionRequest:
    message = (
        hidden
        if isinstance(hidden, peer_pb2.Tensor)
        else to_message(_hidden(1, 1, 0) if hidden is None else hidden)
    )
    fields = dict(step_id=7, position=0, hidden=message)
    fields.update(overrides)
    return peer_pb2.SessionRequest(step=peer_pb2.Step(**fields))


def _garbage_bytes() -> peer_pb2.Tensor:
    message = to_message(_hidden(1, 1, 0))
    message.data = message.data[:-3]
    return message


INVALID = grpc.StatusCode.INVALID_ARGUMENT
OPEN_ERRORS = [  # (case, request, code, message, the peer limit named in the trailing metadata)
    ("span not hosted", _open(start=0, end=5), INVALID, "not served here", None),
    ("batch over limit", _open(batch_size=5), INVALID, "batch_size 5", "max_batch_size"),
    ("length over limit", _open(max_length=129), INVALID, "max_length 129", "max_length"),
    ("zero length", _open(max_length=0), INVALID, "max_length 0", None),
    ("unknown wire dtype", _open(dtype="float64"), INVALID, "dtype", None),
    ("first message not open", _step(), INVALID, "first message", None),
    ("empty session id", _open(session_id=""), INVALID, "session_id", None),
    (
        "next hop not contiguous",
        _open(end=2, next_hops=[peer_pb2.Hop(address="127.0.0.1:1", start=3, end=4)]),
        INVALID,
        "continue the route",
        None,
    ),
    (
        "next hop address",
        _open(end=2, next_hops=[peer_pb2.Hop(address="nowhere", start=2, end=4)]),
        INVALID,
        "next hop: address 'nowhere' is not host:port",
        None,
    ),
]

STEP_ERRORS = [
    ("wrong dtype", _step(_hidden(1, 1, 0).to(torch.int32)), grpc.StatusCode.INVALID_ARGUMENT, "dtype"),
    (
        "wrong hidden size",
        _step(torch.zeros(1, 1, HIDDEN + 1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden size",
    ),
    ("position skips ahead", _step(position=3), grpc.StatusCode.FAILED_PRECONDITION, "position 3"),
    ("batch differs", _step(torch.zeros(2, 1, HIDDEN)), grpc.StatusCode.INVALID_ARGUMENT, "batch 2"),
    (
        "longer than max_length",
        _step(torch.zeros(1, 65, HIDDEN)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_length",
    ),
    ("truncated tensor bytes", _step(_garbage_bytes()), grpc.StatusCode.INVALID_ARGUMENT, "bytes"),
    (
        "garbage shape",
        _step(peer_pb2.Tensor(dtype="float32", shape=[10**6, 10**6, 64], data=b"\0" * 8)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden",
    ),
    (
        "zero elements, huge dims",
        _step(peer_pb2.Tensor(dtype="float32", shape=[0, 2**62, 2**62])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "hidden",
    ),
    (
        "beam indices out of range",
        _step(beam_indices=to_message(torch.tensor([3]))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "beam_indices",
    ),
]


@pytest.mark.parametrize(
    ("case", "request_", "code", "message", "limit"), OPEN_ERRORS, ids=[c[0] for c in OPEN_ERRORS]
)
def test_bad_open_gets_a_clear_status(swarm, case, request_, code, message, limit) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(swarm["full"]).Session(iter([request_]), timeout=30))
    assert caught.value.code() == code
    assert message in caught.value.details()
    assert _limit(caught.value) == limit


FORWARD_ERRORS = [  # (case, hidden shape, message, the peer limit named in the trailing metadata)
    ("batch over limit", (5, 1, HIDDEN), "batch 5 x 1 positions exceed the peer's limits", "max_batch_size"),
    ("tokens over limit", (2, 129, HIDDEN), "batch x positions <= 256", "max_forward_tokens"),
    ("wrong hidden size", (1, 1, HIDDEN + 1), "hidden size 65 does not match", None),
]


@pytest.mark.parametrize(
    ("case", "shape", "message", "limit"), FORWARD_ERRORS, ids=[c[0] for c in FORWARD_ERRORS]
)
@pytest.mark.parametrize("rpc", ["Forward", "Backward"])
def test_bad_forward_and_backward_get_a_clear_status(swarm, rpc, case, shape, message, limit) -> None:
    hidden = to_message(torch.zeros(*shape))
    if rpc == "Forward":
        request = peer_pb2.ForwardRequest(start=0, end=4, hidden=hidden)
    else:
        request = peer_pb2.BackwardRequest(start=0, end=4, hidden=hidden, grad_output=hidden)
    with pytest.raises(grpc.RpcError) as caught:
        getattr(stub(swarm["full"]), rpc)(request, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()
    assert _limit(caught.value) == limit


@pytest.mark.parametrize(
    ("case", "request_", "code", "message"), STEP_ERRORS, ids=[c[0] for c in STEP_ERRORS]
)
def test_bad_step_gets_a_clear_status_and_changes_nothing(
    swarm, local_span, case, request_, code, message
) -> None:
    stream = Stream(swarm["full"])
    stream.open(f"bad-step-{case}")
    stream.send(**{"step": request_.step})
    reply = stream.receive()
    assert reply.WhichOneof("kind") == "error", reply
    assert reply.error.code == code.value[0] and message in reply.error.message
    # the session is unchanged: a correct first step still works and matches
    hidden = _hidden(1, 3, 5)
    torch.testing.assert_close(
        _result(stream.step(8, 0, hidden)), local_span.forward(hidden, local_span.new_cache())
    )
    stream.close()


def _push_refusal(process: Process, request: peer_pb2.PushRequest) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as caught:
        stub(process).Push(request, timeout=30)
    return caught.value


def test_push_without_the_token_is_refused_and_changes_nothing(swarm, local_span: HostedSpan) -> None:
    full, token = swarm["full"], os.urandom(16)
    victim = Stream(full)
    assert victim.open("victim", push_token=token).WhichOneof("kind") == "opened"
    hidden = _hidden(1, 4, 11)
    cache = local_span.new_cache()
    torch.testing.assert_close(_result(victim.step(0, 0, hidden)), local_span.forward(hidden, cache))
    forged = _step(_hidden(1, 1, 99), position=3, rollback_to=3, session_id="victim").step
    refusals = {
        "wrong token": peer_pb2.PushRequest(step=forged, push_token=os.urandom(16)),
        "no token": peer_pb2.PushRequest(step=forged),
        "short token": peer_pb2.PushRequest(step=forged, push_token=token[:8]),
        "unknown id, right token": peer_pb2.PushRequest(
            step=_step(session_id="nobody").step, push_token=token
        ),
        "unknown id": peer_pb2.PushRequest(step=_step(session_id="nobody").step, push_token=os.urandom(16)),
    }
    answers = {case: _push_refusal(full, request) for case, request in refusals.items()}
    # one answer for all: a stranger cannot even tell whether the id exists
    assert {(e.code(), e.details()) for e in answers.values()} == {
        (grpc.StatusCode.PERMISSION_DENIED, "push refused")
    }, answers
    # the session went on as if nothing had been pushed: same position, same next output
    following = _hidden(1, 1, 12)
    reply = victim.step(1, 4, following)
    assert reply.result.position == 5
    torch.testing.assert_close(_result(reply), local_span.forward(following, cache))
    victim.close()


def test_session_without_a_token_takes_no_pushes(swarm) -> None:
    stream = Stream(swarm["full"])
    stream.open("no-pushes")
    error = _push_refusal(swarm["full"], peer_pb2.PushRequest(step=_step(session_id="no-pushes").step))
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    stream.close()


def test_local_only_push_is_invalid(swarm) -> None:
    request = peer_pb2.PushRequest(
        step=_step(session_id="x", local_only=True).step, push_token=os.urandom(16)
    )
    error = _push_refusal(swarm["full"], request)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "local_only" in error.details()


def test_open_with_a_flood_of_hops_is_refused(swarm) -> None:
    hops = [peer_pb2.Hop()] * 400_000  # 2 bytes each on the wire: just under the 1 MiB message cap
    request = _open(session_id="flood", end=2, next_hops=hops)
    assert request.ByteSize() < MAX_MESSAGE
    process = psutil.Process(swarm["full"].popen.pid)
    before = process.memory_info().rss
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(swarm["full"]).Session(iter([request]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "more next hops than blocks" in caught.value.details()
    assert process.memory_info().rss - before < 100 * 2**20


def test_no_cache_room_until_a_session_closes(swarm) -> None:
    """Pages are taken by steps, not by opens. A step that would take this client past its share of the
    pool (here the whole 1024 tokens) is refused and changes nothing; it fits once a session closes and
    gives its pages back. (Preemption for another client: tests/test_batching_swarm.py.)"""
    _wait_idle(swarm["full"])  # the sessions of earlier tests hold no pages
    oldest, other, newcomer = Stream(swarm["full"]), Stream(swarm["full"]), Stream(swarm["full"])
    for stream, name in ((oldest, "oldest"), (other, "other"), (newcomer, "newcomer")):
        assert stream.open(name, batch=4, max_length=128).WhichOneof("kind") == "opened"  # no room taken
    assert stub(swarm["full"]).Info(peer_pb2.InfoRequest()).free_cache_tokens == 1024
    prompt = torch.randn(4, 96, HIDDEN)  # 4 rows x 6 pages of 16 positions: 384 tokens
    for stream in (oldest, other):
        assert stream.step(1, 0, prompt).WhichOneof("kind") == "result"
    assert stub(swarm["full"]).Info(peer_pb2.InfoRequest()).free_cache_tokens == 256
    refused = newcomer.step(1, 0, prompt)
    assert refused.WhichOneof("kind") == "error" and "client quota" in refused.error.message
    assert refused.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    oldest.close()
    deadline = time.monotonic() + 10
    while stub(swarm["full"]).Info(peer_pb2.InfoRequest()).free_cache_tokens < 640:
        assert time.monotonic() < deadline, "the closed session's pages were not freed"
        time.sleep(0.05)
    assert newcomer.step(2, 0, prompt).WhichOneof("kind") == "result"  # the refused step changed nothing
    step = other.step(2, 96, torch.randn(4, 1, HIDDEN))  # the other session's cache is whole
    assert step.WhichOneof("kind") == "result" and step.result.position == 97
    info = stub(swarm["full"]).Info(peer_pb2.InfoRequest())
    assert (info.preempted, info.num_sessions, info.free_cache_tokens) == (0, 2, 1024 - 384 - 448)
    for stream in (other, newcomer):
        stream.close()


def test_session_opened_twice(swarm) -> None:
    stream = Stream(swarm["full"])
    stream.open("twice")
    with pytest.raises(grpc.RpcError) as caught:
        list(stub(swarm["full"]).Session(iter([_open(session_id="twice")]), timeout=30))
    assert caught.value.code() == grpc.StatusCode.ALREADY_EXISTS
    stream.close()


def test_message_over_the_size_cap(swarm) -> None:
    big = torch.zeros(1, MAX_MESSAGE // (4 * HIDDEN) + 1, HIDDEN)
    with pytest.raises(grpc.RpcError) as caught:
        stub(swarm["full"]).Forward(
            peer_pb2.ForwardRequest(start=0, end=4, hidden=to_message(big)), timeout=30
        )
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_peer_survives_bad_input_and_serves_others(swarm) -> None:
    info = _wait_idle(swarm["full"])
    assert info.start == 0 and info.end == 4 and info.num_blocks == 4
    assert info.free_cache_tokens == info.max_cache_tokens  # every session above was freed
    assert swarm["full"].popen.poll() is None


def test_concurrent_sessions_do_not_mix(swarm, local_span: HostedSpan) -> None:
    errors: list[BaseException] = []

    def run(seed: int) -> None:
        try:
            stream = Stream(swarm["full"])
            stream.open(f"concurrent-{seed}")
            cache, position = local_span.new_cache(), 0
            for step_id, seq in enumerate([5, 1, 1, 1, 1]):
                hidden = _hidden(1, seq, seed * 100 + step_id)
                expected = local_span.forward(hidden, cache)
                torch.testing.assert_close(_result(stream.step(step_id, position, hidden)), expected)
                position += seq
            stream.close()
        except BaseException as e:  # collected and re-raised in the test thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert _wait_idle(swarm["full"]).free_cache_tokens == 1024  # each closed stream freed its session
