"""Span loading: only the span's weights, any dtype, sharded checkpoints, and typed errors for bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from families import NUM_BLOCKS, save
from transformers import AutoModelForCausalLM

from client.modules import ClientModules
from peer.blocks import HostedSpan
from protos.checkpoint import weight_files
from protos.errors import CheckpointError, InvalidInputError, UnsupportedModelError
from protos.partition import Role, checkpoint_key_filter, locate, materialized_bytes


def _block_bytes(model, index: int) -> int:
    return materialized_bytes(locate(model).blocks(model)[index])


@pytest.mark.parametrize("family", ["llama", "gpt2", "mixtral"])
def test_span_materializes_only_its_own_blocks(checkpoint, family: str) -> None:
    """A span holds its blocks and the small modules around the loop, never embeddings or the LM head."""
    folder = checkpoint(family)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    client_only = materialized_bytes(torch.nn.ModuleList([full.get_input_embeddings(), full.lm_head]))
    other_blocks = _block_bytes(full, 0) + _block_bytes(full, 3)
    span = HostedSpan.load(folder, 1, 3)

    assert span.parameter_bytes() == materialized_bytes(full) - client_only - other_blocks
    assert span.model.get_input_embeddings().weight.is_meta
    assert all(p.is_meta for i in (0, 3) for p in span.blocks[i].parameters())
    assert not any(p.is_meta for i in (1, 2) for p in span.blocks[i].parameters())


def test_client_holds_no_block(checkpoint) -> None:
    folder = checkpoint("llama")
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    client = ClientModules.load(folder)
    block_bytes = sum(_block_bytes(full, i) for i in range(NUM_BLOCKS))
    assert client.parameter_bytes() == materialized_bytes(full) - block_bytes


def test_sharded_checkpoint_opens_only_needed_shards(tmp_path) -> None:
    folder = save("llama", tmp_path / "sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    span = HostedSpan.load(folder, 3, 4)
    needed = weight_files(folder, checkpoint_key_filter(span.anatomy, Role.PEER, 3, 4))
    assert 0 < len(needed) < len(set(index["weight_map"].values()))

    reference = HostedSpan.from_model(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), 3, 4)
    hidden = torch.randn(2, 5, span.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(span.forward(hidden), reference.forward(hidden))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_span(checkpoint, dtype: torch.dtype) -> None:
    folder = checkpoint("llama")
    half = HostedSpan.load(folder, 0, NUM_BLOCKS, dtype=dtype)
    full = HostedSpan.load(folder, 0, NUM_BLOCKS)
    assert all(p.dtype == dtype for i in range(NUM_BLOCKS) for p in half.blocks[i].parameters())
    hidden = torch.randn(1, 6, full.hidden_size, generator=torch.Generator().manual_seed(0))
    out = half.forward(hidden.to(dtype), half.new_cache())
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), full.forward(hidden), atol=0.15, rtol=0.05)


@pytest.mark.parametrize(
    ("start", "end", "message"),
    [
        (0, NUM_BLOCKS + 1, "outside the model"),
        (-1, 2, "outside the model"),
        (2, 2, "outside the model"),
        (3, 1, "outside the model"),
    ],
)
def test_span_outside_the_model(checkpoint, start: int, end: int, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        HostedSpan.load(checkpoint("llama"), start, end)


def test_missing_checkpoint_files(checkpoint, tmp_path) -> None:
    with pytest.raises(CheckpointError, match="no checkpoint folder"):
        HostedSpan.load(tmp_path / "nowhere", 0, 1)
    folder = tmp_path / "no-weights"
    shutil.copytree(checkpoint("llama"), folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"missing checkpoint file .*model\.safetensors"):
        HostedSpan.load(folder, 0, 1)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json"):
        HostedSpan.load(folder, 0, 1)


def test_checkpoint_without_the_span_weights(checkpoint, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "truncated"
    shutil.copytree(checkpoint("llama"), folder)
    weights = load_file(folder / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layers.2." not in k}, folder / "model.safetensors")
    HostedSpan.load(folder, 0, 2)  # the span's own weights are all there
    with pytest.raises(CheckpointError, match=r"lacks weights .*layers\.2\."):
        HostedSpan.load(folder, 1, 3)


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "t5", "d_model": 64, "num_layers": 2, "num_heads": 4, "vocab_size": 128},  # seq2seq
        {"model_type": "no-such-family", "hidden_size": 64},
    ],
)
def test_unsupported_architecture(tmp_path, config: dict) -> None:
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedModelError):
        HostedSpan.load(tmp_path, 0, 1)


@pytest.fixture(scope="module")
def llama_span(checkpoint) -> HostedSpan:
    return HostedSpan.load(checkpoint("llama"), 1, 3)


def _hidden(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.zeros(*shape, dtype=dtype)


@pytest.mark.parametrize(
    ("make_call", "message"),
    [
        (lambda s: s.forward(_hidden(1, 3, 65)), "hidden size 65"),
        (lambda s: s.forward(_hidden(1, 3)), r"\[batch, seq, hidden_size\]"),
        (lambda s: s.forward(_hidden(0, 3, 64)), "empty batch"),
        (lambda s: s.forward(_hidden(1, 3, 64, dtype=torch.float16)), "dtype"),
        (lambda s: s.forward(_hidden(1, 3, 64), positions=torch.arange(4)[None]), "positions"),
        (lambda s: s.forward(_hidden(1, 3, 64), positions=torch.zeros(1, 3)), "positions"),
        (lambda s: s.forward(_hidden(1, 3, 64), start=0, end=2), "not inside the hosted span"),
        (lambda s: s.forward(_hidden(1, 3, 64), s.new_cache(start=1, end=2)), "cache"),
        (lambda s: s.new_cache(start=2, end=4), "not inside the hosted span"),
    ],
)
def test_bad_forward_input(llama_span: HostedSpan, make_call, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        make_call(llama_span)


def test_batch_must_match_the_session(llama_span: HostedSpan) -> None:
    cache = llama_span.new_cache()
    llama_span.forward(_hidden(2, 3, 64), cache)
    with pytest.raises(InvalidInputError, match="batch 1 does not match the session's batch 2"):
        llama_span.forward(_hidden(1, 1, 64), cache)
    assert cache.get_seq_length() == 3  # the rejected step changed nothing
