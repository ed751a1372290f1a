"""`PeerConfig` and `DhtConfig`: everything `corolla serve` and `corolla dht` can be told, each knob
documented once; the CLI is generated from them. Import-light: no model code, no compute."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from protos import swarm_key
from protos.errors import InvalidInputError
from protos.records import model_id_from_path, validate_address, validate_model_id
from protos.settings import MULTIADDRESSES, Choices, Option
from protos.tensors import FLOAT_DTYPE_NAMES
from protos.validation import MAX_RECORD_TTL

DEVICE_PATTERN = r"^(auto|cpu|mps|cuda(:[0-9]{1,2})?)$"
DEVICE_OPTION = Option(metavar="{auto,cpu,cuda,cuda:N,mps}")
DEVICE_HELP = (
    "where weights, KV caches and compute live: auto (a CUDA GPU, else Apple's mps, else the CPU), cpu, "
    "cuda, cuda:N or mps; hidden states cross to and from it once per step"
)
QUANT_MODES = ("none", "int8")
QUANT_HELP = (
    "weights of the hosted blocks: none (as loaded: the exact path), int8 (int8 linear layers with a "
    "scale per output channel, CPU and float32 only: half the weight memory, decode about 3x faster on "
    "large layers, none on small ones like SmolLM2-135M's; outputs are no longer exact, so clients use "
    "such peers only when they pass quant='any' or 'int8')"
)
NAT_PORT_MAP_HELP = "ask the home router for a port mapping (UPnP/NAT-PMP); off unless asked"
RELAY_HELP = (
    "libp2p circuit relays: a public peer relays for peers nobody can dial (at most 16 circuits per peer; "
    "each carries 128 KiB each way and lasts 2 minutes, and relayed connections resume on new ones), and a "
    "peer the swarm cannot dial back serves through the relays of its --initial-peers; --no-relay does "
    "neither (an unreachable peer then stops with an error naming the fix)"
)
HOST_HELP = (
    "address to listen on; 127.0.0.1 by default: serving other machines (0.0.0.0) is an explicit choice"
)
IDENTITY_HELP = (
    "file holding the node's DHT private key, created if missing; keeps its id and multiaddress stable"
)
WILDCARD_HOSTS = ("0.0.0.0", "::")  # every interface: the announced address is learnt from the swarm
MIN_CLIENT_CALLS = 64  # the default per-client call cap never goes below this: one honest peer's burst
LOG_FORMAT_HELP = "logs on stderr as text lines, or as one JSON object per line (for log collectors)"
HEALTH_PORT_HELP = (
    "serve grpc.health.v1 Check in plaintext on HEALTH_HOST:PORT for an orchestrator's probes (Kubernetes' "
    "grpc probe): service '' is SERVING while the process answers, service 'corolla' while it serves; off "
    "by default"
)
HEALTH_HOST_HELP = "address the health endpoint listens on; 127.0.0.1 by default (a kubelet needs 0.0.0.0)"


def parse_option(value: str) -> str | float:
    """`--throughput`: `auto`, `eval`, or a positive number of decode steps per second through one block."""
    if value in ("auto", "eval"):
        return value
    try:
        number = float(value)
    except ValueError:
        raise InvalidInputError(f"throughput must be auto, eval or a number, got {value!r}") from None
    if not number > 0 or number == float("inf"):
        raise InvalidInputError(f"throughput must be a positive finite number, got {value!r}")
    return number


class PeerConfig(BaseModel):
    """The peer's settings (`corolla serve`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    # the groups of `corolla serve --help`, by topic
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("model_id", "dtype", "device", "num_threads", "quant", "adapters", "max_lora_rank"),
        "swarm": (
            "initial_peers", "new_swarm", "blocks", "span_length", "public_name", "throughput", "bandwidth",
            "balance_period", "balance_margin", "announce_period", "ping_period",
        ),
        "network": (
            "host", "port", "announce_host", "dht_port", "nat_port_map", "relay", "push_stream",
            "push_stream_period",
        ),
        "security": ("identity", "swarm_key", "insecure"),
        "cache and sessions": (
            "max_cache_tokens", "page_tokens", "max_sessions", "max_length", "session_timeout",
            "first_step_timeout", "preempt_idle_timeout",
        ),
        "limits per client and network": (
            "max_client_sessions", "max_client_cache_tokens", "max_network_sessions",
            "max_network_cache_tokens", "max_client_calls", "max_client_receives",
            "max_client_pending_push_bytes", "max_client_push_streams",
        ),
        "limits": (
            "max_batch_size", "max_forward_tokens", "max_message_bytes", "max_pending_pushes",
            "max_pending_push_bytes", "max_queued_replies", "stalled_stream_timeout", "max_concurrent_rpcs",
            "request_timeout", "max_receives", "max_connections", "handshake_timeout",
            "max_stateless_in_flight", "max_push_streams", "max_push_stream_queue", "connection_idle_timeout",
            "connection_age_timeout", "step_timeout",
        ),
        "compute": (
            "max_batch_tokens", "inline_step_ms", "prefill_chunk_tokens", "compute_chunk_tokens",
            "max_kept_bytes", "kept_timeout", "max_backward_bytes",
        ),
        "operations": (
            "drain_timeout", "cache_dir", "metrics_port", "metrics_host", "health_port", "health_host",
            "log_format", "ready_file",
        ),
    }  # fmt: skip

    model: str = Field(
        description="checkpoint folder (config + safetensors), or a hub name where a hub is reachable"
    )
    initial_peers: Annotated[list[str], MULTIADDRESSES] = Field(
        default_factory=list,
        description="DHT multiaddresses of the swarm to join (`corolla dht` prints them); give these or "
        "--new-swarm",
    )
    new_swarm: bool = Field(
        default=False,
        description="start a new swarm instead of joining one (no --initial-peers): the peer logs the "
        "multiaddresses others pass as --initial-peers to join it",
    )
    blocks: str | None = Field(
        default=None,
        description="the span of blocks to serve, START:END (half-open, global block numbers); fixed: the "
        "peer never moves. Give this or --num-blocks",
    )
    span_length: Annotated[int, Field(ge=1)] | Literal["auto"] | None = Field(
        default=None,
        validation_alias=AliasChoices("num_blocks", "span_length"),
        description="serve this many blocks where the swarm needs them most (read from the DHT), and move "
        "when the swarm changes; auto: as many as fit the device's free memory with "
        "their share of --max-cache-tokens (logged at start). Give this or --blocks",
    )
    host: str = Field(default="127.0.0.1", description=HOST_HELP)
    port: int = Field(default=0, ge=0, le=65535, description="gRPC port; 0 picks a free one")
    announce_host: str | None = Field(
        default=None,
        description="address other peers and clients use to reach this peer; default: --host, or when --host "
        "is 0.0.0.0 or :: (every interface; :: takes IPv4 and IPv6) the address the swarm sees this peer at. "
        "Before going online the peer asks up to 5 swarm members to dial it back there. With a fixed "
        "--dht-port, the peer's DHT node announces this address too (a container's published ports)",
    )
    dht_port: int = Field(
        default=0, ge=0, le=65535, description="TCP port of this peer's DHT node; 0 picks one"
    )
    identity: Path | None = Field(default=None, description=IDENTITY_HELP)
    swarm_key: Path | None = Field(default=None, description=swarm_key.HELP)
    nat_port_map: bool = Field(
        default=False,
        description="ask the home router for port mappings: the DHT port (UPnP/NAT-PMP) and the gRPC port "
        "(NAT-PMP), whose mapping is then the announced address unless --announce-host is given; off unless "
        "asked",
    )
    relay: bool = Field(default=True, description=RELAY_HELP)
    insecure: bool = Field(
        default=False,
        description="serve plaintext gRPC instead of TLS (only for tests and trusted networks); clients then "
        "need insecure=True, and a secure client never routes through this peer",
    )
    dtype: Annotated[str, Choices("auto", *FLOAT_DTYPE_NAMES)] = Field(
        default="auto",
        description=f"dtype of weights and activations: auto (float32 on the CPU, bfloat16 or float16 on a "
        f"GPU), {', '.join(FLOAT_DTYPE_NAMES)}",
    )
    device: Annotated[str, DEVICE_OPTION] = Field(
        default="auto", pattern=DEVICE_PATTERN, description=DEVICE_HELP
    )
    num_threads: int | None = Field(
        default=None,
        ge=1,
        le=1024,
        description="CPU threads torch computes with; default: torch's choice (one per core). Several peers "
        "sharing a machine may each take cores / peers",
    )
    quant: Annotated[str, Choices(*QUANT_MODES)] = Field(default="none", description=QUANT_HELP)
    adapters: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="LoRA adapters to serve, each a PEFT folder (adapter_config.json + "
        "adapter_model.safetensors) as DIR or NAME=DIR (default name: the folder's); only the hosted blocks' "
        "weights load. Clients ask for one by name (active_adapter=, or the gateway's model field)",
    )
    max_lora_rank: int = Field(
        default=64,
        ge=1,
        le=1024,
        description="largest rank of a client's own LoRA module that a Forward or Backward may carry",
    )
    model_id: str = Field(
        default="",
        description="the swarm's name for this model; default: derived from the checkpoint (a hub name, or "
        "its hub cache folder, gives org--name; a folder from prepare-model its source; any other folder a "
        "hash of its config and weights, equal for copies), printed at start",
    )
    public_name: str | None = Field(
        default=None, max_length=64, description="a name shown to others in `corolla health` (e.g. a website)"
    )
    max_cache_tokens: int = Field(
        default=16384,
        ge=1,
        description="KV-cache pool in tokens over all sessions (batch x positions), split into pages of "
        "--page-tokens; a session takes pages as it grows, so its max_length is a limit, not a reservation; "
        "when pages run out the least recently used idle session is preempted (its client moves it)",
    )
    page_tokens: int = Field(
        default=16, ge=1, le=4096, description="positions of one batch row per KV-cache page"
    )
    max_sessions: int = Field(
        default=256, ge=1, description="sessions open at once over all clients; more are refused"
    )
    max_client_sessions: int = Field(
        default=32,
        ge=1,
        description="sessions one client (one IPv4 address or IPv6 /64) may hold open here; more are refused "
        "with RESOURCE_EXHAUSTED",
    )
    max_client_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        description="cache tokens one client may hold here over all its sessions; default: half of "
        "--max-cache-tokens, so one client cannot take the whole pool",
    )
    first_step_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds an opened session may wait for its first step; then it is closed",
    )
    max_network_sessions: int = Field(
        default=64,
        ge=1,
        description="sessions the clients of one network (an IPv4 /24 or IPv6 /48) may hold open here "
        "together, so a host with many addresses counts about once; more are refused with RESOURCE_EXHAUSTED",
    )
    max_network_cache_tokens: int | None = Field(
        default=None,
        ge=1,
        description="cache tokens the clients of one network (an IPv4 /24 or IPv6 /48) may hold here "
        "together; default: what one client may hold (--max-client-cache-tokens)",
    )
    preempt_idle_timeout: float = Field(
        default=30.0,
        gt=0,
        description="seconds without a step after which a session counts as idle: when the peer holds "
        "--max-sessions, a new session preempts the oldest idle session of the network holding the most, if "
        "that network holds more than an even share and at least two more than the newcomer's; the preempted "
        "session ends with RESOURCE_EXHAUSTED and its client moves it to another peer",
    )
    max_batch_size: int = Field(default=16, ge=1, description="largest batch one session or forward may send")
    max_length: int = Field(
        default=8192,
        ge=1,
        validation_alias=AliasChoices("max_length", "max_model_len"),
        description="longest session (prompt + generated positions)",
    )
    max_forward_tokens: int = Field(
        default=16384, ge=1, description="largest batch x sequence one stateless Forward/Backward may send"
    )
    max_message_bytes: ByteSize = Field(
        default=ByteSize(64 * 2**20),
        ge=2**16,
        description="largest gRPC message accepted; larger ones are refused",
    )
    max_pending_pushes: int = Field(
        default=4,
        ge=1,
        description="pushed steps one session may have queued; more are refused with RESOURCE_EXHAUSTED",
    )
    max_pending_push_bytes: ByteSize = Field(
        default=ByteSize(256 * 2**20),
        ge=1,
        description="bytes of pushed steps queued (received, not yet run) over all sessions; more are "
        "refused with RESOURCE_EXHAUSTED (one push is taken whatever its size when nothing else is queued)",
    )
    max_client_pending_push_bytes: ByteSize = Field(
        default=ByteSize(32 * 2**20),
        ge=1,
        description="bytes of pushed steps queued for the sessions of one client (the address that opened "
        "them); more are refused with RESOURCE_EXHAUSTED (one push is taken whatever its size when nothing "
        "else of the client's is queued). Raise it for a client that prefills many sessions at once",
    )
    max_queued_replies: int = Field(
        default=8,
        ge=1,
        description="replies queued on one session stream; a client that does not read stalls its own "
        "session",
    )
    stalled_stream_timeout: float = Field(
        default=60.0,
        gt=0,
        description="seconds a session stream's reply queue may stay full (its client reads nothing) before "
        "the stream ends with RESOURCE_EXHAUSTED and its sessions close, freeing their cache and queued "
        "pushes",
    )
    max_concurrent_rpcs: int = Field(
        default=1024,
        ge=1,
        description="calls served at once, open session streams included; more are refused by gRPC",
    )
    max_client_calls: int | None = Field(
        default=None,
        ge=1,
        description="calls one client (one IPv4 address or IPv6 /64; every local process is 127.0.0.1) may "
        "have under way here at once, open session streams included; more are refused with "
        "RESOURCE_EXHAUSTED before anything of theirs is read. Default: a quarter of "
        "--max-concurrent-rpcs (so no one address can take every call slot), at least 64 (a peer pushing "
        "many sessions' steps at once) unless there are fewer slots",
    )
    request_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a call's request (Push, Forward, Backward, a session's open) may take to "
        "arrive, waiting for a turn to be received included; then the call ends with DEADLINE_EXCEEDED, so "
        "a caller that sends only headers holds its slot this long at most. Raise it on slow links that "
        "carry large prefills",
    )
    max_receives: int = Field(
        default=8,
        ge=1,
        description="request messages received at once over all clients; more wait for a turn. gRPC holds "
        "a message whole (and a copy or two while it is parsed) before any check can refuse it, so the "
        "memory they take stays under about 3 x this x --max-message-bytes",
    )
    max_client_receives: int = Field(
        default=2,
        ge=1,
        description="request messages one client may have being received at once (of --max-receives)",
    )
    max_connections: int = Field(
        default=512,
        ge=1,
        description="client connections open at once over all clients (gRPC cannot count them per address); "
        "more are closed at once, keeping file descriptors for the peer's own work",
    )
    handshake_timeout: float = Field(
        default=10.0,
        gt=0,
        description="seconds a new connection may take to finish its TLS and HTTP/2 handshake before it is "
        "closed",
    )
    max_stateless_in_flight: int = Field(
        default=4,
        ge=1,
        description="Forward/Backward calls queued or computing at once; more are refused with "
        "RESOURCE_EXHAUSTED before their tensors are decoded",
    )
    max_batch_tokens: int = Field(
        default=1024,
        ge=1,
        description="tokens (rows x positions) of the inference steps of all sessions run as one batched "
        "forward; steps that arrive while the span computes join the next batch",
    )
    inline_step_ms: float = Field(
        default=50.0,
        ge=0,
        le=100,
        description="a lone decode step (nothing else queued) whose forwards were measured within this many "
        "milliseconds runs on the event loop's thread, without the hand-off to the compute thread (about "
        "0.3-0.6 ms on a CPU, bench/executor_hop.py); pings and replies wait for it meanwhile; 0: never",
    )
    prefill_chunk_tokens: int = Field(
        default=128,
        ge=1,
        description="while other sessions decode, a step longer than this (a prompt) computes in chunks of "
        "about this many tokens, so their decode steps wait for one chunk at most; a session alone computes "
        "in pieces of --compute-chunk-tokens",
    )
    compute_chunk_tokens: int = Field(
        default=4096,
        ge=1,
        description="a Forward/Backward computes in pieces of whole rows of at most this many tokens, so an "
        "inference step waits for at most one piece of a large training batch",
    )
    max_kept_bytes: ByteSize = Field(
        default=ByteSize(2**30),
        ge=0,
        description="estimated activation memory of training forwards kept for their Backward (which then "
        "skips recomputing them); the least recently kept are dropped first; 0: keep none",
    )
    kept_timeout: float = Field(
        default=60.0, gt=0, description="seconds a kept training forward waits for its Backward"
    )
    max_backward_bytes: ByteSize = Field(
        default=ByteSize(8 * 2**30),
        ge=1,
        description="estimated activation memory one Backward may hold (batch x positions x hidden x bytes x "
        "blocks x a per-block factor); larger ones are refused",
    )
    connection_idle_timeout: float = Field(
        default=300.0, gt=0, description="seconds a connection without calls stays open"
    )
    connection_age_timeout: float = Field(
        default=3600.0,
        gt=0,
        description="seconds after which a connection is asked to reconnect; calls under way get "
        "--session-timeout more seconds",
    )
    session_timeout: float = Field(
        default=600.0, gt=0, description="seconds a session may stay idle before its cache is freed"
    )
    step_timeout: float = Field(
        default=15.0,
        gt=0,
        description="seconds the next hop may take to accept a pushed step before it counts as failed",
    )
    push_stream: bool = Field(
        default=True,
        description="push steps to each next peer over one long-lived stream shared by every session (one "
        "frame per step, no reply unless refused); --no-push-stream makes a unary Push call per step",
    )
    push_stream_period: float = Field(
        default=300.0,
        gt=0,
        description="seconds this peer pushes on one stream before it opens a fresh one (the old one ends "
        "once written); a stream pushed into this peer closes after twice this without a frame",
    )
    max_push_streams: int = Field(
        default=256, ge=1, description="push streams from other peers served here at once; more are refused"
    )
    max_client_push_streams: int = Field(
        default=8,
        ge=1,
        description="push streams one caller (IPv4 address or IPv6 /64) may have open here at once",
    )
    max_push_stream_queue: int = Field(
        default=64,
        ge=1,
        description="steps waiting to be written on one outgoing push stream (more fail with "
        "RESOURCE_EXHAUSTED), and refusals waiting to be sent back on one incoming stream (more end it)",
    )
    announce_period: float = Field(
        default=30.0,
        gt=0,
        le=MAX_RECORD_TTL / 2,
        description="seconds between DHT announcements; records expire after twice this",
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, description="on SIGTERM, seconds to wait for steps in flight before exiting"
    )
    throughput: str = Field(
        default="auto",
        description="decode steps per second through one block: auto (measure on the first run for this "
        "model, dtype, device and version, then reuse the cached result), eval (measure again and update the "
        "cache), or a number. The announced throughput divides it by the number of blocks served",
    )
    bandwidth: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="network bandwidth in Mbit/s; caps the announced throughput at the decode steps the link "
        "can carry (default: no cap)",
    )
    balance_period: float = Field(
        default=120.0,
        gt=0,
        description="with --num-blocks: mean seconds between checks whether moving would help the swarm "
        "(each wait is drawn between half and 1.5 times this)",
    )
    balance_margin: float = Field(
        default=0.2,
        ge=0,
        allow_inf_nan=False,
        description="with --num-blocks: move only when it raises the swarm's bottleneck throughput by more "
        "than this fraction (or serves blocks nobody serves); guards against flapping",
    )
    ping_period: float = Field(
        default=30.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds between measuring round trips to the peers that may come next on a route (up to "
        "32, those serving the blocks after this span first); the record announces them so that clients "
        "can weigh each link of a chain",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="where the throughput measurement is cached; default: $COROLLA_CACHE_DIR or "
        "~/.cache/corolla",
    )
    metrics_port: int | None = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve Prometheus metrics at http://METRICS_HOST:PORT/metrics (0 picks a free port, "
        "written to the ready file); off by default",
    )
    metrics_host: str = Field(
        default="127.0.0.1",
        description="address the metrics endpoint listens on; 127.0.0.1 by default: a scraper on another "
        "machine (0.0.0.0) is an explicit choice",
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description=HEALTH_PORT_HELP + " (SERVING while the peer is ONLINE)"
    )
    health_host: str = Field(default="127.0.0.1", description=HEALTH_HOST_HELP)
    log_format: Literal["text", "json"] = Field(default="text", description=LOG_FORMAT_HELP)
    ready_file: Path | None = Field(
        default=None,
        description="once serving and announced ONLINE, write a JSON object {peer_id, address, start, end, "
        "model_id, pid, certificate, metrics_port} to this file (atomically), and rewrite it after each move "
        "to another span",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_model_id(cls, data: Any) -> Any:
        # filled before validation, so `model_id` is always a str
        if isinstance(data, dict) and not data.get("model_id") and isinstance(data.get("model"), str):
            return {**data, "model_id": model_id_from_path(data["model"])}
        return data

    @field_validator("blocks")
    @classmethod
    def _blocks_form(cls, value: str | None) -> str | None:
        if value is None:
            return None
        start, sep, end = value.partition(":")
        if not sep or not start.strip().isdigit() or not end.strip().isdigit():
            raise ValueError("must be START:END, e.g. 0:10")
        if int(start) >= int(end):
            raise ValueError("START must be below END")
        return f"{int(start)}:{int(end)}"

    @field_validator("swarm_key")
    @classmethod
    def _usable_swarm_key(cls, path: Path | None) -> Path | None:
        return swarm_key.SwarmKey.check_file(path)

    @field_validator("adapters")
    @classmethod
    def _adapter_folders(cls, value: list[str]) -> list[str]:
        from peer.adapters import parse_adapter_spec

        try:
            names = [parse_adapter_spec(spec)[0] for spec in value]
        except InvalidInputError as e:
            raise ValueError(str(e)) from None
        if len(set(names)) != len(names):
            raise ValueError(f"two adapters share a name: {names}; name them with NAME=DIR")
        return value

    @field_validator("model_id")
    @classmethod
    def _valid_model_id(cls, value: str) -> str:
        return validate_model_id(value)

    @field_validator("throughput")
    @classmethod
    def _throughput_form(cls, value: str) -> str:
        try:
            parse_option(value)
        except InvalidInputError as e:
            raise ValueError(str(e)) from None
        return value

    @model_validator(mode="after")
    def _derived(self) -> PeerConfig:
        if (self.blocks is None) == (self.span_length is None):
            raise ValueError("give exactly one of --blocks START:END and --num-blocks K")
        if self.swarm_key is not None and self.insecure:
            raise ValueError("--swarm-key needs TLS: a private swarm's tokens never travel in plaintext")
        if self.new_swarm and self.initial_peers:
            raise ValueError("--new-swarm starts a swarm of its own: drop it to join --initial-peers")
        if self.announce_host is None and self.host not in WILDCARD_HOSTS:  # a wildcard: learnt at start
            object.__setattr__(self, "announce_host", f"[{self.host}]" if ":" in self.host else self.host)
        return self

    @model_validator(mode="after")
    def _call_bounds(self) -> PeerConfig:
        if self.max_client_calls is not None and self.max_client_calls > self.max_concurrent_rpcs:
            raise ValueError("--max-client-calls must not be above --max-concurrent-rpcs")
        if self.max_client_receives > self.max_receives:
            raise ValueError("--max-client-receives must not be above --max-receives")
        return self

    @property
    def client_calls(self) -> int:
        """What one client may have under way: --max-client-calls, or a quarter of the call slots (at
        least MIN_CLIENT_CALLS, or all the slots when there are fewer)."""
        if self.max_client_calls is not None:
            return self.max_client_calls
        return max(self.max_concurrent_rpcs // 4, min(self.max_concurrent_rpcs, MIN_CLIENT_CALLS))

    def bind_address(self, port: int) -> str:
        """host:port for gRPC to listen on, an IPv6 host in brackets ("[::]:port" takes IPv4 too)."""
        return f"[{self.host}]:{port}" if ":" in self.host else f"{self.host}:{port}"

    @property
    def client_cache_tokens(self) -> int:
        """What one client may reserve: --max-client-cache-tokens, or half the budget (at least 1)."""
        if self.max_client_cache_tokens is not None:
            return self.max_client_cache_tokens
        return max(self.max_cache_tokens // 2, 1)

    @property
    def network_cache_tokens(self) -> int:
        """What one network may reserve: --max-network-cache-tokens, or what one client may."""
        if self.max_network_cache_tokens is not None:
            return self.max_network_cache_tokens
        return self.client_cache_tokens

    @property
    def span(self) -> tuple[int, int] | None:
        """The fixed span of --blocks; None with --num-blocks (the peer chooses)."""
        if self.blocks is None:
            return None
        start, _, end = self.blocks.partition(":")
        return int(start), int(end)


class DhtConfig(BaseModel):
    """A bootstrap DHT node's settings (`corolla dht`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "network": ("host", "port", "announce_host", "nat_port_map", "relay"),
        "security": ("identity", "swarm_key"),
        "operations": ("health_port", "health_host", "log_format", "ready_file"),
    }

    host: str = Field(default="127.0.0.1", description=HOST_HELP)
    port: int = Field(default=0, ge=0, le=65535, description="TCP port to listen on; 0 picks a free one")
    announce_host: str | None = Field(
        default=None,
        description="IP address or DNS name others reach this node at (a container's published address): "
        "announced with --port instead of the addresses it listens on, and printed in its multiaddresses; "
        "needs a fixed --port",
    )
    identity: Path | None = Field(default=None, description=IDENTITY_HELP)
    swarm_key: Path | None = Field(default=None, description=swarm_key.HELP)
    nat_port_map: bool = Field(default=False, description=NAT_PORT_MAP_HELP)
    relay: bool = Field(
        default=True,
        description="relay libp2p connections for peers nobody can dial (at most 16 circuits per peer); "
        "--no-relay opts out",
    )
    health_port: int | None = Field(
        default=None, ge=0, le=65535, description=HEALTH_PORT_HELP + " (SERVING once the node has started)"
    )
    health_host: str = Field(default="127.0.0.1", description=HEALTH_HOST_HELP)
    log_format: Literal["text", "json"] = Field(default="text", description=LOG_FORMAT_HELP)
    ready_file: Path | None = Field(
        default=None,
        description="once listening, write a JSON object {maddrs, pid} to this file (atomically)",
    )

    @field_validator("swarm_key")
    @classmethod
    def _usable_swarm_key(cls, path: Path | None) -> Path | None:
        return swarm_key.SwarmKey.check_file(path)

    @field_validator("announce_host")
    @classmethod
    def _announceable(cls, host: str | None) -> str | None:
        if host is not None:
            bare = host.strip("[]")
            try:
                validate_address(f"[{bare}]:1" if ":" in bare else f"{bare}:1")
            except InvalidInputError:
                raise ValueError(f"{host!r} is no IP address or DNS name") from None
        return host

    @model_validator(mode="after")
    def _announced_port(self) -> DhtConfig:
        if self.announce_host is not None and self.port == 0:
            raise ValueError("--announce-host needs a fixed --port: the announced address names the port")
        return self
