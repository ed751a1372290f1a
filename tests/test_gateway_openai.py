"""`corolla api` as OpenAI clients and chat UIs call it, in process: in-process peers of the tiny Llama (byte
tokenizer, ChatML template) behind two gateways over one model, the engine's and `--no-engine`'s, called with
the official `openai` SDK and with raw bodies of chat UIs. vLLM's extras (`top_k`, `min_p`,
`repetition_penalty`) give the tokens of transformers' processors; explicit nulls are defaults and unknown
fields are logged once; tool messages reach the chat template (`--chat-template FILE`); the prompts of one
completions request run as one batch with each prompt's own tokens; `/metrics` parses with Prometheus'
parser and counts the requests made."""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import torch
from chat_checkpoint import save_chat_checkpoint
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from test_gateway import serving
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LogitsProcessorList,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
)

from client.completions import Plan, _Sample, processors_for
from client.config import ClientConfig, GatewayConfig
from client.gateway import Gateway
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection
from protos.errors import InvalidInputError

NAME = "tiny-chat"
KEY = "test-key-0123456789"
WAIT = 60.0  # seconds a request may take on the test machine's shared cores
PATHS = ["engine", "threads"]
# renders tool calls and the tool_call_id a tool message answers, as tool-aware templates do
TOOL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}call {{ c['function']['name'] }}"
    "({{ c['function']['arguments'] | tojson }}){% endfor %}{% endif %}"
    "{% if m['role'] == 'tool' %}[{{ m['tool_call_id'] }}] {% endif %}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    return save_chat_checkpoint(checkpoint("llama"), tmp_path_factory.mktemp("chat") / NAME)


@pytest.fixture(scope="module")
def swarm(checkpoint) -> Iterator[FakeSwarm]:
    swarm = FakeSwarm(checkpoint("llama"))
    try:
        swarm.add_many([(0, 2), (2, 4)])
        yield swarm
    finally:
        swarm.close()


@pytest.fixture(scope="module")
def model(swarm, folder) -> Iterator[Any]:
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    model = AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection)
    try:
        yield model
    finally:
        model.shutdown()


@pytest.fixture(scope="module")
def gateways(model, folder, tmp_path_factory) -> Iterator[dict[str, tuple[Gateway, str]]]:
    """path ("engine", "threads": `--no-engine`) -> a gateway over the module's model (with the API key and
    `--chat-template` of TOOL_TEMPLATE) and its /v1 URL."""
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with contextlib.ExitStack() as stack:
        served = {}
        for path in PATHS:
            config = GatewayConfig(
                model=str(folder), engine=path == "engine", api_key=KEY, chat_template=template
            )
            gateway = Gateway(model, tokenizer, config, name=NAME)
            served[path] = (gateway, stack.enter_context(serving(gateway)))
        yield served


@pytest.fixture(scope="module", params=PATHS)
def sdk(request, gateways) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateways[request.param][1], api_key=KEY, max_retries=0, timeout=WAIT)


@pytest.fixture(scope="module")
def local(folder) -> Any:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(folder) -> Any:
    return AutoTokenizer.from_pretrained(folder)


def generate_locally(local: Any, tokenizer: Any, ids: list[int], new_tokens: int, **options: Any) -> str:
    """The text transformers' `generate()` gives for `ids` (stopping at the end of turn, as the gateway)."""
    prompt = torch.tensor([ids])
    with torch.no_grad():
        out = local.generate(
            prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens, **options
        )
    return str(tokenizer.decode(out[0, len(ids) :].tolist(), skip_special_tokens=True))


