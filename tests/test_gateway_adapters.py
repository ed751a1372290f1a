"""Served LoRA adapters through `corolla api` and `corolla generate`, in process: in-process peers of the
tiny Llama serve a PEFT adapter (`--adapters tuned=DIR`); a request whose `model` names it gives the greedy
tokens of `peft.PeftModel` on transformers' model, on the engine and on the per-request thread path, beside
base-model requests that keep the base model's tokens; /v1/models lists the adapters the current view
announces with their parent, an unknown name gets OpenAI's 404, and `corolla generate --adapter` hands the
name to the model."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from chat_checkpoint import save_chat_checkpoint
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from peft import LoraConfig, PeftModel, get_peft_model
from test_gateway import serving
from transformers import AutoModelForCausalLM, AutoTokenizer

from client import cli
from client.completions import Delta, Plan, Stop
from client.config import ClientConfig, GatewayConfig
from client.discovery import SwarmView
from client.engine import Engine, Job
from client.gateway import Gateway, served_adapters
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection
from protos.errors import CorollaError
from protos.records import PeerState

NAME = "tiny-chat"
ADAPTER = "tuned"
PROMPTS = [[5, 9, 14, 3, 22, 7], [40, 41, 8, 19]]
NEW_TOKENS = 10
WAIT = 60.0  # seconds a request may take on the test machine's shared cores


def save_adapter(weights: Path, folder: Path) -> Path:
    """A random (not identity) PEFT LoRA of the tiny Llama's q_proj and v_proj, saved to `folder`."""
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(weights, dtype=torch.float32)
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    return save_chat_checkpoint(checkpoint("llama"), tmp_path_factory.mktemp("chat") / NAME)


@pytest.fixture(scope="module")
def adapter(checkpoint, tmp_path_factory) -> Path:
    return save_adapter(checkpoint("llama"), tmp_path_factory.mktemp("lora") / ADAPTER)


@pytest.fixture(scope="module")
def reference(folder, adapter) -> dict[str, dict[int, list[int]]]:
    """model name -> prompt index -> the greedy tokens of transformers' model (with PEFT's adapter)."""
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), adapter
    ).eval()
    tokens: dict[str, dict[int, list[int]]] = {}
    for name, model in [(NAME, base), (ADAPTER, tuned)]:
        tokens[name] = {}
        for index, ids in enumerate(PROMPTS):
            prompt = torch.tensor([ids])
            with torch.no_grad():
                out = model.generate(
                    input_ids=prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=NEW_TOKENS,
                    do_sample=False,
                )
            tokens[name][index] = out[0, len(ids) :].tolist()
    assert tokens[NAME] != tokens[ADAPTER], (
        "the adapter changes no token: the tests could not tell them apart"
    )
    return tokens


