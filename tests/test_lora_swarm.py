"""LoRA through real peer processes (issue 28): a client's own LoRA gives PEFT's logits and gradients on
transformers' model (tiny Llama and GPT-2, whose layers are `Conv1D`), also after an optimizer step and when
a peer dies between forward and backward; what it saves PEFT loads and peers serve (`--adapters`) with the
same logits and greedy tokens; an adapter no peer serves, and malformed LoRA weights, get clear errors.

Topology: one DHT; the Llama peers "0:1", "1:3", "3:4" (model id "lora"); GPT-2 peers "0:2", "2:4"
("lora-gpt2"); peers "0:2", "2:4" serving the trained adapter as "mine" ("lora-served"); a spare "1:3"
("lora") started and SIGKILLed by the fault test.
"""

from __future__ import annotations

import copy
import re
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import peft
import pytest
import torch
from families import HIDDEN, VOCAB, without_eos
from swarm import LocalSwarm, Process, channel, running, start_peers, stop_all
from transformers import AutoModelForCausalLM

from client.errors import NoRouteError
from client.model import AutoDistributedModelForCausalLM
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import from_message, to_message

pytestmark = pytest.mark.swarm  # real DHT and peer processes

MAX_MESSAGE = 1 << 20
MAX_RANK = 8
PEER_OPTIONS = (
    "--throughput",
    "100",
    "--max-message-bytes",
    str(MAX_MESSAGE),
    "--announce-period",
    "2",
    "--max-lora-rank",
    str(MAX_RANK),
)
SPANS = ["0:1", "1:3", "3:4"]
MODEL_IDS = {"llama": "lora", "gpt2": "lora-gpt2"}
TARGETS = {"llama": ["q_proj", "v_proj", "down_proj"], "gpt2": ["c_attn", "c_proj", "c_fc"]}
ADAPTER = "mine"
TOLERANCE = dict(atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    """The DHT and the Llama peers of SPANS (`swarm.peers` in that order)."""
    logs = tmp_path_factory.mktemp("lora-swarm")
    with running(logs, checkpoint("llama"), SPANS, "--model-id", MODEL_IDS["llama"], *PEER_OPTIONS) as swarm:
        yield swarm


@pytest.fixture(scope="module")
def gpt2_peers(checkpoint, swarm) -> Iterator[list[Process]]:
    """GPT-2 peers "0:2" and "2:4" under the same DHT."""
    peers = start_peers(
        swarm.log_dir,
        checkpoint("gpt2"),
        ["0:2", "2:4"],
        swarm.initial_peers,
        "--model-id",
        MODEL_IDS["gpt2"],
        *PEER_OPTIONS,
    )
    try:
        yield peers
    finally:
        stop_all(peers)


def _lora(family: str) -> peft.LoraConfig:
    return peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        lora_dropout=0.0,
        init_lora_weights=False,
        fan_in_fan_out=family == "gpt2",  # its layers are Conv1D, weights [in, out]: as PEFT asks
    )


def _client(checkpoint, swarm: LocalSwarm, family: str = "llama", **options: Any) -> Any:
    options.setdefault("model_id", MODEL_IDS[family])
    return AutoDistributedModelForCausalLM.from_pretrained(
        checkpoint(family), initial_peers=swarm.initial_peers, **options
    )


def _local(checkpoint, family: str) -> Any:
    return without_eos(AutoModelForCausalLM.from_pretrained(checkpoint(family), dtype=torch.float32).eval())


def _peft_key(client: Any, key: tuple[int, str], part: str) -> str:
    block, path = key
    return f"base_model.model.{client.lora.layers_path}.{block}.{path}.lora_{part}.default.weight"


def _peft_twin(checkpoint, family: str, client: Any) -> Any:
    """Local PEFT on transformers' own model with the client's LoRA config and weights; every LoRA
    parameter PEFT made is one of the client's."""
    model = peft.get_peft_model(_local(checkpoint, family), copy.deepcopy(_lora(family)))
    state = {}
    for key, (a, b) in client.lora.weights().items():
        state[_peft_key(client, key, "A")], state[_peft_key(client, key, "B")] = a, b
    result = model.load_state_dict(state, strict=False)
    assert not result.unexpected_keys
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(state)
    return model