def template_ids(
    tokenizer: Any, messages: list[dict[str, Any]], template: str | None = TOOL_TEMPLATE
) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, chat_template=template, add_generation_prompt=True, tokenize=False
    )
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def post(url: str, path: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(url + path, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=WAIT)


QUESTION = [{"role": "user", "content": "Tell me a story about peers"}]


def test_repetition_penalty_gives_transformers_greedy_tokens(sdk, local, tokenizer) -> None:
    ids = template_ids(tokenizer, QUESTION)
    plain = generate_locally(local, tokenizer, ids, 30, do_sample=False)
    expected = generate_locally(local, tokenizer, ids, 30, do_sample=False, repetition_penalty=1.5)
    assert expected != plain, "the penalty changes nothing here: the test could not tell"
    reply = sdk.chat.completions.create(
        model=NAME,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=30,
        extra_body={"repetition_penalty": 1.5, "top_k": 5, "min_p": 0.3},  # greedy: top_k, min_p moot
    )
    assert reply.choices[0].message.content == expected
    streamed = sdk.chat.completions.create(
        model=NAME,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=30,
        stream=True,
        extra_body={"repetition_penalty": 1.5},
    )
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == expected


def test_top_k_min_p_and_repetition_penalty_sample_as_transformers_processors(sdk, local, tokenizer) -> None:
    ids = template_ids(tokenizer, QUESTION)

    def sampled(**extras: Any) -> str:
        reply = sdk.completions.create(
            model=NAME, prompt=ids, temperature=0.8, seed=11, max_tokens=24, extra_body=extras
        )
        return reply.choices[0].text

    generator = torch.Generator().manual_seed(11)
    processors = LogitsProcessorList(
        [
            RepetitionPenaltyLogitsProcessor(1.3),
            TemperatureLogitsWarper(0.8),
            TopKLogitsWarper(12),
            MinPLogitsWarper(0.05),
            _Sample(generator),  # the request's own seeded draw, as the gateway makes it
        ]
    )
    expected = generate_locally(local, tokenizer, ids, 24, do_sample=False, logits_processor=processors)
    extras = {"top_k": 12, "min_p": 0.05, "repetition_penalty": 1.3}
    assert sampled(**extras) == expected
    assert sampled() != expected, "the extras change nothing here: the test could not tell"


def test_explicit_nulls_are_defaults(sdk, gateways, local, tokenizer) -> None:
    ids = template_ids(tokenizer, QUESTION)
    reply = sdk.chat.completions.create(  # the SDK sends an explicit None as null
        model=NAME,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=12,
        extra_body={"chat_template_kwargs": None},
        seed=None,  # type: ignore[arg-type]
        stop=None,
        top_p=None,
        n=None,
        presence_penalty=None,
        frequency_penalty=None,
        logit_bias=None,
        logprobs=None,
        top_logprobs=None,
        user=None,  # type: ignore[arg-type]
        response_format=None,  # type: ignore[arg-type]
        stream_options=None,
    )
    assert reply.choices[0].message.content == generate_locally(local, tokenizer, ids, 12, do_sample=False)
    nulls = {
        "model": NAME,
        "prompt": ids,
        "temperature": 0,
        "max_tokens": None,  # OpenAI's default for completions: 16
        "top_p": None,
        "n": None,
        "stream": None,
        "stop": None,
        "seed": None,
        "logprobs": None,
        "echo": None,
        "suffix": None,
        "best_of": None,
        "logit_bias": None,
        "user": None,
        "stream_options": None,
        "top_k": None,
        "min_p": None,
        "repetition_penalty": None,
    }
    raw = post(gateways["engine"][1], "/completions", nulls)
    assert raw.status_code == 200, raw.text
    assert raw.json()["choices"][0]["text"] == generate_locally(local, tokenizer, ids, 16, do_sample=False)


def test_tool_messages_reach_the_chat_template(sdk, local, tokenizer) -> None:
    conversation: list[dict[str, Any]] = [
        {"role": "system", "content": "You can look up the weather."},
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
    ]
    as_template_takes_it = [
        conversation[0],
        conversation[1],
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        conversation[3],
    ]
    ids = template_ids(tokenizer, as_template_takes_it)
    assert "[call_1] sunny" in tokenizer.decode(
        ids
    ) and 'call weather({"city": "Paris"})' in tokenizer.decode(ids)
    reply = sdk.chat.completions.create(model=NAME, messages=conversation, temperature=0, max_tokens=16)  # type: ignore[arg-type]
    assert reply.choices[0].message.content == generate_locally(local, tokenizer, ids, 16, do_sample=False)
    assert reply.usage is not None and reply.usage.prompt_tokens == len(ids)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(
            model=NAME,
            messages=conversation,  # type: ignore[arg-type]
            max_tokens=4,
            tools=[{"type": "function", "function": {"name": "weather", "parameters": {}}}],
        )
    assert refused.value.param == "tools" and "tool calling is not supported" in refused.value.message


@pytest.mark.parametrize("path", PATHS)
def test_three_prompts_run_as_one_batch_with_each_prompts_own_tokens(
    gateways, swarm, local, tokenizer, path
) -> None:
    gateway, url = gateways[path]
    prompts = ["The swarm says", "Hi", "Peers serve blocks of the model to"]  # three lengths: padded
    expected = [
        generate_locally(
            local, tokenizer, tokenizer(p)["input_ids"], 14, do_sample=False, repetition_penalty=1.2
        )
        for p in prompts
    ]
    sdk = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=WAIT)
    stats = gateway.engine.stats if gateway.engine is not None else None
    before = (stats.prefills, stats.prefill_forwards) if stats is not None else None
    opened = len(swarm.peers[0].faults.received)
    reply = sdk.completions.create(
        model=NAME, prompt=prompts, temperature=0, max_tokens=14, extra_body={"repetition_penalty": 1.2}
    )
    assert [c.text for c in sorted(reply.choices, key=lambda c: c.index)] == expected
    if stats is not None:  # one prefill forward for the three prompts, their rows decoded together
        assert before is not None
        assert (stats.prefills - before[0], stats.prefill_forwards - before[1]) == (3, 1)
        assert stats.max_rows >= 3
    else:  # one session, three rows: one batch through generate()
        assert len(swarm.peers[0].faults.received) - opened == 1


