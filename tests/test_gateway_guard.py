"""The gateway against web pages and greedy callers (review-security-3 M3, L2, L3), in process over the tiny
chat model: a cross-site form post and a rebound host name get 4xx before anything is computed, a path
with %0A logs one line, and a request's tokens, generation time and response bytes are bounded (a run
past the last two ends with finish_reason "length", which the official SDK takes), while one API key cannot
keep another's requests from the slots."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from chat_checkpoint import save_chat_checkpoint
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from test_gateway import NAME, serving
from transformers import AutoTokenizer

from client.config import ClientConfig, GatewayConfig
from client.gateway import Gateway
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection
from protos.cli import JsonFormatter

KEY_A, KEY_B = "key-of-alice-0123", "key-of-bob-456789"
WAIT = 20.0  # seconds any state a test waits for may take to appear
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hello there"}], "temperature": 0}


@contextlib.contextmanager
def gateway_with(weights: Path, folder: Path, **config: Any) -> Iterator[tuple[str, FakeSwarm, Gateway]]:
    """A gateway over one in-process peer serving every block; (its /v1 URL, the swarm, the gateway)."""
    swarm = FakeSwarm(weights)
    swarm.add_many([(0, 4)])
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection)
    gateway = Gateway(
        model, AutoTokenizer.from_pretrained(folder), GatewayConfig(model=str(folder), **config), name=NAME
    )
    try:
        with serving(gateway) as url:
            yield url, swarm, gateway
    finally:
        model.shutdown()
        swarm.close()


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    return save_chat_checkpoint(checkpoint("llama"), tmp_path_factory.mktemp("chat") / "tiny-chat")


@pytest.fixture(scope="module")
def keyless(checkpoint, folder) -> Iterator[tuple[str, FakeSwarm, Gateway]]:
    """The default: loopback, no API key (what a web page on the same machine could reach)."""
    with gateway_with(checkpoint("llama"), folder, allowed_hosts=["api.internal"]) as up:
        yield up


def computes(swarm: FakeSwarm) -> int:
    return sum(peer.num_computes for peer in swarm.peers)


# ---- M3: web pages (cross-site posts, DNS rebinding) ---------------------------------------------------


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",  # <form enctype="text/plain">, or fetch() with a string body: no preflight
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        None,  # fetch() with a Blob body of no type sends no Content-Type at all
    ],
)
def test_a_cross_site_form_post_gets_4xx_and_computes_nothing(keyless, content_type) -> None:
    url, swarm, _ = keyless
    before = computes(swarm)
    headers = {"origin": "https://evil.example"} | ({"content-type": content_type} if content_type else {})
    body = json.dumps({**CHAT, "max_tokens": 4}).encode()
    reply = httpx.post(url + "/chat/completions", content=body, headers=headers, timeout=60)
    assert reply.status_code == 415, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["code"]) == ("invalid_request_error", "unsupported_media_type")
    assert computes(swarm) == before


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:8000", "localhost.evil.example", "127.0.0.1.nip.io", "", "a b", "[::1"],
)
def test_a_host_name_the_operator_did_not_choose_gets_400(keyless, host) -> None:
    url, swarm, _ = keyless
    before = computes(swarm)
    for method, path, body in [("GET", "/models", None), ("POST", "/chat/completions", CHAT)]:
        reply = httpx.request(method, url + path, json=body, headers={"host": host}, timeout=60)
        assert reply.status_code == 400, (host, reply.text)
        assert reply.json()["error"]["code"] == "host_not_allowed"
    assert computes(swarm) == before


def test_the_sdk_and_the_operators_names_still_work(keyless) -> None:
    url, _, _ = keyless
    port = url.split(":")[2].split("/")[0]
    for host in [
        "127.0.0.1",
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        "LOCALHOST",
        "[::1]:1",
        "api.internal",
    ]:
        assert httpx.get(url + "/models", headers={"host": host}).status_code == 200, host
    sdk = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
    reply = sdk.chat.completions.create(**CHAT, max_tokens=3)
    assert reply.usage.completion_tokens == 3


# ---- L2: the request log -------------------------------------------------------------------------------


def test_a_newline_in_the_path_forges_no_log_line(keyless, caplog: pytest.LogCaptureFixture) -> None:
    url, _, _ = keyless
    forged = "/x%0A2030-01-01 00:00:00 INFO client.gateway POST /v1/admin 200 0.001s%0D%1B[2J"
    with caplog.at_level(logging.INFO, logger="client.gateway"):
        assert httpx.get(url + forged).status_code == 404
        deadline = time.monotonic() + WAIT
        while not any("/x" in r.getMessage() for r in caplog.records) and time.monotonic() < deadline:
            time.sleep(0.02)
    [record] = [r for r in caplog.records if "/x" in r.getMessage()]
    text = logging.Formatter("%(levelname)s %(name)s %(message)s").format(record)
    assert "\n" not in text and "\r" not in text and "\x1b" not in text
    assert "GET /v1/x\\n2030-01-01" in text and " 404 " in text
    line = JsonFormatter().format(record)
    assert "\n" not in line and "\n" not in json.loads(line)["message"]


# ---- L3: what one request may take ----------------------------------------------------------------------


def test_tokens_per_request_are_capped_as_max_tokens_x_choices(checkpoint, folder) -> None:
    with gateway_with(checkpoint("llama"), folder, max_request_tokens=64) as (url, swarm, _):
        sdk = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError) as raised:
            sdk.chat.completions.create(**CHAT, n=4, max_tokens=32)
        assert raised.value.status_code == 400 and raised.value.body["param"] == "max_tokens"
        assert computes(swarm) == 0
        # without max_tokens the choices share the budget: 4 x 16, not 4 x the context's 500 tokens
        reply = sdk.chat.completions.create(**CHAT, n=4)
        assert reply.usage.completion_tokens <= 64
        assert all(choice.finish_reason in ("stop", "length") for choice in reply.choices)
        assert sdk.chat.completions.create(**CHAT, n=2, max_tokens=32).usage.completion_tokens <= 64


def test_a_generation_past_its_time_ends_with_finish_reason_length(checkpoint, folder) -> None:
    with gateway_with(checkpoint("llama"), folder, generation_timeout=1.0) as (url, swarm, _):
        swarm.peers[0].slow(1.0, at_least=0.05)  # 400 tokens would take 20 s
        sdk = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        asked = dict(model=NAME, prompt="go on", max_tokens=400, temperature=0)  # greedy: no end token
        started = time.monotonic()
        reply = sdk.completions.create(**asked)
        assert time.monotonic() - started < 10.0
        assert reply.choices[0].finish_reason == "length" and 0 < reply.usage.completion_tokens < 100
        chunks = list(sdk.completions.create(**asked, stream=True))
        assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) < 100


def test_a_response_past_its_bytes_ends_with_finish_reason_length(checkpoint, folder) -> None:
    limit = 4096  # a token with 20 alternatives and their bytes is about 1.5 KB of JSON: 200 are 300 KB
    with gateway_with(checkpoint("llama"), folder, max_response_bytes=limit) as (url, _, _):
        sdk = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=60)
        asked = dict(CHAT, max_tokens=200, logprobs=True, top_logprobs=20, temperature=1.0, seed=1)
        raw = sdk.chat.completions.with_raw_response.create(**asked)
        reply = raw.parse()
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens < 10
        assert len(raw.content) < limit + 2048  # the token that crossed it, and the response's head
        streamed = httpx.post(url + "/chat/completions", json={**asked, "stream": True}, timeout=60)
        assert streamed.status_code == 200 and len(streamed.content) < limit + 2048
        assert b'"finish_reason":"length"' in streamed.content


def test_one_api_key_cannot_keep_another_from_the_slots(checkpoint, folder) -> None:
    config = dict(api_keys=[KEY_A, KEY_B], max_concurrent_requests=1, max_waiting_requests=3)
    with gateway_with(checkpoint("llama"), folder, **config) as (url, swarm, gateway):
        swarm.peers[0].slow(1.0, at_least=0.05)
        finished: list[str] = []

        def complete(key: str, who: str) -> None:
            body = {"model": NAME, "prompt": "go", "max_tokens": 4, "temperature": 0}
            reply = httpx.post(url + "/completions", json=body, headers={"authorization": f"Bearer {key}"})
            assert reply.status_code == 200, reply.text
            finished.append(who)

        def queued(count: int) -> None:
            deadline = time.monotonic() + WAIT
            while gateway.admission.num_queued != count and time.monotonic() < deadline:
                time.sleep(0.01)
            assert gateway.admission.num_queued == count

        long = {"model": NAME, "prompt": "go", "max_tokens": 400, "temperature": 0, "stream": True}
        auth_a = {"authorization": f"Bearer {KEY_A}"}
        with httpx.stream("POST", url + "/completions", json=long, headers=auth_a, timeout=60) as first:
            lines = first.iter_lines()  # kept: a generator dropped closes the stream
            assert next(lines).startswith("data: ")  # A holds the only slot
            alice = threading.Thread(target=complete, args=(KEY_A, "A"))
            alice.start()
            queued(1)
            # A has its share (4 places / 2 keys) generating or waiting: its next request is refused...
            third = httpx.post(url + "/completions", json={**long, "stream": False}, headers=auth_a)
            assert third.status_code == 429 and third.json()["error"]["code"] == "key_busy"
            # ...while B still gets a place, and the next free slot before A's second request
            bob = threading.Thread(target=complete, args=(KEY_B, "B"))
            bob.start()
            queued(2)
        for thread in (alice, bob):
            thread.join(WAIT)
        assert finished == ["B", "A"]
        swarm.peers[0].slow(1.0)