def _assert_same_gradients(client: Any, reference: Any) -> None:
    parameters = dict(reference.named_parameters())
    for key in client.lora.keys:
        for part, mine in (("A", client.lora.a(key)), ("B", client.lora.b(key))):
            theirs = parameters[_peft_key(client, key, part)]
            assert mine.grad is not None and mine.grad.abs().sum() > 0, (key, part)
            torch.testing.assert_close(mine.grad, theirs.grad, **TOLERANCE, msg=f"{key} {part}")


def _batch(seed: int, *, padding: str = "") -> dict[str, torch.Tensor]:
    """Two rows of 7 tokens; `padding` "left" or "right": 3 positions of the second row are padding."""
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    if padding == "left":
        mask[1, :3] = 0
    elif padding == "right":
        mask[1, 4:] = 0
    return dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))


def _step(model: Any, batch: dict[str, torch.Tensor]) -> Any:
    output = model(**batch)
    output.loss.backward()
    return output


# ---- 1. gradients equal local PEFT's -------------------------------------------------------------------


@pytest.mark.parametrize("padding", ["", "left", "right"], ids=["full", "left-padded", "right-padded"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_lora_gradients_equal_peft(checkpoint, swarm, request, family, padding) -> None:
    if family == "gpt2":
        request.getfixturevalue("gpt2_peers")
    torch.manual_seed(0)
    client = _client(checkpoint, swarm, family, lora=_lora(family))
    try:
        assert {n for n, p in client.named_parameters() if p.requires_grad} == {
            n for n, _ in client.lora.named_parameters(prefix="lora")
        }
        reference = _peft_twin(checkpoint, family, client)
        batch = _batch(1, padding=padding)
        output, expected = _step(client, batch), _step(reference, batch)
        torch.testing.assert_close(output.loss, expected.loss, **TOLERANCE)
        torch.testing.assert_close(output.logits, expected.logits, **TOLERANCE)
        _assert_same_gradients(client, reference)
    finally:
        client.shutdown()


def test_second_step_after_adamw_equals_peft(checkpoint, swarm) -> None:
    torch.manual_seed(0)
    client = _client(checkpoint, swarm, lora=_lora("llama"))
    try:
        reference = _peft_twin(checkpoint, "llama", client)
        optimizers = [
            torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
            for model in (client, reference)
        ]
        for seed in (2, 3):
            for model, optimizer in zip((client, reference), optimizers, strict=True):
                optimizer.zero_grad()
                _step(model, _batch(seed))
            _assert_same_gradients(client, reference)
            for optimizer in optimizers:
                optimizer.step()
        for key, (a, b) in client.lora.weights().items():  # the steps moved both sides alike
            parameters = dict(reference.named_parameters())
            torch.testing.assert_close(a, parameters[_peft_key(client, key, "A")].detach(), **TOLERANCE)
            torch.testing.assert_close(b, parameters[_peft_key(client, key, "B")].detach(), **TOLERANCE)
    finally:
        client.shutdown()


# ---- 3, 4. saved, loaded by PEFT, served by peers -------------------------------------------------------


PROMPT = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))


