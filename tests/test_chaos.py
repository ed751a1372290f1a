"""Chaos: peers killed (SIGKILL) or frozen (SIGSTOP) mid-generation; the output never changes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator

import grpc
import pytest
import torch
from families import VOCAB
from swarm import Process, start_dht, start_peers

from client.errors import NoRouteError
from client.model import AutoDistributedModelForCausalLM
from client.errors import SwarmUnavailableError
from client.session import InferenceSession
from protos import peer_pb2, peer_pb2_grpc

NEW_TOKENS = 16
TWO_PER_SPAN = ["0:1", "0:1", "1:3", "1:3", "3:4", "3:4"]
PEER_OPTIONS = ("--throughput", "100", "--step-timeout", "2", "--announce-period", "2")
CLIENT_OPTIONS = dict(connect_timeout=2.0, max_retries=6, refresh_period=1.0)

pytestmark = pytest.mark.chaos


@pytest.fixture(scope="module")
def dht(tmp_path_factory) -> Iterator[Process]:
    process = start_dht(tmp_path_factory.mktemp("chaos-dht"))
    yield process
    process.stop()


class Swarm:
    """Peers of one test, under their own model id so no other test's records interfere."""

    def __init__(self, dht: Process, folder, logs, model_id: str, spans: list[str], *extra: str) -> None:
        self.dht, self.folder, self.model_id = dht, folder, model_id
        options = ("--model-id", model_id, *PEER_OPTIONS, *extra)
        self.peers = start_peers(logs, folder, spans, dht.maddrs, *options)
        self.by_id = {peer.peer_id: peer for peer in self.peers}

    def client(self):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            self.folder, initial_peers=self.dht.maddrs, model_id=self.model_id, **CLIENT_OPTIONS
        )
        model.generation_config.eos_token_id = None
        model.generation_config.pad_token_id = 0
        return model

    def stop(self) -> None:
        for peer in self.peers:
            peer.stop()


@pytest.fixture
def make_swarm(dht, checkpoint, tmp_path, request) -> Iterator[Callable[..., Swarm]]:
    swarms: list[Swarm] = []

    def make(spans: list[str], *extra: str) -> Swarm:
        model_id = f"chaos-{request.node.name}".replace("[", "-").replace("]", "")[:60]
        swarm = Swarm(dht, checkpoint("llama"), tmp_path, f"{model_id}-{len(swarms)}", spans, *extra)
        swarms.append(swarm)
        return swarm

    yield make
    for swarm in swarms:
        swarm.stop()


def _prompt(length: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def _generate(model, prompt: torch.Tensor, *, streamer=None, seed: int = 0, **options) -> torch.Tensor:
    torch.manual_seed(seed)
    options = dict(do_sample=False) | options
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        streamer=streamer,
        **options,
    )


def _run_with_faults(swarm: Swarm, prompt, actions: dict[int, Callable[[InferenceSession], None]], **options):
    model = swarm.client()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            streamer = _Actions(session, actions)
            out = _generate(model, prompt, streamer=streamer, **options)
            session.final_route = session.route  # type: ignore[attr-defined]
            return out, session, model.swarm.bans
    finally:
        model.shutdown()


class _Actions:
    """A streamer that runs `actions[n](session)` when the n-th new token is out."""

    def __init__(
        self, session: InferenceSession, actions: dict[int, Callable[[InferenceSession], None]]
    ) -> None:
        self.session, self.actions, self.seen = session, actions, -1  # the first put is the prompt

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        if self.seen in self.actions:
            self.actions[self.seen](self.session)

    def end(self) -> None:
        pass


def _kill_hop(swarm: Swarm, index: int, sig: int = signal.SIGKILL) -> Callable[[InferenceSession], None]:
    def act(session: InferenceSession) -> None:
        peer = swarm.by_id[session.route[index].peer_id]
        peer.popen.send_signal(sig)
        act.peer = peer  # type: ignore[attr-defined]

    return act


