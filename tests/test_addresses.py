"""Addresses in records and next hops are hosts, never gRPC scheme names (security review 3, L1).

gRPC reads "unix:8700" as a Unix socket and "unix-abstract:8700" as the abstract socket "@8700": a record or
next hop naming one would make clients and peers dial a local socket of their own machine.
"""

from __future__ import annotations

import asyncio
import os

import grpc
import pytest

from protos import peer_pb2
from protos.channels import ChannelPool
from protos.errors import InvalidInputError
from protos.records import validate_address

SCHEME_ADDRESSES = [
    "unix:8700",
    "unix-abstract:8700",
    "dns:8700",
    "ipv4:8700",
    "ipv6:8700",
    "vsock:8700",
    "xds:8700",
    "UNIX:8700",
    "Unix-Abstract:8700",
]


@pytest.mark.parametrize("address", SCHEME_ADDRESSES)
def test_scheme_names_are_refused_as_hosts(address: str) -> None:
    with pytest.raises(InvalidInputError, match="names a gRPC scheme"):
        validate_address(address)


@pytest.mark.parametrize(
    "address", ["unixhost:8700", "dns.example.org:53", "unix.local:80", "localhost:8700"]
)
def test_hosts_that_merely_resemble_schemes_stay_valid(address: str) -> None:
    assert validate_address(address) == address


def test_every_scheme_is_refused() -> None:
    from protos.records import GRPC_SCHEMES

    for scheme in GRPC_SCHEMES:
        with pytest.raises(InvalidInputError):
            validate_address(f"{scheme}:1")


def test_a_pool_dials_hosts_not_local_sockets() -> None:
    """A server on the abstract socket "@<n>" is what "unix-abstract:<n>" reaches as a gRPC target; the pool
    dials it as a DNS host instead, which does not resolve, and never reaches the socket."""
    name = f"{40000 + os.getpid() % 20000}"

    async def scenario() -> tuple[bool, bool]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers([_AnswerEverything()])
        server.add_insecure_port(f"unix-abstract:{name}")
        await server.start()
        try:
            raw = grpc.aio.insecure_channel(f"unix-abstract:{name}")
            try:
                reached_raw = await _reaches(raw)
            finally:
                await raw.close()
            pool = ChannelPool(insecure=True, max_message_bytes=1 << 20)
            reached_pool = await _reaches(pool.get(f"unix-abstract:{name}"))
            await pool.close()
            return reached_raw, reached_pool
        finally:
            await server.stop(None)

    reached_raw, reached_pool = asyncio.run(scenario())
    assert reached_raw, "the test's own socket server should answer a raw unix-abstract target"
    assert not reached_pool


class _AnswerEverything(grpc.GenericRpcHandler):
    def service(self, handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        return grpc.unary_unary_rpc_method_handler(
            lambda request, context: b"", request_deserializer=None, response_serializer=None
        )


async def _reaches(channel: grpc.aio.Channel) -> bool:
    call = channel.unary_unary(
        "/corolla.peer.v1.Peer/Info",
        request_serializer=peer_pb2.InfoRequest.SerializeToString,
        response_deserializer=lambda data: data,
    )
    try:
        await call(peer_pb2.InfoRequest(), timeout=2.0)
    except grpc.aio.AioRpcError:
        return False
    return True
