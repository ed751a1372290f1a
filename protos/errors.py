"""The exceptions shared by both sides, named by what the caller can do about them."""

from __future__ import annotations


class CorollaError(Exception):
    """Base class of every error corolla raises on purpose."""


class InvalidInputError(CorollaError, ValueError):
    """The request or argument is wrong (shape, dtype, span, positions); retrying it unchanged fails again."""


class CheckpointError(CorollaError):
    """A model folder or file is missing, unreadable or does not hold the weights asked for."""


class UnsupportedModelError(CorollaError):
    """The model's architecture cannot be split into client modules and blocks by corolla."""


class PeerLimitError(InvalidInputError):
    """The request exceeds a limit of this peer (`limit`: max_length, max_batch_size, max_forward_tokens),
    not of the protocol: another peer with larger limits may take it. Peers send it as INVALID_ARGUMENT with
    the trailing metadata `LIMIT_METADATA_KEY: limit`, so clients route around the peer instead of failing."""

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


LIMIT_METADATA_KEY = "corolla-limit"  # trailing metadata of an INVALID_ARGUMENT caused by a peer's own limit
