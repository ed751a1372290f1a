"""The client's exceptions, named by what the caller can do about them, and the one failure policy: what a
session or a stateless pass does when a peer answers with a status code (`action`), and how long it waits
before the next try (`backoff_delay`)."""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import grpc

from protos.errors import CorollaError, InvalidInputError

if TYPE_CHECKING:
    from client.config import ClientConfig
    from client.discovery import BanList

logger = logging.getLogger(__name__)


class SwarmError(CorollaError):
    """The swarm cannot serve the request now (nobody announces the model, blocks unserved): retry later,
    start peers, or check the initial peers and the model id."""


class SwarmUnavailableError(SwarmError):
    """The swarm could not serve the request within the retry budget (`ClientConfig.max_retries`)."""


class NoRouteError(SwarmError):
    """Some blocks have no usable (ONLINE, not banned) peer; `missing` holds them as half-open ranges."""

    def __init__(
        self,
        missing: Sequence[tuple[int, int]],
        *,
        num_blocks: int,
        banned: Collection[str] = (),
        too_small: Collection[str] = (),
        adapter: str = "",
        adapters: Collection[str] = (),
    ) -> None:
        self.missing = list(missing)
        self.adapter = adapter  # the LoRA adapter the request named ("" none)
        self.num_blocks = num_blocks
        self.banned = sorted(banned)
        self.too_small = sorted(too_small)  # peers whose announced limits cannot take the request
        message = f"no peer serves blocks {format_ranges(self.missing)} (of {num_blocks})"
        if adapter:
            offered = ", ".join(sorted(adapters)[:16]) or "none"
            message += f" with adapter {adapter!r} (adapters this swarm serves: {offered})"
        if self.banned:
            message += f"; {len(self.banned)} banned peer(s) excluded: {', '.join(self.banned)}"
        if self.too_small:
            message += (
                f"; {len(self.too_small)} peer(s) announce limits (max_length, batch, free cache) too small "
                f"for this request: {', '.join(self.too_small)}"
            )
        super().__init__(message)


class PeerFailure(CorollaError):
    """A peer failed a request with `code` (see the contract in protos/peer.proto); `limit` names the peer's
    own limit when it refused a request that a peer with larger limits could take; `relayed` marks a code
    that a hop relayed from its push to `peer_id` (the client's own request was accepted by the hop)."""

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        peer_id: str,
        *,
        limit: str | None = None,
        relayed: bool = False,
    ) -> None:
        super().__init__(f"{code.name} from peer {short_id(peer_id)}: {message}")
        self.code = code
        self.detail = message
        self.peer_id = peer_id
        self.limit = limit
        self.relayed = relayed


class Action(enum.Enum):
    """What the client does after a peer's failure."""

    BAN = "ban"  # the peer is down, stuck or misbehaving: avoid it for a while, replace its hop, replay
    AVOID = "avoid"  # the peer cannot take this request (full, too small): use another for this one only
    REOPEN = "reopen"  # the peer lost or misaligned the session: open it again there and replay
    RAISE = "raise"  # the request is wrong: retrying it anywhere fails again


# The one table (DESIGN.md "Failure handling"); any code not listed is treated like UNAVAILABLE.
FAILURE_POLICY: dict[grpc.StatusCode, Action] = {
    grpc.StatusCode.UNAVAILABLE: Action.BAN,
    grpc.StatusCode.DEADLINE_EXCEEDED: Action.BAN,
    grpc.StatusCode.INTERNAL: Action.BAN,
    grpc.StatusCode.UNKNOWN: Action.BAN,
    grpc.StatusCode.CANCELLED: Action.BAN,
    grpc.StatusCode.RESOURCE_EXHAUSTED: Action.AVOID,
    grpc.StatusCode.NOT_FOUND: Action.REOPEN,
    grpc.StatusCode.FAILED_PRECONDITION: Action.REOPEN,
    grpc.StatusCode.INVALID_ARGUMENT: Action.RAISE,
}


