"""The swarm key of a private swarm: one 32-byte secret that every member holds in a file (mode 0600), and
what is derived from it: the DHT authorizer (hivemind's `authorizer` hook) and the token each gRPC call
carries. Knows nothing of records, models or sessions.

    swarm key ──HMAC("dht")──▶ DHT key: an HMAC over every DHT request and response (+ time, nonce)
              ──HMAC("grpc")─▶ gRPC key ──HMAC(server's certificate)──▶ token in each call's metadata
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from hivemind.utils.auth import AuthorizedRequestBase, AuthorizedResponseBase, AuthorizerBase
from hivemind.utils.timed_storage import TimedStorage, get_dht_time

from protos.errors import CorollaError
from protos.identity import private_file_problem

logger = logging.getLogger(__name__)

KEY_BYTES = 32
MAX_KEY_FILE_BYTES = 1024  # a key file is 65 bytes; anything much larger is not one
METADATA_KEY = "corolla-swarm-auth"  # gRPC metadata of every call inside a private swarm
MAX_CLOCK_SKEW = 60.0  # seconds a DHT request's time may differ from the receiver's clock
NONCE_BYTES = 16
MAX_NONCES = 1 << 17  # replay cache of one DHT node (~1000 requests/s over the 2-minute window)
LOG_PERIOD = 60.0  # seconds between two log lines for the same kind of refusal
_REQUEST, _RESPONSE = b"corolla-dht-request\x00", b"corolla-dht-response\x00"
HELP = (
    "file holding a private swarm's key (`corolla keygen FILE`): only nodes holding it can join the DHT and "
    "call the peers; none: an open swarm"
)


class SwarmKeyError(CorollaError):
    """A swarm key file that cannot be used (missing, readable by others, not a key, or already there)."""


@dataclass(frozen=True)
class SwarmKey:
    """A private swarm's shared secret (never logged: `fingerprint` names it)."""

    secret: bytes = field(repr=False)
    path: Path | None = None

    def __post_init__(self) -> None:
        if len(self.secret) != KEY_BYTES:
            raise SwarmKeyError(f"a swarm key has {KEY_BYTES} bytes, not {len(self.secret)}")

    @classmethod
    def create(cls, path: Path) -> SwarmKey:
        """A new random key written to `path` (mode 0600, as hex); an existing file is never overwritten."""
        path = Path(path).expanduser()
        key = cls(secrets.token_bytes(KEY_BYTES), path)
        try:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            raise SwarmKeyError(f"{path} exists: a swarm key is never overwritten") from None
        except OSError as e:
            raise SwarmKeyError(f"cannot create {path}: {e.strerror}") from None
        with os.fdopen(descriptor, "w") as file:
            file.write(key.secret.hex() + "\n")
        return key

    @classmethod
    def load(cls, path: Path) -> SwarmKey:
        """The key in `path`; refused when others may read the file (like an ssh key)."""
        path = Path(path).expanduser()
        try:
            problem = private_file_problem(path)
            if problem is not None:
                raise SwarmKeyError(f"swarm key file {problem}")
            with path.open("rb") as file:
                content = file.read(MAX_KEY_FILE_BYTES + 1)
        except OSError as e:
            raise SwarmKeyError(f"cannot read swarm key file {path}: {e.strerror}") from None
        text = content.decode("ascii", errors="replace").strip()
        if len(content) > MAX_KEY_FILE_BYTES or len(text) != 2 * KEY_BYTES:
            raise SwarmKeyError(f"{path} is not a swarm key ({2 * KEY_BYTES} hex digits; `corolla keygen`)")
        try:
            return cls(bytes.fromhex(text), path)
        except ValueError:
            raise SwarmKeyError(f"{path} is not a swarm key ({2 * KEY_BYTES} hex digits)") from None

    @classmethod
    def check_file(cls, path: Path | None) -> Path | None:
        """`path` when it holds a usable key, else ValueError: a config's validator, so a bad file fails
        at the command line (named by its option)."""
        if path is not None:
            try:
                cls.load(path)
            except SwarmKeyError as e:
                raise ValueError(str(e)) from None
        return path

    def derive(self, label: str) -> bytes:
        """A sub-key for one use: no two uses (DHT, gRPC) ever share a key."""
        return hmac.new(self.secret, b"corolla-swarm-key-v1\x00" + label.encode(), hashlib.sha256).digest()

    @property
    def fingerprint(self) -> str:
        """A short public name of the key, for logs: members of one swarm show the same one."""
        return self.derive("fingerprint")[:6].hex()

    def dht_authorizer(self) -> SwarmAuthorizer:
        return SwarmAuthorizer(self.derive("dht"))

    def grpc_token(self, certificate: bytes) -> str:
        """What a call to the server holding `certificate` (PEM, as its record announces it) carries.

        Bound to the server's certificate rather than one token for the whole swarm: a token only ever
        travels inside TLS to that server, and is worth nothing at any other (the certificate is new at
        each start of a peer); it costs one HMAC per channel, none per call."""
        return hmac.new(self.derive("grpc"), certificate.strip(), hashlib.sha256).hexdigest()


