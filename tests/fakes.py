"""In-process peers for the fast test tier: the real `PeerService` on an in-process `grpc.aio` server over a
tiny `HostedSpan`, with fault switches a test flips at any time, and `FakeSwarm`, which runs such peers on
one background event loop and lists their records in an `InMemoryDiscovery`. Everything stays in one
process, so a failover can be stepped through with a debugger.

    test thread ──switches──▶ FakePeer ─┐            client runtime loop (SwarmConnection)
                                        ▼                     │ gRPC over 127.0.0.1
    swarm loop thread:  grpc.aio server ◀─────────────────────┘
                        _FaultyService(PeerService) ── scheduler thread ── _FaultySpan(HostedSpan)
"""

from __future__ import annotations

import asyncio
import copy
import functools
import itertools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
from transformers import AutoModelForCausalLM

from client.discovery import InMemoryDiscovery, SwarmView
from peer import wire
from peer.blocks import HostedSpan
from peer.config import PeerConfig
from peer.scheduler import Scheduler
from peer.service import PeerService, RequestError
from peer.session_runtime import SessionRuntime
from peer.sessions import PeerSession, SessionTable
from protos import peer_pb2
from protos.channels import channel_options
from protos.records import PeerRecord, PeerState
from protos.tensors import dtype_name, from_message, to_message, wire_dtype_from_name

logger = logging.getLogger(__name__)
Result = TypeVar("Result")

VERSION = "0.0.0+fake"
STOP_GRACE = 0.5  # seconds a drained peer's server lets open calls finish before it stops
_OPEN, _STEP, _FORWARD, _PUSH = "open", "step", "forward", "push"  # what `fail_next` applies to
CORRUPTIONS = ("bytes", "nan", "shape", "dtype", "perturb")  # how `corrupt_outputs` garbles a reply


class Faults:
    """The switches of one peer. Read by the servicer (on the swarm loop) and the span (on the compute
    thread), set by the test (any other thread): plain attributes plus one threading.Event."""

    def __init__(self) -> None:
        self.thawed = threading.Event()
        self.thawed.set()
        self.killed = False
        self.corrupt: str | None = None  # one of CORRUPTIONS
        self.blame: list[tuple[str, grpc.StatusCode]] = []  # StepErrors to send in place of results
        self.received: list[peer_pb2.SessionRequest] = []  # every open and reroute, as it came in
        self.slow_factor = 1.0
        self.min_compute_seconds = 0.0
        self.num_waiting = 0  # calls held by a freeze right now
        self.num_computes = 0  # span forwards/backwards started
        self._fail: list[tuple[grpc.StatusCode, frozenset[str]]] = []
        self._lock = threading.Lock()

    def fail_next(self, code: grpc.StatusCode, n: int, kinds: frozenset[str]) -> None:
        with self._lock:
            self._fail += [(code, kinds)] * n

    def take_failure(self, kind: str) -> RequestError | None:
        """The injected failure for this call, if one is pending for its kind."""
        with self._lock:
            for index, (code, kinds) in enumerate(self._fail):
                if kind in kinds:
                    del self._fail[index]
                    return RequestError(code, f"injected {code.name} on {kind}")
        return None

    def wait_thawed(self) -> None:
        """Blocks the compute thread while frozen; a kill releases it with an error."""
        if not self.thawed.is_set():
            with self._lock:
                self.num_waiting += 1
            try:
                while not self.thawed.wait(0.05):
                    pass
            finally:
                with self._lock:
                    self.num_waiting -= 1
        if self.killed:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, "killed")

    async def gate(self) -> None:
        """Holds an RPC (on the swarm loop) while frozen; polling keeps one event for both threads."""
        if self.thawed.is_set():
            return
        with self._lock:
            self.num_waiting += 1
        try:
            while not self.thawed.is_set():
                await asyncio.sleep(0.01)
        finally:
            with self._lock:
                self.num_waiting -= 1


