"""Tests of `protos.prepare`: the default SmolLM2 folder against its GGUF, atomic installs, and the CLI.

The default folder is built once in the real cache (tens of seconds) and reused by every later run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from protos import prepare
from protos.errors import CheckpointError
from protos.prepare import (
    DEFAULT_GGUF_NAME,
    DEFAULT_MODEL_NAME,
    MARKER_NAME,
    convert_gguf,
    default_cache_dir,
    is_prepared,
    prepare_default_model,
)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time, there was a little"
NUM_NEW_TOKENS = 30
# greedy continuation of PROMPT by the GGUF model with transformers 5.23 (shared/research/real-weights.md)
EXPECTED_START = " girl named Emma"


@pytest.fixture(scope="module")
def offline() -> Iterator[None]:
    """No hub: the env var for subprocesses, and huggingface_hub's flag (read once, at its import) here."""
    import huggingface_hub.constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        yield


@pytest.fixture(scope="module")
def default_folder(offline: None) -> Path:
    return prepare_default_model()


@pytest.fixture(scope="module")
def folder_generation(default_folder: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(prompt ids, new ids, new text) of a greedy run of the prepared folder in fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_folder)
    model = AutoModelForCausalLM.from_pretrained(default_folder, dtype=torch.float32).eval()
    assert model.dtype == torch.float32
    return _greedy(model, tokenizer)


def _greedy(model: Any, tokenizer: Any) -> tuple[torch.Tensor, torch.Tensor, str]:
    inputs = tokenizer(PROMPT, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=NUM_NEW_TOKENS, do_sample=False)
    new_ids = out[0, inputs.input_ids.shape[1] :]
    return inputs.input_ids[0], new_ids, tokenizer.decode(new_ids)


