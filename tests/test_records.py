"""DHT records: validation of what peers announce, the key scheme and model ids."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import pytest
from hivemind.utils.serializer import MSGPackSerializer
from pydantic import ValidationError

from protos.errors import InvalidInputError
from protos.records import (
    MAX_PINGS,
    MODEL_INDEX_KEY,
    PeerRecord,
    PeerState,
    block_key,
    model_id_from_path,
    record_from_dht,
    record_to_dht,
    validate_model_id,
)


def _valid(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "state": "online",
        "address": "127.0.0.1:31337",
        "start": 4,
        "end": 12,
        "throughput": 812.5,
        "free_cache_tokens": 65536,
        "max_length": 2048,
        "dtype": "bfloat16",
        "quantization": "none",
        "adapters": ["org/lora-a"],
        "version": "0.1.0",
        "public_name": "alice's box",
        "pings": {"QmPeerB": 0.0021, "QmPeerC": 0.5},
    }
    value.update(overrides)
    return value


def test_record_round_trips_through_msgpack() -> None:
    record = PeerRecord(
        state=PeerState.ONLINE,
        address="peer.example.org:8080",
        start=0,
        end=30,
        throughput=1234.0,
        free_cache_tokens=0,
        max_length=8192,
        dtype="float32",
        adapters=("a", "b"),
        version="0.1.0",
        pings={"QmX": 0.25},
    )
    value = record_to_dht(record)
    assert value["state"] == "online" and value["adapters"] == ["a", "b"]
    assert value["quantization"] == "none" and value["public_name"] is None
    loaded = MSGPackSerializer.loads(MSGPackSerializer.dumps(value))
    assert record_from_dht(loaded) == record
    assert record_from_dht(record_to_dht(record)) == record


def test_defaults() -> None:
    value = _valid()
    for key in ("quantization", "adapters", "public_name", "pings"):
        del value[key]
    record = record_from_dht(value)
    assert record is not None
    assert (record.quantization, record.adapters, record.public_name, record.pings) == ("none", (), None, {})


@pytest.mark.parametrize(
    "overrides",
    [
        {"state": "joining"},
        {"state": "draining"},
        {"state": "offline"},
        {"address": "[::1]:1"},
        {"address": "localhost:65535"},
        {"address": "10.0.0.7:31337"},
        {"throughput": 0.0},
        {"throughput": 5},  # an int is a valid float
        {"start": 29, "end": 30},
        {"public_name": None},
        {"pings": {f"Qm{i}": 0.1 for i in range(MAX_PINGS)}},
        {"adapters": []},
    ],
    ids=str,
)
def test_accepts_valid_values(overrides: dict[str, Any]) -> None:
    assert record_from_dht(_valid(**overrides)) is not None


@pytest.mark.parametrize(
    "value",
    [
        _valid(throughput=-1.0),
        _valid(throughput=math.nan),
        _valid(throughput=math.inf),
        _valid(pings={"QmB": math.nan}),
        _valid(pings={"QmB": -0.1}),
        _valid(pings={f"Qm{i}": 0.1 for i in range(MAX_PINGS + 1)}),
        _valid(pings={"": 0.1}),
        _valid(start=5, end=5),
        _valid(start=6, end=5),
        _valid(start=-1),
        _valid(end=2**32),
        _valid(free_cache_tokens=-1),
        _valid(max_length=0),
        _valid(address="127.0.0.1"),
        _valid(address="127.0.0.1:0"),
        _valid(address="127.0.0.1:65536"),
        _valid(address="127.0.0.1:http"),
        _valid(address="bad host:80"),
        _valid(address="[::zz]:80"),
        _valid(address=":80"),
        _valid(address="a" * 300 + ":80"),
        _valid(state="ONLINE"),
        _valid(state="retired"),
        _valid(state=1),
        _valid(dtype="int64"),
        _valid(dtype="float64"),
        _valid(quantization=""),
        _valid(version=""),
        _valid(version="1.0 evil"),
        _valid(version="1.0\n"),
        _valid(pings={"Qm\x1b[2J": 0.1}),
        _valid(public_name="x" * 65),
        _valid(public_name="line\nbreak"),
        _valid(adapters=[f"a{i}" for i in range(17)]),
        _valid(adapters="abc"),
        _valid(adapters=[1]),
        _valid(extra_field=1),
        _valid(start="5"),
        _valid(free_cache_tokens="5"),
        _valid(free_cache_tokens=5.0),
        _valid(max_length=True),
        _valid(throughput="5.0"),
        _valid(throughput=True),
        _valid(address=b"127.0.0.1:80"),
        {k: v for k, v in _valid().items() if k != "address"},
        None,
        "online",
        [1, 2],
        b"\x00",
    ],
    ids=[
        "negative-throughput",
        "nan-throughput",
        "inf-throughput",
        "nan-ping",
        "negative-ping",
        "too-many-pings",
        "empty-ping-key",
        "empty-span",
        "reversed-span",
        "negative-start",
        "end-over-uint32",
        "negative-free-cache",
        "zero-max-length",
        "no-port",
        "port-0",
        "port-too-big",
        "port-not-a-number",
        "space-in-host",
        "bad-ipv6",
        "no-host",
        "long-address",
        "state-case",
        "unknown-state",
        "state-int",
        "int-dtype",
        "float64-dtype",
        "empty-quantization",
        "empty-version",
        "space-in-version",
        "newline-in-version",
        "control-char-in-ping-key",
        "long-public-name",
        "control-char-in-public-name",
        "too-many-adapters",
        "adapters-str",
        "adapter-int",
        "extra-field",
        "str-for-int",
        "str-for-free-cache",
        "float-for-int",
        "bool-for-int",
        "str-for-float",
        "bool-for-float",
        "bytes-for-str",
        "missing-field",
        "none",
        "str",
        "list",
        "bytes",
    ],
)
def test_rejects_invalid_values(value: object, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="protos.records"):
        assert record_from_dht(value) is None
    assert "dropped invalid peer record" in caplog.text


def test_record_is_frozen_and_constructor_is_strict() -> None:
    record = record_from_dht(_valid())
    assert record is not None
    with pytest.raises(ValidationError):
        record.start = 0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="start must be < end"):
        PeerRecord.model_validate(_valid(start=3, end=2))


def test_key_scheme() -> None:
    assert block_key("SmolLM2-135M-Instruct", 0) == "SmolLM2-135M-Instruct.0"
    assert block_key("org--name", 29) == "org--name.29"
    assert MODEL_INDEX_KEY == "corolla.models"
    assert MODEL_INDEX_KEY not in {block_key("corolla", i) for i in range(100)}
    for bad_block in (-1, True, 1.0, "3"):
        with pytest.raises(InvalidInputError, match="block must be"):
            block_key("m", bad_block)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="invalid model_id"):
        block_key("a b", 0)


@pytest.mark.parametrize("model_id", ["m", "SmolLM2-135M-Instruct", "org--name", "a.b_c-d", "x" * 128])
def test_valid_model_ids(model_id: str) -> None:
    assert validate_model_id(model_id) == model_id


@pytest.mark.parametrize("model_id", ["", "x" * 129, "org/name", "a b", "m:1", "naïve", "m\n", None, 5])
def test_invalid_model_ids(model_id: object) -> None:
    with pytest.raises(InvalidInputError, match="invalid model_id"):
        validate_model_id(model_id)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path_or_name", "expected"),
    [
        ("/home/x/SmolLM2", "SmolLM2"),
        ("/home/x/SmolLM2/", "SmolLM2"),
        ("./models/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"),
        ("../SmolLM2", "SmolLM2"),
        ("~/models/tiny-llama", "tiny-llama"),
        ("a/b/c", "c"),
        ("SmolLM2", "SmolLM2"),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB--SmolLM2-135M-Instruct"),
        ("org/name/", "org--name"),
    ],
)
def test_model_id_from_path(path_or_name: str, expected: str) -> None:
    assert model_id_from_path(path_or_name) == expected


def test_model_id_from_existing_relative_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert model_id_from_path("models/tiny") == "tiny"  # a folder on disk wins over the hub reading


@pytest.mark.parametrize("path_or_name", ["", "/", "/home/x/my model", "org/na me"])
def test_model_id_from_path_rejects(path_or_name: str) -> None:
    with pytest.raises(InvalidInputError):
        model_id_from_path(path_or_name)
