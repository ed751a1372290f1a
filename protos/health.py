"""`grpc.health.v1` on a plaintext port of its own, for an orchestrator's probes (Kubernetes' gRPC probe
speaks no TLS, and a private swarm's peer refuses every keyless call on its data port).

The service says two things and nothing else: "" is SERVING while the process answers (liveness), and the
node's own service name is SERVING only while it serves (readiness: a peer ONLINE, a DHT node joined).
Check only: Watch streams would let a caller hold the port's few call slots.

For systemd, `notify_systemd` says the same (READY, STOPPING) through sd_notify(3).
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

logger = logging.getLogger(__name__)

LIVENESS = ""  # the overall status, as `grpc_health_probe` and Kubernetes ask by default
MAX_CONCURRENT_CALLS = 16  # probes come a few times a minute
MAX_MESSAGE_BYTES = 1024  # a HealthCheckRequest is a service name


class _CheckOnly(health.aio.HealthServicer):
    async def Watch(self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext) -> None:  # type: ignore[override]
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "health: Check only")


class HealthServer:
    """A tiny gRPC server on `host:port` answering `grpc.health.v1.Health/Check` for `LIVENESS` (SERVING once
    started) and for `service` (SERVING after `set_ready(True)`). `interceptors` admit its calls: the node's
    own call guard, so that a caller sending headers only cannot hold the port's few call slots."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        service: str,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    ) -> None:
        self.host = host
        self.requested_port = port
        self.service = service
        self.port: int | None = None
        self._servicer = _CheckOnly()
        self._server = grpc.aio.server(
            interceptors=list(interceptors),
            maximum_concurrent_rpcs=MAX_CONCURRENT_CALLS,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_concurrent_streams", 4),
                ("grpc.max_connection_idle_ms", 30_000),
                ("grpc.max_connection_age_ms", 60_000),
            ],
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._servicer, self._server)

    async def start(self) -> int:
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.port = self._server.add_insecure_port(f"{host}:{self.requested_port}")
        await self._servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self._servicer.set(self.service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.start()
        logger.info("health endpoint host=%s port=%d service=%s", self.host, self.port, self.service)
        return self.port

    async def set_ready(self, ready: bool) -> None:
        serving = health_pb2.HealthCheckResponse.SERVING
        await self._servicer.set(
            self.service, serving if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        )

    async def stop(self) -> None:
        await self._servicer.set(LIVENESS, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self._server.stop(grace=None)


def notify_systemd(**fields: str) -> bool:
    """Tell systemd how a `Type=notify` service stands (sd_notify(3)): `READY="1"` once it serves,
    `STOPPING="1"` when it drains, `STATUS=` a line for `systemctl status`. One datagram to $NOTIFY_SOCKET;
    outside such a unit (no $NOTIFY_SOCKET) it does nothing. True when the datagram went out."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address.startswith(("/", "@")):  # unset, or a vsock address this does not speak
        return False
    target = "\0" + address[1:] if address.startswith("@") else address  # "@": the abstract namespace
    message = "\n".join(f"{name}={value}" for name, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message, target)
    except OSError as e:  # systemd gone or the socket not ours: serving goes on regardless
        logger.warning("cannot notify systemd socket=%s reason=%r", address, e)
        return False
    return True
