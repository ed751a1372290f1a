"""LoRA adapters without peer processes: a span with a `Lora` gives PEFT's block outputs and gradients, a
client's LoRA from the wire is refused field by field before a tensor is decoded, adapter names resolve at
the request edge, in-process peers serve PEFT folders exactly as PEFT runs them (several adapters at once),
and the folder format, the peer's `--adapters` and the client's `SwarmLora` read and write what PEFT does."""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
from pathlib import Path
from typing import Any

import grpc
import pydantic
import pytest
import torch
from fakes import hidden_states
from families import VOCAB, build, without_eos
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

from client.lora import SwarmLora
from client.model import AutoDistributedModelForCausalLM
from peer.adapters import Lora, LoraWeights, parse_lora
from peer.blocks import BatchItem, HostedSpan
from peer.config import PeerConfig
from peer.requests import Limits, Served, parse_backward, parse_forward
from protos import lora as lora_format
from protos import peer_pb2, peer_pb2_grpc
from protos.errors import InvalidInputError
from protos.partition import locate
from protos.tensors import BLOCKWISE_INT8, from_message, to_message

LLAMA_LAYERS = "model.layers"
# layers each family's LoRA targets: attention and MLP, fused projections, GPT-2's Conv1D (c_proj is in both)
TARGETS = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "mistral": ["q_proj", "o_proj", "up_proj"],
    "bloom": ["query_key_value", "dense_4h_to_h"],
    "falcon": ["query_key_value", "dense_h_to_4h"],
    "qwen3": ["k_proj", "gate_proj"],
}


def _config(family: str = "llama", **overrides: Any) -> LoraConfig:
    fields: dict[str, Any] = dict(
        r=4,
        lora_alpha=8,
        target_modules=TARGETS[family],
        lora_dropout=0.0,
        init_lora_weights=False,  # random B: the adapter changes the outputs
        fan_in_fan_out=family == "gpt2",
    )
    return LoraConfig(**(fields | overrides))


def _peft(base: torch.nn.Module, config: LoraConfig, *, seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return get_peft_model(copy.deepcopy(base), copy.deepcopy(config))


def _lora_layers(peft_model: Any, layers_path: str) -> dict[tuple[int, str], LoraLayer]:
    """(block, path inside it) -> PEFT's LoRA layer, for every layer the PEFT model wraps."""
    prefix = f"base_model.model.{layers_path}."
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer):
            block, path = name.removeprefix(prefix).split(".", 1)
            found[(int(block), path)] = module
    return found


def _lora_of(peft_model: Any, layers_path: str) -> Lora:
    """The PEFT model's adapter as a peer applies it: its A, B and scaling per layer."""
    return Lora(
        {
            key: LoraWeights(
                layer.lora_A["default"].weight.detach().clone(),
                layer.lora_B["default"].weight.detach().clone(),
                layer.scaling["default"],
            )
            for key, layer in _lora_layers(peft_model, layers_path).items()
        }
    )


