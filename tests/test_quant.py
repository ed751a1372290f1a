"""Quantized peers (`--quant int8`), devices and dtypes: the int8 product against float, spans loaded and run
quantized, what the options refuse, routing (clients take quantized peers only when they say so), and the
quality on real text against float32 SmolLM2."""

from __future__ import annotations

import copy

import pytest
import torch
from pydantic import ValidationError

from client.errors import NoRouteError
from peer.blocks import BatchItem, HostedSpan
from peer.config import PeerConfig
from peer.devices import resolve_device, resolve_dtype
from peer.quant import OUTLIER_THRESHOLD, Int8Linear, check_quant
from protos.errors import InvalidInputError


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _dequantized(layer: Int8Linear) -> torch.Tensor:
    return (layer.columns.float() * layer.scales).T  # [out, in]


@torch.no_grad()
def test_int8_product_stays_close_with_outlier_channels() -> None:
    torch.manual_seed(0)
    linear = torch.nn.Linear(256, 96)
    layer = Int8Linear(linear)
    hidden = torch.randn(3, 5, 256)
    hidden[..., 7] = 400.0  # a "massive activation" channel, as SmolLM2's hidden states have
    hidden[1, 2, 100] = -90.0
    exact = linear(hidden)
    assert _relative(layer(hidden), exact) < 1e-2
    # the int8 weights are the only loss: against them the product is closer still
    assert _relative(layer(hidden), hidden @ _dequantized(layer).T + linear.bias) < 5e-3
    # without the outlier channels and the per-row scaling the int8 kernel alone is far off
    assert _relative(layer.quantized(hidden) + linear.bias, exact) > 5 * _relative(layer(hidden), exact)
    small = torch.randn(2, 4, 256) * OUTLIER_THRESHOLD / 10  # no outliers: the int8 path alone
    assert _relative(layer(small), linear(small)) < 2e-2
    assert layer.packed_bytes() < linear.weight.numel() * 4 / 3