OPEN_WEBUI = {  # Open WebUI's chat body: nulls, its own fields and `params` beside OpenAI's
    "stream": True,
    "model": NAME,
    "messages": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": [{"type": "text", "text": "Say something short"}]},
    ],
    "temperature": 0,
    "max_tokens": 12,
    "top_p": None,
    "seed": None,
    "stop": None,
    "frequency_penalty": None,
    "stream_options": {"include_usage": True},
    "params": {},
    "tool_servers": [],
    "features": {"image_generation": False, "code_interpreter": False, "web_search": False},
    "variables": {"{{USER_NAME}}": "alice", "{{CURRENT_DATE}}": "2026-12-07"},
    "session_id": "Xq1b2c",
    "chat_id": "0b7c1a2e-5d4f-4c1e-9f5a-0e1d2c3b4a59",
    "id": "6e5d4c3b-2a19-4f8e-8d7c-6b5a49382716",
    "background_tasks": {"title_generation": True, "tags_generation": True},
}
LIBRECHAT = {  # LibreChat's custom-endpoint body: OpenAI's fields with nulls and vendor sampling extras
    "model": NAME,
    "temperature": 0,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "stop": None,
    "max_tokens": 12,
    "user": "6567a1b2c3d4e5f60718293a",
    "stream": False,
    "top_k": 40,
    "repetition_penalty": 1.1,
    "messages": [
        {"role": "system", "content": "Be concise.", "name": None},
        {"role": "user", "content": "Say something short", "name": None},
    ],
    "parallel_tool_calls": None,
    "tool_choice": None,
    "tools": None,
}
SILLYTAVERN = {  # a roleplay front end's text-completion body: vendor fields vLLM takes, some it does not
    "model": NAME,
    "prompt": "Alice: Hello!\nBob:",
    "max_tokens": 12,
    "temperature": 0,
    "min_p": 0.1,
    "top_k": 0,
    "repetition_penalty": 1.0,
    "typical_p": 1,
    "mirostat_mode": 0,
    "skip_special_tokens": True,
    "include_stop_str_in_output": False,
    "stop": ["\nAlice:"],
    "stream": False,
    "logit_bias": {},
}


@pytest.mark.parametrize(
    ("body", "route"),
    [(OPEN_WEBUI, "/chat/completions"), (LIBRECHAT, "/chat/completions"), (SILLYTAVERN, "/completions")],
)
def test_chat_ui_bodies_are_answered_and_unknown_fields_logged_once(gateways, body, route, caplog) -> None:
    url = gateways["engine"][1]
    caplog.set_level(logging.WARNING, logger="client.gateway")
    for _ in range(2):
        if body.get("stream"):
            with httpx.stream(
                "POST", url + route, json=body, headers={"authorization": f"Bearer {KEY}"}, timeout=WAIT
            ) as r:
                assert r.status_code == 200, r.read()
                events = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
            assert events[-1] == "[DONE]"
            chunks = [json.loads(e) for e in events[:-1]]
            assert all("error" not in c for c in chunks)
            assert chunks[-1]["usage"]["completion_tokens"] > 0
        else:
            reply = post(url, route, body)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] > 0
    known = {"top_k", "min_p", "repetition_penalty", "stream_options", "tools"}
    unknown = {k for k, v in body.items() if v is not None and k not in known and k not in _OPENAI_FIELDS}
    logged = [r.getMessage() for r in caplog.records if "request field ignored" in r.getMessage()]
    for name in unknown:  # each once, though both requests carried it (earlier tests may have logged it)
        assert sum(f"field='{name}'" in line for line in logged) <= 1
    assert unknown <= gateways["engine"][0].unknown_fields


_OPENAI_FIELDS = {
    "model",
    "messages",
    "prompt",
    "temperature",
    "top_p",
    "n",
    "stream",
    "stop",
    "max_tokens",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "user",
    "seed",
    "echo",
    "logprobs",
}


