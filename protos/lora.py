"""LoRA adapters as both sides read and write them: PEFT's folder format (`adapter_config.json` read and
written by `peft.LoraConfig`, `adapter_model.safetensors` with PEFT's key names), which layers of a block a
LoRA may target, and each layer's rank and scaling under the config's patterns.

A LoRA module adds `scaling * (x @ A^T) @ B^T` to a linear layer's output, A [rank, in], B [out, rank].
Only adapters whose every module sits inside the blocks are supported: the peers apply them, and the
client's own modules (embeddings, LM head) stay as the base model has them.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from protos.errors import InvalidInputError

if TYPE_CHECKING:
    from peft import LoraConfig

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's saved keys name modules from the wrapped causal LM down
_KEY = re.compile(r"^(?P<block>\d+)\.(?P<module>[A-Za-z0-9_.]+)\.lora_(?P<part>[AB])\.weight$")

Layer = tuple[int, int]  # (in_features, out_features) of a layer a LoRA may target
Key = tuple[int, str]  # (global block index, the layer's path inside its block)


def lora_layers(block: nn.Module, extra: tuple[type[nn.Module], ...] = ()) -> dict[str, Layer]:
    """Every layer of `block` a LoRA module may target, by path inside the block: `nn.Linear`, GPT-2's
    `Conv1D` and `extra` types (with `in_features`/`out_features`, like a peer's int8 linear)."""
    layers: dict[str, Layer] = {}
    for path, module in block.named_modules():
        if isinstance(module, Conv1D):
            in_features, out_features = module.weight.shape  # Conv1D keeps its weight [in, out]
            layers[path] = (int(in_features), int(out_features))
        elif isinstance(module, (nn.Linear, *extra)):
            layers[path] = (int(getattr(module, "in_features")), int(getattr(module, "out_features")))  # noqa: B009
    return layers


def load_config(folder: str | os.PathLike[str]) -> LoraConfig:
    """The adapter's `peft.LoraConfig`, refused with a clear error when it is not a LoRA this system runs."""
    from peft import LoraConfig

    path = Path(folder).expanduser() / CONFIG_FILE
    if not path.is_file():
        raise InvalidInputError(f"{path.parent} is not a PEFT adapter folder: no {CONFIG_FILE}")
    try:
        kind = json.loads(path.read_text()).get("peft_type", "LORA")
    except (OSError, ValueError, AttributeError) as e:
        raise InvalidInputError(f"{path}: not a readable adapter config: {e}") from None
    if kind != "LORA":
        raise InvalidInputError(f"{path}: peft_type {kind!r} is not supported: only LORA adapters are")
    config = LoraConfig.from_pretrained(str(path.parent))
    check_config(config)
    return config


def check_config(config: LoraConfig) -> None:
    """Refuse what the swarm's LoRA does not compute: DoRA, LoRA biases, trainable extra modules, dropout
    during training is the caller's to refuse (at inference it does nothing)."""
    unsupported = {
        "use_dora": bool(getattr(config, "use_dora", False)),
        "lora_bias": bool(getattr(config, "lora_bias", False)),
        "modules_to_save": bool(getattr(config, "modules_to_save", None)),
        "layer_replication": bool(getattr(config, "layer_replication", None)),
        "trainable_token_indices": bool(getattr(config, "trainable_token_indices", None)),
    }
    named = [name for name, used in unsupported.items() if used]
    if named:
        raise InvalidInputError(f"LoRA options not supported through the swarm: {', '.join(named)}")
    if getattr(config, "bias", "none") != "none":
        raise InvalidInputError(f"LoRA bias={config.bias!r} is not supported through the swarm: use 'none'")


def rank_and_scaling(config: LoraConfig, layers_path: str, block: int, module: str) -> tuple[int, float]:
    """The rank and scaling PEFT gives the layer `module` of `block`, after `rank_pattern`/`alpha_pattern`."""
    from peft.utils.other import get_pattern_key

    name = f"{layers_path}.{block}.{module}"
    rank, alpha = int(config.r), float(config.lora_alpha)
    if config.rank_pattern:
        rank = int(config.rank_pattern.get(get_pattern_key(list(config.rank_pattern), name), rank))
    if config.alpha_pattern:
        alpha = float(config.alpha_pattern.get(get_pattern_key(list(config.alpha_pattern), name), alpha))
    return rank, alpha / (math.sqrt(rank) if config.use_rslora else rank)


def weight_key(layers_path: str, block: int, module: str, part: str) -> str:
    """PEFT's saved name of one LoRA matrix (`part` "A" or "B")."""
    return f"{PREFIX}{layers_path}.{block}.{module}.lora_{part}.weight"


def read_weights(
    folder: str | os.PathLike[str], layers_path: str, *, blocks: Iterable[int] | None = None
) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
    """(A, B) of every module of the adapter in `folder` inside `blocks` (None: all), read from its
    safetensors file alone (tensors of other blocks are not loaded). A module outside the blocks, or one with
    A or B missing, is an error: the swarm could not apply it."""
    path = Path(folder).expanduser() / WEIGHTS_FILE
    if not path.is_file():
        raise InvalidInputError(f"{path.parent}: no {WEIGHTS_FILE} (pickled .bin weights are not read)")
    wanted = None if blocks is None else set(blocks)
    prefix = f"{PREFIX}{layers_path}."
    parts: dict[Key, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as weights:
        for name in weights.keys():  # noqa: SIM118 (safe_open is not a mapping)
            match = _KEY.match(name.removeprefix(prefix)) if name.startswith(prefix) else None
            if match is None:
                raise InvalidInputError(
                    f"{path}: {name[:200]!r} is not a LoRA weight of a block: only LoRA modules inside the "
                    "blocks are supported (not the embeddings or the head, nor their saved base weights)"
                )
            block = int(match["block"])
            if wanted is None or block in wanted:
                parts.setdefault((block, match["module"]), {})[match["part"]] = weights.get_tensor(name)
    modules: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, pair in parts.items():
        if set(pair) != {"A", "B"}:
            raise InvalidInputError(f"{path}: block {key[0]} {key[1]} lacks lora_A or lora_B")
        modules[key] = (pair["A"], pair["B"])
    return modules


def write_adapter(
    folder: str | os.PathLike[str],
    config: LoraConfig,
    weights: Mapping[Key, tuple[torch.Tensor, torch.Tensor]],
    layers_path: str,
) -> Path:
    """Save an adapter as PEFT saves one: `config` through `LoraConfig.save_pretrained`, the weights in
    PEFT's key names; `peft.PeftModel.from_pretrained` loads the folder."""
    folder = Path(folder).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(folder))
    tensors = {}
    for (block, module), (a, b) in sorted(weights.items()):
        tensors[weight_key(layers_path, block, module, "A")] = a.detach().contiguous().cpu()
        tensors[weight_key(layers_path, block, module, "B")] = b.detach().contiguous().cpu()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
    return folder
