"""GPU honesty: `--num-blocks auto` as arithmetic over a block's bytes (from the config, no weights read) and
the memory a device reports (CPU RAM, a faked CUDA GPU); `PeerConfig` takes `auto`; the client's `--device`
is checked before anything loads."""

from __future__ import annotations

import pytest
import torch

from client.cli import _parser, device_problem
from client.config import GatewayConfig, GenerateConfig
from peer.blocks import HostedSpan
from peer.config import PeerConfig
from peer.devices import GIB, BlockMemory, auto_num_blocks, block_memory, free_memory_bytes
from protos.errors import InvalidInputError
from protos.partition import materialized_bytes
from protos.settings import config_from_arguments

MIB = 2**20
SMALL = BlockMemory(weight_bytes=512 * MIB, cache_bytes=256 * MIB, reserve_bytes=GIB)


@pytest.mark.parametrize(
    ("free", "memory", "num_blocks", "expected"),
    [
        # 10 GiB free, 1 GiB reserved, blocks of 0.5 + 0.25 GiB: 9 / 0.75 = 12 blocks
        (10 * GIB, BlockMemory(weight_bytes=GIB // 2, cache_bytes=GIB // 4, reserve_bytes=GIB), 32, 12),
        (10 * GIB, BlockMemory(weight_bytes=GIB // 2, cache_bytes=GIB // 4, reserve_bytes=GIB), 8, 8),  # clip
        (GIB + 767 * MIB, SMALL, 8, 0),  # one byte short of a block with its cache
        (GIB + 768 * MIB, SMALL, 8, 1),
    ],
)
def test_auto_num_blocks_fills_what_is_free_after_the_reserve(
    free: int, memory: BlockMemory, num_blocks: int, expected: int
) -> None:
    if expected == 0:
        with pytest.raises(InvalidInputError, match="not even one block fits"):
            auto_num_blocks(free, memory, num_blocks=num_blocks)
    else:
        assert auto_num_blocks(free, memory, num_blocks=num_blocks) == expected


def test_a_blocks_bytes_come_from_the_config_and_match_a_loaded_block(checkpoint) -> None:
    """The meta-device count equals what one loaded block of the tiny Llama holds, in float32 and bfloat16;
    int8 linear layers take 2 bytes a weight and a scale per output channel; the cache is K and V."""
    folder = checkpoint("llama")
    config = PeerConfig(model=str(folder), blocks="0:1")
    for dtype in (torch.float32, torch.bfloat16):
        memory = block_memory(folder, dtype=dtype, quant="none", cache_tokens=config.max_cache_tokens)
        span = HostedSpan.load(folder, 0, 1, dtype=dtype)
        assert memory.weight_bytes == materialized_bytes(span.blocks[0])
    text = span.config.get_text_config()
    head_dim = text.hidden_size // text.num_attention_heads
    float32 = block_memory(folder, dtype=torch.float32, quant="none", cache_tokens=1000)
    assert float32.cache_bytes == 2 * text.num_key_value_heads * head_dim * 4 * 1000
    int8 = block_memory(folder, dtype=torch.float32, quant="int8", cache_tokens=1000)
    assert float32.weight_bytes / 2 < int8.weight_bytes < float32.weight_bytes  # norms stay float32
    assert float32.reserve_bytes >= GIB // 2


def test_free_memory_on_the_cpu_and_on_a_faked_gpu(monkeypatch) -> None:
    assert free_memory_bytes(torch.device("cpu")) > 0
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (3 * GIB, 80 * GIB))
    assert free_memory_bytes(torch.device("cuda", 0)) == 3 * GIB
    memory = BlockMemory(weight_bytes=GIB // 4, cache_bytes=GIB // 4, reserve_bytes=GIB)
    assert auto_num_blocks(free_memory_bytes(torch.device("cuda", 0)), memory, num_blocks=30) == 4


@pytest.mark.parametrize(("value", "expected"), [("auto", "auto"), ("3", 3), (2, 2)])
def test_peer_config_takes_num_blocks_auto(value: object, expected: object) -> None:
    assert PeerConfig(model="m", num_blocks=value).span_length == expected


@pytest.mark.parametrize("value", ["0", "many", -1])
def test_peer_config_refuses_other_num_blocks(value: object) -> None:
    with pytest.raises(ValueError, match="num_blocks"):
        PeerConfig(model="m", num_blocks=value)


def test_the_clients_device_is_checked_before_loading(monkeypatch) -> None:
    assert device_problem("cpu") is None
    assert "expected cpu, cuda" in str(device_problem("gpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in str(device_problem("cuda:0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert device_problem("cuda:0") is None
    assert "only 1 CUDA GPU" in str(device_problem("cuda:1"))
    assert GatewayConfig(model="m", device="cuda:1").device == "cuda:1"
    with pytest.raises(ValueError, match="device"):
        GatewayConfig(model="m", device="tpu")


def test_generate_takes_a_device_and_a_metrics_port() -> None:
    args = _parser("corolla generate").parse_args(
        ["M", "Hi", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/X", "--device", "cuda:1", "--metrics-port=0"]
    )
    config = config_from_arguments(GenerateConfig, args, environ={})
    assert (config.device, config.metrics_port, config.prompt) == ("cuda:1", 0, "Hi")