def action(failure: PeerFailure) -> Action:
    """What to do after `failure`: the table, except that a refusal for the peer's own limit is avoided, an
    INVALID_ARGUMENT relayed from a push is the next hop's fault (the first hop accepted the request), and
    a relayed PERMISSION_DENIED is how a peer refuses a push to a session it does not hold (it says the
    same for an unknown id and a wrong token; the client's tokens are right), so that hop is reopened."""
    if failure.code == grpc.StatusCode.INVALID_ARGUMENT and failure.limit is not None:
        return Action.AVOID
    if failure.relayed and failure.code == grpc.StatusCode.INVALID_ARGUMENT:
        return Action.BAN
    if failure.relayed and failure.code == grpc.StatusCode.PERMISSION_DENIED:
        return Action.REOPEN
    return FAILURE_POLICY.get(failure.code, Action.BAN)


def backoff_delay(attempt: int, *, retry_delay: float, max_retry_delay: float) -> float:
    """Seconds to wait before retry number `attempt` (1, 2, ...): doubling from `retry_delay`, capped."""
    return min(retry_delay * 2 ** max(attempt - 1, 0), max_retry_delay)


class Retries:
    """The failures of one request (a step, a forward, a backward) under the policy: each failure bans or
    avoids its peer, or raises when it is the caller's; a swarm that cannot be routed now is waited for
    with backoff; past `config.max_retries` failures the request ends with `SwarmUnavailableError`."""

    def __init__(self, config: ClientConfig, bans: BanList, *, what: str) -> None:
        self.config = config
        self.bans = bans
        self.what = what
        self.failures: list[CorollaError] = []
        self.avoided: set[str] = set()  # peers that cannot take this request, tried no more for it

    def excluded(self) -> frozenset[str]:
        """Peers not to plan for this request: banned ones and those it avoids."""
        return frozenset(self.bans.banned() | self.avoided)

    async def failed(self, error: PeerFailure | SwarmError) -> Action | None:
        """Apply the policy to `error`; returns the action taken on a peer (None for a swarm error, after
        its backoff). Raises `InvalidInputError` for the caller's errors, `SwarmUnavailableError` when the
        retries are spent."""
        taken = None
        if isinstance(error, PeerFailure):
            taken = action(error)
            if taken is Action.RAISE:
                raise InvalidInputError(str(error)) from error
            if taken is Action.BAN:
                self.bans.ban(error.peer_id, error.code.name)
            elif taken is Action.AVOID:
                self.avoided.add(error.peer_id)
        self.failures.append(error)
        if len(self.failures) > self.config.max_retries:
            if isinstance(error, SwarmError):
                raise error  # it says best what is missing (e.g. the blocks nobody serves)
            last = "; ".join(map(str, self.failures[-3:]))
            raise SwarmUnavailableError(
                f"{self.what} gave up after {len(self.failures)} failures: {last}"
            ) from error
        logger.warning("%s retry attempt=%d reason=%s", self.what, len(self.failures), error)
        if taken is None:  # the view may miss peers (a stalled DHT replica, peers still joining): wait
            delay = backoff_delay(
                len(self.failures),
                retry_delay=self.config.retry_delay,
                max_retry_delay=self.config.max_retry_delay,
            )
            await asyncio.sleep(delay)
        return taken


def status_code(value: int) -> grpc.StatusCode:
    """The status code with the numeric `value` (as a StepError carries it); UNKNOWN for any other."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)


_CODES = {code.value[0]: code for code in grpc.StatusCode}


def short_id(peer_id: str) -> str:
    """How logs and messages name a peer: the last 8 characters of its id."""
    return f"...{peer_id[-8:]}"


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """Half-open ranges shown inclusively: [(10, 20), (25, 26)] -> "10..19, 25"."""
    return ", ".join(f"{start}" if end - start == 1 else f"{start}..{end - 1}" for start, end in ranges)