def _ids(batch: int, length: int, *, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the span against PEFT -----------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "gpt2", "mistral", "bloom", "falcon", "qwen3"])
def test_a_span_with_a_lora_gives_peft_outputs_and_gradients(family: str) -> None:
    base = build(family)
    layers_path, num_blocks = locate(base).layers_path, locate(base).num_blocks
    peft_model = _peft(base, _config(family))
    lora = _lora_of(peft_model, layers_path)
    assert len({block for block, _ in lora.modules}) == num_blocks and len(lora.modules) >= 2 * num_blocks
    span = HostedSpan.from_model(copy.deepcopy(base), 0, num_blocks)
    start, end = 1, 3  # a sub-span: the blocks before and after it are not run
    hidden = peft_model(_ids(2, 7), output_hidden_states=True).hidden_states  # [i]: the input of block i
    grad_output = torch.randn(hidden[end].shape, generator=torch.Generator().manual_seed(1))
    inside = {
        key: layer for key, layer in _lora_layers(peft_model, layers_path).items() if start <= key[0] < end
    }
    leaves = [
        p
        for layer in inside.values()
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    ]
    expected = torch.autograd.grad(hidden[end], [hidden[start], *leaves], grad_outputs=grad_output)
    expected_lora = dict(zip([(key, part) for key in inside for part in "AB"], expected[1:], strict=True))

    output = span.forward(hidden[start].detach(), start=start, end=end, lora=lora)
    torch.testing.assert_close(output, hidden[end].detach(), atol=1e-5, rtol=0)
    plain = span.forward(hidden[start].detach(), start=start, end=end)
    assert (plain - output).abs().max() > 1e-2  # the LoRA does change the blocks

    grad_input, grad_prompts, grads = span.lora_backward(
        hidden[start].detach(), grad_output, lora, start=start, end=end
    )
    torch.testing.assert_close(grad_input, expected[0], atol=1e-5, rtol=0)
    assert grad_prompts is None and len(grads) == 2 * len(lora.modules)
    for index, key in enumerate(lora.modules):
        grad_a, grad_b = grads[2 * index], grads[2 * index + 1]
        if key in inside:
            assert grad_a is not None and grad_b is not None
            torch.testing.assert_close(grad_a, expected_lora[key, "A"], atol=1e-5, rtol=0)
            torch.testing.assert_close(grad_b, expected_lora[key, "B"], atol=1e-5, rtol=0)
        else:
            assert grad_a is None and grad_b is None, key  # a block the sub-span did not run


@pytest.fixture(scope="module")
def llama() -> torch.nn.Module:
    return build("llama")


def test_hooks_leave_the_base_forward_bit_identical(llama) -> None:
    span = HostedSpan.from_model(copy.deepcopy(llama), 0, 4)
    lora = _lora_of(_peft(llama, _config()), LLAMA_LAYERS)
    hidden = hidden_states(2, 5, seed=0)
    before = span.forward(hidden)
    with_lora = span.forward(hidden, lora=lora)
    _, _, grads = span.lora_backward(hidden, torch.ones_like(hidden), lora)
    assert all(grad is not None for grad in grads)
    after = span.forward(hidden)
    assert torch.equal(before, after)
    assert not torch.allclose(with_lora, before, atol=1e-3)
    assert torch.equal(span.forward(hidden, lora=lora), with_lora)


def test_a_batch_applies_each_item_its_own_lora(llama) -> None:
    span = HostedSpan.from_model(copy.deepcopy(llama), 0, 4)
    assert span.batches
    a = _lora_of(_peft(llama, _config(), seed=0), LLAMA_LAYERS)
    b = _lora_of(_peft(llama, _config(target_modules=["o_proj", "up_proj"]), seed=1), LLAMA_LAYERS)
    hidden = [hidden_states(1, 3 + index, seed=index) for index in range(4)]
    alone = [span.forward(hidden[0], lora=lora) for lora in (a, b, None)]
    assert not any(torch.allclose(x, y, atol=1e-3) for x, y in itertools.combinations(alone, 2))
    for loras in ([a, a, a], [a, b, None, a], [None, None, b]):
        expected = [
            span.forward(h, span.new_cache(), lora=lora) for h, lora in zip(hidden, loras, strict=False)
        ]
        items = [BatchItem(h, span.new_cache(), lora=lora) for h, lora in zip(hidden, loras, strict=False)]
        outputs = span.forward_batch(items)
        for output, want in zip(outputs, expected, strict=True):
            assert isinstance(output, torch.Tensor), output
            torch.testing.assert_close(output, want, atol=1e-5, rtol=0)


def test_an_int8_span_runs_a_lora(llama) -> None:
    span = HostedSpan.from_model(copy.deepcopy(llama), 0, 4, quant="int8")
    lora = _lora_of(_peft(llama, _config()), LLAMA_LAYERS)
    assert set(lora.modules) <= set(span.lora_layers)  # the int8 layers are LoRA targets too
    hidden = hidden_states(2, 5, seed=0)
    plain = span.forward(hidden)
    output = span.forward(hidden, lora=lora)
    assert output.shape == hidden.shape and torch.isfinite(output).all()
    assert not torch.allclose(output, plain, atol=1e-3)
    assert torch.equal(span.forward(hidden), plain)
    grad_input, _, grads = span.lora_backward(hidden, torch.ones_like(hidden), lora)
    assert torch.isfinite(grad_input).all()
    assert all(grad is not None and torch.isfinite(grad).all() for grad in grads)


