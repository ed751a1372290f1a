"""`ClientConfig`: how a client finds the swarm and how patient it is with peers (finite retries and bans).

Each knob is documented once (`Field(description=...)`); command lines are generated from it.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from protos.records import validate_model_id

WIRE_DTYPES = ("float32", "float16", "bfloat16")

_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    initial_peers: list[str] = Field(
        default_factory=list,
        description="DHT multiaddresses of the swarm to join (`corolla dht` and every peer print theirs)",
    )
    model_id: str | None = Field(
        default=None, description="the swarm's name for the model; default: derived from the model path"
    )
    connect_timeout: _Seconds = Field(
        default=5.0, description="seconds to join the DHT or open a stream to a peer"
    )
    step_timeout: _Seconds = Field(
        default=30.0, description="seconds to wait for the reply to one decode step or prefill"
    )
    forward_timeout: _Seconds = Field(
        default=120.0, description="seconds to wait for one stateless forward or backward through a hop"
    )
    max_retries: int = Field(
        default=5, ge=0, description="times one step or forward is retried on other peers before giving up"
    )
    ban_timeout: _Seconds = Field(
        default=15.0, description="seconds a failed peer is avoided after its first failure"
    )
    ban_backoff: float = Field(
        default=2.0,
        ge=1.0,
        allow_inf_nan=False,
        description="factor by which each further failure of a peer lengthens its ban",
    )
    max_ban_timeout: _Seconds = Field(default=300.0, description="longest ban of a peer, in seconds")
    refresh_period: _Seconds = Field(
        default=5.0, description="seconds between background reads of the peers' DHT records"
    )
    max_message_bytes: int = Field(
        default=256 * 2**20, ge=2**16, description="largest gRPC message sent or accepted"
    )
    wire_dtype: str | None = Field(
        default=None,
        description="dtype of hidden states on the wire (float32, float16, bfloat16); default: the peers'",
    )

    @field_validator("initial_peers")
    @classmethod
    def _multiaddresses(cls, peers: list[str]) -> list[str]:
        for maddr in peers:
            if not maddr.startswith("/") or "/p2p/" not in maddr:
                raise ValueError(f"{maddr!r} is not a multiaddress like /ip4/1.2.3.4/tcp/31337/p2p/Qm...")
        return peers

    @field_validator("model_id")
    @classmethod
    def _model_id(cls, model_id: str | None) -> str | None:
        return None if model_id is None else validate_model_id(model_id)

    @field_validator("wire_dtype")
    @classmethod
    def _wire_dtype(cls, dtype: str | None) -> str | None:
        if dtype is not None and dtype not in WIRE_DTYPES:
            raise ValueError(f"must be one of {', '.join(WIRE_DTYPES)}")
        return dtype

    @model_validator(mode="after")
    def _ban_limits(self) -> ClientConfig:
        if self.max_ban_timeout < self.ban_timeout:
            raise ValueError(
                f"max_ban_timeout ({self.max_ban_timeout}) must be >= ban_timeout ({self.ban_timeout})"
            )
        return self
