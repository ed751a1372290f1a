"""Batched inference and the paged KV cache against real peer processes: 8 clients generating at once on
SmolLM2 split over 3 peers each get transformers' greedy tokens while the peers compute their steps in
batches; 64 sessions of max_length 2048 holding 100 tokens each fit a pool of 8192 tokens; a session
preempted for lack of pages moves to another peer by failover and finishes with the same tokens."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import torch
from families import HIDDEN, VOCAB, without_eos
from swarm import Process, channel, running, start_dht, start_peer, stop_all

from client import AutoDistributedModelForCausalLM
from client.errors import SwarmError
from peer.blocks import HostedSpan
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import from_message, to_message

pytestmark = pytest.mark.swarm

RPC_TIMEOUT = 120  # seconds a raw Session stream may live: bounds every wait for one of its replies

# ---- helpers ---------------------------------------------------------------------------------------------


def _stub(peer: Process, address: str | None = None) -> tuple[grpc.Channel, peer_pb2_grpc.PeerStub]:
    opened = channel(peer, address=address)
    return opened, peer_pb2_grpc.PeerStub(opened)


def _info(peer: Process) -> peer_pb2.InfoReply:
    opened, stub = _stub(peer)
    try:
        return stub.Info(peer_pb2.InfoRequest(), timeout=10)
    finally:
        opened.close()


def _port(peer: Process) -> str:
    ready = peer.ready()
    assert ready is not None
    return str(ready["address"]).rsplit(":", 1)[1]


class Stream:
    """A raw Session stream: requests go in one at a time, replies are read in order; its session lives
    while the stream is open."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Session(iter(self._requests.get, None), timeout=RPC_TIMEOUT)

    def put(self, **kind) -> None:
        self._requests.put(peer_pb2.SessionRequest(**kind))

    def reply(self) -> peer_pb2.SessionReply | grpc.StatusCode:
        try:
            return next(self._replies)
        except grpc.RpcError as e:
            return e.code()

    def send(self, **kind) -> peer_pb2.SessionReply | grpc.StatusCode:
        self.put(**kind)
        return self.reply()

    def open(self, session_id: str, *, max_length: int, end: int = 4) -> str:
        opening = peer_pb2.OpenSession(
            session_id=session_id, start=0, end=end, batch_size=1, max_length=max_length
        )
        reply = self.send(open=opening)
        return reply.name if isinstance(reply, grpc.StatusCode) else reply.WhichOneof("kind")

    def close(self) -> None:
        self._requests.put(None)
        self._replies.cancel()


