"""`ClientConfig`: how a client finds the swarm and how patient it is with peers (finite retries and bans);
`GenerateConfig`, `GatewayConfig`: what `corolla generate` and `corolla api` add to it.

Each knob is documented once (`Field(description=...)`); command lines are generated from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, ClassVar, Literal

from pydantic import AliasChoices, BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from protos import swarm_key
from protos.records import validate_model_id
from protos.settings import MULTIADDRESSES, Choices, Option
from protos.tensors import FLOAT_DTYPE_NAMES, WIRE_FORMAT_NAMES

_Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False)]
LOCAL_DEVICE_PATTERN = r"^(cpu|mps|cuda(:[0-9]{1,2})?)$"  # the client's own modules (`--device`)
LOCAL_DEVICE_OPTION = Option(metavar="{cpu,cuda,cuda:N,mps}")
# the client's own modules (embeddings and LM head), in `generate` and `api` alike
LocalDtype = Annotated[
    str, Choices(*FLOAT_DTYPE_NAMES), Field(description="dtype of the local embeddings and LM head")
]
LocalDevice = Annotated[
    str,
    LOCAL_DEVICE_OPTION,
    Field(
        pattern=LOCAL_DEVICE_PATTERN,
        description="where the local embeddings and LM head compute: cpu, cuda, cuda:N or mps (the blocks "
        "run on the peers)",
    ),
]
DRAFT_TOKENS = (
    16  # `corolla generate`'s longest draft: a rejected one shrinks the next (client/speculative.py)
)


class ClientConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # the groups of the client's options in `corolla api|generate|health|monitor --help`, by topic
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "swarm": ("initial_peers", "model_id", "quant", "wire_dtype", "max_carried_tokens"),
        "security": ("swarm_key", "insecure"),
        "verification": (
            "verify_every", "verify_max_gap", "verify_max_skips", "verify_timeout", "max_prefix_share",
        ),
        "timeouts and retries": (
            "connect_timeout", "join_timeout", "min_hop_timeout", "hop_timeout_factor", "max_hop_timeout",
            "ping_timeout", "forward_timeout", "max_retries", "retry_delay", "max_retry_delay", "ban_timeout",
            "ban_backoff", "max_ban_timeout", "refresh_period", "fetch_timeout", "close_timeout",
        ),
        "limits": ("max_message_bytes",),
    }  # fmt: skip

    initial_peers: Annotated[list[str], MULTIADDRESSES] = Field(
        default_factory=list,
        description="DHT multiaddresses of the swarm to join (`corolla dht` and every peer print theirs)",
    )
    model_id: str | None = Field(
        default=None, description="the swarm's name for the model; default: derived from the model path"
    )
    connect_timeout: _Seconds = Field(default=5.0, description="seconds to open a stream to a peer")
    join_timeout: _Seconds = Field(default=60.0, description="seconds to join the DHT when connecting")
    min_hop_timeout: _Seconds = Field(
        default=0.5,
        description="least seconds a hop gets for a step before the client pings it; a hop that does not "
        "answer the ping is stuck: it is banned and replaced",
    )
    hop_timeout_factor: float = Field(
        default=4.0,
        ge=1.0,
        allow_inf_nan=False,
        description="a hop is pinged once a step takes this many times what the client expects of it (its "
        "measured average step time, or the announced throughput before any measurement)",
    )
    max_hop_timeout: _Seconds = Field(
        default=5.0, description="longest wait for a hop's output before pinging it (e.g. a long prefill)"
    )
    ping_timeout: _Seconds = Field(
        default=1.0, description="seconds a pinged hop has to answer before it counts as stuck"
    )
    forward_timeout: _Seconds = Field(
        default=120.0,
        description="seconds one step or stateless forward/backward through a hop may take in all, even "
        "when the hop keeps answering pings",
    )
    max_retries: int = Field(
        default=5, ge=0, description="times one step or forward is retried on other peers before giving up"
    )
    retry_delay: _Seconds = Field(
        default=0.25,
        description="seconds before retrying when no route can be planned (the swarm view may be behind); "
        "each further retry waits twice as long. A failed peer is replaced at once",
    )
    max_retry_delay: _Seconds = Field(default=4.0, description="longest wait between two retries, in seconds")
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
    fetch_timeout: _Seconds = Field(default=30.0, description="seconds one read of the DHT records may take")
    close_timeout: _Seconds = Field(
        default=30.0, description="seconds `shutdown()` waits for streams, channels and the DHT node to close"
    )
    max_message_bytes: ByteSize = Field(
        default=ByteSize(256 * 2**20), ge=2**16, description="largest gRPC message sent or accepted"
    )
    max_carried_tokens: int = Field(
        default=64,
        ge=0,
        description="steps of at most this many rows x new positions travel with every hop's output and "
        "come back in one message from the last hop; each hop of a longer step (a prefill) reports its "
        "output to the client on its own stream instead, so pushes do not grow with the route",
    )
    verify_every: int = Field(
        default=64,
        ge=0,
        description="spot checks: each step is checked with probability 1/N, drawn from the OS's random "
        "source so no peer can tell which: every hop's outputs for all the positions of its cache are "
        "recomputed by other peers serving its blocks, and a hop that differs beyond the verifiers' "
        "tolerance is banned and the step redone; 1: every step; 0: off",
    )
    verify_max_gap: int = Field(
        default=48,
        ge=1,
        description="a step is checked whenever this many steps in a row were not: a peer that lies at "
        "every step is caught within this many steps plus one",
    )
    verify_max_skips: int = Field(
        default=3,
        ge=1,
        description="a hop whose spot checks could not be done this many times in a row (no peer "
        "computing as precisely serves its blocks, or none answered) is replaced where other peers serve "
        "its blocks: an unusual span, dtype or silent verifiers do not escape the checks",
    )
    verify_timeout: _Seconds = Field(
        default=10.0,
        description="seconds the peers have to recompute a spot-checked hop (all the Forwards of its chain "
        "of verifiers); past it the check is skipped",
    )
    max_prefix_share: float = Field(
        default=0.5,
        ge=0.5,
        le=1.0,
        description="Sybil limit: the peers of one address prefix (IPv4 /24, IPv6 /48, a host name; "
        "loopback exempt) carry at most this share of a route's blocks where other prefixes serve them, "
        "and count once in the median that caps announced throughput; 1: no share limit",
    )
    insecure: bool = Field(
        default=False,
        description="speak plaintext gRPC to peers started with `corolla serve --insecure` (tests, trusted "
        "networks); by default only TLS peers whose certificate their signed record vouches for are used",
    )
    swarm_key: Path | None = Field(default=None, description=swarm_key.HELP)
    quant: Literal["none", "any", "int8"] = Field(
        default="none",
        description="whose weights a route may use: none (only peers serving the weights as loaded: outputs "
        "equal the model's own, the default), int8 (only `--quant int8` peers), any (every peer: faster or "
        "more capacity, outputs within the quantization's error; replays and spot checks then allow it)",
    )
    wire_dtype: Annotated[str, Choices(*WIRE_FORMAT_NAMES)] | None = Field(
        default=None,
        description="how hidden states travel between client and peers, in bytes per value: float32 (4, "
        "exact), float16 (2; overflows beyond +-65504), bfloat16 (2), int8 (about 1.36: each row's 1/32 "
        "largest values exact, the rest int8 with a float32 scale per block of 64, error up to half a step "
        "of absmax/127 per block; gradients of fine-tuning stay float32); default: the peers' dtype",
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

    @field_validator("swarm_key")
    @classmethod
    def _usable_swarm_key(cls, path: Path | None) -> Path | None:
        return swarm_key.SwarmKey.check_file(path)

    @model_validator(mode="after")
    def _consistent(self) -> ClientConfig:
        if self.swarm_key is not None and self.insecure:
            raise ValueError("swarm_key needs TLS: a private swarm's tokens never travel in plaintext")
        if self.max_ban_timeout < self.ban_timeout:
            raise ValueError(
                f"max_ban_timeout ({self.max_ban_timeout}) must be >= ban_timeout ({self.ban_timeout})"
            )
        if self.max_hop_timeout < self.min_hop_timeout:
            raise ValueError(
                f"max_hop_timeout ({self.max_hop_timeout}) must be >= min_hop_timeout "
                f"({self.min_hop_timeout})"
            )
        if self.max_retry_delay < self.retry_delay:
            raise ValueError(
                f"max_retry_delay ({self.max_retry_delay}) must be >= retry_delay ({self.retry_delay})"
            )
        return self


class GenerateConfig(BaseModel):
    """`corolla generate` options (the client's own options, `ClientConfig`, come with them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "generation": ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "chat", "adapter"),
        "speculative decoding": ("speculative", "draft_tokens"),
        "local modules": ("dtype", "device"),
        "operations": ("metrics_port",),
    }

    model: str = Field(
        description="checkpoint folder (needs config, tokenizer and client weights) or hub name"
    )
    prompt: str = Field(description="the prompt text (with --chat: the user's message)")
    max_new_tokens: int = Field(default=64, ge=1, description="tokens to generate")
    temperature: float = Field(
        default=0.0,
        ge=0.0,
        allow_inf_nan=False,
        description="sampling temperature; 0 decodes greedily (the default)",
    )
    top_p: float | None = Field(
        default=None, gt=0.0, le=1.0, description="nucleus sampling: keep this probability mass"
    )
    top_k: int | None = Field(default=None, ge=1, description="sample among the k most likely tokens")
    seed: int | None = Field(default=None, description="random seed, for repeatable sampling")
    chat: bool = Field(default=False, description="wrap the prompt in the model's chat template")
    adapter: Annotated[str | None, Option(metavar="NAME")] = Field(
        default=None,
        description="run the LoRA adapter NAME that peers serve (`corolla serve --adapters NAME=DIR`) on "
        "every block: the route then uses only peers announcing it, and the command fails, naming the "
        "adapters the swarm serves, when no peer does (default: the base model)",
    )
    speculative: Annotated[str | None, Option(metavar="{ngram,DIR,none}")] = Field(
        default=None,
        description="speculative decoding, greedy only, with the same tokens as plain greedy decoding: each "
        "step sends a draft of the next tokens through the swarm, which verifies it in one chain traversal. "
        "ngram: draft from the text so far (prompt lookup: what followed the last time the latest tokens "
        "occurred), with a draft length that follows how much of the drafts the model accepts; pays when "
        "the answer repeats the prompt (editing, quoting, code); on text that does not repeat, drafts that "
        "fail pause drafting, so it costs little (a few percent on CPU peers, where a step of several "
        "positions costs about twice one of a single position). "
        "DIR: a local folder of a small draft model with the same tokenizer, run here with transformers. "
        "none: one token per step. Default: ngram when decoding greedily, none when sampling",
    )
    draft_tokens: Annotated[int, Option(metavar="N")] = Field(
        default=DRAFT_TOKENS,
        ge=1,
        description="the longest draft one step verifies (ngram: the maximum of the adaptive length; DIR: "
        "the draft model's starting length, which transformers then adapts)",
    )
    dtype: LocalDtype = "float32"
    device: LocalDevice = "cpu"
    metrics_port: Annotated[int | None, Option(metavar="PORT")] = Field(
        default=None,
        ge=0,
        le=65535,
        description="serve the client's Prometheus metrics (steps, hop latency, failovers, bans) at "
        "http://127.0.0.1:PORT/metrics while generating (0 picks a free port, logged)",
    )


