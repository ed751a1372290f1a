"""Reading a checkpoint folder (config + safetensors, sharded or not) and loading only the weights one role
needs into a skeleton built on the meta device. Knows nothing about spans at run time or the network."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from protos.errors import CheckpointError, UnsupportedModelError
from protos.tensors import FLOAT_DTYPE_NAMES, WIRE_DTYPES

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES: dict[str, torch.dtype] = {name: WIRE_DTYPES[name] for name in FLOAT_DTYPE_NAMES}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_model_path(name_or_path: str | os.PathLike[str]) -> Path:
    """A local folder as is; otherwise a hub name, fetched without weights (`weight_files` gets shards)."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / CONFIG_FILE).is_file():
            raise CheckpointError(f"{path} has no {CONFIG_FILE}: not a transformers checkpoint folder")
        return path
    name = str(name_or_path)
    if name.count("/") != 1 or name.startswith((".", "/")):
        raise CheckpointError(f"no checkpoint folder at {path}")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.model", "tokenizer*"])
    except Exception as e:  # the hub client raises many types; all mean "not available here"
        raise CheckpointError(f"{name}: not a local folder and not downloadable from the hub ({e})") from e
    return Path(folder)


def load_config(folder: Path) -> Any:
    from transformers import AutoConfig

    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"missing {config_path}")
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{folder}: transformers cannot read this config ({e})") from e


def weight_files(folder: Path, wanted_key: Callable[[str], bool]) -> dict[Path, list[str]]:
    """Checkpoint files holding wanted keys, with those keys; sharded folders open only the needed shards."""
    index_path = folder / INDEX_FILE
    if index_path.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{index_path} is not a valid safetensors index ({e})") from e
        files: dict[Path, list[str]] = {}
        for key, file_name in weight_map.items():
            if wanted_key(key):
                files.setdefault(_local_file(folder, file_name), []).append(key)
        return files
    single = _local_file(folder, SINGLE_FILE)
    from safetensors import safe_open

    with safe_open(single, framework="pt", device="cpu") as handle:
        return {single: [key for key in handle.keys() if wanted_key(key)]}  # noqa: SIM118 - not a dict


def _local_file(folder: Path, file_name: str) -> Path:
    path = folder / file_name
    if path.is_file():
        return path
    repo_id = _hub_repo_of(folder)
    if repo_id is None:
        raise CheckpointError(f"missing checkpoint file {path}")
    try:
        from huggingface_hub import hf_hub_download

        return Path(hf_hub_download(repo_id, file_name))
    except Exception as e:  # the hub client raises many types; all mean "not available here"
        raise CheckpointError(f"cannot fetch {file_name} of {repo_id} ({e})") from e


def _hub_repo_of(folder: Path) -> str | None:
    # hub snapshots live at .../models--org--name/snapshots/<revision>
    parent = folder.parent.parent.name
    if folder.parent.name == "snapshots" and parent.startswith("models--"):
        return parent.removeprefix("models--").replace("--", "/", 1)
    return None


def causal_lm_class(config: Any) -> type[PreTrainedModel]:
    """The transformers `*ForCausalLM` class of a config."""
    from transformers import AutoModelForCausalLM
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, AutoModelForCausalLM._model_mapping)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(f"{type(config).__name__} is not a causal language model ({e})") from e


def sequence_classification_class(config: Any) -> type[PreTrainedModel]:
    """The transformers `*ForSequenceClassification` class of a config."""
    from transformers import AutoModelForSequenceClassification
    from transformers.models.auto.auto_factory import _get_model_class

    try:
        return _get_model_class(config, AutoModelForSequenceClassification._model_mapping)
    except (ValueError, KeyError) as e:
        raise UnsupportedModelError(
            f"{type(config).__name__} has no sequence classification model ({e})"
        ) from e


def build_skeleton(
    config: Any, dtype: torch.dtype, *, model_class: type[PreTrainedModel] | None = None
) -> PreTrainedModel:
    """The whole causal-LM model on the meta device: structure without memory."""
    model_class = model_class or causal_lm_class(config)
    with torch.device("meta"):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval()


def init_buffers(model: PreTrainedModel, wanted_module: Callable[[str], bool]) -> None:
    """Materialize and compute non-persistent buffers (rotary `inv_freq`, Gemma's `embed_scale`).

    Must run before weights load: `_init_weights(module)` also re-initializes that module's parameters.
    """
    for name, module in model.named_modules():
        if wanted_module(name) and any(b is not None and b.is_meta for b in module._buffers.values()):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)


@torch.no_grad()
def load_weights(
    model: PreTrainedModel,
    folder: Path,
    *,
    wanted_key: Callable[[str], bool],
    wanted_module: Callable[[str], bool],
    dtype: torch.dtype,
) -> None:
    """Load the wanted checkpoint keys into `model` through transformers' own key conversions (renames,
    per-expert MoE weights fused into 3D parameters), then check every wanted module is complete."""
    from safetensors import safe_open
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import convert_and_load_state_dict_in_model
    from transformers.modeling_utils import LoadStateDictConfig

    init_buffers(model, wanted_module)
    files = weight_files(folder, wanted_key)
    state: dict[str, Any] = {}
    handles = []
    for path, keys in tqdm(files.items(), desc="reading weights", unit="file", disable=len(files) < 2):
        try:
            handle = safe_open(path, framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types for corrupt files
            raise CheckpointError(f"cannot read {path} ({e})") from e
        handles.append(handle)
        for key in keys:
            state[key] = handle.get_slice(key)  # lazy: read when the converter materializes it
    load_config = LoadStateDictConfig(
        pretrained_model_name_or_path=str(folder),
        dtype=dtype,
        weight_mapping=get_model_conversion_mapping(model, None, None),  # type: ignore[arg-type]
    )
    convert_and_load_state_dict_in_model(model, state, load_config)
    _tie_head(model)
    _check_complete(model, wanted_module, folder)


def _tie_head(model: PreTrainedModel) -> None:
    # tied checkpoints store the embeddings once; the head shares them where the role holds both
    if not getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False):
        return
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight.is_meta and not embeddings.weight.is_meta:
        head.weight = embeddings.weight


def _check_complete(model: PreTrainedModel, wanted_module: Callable[[str], bool], folder: Path) -> None:
    missing = []
    for module_name, module in model.named_modules():
        if not wanted_module(module_name):
            continue
        for name, tensor in [*module._parameters.items(), *module._buffers.items()]:
            if tensor is not None and tensor.is_meta:
                missing.append(f"{module_name}.{name}" if module_name else name)
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{folder} lacks weights this role needs: {shown}")