@pytest.fixture(scope="module")
def swarm(checkpoint, adapter) -> Iterator[FakeSwarm]:
    swarm = FakeSwarm(checkpoint("llama"), adapters=[f"{ADAPTER}={adapter}"])
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
def apis(model, folder) -> Iterator[dict[str, str]]:
    """path ("engine", "threads": `--no-engine`) -> the /v1 URL of a gateway over the module's model."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with contextlib.ExitStack() as stack:
        urls = {
            path: stack.enter_context(
                serving(Gateway(model, tokenizer, GatewayConfig(model=str(folder), engine=engine), name=NAME))
            )
            for path, engine in [("engine", True), ("threads", False)]
        }
        yield urls


def complete(url: str, model: str, prompt: list[int]) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0}
    return httpx.post(url + "/completions", json=body, timeout=WAIT)


def text_of(tokenizer: Any, tokens: list[int]) -> str:
    return str(tokenizer.decode(tokens, skip_special_tokens=True))


@pytest.mark.parametrize("path", ["engine", "threads"])
def test_the_adapter_and_the_base_model_give_their_own_greedy_tokens_side_by_side(
    apis, folder, reference, path
) -> None:
    tokenizer = AutoTokenizer.from_pretrained(folder)
    asks = [(name, index) for index in range(len(PROMPTS)) for name in (ADAPTER, NAME)]
    with ThreadPoolExecutor(len(asks)) as pool:
        replies = list(pool.map(lambda ask: complete(apis[path], ask[0], PROMPTS[ask[1]]), asks))
    for (name, index), reply in zip(asks, replies, strict=True):
        assert reply.status_code == 200, reply.text
        assert reply.json()["model"] == name
        # one token per byte: the texts are equal when the tokens are
        assert reply.json()["choices"][0]["text"] == text_of(tokenizer, reference[name][index]), (name, index)


def test_a_chat_stream_with_the_adapter_concatenates_to_its_whole_reply(apis) -> None:
    body = {
        "model": ADAPTER,
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": NEW_TOKENS,
        "temperature": 0,
    }
    whole = httpx.post(apis["engine"] + "/chat/completions", json=body, timeout=WAIT).json()
    assert whole["model"] == ADAPTER
    with httpx.stream(
        "POST", apis["engine"] + "/chat/completions", json=body | {"stream": True}, timeout=WAIT
    ) as stream:
        events = [line.removeprefix("data: ") for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {ADAPTER}
    streamed = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert streamed == whole["choices"][0]["message"]["content"]


class _Request:
    """One Job whose deltas are kept; `on_first(action)` runs `action` (on the engine's thread) at its first
    delta, so a second request joins at an exact step."""

    def __init__(self, prompt: list[int], adapter: str) -> None:
        self.plan = Plan(
            prompts=[prompt],
            n=1,
            max_tokens=NEW_TOKENS,
            temperature=0.0,
            top_p=1.0,
            seed=None,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            logit_bias={},
            stop=[],
            logprobs=0,  # every token gives a delta, so `on_first` runs at the first token
            adapter=adapter,
        )
        self.job = Job(self.plan, self._emit, Stop(), self._end)
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self.first: list[Any] = []

    def on_first(self, action: Any) -> _Request:
        self.first.append(action)
        return self

    def _emit(self, delta: Delta) -> None:
        while self.first:
            self.first.pop()()

    def _end(self, completion_tokens: int, error: BaseException | None) -> None:
        self.error = error
        self.ended.set()

    def tokens(self) -> list[int]:
        assert self.ended.wait(WAIT), "the request did not end"
        if self.error is not None:
            raise self.error
        return self.job.rows()[0].ids[len(self.plan.prompts[0]) :]


@pytest.mark.parametrize("first", [ADAPTER, NAME])
def test_the_engine_decodes_an_adapter_row_and_a_base_row_in_one_step(
    model, folder, reference, first
) -> None:
    engine = Engine(model, AutoTokenizer.from_pretrained(folder), max_requests=4)
    try:
        second = NAME if first == ADAPTER else ADAPTER
        joining = _Request(PROMPTS[1], "" if second == NAME else second)
        leading = _Request(PROMPTS[0], "" if first == NAME else first)
        engine.submit(leading.on_first(lambda: engine.submit(joining.job)).job)
        got = {first: leading.tokens(), second: joining.tokens()}
    finally:
        engine.close()
    # the references run to max_tokens (no end of turn), so the joining request decoded beside the other
    assert len(reference[first][0]) == NEW_TOKENS
    assert engine.stats.max_rows == 2
    assert got[first][: len(reference[first][0])] == reference[first][0]
    assert got[second][: len(reference[second][1])] == reference[second][1]


def auth_free_get(url: str) -> httpx.Response:
    return httpx.get(url, timeout=WAIT)


def test_models_lists_the_served_adapters_with_their_parent_as_peers_come_and_go(
    apis, swarm, adapter
) -> None:
    url = apis["engine"]
    cards = auth_free_get(url + "/models").json()["data"]
    assert [(c["id"], c["root"], c["parent"]) for c in cards] == [
        (NAME, NAME, None),
        (ADAPTER, ADAPTER, NAME),
    ]
    assert auth_free_get(url + f"/models/{ADAPTER}").json()["parent"] == NAME
    extra = swarm.add(0, 4, adapters=[f"another={adapter}"])
    try:
        ids = [c["id"] for c in auth_free_get(url + "/models").json()["data"]]
        assert ids == [NAME, "another", ADAPTER]
    finally:
        swarm.unlist(extra)
        extra.kill()
    assert [c["id"] for c in auth_free_get(url + "/models").json()["data"]] == [NAME, ADAPTER]
    assert auth_free_get(url + "/models/another").status_code == 404


@pytest.mark.parametrize(
    "method, route, body",
    [
        ("POST", "/completions", {"model": "nope", "prompt": [5, 6], "max_tokens": 2}),
        ("POST", "/chat/completions", {"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        ("GET", "/models/nope", None),
    ],
)
def test_an_unknown_model_gets_openai_404_naming_what_is_served(apis, swarm, method, route, body) -> None:
    before = [peer.num_computes for peer in swarm.peers]
    reply = httpx.request(method, apis["engine"] + route, json=body, timeout=WAIT)
    assert reply.status_code == 404, reply.text
    error = reply.json()["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "model_not_found",
        "model",
    )
    assert error["message"] == f"The model `nope` does not exist; this gateway serves `{NAME}`, `{ADAPTER}`"
    assert [peer.num_computes for peer in swarm.peers] == before


def test_an_adapter_on_part_of_the_blocks_answers_503_naming_the_rest(apis, swarm, adapter) -> None:
    partial = swarm.add(0, 2, adapters=[f"partial={adapter}"])
    try:
        reply = complete(apis["engine"], "partial", PROMPTS[0])
    finally:
        swarm.unlist(partial)
        partial.kill()
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "swarm_unavailable"
    assert "adapter partial" in error["message"] and "blocks 2..3" in error["message"]


def test_the_served_adapters_are_capped_and_leave_offline_peers_out(swarm) -> None:
    record = next(iter(swarm.view().peers().values()))
    announced = {
        "peer-a": record.model_copy(update={"adapters": ("b", "a")}),
        "peer-b": record.model_copy(update={"adapters": ("c", "a", "d")}),
        "peer-c": record.model_copy(update={"adapters": ("gone",), "state": PeerState.OFFLINE}),
    }
    view = SwarmView.from_records(swarm.num_blocks, announced)
    assert served_adapters(view) == ["a", "b", "c", "d"]
    assert served_adapters(view, limit=3) == ["a", "b", "c"]  # the first names met, peers in id order


def test_generate_help_explains_adapter(capsys) -> None:
    with pytest.raises(SystemExit):
        cli._parser("corolla generate").parse_args(["--help"])
    assert "--adapter NAME" in capsys.readouterr().out
    parser = cli._parser("corolla generate")
    assert parser.parse_args(["m", "hi", "--initial-peers", "/ip4/x", "--adapter", "a"]).adapter == "a"
    assert parser.parse_args(["m", "hi", "--initial-peers", "/ip4/x"]).adapter is None


def test_generate_adapter_reaches_the_model(folder, monkeypatch, capsys) -> None:
    asked: dict[str, Any] = {}

    def from_pretrained(path: Any, **options: Any) -> Any:
        asked.update(options)
        raise CorollaError("no swarm in this test")

    monkeypatch.setattr(AutoDistributedModelForCausalLM, "from_pretrained", from_pretrained)
    argv = [str(folder), "hi", "--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWA", "--adapter", ADAPTER]
    assert cli.main(argv, "corolla generate") == 1
    assert asked["active_adapter"] == ADAPTER
    assert "no swarm in this test" in capsys.readouterr().err
