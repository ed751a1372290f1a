"""One factory for valid `PeerRecord`s in unit tests: each test states only the fields it depends on."""

from __future__ import annotations

from typing import Any

from protos.records import PeerRecord, PeerState


def peer_record(
    start: int,
    end: int,
    throughput: float = 10.0,
    state: PeerState = PeerState.ONLINE,
    *,
    port: int | None = None,
    **fields: Any,
) -> PeerRecord:
    """A record of span [start, end) at 127.0.0.1:`port` (default: a port unique to the span); `fields`
    set any other field (limits, dtype, public_name, ...)."""
    values: dict[str, Any] = dict(
        state=state,
        address=f"127.0.0.1:{7000 + start * 100 + end if port is None else port}",
        start=start,
        end=end,
        throughput=throughput,
        free_cache_tokens=4096,
        max_length=2048,
        dtype="float32",
        version="0.1.0",
    )
    return PeerRecord(**(values | fields))