class GatewayConfig(BaseModel):
    """`corolla api` options (the client's own options, `ClientConfig`, come with them)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    option_groups: ClassVar[dict[str, tuple[str, ...]]] = {
        "model": ("served_model_name", "chat_template", "dtype", "device"),
        "server": ("host", "port", "allowed_hosts", "engine", "speculative", "draft_tokens"),
        "security": ("api_key", "api_keys", "allow_anonymous"),
        "limits": (
            "max_concurrent_requests", "max_waiting_requests", "max_model_len", "max_requests_per_key",
            "max_request_bytes", "max_request_tokens", "generation_timeout", "max_response_bytes",
        ),
        "operations": ("drain_timeout", "ready_file", "log_format"),
    }  # fmt: skip

    model: str = Field(
        description="checkpoint folder (config, tokenizer and the client's weights) or hub name"
    )
    host: str = Field(default="127.0.0.1", description="address to listen on")
    port: int = Field(default=8000, ge=0, le=65535, description="TCP port; 0 picks a free one")
    api_key: str | None = Field(
        default=None,
        min_length=8,
        description="clients must send `Authorization: Bearer KEY` (better set as COROLLA_API_API_KEY "
        "than on the command line); /health, /ready and /metrics stay open for probes and scrapers",
    )
    api_keys: list[Annotated[str, Field(min_length=8)]] = Field(
        default_factory=list,
        description="more API keys, one per user or application (better set as COROLLA_API_API_KEYS, "
        "separated by spaces): each is accepted like --api-key, and the slots are shared fairly between the "
        "keys",
    )
    allow_anonymous: Annotated[bool, Option(hidden=("allow_no_api_key",))] = Field(
        default=False,
        validation_alias=AliasChoices("allow_anonymous", "allow_no_api_key"),  # the old name still works
        description="serve on an address other than loopback without --api-key (anyone who reaches the port "
        "can use the swarm through it)",
    )
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description="names clients may reach the gateway by (the Host header), beside IP addresses, "
        "localhost and --host; `*`: any (behind a proxy). Other names get 400: a web page cannot read the "
        "API through DNS rebinding",
    )
    served_model_name: str | None = Field(
        default=None,
        max_length=256,
        description="the name clients pass as `model`; default: the swarm's model id",
    )
    chat_template: Path | None = Field(
        default=None,
        description="a Jinja chat template file used in place of the tokenizer's (as vLLM's "
        "--chat-template); one that cannot render a one-message conversation stops the start",
    )
    max_concurrent_requests: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="requests generating at once (each is one session on the peers)",
    )
    max_waiting_requests: int = Field(
        default=64, ge=0, description="requests waiting for a free slot; beyond them a request gets 429"
    )
    engine: bool = Field(
        default=True,
        description="decode the running requests together in one engine loop: one batched step of the "
        "client's modules per token for all of them, their sessions' steps sent together so the peers batch "
        "them; --no-engine: each request runs its own generate() on a worker thread",
    )
    speculative: Literal["none", "ngram"] = Field(
        default="none",
        description="ngram: greedy requests in the engine (without penalties, logit_bias or logprobs) draft "
        "tokens by prompt lookup and verify them in their next step through the swarm, with the same tokens "
        "as plain greedy decoding; pays where round trips, not compute, bound a step (a WAN)",
    )
    draft_tokens: int = Field(
        default=10,
        ge=1,
        le=64,
        description="the longest draft of --speculative ngram; a rejected draft shrinks the next to what was "
        "accepted + 1, a fully accepted one doubles it",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=1,
        validation_alias=AliasChoices("max_length", "max_model_len"),  # as `serve`; vLLM's name too
        description="longest prompt + completion in tokens; default: the model's context",
    )
    max_requests_per_key: int | None = Field(
        default=None,
        ge=1,
        description="requests one API key may have generating or waiting at once, beyond which it gets 429 "
        "(a freed slot goes to the waiting key holding the fewest); default: an equal share of "
        "max_concurrent_requests + max_waiting_requests between the keys",
    )
    max_request_bytes: ByteSize = Field(
        default=ByteSize(4 * 2**20), ge=2**10, description="largest request body; a larger one gets 413"
    )
    max_request_tokens: int = Field(
        default=32768,
        ge=1,
        description="most completion tokens one request may ask for, max_tokens x n x prompts (a larger "
        "request gets 400); without max_tokens a request gets the context's rest or its share of this",
    )
    generation_timeout: float = Field(
        default=600.0,
        gt=0,
        allow_inf_nan=False,
        description="seconds one request may generate once it has a slot; then its choices end after the "
        'step in flight with finish_reason "length" (clients keep the text so far, as at max_tokens)',
    )
    max_response_bytes: ByteSize = Field(
        default=ByteSize(16 * 2**20),
        ge=2**10,
        description="bytes of choices (text and log-probabilities) one response may carry; the token that "
        'crosses it is the last, and the choices end with finish_reason "length"',
    )
    dtype: LocalDtype = "float32"
    device: LocalDevice = "cpu"
    drain_timeout: float = Field(
        default=30.0, gt=0, description="seconds a stopping server gives requests in flight to finish"
    )
    ready_file: Path | None = Field(
        default=None, description="write {url, pid} as JSON here once serving (for tests and supervisors)"
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="logs on stderr as text lines, or as one JSON object per line (for log collectors)",
    )

    @field_validator("chat_template")
    @classmethod
    def _template_file(cls, path: Path | None) -> Path | None:
        if path is not None and not path.is_file():
            raise ValueError(f"{path} is not a file")
        return path
