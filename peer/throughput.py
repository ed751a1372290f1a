"""How fast this peer is: decode steps and forward tokens per second through one block, measured once per
model, dtype, device and software version and cached on disk (`--throughput auto|eval|NUMBER`).

The announced throughput is steps per second through the peer's whole span: the per-block rate divided by
the number of blocks served, capped by what the network link can carry when its bandwidth is given.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from peer.blocks import BatchItem, HostedSpan
from peer.config import parse_option
from peer.devices import device_name, synchronize

logger = logging.getLogger(__name__)

DECODE_STEPS = 8
FORWARD_TOKENS = 128
BATCH_SESSIONS = 8  # sessions whose decode steps are timed as one batched forward
CACHE_FILE = "throughput.json"
_MAX_CACHE_BYTES = 1 << 20


@dataclass(frozen=True)
class Throughput:
    decode_rps: float  # single-token decode steps per second through one block
    forward_tps: float  # tokens per second of a stateless forward through one block; 0: unknown
    batch_tps: float = 0.0  # decode tokens per second through one block, BATCH_SESSIONS batched; 0: unknown

    def for_span(self, num_blocks: int, network_rps: float | None = None) -> tuple[float, float]:
        """(decode steps/s, forward tokens/s) through `num_blocks` blocks, decode capped by the network."""
        decode = self.decode_rps / num_blocks
        if network_rps is not None:
            decode = min(decode, network_rps)
        return decode, self.forward_tps / num_blocks


def network_rps(bandwidth_mbit: float, hidden_size: int, bytes_per_value: int) -> float:
    """Decode steps per second a link of `bandwidth_mbit` carries: each step receives and sends one
    hidden vector per sequence."""
    bits_per_step = 2 * hidden_size * bytes_per_value * 8
    return bandwidth_mbit * 1e6 / bits_per_step


def cache_key(span: HostedSpan, model_id: str, version: str) -> str:
    """What a measurement depends on: the model, dtype, weights' quantization, device, and software."""
    dtype = str(span.dtype).removeprefix("torch.")
    weights = dtype if span.quant == "none" else f"{dtype}+{span.quant}"
    return f"{model_id}|{weights}|{device_name(span.device)}|corolla-{version}|torch-{torch.__version__}"


def _zeros(span: HostedSpan, tokens: int) -> torch.Tensor:
    return torch.zeros(1, tokens, span.hidden_size, dtype=span.dtype, device=span.device)


def _timed(span: HostedSpan, run: Callable[[], object]) -> float:
    """Seconds `run` takes, the device's queued work included."""
    synchronize(span.device)
    started = time.perf_counter()
    run()
    synchronize(span.device)
    return time.perf_counter() - started


@torch.inference_mode()
def measure(span: HostedSpan) -> Throughput:
    """Time decode steps (median) and one 128-token forward through the loaded span, per block."""
    blocks = span.end - span.start
    cache = span.new_cache()
    span.forward(_zeros(span, 16), cache)  # a short prompt, warm-up
    step = _zeros(span, 1)
    times = [_timed(span, lambda: span.forward(step, cache)) for _ in range(DECODE_STEPS)]
    decode = blocks / max(statistics.median(times), 1e-9)
    prompt = _zeros(span, FORWARD_TOKENS)
    forward = FORWARD_TOKENS * blocks / max(_timed(span, lambda: span.forward(prompt)), 1e-9)
    return Throughput(decode_rps=decode, forward_tps=forward, batch_tps=_batched(span))


def _batched(span: HostedSpan) -> float:
    """Decode tokens per second per block when BATCH_SESSIONS sessions step together; 0 when the family
    does not batch."""
    if not span.batches:
        return 0.0
    caches = [span.new_cache() for _ in range(BATCH_SESSIONS)]
    for cache in caches:
        span.forward(_zeros(span, 16), cache)
    step = _zeros(span, 1)
    items = [BatchItem(step, cache) for cache in caches]
    times = [_timed(span, lambda: span.forward_batch(items)) for _ in range(DECODE_STEPS)]
    return BATCH_SESSIONS * (span.end - span.start) / max(statistics.median(times), 1e-9)


def resolve(value: str, span: HostedSpan, *, key: str, cache_dir: Path) -> Throughput:
    """The throughput to announce per `--throughput`: a given number, the cached measurement (`auto`), or a
    fresh one (`eval`, or `auto` with nothing cached) saved for later runs."""
    option = parse_option(value)
    if isinstance(option, float):
        return Throughput(decode_rps=option, forward_tps=0.0)  # forward speed unknown: not announced
    path = cache_dir / CACHE_FILE
    if option == "auto":
        cached = _read(path).get(key)
        if cached is not None:
            logger.info("throughput from cache key=%s %s", key, cached)
            return cached
    measured = measure(span)
    logger.info(
        "throughput measured decode=%.1f steps/s forward=%.0f tokens/s batched decode=%.1f tokens/s "
        "per block",
        measured.decode_rps,
        measured.forward_tps,
        measured.batch_tps,
    )
    _write(path, key, measured)
    return measured


def _read(path: Path) -> dict[str, Throughput]:
    """The cached entries; an unreadable file, or an entry that is not a finite positive rate, is ignored
    (measured again), never fatal."""
    try:
        if path.stat().st_size > _MAX_CACHE_BYTES:
            return {}
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    entries: dict[str, Throughput] = {}
    for key, value in raw.items() if isinstance(raw, dict) else ():
        with contextlib.suppress(TypeError, ValueError, KeyError):
            rates = (value["decode_rps"], value["forward_tps"], value.get("batch_tps", 0.0))
            entry = Throughput(*map(float, rates))
            finite = all(map(math.isfinite, (entry.decode_rps, entry.forward_tps, entry.batch_tps)))
            if finite and entry.decode_rps > 0 and entry.forward_tps >= 0 and entry.batch_tps >= 0:
                entries[key] = entry
    return entries


def _write(path: Path, key: str, value: Throughput) -> None:
    """Add one entry. The file is replaced atomically (written and fsynced next to it first), so a reader
    never sees half of it and a crash leaves the old file or the new one; the temp file never outlives us."""
    entries = {k: asdict(v) for k, v in _read(path).items()}
    entries[key] = asdict(value)
    temp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
            temp = Path(handle.name)
            json.dump(entries, handle, indent=1, sort_keys=True, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        temp = None
    except (OSError, ValueError) as e:  # a read-only home (or a non-finite rate) does not stop the peer
        logger.warning("cannot cache the throughput path=%r reason=%r", str(path), e)
    finally:
        if temp is not None:
            temp.unlink(missing_ok=True)
