"""Balancing with real peer processes: peers started with `--span-length` cover the model, and when one
leaves, another moves to its blocks while a client keeps generating the same tokens. Moves are read from
each peer's ready file, which it rewrites after a move."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from families import VOCAB, save_deep_llama, without_eos
from swarm import Process, start_dht, start_peer, start_peers
from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

from client.model import AutoDistributedModelForCausalLM

NUM_BLOCKS = 30
PEER_OPTIONS = (
    "--model-id",
    "deep",
    "--throughput",
    "100",
    "--announce-period",
    "2",
    "--balance-period",
    "1",
    "--step-timeout",
    "2",
)
CLIENT_OPTIONS = dict(connect_timeout=2.0, max_retries=12, refresh_period=1.0)
NEW_TOKENS = 40
STABLE_WAIT = 8.0  # seconds: about eight balancing periods (`--balance-period 1`) of every peer

pytestmark = pytest.mark.swarm  # real DHT and peer processes


@pytest.fixture(scope="module")
def deep(tmp_path_factory) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("balance")
    folder = save_deep_llama(root / "deep", NUM_BLOCKS)
    dht = start_dht(root)
    peers: list[Process] = []
    try:
        peers += start_peers(root, folder, ["10", "10", "10"], dht.maddrs, *PEER_OPTIONS)
        yield {"root": root, "folder": folder, "dht": dht, "peers": peers}
    finally:
        for peer in peers:  # all drain at once
            if peer.popen.poll() is None:
                peer.popen.terminate()
        for peer in peers:
            peer.stop()
        dht.stop()


def _health(deep: dict) -> dict:
    command = [sys.executable, "-m", "protos.cli", "health", str(deep["folder"]), "--model-id", "deep"]
    command += ["--initial-peers", *deep["dht"].maddrs, "--json"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    return json.loads(result.stdout)


def _wait_served(deep: dict, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        health = _health(deep)
        if health.get("served") or time.monotonic() > deadline:
            return health
        time.sleep(1.0)


def _spans(deep: dict) -> dict[str, tuple[int, int]]:
    """peer_id -> the span each ONLINE peer announces now."""
    return {p["peer_id"]: (p["start"], p["end"]) for p in _health(deep)["peers"] if p["state"] == "online"}


def _served(peers: list[Process]) -> dict[str, tuple[int, int] | None]:
    """peer_id -> the span each peer serves now, by its ready file."""
    return {peer.peer_id: peer.served_span() for peer in peers}


def _wait_moved(peer: Process, away_from: tuple[int, int], timeout: float) -> tuple[int, int] | None:
    """The span `peer` serves once it no longer serves `away_from` (or when `timeout` runs out)."""
    deadline = time.monotonic() + timeout
    while (span := peer.served_span()) == away_from and time.monotonic() < deadline:
        time.sleep(0.2)
    return span


def test_peers_started_together_cover_every_block(deep) -> None:
    # the claims spread them at once; were two to collide, rebalancing would move one within seconds
    health = _wait_served(deep, 60)
    assert health["served"] and health["coverage"] == [1] * NUM_BLOCKS
    assert health["bottleneck"]["throughput"] == pytest.approx(10.0)  # 100 steps/s per block, 10 blocks
    assert sorted(_spans(deep).values()) == [(0, 10), (10, 20), (20, 30)]


class _At(LogitsProcessor):
    """Runs `action` once, when the `at`-th token is generated; every token waits a little so that what the
    action sets off happens while the client is generating."""

    def __init__(self, prompt_length: int, at: int, action: Callable[[], object]) -> None:
        self.prompt_length, self.at, self.action = prompt_length, at, action

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if input_ids.shape[1] - self.prompt_length == self.at:
            self.action()
        time.sleep(0.05)
        return scores


def _generate(deep: dict, prompt: torch.Tensor, processor: LogitsProcessor) -> torch.Tensor:
    model = AutoDistributedModelForCausalLM.from_pretrained(
        deep["folder"], initial_peers=deep["dht"].maddrs, model_id="deep", **CLIENT_OPTIONS
    )
    without_eos(model)
    try:
        processors = LogitsProcessorList([processor])
        output = model.generate(
            prompt, max_new_tokens=NEW_TOKENS, do_sample=False, logits_processor=processors
        )
        assert model.swarm.stats.block_times()  # the client measured the peers it used
        return output
    finally:
        model.shutdown()


def _expected(deep: dict, prompt: torch.Tensor) -> torch.Tensor:
    local = AutoModelForCausalLM.from_pretrained(deep["folder"], dtype=torch.float32).eval()
    return local.generate(prompt, max_new_tokens=NEW_TOKENS, do_sample=False)


def test_no_move_without_a_gain_then_a_peer_moves_to_blocks_left_unserved(deep) -> None:
    """A slower peer with a fixed span doubles [0,10): the other peer there is spare, but no move of it
    would raise the swarm's throughput, so it stays (fixed peers never move). Once [10,20) is left unserved,
    that same peer moves there within seconds: its rebalancer was checking all along. A client generating
    meanwhile gets the same tokens."""
    options = (*PEER_OPTIONS, "--throughput", "50")
    extra = start_peer(deep["root"], deep["folder"], "0:10", deep["dht"].maddrs, *options, name="extra")
    deep["peers"].append(extra)
    spans = _spans(deep)
    mover = next(peer for peer in deep["peers"] if spans[peer.peer_id] == (0, 10) and peer is not extra)
    leaving = next(peer for peer in deep["peers"] if spans[peer.peer_id] == (10, 20))
    before = _served(deep["peers"])
    time.sleep(STABLE_WAIT)
    assert _served(deep["peers"]) == before and _spans(deep) == spans

    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(5))
    output = _generate(deep, prompt, _At(prompt.shape[1], 5, leaving.popen.terminate))
    assert leaving.popen.wait(30) == 0
    deep["peers"].remove(leaving)
    assert torch.equal(output, _expected(deep, prompt))

    assert _wait_moved(mover, (0, 10), timeout=30) == (10, 20)
    others = [peer for peer in deep["peers"] if peer is not mover]
    assert all(peer.served_span() == before[peer.peer_id] for peer in others)
    health = _wait_served(deep, 30)
    assert health["served"] and min(health["coverage"]) == 1


def test_a_move_carries_the_sessions_on_the_old_span_over_by_failover(deep) -> None:
    """The moved peer now serves [10,20) and the client routes through it (faster than the new fixed peer
    there). A fixed peer joining [10,20) makes [0,10) the bottleneck, so the moved peer moves back while
    the client's session is open on it: that session ends and the client fails over to the fixed peer."""
    spans = _spans(deep)
    mover = next(peer for peer in deep["peers"] if spans.get(peer.peer_id) == (10, 20))
    assert mover.served_span() == (10, 20)
    joined: list[Process] = []

    def join_and_wait_for_the_move() -> None:
        options = (*PEER_OPTIONS, "--throughput", "80")
        joined.append(start_peer(deep["root"], deep["folder"], "10:20", deep["dht"].maddrs, *options))
        deep["peers"].append(joined[0])
        _wait_moved(mover, (10, 20), timeout=60)

    prompt = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(6))
    output = _generate(deep, prompt, _At(prompt.shape[1], 5, join_and_wait_for_the_move))
    assert torch.equal(output, _expected(deep, prompt))
    assert mover.served_span() == (0, 10)
    assert "sessions_moved=1" in mover.text()  # the client's session was open on the span it left
    health = _wait_served(deep, 30)
    assert health["served"] and health["bottleneck"]["throughput"] == pytest.approx(8.0)
