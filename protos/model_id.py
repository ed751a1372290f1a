"""The swarm's name of a model, derived from the checkpoint's own identity so that every copy of one model
meets the same peers, and what to tell a user whose model nobody serves. Reads files; knows no DHT client.

A hub name, its hub cache snapshot (`.../models--org--name/snapshots/<rev>`, or a folder linking into one),
a `git clone` of its hub repository and a folder prepared by `corolla prepare-model` name themselves; any
other checkpoint folder is named by its content: `{model_type}-{parameters}-{hash}`, the hash over
config.json and the first bytes of every stored tensor, so a plain copy gets its original's id and a fine-tune
with the same config does not. (A copy that kept none of these marks, such as `hf download --local-dir`,
is named by content: it cannot meet peers given the hub name, and the error says which ids are served.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import struct
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from protos.errors import InvalidInputError
from protos.records import MAX_MODEL_ID_CHARS, is_hub_name, model_id_from_name, validate_model_id

logger = logging.getLogger(__name__)

PREPARED_MARKER = "corolla-prepared.json"  # protos.prepare writes it; its "model_id" names the folder
CONFIG_FILE = "config.json"
TENSOR_PREFIX_BYTES = 64  # bytes of each tensor hashed: enough to tell trained weights apart, cheap to read
HASH_CHARS = 12
MAX_HEADER_BYTES = 100 * 2**20  # a safetensors header past this is no checkpoint of ours
MAX_SERVED_SHOWN = 16  # model ids an error lists
# what a plain copy keeps but a re-save may change without changing the model
_VOLATILE_CONFIG_KEYS = frozenset(
    {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "use_cache", "_commit_hash"}
)
_HUB_FOLDER = re.compile(r"models--([A-Za-z0-9._-]+?)--([A-Za-z0-9._-]+)")
_NOT_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")
# a git remote on the hub: https://[user[:token]@](huggingface.co|hf.co)/org/name[.git][/], git@hf.co:org/name
_HUB_REMOTE = re.compile(
    r"^\s*url\s*=\s*(?:https?://(?:[^@/\s]+@)?|ssh://git@|git@)(?:huggingface\.co|hf\.co)[/:]"
    r"([A-Za-z0-9._-]+)/([A-Za-z0-9._-]+?)(?:\.git)?/?\s*$",
    re.MULTILINE,
)
MAX_GIT_CONFIG_BYTES = 64 * 2**10


@dataclass(frozen=True)
class ModelIdentity:
    model_id: str
    # how it was found, for the log: "hub name", "hub cache", "hub clone", "prepared", "content", "name"
    source: str


def derive_model_id(path_or_name: str) -> ModelIdentity:
    """The model id of a checkpoint folder or hub name (see the module docstring). A path that is no
    readable checkpoint folder falls back to its spelling (`model_id_from_name`): loading it fails later."""
    text = str(path_or_name)
    if not text.strip():
        raise InvalidInputError("no model given: a checkpoint folder or a hub name")
    path = Path(text).expanduser()
    if not path.is_dir():
        return ModelIdentity(model_id_from_name(text), "hub name" if is_hub_name(text) else "name")
    prepared = _prepared_id(path)
    if prepared is not None:
        return ModelIdentity(prepared, "prepared")
    for hub_name, source in ((hub_name_of(path), "hub cache"), (hub_remote_of(path), "hub clone")):
        if hub_name is not None:
            return ModelIdentity(validate_model_id(hub_name.replace("/", "--")), source)
    if not (path / CONFIG_FILE).is_file():
        return ModelIdentity(model_id_from_name(text), "name")
    return ModelIdentity(content_model_id(path), "content")


def hub_name_of(folder: Path) -> str | None:
    """`org/name` when `folder` is (or links into) the hub cache's snapshot of that model, else None."""
    candidates = [folder, folder.resolve(), (folder / CONFIG_FILE).resolve()]
    for candidate in candidates:
        for part in candidate.parts:
            match = _HUB_FOLDER.fullmatch(part)
            if match is not None:
                return f"{match[1]}/{match[2]}"
    return None


def hub_remote_of(folder: Path) -> str | None:
    """`org/name` when `folder` is a git clone of that hub repository (its first hub remote), else None."""
    try:
        with (folder / ".git" / "config").open("rb") as handle:
            text = handle.read(MAX_GIT_CONFIG_BYTES).decode(errors="replace")
    except OSError:  # not a clone (or a worktree's .git file): named by content
        return None
    match = _HUB_REMOTE.search(text)
    return None if match is None else f"{match[1]}/{match[2]}"


