"""corolla's client library: run a model whose blocks are served by a swarm as if it were local.

    from client import AutoDistributedModelForCausalLM
    model = AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=[...])

Names are imported on first use, so `import client.config` stays light (no torch or transformers).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from client.config import ClientConfig
    from client.errors import NoRouteError, PeerFailure, SwarmError, SwarmUnavailableError
    from client.model import (
        AutoDistributedModelForCausalLM,
        AutoDistributedModelForSequenceClassification,
    )
    from client.session import InferenceSession
    from client.swarm import SwarmConnection
    from protos.errors import CorollaError, InvalidInputError

__all__ = [
    "AutoDistributedModelForCausalLM",
    "AutoDistributedModelForSequenceClassification",
    "ClientConfig",
    "CorollaError",
    "InferenceSession",
    "InvalidInputError",
    "NoRouteError",
    "PeerFailure",
    "SwarmConnection",
    "SwarmError",
    "SwarmUnavailableError",
]

_MODULES = {
    "AutoDistributedModelForCausalLM": "client.model",
    "AutoDistributedModelForSequenceClassification": "client.model",
    "ClientConfig": "client.config",
    "CorollaError": "protos.errors",
    "InferenceSession": "client.session",
    "InvalidInputError": "protos.errors",
    "NoRouteError": "client.errors",
    "PeerFailure": "client.errors",
    "SwarmConnection": "client.swarm",
    "SwarmError": "client.errors",
    "SwarmUnavailableError": "client.errors",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module 'client' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
