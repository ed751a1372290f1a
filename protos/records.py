"""What peers announce in the DHT (`PeerRecord`) and the key scheme; readers drop invalid records.

Knows nothing of the DHT client itself: values go in and out as plain msgpack-serializable dicts.
"""

from __future__ import annotations

import enum
import ipaddress
import logging
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from protos.errors import InvalidInputError

logger = logging.getLogger(__name__)

MODEL_INDEX_KEY = "corolla.models"  # cannot clash with a block key: those end in ".<int>"
MAX_MODEL_ID_CHARS = 128
MAX_PINGS = 32  # pings to likely next hops, not to the whole swarm
MAX_ADAPTERS = 16
MAX_PUBLIC_NAME_CHARS = 64
MAX_CERTIFICATE_CHARS = 4096  # a TLS certificate in PEM (a peer's takes about 720)
MAX_ADDRESS_CHARS = 260  # a 253-character DNS name, ":" and a port
MAX_RELAYS = 4  # relays a relayed peer announces
MAX_RELAY_MADDR_CHARS = 256  # one relay's multiaddress with /p2p/ID/p2p-circuit

_MODEL_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_MODEL_ID_CHARS}}}")
_HOST = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")
# gRPC reads "scheme:rest" as a URI when `scheme` names one of its resolvers: "unix:8700" would dial a local
# socket, not a host. No such name is a host here, in any case (resolver lookups are not case-sensitive
# everywhere); the channel pool also dials "dns:///" explicitly.
GRPC_SCHEMES = frozenset(
    {
        "dns",
        "ipv4",
        "ipv6",
        "unix",
        "unix-abstract",
        "vsock",
        "xds",
        "google-c2p",
        "c2p",
        "passthrough",
        "fake",
    }
)
# version, quantization, adapter names and ping peer ids; pydantic searches patterns, hence the anchors
_TOKEN_PATTERN = r"^[A-Za-z0-9._+/-]+$"

_UINT32_LIMIT = 2**32  # spans travel as uint32 on the wire
_UINT64_LIMIT = 2**64

_NonNegativeFinite = Annotated[float, Field(ge=0.0, allow_inf_nan=False)]


class PeerState(enum.StrEnum):
    """Lifecycle of a peer as announced: only ONLINE peers take new sessions."""

    JOINING = "joining"
    ONLINE = "online"
    DRAINING = "draining"
    OFFLINE = "offline"


class PeerRecord(BaseModel):
    """One peer's announcement under each block key of its span (the subkey is the peer's DHT id)."""

    # strict: a value from the DHT is untrusted; "5" is not an int. The enum and the tuple accept their
    # JSON forms (a string, a list) because that is what msgpack gives back.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    state: Annotated[PeerState, Strict(False)]
    address: str = Field(max_length=MAX_ADDRESS_CHARS, description="host:port of the peer's gRPC server")
    start: int = Field(ge=0, lt=_UINT32_LIMIT, description="first block of the span")
    end: int = Field(gt=0, lt=_UINT32_LIMIT, description="one past the last block of the span")
    throughput: _NonNegativeFinite = Field(description="decode steps per second through the whole span")
    forward_throughput: _NonNegativeFinite = Field(
        default=0.0, description="tokens per second of a stateless forward through the span; 0: not measured"
    )
    batch_throughput: _NonNegativeFinite = Field(
        default=0.0,
        description="decode tokens per second through the span with 8 sessions batched; 0: not measured",
    )
    free_cache_tokens: int = Field(ge=0, lt=_UINT64_LIMIT, description="free KV-cache pages, in tokens")
    num_sessions: int = Field(default=0, ge=0, lt=_UINT32_LIMIT, description="sessions open now")
    queued: int = Field(default=0, ge=0, lt=_UINT32_LIMIT, description="compute jobs queued or running now")
    max_length: int = Field(ge=1, lt=_UINT32_LIMIT, description="longest session, in positions")
    max_batch_size: int | None = Field(
        default=None,
        ge=1,
        lt=_UINT32_LIMIT,
        description="largest batch of a session or forward; None: unknown",
    )
    max_forward_tokens: int | None = Field(
        default=None, ge=1, lt=_UINT64_LIMIT, description="largest batch x positions of a Forward/Backward"
    )
    dtype: Literal["float32", "float16", "bfloat16"]
    quantization: str = Field(default="none", min_length=1, max_length=32, pattern=_TOKEN_PATTERN)
    adapters: Annotated[
        tuple[Annotated[StrictStr, Field(min_length=1, max_length=128, pattern=_TOKEN_PATTERN)], ...],
        Strict(False),
    ] = Field(default=(), max_length=MAX_ADAPTERS)
    version: str = Field(min_length=1, max_length=64, pattern=_TOKEN_PATTERN)
    public_name: str | None = Field(default=None, max_length=MAX_PUBLIC_NAME_CHARS)
    certificate: str | None = Field(
        default=None,
        max_length=MAX_CERTIFICATE_CHARS,
        description="the TLS certificate (PEM) the peer serves with, bound to its peer id; None: plaintext",
    )
    relay_maddrs: Annotated[
        tuple[
            Annotated[
                StrictStr,
                Field(
                    min_length=1, max_length=MAX_RELAY_MADDR_CHARS, pattern=r"^/[A-Za-z0-9./_-]+/p2p-circuit$"
                ),
            ],
            ...,
        ],
        Strict(False),
    ] = Field(
        default=(),
        max_length=MAX_RELAYS,
        description="relays through which callers reach this peer (libp2p circuit addresses; its peer id is "
        "the record's subkey); empty: dial `address` directly",
    )
    pings: dict[
        Annotated[str, Field(min_length=1, max_length=128, pattern=_TOKEN_PATTERN)], _NonNegativeFinite
    ] = Field(default_factory=dict, max_length=MAX_PINGS, description="peer_id -> round trip in seconds")

    @field_validator("address")
    @classmethod
    def _check_address(cls, address: str) -> str:
        return validate_address(address)

    @field_validator("public_name")
    @classmethod
    def _check_public_name(cls, public_name: str | None) -> str | None:
        if public_name is not None and not public_name.isprintable():
            raise ValueError("public_name has non-printable characters")
        return public_name

    @model_validator(mode="after")
    def _check_span(self) -> PeerRecord:
        if self.start >= self.end:
            raise ValueError(f"span [{self.start}, {self.end}) is empty: start must be < end")
        return self


