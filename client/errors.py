"""The client's exceptions, named by what the caller can do about them."""

from __future__ import annotations

from collections.abc import Collection, Sequence

from protos.errors import CorollaError


class SwarmError(CorollaError):
    """The swarm cannot serve the request now (nobody announces the model, blocks unserved): retry later,
    start peers, or check the initial peers and the model id."""


class NoRouteError(SwarmError):
    """Some blocks have no usable (ONLINE, not banned) peer; `missing` holds them as half-open ranges."""

    def __init__(
        self, missing: Sequence[tuple[int, int]], *, num_blocks: int, banned: Collection[str] = ()
    ) -> None:
        self.missing = list(missing)
        self.num_blocks = num_blocks
        self.banned = sorted(banned)
        message = f"no peer serves blocks {format_ranges(self.missing)} (of {num_blocks})"
        if self.banned:
            message += f"; {len(self.banned)} banned peer(s) excluded: {', '.join(self.banned)}"
        super().__init__(message)


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """Half-open ranges shown inclusively: [(10, 20), (25, 26)] -> "10..19, 25"."""
    return ", ".join(f"{start}" if end - start == 1 else f"{start}..{end - 1}" for start, end in ranges)