def test_kill_the_middle_hop_after_five_tokens(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt()
    kill = _kill_hop(swarm, 1)
    out, session, _ = _run_with_faults(swarm, prompt, {5: kill})
    assert torch.equal(out, _generate(local, prompt))
    assert kill.peer.popen.poll() is not None  # type: ignore[attr-defined]
    assert session.num_failovers >= 1


def test_kill_the_first_hop_during_a_long_prefill(make_swarm, local, monkeypatch) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(200, seed=1)
    killed: list[Process] = []
    original = InferenceSession._send

    async def send_and_kill(self, log, stream, **kwargs):
        if not killed and not kwargs["local_only"] and log.positions.shape[1] == 200:
            peer = swarm.by_id[self.route[0].peer_id]
            killed.append(peer)
            task = original(self, log, stream, **kwargs)
            peer.popen.send_signal(signal.SIGKILL)  # the prefill is on its way to this peer
            return await task
        return await original(self, log, stream, **kwargs)

    monkeypatch.setattr(InferenceSession, "_send", send_and_kill)
    out, session, _ = _run_with_faults(swarm, prompt, {})
    assert killed and session.num_failovers >= 1
    assert torch.equal(out, _generate(local, prompt))


def test_frozen_hop_is_banned_not_waited_on(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=2)
    freeze = _kill_hop(swarm, 1, signal.SIGSTOP)
    started = time.monotonic()
    try:
        out, _, bans = _run_with_faults(swarm, prompt, {3: freeze})
    finally:
        frozen = freeze.peer  # type: ignore[attr-defined]
        frozen.popen.send_signal(signal.SIGCONT)
    assert torch.equal(out, _generate(local, prompt))
    assert bans.is_banned(frozen.peer_id)
    assert time.monotonic() - started < 60  # one step timeout, not a hang


def test_replacement_with_other_span_boundaries(make_swarm, local) -> None:
    # [0,3) + [3,4) is the fast route; when [0,3) dies, [0,2) and [2,4) (used as [2,3)) replace it
    swarm = make_swarm(["0:3", "3:4", "0:2", "2:4"])
    for peer in swarm.peers[2:]:
        peer.stop()
    slow = start_peers(
        swarm.peers[0].log.parent,
        swarm.folder,
        ["0:2", "2:4"],
        swarm.dht.maddrs,
        "--model-id",
        swarm.model_id,
        "--throughput",
        "1",
        "--step-timeout",
        "2",
        "--announce-period",
        "2",
    )
    swarm.peers[2:] = slow
    swarm.by_id = {peer.peer_id: peer for peer in swarm.peers}
    prompt = _prompt(seed=3)
    out, session, _ = _run_with_faults(swarm, prompt, {5: _kill_hop(swarm, 0)})
    assert torch.equal(out, _generate(local, prompt))
    assert [(hop.start, hop.end) for hop in session.final_route] == [(0, 2), (2, 3), (3, 4)]


def test_two_failures_in_one_generation(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=4)
    out, session, _ = _run_with_faults(swarm, prompt, {3: _kill_hop(swarm, 1), 9: _kill_hop(swarm, 2)})
    assert torch.equal(out, _generate(local, prompt))
    assert session.num_failovers >= 2


def test_sampling_with_a_seed_across_a_failover(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=5)
    options = dict(do_sample=True, top_k=30, temperature=0.8, seed=123)
    out, session, _ = _run_with_faults(swarm, prompt, {6: _kill_hop(swarm, 2)}, **options)
    assert session.num_failovers >= 1
    assert torch.equal(out, _generate(local, prompt, **options))


def test_all_peers_of_a_span_gone_is_a_clear_error(make_swarm) -> None:
    swarm = make_swarm(TWO_PER_SPAN)

    def kill_both_last(session: InferenceSession) -> None:
        for peer in swarm.peers[4:]:
            peer.popen.send_signal(signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises((NoRouteError, SwarmUnavailableError), match=r"block|3"):
        _run_with_faults(swarm, _prompt(seed=6), {4: kill_both_last})
    assert time.monotonic() - started < 90


def test_replay_history_grows_linearly(make_swarm) -> None:
    swarm = make_swarm(["0:1", "1:3", "3:4"])
    model = swarm.client()
    try:
        with model.inference_session(max_length=64) as session:
            prompt = _prompt(seed=7)
            sizes = []
            for _ in range(3):
                prompt = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=8,
                    min_new_tokens=8,
                    do_sample=False,
                )
                sizes.append(_history_bytes(session))
    finally:
        model.shutdown()
    per_token = (sizes[2] - sizes[1]) / 8
    assert per_token == (sizes[1] - sizes[0]) / 8  # the same bytes for every token
    assert per_token == 4 * 64 * 4  # one hidden state (64 floats) per hop boundary, 4 boundaries


def _history_bytes(session: InferenceSession) -> int:
    return sum(t.numel() * t.element_size() for log in session.history for t in log.inputs.values())


def test_draining_peer_finishes_its_steps(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN, "--drain-timeout", "5")
    prompt = _prompt(seed=8)
    drain = _kill_hop(swarm, 1, signal.SIGTERM)
    out, _, _ = _run_with_faults(swarm, prompt, {5: drain})
    assert torch.equal(out, _generate(local, prompt))
    assert drain.peer.popen.wait(30) == 0  # type: ignore[attr-defined]
    assert "draining" in drain.peer.text()  # type: ignore[attr-defined]


def test_forward_is_retried_on_another_peer(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(12, seed=9)
    model = swarm.client()
    try:
        with torch.no_grad():
            expected = local(prompt).logits
            torch.testing.assert_close(model(prompt).logits, expected, atol=1e-5, rtol=0)
            for peer in swarm.peers[::2]:  # one peer of every span dies; the others serve the retry
                peer.popen.send_signal(signal.SIGKILL)
            torch.testing.assert_close(model(prompt).logits, expected, atol=1e-5, rtol=0)
    finally:
        model.shutdown()


def test_idle_sessions_of_a_vanished_client_expire(make_swarm) -> None:
    swarm = make_swarm(["0:4"], "--session-timeout", "1", "--max-cache-tokens", "256")
    model = swarm.client()
    try:
        session = model.swarm.new_session(128)
        model.swarm.runtime.run(session.astep(torch.zeros(1, 3, 64), torch.arange(3)[None]))
        # the client goes silent without closing: the peer frees the room by itself
        info = _wait_for_free_tokens(swarm.peers[0], 256, timeout=20)
        assert info.free_cache_tokens == 256 and info.num_sessions == 0
    finally:
        model.shutdown()


def _wait_for_free_tokens(peer: Process, tokens: int, *, timeout: float) -> peer_pb2.InfoReply:
    stub = peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))
    deadline = time.monotonic() + timeout
    while True:
        info = stub.Info(peer_pb2.InfoRequest(), timeout=10)
        if info.free_cache_tokens == tokens or time.monotonic() > deadline:
            return info
        time.sleep(0.2)


