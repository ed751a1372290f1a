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
