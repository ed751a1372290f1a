"""`corolla api` as users run it: a gateway process over SmolLM2 split across 3 peer processes (TLS), called
with the official `openai` SDK. Greedy chat equals local transformers on the same chat template, streamed or
not; a seeded sampled request repeats; a client that leaves mid-stream frees its session on every peer
(`Info.num_sessions`); with a peer stopped, requests get 503 naming the blocks nobody serves."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch
from swarm import ENV, LocalSwarm, Process, channel, running
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.local_swarm import start_api
from protos import peer_pb2, peer_pb2_grpc
from protos.prepare import prepare_default_model

pytestmark = [pytest.mark.slow, pytest.mark.swarm]

SPANS = ["0:10", "10:20", "20:30"]
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea."]
NEW_TOKENS = 24
WAIT = 30.0  # seconds a test waits for the swarm or a peer to reach a state


@pytest.fixture(scope="module")
def smollm2():
    return prepare_default_model()


@pytest.fixture(scope="module")
def up(smollm2, tmp_path_factory) -> Iterator[tuple[LocalSwarm, Process]]:
    log_dir = tmp_path_factory.mktemp("gateway")
    with running(log_dir, smollm2, SPANS, "--throughput", "100") as swarm:
        api = start_api(log_dir, smollm2, swarm.initial_peers, "--refresh-period", "1", env=ENV)
        try:
            yield swarm, api
        finally:
            code = api.stop()
        assert code == 0, api.text()[-3000:]  # SIGTERM: the gateway drains, leaves the swarm and exits
        assert api.ready() is None


@pytest.fixture(scope="module")
def sdk(up) -> openai.OpenAI:
    return openai.OpenAI(base_url=up[1].address, api_key="unused", max_retries=0, timeout=300)


def _sessions(peer: Process) -> int:
    opened = channel(peer)
    try:
        return int(peer_pb2_grpc.PeerStub(opened).Info(peer_pb2.InfoRequest(), timeout=10).num_sessions)
    finally:
        opened.close()


def _ready(api: Process) -> httpx.Response:
    return httpx.get(api.address.removesuffix("/v1") + "/ready", timeout=30)


def test_greedy_chat_streamed_or_not_equals_local_transformers(smollm2, up, sdk) -> None:
    deadline = time.monotonic() + WAIT  # the gateway's first view of the swarm may predate a peer
    while _ready(up[1]).status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = local.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False
        )
        expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)

        reply = sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=messages, temperature=0, max_tokens=NEW_TOKENS
        )
        assert reply.choices[0].message.content == expected
        assert reply.usage.prompt_tokens == ids.shape[1]
        chunks = sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            temperature=0,
            max_tokens=NEW_TOKENS,
            stream=True,
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_a_seeded_sampled_request_repeats(sdk) -> None:
    def sample() -> str:
        reply = sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": "Tell me a joke."}],
            temperature=0.9,
            top_p=0.95,
            seed=1234,
            max_tokens=16,
        )
        return str(reply.choices[0].message.content)

    assert sample() == sample()


def test_leaving_mid_stream_frees_the_session_on_every_peer(up) -> None:
    swarm, api = up
    body = {
        "model": "SmolLM2-135M-Instruct",
        "messages": [{"role": "user", "content": "Count from one to one thousand."}],
        "max_tokens": 2000,
        "temperature": 0,
        "stream": True,
    }
    with httpx.stream("POST", api.address + "/chat/completions", json=body, timeout=120) as reply:
        assert reply.status_code == 200
        seen = 0
        for line in reply.iter_lines():
            seen += line.startswith("data: ")
            if seen >= 6:
                break
        assert [_sessions(peer) for peer in swarm.peers] == [1, 1, 1]
    left = time.monotonic()
    while any(_sessions(peer) for peer in swarm.peers) and time.monotonic() - left < WAIT:
        time.sleep(0.1)
    assert [_sessions(peer) for peer in swarm.peers] == [0, 0, 0]


def test_concurrent_greedy_chats_of_different_lengths_each_equal_local_transformers(smollm2, sdk) -> None:
    """Requests that join the engine's running batch at different times (staggered starts, different prompt
    and completion lengths) each get the text transformers generates for them alone."""
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    local = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    asks = [("What is the capital of France?", 20), ("Name three colours.", 8), ("Write a haiku.", 14)]
    asks += [("Say hello in Spanish, then in French, then in German.", 16)]
    expected = []
    for question, tokens in asks:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        out = local.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
        expected.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))

    def ask(index: int) -> str:
        time.sleep(0.3 * index)  # staggered: later requests join a batch already decoding
        question, tokens = asks[index]
        reply = sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=tokens,
        )
        return str(reply.choices[0].message.content)

    with ThreadPoolExecutor(len(asks)) as pool:
        assert list(pool.map(ask, range(len(asks)))) == expected


def test_with_a_peer_stopped_requests_get_503_naming_its_blocks(up, sdk) -> None:
    swarm, api = up  # last in this module: it stops a peer
    swarm.peers[-1].stop()
    deadline = time.monotonic() + WAIT
    while _ready(api).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _ready(api).status_code == 503
    with pytest.raises(openai.InternalServerError) as raised:
        sdk.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": "Hi"}], max_tokens=4
        )
    assert raised.value.status_code == 503
    assert "no peer serves blocks 20..29" in raised.value.message
