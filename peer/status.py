"""Failures to gRPC statuses, in one place: `status_of` maps every error a request can end with (see the
contract in protos/peer.proto), and `aborts_on_error` ends a unary call with it."""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple, TypeVar

import grpc
import torch

from peer.cache import RollbackTooFar
from peer.requests import PositionMismatch, PushRefused
from peer.scheduler import Expired, Overloaded
from peer.sessions import NoRoom, SessionExists
from protos import peer_pb2
from protos.errors import LIMIT_METADATA_KEY, InvalidInputError, PeerLimitError
from protos.tensors import to_message

logger = logging.getLogger(__name__)


class RequestError(Exception):
    """A request that fails with a given status (draining, closed session, failed push); nothing changed."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def encode_output(output: torch.Tensor, dtype: torch.dtype) -> peer_pb2.Tensor:
    """This peer's own result as a wire message. A result the wire cannot carry (non-finite values in the
    int8 format) is the peer's fault, not the caller's: INTERNAL, so the client moves to another peer."""
    try:
        return to_message(output, dtype=dtype)
    except InvalidInputError as e:
        raise RequestError(grpc.StatusCode.INTERNAL, f"this peer's output cannot be sent: {e}") from None


class Status(NamedTuple):
    """What a failed call or stream ends with; `context.abort(*status)` sends it."""

    code: grpc.StatusCode
    message: str
    metadata: tuple[tuple[str, str], ...] = ()  # trailing metadata of the failed call


def status_of(error: BaseException) -> Status:
    """The one place that maps failures to gRPC status codes (see the contract in protos/peer.proto)."""
    if isinstance(error, RequestError):
        return Status(error.code, str(error))
    if isinstance(error, PeerLimitError):  # names the limit, so the client can route around this peer
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(error), ((LIMIT_METADATA_KEY, error.limit),))
    if isinstance(error, InvalidInputError):
        return Status(grpc.StatusCode.INVALID_ARGUMENT, str(error))
    if isinstance(error, PushRefused):  # the same answer for an unknown session and a wrong token
        return Status(grpc.StatusCode.PERMISSION_DENIED, str(error))
    if isinstance(error, PositionMismatch | RollbackTooFar):  # the client reopens and replays
        return Status(grpc.StatusCode.FAILED_PRECONDITION, str(error))
    if isinstance(error, NoRoom | Overloaded):  # full, over a quota or too busy: another peer may serve it
        return Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(error))
    if isinstance(error, Expired):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, str(error))
    if isinstance(error, SessionExists):
        return Status(grpc.StatusCode.ALREADY_EXISTS, str(error))
    if isinstance(error, asyncio.TimeoutError | TimeoutError):
        return Status(grpc.StatusCode.DEADLINE_EXCEEDED, "timed out")
    logger.error("internal error while serving a request", exc_info=error)
    return Status(grpc.StatusCode.INTERNAL, f"internal error: {type(error).__name__}")


_Reply = TypeVar("_Reply")
_Unary = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_Reply]]


def aborts_on_error(method: _Unary[_Reply]) -> _Unary[_Reply]:
    """A unary RPC whose failures end the call with the status `status_of` maps them to."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _Reply:
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise
        except Exception as e:  # mapped to a status in one place
            status = status_of(e)
        # gRPC keeps an aborted call's AbortError in a reference cycle with the frames it went through, so
        # whatever they hold lives until the garbage collector runs: abort outside the `except` (the error's
        # traceback holds the handler's frames) and without the request (a refused push may be 64 MiB)
        del request
        await context.abort(*status)
        raise RuntimeError("unreachable: context.abort raises")

    return wrapper
