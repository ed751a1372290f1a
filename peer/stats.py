"""What a peer says about itself in `Info`: its span and limits, its load, and where its inference steps
spend their time (`StepTimes`), which `bench/decode.py --profile` reads to split a token's time per hop."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from protos import peer_pb2
from protos.tensors import dtype_name

if TYPE_CHECKING:
    from peer.service import PeerService


@dataclass
class StepTimes:
    """Seconds summed over every inference step since the peer started, by stage, in the order a step
    passes them. `compute` is the forward that computed the step (shared with its batch companions); `push`
    runs beside `report` (the next hop starts when the push lands)."""

    steps: float = 0.0  # steps counted (a float: the map holds doubles)
    decode: float = 0.0  # the step's message checked and its tensors decoded
    wait: float = 0.0  # from arrival to compute: the session's earlier steps, the queue, the thread hop
    compute: float = 0.0  # the span's forward
    encode: float = 0.0  # the output serialized
    report: float = 0.0  # the result handed to the client's stream
    push: float = 0.0  # the Push call to the next hop, until it answered

    def add(self, **seconds: float) -> None:
        for stage, value in seconds.items():
            setattr(self, stage, getattr(self, stage) + value)


def info_reply(service: PeerService) -> peer_pb2.InfoReply:
    span, config, sessions, scheduler = service.span, service.config, service.sessions, service.scheduler
    return peer_pb2.InfoReply(
        model_id=config.model_id,
        peer_id=service.peer_id,
        start=span.start,
        end=span.end,
        num_blocks=span.anatomy.num_blocks,
        dtype=dtype_name(span.dtype),
        version=service.version,
        free_cache_tokens=sessions.free_tokens,
        max_cache_tokens=sessions.max_cache_tokens,
        num_sessions=len(sessions),
        throughput=service.make_record().throughput,
        max_batch_size=config.max_batch_size,
        max_length=config.max_length,
        max_message_bytes=config.max_message_bytes,
        page_tokens=sessions.page_tokens,
        queued=scheduler.in_flight,
        steps_computed=scheduler.stats.steps,
        step_batches=scheduler.stats.batches,
        preempted=sessions.preempted,
        step_seconds=asdict(service.step_times),
        cpu_seconds=time.process_time(),
        quantization=span.quant,
        device=str(span.device),
        adapters=sorted(span.adapters),
        max_lora_rank=config.max_lora_rank,
    )