def content_model_id(folder: Path) -> str:
    """`{model_type}-{parameters}-{hash}` of a checkpoint folder: the hash covers config.json (less the keys a
    re-save changes) and the name, dtype, shape and first `TENSOR_PREFIX_BYTES` of every safetensors tensor,
    so copies agree, re-sharding does not matter, and weights trained from the same config differ."""
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise InvalidInputError(f"cannot read {folder / CONFIG_FILE} ({e})") from e
    if not isinstance(config, dict):
        raise InvalidInputError(f"{folder / CONFIG_FILE} is not a JSON object")
    digest = hashlib.sha256()
    kept = {key: value for key, value in config.items() if key not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(kept, sort_keys=True, separators=(",", ":")).encode())
    num_parameters = 0
    for name, dtype, shape, prefix in sorted(_tensor_prefixes(sorted(folder.glob("*.safetensors")))):
        digest.update(json.dumps([name, dtype, shape]).encode() + prefix)
        num_parameters += math.prod(shape)
    model_type = _NOT_ID_CHARS.sub("-", str(config.get("model_type") or "model"))[:32]
    return validate_model_id(f"{model_type}-{_count(num_parameters)}-{digest.hexdigest()[:HASH_CHARS]}")


def _tensor_prefixes(files: Iterable[Path]) -> Iterable[tuple[str, str, list[int], bytes]]:
    for path in files:
        try:
            with path.open("rb") as handle:
                (header_bytes,) = struct.unpack("<Q", handle.read(8))
                if header_bytes > MAX_HEADER_BYTES:
                    raise InvalidInputError(f"{path}: safetensors header of {header_bytes} bytes")
                header = json.loads(handle.read(header_bytes))
                for name, entry in header.items():
                    if name == "__metadata__":
                        continue
                    begin, end = entry["data_offsets"]
                    handle.seek(8 + header_bytes + begin)
                    prefix = handle.read(min(TENSOR_PREFIX_BYTES, end - begin))
                    yield name, str(entry["dtype"]), [int(n) for n in entry["shape"]], prefix
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise InvalidInputError(f"cannot read the safetensors file {path} ({e!r})") from e


def _count(num_parameters: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if num_parameters >= size:
            return f"{num_parameters / size:.3g}{unit}"
    return str(num_parameters)


def _prepared_id(folder: Path) -> str | None:
    try:
        marker = json.loads((folder / PREPARED_MARKER).read_text())
    except (OSError, ValueError):
        return None
    model_id = marker.get("model_id") if isinstance(marker, dict) else None
    return validate_model_id(model_id) if isinstance(model_id, str) else None  # older markers: by content


def prepared_model_id(source_name: str) -> str:
    """The id of a folder converted from the GGUF file `source_name`, the same on every machine that
    converts that file (in any dtype: peers cast anyway), e.g. `Llama-3.2-1B.Q8_0`."""
    stem = _NOT_ID_CHARS.sub("-", Path(source_name).name.removesuffix(".gguf"))
    return validate_model_id(stem[:MAX_MODEL_ID_CHARS].strip("-._") or "gguf")


def served_model_ids(index_value: object) -> list[str]:
    """The model ids named in the model index key's entries (as `DHTNode.get` returns its value: a dict of
    subkey -> ValueWithExpiration or plain value), most announced first; invalid entries are skipped."""
    counts: Counter[str] = Counter()
    entries = getattr(index_value, "value", index_value)
    for item in entries.values() if isinstance(entries, dict) else []:
        value = getattr(item, "value", item)
        model_id = value.get("model_id") if isinstance(value, dict) else None
        try:
            counts[validate_model_id(model_id)] += 1  # type: ignore[arg-type]
        except InvalidInputError:
            continue
    return [model_id for model_id, _ in counts.most_common()]


def served_ids_hint(served: list[str]) -> str:
    """What to add when nobody announces a model: the ids the swarm does serve, and how to pick one."""
    if not served:
        return "this swarm announces no model at all (is --swarm-key needed?)"
    shown = ", ".join(served[:MAX_SERVED_SHOWN]) + (
        f" and {len(served) - MAX_SERVED_SHOWN} more" if len(served) > MAX_SERVED_SHOWN else ""
    )
    return (
        f"this swarm serves: {shown}. If your checkpoint is one of these, pass its id as --model-id "
        "(model_id= in Python)"
    )
