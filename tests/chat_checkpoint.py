"""A tiny chat model for gateway tests: the tiny Llama's weights with a byte-level tokenizer built in code
(one token per byte, so every id the random model picks decodes, multi-byte characters split across tokens)
and a ChatML template, as SmolLM2 has; no download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from families import VOCAB
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2; <|im_end|> ends a turn
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _bytes_to_symbols() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte (what the ByteLevel pre-tokenizer and decoder use)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            symbols[byte] = chr(byte)
        else:
            symbols[byte] = chr(256 + extra)
            extra += 1
    return symbols


def tokenizer() -> PreTrainedTokenizerFast:
    symbols = _bytes_to_symbols()
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for byte in range(len(SPECIALS), VOCAB):  # bytes 0..2 (control characters) give their ids to the specials
        vocab[symbols[byte]] = byte
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    model.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=model,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_chat_checkpoint(weights: Path, folder: Path) -> Path:
    """`weights` (a tiny Llama folder) copied to `folder` with the tokenizer, and <|im_end|> as its EOS."""
    shutil.copytree(weights, folder, dirs_exist_ok=True)
    tokenizer().save_pretrained(folder)
    generation = folder / "generation_config.json"
    config = json.loads(generation.read_text()) if generation.exists() else {}
    config.update(eos_token_id=2, pad_token_id=2, bos_token_id=1)
    generation.write_text(json.dumps(config))
    return folder
