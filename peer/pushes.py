"""Admission of pushed steps: what a push must look like, and how many bytes of pushes may wait to run.

An accepted push waits in memory, undecoded, until its session runs it; a session whose client stops
reading its stream (or whose steps queue behind a slow one) holds its pushes until then. So a push is
checked before it is queued: its claimed shape must fit the session (batch, width, max_length) and its
size what a step of that shape can take, and the bytes of pushes waiting are bounded per session (a count,
`max_pending_pushes`), per client (the address that opened the session, as the session table counts it)
and over the whole peer. One push passes a byte budget when nothing else waits in it, so a push of any
size the transport takes can get through, one at a time; a budget then bounds what waits at the larger of
itself and one message. A refusal changes nothing. Knows sessions and messages, not gRPC or tensors.

    push ─▶ token (PushRefused) ─▶ pending < max_pending_pushes ─▶ shape, carried count and size
            (INVALID_ARGUMENT)
         ─▶ client's bytes + size <= max_client_bytes, all bytes + size <= max_bytes, each unless nothing
            waits there yet (RESOURCE_EXHAUSTED)
         ─▶ queued; its bytes come back when the step has run, failed or was cancelled
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from peer.requests import check_rows, max_carried
from peer.sessions import QuotaExceeded
from protos.errors import InvalidInputError

if TYPE_CHECKING:
    from peer.config import PeerConfig
    from peer.session_runtime import SessionRuntime
    from peer.sessions import PeerSession
    from protos import peer_pb2

MAX_VALUE_BYTES = 4  # float32, the widest hidden dtype on the wire
MAX_INDEX_BYTES = 8  # int64 position ids, mask values and beam indices
MESSAGE_SLACK_BYTES = 4096  # ids, token, positions, tags and lengths of the fields around the tensors
CARRIED_SLACK_BYTES = 64  # one carried output's dtype, shape and lengths, and its carried_seconds


def max_step_bytes(batch: int, seq: int, hidden_size: int, *, carried: int = 0) -> int:
    """The largest a pushed step of `seq` new positions can honestly be: its hidden states (and the
    `carried` outputs of earlier hops, the same shape) at the widest dtype, position ids and a mask for
    each position, beam indices for each row, and the fields around them (int8 is smaller than float32)."""
    per_position = hidden_size * MAX_VALUE_BYTES + 2 * MAX_INDEX_BYTES
    outputs = carried * (batch * seq * hidden_size * MAX_VALUE_BYTES + CARRIED_SLACK_BYTES)
    return batch * seq * per_position + batch * MAX_INDEX_BYTES + outputs + MESSAGE_SLACK_BYTES


def check_shape(step: peer_pb2.Step, *, session: PeerSession, hidden_size: int, nbytes: int) -> None:
    """Refuse a pushed step whose claimed shape does not fit `session`, which carries more outputs than
    hops can come before it, or whose `nbytes` (the push's size on the wire, carried outputs included) are
    more than a step of that shape takes. Reads only the shape: nothing is decoded."""
    shape = step.hidden.shape
    if len(shape) != 3:  # len() first: O(1), copies nothing
        raise InvalidInputError(f"hidden: expected 3 dims, got {len(shape)}")
    batch, seq, width = shape
    check_rows(batch, width, session=session, hidden_size=hidden_size)
    base = step.rollback_to if step.HasField("rollback_to") else step.position
    if seq < 1 or base + seq > session.max_length:
        raise InvalidInputError(
            f"a step of {seq} positions from position {base} does not fit max_length {session.max_length}"
        )
    carried = len(step.carried)
    if carried > max_carried(session.start):
        raise InvalidInputError(f"a push into block {session.start} cannot carry {carried} outputs")
    largest = max_step_bytes(batch, seq, hidden_size, carried=carried)
    if nbytes > largest:
        raise InvalidInputError(f"a push of {nbytes} bytes is more than a [{batch}, {seq}] step takes")


class PushBudget:
    """Bytes of accepted pushes not yet run: at most `max_bytes` over the peer, `max_client_bytes` per
    client. Not thread-safe: used from the peer's event loop only."""

    def __init__(self, *, max_bytes: int, max_client_bytes: int, max_pending: int) -> None:
        self.max_bytes = max_bytes
        self.max_client_bytes = max_client_bytes
        self.max_pending = max_pending  # per session
        self.pending_bytes = 0
        self._clients: dict[str, int] = {}  # client -> bytes of its sessions' pushes waiting

    @classmethod
    def from_config(cls, config: PeerConfig) -> PushBudget:
        return cls(
            max_bytes=config.max_pending_push_bytes,
            max_client_bytes=config.max_client_pending_push_bytes,
            max_pending=config.max_pending_pushes,
        )

    def client_bytes(self, client: str) -> int:
        return self._clients.get(client, 0)

    def admit(
        self,
        session: PeerSession,
        runtime: SessionRuntime,
        request: peer_pb2.PushRequest,
        *,
        hidden_size: int,
    ) -> int:
        """Account for `request` (its size on the wire) as a push to `session` (whose pushes waiting
        `runtime` counts) and return that size, or raise
        (QuotaExceeded: RESOURCE_EXHAUSTED, the sender tries again or elsewhere; InvalidInputError: the push
        is wrong) and change nothing. The caller gives the bytes back through `queued`."""
        if runtime.pending_pushes >= self.max_pending:
            raise QuotaExceeded("too many pushed steps queued")
        nbytes = request.ByteSize()
        check_shape(request.step, session=session, hidden_size=hidden_size, nbytes=nbytes)
        held = self.client_bytes(session.client)
        if held and held + nbytes > self.max_client_bytes:
            raise QuotaExceeded(
                f"client quota: {held} bytes of pushed steps queued here, {nbytes} more would pass the "
                f"{self.max_client_bytes} one client may have waiting"
            )
        if self.pending_bytes and self.pending_bytes + nbytes > self.max_bytes:
            raise QuotaExceeded(f"this peer has {self.pending_bytes} bytes of pushed steps queued")
        self._clients[session.client] = held + nbytes
        self.pending_bytes += nbytes
        runtime.pending_pushes += 1
        return nbytes

    def queued(
        self, session: PeerSession, runtime: SessionRuntime, task: asyncio.Task[None], nbytes: int
    ) -> None:
        """`task` runs an admitted push of `nbytes` on `session` (closing the session cancels it, see
        `SessionRuntimes.drop`); its bytes come back when it is done, whether the step ran, failed or was
        cancelled."""
        runtime.tasks.add(task)
        client = session.client
        task.add_done_callback(lambda _: self._release(client, runtime, task, nbytes))

    def _release(self, client: str, runtime: SessionRuntime, task: asyncio.Task[None], nbytes: int) -> None:
        runtime.tasks.discard(task)
        runtime.pending_pushes -= 1
        self.pending_bytes -= nbytes
        left = self._clients.get(client, 0) - nbytes
        if left > 0:
            self._clients[client] = left
        else:
            self._clients.pop(client, None)
