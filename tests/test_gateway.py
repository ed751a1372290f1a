"""`corolla api` in process: the gateway's app served by uvicorn on 127.0.0.1 over in-process peers of the
tiny Llama (with a byte-level tokenizer and a ChatML template), called with the official `openai` SDK and
with raw HTTP. Greedy text equals local transformers', streams concatenate to it, seeded sampling repeats,
concurrent streams all finish right, a client that leaves frees its sessions, and every bad request gets
OpenAI's error shape with the right status before anything reaches the swarm."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
import uvicorn
from chat_checkpoint import save_chat_checkpoint
from chat_checkpoint import tokenizer as byte_tokenizer
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.completions import Delta, _Choice, _Penalties
from client.config import ClientConfig, GatewayConfig
from client.gateway import Gateway
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection

NAME = "tiny-chat"
KEY = "test-key-0123456789"
WAIT = 20.0  # seconds any state a test waits for may take to appear


@contextlib.contextmanager
def serving(gateway: Gateway) -> Iterator[str]:
    """The gateway's app on a free port of 127.0.0.1 (uvicorn on a thread); yields its /v1 URL."""
    server = uvicorn.Server(uvicorn.Config(gateway.app(), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        raise RuntimeError("the gateway did not start")
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(WAIT)
        gateway.close()
        gateway.executor.shutdown(wait=True, cancel_futures=True)


@contextlib.contextmanager
def gateway_over(
    folder: Path, weights: Path, spans: list[tuple[int, int]], **config: Any
) -> Iterator[tuple[str, FakeSwarm]]:
    swarm = FakeSwarm(weights)
    swarm.add_many(spans)
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection)
    gateway = Gateway(
        model, AutoTokenizer.from_pretrained(folder), GatewayConfig(model=str(folder), **config), name=NAME
    )
    try:
        with serving(gateway) as url:
            yield url, swarm
    finally:
        model.shutdown()
        swarm.close()


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    return save_chat_checkpoint(checkpoint("llama"), tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def api(folder, checkpoint) -> Iterator[tuple[str, FakeSwarm]]:
    with gateway_over(
        folder, checkpoint("llama"), [(0, 2), (2, 4)], api_key=KEY, max_request_bytes=64 * 1024
    ) as up:
        yield up


@pytest.fixture(scope="module")
def sdk(api) -> openai.OpenAI:
    return openai.OpenAI(base_url=api[0], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(folder):
    """`reference(prompt_ids, max_new_tokens)` -> the text local transformers generates greedily."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)

    def generate(ids: list[int], new_tokens: int) -> tuple[str, list[int]]:
        prompt = torch.tensor([ids])
        out = model.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, do_sample=False
        )
        tokens = out[0, len(ids) :].tolist()
        return tokenizer.decode(tokens, skip_special_tokens=True), tokens

    return generate


def chat_ids(folder: Path, content: str) -> list[int]:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": content}], add_generation_prompt=True, tokenize=False
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def post(api, path: str, body: Any, *, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    if raw is not None:
        headers["content-type"] = "application/json"
        return httpx.post(api[0] + path, content=raw, headers=headers, timeout=60)
    return httpx.post(api[0] + path, json=body, headers=headers, timeout=60)


def test_greedy_chat_through_the_sdk_equals_local_transformers(sdk, folder, reference) -> None:
    for question, tokens in [("Hello there", 24), ("What is 2+2?", 40)]:
        expected, ids = reference(chat_ids(folder, question), tokens)
        reply = sdk.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=tokens
        )
        assert reply.choices[0].message.content == expected
        assert reply.choices[0].message.role == "assistant"
        assert reply.object == "chat.completion" and reply.model == NAME
        ended = 2 in ids
        assert reply.choices[0].finish_reason == ("stop" if ended else "length")
        assert reply.usage.prompt_tokens == len(chat_ids(folder, question))
        assert reply.usage.completion_tokens == (ids.index(2) + 1 if ended else tokens)
        assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_stream_concatenates_to_the_same_text_with_usage_last(sdk, folder, reference) -> None:
    expected, _ = reference(chat_ids(folder, "Tell me a story"), 48)
    chunks = list(
        sdk.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Tell me a story"}],
            temperature=0,
            max_tokens=48,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 48
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"


def test_text_completions_from_text_and_token_ids_equal_local(sdk, folder, reference) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = tokenizer("The swarm says")["input_ids"]
    expected, _ = reference(ids, 20)
    by_text = sdk.completions.create(model=NAME, prompt="The swarm says", temperature=0, max_tokens=20)
    by_ids = sdk.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=20)
    assert by_text.choices[0].text == by_ids.choices[0].text == expected
    echoed = sdk.completions.create(
        model=NAME, prompt="The swarm says", temperature=0, max_tokens=20, echo=True
    )
    assert echoed.choices[0].text == "The swarm says" + expected
    streamed = sdk.completions.create(
        model=NAME, prompt="The swarm says", temperature=0, max_tokens=20, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == expected
    # several prompts: choices numbered prompt by prompt
    several = sdk.completions.create(
        model=NAME, prompt=["The swarm says", "Hi"], temperature=0, max_tokens=8, n=2
    )
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == reference(ids, 8)[0]


def test_seeded_sampling_repeats_and_n_choices_differ(sdk) -> None:
    def sample(seed: int) -> list[str]:
        reply = sdk.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Pick words"}],
            temperature=1.0,
            top_p=0.9,
            seed=seed,
            n=3,
            max_tokens=16,
        )
        return [c.message.content for c in reply.choices]

    first = sample(7)
    assert sample(7) == first
    assert len(set(first)) > 1  # three draws from one generator
    assert sample(8) != first
    streamed = sdk.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Pick words"}],
        temperature=1.0,
        top_p=0.9,
        seed=7,
        n=3,
        max_tokens=16,
        stream=True,
    )
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == first


def test_stop_sequences_cut_the_text_in_whole_and_streamed_replies(sdk, folder, reference) -> None:
    full, _ = reference(chat_ids(folder, "Hello there"), 40)
    stop = full[10:13]
    assert stop and stop in full
    expected = full[: full.index(stop)]
    request = dict(
        model=NAME, messages=[{"role": "user", "content": "Hello there"}], temperature=0, max_tokens=40
    )
    whole = sdk.chat.completions.create(**request, stop=[stop, "never-seen"])
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(sdk.chat.completions.create(**request, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected


def test_logprobs_are_the_models_own(sdk, folder) -> None:
    ids = chat_ids(folder, "Hello there")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompt = torch.tensor([ids])
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    local = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
    tokens = out.sequences[0, len(ids) :].tolist()
    reply = sdk.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "Hello there"}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == len(tokens)
    for entry, token, expected in zip(content, tokens, local, strict=True):
        assert entry.logprob == pytest.approx(float(expected[token]), abs=1e-5)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(float(expected.max()), abs=1e-5)
        assert entry.bytes == list(entry.token.encode())
    text = sdk.completions.create(model=NAME, prompt=ids, temperature=0, max_tokens=6, logprobs=2)
    assert text.choices[0].logprobs.token_logprobs == pytest.approx(
        [float(lp[t]) for lp, t in zip(local, tokens, strict=True)], abs=1e-5
    )
    assert text.choices[0].logprobs.text_offset[0] == 0


def test_concurrent_streams_all_finish_with_their_own_text(sdk, folder, reference) -> None:
    questions = [f"Question number {i}" for i in range(6)]
    expected = [reference(chat_ids(folder, q), 24)[0] for q in questions]

    def stream(question: str) -> str:
        chunks = sdk.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": question}],
            temperature=0,
            max_tokens=24,
            stream=True,
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    with ThreadPoolExecutor(len(questions)) as pool:
        assert list(pool.map(stream, questions)) == expected


def test_a_client_that_leaves_mid_stream_frees_its_session_on_every_peer(api) -> None:
    url, swarm = api
    peers = list(swarm.peers)
    for peer in peers:
        peer.slow(1.0, at_least=0.05)  # 400 tokens would take 40 s: the stream is cut long before
    try:
        body = {"model": NAME, "prompt": "go on", "max_tokens": 400, "temperature": 0, "stream": True}
        with httpx.stream(
            "POST", url + "/completions", json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=60
        ) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            events = [line for line, _ in zip(lines, range(12), strict=False) if line.startswith("data: ")]
            assert events
            assert all(peer.num_sessions == 1 for peer in peers)
        left = time.monotonic()
        while any(peer.num_sessions for peer in peers) and time.monotonic() - left < WAIT:
            time.sleep(0.05)
        assert [peer.num_sessions for peer in peers] == [0, 0]
        assert time.monotonic() - left < 5.0  # after the step in flight, not after 400 tokens
    finally:
        for peer in peers:
            peer.slow(1.0)


@pytest.mark.parametrize("options", [{"engine": False}, {"speculative": "ngram", "draft_tokens": 4}])
def test_per_request_threads_and_speculative_engine_give_the_same_greedy_text(
    folder, checkpoint, reference, options
) -> None:
    questions = [("Hello there", 24), ("What is 2+2?", 40), ("Tell me a story", 30)]
    expected = [reference(chat_ids(folder, q), n)[0] for q, n in questions]
    with gateway_over(folder, checkpoint("llama"), [(0, 2), (2, 4)], **options) as (url, _):
        client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)

        def ask(question: str, tokens: int) -> str:
            reply = client.chat.completions.create(
                model=NAME, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=tokens
            )
            return str(reply.choices[0].message.content)

        with ThreadPoolExecutor(len(questions)) as pool:
            assert list(pool.map(lambda q: ask(*q), questions)) == expected


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        ({"model": NAME}, 400, "messages", None),
        ({"model": NAME, "messages": []}, 400, "messages", None),
        ({"model": NAME, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", None),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            400,
            "temperature",
            None,
        ),
        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "n": 99}, 400, "n", None),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5},
            400,
            "stop",
            None,
        ),
        ({"model": NAME, "messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools", None),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
            400,
            "max_tokens",
            None,
        ),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logit_bias": {"9999": 1}},
            400,
            None,
            None,
        ),
        (
            {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 10**6},
            400,
            None,
            "context_length_exceeded",
        ),
        ({"model": "other", "messages": [{"role": "user", "content": "x"}]}, 404, "model", "model_not_found"),
    ],
)
def test_bad_requests_get_openai_shaped_errors_and_reach_no_peer(api, body, status, param, code) -> None:
    swarm = api[1]
    before = [peer.num_computes for peer in swarm.peers]
    reply = post(api, "/chat/completions", body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param and error["code"] == code
    assert [peer.num_computes for peer in swarm.peers] == before


def test_keys_bodies_and_routes_are_checked_first(api) -> None:
    body = {"model": NAME, "messages": [{"role": "user", "content": "x"}], "max_tokens": 1}
    assert post(api, "/chat/completions", body, key=None).status_code == 401
    wrong = post(api, "/chat/completions", body, key="not-the-key-at-all")
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    assert post(api, "/chat/completions", None, raw=b"{not json").status_code == 400
    huge = post(api, "/chat/completions", {**body, "messages": [{"role": "user", "content": "x" * 100_000}]})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert httpx.get(api[0] + "/nowhere", headers={"authorization": f"Bearer {KEY}"}).status_code == 404
    assert httpx.get(api[0].removesuffix("/v1") + "/health").json() == {"status": "ok"}
    ready = httpx.get(api[0].removesuffix("/v1") + "/ready").json()
    assert ready["status"] == "ready" and ready["num_blocks"] == 4
    models = httpx.get(api[0] + "/models", headers={"authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == [NAME]


def test_a_swarm_with_blocks_unserved_answers_503_naming_them(folder, checkpoint) -> None:
    with gateway_over(folder, checkpoint("llama"), [(0, 2)]) as (url, swarm):
        sdk = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=60)
        with pytest.raises(openai.InternalServerError) as raised:
            sdk.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}], max_tokens=4)
        assert raised.value.status_code == 503
        assert "no peer serves blocks 2..3" in raised.value.message
        ready = httpx.get(url.removesuffix("/v1") + "/ready")
        assert ready.status_code == 503 and "2..3" in ready.json()["error"]["message"]
        assert httpx.get(url.removesuffix("/v1") + "/health").status_code == 200
        assert swarm.peers[0].num_computes == 0


def test_requests_beyond_the_waiting_room_get_429(folder, checkpoint) -> None:
    with gateway_over(
        folder, checkpoint("llama"), [(0, 4)], max_concurrent_requests=1, max_waiting_requests=0
    ) as (url, swarm):
        peer = swarm.peers[0]
        peer.slow(1.0, at_least=0.05)
        body = {"model": NAME, "prompt": "go", "max_tokens": 60, "temperature": 0, "stream": True}
        with httpx.stream("POST", url + "/completions", json=body, timeout=60) as first:
            lines = first.iter_lines()  # kept: a generator dropped closes the stream, freeing the slot
            assert next(lines).startswith("data: ")
            second = httpx.post(url + "/completions", json={**body, "stream": False}, timeout=60)
            assert second.status_code == 429 and second.json()["error"]["type"] == "rate_limit_error"
        peer.slow(1.0)


# ---- the text of one choice, without a model ---------------------------------------------------------


def _feed(text: str, stop: list[str]) -> tuple[list[Delta], _Choice]:
    tokenizer = byte_tokenizer()
    choice = _Choice(0, tokenizer, stop)
    deltas = []
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        delta = choice.add(token, False, None)
        if delta is not None:
            deltas.append(delta)
        if choice.finish_reason:
            break
    else:
        deltas.append(choice.finish("length"))
    return deltas, choice


def test_a_stop_sequence_is_never_sent_even_in_part() -> None:
    deltas, choice = _feed("one two STOP three", ["STOP", "xyz"])
    assert "".join(d.text for d in deltas) == "one two "
    assert all("S" not in d.text for d in deltas) and choice.finish_reason == "stop"
    # a held-back prefix that turns out not to be a stop sequence is released
    deltas, choice = _feed("one ST two", ["STOP"])
    assert "".join(d.text for d in deltas) == "one ST two" and choice.finish_reason == "length"


def test_multibyte_characters_split_over_tokens_come_out_whole() -> None:
    deltas, _ = _feed("naïve café ✓ 日本", [])
    assert "".join(d.text for d in deltas) == "naïve café ✓ 日本"
    assert all("\ufffd" not in d.text for d in deltas)


def test_presence_and_frequency_penalties_follow_openais_formula() -> None:
    scores = torch.zeros(1, 5)
    ids = torch.tensor([[4, 4, 1, 1, 1, 3]])  # prompt [4, 4]; generated 1 x3, 3 x1
    out = _Penalties(2, presence=0.5, frequency=0.25)(ids, scores)
    assert out.tolist() == [[0.0, -0.5 - 0.75, 0.0, -0.5 - 0.25, 0.0]]