# ---- a client's LoRA from the wire ---------------------------------------------------------------------

START, END = 2, 4
MAX_RANK = 4
MAX_BYTES = 1 << 12
# (block, path) -> (in, out): two layers a block, blocks 2..5 hosted
LAYERS = {
    (block, path): shape
    for block in range(2, 6)
    for path, shape in (("self_attn.q_proj", (8, 8)), ("mlp.down_proj", (16, 8)))
}


def _module(
    block: int = 2,
    module: str = "self_attn.q_proj",
    *,
    rank: int = 2,
    a: torch.Tensor | peer_pb2.Tensor | None = None,
    b: torch.Tensor | peer_pb2.Tensor | None = None,
    scaling: float = 2.0,
) -> peer_pb2.LoraModule:
    in_features, out_features = LAYERS.get((block, module), (8, 8))
    a = torch.randn(rank, in_features) if a is None else a
    b = torch.randn(out_features, rank) if b is None else b
    return peer_pb2.LoraModule(
        block=block,
        module=module,
        lora_a=a if isinstance(a, peer_pb2.Tensor) else to_message(a),
        lora_b=b if isinstance(b, peer_pb2.Tensor) else to_message(b),
        scaling=scaling,
    )


def _claimed(*shape: int) -> peer_pb2.Tensor:
    """A tensor message whose shape claims far more than the 16 bytes it holds."""
    return peer_pb2.Tensor(dtype="float32", shape=list(shape), data=b"\0" * 16)


def _parse(messages: list[peer_pb2.LoraModule], *, max_bytes: int = MAX_BYTES) -> Lora | None:
    return parse_lora(messages, start=START, end=END, layers=LAYERS, max_rank=MAX_RANK, max_bytes=max_bytes)