def _hidden(seq: int, seed: int) -> torch.Tensor:
    return torch.randn(1, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _result(reply: peer_pb2.SessionReply | grpc.StatusCode) -> torch.Tensor:
    assert isinstance(reply, peer_pb2.SessionReply) and reply.WhichOneof("kind") == "result", reply
    return from_message(reply.result.hidden, max_bytes=2**26)


def _generate(model, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
    )


DISCOVERY_READS = 30  # DHT reads a client may need to see the peers


def _discover(model) -> int:
    """Read the swarm until this client sees every block served (at most DISCOVERY_READS reads, a second
    apart); returns the reads it took. Joining is not what the test is about: its generation then starts
    with a view, as a client that joined a while ago would (8 first reads at once, on a loaded 2-core
    machine, have come back empty for a client's whole retry budget)."""
    for read in range(1, DISCOVERY_READS + 1):
        try:
            view = model.swarm.runtime.run(model.swarm.discovery.view(refresh=True), timeout=60)
            if all(view.blocks):
                return read
        except SwarmError:
            pass
        time.sleep(1.0)
    raise AssertionError(f"the client saw no complete swarm in {DISCOVERY_READS} DHT reads")


# ---- 1. eight clients at once on SmolLM2 x 3 peers -------------------------------------------------------

SMOLLM2_SPANS = ["0:10", "10:20", "20:30"]
CLIENTS = 8
NEW_TOKENS = 12
QUESTIONS = [
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "How many legs does a spider have?",
    "Write a haiku about the sea.",
    "What is two plus two?",
    "Who wrote Romeo and Juliet?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
]
SMOLLM2_OPTIONS = ["--throughput", "100"]  # announced, not measured: the spans are equal anyway
GENERATION_TIMEOUT = 300.0  # seconds all 8 generations may take together


@pytest.fixture(scope="module")
def smollm2():
    from protos.prepare import prepare_default_model

    return prepare_default_model()


@pytest.mark.slow
def test_eight_clients_at_once_generate_like_transformers_in_batches(smollm2, tmp_path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    prompts = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompts.append(tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"])
    options = dict(max_new_tokens=NEW_TOKENS, do_sample=False)

    def references() -> list[torch.Tensor]:
        local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
        return [local.generate(p, attention_mask=torch.ones_like(p), **options) for p in prompts]

    # the references are computed while the peers start (on a 2-core machine both take tens of seconds)
    with ThreadPoolExecutor(1) as background:
        computing = background.submit(references)
        with running(tmp_path, smollm2, SMOLLM2_SPANS, *SMOLLM2_OPTIONS) as swarm:
            start = threading.Barrier(CLIENTS, timeout=GENERATION_TIMEOUT / 2)
            reads = [0] * CLIENTS  # DHT reads each client needed to see the peers
            joining = threading.Lock()

            def client(index: int) -> torch.Tensor:
                """One client of its own: joins, waits for the others, generates, leaves."""
                model = None
                try:
                    with joining:  # one join at a time: 8 p2pd daemons bootstrapping at once time out
                        model = AutoDistributedModelForCausalLM.from_pretrained(
                            smollm2, initial_peers=swarm.initial_peers
                        )
                        reads[index] = _discover(model)
                    start.wait()  # every client's prefill and decode steps reach the peers together
                    prompt = prompts[index]
                    return model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
                except BaseException:
                    start.abort()  # the others stop waiting for this one
                    raise
                finally:
                    if model is not None:
                        model.shutdown()

            expected = computing.result(timeout=GENERATION_TIMEOUT)  # done before the clients compete with it
            with ThreadPoolExecutor(CLIENTS) as pool:
                futures = [pool.submit(client, index) for index in range(CLIENTS)]
                for future in futures:  # a client that failed first broke the barrier for the others
                    error = future.exception(timeout=GENERATION_TIMEOUT)
                    if error is not None and not isinstance(error, threading.BrokenBarrierError):
                        raise error
                outputs = [future.result(timeout=GENERATION_TIMEOUT) for future in futures]
            infos = [_info(peer) for peer in swarm.peers]
    for question, out, reference in zip(QUESTIONS, outputs, expected, strict=True):
        answer, wanted = tokenizer.decode(out[0]), tokenizer.decode(reference[0])
        assert torch.equal(out, reference), (question, answer, wanted)
    stats = [(info.steps_computed, info.step_batches) for info in infos]
    print(f"steps_computed, step_batches per peer: {stats}; DHT reads per client: {reads}")
    assert all(steps >= CLIENTS for steps, _ in stats), stats  # every peer computed every client's steps
    assert any(steps > batches for steps, batches in stats), stats


# ---- a tiny-Llama swarm for the pool tests: one DHT, three peers started at once ---------------------------

POOL_TOKENS = 8192
SESSIONS = 64
PREFILL = 100
PAGE_TOKENS = 16  # the default page size
POOL_MODEL_ID = "batching-pool"  # the pooled peer announces another model: the failover client never sees it
SMALL_POOL = 256

PEER_OPTIONS = {
    # 64 sessions of max_length 2048 from one client, in a pool of 8192 tokens
    "pooled": [
        *("--model-id", POOL_MODEL_ID, "--max-cache-tokens", str(POOL_TOKENS), "--max-length", "2048"),
        *("--max-client-sessions", str(SESSIONS), "--max-sessions", str(SESSIONS)),
        *("--max-client-cache-tokens", str(POOL_TOKENS), "--throughput", "100"),
    ],
    # fast, with a pool of 256 tokens that one client may take whole; listening on every loopback address,
    # so another client can come from ::1
    "small": [
        *("--host", "::", "--announce-host", "127.0.0.1", "--max-cache-tokens", str(SMALL_POOL)),
        *("--max-client-cache-tokens", str(SMALL_POOL), "--throughput", "1000"),
    ],
    "roomy": ["--throughput", "10"],  # slow, with the default pool
}


@pytest.fixture(scope="module")
def tiny(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT ("dht") and the peers of `PEER_OPTIONS` by name, all on [0,4) of the tiny Llama; every
    process is stopped by PID at the end of the module."""
    logs, model = tmp_path_factory.mktemp("batching-tiny"), checkpoint("llama")
    dht = start_dht(logs)
    peers: dict[str, Process] = {}
    try:
        with ThreadPoolExecutor(len(PEER_OPTIONS)) as pool:
            futures = {
                name: pool.submit(start_peer, logs, model, "0:4", dht.maddrs, *options, name=name)
                for name, options in PEER_OPTIONS.items()
            }
            for name, future in futures.items():
                with contextlib.suppress(Exception):
                    peers[name] = future.result()  # each start waits at most STARTUP_TIMEOUT
            for future in futures.values():
                future.result()  # raises the first failure, after every started peer is kept for the stop
        yield {"dht": dht, **peers}
    finally:
        stop_all(list(peers.values()))
        dht.stop()


# ---- 2. 64 short sessions of max_length 2048 share a pool of 8192 tokens ---------------------------------


def test_sixty_four_sessions_of_max_length_2048_fit_a_pool_of_8192_tokens(checkpoint, tiny) -> None:
    opened, stub = _stub(tiny["pooled"])
    streams = [Stream(stub) for _ in range(SESSIONS)]
    try:
        assert [stream.open(f"short-{i}", max_length=2048) for i, stream in enumerate(streams)] == [
            "opened"
        ] * SESSIONS
        inputs = [_hidden(PREFILL, seed) for seed in range(SESSIONS)]
        for stream, hidden in zip(streams, inputs, strict=True):  # all in flight at once: batched
            stream.put(step=peer_pb2.Step(step_id=0, position=0, hidden=to_message(hidden)))
        outputs = [_result(stream.reply()) for stream in streams]
        info = stub.Info(peer_pb2.InfoRequest(), timeout=10)
    finally:
        for stream in streams:
            stream.close()
        opened.close()
    pages = -(-PREFILL // PAGE_TOKENS)
    assert info.page_tokens == PAGE_TOKENS
    assert info.num_sessions == SESSIONS
    assert info.preempted == 0
    assert info.max_cache_tokens == POOL_TOKENS
    assert info.free_cache_tokens == POOL_TOKENS - SESSIONS * pages * PAGE_TOKENS
    print(f"steps_computed={info.steps_computed} step_batches={info.step_batches}")
    span = HostedSpan.load(checkpoint("llama"), 0, 4)
    expected = span.forward(torch.cat(inputs), span.new_cache())  # every session's prefill, as one batch
    torch.testing.assert_close(torch.cat(outputs), expected, atol=1e-5, rtol=1e-5)


# ---- 3. a preempted session finishes elsewhere with the same tokens ---------------------------------------

PROMPT = 10
FIRST_TOKENS, MORE_TOKENS = 8, 16


def test_a_preempted_session_finishes_elsewhere_with_the_same_tokens(checkpoint, local, tiny) -> None:
    small, roomy = tiny["small"], tiny["roomy"]
    prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(0))
    model = without_eos(
        AutoDistributedModelForCausalLM.from_pretrained(checkpoint("llama"), initial_peers=tiny["dht"].maddrs)
    )
    opened, stub = _stub(small, address=f"[::1]:{_port(small)}")  # another client: another address
    hog = Stream(stub)
    try:
        with model.inference_session(max_length=PROMPT + FIRST_TOKENS + MORE_TOKENS) as session:
            first = _generate(model, prompt, FIRST_TOKENS)
            assert [hop.peer_id for hop in session.route] == [small.peer_id]
            held = _info(small)
            assert held.num_sessions == 1 and held.free_cache_tokens < SMALL_POOL, held
            # A is idle between two generate() calls: a prefill of the whole pool must preempt it
            assert hog.open("hog", max_length=SMALL_POOL) == "opened"
            hidden = to_message(_hidden(SMALL_POOL, 1))
            _result(hog.send(step=peer_pb2.Step(step_id=0, position=0, hidden=hidden)))
            after = _info(small)
            assert after.preempted >= 1 and after.num_sessions == 1 and after.free_cache_tokens == 0, after
            second = _generate(model, first, MORE_TOKENS)
            route = [hop.peer_id for hop in session.route]
            reasons = [failover.reason for failover in session.failovers]
    finally:
        hog.close()
        opened.close()
        model.shutdown()
    assert route == [roomy.peer_id]
    assert reasons == ["RESOURCE_EXHAUSTED"]
    assert torch.equal(second[:, : first.shape[1]], first)
    assert torch.equal(second, _generate(local, prompt, FIRST_TOKENS + MORE_TOKENS))
    log = small.text()
    assert "reason=preempted" in log and "internal error" not in log  # a preemption is no peer failure
