"""Chaos: peers killed (SIGKILL) or frozen (SIGSTOP) mid-generation; the output never changes."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from families import VOCAB, without_eos
from swarm import LocalSwarm, Process, channel, running, stop_all

from client.discovery import BanList
from client.errors import NoRouteError
from client.model import AutoDistributedModelForCausalLM
from client.route import Hop
from client.session import InferenceSession
from protos import peer_pb2, peer_pb2_grpc

NEW_TOKENS = 16
TWO_PER_SPAN = ["0:1", "0:1", "1:3", "1:3", "3:4", "3:4"]
PEER_OPTIONS = ("--throughput", "100", "--step-timeout", "2", "--announce-period", "2")
CLIENT_OPTIONS = dict(connect_timeout=2.0, max_retries=6, refresh_period=1.0)

pytestmark = [pytest.mark.chaos, pytest.mark.swarm]


@pytest.fixture(scope="module")
def dht(checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    """One DHT for the module (no peers): each test starts its own peers under it."""
    with running(tmp_path_factory.mktemp("chaos"), checkpoint("llama"), []) as swarm:
        yield swarm


class Swarm:
    """Peers of one test, under their own model id so no other test's records interfere."""

    def __init__(self, base: LocalSwarm, model_id: str, spans: list[str], *extra: str) -> None:
        self.base, self.model_id = base, model_id
        self.peers: list[Process] = []
        self.add(spans, *PEER_OPTIONS, *extra)

    def add(self, spans: list[str], *options: str) -> list[Process]:
        """More peers of this test's model, with `options` only (not PEER_OPTIONS)."""
        started = self.base.start_peers(spans, "--model-id", self.model_id, *options)
        self.peers += started
        return started

    def peer(self, peer_id: str) -> Process:
        return next(peer for peer in self.peers if peer.peer_id == peer_id)

    def client(self):
        model = AutoDistributedModelForCausalLM.from_pretrained(
            self.base.model, initial_peers=self.base.initial_peers, model_id=self.model_id, **CLIENT_OPTIONS
        )
        return without_eos(model)

    def stop(self) -> None:
        stop_all(self.peers)


@pytest.fixture
def make_swarm(dht, request) -> Iterator[Callable[..., Swarm]]:
    swarms: list[Swarm] = []

    def make(spans: list[str], *extra: str) -> Swarm:
        model_id = f"chaos-{request.node.name}".replace("[", "-").replace("]", "")[:60]
        swarm = Swarm(dht, f"{model_id}-{len(swarms)}", spans, *extra)
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


@dataclass
class _Run:
    tokens: torch.Tensor
    session: InferenceSession  # closed; its failovers remain
    route: list[Hop]  # the route when the generation ended
    bans: BanList

    def failed_peers(self) -> list[str]:
        return [failover.peer_id for failover in self.session.failovers]


def _run_with_faults(
    swarm: Swarm, prompt, actions: dict[int, Callable[[InferenceSession], None]], **options
) -> _Run:
    model = swarm.client()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            out = _generate(model, prompt, streamer=_Actions(session, actions), **options)
            return _Run(out, session, session.route, model.swarm.bans)
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


class _Signal:
    """An action: send `sig` to the peer of hop `index` of the session's route; `peer` is that peer then."""

    def __init__(self, swarm: Swarm, index: int, sig: int = signal.SIGKILL) -> None:
        self.swarm, self.index, self.sig = swarm, index, sig
        self.peer: Process | None = None

    def __call__(self, session: InferenceSession) -> None:
        self.peer = self.swarm.peer(session.route[self.index].peer_id)
        self.peer.popen.send_signal(self.sig)