def test_a_good_lora_parses_exactly() -> None:
    assert _parse([]) is None
    a, b = torch.randn(3, 16), torch.randn(8, 3, dtype=torch.float32)
    lora = _parse([_module(3, "mlp.down_proj", a=a, b=b, scaling=0.5), _module(2, rank=4)])
    assert lora is not None and list(lora.modules) == [(3, "mlp.down_proj"), (2, "self_attn.q_proj")]
    weights = lora.modules[3, "mlp.down_proj"]
    assert torch.equal(weights.a, a) and torch.equal(weights.b, b) and weights.scaling == 0.5
    half = _parse([_module(a=torch.randn(2, 8, dtype=torch.bfloat16), b=torch.randn(8, 2).bfloat16())])
    assert half is not None and half.modules[2, "self_attn.q_proj"].a.dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        (
            [_module(block, path) for block in (2, 3) for path in ("self_attn.q_proj", "mlp.down_proj")] * 2,
            "8 modules for blocks [2, 4) of 4 layers",
        ),
        ([_module(4)], "block 4 is outside the request's [2, 4)"),
        ([_module(1)], "block 1 is outside the request's [2, 4)"),
        ([_module(module="self_attn.nope")], "block 2 has no layer 'self_attn.nope'"),
        ([_module(module="x" * 10_000)], "has no layer 'xxxxx"),
        ([_module(), _module()], "block 2 self_attn.q_proj appears twice"),
        (
            [_module(a=torch.zeros(0, 8), b=torch.zeros(8, 0))],
            "rank 0 of block 2 self_attn.q_proj is outside 1..4",
        ),
        ([_module(rank=5)], "rank 5 of block 2 self_attn.q_proj is outside 1..4"),
        (
            [_module(a=torch.randn(2, 9))],
            "takes lora_a [rank, 8] and lora_b [8, rank], got [2, 9] and [8, 2]",
        ),
        ([_module(b=torch.randn(9, 2))], "got [2, 8] and [9, 2]"),
        ([_module(b=torch.randn(8, 3))], "got [2, 8] and [8, 3]"),
        ([_module(a=torch.randn(1, 2, 8))], "got [1, 2, 8] and [8, 2]"),
        ([_module(a=_claimed(10**9, 8), b=_claimed(8, 10**9))], "rank 1000000000 of block 2"),
        ([_module(a=_claimed(10**9, 64))], "got [1000000000, 64] and [8, 2]"),
        ([_module(a=_claimed(2, 10**9))], "got [2, 1000000000] and [8, 2]"),
        ([_module(b=_claimed(10**9, 2))], "got [2, 8] and [1000000000, 2]"),
        ([_module(a=_claimed(2, 8))], "lora_a: shape [2, 8] of float32 needs 64 bytes, but data holds 16"),
        ([_module(b=torch.randn(8, 2).half())], "lora_a and lora_b of block 2 differ in dtype"),
        ([_module(a=torch.randn(2, 8).bfloat16(), b=torch.randn(8, 2).half())], "differ in dtype"),
        (
            [
                _module(
                    a=to_message(torch.randn(2, 8), dtype=BLOCKWISE_INT8),
                    b=to_message(torch.randn(8, 2), dtype=BLOCKWISE_INT8),
                )
            ],
            "lora_a: dtype 'int8' not allowed",
        ),
        (
            [_module(a=torch.zeros(2, 8, dtype=torch.int64), b=torch.zeros(8, 2, dtype=torch.int64))],
            "lora_a: dtype 'int64' not allowed",
        ),
        ([_module(a=torch.full((2, 8), float("nan")))], "block 2 self_attn.q_proj has non-finite weights"),
        ([_module(b=torch.full((8, 2), float("-inf")))], "has non-finite weights"),
        (
            [_module(3), _module(b=torch.full((8, 2), float("inf")))],
            "block 2 self_attn.q_proj has non-finite",
        ),
        ([_module(scaling=float("nan"))], "scaling of block 2 self_attn.q_proj"),
        ([_module(scaling=float("inf"))], "scaling of block 2 self_attn.q_proj"),
        ([_module(scaling=-1e5)], "scaling of block 2 self_attn.q_proj"),
    ],
)
def test_a_hostile_lora_is_refused(messages: list[peer_pb2.LoraModule], message: str) -> None:
    with pytest.raises(InvalidInputError) as caught:
        _parse(messages)
    assert message in str(caught.value) and len(str(caught.value)) < 300


def test_a_lora_over_the_byte_limit_is_refused() -> None:
    claimed = peer_pb2.Tensor(dtype="float32", shape=[4, 8], data=b"\0" * 16)  # 128 bytes claimed, 16 held
    with pytest.raises(
        InvalidInputError, match=r"lora_a: shape \[4, 8\] of float32 is more than the limit of 100"
    ):
        _parse([_module(a=claimed, b=torch.randn(8, 4))], max_bytes=100)
    down_proj = _module(3, "mlp.down_proj", a=torch.randn(4, 16), b=torch.randn(8, 4))  # 384 bytes in all
    assert _parse([down_proj], max_bytes=384) is not None
    with pytest.raises(InvalidInputError, match="lora: more than 383 bytes of weights"):
        _parse([down_proj], max_bytes=383)
    with pytest.raises(InvalidInputError, match="lora: more than 500 bytes of weights"):
        _parse([_module(rank=4), down_proj], max_bytes=500)  # 256 + 384


# ---- adapter names at the request edge -----------------------------------------------------------------

ADAPTER_A = Lora({(2, "self_attn.q_proj"): LoraWeights(torch.randn(2, 8), torch.randn(8, 2), 1.0)}, "a")
ADAPTER_B = Lora({(3, "mlp.down_proj"): LoraWeights(torch.randn(2, 16), torch.randn(8, 2), 1.0)}, "b")
SERVED = Served(
    start=2,
    end=6,
    num_blocks=8,
    hidden_size=8,
    dtype=torch.float32,
    adapters={"a": ADAPTER_A, "b": ADAPTER_B},
    lora_layers=LAYERS,
)
REQUEST_LIMITS = Limits(max_batch_size=4, max_length=128, max_forward_tokens=64, max_message_bytes=1 << 16)