class _FaultySpan(HostedSpan):
    """A hosted span whose forward and backward obey the switches (freeze, slow, fail_next)."""

    faults: Faults

    def forward(self, hidden: torch.Tensor, cache: Any = None, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._faulty(
            _STEP if cache is not None else _FORWARD, super().forward, hidden, cache, *args, **kwargs
        )

    def forward_batch(self, items: Any, **kwargs: Any) -> list[torch.Tensor | Exception]:
        kind = _STEP if any(item.cache is not None for item in items) else _FORWARD
        return self._faulty(kind, super().forward_batch, items, **kwargs)

    def backward(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._faulty(_FORWARD, super().backward, *args, **kwargs)

    def backward_batch(self, items: Any, **kwargs: Any) -> list[torch.Tensor | Exception]:
        return self._faulty(_FORWARD, super().backward_batch, items, **kwargs)

    def lora_backward(self, *args: Any, **kwargs: Any) -> Any:
        return self._faulty(_FORWARD, super().lora_backward, *args, **kwargs)

    def record(self, *args: Any, **kwargs: Any) -> Any:
        return self._faulty(_FORWARD, super().record, *args, **kwargs)

    def backprop(self, *args: Any, **kwargs: Any) -> Any:
        return self._faulty(_FORWARD, super().backprop, *args, **kwargs)

    def _faulty(self, kind: str, compute: Callable[..., Result], *args: Any, **kwargs: Any) -> Result:
        faults = self.faults
        faults.num_computes += 1
        faults.wait_thawed()
        failure = faults.take_failure(kind)
        if failure is not None:
            raise failure
        started = time.perf_counter()
        result = compute(*args, **kwargs)
        elapsed = time.perf_counter() - started
        time.sleep(max(elapsed * (faults.slow_factor - 1.0), faults.min_compute_seconds - elapsed, 0.0))
        faults.wait_thawed()  # a forward under way when the peer froze does not return either
        return result


class _FaultyService(PeerService):
    """The real servicer; every RPC waits while the peer is frozen, opens may fail on demand, and step
    results to the client and Forward/Backward replies may come back garbled."""

    faults: Faults

    def _push(
        self, session: PeerSession, runtime: SessionRuntime, pushed: peer_pb2.Step, hop: peer_pb2.Hop
    ) -> None:
        if self.faults.corrupt and pushed.carried:  # this hop's output on its way to the client
            # values only: the next hop refuses a carried output of the wrong shape, dtype or size itself
            _corrupt(pushed.carried[-1], "perturb" if self.faults.corrupt == "perturb" else "nan")
        super()._push(session, runtime, pushed, hop)

    def _push_or_result(
        self,
        session: PeerSession,
        runtime: SessionRuntime,
        step: peer_pb2.Step,
        hidden: peer_pb2.Tensor,
        deadline: float | None,
        *,
        seconds: float,
    ) -> peer_pb2.StepResult | None:
        result = super()._push_or_result(session, runtime, step, hidden, deadline, seconds=seconds)
        if result is None and self.faults.blame:  # a carried step: no result to replace, the error goes alone
            self._spawn(self._reply(runtime, self._blame(step.step_id)))
        return result

    def _blame(self, step_id: int) -> peer_pb2.SessionReply:
        peer_id, code = self.faults.blame.pop(0)
        message = f"injected {code.name} blaming {peer_id}"
        error = peer_pb2.StepError(step_id=step_id, code=code.value[0], message=message)
        error.peer_id = peer_id
        return peer_pb2.SessionReply(error=error)

    async def Session(
        self, request_iterator: AsyncIterator[peer_pb2.SessionRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[peer_pb2.SessionReply]:
        async for reply in super().Session(self._gated(request_iterator), context):
            await self.faults.gate()
            if reply.WhichOneof("kind") == "result" and self.faults.blame:
                reply = self._blame(reply.result.step_id)
            elif self.faults.corrupt and reply.WhichOneof("kind") == "result":
                _corrupt(reply.result.hidden, self.faults.corrupt)
            yield reply

    async def _gated(
        self, requests: AsyncIterator[peer_pb2.SessionRequest]
    ) -> AsyncIterator[peer_pb2.SessionRequest]:
        async for request in requests:
            await self.faults.gate()
            if request.WhichOneof("kind") in ("open", "reroute"):
                self.faults.received.append(request)
            if request.WhichOneof("kind") == "open" and (failure := self.faults.take_failure(_OPEN)):
                raise failure  # the servicer ends the stream with its status
            yield request

    async def _accept_push(self, request: peer_pb2.PushRequest) -> None:
        """Every push received, a Push call or a frame of a PushStream, waits while frozen and may fail."""
        await self.faults.gate()
        if failure := self.faults.take_failure(_PUSH):
            raise failure
        await super()._accept_push(request)

    async def Forward(
        self, request: peer_pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.ForwardReply:
        await self.faults.gate()
        reply = await super().Forward(request, context)
        if self.faults.corrupt:
            _corrupt(reply.hidden, self.faults.corrupt)
        return reply

    async def Backward(
        self, request: peer_pb2.BackwardRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.BackwardReply:
        await self.faults.gate()
        reply = await super().Backward(request, context)
        if self.faults.corrupt:
            _corrupt(reply.grad_input, self.faults.corrupt)
        return reply

    async def Info(
        self, request: peer_pb2.InfoRequest, context: grpc.aio.ServicerContext
    ) -> peer_pb2.InfoReply:
        await self.faults.gate()
        return await super().Info(request, context)


class FakePeer:
    """One in-process peer serving blocks [start, end). Build it through `FakeSwarm.add`; its switches may
    be flipped from any thread but the swarm loop's."""

    def __init__(
        self,
        swarm: FakeSwarm,
        model: torch.nn.Module,
        start: int,
        end: int,
        *,
        peer_id: str,
        throughput: float,
        **config: Any,
    ) -> None:
        self.swarm = swarm
        self.peer_id = peer_id
        self.start, self.end = start, end
        self.throughput = throughput
        self.state = PeerState.ONLINE
        self.announced: dict[str, Any] = {}  # record fields that say otherwise than the peer's state
        self.faults = Faults()
        # in-process peers speak plaintext (their ids are names, not keys); process tests run TLS
        options = {"insecure": True} | config
        self.config = PeerConfig(
            model=str(swarm.folder), blocks=f"{start}:{end}", host="127.0.0.1", **options
        )
        self.span = _FaultySpan.from_model(model, start, end, quant=self.config.quant)
        self.span.load_adapters(self.config.adapters)
        self.span.faults = self.faults
        self.sessions = SessionTable.from_config(self.config)
        self.scheduler = Scheduler(
            max_batch_tokens=self.config.max_batch_tokens,
            max_stateless_tokens=self.config.compute_chunk_tokens,
            inline_seconds=0.0,  # one loop serves every in-process peer: a frozen forward must not hold it
        )
        self.server: grpc.aio.Server | None = None
        self.address = ""
        self.service = _FaultyService(
            span=self.span,
            config=self.config,
            sessions=self.sessions,
            scheduler=self.scheduler,
            peer_id=peer_id,
            make_record=self.make_record,
            version=VERSION,
        )
        self.service.faults = self.faults

    async def _start(self) -> None:
        self.server = grpc.aio.server(options=channel_options(self.config.max_message_bytes))
        wire.add_to_server(self.service, self.server)
        port = self.server.add_insecure_port("127.0.0.1:0")
        self.address = f"127.0.0.1:{port}"
        await self.server.start()

    def make_record(self) -> PeerRecord:
        config = self.config
        return PeerRecord(
            state=self.state,
            address=self.address,
            start=self.start,
            end=self.end,
            throughput=self.throughput,
            free_cache_tokens=max(self.sessions.free_tokens, 0),
            max_length=config.max_length,
            max_batch_size=config.max_batch_size,
            max_forward_tokens=config.max_forward_tokens,
            dtype=dtype_name(self.span.dtype),  # type: ignore[arg-type]
            quantization=self.config.quant,
            adapters=tuple(sorted(self.span.adapters)),
            version=VERSION,
        ).model_copy(update=self.announced)

    @property
    def alive(self) -> bool:
        return not self.faults.killed

    @property
    def num_sessions(self) -> int:
        return len(self.sessions)

    @property
    def num_computes(self) -> int:
        """Span forwards and backwards started so far (session steps and stateless passes)."""
        return self.faults.num_computes

    # ---- switches ----------------------------------------------------------------------------------

    def kill(self) -> None:
        """Like SIGKILL: every call ends at once, new connections are refused; the record stays listed
        (a dead peer's record outlives it in the DHT)."""
        self.faults.killed = True
        self.faults.thawed.set()  # frozen calls end with the server
        if self.server is not None:
            self.swarm.call(self.server.stop(grace=None))

    def freeze(self) -> None:
        """Like SIGSTOP: no reply, ping, push acceptance or compute until `thaw`."""
        self.faults.thawed.clear()

    def thaw(self) -> None:
        self.faults.thawed.set()

    def drop_sessions(self) -> None:
        """Forget every session, as after a restart: later steps and pushes get NOT_FOUND."""

        async def drop() -> None:
            for session_id in self.sessions.session_ids():
                self.service.close_session(session_id, reason="dropped by the test")

        self.swarm.call(drop())

    def fail_next(
        self, code: grpc.StatusCode, n: int = 1, *, on: tuple[str, ...] = (_OPEN, _STEP, _FORWARD)
    ) -> None:
        """The next `n` opens, session steps, stateless forwards/backwards or received pushes (those in `on`:
        "open", "step", "forward", "push") answer `code`."""
        self.faults.fail_next(code, n, frozenset(on))

    def corrupt_outputs(self, on: bool = True, *, mode: str = "bytes") -> None:
        """Step results sent to the client and Forward/Backward replies come back garbled (pushes to the
        next hop stay intact): `mode` "bytes" one byte short of their shape, "nan" all NaN, "shape" twice
        as many positions, "dtype" in another float dtype, "perturb" plausible values off by 0.01. The output
        a push carries on for the client (Step.carried) is garbled in its values only ("perturb", else NaN):
        the next hop refuses a carried output of the wrong shape, dtype or size itself."""
        if mode not in CORRUPTIONS:
            raise ValueError(f"mode must be one of {CORRUPTIONS}, got {mode!r}")
        self.faults.corrupt = mode if on else None

    def blame_next(
        self, peer_id: str, *, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE, n: int = 1
    ) -> None:
        """The next `n` step results to the client are replaced by a StepError that names `peer_id` as the
        culprit (a hop framing another peer; the step was computed and pushed on as usual); a step whose
        output is carried on gets the StepError alone."""
        self.faults.blame += [(peer_id, code)] * n

    def slow(self, factor: float, *, at_least: float = 0.0) -> None:
        """Each compute takes `factor` times as long (and at least `at_least` seconds); pings still answer."""
        self.faults.slow_factor = factor
        self.faults.min_compute_seconds = at_least

    def announce_as(self, **fields: Any) -> None:
        """List a record that says otherwise than the peer (a stale announcement), e.g. more free cache."""
        self.announced = fields
        self.swarm.publish()

    def drain(self, *, timeout: float = 5.0) -> None:
        """Like SIGTERM: announce DRAINING, refuse new sessions, finish the computes under way, stop."""
        self.service.accepting = False
        self.state = PeerState.DRAINING
        self.swarm.publish()

        async def drain() -> None:
            await self.scheduler.drain(timeout)
            assert self.server is not None
            await self.server.stop(grace=STOP_GRACE)

        self.swarm.call(drain())
        self.state = PeerState.OFFLINE
        self.swarm.publish()

    async def _close(self) -> None:
        self.faults.killed = True
        self.faults.thawed.set()
        if self.server is not None:
            await self.server.stop(grace=None)
        for task in list(getattr(self.service, "_tasks", ())):
            task.cancel()  # pushes to peers that are gone would wait for their timeout
        await self.service.close()
        await asyncio.to_thread(self.scheduler.shutdown)

    def __repr__(self) -> str:
        return f"FakePeer({self.peer_id}, [{self.start}, {self.end}), {self.address})"


class FakeSwarm:
    """In-process peers of one tiny model (`folder`), served from one background event loop (not the
    client's), listed in `discovery`. `close()` stops everything; use it through the `fake_swarm` fixture."""

    def __init__(self, folder: Path, **peer_config: Any) -> None:
        self.folder = Path(folder)
        self.peer_config = peer_config
        self.peers: list[FakePeer] = []
        self.listed: set[str] = set()
        self._model = _load(str(self.folder))
        self.num_blocks = int(self._model.config.num_hidden_layers)
        self.discovery = InMemoryDiscovery()
        self._ids = itertools.count()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-swarm", daemon=True)
        self._thread.start()

    def call(self, coroutine: Coroutine[Any, Any, Result], *, timeout: float = 30.0) -> Result:
        """Run `coroutine` on the swarm's loop and wait for it."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("FakeSwarm.call from the swarm's own loop would wait for itself")
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def add(
        self, start: int, end: int, *, throughput: float = 100.0, listed: bool = True, **config: Any
    ) -> FakePeer:
        """Start a peer serving [start, end); `config` overrides `PeerConfig` fields for it."""
        peer_id = f"fake{next(self._ids)}x{start}x{end}"
        model = copy.deepcopy(self._model)  # `HostedSpan.from_model` takes the model's block list over
        peer = FakePeer(
            self, model, start, end, peer_id=peer_id, throughput=throughput, **(self.peer_config | config)
        )
        self.call(peer._start())
        self.peers.append(peer)
        if listed:
            self.list(peer)
        return peer

    def add_many(self, spans: list[tuple[int, int]], **options: Any) -> list[FakePeer]:
        return [self.add(start, end, **options) for start, end in spans]

    def __getitem__(self, peer_id: str) -> FakePeer:
        return next(peer for peer in self.peers if peer.peer_id == peer_id)

    def list(self, peer: FakePeer) -> None:
        self.listed.add(peer.peer_id)
        self.publish()

    def unlist(self, peer: FakePeer) -> None:
        self.listed.discard(peer.peer_id)
        self.publish()

    def view(self) -> SwarmView:
        records = {peer.peer_id: peer.make_record() for peer in self.peers if peer.peer_id in self.listed}
        return SwarmView.from_records(self.num_blocks, records)

    def publish(self) -> None:
        """Set the discovery's view to the listed peers' current records."""
        self.discovery.set(self.view())

    def local_span(self, start: int = 0, end: int | None = None) -> HostedSpan:
        """The same blocks run locally, from the same weights in the same memory layout as the peers'
        (a deep copy): the exact reference for what the swarm computes."""
        return HostedSpan.from_model(
            copy.deepcopy(self._model), start, self.num_blocks if end is None else end
        )

    def close(self) -> None:
        async def close() -> None:
            await asyncio.gather(*(peer._close() for peer in self.peers), return_exceptions=True)

        try:
            self.call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self.loop.close()


def _corrupt(message: peer_pb2.Tensor, mode: str) -> None:
    """Garble a reply's tensor in place (see `FakePeer.corrupt_outputs`)."""
    if mode == "bytes":
        message.data = message.data[:-1]  # shorter than its shape says
        return
    tensor = from_message(message, max_bytes=2**40)
    if mode == "nan":
        tensor = torch.full_like(tensor, float("nan"))
    elif mode == "shape":
        tensor = torch.cat([tensor, tensor], dim=1)
    elif mode == "perturb":
        tensor = tensor + 0.01
    wire = wire_dtype_from_name(message.dtype)  # garbled values go in the wire format they came in
    if mode == "dtype":
        wire = torch.float16 if tensor.dtype != torch.float16 else torch.float32
    message.CopyFrom(to_message(tensor, dtype=wire))


@functools.lru_cache(maxsize=4)
def _load(folder: str) -> torch.nn.Module:
    """The tiny model as transformers loads it; each peer takes a deep copy."""
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hidden_states(batch: int, seq: int, *, seed: int, width: int = 64) -> torch.Tensor:
    """Seeded hidden states [batch, seq, width] for session-level tests."""
    return torch.randn(batch, seq, width, generator=torch.Generator().manual_seed(seed))