def scrape(url: str) -> dict[str, list[Any]]:
    """/metrics (without the API key, as Prometheus scrapes it) parsed by Prometheus' own parser: metric
    family name -> its samples."""
    reply = httpx.get(url.removesuffix("/v1") + "/metrics", timeout=WAIT)
    assert reply.status_code == 200 and reply.headers["content-type"].startswith("text/plain")
    return {family.name: family.samples for family in text_string_to_metric_families(reply.text)}


def value(families: dict[str, list[Any]], family: str, sample: str, **labels: str) -> float:
    found = [s.value for s in families[family] if s.name == sample and labels.items() <= s.labels.items()]
    return sum(found)


def test_metrics_count_the_requests_made(gateways) -> None:
    url = gateways["threads"][1]
    sdk = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=WAIT)
    before = scrape(url)
    usages = []
    for tokens in (5, 7):
        reply = sdk.chat.completions.create(model=NAME, messages=QUESTION, temperature=0, max_tokens=tokens)  # type: ignore[arg-type]
        usages.append(reply.usage)
    streamed = sdk.completions.create(
        model=NAME,
        prompt="Hello",
        temperature=0,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    usages.append([c for c in streamed][-1].usage)
    assert post(url, "/chat/completions", {"model": NAME, "messages": [], "max_tokens": 3}).status_code == 400
    after = scrape(url)

    def grew(family: str, sample: str, **labels: str) -> float:
        return value(after, family, sample, **labels) - value(before, family, sample, **labels)

    requests = "corolla_gateway_requests"
    assert grew(requests, requests + "_total", endpoint="chat_completions", status="200") == 2
    assert grew(requests, requests + "_total", endpoint="completions", status="200") == 1
    assert grew(requests, requests + "_total", endpoint="chat_completions", status="400") == 1
    for family in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        name = f"corolla_gateway_{family}"
        assert grew(name, name + "_count") == 3
        assert grew(name, name + "_sum") > 0
    prompt, generated = "corolla_gateway_request_prompt_tokens", "corolla_gateway_request_generation_tokens"
    assert grew(prompt, prompt + "_sum") == sum(u.prompt_tokens for u in usages)
    assert grew(generated, generated + "_sum") == sum(u.completion_tokens for u in usages) > 0
    assert value(after, "corolla_gateway_requests_running", "corolla_gateway_requests_running") == 0
    assert value(after, "corolla_gateway_requests_waiting", "corolla_gateway_requests_waiting") == 0
    samples = [s for name, family in after.items() if name.startswith("corolla_gateway_") for s in family]
    assert samples and all(s.labels.get("model") == NAME for s in samples)
    # the client library's series share the endpoint: the requests' sessions and steps through the swarm
    sessions = "corolla_client_sessions"
    assert grew(sessions, sessions + "_total") >= 3


def test_a_chat_template_that_cannot_render_stops_the_start(model, folder, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m['content'] }")  # unclosed tag
    refuses = tmp_path / "refuses.jinja"
    refuses.write_text("{{ raise_exception('system messages only') }}")
    for template in (broken, refuses):
        config = GatewayConfig(model=str(folder), engine=False, chat_template=template)
        with pytest.raises(InvalidInputError, match="chat template"):
            Gateway(model, tokenizer, config, name=NAME)
    with pytest.raises(ValidationError, match="not a file"):
        GatewayConfig(model=str(folder), chat_template=tmp_path / "missing.jinja")


def test_left_padding_is_left_out_of_the_repetition_penalty(tokenizer) -> None:
    plan = Plan(
        prompts=[[7, 8, 9]],
        n=1,
        max_tokens=4,
        temperature=0.0,
        top_p=1.0,
        seed=None,
        presence_penalty=0.0,
        frequency_penalty=0.0,
        logit_bias={},
        stop=[],
        logprobs=None,
        repetition_penalty=2.0,
    )
    scores = torch.ones(2, 16)
    alone, _ = processors_for(plan, tokenizer, 3, torch.Generator())
    padded, _ = processors_for(plan, tokenizer, 5, torch.Generator(), pads=[2, 0])
    expected = alone(torch.tensor([[7, 8, 9]]), scores[:1].clone())
    assert expected[0, 7] == 0.5 and expected[0, 2] == 1.0
    # row 0: [pad pad 7 8 9]; row 1: a prompt that holds the pad token (2) itself, penalized
    out = padded(torch.tensor([[2, 2, 7, 8, 9], [2, 2, 7, 8, 9]]), scores.clone())
    assert torch.equal(out[0], expected[0]) and out[1, 2] == 0.5