def _forward(**fields: Any) -> peer_pb2.ForwardRequest:
    return peer_pb2.ForwardRequest(start=2, end=4, hidden=to_message(torch.randn(1, 3, 8)), **fields)


def _backward(**fields: Any) -> peer_pb2.BackwardRequest:
    hidden = to_message(torch.randn(1, 3, 8))
    return peer_pb2.BackwardRequest(start=2, end=4, hidden=hidden, grad_output=hidden, **fields)


@pytest.mark.parametrize(("build_request", "parse"), [(_forward, parse_forward), (_backward, parse_backward)])
def test_requests_resolve_served_adapters_and_refuse_the_rest(build_request, parse) -> None:
    assert parse(build_request(), served=SERVED, limits=REQUEST_LIMITS).lora is None
    for name, adapter in (("a", ADAPTER_A), ("b", ADAPTER_B)):
        parsed = parse(build_request(adapter=name), served=SERVED, limits=REQUEST_LIMITS)
        assert parsed.lora is adapter and not parsed.trainable
    own = parse(build_request(lora=[_module()]), served=SERVED, limits=REQUEST_LIMITS)
    assert own.lora is not None and own.lora.name == "" and own.trainable
    with pytest.raises(
        InvalidInputError, match=r"adapter 'c' is not served by this peer \(it serves: a, b\)"
    ):
        parse(build_request(adapter="c"), served=SERVED, limits=REQUEST_LIMITS)
    bare = Served(start=2, end=6, num_blocks=8, hidden_size=8, dtype=torch.float32, lora_layers=LAYERS)
    with pytest.raises(InvalidInputError, match=r"\(it serves: none\)"):
        parse(build_request(adapter="a"), served=bare, limits=REQUEST_LIMITS)
    with pytest.raises(InvalidInputError, match="a served adapter or its own lora, not both"):
        parse(build_request(adapter="a", lora=[_module()]), served=SERVED, limits=REQUEST_LIMITS)
    with pytest.raises(InvalidInputError, match="block 5 is outside the request's"):
        parse(build_request(lora=[_module(5)]), served=SERVED, limits=REQUEST_LIMITS)


# ---- in-process peers serving adapters -----------------------------------------------------------------

ADAPTER_CONFIGS = {
    "a": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "b": dict(
        r=2, lora_alpha=3, target_modules=["o_proj", "up_proj"], rank_pattern={"layers.2.mlp.up_proj": 3}
    ),
}


@pytest.fixture(scope="module")
def adapters(checkpoint, tmp_path_factory) -> dict[str, Path]:
    """Two PEFT adapters of the tiny Llama, saved as PEFT saves them, by name."""
    base = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32)
    root = tmp_path_factory.mktemp("adapters")
    for seed, (name, fields) in enumerate(ADAPTER_CONFIGS.items()):
        _peft(base, _config(**fields), seed=seed).save_pretrained(root / name)
    return {name: root / name for name in ADAPTER_CONFIGS}


