"""Tiny random-init models of every family corolla supports, built in code with a fixed seed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers as tf

VOCAB = 256
HIDDEN = 64
NUM_BLOCKS = 4
WINDOW = 8  # small, so a 10-token prompt and 20 new tokens cross the sliding window

_ROPE = dict(
    vocab_size=VOCAB,
    hidden_size=HIDDEN,
    intermediate_size=128,
    num_hidden_layers=NUM_BLOCKS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    tie_word_embeddings=False,
)

FAMILIES: dict[str, Callable[[], tuple[Any, type]]] = {
    "llama": lambda: (tf.LlamaConfig(**_ROPE), tf.LlamaForCausalLM),
    "mistral": lambda: (tf.MistralConfig(**_ROPE, sliding_window=WINDOW), tf.MistralForCausalLM),
    "qwen2": lambda: (
        tf.Qwen2Config(**_ROPE, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=2),
        tf.Qwen2ForCausalLM,
    ),
    "qwen3": lambda: (tf.Qwen3Config(**_ROPE, head_dim=16), tf.Qwen3ForCausalLM),
    "gemma2": lambda: (
        tf.Gemma2Config(**_ROPE, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16),
        tf.Gemma2ForCausalLM,
    ),
    "gemma3": lambda: (
        tf.Gemma3TextConfig(
            **_ROPE,
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,
            layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        ),
        tf.Gemma3ForCausalLM,
    ),
    "phi3": lambda: (tf.Phi3Config(**_ROPE, pad_token_id=0), tf.Phi3ForCausalLM),
    "mixtral": lambda: (
        tf.MixtralConfig(**_ROPE, num_local_experts=4, num_experts_per_tok=2),
        tf.MixtralForCausalLM,
    ),
    "gpt2": lambda: (
        tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=NUM_BLOCKS, n_head=4, n_positions=512),
        tf.GPT2LMHeadModel,
    ),
    "gpt_neox": lambda: (
        tf.GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_BLOCKS,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=512,
        ),
        tf.GPTNeoXForCausalLM,
    ),
    "opt": lambda: (
        tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_BLOCKS,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=HIDDEN,
        ),
        tf.OPTForCausalLM,
    ),
    "opt_project": lambda: (  # opt-350m style: embeddings narrower than the blocks (project_in / project_out)
        tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_BLOCKS,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=512,
            word_embed_proj_dim=32,
            do_layer_norm_before=False,
        ),
        tf.OPTForCausalLM,
    ),
    "bloom": lambda: (
        tf.BloomConfig(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=NUM_BLOCKS, n_head=4),
        tf.BloomForCausalLM,
    ),
    "falcon": lambda: (  # rotary, multi-query, parallel attention (falcon-7b style)
        tf.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=NUM_BLOCKS, num_attention_heads=4
        ),
        tf.FalconForCausalLM,
    ),
    "falcon_alibi": lambda: (  # falcon-rw style
        tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_BLOCKS,
            num_attention_heads=4,
            alibi=True,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
        tf.FalconForCausalLM,
    ),
    "falcon_new": lambda: (  # falcon-40b style: grouped KV heads, two norms in parallel attention
        tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=HIDDEN,
            num_hidden_layers=NUM_BLOCKS,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
        ),
        tf.FalconForCausalLM,
    ),
}


def without_eos(model: Any) -> Any:
    """`model` (local or distributed) with no EOS token, so every generation runs its full length; pad id 0
    (transformers wants one when there is no EOS). Returns the model."""
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def _sharpened(model: Any) -> Any:
    """Weights scaled up so greedy decoding is not all ties; no EOS, so generation runs its full length."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim >= 2:
                parameter.mul_(3.0)
    return without_eos(model).eval()


def build(name: str, *, seed: int = 0) -> Any:
    """A tiny random model of one family."""
    config, model_class = FAMILIES[name]()
    torch.manual_seed(seed)
    return _sharpened(model_class(config))


def save(name: str, folder: Path, *, seed: int = 0, max_shard_size: str | None = None) -> Path:
    model = build(name, seed=seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return folder


def save_deep_llama(folder: Path, num_blocks: int, *, seed: int = 0) -> Path:
    """A tiny Llama with many blocks (span choice and balancing need more than 4)."""
    torch.manual_seed(seed)
    model = _sharpened(tf.LlamaForCausalLM(tf.LlamaConfig(**{**_ROPE, "num_hidden_layers": num_blocks})))
    model.save_pretrained(folder)
    return folder