class _Refusals:
    """Counts refusals and logs each kind at most once per `LOG_PERIOD`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self._logged: dict[str, float] = {}

    def __call__(self, reason: str) -> bool:
        self.count += 1
        now = time.monotonic()
        if now - self._logged.get(reason, -LOG_PERIOD) >= LOG_PERIOD:
            self._logged[reason] = now
            logger.warning("%s refused: %s (refused so far: %d)", self.what, reason, self.count)
        return False


class SwarmAuthorizer(AuthorizerBase):
    """hivemind's DHT authorizer for a private swarm: every request carries an HMAC (with the swarm's DHT
    key) over itself, its time and a random nonce; every response an HMAC over itself and the request's
    nonce. A node without the key gets no answer from members and ignores theirs, so it never bootstraps,
    reads, writes, or enters a member's routing table; a replayed or stale request is dropped."""

    def __init__(self, key: bytes, *, max_clock_skew: float = MAX_CLOCK_SKEW) -> None:
        self._key = key
        self.max_clock_skew = max_clock_skew
        # nonces seen within the time window; past MAX_NONCES the oldest go first (only members fill it)
        self._nonces: TimedStorage[bytes, None] = TimedStorage(maxsize=MAX_NONCES)
        self.refused = _Refusals("dht request")
        self._refused_responses = _Refusals("dht response")

    def _mac(self, kind: bytes, message: Any) -> bytes:
        payload = kind + message.SerializeToString(deterministic=True)
        return hmac.new(self._key, payload, hashlib.sha256).digest()

    async def sign_request(self, request: AuthorizedRequestBase, service_public_key: Any) -> None:
        auth = request.auth
        auth.time = get_dht_time()
        auth.nonce = secrets.token_bytes(NONCE_BYTES)
        auth.signature = b""
        auth.signature = self._mac(_REQUEST, request)

    async def validate_request(self, request: AuthorizedRequestBase) -> bool:
        auth = request.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(signature, self._mac(_REQUEST, request)):
            return self.refused("no valid swarm key (a node outside this private swarm)")
        now = get_dht_time()
        if abs(auth.time - now) > self.max_clock_skew:
            return self.refused(f"a time more than {self.max_clock_skew:.0f} s off (clocks apart? a replay?)")
        if len(auth.nonce) != NONCE_BYTES or auth.nonce in self._nonces:
            return self.refused("a replayed request")
        self._nonces.store(auth.nonce, None, auth.time + self.max_clock_skew)
        return True

    async def sign_response(self, response: AuthorizedResponseBase, request: AuthorizedRequestBase) -> None:
        auth = response.auth
        auth.nonce = request.auth.nonce
        auth.signature = b""
        auth.signature = self._mac(_RESPONSE, response)

    async def validate_response(
        self, response: AuthorizedResponseBase, request: AuthorizedRequestBase
    ) -> bool:
        auth = response.auth
        signature, auth.signature = auth.signature, b""
        if not hmac.compare_digest(signature, self._mac(_RESPONSE, response)):
            return self._refused_responses("no valid swarm key (a node outside this private swarm)")
        if not hmac.compare_digest(auth.nonce, request.auth.nonce):
            return self._refused_responses("an answer to another request")
        return True


async def _refuse(requests: Any, context: grpc.aio.ServicerContext) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a member of this private swarm")


# The refusal of every method, unary or not: gRPC reads a unary request whole before its handler runs, so
# a unary refusal would wait for a message a stranger need never send, holding a call slot meanwhile. A
# request-streaming handler that never reads ends the call at once (on the wire both are the same stream).
_REFUSAL = grpc.stream_unary_rpc_method_handler(_refuse)  # no deserializer: nothing is read anyway


class SwarmGuard(grpc.aio.ServerInterceptor):
    """Ends every call without this server's swarm token (`SwarmKey.grpc_token`) with UNAUTHENTICATED before
    its request is read or any handler runs. Every RPC, `Info` included: a stranger learns nothing, and
    holds no call slot beyond the moment its headers are checked."""

    def __init__(self, token: str) -> None:
        self._token = token.encode()
        self.refused = _Refusals("grpc call")

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if self.allows(handler_call_details.invocation_metadata or ()):  # type: ignore[attr-defined]
            return handler
        self.refused("no valid swarm token (a caller outside this private swarm)")
        return _REFUSAL

    def allows(self, metadata: Sequence[tuple[str, str | bytes]]) -> bool:
        tokens = [value for key, value in metadata if key == METADATA_KEY]
        return any(
            hmac.compare_digest(token.encode() if isinstance(token, str) else token, self._token)
            for token in tokens
        )


def keygen_main(argv: Sequence[str], prog: str) -> int:
    """`corolla keygen FILE`: a new random swarm key in FILE (mode 0600); refuses to overwrite one."""
    from protos.cli import add_log_level, emit  # the command table imports this module lazily: no cycle

    parser = argparse.ArgumentParser(
        prog=prog,
        description="Write a new random swarm key to FILE (mode 0600) for a private swarm: give the file, "
        "over a private channel, to every node and client (--swarm-key FILE on corolla dht, serve, "
        "generate, api, monitor and health). An existing file is never overwritten.",
    )
    parser.add_argument("file", metavar="FILE", type=Path, help="where to write the key")
    add_log_level(parser)
    args = parser.parse_args(list(argv))
    try:
        key = SwarmKey.create(args.file)
    except SwarmKeyError as e:
        parser.exit(1, f"{prog}: {e}\n")
    emit(f"swarm key written to {args.file} (fingerprint {key.fingerprint})")
    return 0