def test_int8_input_gradient_goes_through_the_dequantized_weight() -> None:
    torch.manual_seed(1)
    layer = Int8Linear(torch.nn.Linear(32, 16, bias=False))
    hidden = torch.randn(2, 3, 32, requires_grad=True)
    grad = torch.randn(2, 3, 16)
    (layer(hidden) * grad).sum().backward()
    torch.testing.assert_close(hidden.grad, grad @ _dequantized(layer), rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_a_quantized_span_runs_sessions_batches_and_backward(local) -> None:
    exact = HostedSpan.from_model(copy.deepcopy(local), 0, 4)
    span = HostedSpan.from_model(copy.deepcopy(local), 0, 4, quant="int8")
    assert span.quant == "int8" and span.parameter_bytes() < exact.parameter_bytes()
    assert any(isinstance(m, Int8Linear) for m in span.blocks[0].modules())
    assert not any(type(m) is torch.nn.Linear for block in span.blocks for m in block.modules())
    torch.manual_seed(2)
    prompt, step = torch.randn(1, 6, span.hidden_size), torch.randn(1, 1, span.hidden_size)
    caches = [span.new_cache(), exact.new_cache()]
    outputs = [s.forward(prompt, c) for s, c in zip((span, exact), caches, strict=True)]
    assert _relative(*outputs) < 5e-2
    outputs = [s.forward(step, c) for s, c in zip((span, exact), caches, strict=True)]
    assert _relative(*outputs) < 5e-2
    # a batch quantizes its rows together: each item stays within the same error of running alone
    other = span.new_cache()
    span.forward(prompt[:, :3], other)
    alone = span.forward(step, copy.deepcopy(other))
    batched = span.forward_batch([BatchItem(step, copy.deepcopy(caches[0])), BatchItem(step, other)])
    assert all(isinstance(out, torch.Tensor) for out in batched)
    assert _relative(batched[1], alone) < 5e-2
    with torch.inference_mode(False):
        grads = [s.backward(prompt, torch.ones_like(prompt))[0] for s in (span, exact)]
    assert _relative(*grads) < 1e-1


def test_options_refuse_what_cannot_run() -> None:
    check_quant("none", dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(InvalidInputError, match="float32"):
        check_quant("int8", dtype=torch.bfloat16, device=torch.device("cpu"))
    with pytest.raises(InvalidInputError, match="unknown quantization"):
        check_quant("nf4", dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValidationError):
        PeerConfig(model="m", blocks="0:1", quant="nf4")
    with pytest.raises(ValidationError):
        PeerConfig(model="m", blocks="0:1", device="tpu")
    config = PeerConfig(model="m", blocks="0:1", device="cuda:1", dtype="auto")
    assert (config.device, config.dtype, config.quant) == ("cuda:1", "auto", "none")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == "float32"
    assert resolve_dtype("bfloat16", torch.device("cpu")) == "bfloat16"
    if not torch.cuda.is_available():
        assert resolve_device("auto").type in ("cpu", "mps")
        with pytest.raises(InvalidInputError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_moving_a_model_keeps_ties_and_trainable_parameters(local) -> None:
    from protos.partition import move_loaded

    model = copy.deepcopy(local)
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as SmolLM2's are
    model.model.norm.weight.requires_grad_(True)
    move_loaded(model, torch.device("meta"))  # the one other device every machine has
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert model.lm_head.weight.is_meta and model.model.norm.weight.requires_grad
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])


def test_clients_take_quantized_peers_only_when_they_say_so(fake_swarm, connect) -> None:
    swarm = fake_swarm([(0, 2), (2, 4)], quant="int8")
    assert {record.quantization for record in swarm.view().peers().values()} == {"int8"}
    hidden = torch.randn(1, 3, 64)
    with pytest.raises(NoRouteError):
        connect(swarm, max_retries=1).remote(hidden)
    exact = swarm.local_span().forward(hidden)
    for quant in ("any", "int8"):
        output = connect(swarm, quant=quant).remote(hidden)
        assert 0 < _relative(output, exact) < 5e-2
    # with exact peers beside the quantized ones, the default client uses only those: bit-exact
    swarm.add(0, 4, throughput=1.0, quant="none")
    assert torch.equal(connect(swarm).remote(hidden), exact)


@pytest.mark.slow
def test_int8_smollm2_on_shakespeare_agrees_with_float32() -> None:
    """Stated tolerance on real text: next-token agreement at least 80% and mean KL at most 0.1 nats
    (measured: 86% and 0.065 on these 256 tokens of Macbeth)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from client.corpus import token_blocks
    from peer.quant import quantize_blocks
    from protos.prepare import prepare_default_model

    folder = prepare_default_model()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    quantized = copy.deepcopy(model)
    assert quantize_blocks(list(quantized.model.layers), "int8") == 7 * 30
    ids = token_blocks(AutoTokenizer.from_pretrained(folder), "macbeth", seq_len=128, max_blocks=2)
    with torch.no_grad():
        exact, approx = (m(ids).logits.log_softmax(-1) for m in (model, quantized))
    agreement = (exact.argmax(-1) == approx.argmax(-1)).float().mean().item()
    kl = (exact.exp() * (exact - approx)).sum(-1).mean().item()
    assert agreement >= 0.8 and kl <= 0.1, (agreement, kl)


def test_a_session_fails_over_between_quantized_and_exact_peers(fake_swarm, connect) -> None:
    """A replay on a peer of other weights differs within the quantization's error: accepted (quant="any")."""
    from test_inprocess import run

    swarm = fake_swarm([])
    quantized = swarm.add(0, 4, throughput=1000.0, quant="int8")
    swarm.add(0, 4, throughput=1.0)
    result = run(connect(swarm, quant="any"), {3: lambda session: quantized.kill()})
    assert result.num_failovers == 1 and result.route[0][0] != quantized.peer_id
    assert len(result.outputs) == 8