@pytest.fixture(scope="module")
def trained(checkpoint, swarm, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """An adapter trained two AdamW steps through the swarm and saved: (its folder, the swarm's logits of
    PROMPT with the client's LoRA after training)."""
    folder = tmp_path_factory.mktemp("adapter") / ADAPTER
    torch.manual_seed(0)
    client = _client(checkpoint, swarm, lora=_lora("llama"))
    try:
        optimizer = torch.optim.AdamW(client.lora.parameters(), lr=1e-2)
        for seed in (5, 6):
            _step(client, _batch(seed))
            optimizer.step()
            optimizer.zero_grad()
        assert Path(client.lora.save_pretrained(folder)) == folder
        with torch.no_grad():
            logits = client(PROMPT).logits
    finally:
        client.shutdown()
    return folder, logits


@pytest.fixture(scope="module")
def served(checkpoint, swarm, trained) -> Iterator[list[Process]]:
    """Peers "0:2" and "2:4" serving the trained adapter as ADAPTER."""
    options = ("--model-id", "lora-served", "--adapters", f"{ADAPTER}={trained[0]}", *PEER_OPTIONS)
    peers = start_peers(swarm.log_dir, checkpoint("llama"), ["0:2", "2:4"], swarm.initial_peers, *options)
    try:
        yield peers
    finally:
        stop_all(peers)


def test_saved_adapter_loads_in_peft_and_serves_with_the_same_outputs(checkpoint, swarm, trained, served):
    folder, swarm_logits = trained
    loaded = peft.PeftModel.from_pretrained(_local(checkpoint, "llama"), folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(PROMPT).logits, swarm_logits, **TOLERANCE)
        base = _local(checkpoint, "llama")(PROMPT).logits
    assert (base - swarm_logits).abs().max() > 1e-3  # the adapter changes the outputs

    client = without_eos(_client(checkpoint, swarm, model_id="lora-served", active_adapter=ADAPTER))
    try:
        with torch.no_grad():
            torch.testing.assert_close(client(PROMPT).logits, swarm_logits, **TOLERANCE)
            mask = torch.ones_like(PROMPT)
            tokens = client.generate(PROMPT, attention_mask=mask, max_new_tokens=6, do_sample=False)
            expected = loaded.generate(
                input_ids=PROMPT, attention_mask=mask, max_new_tokens=6, do_sample=False
            )
        assert tokens.shape == (2, 12)
        assert torch.equal(tokens, expected)
    finally:
        client.shutdown()


def test_an_adapter_no_peer_serves_gets_a_clear_error(checkpoint, swarm, served) -> None:
    client = _client(
        checkpoint,
        swarm,
        model_id="lora-served",
        active_adapter="nope",
        max_retries=1,
        retry_delay=0.05,
        max_retry_delay=0.1,
    )
    try:
        with pytest.raises(NoRouteError) as error, torch.no_grad():
            client(PROMPT)
        assert "'nope'" in str(error.value) and ADAPTER in str(error.value), str(error.value)
    finally:
        client.shutdown()


# ---- 5. malformed LoRA weights to a real peer -------------------------------------------------------------

START, END = 1, 3  # the span of the peer the raw requests go to
Q_SHAPE, DOWN_SHAPE = (HIDDEN, HIDDEN), (128, HIDDEN)  # (in, out) of q_proj and down_proj


def _module(block: int, module: str, shape: tuple[int, int], *, rank: int = 4, fill: float | None = None):
    generator = torch.Generator().manual_seed(block)
    a, b = torch.randn(rank, shape[0], generator=generator), torch.randn(shape[1], rank, generator=generator)
    if fill is not None:
        a[0, 0] = fill
    return peer_pb2.LoraModule(
        block=block, module=module, lora_a=to_message(a), lora_b=to_message(b * 0.1), scaling=2.0
    )


GOOD_LORA = [_module(1, "self_attn.q_proj", Q_SHAPE), _module(2, "mlp.down_proj", DOWN_SHAPE)]
HIDDEN_IN = torch.randn(1, 5, HIDDEN, generator=torch.Generator().manual_seed(7))


def _call(peer: Process, rpc: str, lora: list[Any], *, adapter: str = "") -> Any:
    request: Any = peer_pb2.ForwardRequest if rpc == "Forward" else peer_pb2.BackwardRequest
    fields = dict(start=START, end=END, hidden=to_message(HIDDEN_IN), adapter=adapter, lora=lora)
    if rpc == "Backward":
        fields["grad_output"] = to_message(torch.ones_like(HIDDEN_IN))
    opened = channel(peer)
    try:
        return getattr(peer_pb2_grpc.PeerStub(opened), rpc)(request(**fields), timeout=30)
    finally:
        opened.close()


def _outputs(peer: Process) -> list[torch.Tensor]:
    """The peer's Forward of HIDDEN_IN without LoRA, and with GOOD_LORA."""
    return [
        from_message(_call(peer, "Forward", lora).hidden, max_bytes=MAX_MESSAGE) for lora in ([], GOOD_LORA)
    ]


@pytest.mark.parametrize("rpc", ["Forward", "Backward"])
@pytest.mark.parametrize(
    ("lora", "adapter", "message"),
    [
        (
            [_module(1, "self_attn.q_proj", Q_SHAPE, rank=MAX_RANK + 1)],
            "",
            rf"rank {MAX_RANK + 1} .* 1\.\.{MAX_RANK}",
        ),
        ([_module(1, "self_attn.q_proj", (32, HIDDEN))], "", r"takes lora_a \[rank, 64\]"),
        ([_module(1, "self_attn.nope", Q_SHAPE)], "", r"no layer 'self_attn.nope'"),
        ([_module(0, "self_attn.q_proj", Q_SHAPE)], "", r"block 0 is outside"),
        ([_module(2, "mlp.down_proj", DOWN_SHAPE, fill=float("nan"))], "", "non-finite"),
        (GOOD_LORA, ADAPTER, "not both"),
    ],
    ids=["rank-above-max", "wrong-shape", "unknown-module", "outside-span", "nan", "adapter-and-lora"],
)
def test_malformed_lora_is_refused_and_changes_nothing(swarm, rpc, lora, adapter, message) -> None:
    peer = swarm.peers[SPANS.index(f"{START}:{END}")]
    before = _outputs(peer)
    assert not torch.equal(*before)  # the good LoRA is applied
    with pytest.raises(grpc.RpcError) as error:
        _call(peer, rpc, lora, adapter=adapter)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert re.search(message, error.value.details()), error.value.details()
    after = _outputs(peer)
    assert peer.popen.poll() is None
    for old, new in zip(before, after, strict=True):
        assert torch.equal(old, new)


# ---- 2. a peer killed between forward and backward --------------------------------------------------------


def test_peer_killed_between_forward_and_backward_changes_no_gradient(checkpoint, swarm) -> None:
    """A spare "1:3" runs the forward's middle hop (the first is banned meanwhile), then dies by SIGKILL;
    the backward tries it, bans it and runs the hop on the first "1:3"."""
    (spare,) = start_peers(
        swarm.log_dir, checkpoint("llama"), ["1:3"], swarm.initial_peers, "--model-id", "lora", *PEER_OPTIONS
    )
    original = swarm.peers[SPANS.index("1:3")]
    client = None
    try:
        torch.manual_seed(0)
        client = _client(checkpoint, swarm, lora=_lora("llama"), max_retries=3)
        batch = _batch(8, padding="left")
        _step(client, batch)
        expected = {
            key: (client.lora.a(key).grad.clone(), client.lora.b(key).grad.clone())
            for key in client.lora.keys
        }
        client.zero_grad()

        bans = client.swarm.bans
        bans.ban(original.peer_id, "test")  # the forward's middle hop goes to the spare
        loss = client(**batch).loss
        bans.unban(original.peer_id)
        spare.stop(signal.SIGKILL)
        loss.backward()
        assert bans.is_banned(spare.peer_id)  # it was the forward's hop: tried first, and failed
        for key, (grad_a, grad_b) in expected.items():
            torch.testing.assert_close(client.lora.a(key).grad, grad_a, **TOLERANCE)
            torch.testing.assert_close(client.lora.b(key).grad, grad_b, **TOLERANCE)
        reference = _peft_twin(checkpoint, "llama", client)
        _step(reference, batch)
        _assert_same_gradients(client, reference)
    finally:
        if client is not None:
            client.shutdown()
        spare.stop()
