"""The compute executor (`peer.scheduler.Scheduler`): inference steps before Forward/Backward, arrival order
within a priority, steps whose deadline passed skipped, steps that would wait past it refused at once;
prompts in chunks with decode steps in between, a prompt whose caller left or whose deadline passed
between chunks computing no more, lone decode steps on the event loop; then the same through a real
servicer, and per-client quotas seen by two clients on different addresses."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Awaitable, Callable

import grpc
import pytest
import torch
from fakes import FakePeer, hidden_states
from families import NUM_BLOCKS, build

from peer import requests, stateless, wire
from peer.blocks import BatchItem, HostedSpan
from peer.requests import BackwardRequest, ForwardRequest
from peer.scheduler import Expired, Overloaded, Priority, Scheduler, StepWork
from protos import peer_pb2, peer_pb2_grpc
from protos.tensors import to_message

GATE_TIMEOUT = 10.0  # seconds a blocked job waits for its test to open the gate


def _blocker(gate: threading.Event, started: threading.Event) -> Callable[[], str]:
    def block() -> str:
        started.set()
        gate.wait(GATE_TIMEOUT)
        return "blocker"

    return block


async def _started(event: threading.Event) -> None:
    for _ in range(200):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise TimeoutError("the blocking job never started")


def test_steps_go_first_then_arrival_order() -> None:
    async def main() -> list[str]:
        scheduler, order = Scheduler(), []
        gate, started = threading.Event(), threading.Event()
        blocker = asyncio.create_task(scheduler.run(_blocker(gate, started), priority=Priority.STATELESS))
        await _started(started)

        def job(name: str) -> Callable[[], None]:
            return lambda: order.append(name)

        queued = [
            scheduler.run(job("backward 1"), priority=Priority.STATELESS),
            scheduler.run(job("measure"), priority=Priority.BACKGROUND),
            scheduler.run(job("step 1"), priority=Priority.STEP),
            scheduler.run(job("backward 2"), priority=Priority.STATELESS),
            scheduler.run(job("step 2"), priority=Priority.STEP),
        ]
        tasks = [asyncio.create_task(q) for q in queued]
        await asyncio.sleep(0.05)  # all queued behind the blocker
        assert scheduler.in_flight == 6
        gate.set()
        await asyncio.gather(blocker, *tasks)
        scheduler.shutdown()
        return order

    assert asyncio.run(main()) == ["step 1", "step 2", "backward 1", "backward 2", "measure"]


def test_a_step_whose_deadline_passed_while_queued_is_skipped() -> None:
    async def main() -> None:
        scheduler, ran = Scheduler(), []
        gate, started = threading.Event(), threading.Event()
        blocker = asyncio.create_task(scheduler.run(_blocker(gate, started)))
        await _started(started)
        late = asyncio.create_task(
            scheduler.run(lambda: ran.append("late"), deadline=time.monotonic() + 0.05)
        )
        timely = asyncio.create_task(scheduler.run(lambda: ran.append("timely")))
        await asyncio.sleep(0.2)
        gate.set()
        with pytest.raises(Expired, match="waited past its deadline"):
            await late
        await asyncio.gather(blocker, timely)
        assert ran == ["timely"] and scheduler.skipped == 1
        scheduler.shutdown()

    asyncio.run(main())


def test_a_step_that_would_wait_past_its_deadline_is_refused_at_once() -> None:
    async def main() -> None:
        scheduler = Scheduler()
        await scheduler.run(lambda: time.sleep(0.05), kind="backward", cost=1.0)  # measures >= 50 ms per unit
        gate, started = threading.Event(), threading.Event()
        # expected to take >= 100 x 50 ms: a step with 1 s left cannot wait for it
        blocker = asyncio.create_task(scheduler.run(_blocker(gate, started), kind="backward", cost=100.0))
        await _started(started)
        assert scheduler.expected_wait(Priority.STEP) > 4.0
        before = time.monotonic()
        with pytest.raises(Overloaded, match="past its deadline"):
            await scheduler.run(lambda: None, deadline=time.monotonic() + 1.0)
        assert time.monotonic() - before < 0.5 and scheduler.shed == 1
        patient = asyncio.create_task(scheduler.run(lambda: "done"))  # no deadline: waits its turn
        gate.set()
        assert await patient == "done"
        await blocker
        scheduler.shutdown()

    asyncio.run(main())


def test_a_cancelled_caller_is_not_computed() -> None:
    async def main() -> None:
        scheduler, ran = Scheduler(), []
        gate, started = threading.Event(), threading.Event()
        blocker = asyncio.create_task(scheduler.run(_blocker(gate, started)))
        await _started(started)
        gone = asyncio.create_task(scheduler.run(lambda: ran.append("gone")))
        await asyncio.sleep(0.02)
        gone.cancel()
        gate.set()
        await blocker
        await scheduler.run(lambda: None)
        assert ran == [] and scheduler.in_flight == 0
        scheduler.shutdown()

    asyncio.run(main())


# ---- through the servicer ----------------------------------------------------------------------------


class Stream:
    """A raw Session stream, fed one request at a time; the session lives while the stream is open."""

    def __init__(self, stub: peer_pb2_grpc.PeerStub) -> None:
        self._requests: queue.Queue = queue.Queue()
        self._replies = stub.Session(iter(self._requests.get, None), timeout=60)

    def open(self, session_id: str, **fields) -> str:
        """ "opened", or the name of the status the stream ended with."""
        fields = dict(start=0, end=4, batch_size=1, max_length=16, dtype="float32") | fields
        self._requests.put(
            peer_pb2.SessionRequest(open=peer_pb2.OpenSession(session_id=session_id, **fields))
        )
        return self.receive()

    def step(self, step: peer_pb2.Step) -> str:
        self._requests.put(peer_pb2.SessionRequest(step=step))
        return self.receive()

    def receive(self) -> str:
        try:
            return next(self._replies).WhichOneof("kind")
        except grpc.RpcError as e:
            return e.code().name

    def close(self) -> None:
        self._requests.put(None)


def test_forward_and_backward_calls_queued_together_run_as_one_batch_each() -> None:
    """Training batches among itself: Forward pieces of different calls share one forward, Backward pieces
    one forward and backward, never mixed with each other; each result equals the call run alone."""
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 7), (1, 12), (3, 3)]
    hiddens = [torch.randn(b, s, span.hidden_size, generator=generator) for b, s in shapes]
    grads = [torch.randn(h.shape, generator=generator) for h in hiddens]

    async def main() -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        scheduler = Scheduler(max_stateless_tokens=4096)
        gate, started = threading.Event(), threading.Event()
        blocker = asyncio.create_task(scheduler.run(_blocker(gate, started), priority=Priority.BACKGROUND))
        await _started(started)
        limits = dict(chunk_tokens=4096, remaining=None)
        forwards = [
            asyncio.create_task(
                stateless.forward(scheduler, span, ForwardRequest(0, NUM_BLOCKS, h, None), **limits)
            )
            for h in hiddens
        ]
        backwards = [
            asyncio.create_task(
                stateless.backward(scheduler, span, BackwardRequest(0, NUM_BLOCKS, h, g, None), **limits)
            )
            for h, g in zip(hiddens, grads, strict=True)
        ]
        await asyncio.sleep(0.05)
        gate.set()
        await blocker
        outputs = await asyncio.gather(*forwards)
        gradients = [grad for grad, _ in await asyncio.gather(*backwards)]
        scheduler.shutdown()
        return outputs, gradients, span_calls["batches"]

    span_calls = {"batches": 0}
    original = span.forward_batch, span.backward_batch

    def counted(fn: Callable) -> Callable:
        def call(items, **kwargs):
            span_calls["batches"] += 1
            assert len(items) == len(shapes)  # all three calls in one forward
            return fn(items, **kwargs)

        return call

    span.forward_batch, span.backward_batch = map(counted, original)  # type: ignore[method-assign]
    outputs, gradients, batches = asyncio.run(main())
    assert batches == 2
    for hidden, grad, output, gradient in zip(hiddens, grads, outputs, gradients, strict=True):
        torch.testing.assert_close(output, span.forward(hidden), atol=1e-5, rtol=0)
        torch.testing.assert_close(gradient, span.backward(hidden, grad)[0], atol=1e-5, rtol=0)


def test_a_long_prompt_computes_in_chunks_equal_to_the_whole_and_others_decode_in_between() -> None:
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randn(2, 30, span.hidden_size, generator=generator)
    decode = torch.randn(1, 1, span.hidden_size, generator=generator)
    whole, other = span.new_cache(), span.new_cache()
    span.forward(decode, other)
    expected = span.forward(prompt, whole)
    batches: list[list[int]] = []  # the positions of each item, per forward
    forward_batch = span.forward_batch

    def counted(items, **kwargs):
        batches.append([item.hidden.shape[1] for item in items])
        if len(batches) == 1:  # while the first chunk computes, another session's decode step arrives
            asyncio.run_coroutine_threadsafe(queue_decode(), loop).result(GATE_TIMEOUT)
        return forward_batch(items, **kwargs)

    async def queue_decode() -> None:
        tasks.append(
            asyncio.create_task(
                scheduler.step(StepWork(span, 0, NUM_BLOCKS, BatchItem(decode, other)), cost=1)
            )
        )

    async def main() -> torch.Tensor:
        nonlocal loop, scheduler
        loop, scheduler = asyncio.get_running_loop(), Scheduler()
        work = StepWork(span, 0, NUM_BLOCKS, BatchItem(prompt, span.new_cache()))
        output = await scheduler.prefill(work, chunk_tokens=16)  # 8 positions x 2 rows per chunk
        await asyncio.gather(*tasks)
        scheduler.shutdown()
        return output

    tasks: list[asyncio.Task] = []
    loop: asyncio.AbstractEventLoop
    scheduler: Scheduler
    span.forward_batch = counted  # type: ignore[method-assign]
    output = asyncio.run(main())
    torch.testing.assert_close(output, expected, atol=1e-5, rtol=0)
    assert batches == [[8], [1], [8], [8], [6]]  # 4 chunks of 8 positions x 2 rows; the decode in between


def test_a_prompt_alone_is_not_cut_small_but_goes_in_chunks_while_others_decode() -> None:
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 40, span.hidden_size, generator=generator)
    pieces: list[int] = []
    forward_batch = span.forward_batch

    def counted(items, **kwargs):
        pieces.extend(item.hidden.shape[1] for item in items)
        return forward_batch(items, **kwargs)

    span.forward_batch = counted  # type: ignore[method-assign]

    async def prefill(hidden: torch.Tensor) -> torch.Tensor:
        work = StepWork(span, 0, NUM_BLOCKS, BatchItem(hidden, span.new_cache()))
        return await scheduler.prefill(work, chunk_tokens=16, lone_chunk_tokens=4096)

    async def main() -> tuple[list[int], list[int]]:
        alone = await prefill(prompt)  # nobody decodes: one piece, exactly as a forward of the whole
        assert torch.equal(alone, span.forward(prompt, span.new_cache()))
        first = pieces.copy()
        pieces.clear()
        await prefill(prompt[:, :1])  # a session decodes
        await prefill(prompt)
        return first, pieces.copy()

    scheduler = Scheduler()
    try:
        assert asyncio.run(main()) == ([40], [1, 16, 16, 8])
    finally:
        scheduler.shutdown()


def test_a_padded_prompt_in_chunks_equals_the_whole() -> None:
    """Chunks of a padded step keep the mask over the cache and their positions so far (as the family
    applies it to the whole): the outputs put together equal one forward of the whole, and the cache holds
    every position."""
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(5)
    first, prompt = (torch.randn(2, n, span.hidden_size, generator=generator) for n in (3, 20))
    mask = torch.ones(2, 23, dtype=torch.int64)
    mask[0, :2] = 0  # row 0 is left-padded
    whole, chunked = span.new_cache(), span.new_cache()
    for cache in (whole, chunked):
        span.forward(first, cache, mask=mask[:, :3])
    expected = span.forward(prompt, whole, mask=mask)
    pieces = _prompt_pieces(span, lambda: None)

    async def main() -> torch.Tensor:
        scheduler = Scheduler()
        work = StepWork(span, 0, NUM_BLOCKS, BatchItem(prompt, chunked, mask=mask))
        output = await scheduler.prefill(work, chunk_tokens=8)  # 4 positions x 2 rows per chunk
        scheduler.shutdown()
        return output

    torch.testing.assert_close(asyncio.run(main()), expected, atol=1e-5, rtol=0)
    assert pieces == [[4]] * 5 and chunked.get_seq_length() == whole.get_seq_length() == 23


def _prompt_pieces(span: HostedSpan, on_first: Callable[[], None]) -> list[list[int]]:
    """Counts the positions of each item of each forward of `span`; calls `on_first` during the first."""
    pieces: list[list[int]] = []
    forward_batch = span.forward_batch

    def counted(items, **kwargs):
        pieces.append([item.hidden.shape[1] for item in items])
        if len(pieces) == 1:
            on_first()
        return forward_batch(items, **kwargs)

    span.forward_batch = counted  # type: ignore[method-assign]
    return pieces


def test_a_prompt_whose_caller_went_away_computes_no_more_chunks() -> None:
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    prompt = torch.randn(1, 30, span.hidden_size, generator=torch.Generator().manual_seed(2))
    caller: list[asyncio.Task[torch.Tensor]] = []
    loop: list[asyncio.AbstractEventLoop] = []
    pieces = _prompt_pieces(span, lambda: loop[0].call_soon_threadsafe(caller[0].cancel))

    async def main() -> int:
        scheduler = Scheduler()
        loop.append(asyncio.get_running_loop())
        work = StepWork(span, 0, NUM_BLOCKS, BatchItem(prompt, span.new_cache()))
        caller.append(asyncio.create_task(scheduler.prefill(work, chunk_tokens=8)))
        with pytest.raises(asyncio.CancelledError):
            await caller[0]
        await scheduler.run(lambda: None)  # behind whatever the prompt left queued
        scheduler.shutdown()
        return scheduler.in_flight

    assert asyncio.run(main()) == 0
    assert pieces == [[8]]  # the chunk under way finished; the other 22 positions never ran


def test_a_prompt_whose_deadline_passes_between_its_chunks_expires() -> None:
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    prompt = torch.randn(1, 30, span.hidden_size, generator=torch.Generator().manual_seed(3))
    pieces = _prompt_pieces(span, lambda: time.sleep(0.3))  # the first chunk outlasts the deadline

    async def main() -> int:
        scheduler = Scheduler()
        work = StepWork(span, 0, NUM_BLOCKS, BatchItem(prompt, span.new_cache()))
        with pytest.raises(Expired, match="waited past its deadline"):
            await scheduler.prefill(work, chunk_tokens=8, deadline=time.monotonic() + 0.2)
        scheduler.shutdown()
        return scheduler.skipped

    assert asyncio.run(main()) == 1
    assert pieces == [[8]]


def test_a_lone_short_step_runs_on_the_event_loop_once_measured_fast_enough() -> None:
    """With `inline_seconds`, a lone step of a few tokens skips the compute thread once its kind's measured
    rate says it computes within the bound; a step with work queued behind it, a longer step, or a
    scheduler with the option off use the compute thread. The outputs are those of plain forwards."""
    span = HostedSpan.from_model(build("llama"), 0, NUM_BLOCKS)
    generator = torch.Generator().manual_seed(4)
    hiddens = [torch.randn(1, length, span.hidden_size, generator=generator) for length in (1, 1, 1, 5, 1)]
    on_loop: list[bool] = []
    forward_batch = span.forward_batch

    def recorded(items, **kwargs):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return forward_batch(items, **kwargs)

    span.forward_batch = recorded  # type: ignore[method-assign]

    async def main(inline_seconds: float) -> tuple[list[torch.Tensor], int]:
        scheduler, cache = Scheduler(inline_seconds=inline_seconds), span.new_cache()

        def step(hidden: torch.Tensor) -> Awaitable[torch.Tensor]:
            return scheduler.prefill(StepWork(span, 0, NUM_BLOCKS, BatchItem(hidden, cache)), chunk_tokens=16)

        outputs = [await step(hiddens[0]), await step(hiddens[1])]  # no rate yet: the thread; then the loop
        behind = asyncio.create_task(scheduler.run(lambda: None, priority=Priority.BACKGROUND))
        outputs.append(await step(hiddens[2]))  # something queued behind it: the thread
        await behind
        outputs += [await step(hiddens[3]), await step(hiddens[4])]  # 5 tokens: the thread; 1: the loop
        scheduler.shutdown()
        return outputs, scheduler.inlined

    reference = span.new_cache()
    expected = [span.forward(hidden, reference) for hidden in hiddens]
    outputs, inlined = asyncio.run(main(inline_seconds=60.0))
    assert on_loop == [False, True, False, False, True] and inlined == 2
    for output, want in zip(outputs, expected, strict=True):
        assert torch.equal(output, want)
    on_loop.clear()
    assert asyncio.run(main(inline_seconds=0.0))[1] == 0 and not any(on_loop)


async def _listen_also_on_ipv6(peer: FakePeer) -> tuple[grpc.aio.Server, int]:
    """A second listener on [::1] for the same servicer: a client there is another client."""
    server = grpc.aio.server()
    wire.add_to_server(peer.service, server)
    port = server.add_insecure_port("[::1]:0")
    await server.start()
    return server, port


def test_a_client_reaches_its_quota_and_another_client_still_opens(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_client_sessions=3, max_sessions=6)
    peer: FakePeer = swarm.peers[0]
    server, ipv6_port = swarm.call(_listen_also_on_ipv6(peer))
    try:
        mine = [Stream(peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))) for _ in range(5)]
        outcomes = [stream.open(f"mine-{index}") for index, stream in enumerate(mine)]
        assert outcomes == ["opened"] * 3 + ["RESOURCE_EXHAUSTED"] * 2
        theirs = Stream(peer_pb2_grpc.PeerStub(grpc.insecure_channel(f"[::1]:{ipv6_port}")))
        assert theirs.open("theirs") == "opened"
        assert peer.num_sessions == 4
        for stream in [*mine, theirs]:
            stream.close()
    finally:
        swarm.call(server.stop(None))


def test_a_decode_step_goes_before_queued_backwards(fake_swarm) -> None:
    swarm = fake_swarm([(0, 4)], max_stateless_in_flight=4)
    peer: FakePeer = swarm.peers[0]
    stub = peer_pb2_grpc.PeerStub(grpc.insecure_channel(peer.address))
    gate, started = threading.Event(), threading.Event()

    async def block() -> asyncio.Task[str]:  # a long training job already on the compute thread
        task = asyncio.create_task(peer.scheduler.run(_blocker(gate, started), priority=Priority.STATELESS))
        await _started(started)
        return task

    blocking = swarm.call(block())
    hidden = hidden_states(4, 64, seed=0)
    backward = peer_pb2.BackwardRequest(
        start=0, end=4, hidden=to_message(hidden), grad_output=to_message(hidden_states(4, 64, seed=1))
    )
    backwards = [stub.Backward.future(backward, timeout=60) for _ in range(3)]
    stream = Stream(stub)
    assert stream.open("decode") == "opened"
    for _ in range(100):  # bounded: the three backwards reach the queue
        if peer.scheduler.in_flight == 4:
            break
        time.sleep(0.02)
    assert peer.scheduler.in_flight == 4
    peer.slow(1.0, at_least=0.3)  # every compute from now on takes 0.3 s or more
    step = peer_pb2.Step(
        step_id=1, position=0, hidden=to_message(hidden_states(1, 1, seed=2)), timeout_ms=60_000
    )
    replies: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: replies.put(stream.step(step)), daemon=True).start()
    time.sleep(0.1)  # the step is queued behind the three backwards
    gate.set()
    assert replies.get(timeout=30) == "result"
    assert not any(future.done() for future in backwards)  # it ran before every queued backward
    assert all(future.result().HasField("grad_input") for future in backwards)
    swarm.call(_result(blocking))
    stream.close()


async def _result(task: asyncio.Task[str]) -> str:
    return await task


@pytest.mark.parametrize("prompt_rows", [None, 1, 5])
def test_forward_and_backward_in_pieces_equal_the_whole(fake_swarm, prompt_rows: int | None) -> None:
    """A large Forward/Backward runs in pieces of whole rows (so steps can pass between them); the pieces
    put together equal the whole batch computed at once."""
    span = fake_swarm([(0, 4)]).local_span()
    hidden, grad = hidden_states(5, 6, seed=3), hidden_states(5, 6, seed=4)
    prompts = (
        None if prompt_rows is None else hidden_states(4 * prompt_rows, 2, seed=5).view(4, prompt_rows, 2, 64)
    )
    forward = requests.ForwardRequest(start=0, end=4, hidden=hidden, prompts=prompts)
    backward = requests.BackwardRequest(start=0, end=4, hidden=hidden, grad_output=grad, prompts=prompts)
    assert stateless.row_chunks(5, 6, 12) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert stateless.row_chunks(2, 100, 12) == [slice(0, 1), slice(1, 2)]  # a row longer than a piece

    async def run(chunk_tokens: int) -> tuple[torch.Tensor, ...]:
        scheduler = Scheduler()
        output = await stateless.forward(scheduler, span, forward, chunk_tokens=chunk_tokens, remaining=None)
        grads = await stateless.backward(scheduler, span, backward, chunk_tokens=chunk_tokens, remaining=None)
        scheduler.shutdown()
        return output, *grads

    whole, pieces = asyncio.run(run(10_000)), asyncio.run(run(12))
    for expected, actual in zip(whole, pieces, strict=True):
        if expected is None:
            assert actual is None
        else:
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)