def test_session_expired_on_a_peer_is_reopened_and_replayed(make_swarm, local) -> None:
    """NOT_FOUND: the peer dropped the session (idle expiry here; a restart looks the same)."""
    swarm = make_swarm(["0:1", "1:3", "3:4"], "--session-timeout", "1")
    model = swarm.client()
    prompt = _prompt(seed=10)
    try:
        with model.inference_session(max_length=64) as session:
            first = _generate(model, prompt)
            time.sleep(3)  # every peer expires the idle session
            second = _generate(model, first)
            assert session.num_failovers >= 1
    finally:
        model.shutdown()
    assert torch.equal(second, _generate(local, _generate(local, prompt)))


def test_full_peer_is_skipped(make_swarm, local) -> None:
    """The fast peer announces no cache room: the route takes the slower one (the refusal of a peer whose
    announcement is behind, RESOURCE_EXHAUSTED, is covered in-process)."""
    full = make_swarm(["0:4"], "--max-cache-tokens", "8", "--throughput", "1000")
    roomy = start_peers(
        full.peers[0].log.parent,
        full.folder,
        ["0:4"],
        full.dht.maddrs,
        "--model-id",
        full.model_id,
        "--throughput",
        "10",
    )
    full.peers += roomy
    prompt = _prompt(seed=11)
    out, session, bans = _run_with_faults(full, prompt, {})
    assert torch.equal(out, _generate(local, prompt))
    assert [hop.peer_id for hop in session.final_route] == [roomy[0].peer_id]
    assert session.num_failovers == 0 and not bans.banned()
    assert [hop.peer_id for hop in session.final_route] == [roomy[0].peer_id]