def validate_address(address: str) -> str:
    """Return `address` if it is host:port (a DNS name, IPv4, or [IPv6]; port 1..65535) and its host is no
    gRPC scheme name (`unix:8700` is a local socket to gRPC); `InvalidInputError` otherwise. Used for
    announced addresses and for the next hops a client sends."""
    if len(address) > MAX_ADDRESS_CHARS:
        raise InvalidInputError(f"address of {len(address)} characters is longer than {MAX_ADDRESS_CHARS}")
    host, sep, port = address.rpartition(":")
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise InvalidInputError(f"address {address!r} is not host:port with a port in 1..65535")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise InvalidInputError(f"address {address!r} has an invalid IPv6 host") from None
    elif not _HOST.fullmatch(host) or len(host) > 253:
        raise InvalidInputError(f"address {address!r} has an invalid host")
    elif host.lower() in GRPC_SCHEMES:
        raise InvalidInputError(f"address {address!r} names a gRPC scheme ({host}:), not a host")
    return address


def is_loopback(host: str) -> bool:
    """Whether `host` is "localhost" or a loopback IP address (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def maddr_host(maddr: object) -> str | None:
    """The IP of a direct multiaddress (`/ip4/HOST/...`, `/ip6/HOST/...`); None for anything else, a relay
    circuit included."""
    parts = str(maddr).strip("/").split("/")
    if len(parts) < 2 or parts[0] not in ("ip4", "ip6") or "p2p-circuit" in parts:
        return None
    return parts[1]


def record_to_dht(record: PeerRecord) -> dict[str, Any]:
    """A plain dict of str, int, float, list and None: what the DHT stores (msgpack-serializable)."""
    return record.model_dump(mode="json")


def record_from_dht(value: object) -> PeerRecord | None:
    """Parse a value read from the DHT; None (logged at DEBUG) for anything that is not a valid record."""
    try:
        return PeerRecord.model_validate(value)
    except ValidationError as e:
        logger.debug("dropped invalid peer record errors=%d first=%r", e.error_count(), e.errors()[0]["msg"])
        return None


def validate_model_id(model_id: str) -> str:
    """Return `model_id` if it is 1..128 chars of `[A-Za-z0-9._-]`; `InvalidInputError` otherwise."""
    if not isinstance(model_id, str) or not _MODEL_ID.fullmatch(model_id):
        raise InvalidInputError(
            f"invalid model_id {model_id!r}: use 1..{MAX_MODEL_ID_CHARS} characters of [A-Za-z0-9._-]"
        )
    return model_id


def is_hub_name(path_or_name: str) -> bool:
    """Whether a string reads as a hub name: exactly one "/", not starting with "/", "." or "~", and naming
    nothing on disk."""
    text = path_or_name.rstrip("/")
    return (
        text.count("/") == 1
        and not text.startswith((".", "~", "/"))
        and not Path(path_or_name).expanduser().exists()
    )


def model_id_from_name(path_or_name: str) -> str:
    """A model id from the spelling alone: a hub name "org/name" -> "org--name", a path its last component."""
    text = path_or_name.rstrip("/")
    return validate_model_id(text.replace("/", "--") if is_hub_name(path_or_name) else Path(text).name)


def model_id_from_path(path_or_name: str) -> str:
    """The swarm's id of a model folder or hub name, from the checkpoint's own identity
    (`protos.model_id.derive_model_id`: the same for a hub name, its hub cache folder and a prepared
    folder's copies; a plain folder by its content)."""
    from protos.model_id import derive_model_id  # it reads checkpoints and imports this module

    return derive_model_id(path_or_name).model_id


def block_key(model_id: str, block: int) -> str:
    """DHT key of one block of a model: `{model_id}.{block}`, blocks numbered globally from 0."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 0:
        raise InvalidInputError(f"block must be an int >= 0, got {block!r}")
    return f"{validate_model_id(model_id)}.{block}"
