"""Session stream messages checked on the wire, before protobuf builds them.

A 2 MB `OpenSession` can hold a million empty `Hop`s, and parsing it builds a million message objects
(over 100 MiB) before any handler could look at the count. So the Session RPC's deserializer first walks
the raw bytes, counting `next_hops` entries (across repeated `open`/`reroute` fields, which protobuf would
merge) and top-level fields, and refuses a message past the bounds without parsing it: the handler gets a
`Refused` in its place and ends the stream with INVALID_ARGUMENT. Everything else parses as usual.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import grpc

from protos import peer_pb2
from protos.errors import InvalidInputError

MAX_HOPS = 4096  # next hops one message may name: no model has more blocks (protos.swarm.MAX_NUM_BLOCKS)
MAX_TOP_LEVEL_FIELDS = 16  # a SessionRequest has one; a few repeats are harmless, a flood is refused
_OPEN, _REROUTE = 1, 4  # SessionRequest fields that carry hops
_HOPS = {_OPEN: 7, _REROUTE: 1}  # OpenSession.next_hops, Reroute.next_hops
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Refused:
    """Stands for a Session message refused on the wire; `reason` goes back to the caller."""

    reason: str


class _Malformed(Exception):
    """Bytes that are not a protobuf message."""


def _varint(data: memoryview, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data) or shift > 63:
            raise _Malformed
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, at
        shift += 7


def _fields(data: memoryview) -> Iterator[tuple[int, memoryview | None]]:
    """(field number, payload of a length-delimited field or None) for each field of a message."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire_type = key >> 3, key & 7
        if wire_type == _VARINT:
            _, at = _varint(data, at)
            yield number, None
        elif wire_type == _LENGTH:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise _Malformed
            yield number, data[at : at + length]
            at += length
        elif wire_type in (_FIXED64, _FIXED32):
            at += 8 if wire_type == _FIXED64 else 4
            yield number, None
        else:  # groups and reserved types never appear in corolla's messages
            raise _Malformed


def _count(payload: memoryview, field: int, counted: int) -> int:
    """`counted` plus the occurrences of `field` in `payload`; stops past MAX_HOPS: costs O(MAX_HOPS)."""
    for number, _ in _fields(payload):
        if number == field:
            counted += 1
            if counted > MAX_HOPS:
                break
    return counted


def session_request(data: bytes) -> peer_pb2.SessionRequest | Refused:
    """The Session RPC's request deserializer (see the module doc)."""
    try:
        hops = 0
        for index, (number, payload) in enumerate(_fields(memoryview(data))):
            if index >= MAX_TOP_LEVEL_FIELDS:
                return Refused("malformed session message: too many fields")
            if number in _HOPS and payload is not None:
                hops = _count(payload, _HOPS[number], hops)
                if hops > MAX_HOPS:
                    return Refused("more next hops than blocks in the model")
        return peer_pb2.SessionRequest.FromString(data)
    except Exception:  # a truncated varint or length, protobuf's DecodeError
        return Refused("malformed session message")


def push_request(data: bytes) -> peer_pb2.PushRequest | Refused:
    """The PushStream RPC's frame deserializer: a frame that does not parse ends the stream (the handler gets
    a `Refused`), where gRPC would end it with an opaque INTERNAL."""
    try:
        return peer_pb2.PushRequest.FromString(data)
    except Exception:  # protobuf's DecodeError, or a nested message it cannot build
        return Refused("malformed push frame")


async def checked(
    requests: AsyncIterator[peer_pb2.SessionRequest | Refused],
) -> AsyncIterator[peer_pb2.SessionRequest]:
    """The stream's messages; one refused on the wire ends the stream with its reason."""
    async for request in requests:
        if isinstance(request, Refused):
            raise InvalidInputError(request.reason)
        yield request


def add_to_server(servicer: object, server: grpc.aio.Server) -> None:
    """`peer_pb2_grpc.add_PeerServicer_to_server` with the Session and PushStream deserializers above."""
    handlers = {
        "Session": grpc.stream_stream_rpc_method_handler(
            servicer.Session,  # type: ignore[attr-defined]
            request_deserializer=session_request,
            response_serializer=peer_pb2.SessionReply.SerializeToString,
        ),
        "PushStream": grpc.stream_stream_rpc_method_handler(
            servicer.PushStream,  # type: ignore[attr-defined]
            request_deserializer=push_request,
            response_serializer=peer_pb2.PushNack.SerializeToString,
        ),
    }
    for name, request, reply in (
        ("Push", peer_pb2.PushRequest, peer_pb2.PushReply),
        ("Forward", peer_pb2.ForwardRequest, peer_pb2.ForwardReply),
        ("Backward", peer_pb2.BackwardRequest, peer_pb2.BackwardReply),
        ("Info", peer_pb2.InfoRequest, peer_pb2.InfoReply),
    ):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name),
            request_deserializer=request.FromString,
            response_serializer=reply.SerializeToString,
        )
    service = peer_pb2.DESCRIPTOR.services_by_name["Peer"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)