def _run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "protos.cli", "prepare-model", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_default_cache_dir_honours_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("COROLLA_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("COROLLA_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "corolla"


def test_default_model_folder(default_folder: Path, folder_generation: tuple[Any, Any, str]) -> None:
    assert default_folder.name == DEFAULT_MODEL_NAME
    assert is_prepared(default_folder)
    for name in ("config.json", "model.safetensors", "tokenizer.json", MARKER_NAME):
        assert (default_folder / name).is_file(), name
    marker = json.loads((default_folder / MARKER_NAME).read_text())
    assert marker["source"] == DEFAULT_GGUF_NAME
    assert marker["dtype"] == "float32"
    assert not list(default_folder.parent.glob(f"{DEFAULT_MODEL_NAME}.partial-*"))
    _, new_ids, text = folder_generation
    assert len(new_ids) == NUM_NEW_TOKENS
    assert text.startswith(EXPECTED_START), text


@pytest.mark.slow
def test_default_model_generates_like_gguf(folder_generation: tuple[Any, Any, str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = prepare._default_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    gguf_prompt, gguf_new, gguf_text = _greedy(model, tokenizer)
    prompt, new, text = folder_generation
    assert prompt.tolist() == gguf_prompt.tolist()
    assert new.tolist() == gguf_new.tolist()
    assert text == gguf_text


def test_second_call_returns_at_once(default_folder: Path) -> None:
    started = time.perf_counter()
    again = prepare_default_model()
    assert time.perf_counter() - started < 1.0
    assert again == default_folder


def test_partial_folder_is_not_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    partial = out_dir.parent / f"{out_dir.name}.partial-123"
    partial.mkdir(parents=True)
    (partial / "config.json").write_text("junk")
    (partial / MARKER_NAME).write_text("{}")
    assert not is_prepared(out_dir)

    calls: list[tuple[Path, Path, torch.dtype]] = []

    def fake_convert(gguf_file: Path, out: Path, *, dtype: torch.dtype) -> Path:
        calls.append((gguf_file, out, dtype))
        return out

    monkeypatch.setattr(prepare, "convert_gguf", fake_convert)
    assert prepare_default_model(cache_dir=tmp_path) == out_dir
    assert calls == [(prepare._default_gguf(), out_dir, torch.float32)]


def test_marker_makes_a_folder_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out_dir = tmp_path / "models" / DEFAULT_MODEL_NAME
    out_dir.mkdir(parents=True)
    (out_dir / MARKER_NAME).write_text("not json")
    assert not is_prepared(out_dir)
    (out_dir / MARKER_NAME).write_text(json.dumps({"source": DEFAULT_GGUF_NAME}))
    assert is_prepared(out_dir)

    def no_convert(*args: Any, **kwargs: Any) -> Path:
        raise AssertionError("a prepared folder must not be converted again")

    monkeypatch.setattr(prepare, "convert_gguf", no_convert)
    assert prepare_default_model(cache_dir=tmp_path) == out_dir


def test_convert_missing_file_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    with pytest.raises(CheckpointError, match=str(missing)):
        convert_gguf(missing, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_convert_junk_file_raises_and_cleans_stale_partials(tmp_path: Path, offline: None) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    out_dir = tmp_path / "out"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # its pid now names no process, like that of a run killed mid-conversion
    stale = tmp_path / f"out.partial-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half written")
    (tmp_path / f"out.old-{dead.pid}").mkdir()  # killed between moving the old folder away and the rename
    with pytest.raises(CheckpointError, match="cannot read"):
        convert_gguf(junk, out_dir)
    assert not out_dir.exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["junk.gguf"]


def test_convert_refuses_a_foreign_out_dir(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="not a folder prepared by corolla"):
        convert_gguf(gguf, out_dir)
    assert (out_dir / "notes.txt").read_text() == "keep me"


def _tiny_gguf_reader(dtype_seen: list[torch.dtype]) -> Any:
    """Stands in for reading a GGUF: a tiny random Llama and a word-level tokenizer, in milliseconds."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    def load(transformers: Any, gguf_file: Path, dtype: torch.dtype) -> tuple[Any, Any]:
        dtype_seen.append(dtype)
        vocab = {"<unk>": 0, "once": 1, "upon": 2}
        tokenizer = PreTrainedTokenizerFast(
            tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        )
        config = LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=True,
        )
        torch.manual_seed(0)
        return tokenizer, LlamaForCausalLM(config).to(dtype).eval()

    return load


def test_convert_replaces_atomically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, offline: None) -> None:
    from transformers import AutoModelForCausalLM

    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"stand-in for a GGUF file")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / MARKER_NAME).write_text("{}")  # an earlier complete run
    (out_dir / "left-over.txt").write_text("from the earlier run")
    dtypes: list[torch.dtype] = []
    monkeypatch.setattr(prepare, "_load_gguf", _tiny_gguf_reader(dtypes))

    assert convert_gguf(gguf, out_dir, dtype=torch.bfloat16) == out_dir
    assert dtypes == [torch.bfloat16]
    assert not (out_dir / "left-over.txt").exists()
    marker = json.loads((out_dir / MARKER_NAME).read_text())
    assert marker["source"] == "tiny.gguf"
    assert marker["source_bytes"] == gguf.stat().st_size
    assert marker["dtype"] == "bfloat16"
    saved = AutoModelForCausalLM.from_pretrained(out_dir)
    _, expected = _tiny_gguf_reader([])(None, gguf, torch.bfloat16)
    assert saved.dtype == torch.bfloat16
    for name, tensor in expected.state_dict().items():
        torch.testing.assert_close(saved.state_dict()[name], tensor, rtol=0, atol=0)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny.gguf"]

    def interrupted(partial: Path, out: Path) -> None:
        raise KeyboardInterrupt  # as if Ctrl-C came after the files were written, before the rename

    monkeypatch.setattr(prepare, "_install", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(gguf, out_dir, dtype=torch.float32)
    assert json.loads((out_dir / MARKER_NAME).read_text()) == marker
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out", "tiny.gguf"]


def test_cli_help_mentions_every_option() -> None:
    result = _run_cli("--help")
    assert result.returncode == 0, result.stderr
    for option in ("--gguf", "--out", "--cache-dir", "--dtype", "--force"):
        assert option in result.stdout
    assert "later calls return at once" in " ".join(result.stdout.split())


def test_cli_gguf_needs_out(tmp_path: Path) -> None:
    result = _run_cli("--gguf", str(tmp_path / "model.gguf"))
    assert result.returncode == 2
    assert "--out" in result.stderr
    assert result.stdout == ""


def test_cli_missing_gguf_is_a_clear_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.gguf"
    result = _run_cli("--gguf", str(missing), "--out", str(tmp_path / "out"))
    assert result.returncode == 1
    assert str(missing) in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "out").exists()


def test_cli_prints_only_the_default_folder(default_folder: Path) -> None:
    result = _run_cli()
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"{default_folder}\n"


def test_cli_gguf_converts_once_per_dtype(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"stand-in for a GGUF file")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    marker = {"source": "model.gguf", "source_bytes": gguf.stat().st_size, "dtype": "float32"}
    (out_dir / MARKER_NAME).write_text(json.dumps(marker))
    calls: list[torch.dtype] = []

    def fake_convert(gguf_file: Path, out: Path, *, dtype: torch.dtype) -> Path:
        calls.append(dtype)
        return out

    monkeypatch.setattr(prepare, "convert_gguf", fake_convert)
    assert prepare.main(["--gguf", str(gguf), "--out", str(out_dir)], "corolla prepare-model") == 0
    assert calls == []
    assert capsys.readouterr().out == f"{out_dir}\n"
    argv = ["--gguf", str(gguf), "--out", str(out_dir), "--dtype", "bfloat16"]
    assert prepare.main(argv, "corolla prepare-model") == 0
    assert calls == [torch.bfloat16]
    assert prepare.main([*argv, "--force"], "corolla prepare-model") == 0
    assert calls == [torch.bfloat16, torch.bfloat16]