def _reference(checkpoint, folder: Path | None) -> Any:
    """The tiny Llama as transformers loads it, with PEFT's adapter from `folder` (None: without one)."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).eval()
    return without_eos(model if folder is None else PeftModel.from_pretrained(model, folder).eval())


def _served(fake_swarm, adapters: dict[str, Path]) -> Any:
    return fake_swarm([(0, 4)], adapters=[f"{name}={folder}" for name, folder in adapters.items()])


def _call(stub: peer_pb2_grpc.PeerStub, request: Any) -> list[torch.Tensor]:
    """A Forward's output, or a Backward's input gradient and then its LoRA gradients (A, B, ...)."""
    if isinstance(request, peer_pb2.ForwardRequest):
        return [from_message(stub.Forward(request, timeout=30).hidden, max_bytes=1 << 24)]
    reply = stub.Backward(request, timeout=30)
    messages = [reply.grad_input] + [m for module in reply.grad_lora for m in (module.lora_a, module.lora_b)]
    return [from_message(message, max_bytes=1 << 24) for message in messages]


def _q_proj(
    block: int, a: torch.Tensor | peer_pb2.Tensor, b: torch.Tensor | peer_pb2.Tensor
) -> peer_pb2.LoraModule:
    """A client's LoRA module for the tiny Llama's q_proj of `block` (64 -> 64)."""
    return peer_pb2.LoraModule(
        block=block,
        module="self_attn.q_proj",
        lora_a=a if isinstance(a, peer_pb2.Tensor) else to_message(a),
        lora_b=b if isinstance(b, peer_pb2.Tensor) else to_message(b),
        scaling=1.5,
    )


def _own_lora(module: peer_pb2.LoraModule) -> Lora:
    a, b = (from_message(m, max_bytes=1 << 20) for m in (module.lora_a, module.lora_b))
    return Lora({(module.block, module.module): LoraWeights(a, b, module.scaling)})


def test_a_malformed_lora_over_grpc_is_invalid_argument_and_the_peer_serves_on(fake_swarm, adapters) -> None:
    swarm = _served(fake_swarm, adapters)
    hidden, grad_output = hidden_states(1, 4, seed=2), hidden_states(1, 4, seed=3)
    own = _q_proj(1, torch.randn(2, 64), torch.randn(64, 2))

    def forward(**fields: Any) -> peer_pb2.ForwardRequest:
        return peer_pb2.ForwardRequest(start=0, end=4, hidden=to_message(hidden), **fields)

    def backward(start: int = 1, end: int = 3, **fields: Any) -> peer_pb2.BackwardRequest:
        return peer_pb2.BackwardRequest(
            start=start, end=end, hidden=to_message(hidden), grad_output=to_message(grad_output), **fields
        )

    good = [forward(), forward(adapter="a"), forward(lora=[own]), backward(adapter="b"), backward(lora=[own])]
    bad = [
        _q_proj(0, _claimed(10**9, 64), _claimed(64, 10**9)),
        _q_proj(9, torch.randn(2, 64), torch.randn(64, 2)),
        _q_proj(1, torch.randn(2, 64), torch.full((64, 2), float("nan"))),
        _q_proj(1, torch.randn(2, 64), torch.randn(64, 2).half()),
    ]
    refused = [
        request for module in bad for request in (forward(lora=[module]), backward(0, 4, lora=[module]))
    ]
    refused += [forward(adapter="c"), forward(adapter="a", lora=[own]), backward(adapter="a", lora=[own])]
    with grpc.insecure_channel(swarm.peers[0].address) as channel:
        stub = peer_pb2_grpc.PeerStub(channel)
        before = [_call(stub, request) for request in good]
        details = []
        for request in refused:
            with pytest.raises(grpc.RpcError) as caught:
                _call(stub, request)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value.details()
            details.append(caught.value.details())
        after = [_call(stub, request) for request in good]
    assert "it serves: a, b" in details[-3] and "not both" in details[-2] and "not both" in details[-1]
    assert all(
        torch.equal(x, y) for xs, ys in zip(before, after, strict=True) for x, y in zip(xs, ys, strict=True)
    )

    local = swarm.local_span()
    local.load_adapters([f"a={adapters['a']}"])
    torch.testing.assert_close(
        before[1][0], local.forward(hidden, lora=local.adapters["a"]), atol=1e-5, rtol=0
    )
    torch.testing.assert_close(before[2][0], local.forward(hidden, lora=_own_lora(own)), atol=1e-5, rtol=0)
    grad_input, _, grads = local.lora_backward(hidden, grad_output, _own_lora(own), start=1, end=3)
    torch.testing.assert_close(before[4], [grad_input, *grads], atol=1e-5, rtol=0)
    outputs = [output[0] for output in before[:3]]  # plain, a served adapter, the client's own
    assert not any(torch.allclose(x, y, atol=1e-3) for x, y in itertools.combinations(outputs, 2))


def test_sessions_with_different_adapters_step_together_as_peft_runs_each(
    fake_swarm, connect, checkpoint, adapters
) -> None:
    swarm = _served(fake_swarm, adapters)
    names = ["a", "b", None]
    prompt = _ids(1, 8, seed=3)
    references = {name: _reference(checkpoint, None if name is None else adapters[name]) for name in names}
    models = {
        name: without_eos(
            AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint("llama"), swarm=connect(swarm), active_adapter=name
            )
        )
        for name in names
    }
    with torch.no_grad():
        for name in names:  # stateless passes: the logits themselves
            expected = references[name](prompt).logits
            torch.testing.assert_close(models[name](prompt).logits, expected, atol=1e-5, rtol=0)
        assert not torch.allclose(references["a"](prompt).logits, references["b"](prompt).logits, atol=1e-2)

    def generate(model: Any) -> torch.Tensor:
        return model.generate(
            prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=10,
            min_new_tokens=10,
            do_sample=False,
        )

    barrier = threading.Barrier(len(names))
    outputs: dict[str | None, torch.Tensor | BaseException] = {}

    def run(name: str | None) -> None:
        try:
            barrier.wait(30)
            outputs[name] = generate(models[name])
        except BaseException as e:  # reported by the assertion below
            outputs[name] = e

    threads = [threading.Thread(target=run, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    expected = {name: generate(references[name]) for name in names}
    assert not [error for error in outputs.values() if isinstance(error, BaseException)], outputs
    assert {name: torch.equal(outputs[name], expected[name]) for name in names} == dict.fromkeys(names, True)
    assert len({tuple(tokens.flatten().tolist()) for tokens in expected.values()}) == 3
    opened = [request.open.adapter for request in swarm.peers[0].faults.received if request.HasField("open")]
    assert sorted(opened) == ["", "a", "b"]  # one session each, on the one peer


def test_a_peer_announces_its_adapters(fake_swarm, adapters) -> None:
    swarm = _served(fake_swarm, adapters)
    with grpc.insecure_channel(swarm.peers[0].address) as channel:
        info = peer_pb2_grpc.PeerStub(channel).Info(peer_pb2.InfoRequest(), timeout=10)
    assert list(info.adapters) == ["a", "b"] and info.max_lora_rank == 64
    assert [record.adapters for record in swarm.view().peers().values()] == [("a", "b")]
    assert set(swarm.peers[0].span.adapters) == {"a", "b"}


# ---- the PEFT folder format ----------------------------------------------------------------------------


def test_load_config_refuses_what_is_not_a_plain_lora(tmp_path) -> None:
    with pytest.raises(InvalidInputError, match=r"is not a PEFT adapter folder: no adapter_config\.json"):
        lora_format.load_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(InvalidInputError, match="peft_type 'PREFIX_TUNING' is not supported"):
        lora_format.load_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text("[not json")
    with pytest.raises(InvalidInputError, match="not a readable adapter config"):
        lora_format.load_config(tmp_path)
    _config(use_dora=True).save_pretrained(str(tmp_path))
    with pytest.raises(InvalidInputError, match="use_dora"):
        lora_format.load_config(tmp_path)
    _config(lora_dropout=0.1).save_pretrained(str(tmp_path))
    assert lora_format.load_config(tmp_path).target_modules == {"q_proj", "v_proj", "down_proj"}


def test_read_weights_refuses_modules_outside_the_blocks_and_pickles(llama, tmp_path) -> None:
    head = _peft(llama, _config(target_modules=["q_proj", "lm_head"]))
    head.save_pretrained(tmp_path / "head", save_embedding_layers=False)  # the LoRA weights alone
    with pytest.raises(
        InvalidInputError,
        match=r"'base_model\.model\.lm_head\.lora_[AB]\.weight' is not a LoRA weight of a block",
    ):
        lora_format.read_weights(tmp_path / "head", LLAMA_LAYERS)
    _peft(llama, _config()).save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert not (tmp_path / "bin" / "adapter_model.safetensors").exists()
    with pytest.raises(InvalidInputError, match=r"pickled \.bin weights are not read"):
        lora_format.read_weights(tmp_path / "bin", LLAMA_LAYERS)
    peft_model = _peft(llama, _config())
    peft_model.save_pretrained(tmp_path / "good")
    weights = lora_format.read_weights(tmp_path / "good", LLAMA_LAYERS, blocks=[1, 2])
    expected = _lora_of(peft_model, LLAMA_LAYERS).modules
    assert sorted(weights) == sorted(key for key in expected if key[0] in (1, 2))
    assert all(
        torch.equal(a, expected[k].a) and torch.equal(b, expected[k].b) for k, (a, b) in weights.items()
    )


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_scaling_follow_peft_patterns(llama, use_rslora: bool) -> None:
    config = _config(
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        rank_pattern={"layers.1.self_attn.q_proj": 2, "down_proj": 6},
        alpha_pattern={"v_proj": 3, "model.layers.3.mlp.up_proj": 32},
        use_rslora=use_rslora,
    )
    layers = _lora_layers(_peft(llama, config), LLAMA_LAYERS)
    assert len(layers) == 16
    ranks = set()
    for (block, path), layer in layers.items():
        rank, scaling = lora_format.rank_and_scaling(config, LLAMA_LAYERS, block, path)
        assert (rank, scaling) == (layer.r["default"], layer.scaling["default"]), (block, path)
        ranks.add(rank)
    assert ranks == {2, 4, 6}


# ---- the peer's --adapters -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("adapters", "message"),
    [
        (["a=/x", "a=/y"], "two adapters share a name"),
        (["/x/same", "/y/same"], "two adapters share a name"),
        (["bad name=/x"], "adapter name 'bad name'"),
        (["=/x"], "adapter name ''"),
        ([f"{'n' * 129}=/x"], "use 1..128 of letters"),
    ],
)
def test_peer_config_refuses_bad_adapter_names(adapters: list[str], message: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=message):
        PeerConfig(model="m", blocks="0:4", adapters=adapters)


def test_peer_config_takes_named_adapters() -> None:
    assert PeerConfig(model="m", blocks="0:4", adapters=["a=/x", "/y/b"]).adapters == ["a=/x", "/y/b"]


# ---- the client's SwarmLora ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama_layers(llama) -> dict[tuple[int, str], tuple[int, int]]:
    blocks = locate(llama).blocks(llama)
    return {
        (index, path): shape
        for index, block in enumerate(blocks)
        for path, shape in lora_format.lora_layers(block).items()
    }


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lora_dropout=0.1), "lora_dropout=0.1 is not supported through the swarm"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
        (dict(target_modules=["nothing"]), "match no layer of the blocks"),
        (dict(target_modules=["lm_head"]), "match no layer of the blocks"),
        (dict(use_dora=True), "use_dora"),
        (dict(bias="all"), "bias='all'"),
    ],
)
def test_swarm_lora_refuses_what_the_swarm_does_not_run(llama_layers, overrides: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=re.escape(message)):
        SwarmLora(_config(**overrides), llama_layers, LLAMA_LAYERS)


def test_swarm_lora_round_trips_through_its_folder(llama_layers, tmp_path) -> None:
    config = _config(rank_pattern={"layers.2.mlp.down_proj": 2}, alpha_pattern={"v_proj": 2})
    torch.manual_seed(0)
    lora = SwarmLora(config, llama_layers, LLAMA_LAYERS)
    lora.save_pretrained(tmp_path)
    loaded = SwarmLora.from_pretrained(tmp_path, llama_layers, LLAMA_LAYERS)
    assert loaded.keys == lora.keys and loaded.scaling == lora.scaling and len(lora.keys) == 12
    for key in lora.keys:
        assert lora.b(key).abs().sum() > 0  # init_lora_weights=False: B is not the zeros it would start as
        assert torch.equal(loaded.a(key), lora.a(key)) and torch.equal(loaded.b(key), lora.b(key))
    assert loaded.a((2, "mlp.down_proj")).shape == (2, 128)


def test_layers_to_transform_targets_what_peft_targets(llama, llama_layers) -> None:
    config = _config(target_modules=["q_proj", "down_proj"], layers_to_transform=[1])
    lora = SwarmLora(config, llama_layers, LLAMA_LAYERS)
    assert lora.keys == [(1, "mlp.down_proj"), (1, "self_attn.q_proj")]
    assert lora.keys == sorted(_lora_layers(_peft(llama, config), LLAMA_LAYERS))
