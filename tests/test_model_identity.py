"""The swarm's id of a model: equal for every spelling and copy of one checkpoint, different for different
weights; a client nobody serves is told which ids the swarm does serve; `serve` joins a swarm or says it
starts one (`--new-swarm`). No peer process: the DHT is a fake node, `serve` stops before serving."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from hivemind.utils.timed_storage import ValueWithExpiration, get_dht_time
from safetensors.torch import load_file, save_file

from client.discovery import DhtDiscovery
from client.errors import SwarmError
from peer import main as peer_main
from peer.config import PeerConfig
from protos import prepare
from protos.model_id import (
    PREPARED_MARKER,
    ModelIdentity,
    derive_model_id,
    prepared_model_id,
    served_ids_hint,
    served_model_ids,
)
from protos.records import MODEL_INDEX_KEY, model_id_from_path, validate_model_id

HUB_NAME = "some-org/tiny-llama"
WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def llama(checkpoint) -> Path:
    return checkpoint("llama")


def _copy(folder: Path, target: Path) -> Path:
    shutil.copytree(folder, target)
    return target


def test_hub_name_its_cache_folder_and_links_into_it_share_the_hub_id(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the hub cache's layout: blobs named by hash, snapshot files linking to them
    repo = tmp_path / "hub" / "models--some-org--tiny-llama"
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in llama.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("../../blobs") / blob.name)
    linked_copy = tmp_path / "copy"  # `cp -r` keeps the links: they still point into the cache
    linked_copy.mkdir()
    for file in snapshot.iterdir():
        (linked_copy / file.name).symlink_to(file.resolve())
    monkeypatch.chdir(tmp_path)  # HUB_NAME names nothing on disk here

    identities = [derive_model_id(str(path)) for path in (HUB_NAME, snapshot, linked_copy, tmp_path / "ln")]
    assert [i.model_id for i in identities[:3]] == ["some-org--tiny-llama"] * 3
    assert [i.source for i in identities[:3]] == ["hub name", "hub cache", "hub cache"]
    (tmp_path / "ln").symlink_to(snapshot)  # a link to the snapshot folder itself
    assert derive_model_id(str(tmp_path / "ln")).model_id == "some-org--tiny-llama"


@pytest.mark.parametrize(
    "remote",
    [
        "https://huggingface.co/some-org/tiny-llama",
        "https://user:hf_token@huggingface.co/some-org/tiny-llama.git",
        "https://hf.co/some-org/tiny-llama/",
        "git@hf.co:some-org/tiny-llama",
    ],
)
def test_a_git_clone_of_a_hub_repository_gets_the_hub_id(llama: Path, tmp_path: Path, remote: str) -> None:
    clone = _copy(llama, tmp_path / "tiny-llama")
    (clone / ".git").mkdir()
    (clone / ".git" / "config").write_text(
        f'[core]\n\tbare = false\n[remote "origin"]\n\turl = {remote}\n\tfetch = +refs/heads/*\n'
    )
    assert derive_model_id(str(clone)) == ModelIdentity("some-org--tiny-llama", "hub clone")


def test_a_clone_of_another_host_is_named_by_content(llama: Path, tmp_path: Path) -> None:
    clone = _copy(llama, tmp_path / "tiny-llama")
    (clone / ".git").mkdir()
    (clone / ".git" / "config").write_text(
        '[remote "origin"]\n\turl = https://example.com/some-org/tiny-llama\n'
    )
    assert derive_model_id(str(clone)) == derive_model_id(str(llama))


def test_plain_copies_share_an_id_from_the_content(llama: Path, tmp_path: Path) -> None:
    copy = _copy(llama, tmp_path / "elsewhere" / "renamed")
    original = derive_model_id(str(llama))
    assert original.source == "content"
    assert original.model_id.startswith("llama-")
    assert validate_model_id(original.model_id) == original.model_id
    assert derive_model_id(str(copy)) == original
    assert derive_model_id(f"{copy}/") == original
    assert model_id_from_path(str(copy)) == original.model_id  # what every caller goes through


def test_a_resharded_copy_keeps_the_id(llama: Path, tmp_path: Path) -> None:
    copy = _copy(llama, tmp_path / "sharded")
    weights = load_file(copy / WEIGHTS)
    names = sorted(weights)
    half = len(names) // 2
    (copy / WEIGHTS).unlink()
    save_file({n: weights[n] for n in names[:half]}, copy / "model-00001-of-00002.safetensors")
    save_file({n: weights[n] for n in names[half:]}, copy / "model-00002-of-00002.safetensors")
    assert derive_model_id(str(copy)) == derive_model_id(str(llama))


def test_a_fine_tune_with_the_same_config_gets_another_id(llama: Path, tmp_path: Path) -> None:
    tuned = _copy(llama, tmp_path / "tuned")
    weights = load_file(tuned / WEIGHTS)
    name = next(n for n in sorted(weights) if "layers.0." in n and n.endswith("q_proj.weight"))
    weights[name] = weights[name] + 1e-3  # a trained layer; embeddings and head untouched
    save_file(weights, tuned / WEIGHTS, metadata={"format": "pt"})
    assert derive_model_id(str(tuned)).model_id != derive_model_id(str(llama)).model_id


def test_the_same_weights_under_another_config_get_another_id(llama: Path, tmp_path: Path) -> None:
    variant = _copy(llama, tmp_path / "long-context")
    config = json.loads((variant / "config.json").read_text())
    config["rope_theta"] = 2 * float(config.get("rope_theta") or 10000.0)
    (variant / "config.json").write_text(json.dumps(config))
    assert derive_model_id(str(variant)).model_id != derive_model_id(str(llama)).model_id


def test_keys_a_resave_changes_do_not_change_the_id(llama: Path, tmp_path: Path) -> None:
    resaved = _copy(llama, tmp_path / "resaved")
    config = json.loads((resaved / "config.json").read_text())
    config.update(_name_or_path="/somewhere/else", transformers_version="0.0.1")
    (resaved / "config.json").write_text(json.dumps(config, indent=7))
    assert derive_model_id(str(resaved)) == derive_model_id(str(llama))


def test_families_differ(checkpoint) -> None:
    assert derive_model_id(str(checkpoint("llama"))) != derive_model_id(str(checkpoint("gpt2")))


def test_a_prepared_folder_and_its_copies_are_named_by_the_marker(llama: Path, tmp_path: Path) -> None:
    prepared = _copy(llama, tmp_path / "prepared")
    (prepared / PREPARED_MARKER).write_text(json.dumps({"model_id": "SmolLM2-135M-Instruct", "source": "x"}))
    copy = _copy(prepared, tmp_path / "copy-of-prepared")
    assert derive_model_id(str(copy)).model_id == "SmolLM2-135M-Instruct"
    assert derive_model_id(str(copy)).source == "prepared"
    (copy / PREPARED_MARKER).write_text(json.dumps({"source": "x.gguf", "dtype": "float32"}))
    assert derive_model_id(str(copy)) == derive_model_id(str(llama))  # an older marker: by content


def test_the_default_model_marker_gains_its_name(tmp_path: Path) -> None:
    out = tmp_path / "models" / prepare.DEFAULT_MODEL_NAME
    out.mkdir(parents=True)
    old_marker = {"source": prepare.DEFAULT_GGUF_NAME, "dtype": "float32"}  # before the model_id key
    (out / prepare.MARKER_NAME).write_text(json.dumps(old_marker))
    assert prepare.prepare_default_model(cache_dir=tmp_path) == out.resolve()  # no conversion
    assert derive_model_id(str(out)).model_id == prepare.DEFAULT_MODEL_NAME


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct.Q4_1"),
        ("Llama 3.2 1B (Q8_0).gguf", "Llama-3.2-1B-Q8_0"),
        ("/models/x.gguf", "x"),
    ],
)
def test_prepared_model_id(source: str, expected: str) -> None:
    assert prepared_model_id(source) == expected


@pytest.mark.parametrize(
    ("path_or_name", "expected", "source"),
    [
        ("/no/such/folder/tiny", "tiny", "name"),  # loading fails later; the id falls back to the spelling
        ("org/name", "org--name", "hub name"),
    ],
)
def test_what_is_not_a_folder_is_named_by_its_spelling(path_or_name: str, expected: str, source: str) -> None:
    identity = derive_model_id(path_or_name)
    assert (identity.model_id, identity.source) == (expected, source)


def _index(*entries: object) -> ValueWithExpiration:
    expiration = get_dht_time() + 60
    subkeys = {f"peer{i}": ValueWithExpiration(entry, expiration) for i, entry in enumerate(entries)}
    return ValueWithExpiration(subkeys, expiration)


def test_served_model_ids_most_announced_first_invalid_skipped() -> None:
    index = _index(
        {"model_id": "b-model", "num_blocks": 4},
        {"model_id": "a-model", "num_blocks": 4},
        {"model_id": "a-model", "num_blocks": 4},
        {"model_id": "not valid!", "num_blocks": 4},
        {"model_id": 7},
        "garbage",
    )
    assert served_model_ids(index) == ["a-model", "b-model"]
    assert served_model_ids(None) == []


class _IndexOnlyNode:
    """A DHT node that holds only the model index: every block key reads as empty."""

    def __init__(self, index: ValueWithExpiration | None) -> None:
        self.index = index

    async def get(self, key: str, latest: bool = False) -> ValueWithExpiration | None:
        return self.index if key == MODEL_INDEX_KEY else None

    async def get_many(self, keys: list[str], **_: object) -> dict[str, None]:
        return dict.fromkeys(keys)


@pytest.mark.parametrize("num_blocks", [4, None])  # known from the checkpoint, or read from the index
def test_no_peers_error_names_the_served_ids(num_blocks: int | None) -> None:
    node = _IndexOnlyNode(_index({"model_id": "org--served", "num_blocks": 4}))
    discovery = DhtDiscovery(node, "llama-1M-abc", num_blocks=num_blocks, refresh_period=60)  # type: ignore[arg-type]
    with pytest.raises(SwarmError) as raised:
        asyncio.run(discovery.view())
    assert str(raised.value) == (
        "no peer announces model llama-1M-abc; check --initial-peers and the model id; this swarm serves: "
        "org--served. If your checkpoint is one of these, pass its id as --model-id (model_id= in Python)"
    )


def test_no_peers_error_in_a_swarm_that_serves_nothing() -> None:
    discovery = DhtDiscovery(_IndexOnlyNode(None), "m", num_blocks=4, refresh_period=60)  # type: ignore[arg-type]
    with pytest.raises(SwarmError, match="check --initial-peers and the model id; this swarm announces no"):
        asyncio.run(discovery.view())


def test_the_served_list_is_capped() -> None:
    message = served_ids_hint([f"model-{i}" for i in range(40)])
    assert "model-15 and 24 more" in message
    assert "model-16" not in message


@pytest.fixture
def serve_calls(monkeypatch: pytest.MonkeyPatch) -> list[PeerConfig]:
    """`serve_main` up to the point where it would serve: the configs it would serve, nothing started."""
    calls: list[PeerConfig] = []

    async def serve(config: PeerConfig) -> None:
        calls.append(config)

    monkeypatch.setattr(peer_main, "serve", serve)
    monkeypatch.setattr(peer_main, "setup_logging", lambda **_: None)
    monkeypatch.setattr(peer_main, "return_freed_memory", lambda: None)
    monkeypatch.setattr(peer_main, "raise_open_file_limit", lambda: None)
    return calls


def test_serve_without_initial_peers_refuses(
    serve_calls: list[PeerConfig], caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("COROLLA_INITIAL_PEERS", raising=False)
    with caplog.at_level(logging.ERROR, logger="peer.main"):
        assert peer_main.serve_main(["some/model", "--blocks", "0:1"], prog="corolla serve") == 2
    assert serve_calls == []
    assert "--new-swarm" in caplog.text
    assert "no --initial-peers" in caplog.text


def test_serve_with_new_swarm_starts(serve_calls: list[PeerConfig]) -> None:
    assert peer_main.serve_main(["some/model", "--blocks", "0:1", "--new-swarm"], prog="corolla serve") == 0
    assert [(c.new_swarm, c.initial_peers) for c in serve_calls] == [(True, [])]


def test_serve_with_initial_peers_starts(serve_calls: list[PeerConfig]) -> None:
    maddr = "/ip4/127.0.0.1/tcp/31337/p2p/QmPeer"
    assert peer_main.serve_main(["some/model", "--blocks", "0:1", "--initial-peers", maddr], prog="x") == 0
    assert [c.initial_peers for c in serve_calls] == [[maddr]]


def test_new_swarm_and_initial_peers_conflict() -> None:
    with pytest.raises(ValueError, match="--new-swarm starts a swarm of its own"):
        PeerConfig(model="m", blocks="0:1", new_swarm=True, initial_peers=["/ip4/127.0.0.1/tcp/1/p2p/QmX"])


def test_the_peer_says_where_its_id_came_from(llama: Path) -> None:
    derived = PeerConfig(model=str(llama), blocks="0:1")
    assert derived.model_id == derive_model_id(str(llama)).model_id
    assert peer_main.id_source(derived) == "content"
    assert peer_main.id_source(PeerConfig(model=str(llama), blocks="0:1", model_id="chosen")) == "--model-id"


def test_help_names_no_public_swarm(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        peer_main.serve_main(["--help"], prog="corolla serve")
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--new-swarm" in help_text
    assert "public swarm" not in help_text


def test_generate_prints_the_model_id(
    llama: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import transformers

    from client import cli
    from client.model import AutoDistributedModelForCausalLM
    from protos.errors import CorollaError

    joined: list[str] = []

    def tokenizer(*_: object, **__: object) -> transformers.BatchEncoding:
        return transformers.BatchEncoding({"input_ids": torch.tensor([[1, 2]])})

    def from_pretrained(*_: object, model_id: str, **__: object) -> None:
        joined.append(model_id)
        raise CorollaError("stop before joining")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *_, **__: tokenizer)
    monkeypatch.setattr(AutoDistributedModelForCausalLM, "from_pretrained", from_pretrained)
    maddr = "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"
    assert cli.main([str(llama), "Hi", "--initial-peers", maddr], prog="corolla generate") == 1
    model_id = derive_model_id(str(llama)).model_id
    assert joined == [model_id]
    assert f"corolla generate: model id {model_id}\n" in capsys.readouterr().err