def test_kill_the_middle_hop_after_five_tokens(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt()
    kill = _Signal(swarm, 1)
    run = _run_with_faults(swarm, prompt, {5: kill})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert kill.peer is not None and kill.peer.popen.poll() is not None
    assert run.failed_peers() == [kill.peer.peer_id]


def test_kill_the_first_hop_before_a_long_prefill(make_swarm, local) -> None:
    """The route is open and its peers hold one position; the first hop dies; the other 199 positions of
    the prompt go out as one prefill: the hop is replaced, the one position replayed, the prefill resent."""
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(200, seed=1)
    model = swarm.client()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            ones = torch.ones_like(prompt[:, :1])
            model.generate(prompt[:, :1], attention_mask=ones, max_new_tokens=1, do_sample=False)
            first = swarm.peer(session.route[0].peer_id)
            first.popen.send_signal(signal.SIGKILL)
            out = _generate(model, prompt)
    finally:
        model.shutdown()
    assert torch.equal(out, _generate(local, prompt))
    assert [(f.peer_id, f.replay_positions) for f in session.failovers] == [(first.peer_id, 1)]


def test_frozen_hop_is_banned_not_waited_on(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=2)
    freeze = _Signal(swarm, 1, signal.SIGSTOP)  # the swarm's teardown resumes it before stopping it
    started = time.monotonic()
    run = _run_with_faults(swarm, prompt, {3: freeze})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert freeze.peer is not None and run.bans.is_banned(freeze.peer.peer_id)
    assert freeze.peer.peer_id in run.failed_peers()
    assert time.monotonic() - started < 60  # one step timeout, not a hang


def test_replacement_with_other_span_boundaries(make_swarm, local) -> None:
    # [0,3) + [3,4) is the fast route; when [0,3) dies, [0,2) and [2,4) (used as [2,3)) replace it
    swarm = make_swarm(["0:3", "3:4"])
    swarm.add(["0:2", "2:4"], "--throughput", "1", "--step-timeout", "2", "--announce-period", "2")
    prompt = _prompt(seed=3)
    kill = _Signal(swarm, 0)
    run = _run_with_faults(swarm, prompt, {5: kill})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert kill.peer is not None and run.failed_peers() == [kill.peer.peer_id]
    assert [(hop.start, hop.end) for hop in run.session.failovers[0].replacement] == [(0, 2), (2, 3)]
    assert [(hop.start, hop.end) for hop in run.route] == [(0, 2), (2, 3), (3, 4)]


def test_two_failures_in_one_generation(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=4)
    kills = _Signal(swarm, 1), _Signal(swarm, 2)
    run = _run_with_faults(swarm, prompt, {3: kills[0], 9: kills[1]})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert run.failed_peers() == [kill.peer.peer_id for kill in kills if kill.peer is not None]
    assert len(run.failed_peers()) == 2


def test_sampling_with_a_seed_across_a_failover(make_swarm, local) -> None:
    swarm = make_swarm(TWO_PER_SPAN)
    prompt = _prompt(seed=5)
    options = dict(do_sample=True, top_k=30, temperature=0.8, seed=123)
    kill = _Signal(swarm, 2)
    run = _run_with_faults(swarm, prompt, {6: kill}, **options)
    assert kill.peer is not None and run.failed_peers() == [kill.peer.peer_id]
    assert torch.equal(run.tokens, _generate(local, prompt, **options))


def test_all_peers_of_a_span_gone_is_a_clear_error(make_swarm) -> None:
    swarm = make_swarm(TWO_PER_SPAN)

    def kill_both_last(session: InferenceSession) -> None:
        for peer in swarm.peers[4:]:
            peer.popen.send_signal(signal.SIGKILL)

    started = time.monotonic()
    with pytest.raises(NoRouteError) as error:
        _run_with_faults(swarm, _prompt(seed=6), {4: kill_both_last})
    assert error.value.missing == [(3, 4)]
    assert str(error.value).startswith("no peer serves blocks 3 (of 4)")
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
    drain = _Signal(swarm, 1, signal.SIGTERM)
    run = _run_with_faults(swarm, prompt, {5: drain})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert drain.peer is not None and drain.peer.popen.wait(30) == 0
    assert "draining" in drain.peer.text()


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
        info = _wait_info(swarm.peers[0], lambda info: info.free_cache_tokens == 256, timeout=20)
        assert info.free_cache_tokens == 256 and info.num_sessions == 0
    finally:
        model.shutdown()


def _wait_info(
    peer: Process, done: Callable[[peer_pb2.InfoReply], bool], *, timeout: float
) -> peer_pb2.InfoReply:
    """The peer's Info once `done(info)`, or the last one read when `timeout` runs out."""
    with channel(peer) as opened:
        stub = peer_pb2_grpc.PeerStub(opened)
        deadline = time.monotonic() + timeout
        while True:
            info = stub.Info(peer_pb2.InfoRequest(), timeout=10)
            if done(info) or time.monotonic() > deadline:
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
            for peer in swarm.peers:  # every peer expires the idle session
                assert _wait_info(peer, lambda info: info.num_sessions == 0, timeout=20).num_sessions == 0
            second = _generate(model, first)
    finally:
        model.shutdown()
    assert torch.equal(second, _generate(local, _generate(local, prompt)))
    assert session.failovers and {failover.reason for failover in session.failovers} == {"NOT_FOUND"}


def test_full_peer_is_skipped(make_swarm, local) -> None:
    """The fast peer announces no cache room: the route takes the slower one (the refusal of a peer whose
    announcement is behind, RESOURCE_EXHAUSTED, is covered in-process)."""
    swarm = make_swarm(["0:4"], "--max-cache-tokens", "8", "--throughput", "1000")
    [roomy] = swarm.add(["0:4"], "--throughput", "10")
    prompt = _prompt(seed=11)
    run = _run_with_faults(swarm, prompt, {})
    assert torch.equal(run.tokens, _generate(local, prompt))
    assert [hop.peer_id for hop in run.route] == [roomy.peer_id]
    assert run.session.num_failovers == 0 and not run.bans.banned()


def test_kill_a_hop_mid_generation_of_a_padded_batch(make_swarm, local) -> None:
    """Three prompts of different lengths, left-padded: the replacement replays the steps with their masks."""
    swarm = make_swarm(TWO_PER_SPAN)
    rows = [_prompt(length, seed=length)[0] for length in (10, 4, 7)]
    prompt = torch.zeros(len(rows), 10, dtype=torch.long)
    mask = torch.zeros_like(prompt)
    for index, row in enumerate(rows):
        prompt[index, 10 - len(row) :], mask[index, 10 - len(row) :] = row, 1
    options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    kill = _Signal(swarm, 1)
    model = swarm.client()
    try:
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            tokens = model.generate(
                prompt, attention_mask=mask, streamer=_Actions(session, {5: kill}), **options
            )
            failed = [failover.peer_id for failover in session.failovers]
    finally:
        model.shutdown()
    assert torch.equal(tokens, local.generate(prompt, attention_mask=mask, **options))
    assert kill.peer is not None and failed == [kill.peer.peer_id]
