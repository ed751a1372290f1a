"""Prometheus metrics of peers and clients: names follow Prometheus conventions and parse with its text
parser; the gRPC interceptor counts calls, bytes and errors by status code (a refused private-swarm call
too); in-process sessions move the peers' and the client's counters by exactly what they did (prompt and
generated tokens apart, speculative drafts as generated), failovers and bans included; every peer series
carries the model label, the cache usage is a 0-1 gauge and the state an enum gauge; and a real peer
process scraped over HTTP shows +N tokens after a generation, while its JSON logs stay one object per
line."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
import torch
from fakes import FakeSwarm, hidden_states
from families import VOCAB, without_eos
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from swarm import LocalSwarm, Process, running

from client import AutoDistributedModelForCausalLM
from client.metrics import ClientMetrics, ban_reason, instrument
from client.swarm import SwarmConnection
from peer.metrics import MetricsInterceptor, PeerMetrics
from peer.scheduler import Scheduler
from peer.sessions import SessionTable
from protos import peer_pb2, peer_pb2_grpc
from protos.records import PeerRecord, PeerState
from protos.swarm_key import SwarmGuard

STEPS = [7, 1, 1, 1, 1]  # a prompt of 7 positions, then decode steps
STEP_LIMIT = 30.0
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str, *, model: str | None = None) -> Samples:
    """Every sample of a Prometheus text exposition, by (name, sorted labels); with `model` (a peer's), every
    sample must carry `model=` it, which is then left out of the labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if model is not None:
                assert labels.pop("model", None) == model, (sample.name, sample.labels)
            found[(sample.name, tuple(sorted(labels.items())))] = sample.value
    return found


def value(found: Samples, name: str, **labels: str) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


def _record() -> PeerRecord:
    return PeerRecord(
        state=PeerState.ONLINE,
        address="127.0.0.1:1",
        start=0,
        end=2,
        throughput=12.5,
        free_cache_tokens=64,
        max_length=128,
        dtype="float32",
        version="1.0",
    )


# ---- names and exposition ------------------------------------------------------------------------------

UNIT_SUFFIXES = ("_seconds", "_bytes", "_per_second", "_block", "_tokens", "_pages", "_size", "_info")
UNIT_SUFFIXES += ("_ratio",)
ALLOWED_LABELS = {"method", "code", "kind", "state", "reason", "le", "model", "peer_id", "version"}
ALLOWED_LABELS |= {"dtype", "quantization", "phase"}


def test_metric_names_follow_prometheus_conventions() -> None:
    """snake_case under one prefix per side, counters end in _total and nothing else does, units in the
    name, help on every family, and no label that grows with sessions or clients."""
    peer = PeerMetrics(model="m")
    sessions = SessionTable(1024, idle_timeout=60, page_tokens=16)
    peer.watch(sessions=sessions, scheduler=Scheduler(), record=_record, labels={"peer_id": "p"})
    peer.step(tokens=3, prompt=True, wait=0.001, seconds=0.01)
    peer.batch("step", 2)
    client = ClientMetrics()
    client.failovers.labels("UNAVAILABLE").inc()
    client.bans.labels("spot_check").inc()
    names = set()
    for registry, prefix in ((peer.registry, "corolla_peer_"), (client.registry, "corolla_client_")):
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            if family.name.startswith("process_") or family.name.endswith("_created"):
                continue  # prometheus_client's own (a scraped peer serves no `_created` series)
            names.add(family.name)
            assert re.fullmatch(r"[a-z][a-z0-9_]*", family.name) and family.name.startswith(prefix)
            assert family.documentation, family.name
            for sample in family.samples:
                assert set(sample.labels) <= ALLOWED_LABELS, (sample.name, sample.labels)
                if family.type == "counter":
                    assert sample.name.endswith("_total"), sample.name
                elif family.type != "counter":
                    assert not sample.name.endswith("_total"), sample.name
            if family.type == "histogram":
                assert family.name.endswith(("_seconds", "_size")), family.name
            if family.type == "gauge" and family.name not in (
                "corolla_peer_sessions",
                "corolla_peer_queued_jobs",
                "corolla_peer_state",  # an enum: one series per state
            ):
                assert family.name.endswith(UNIT_SUFFIXES), family.name
    for wanted in (
        "corolla_peer_steps",
        "corolla_peer_tokens",
        "corolla_peer_batch_size",
        "corolla_peer_queue_wait_seconds",
        "corolla_peer_step_seconds",
        "corolla_peer_sessions",
        "corolla_peer_cache_pages",
        "corolla_peer_cache_usage_ratio",
        "corolla_peer_state",
        "corolla_peer_errors",
        "corolla_peer_received_bytes",
        "corolla_peer_sent_bytes",
        "corolla_peer_announced_throughput_steps_per_second",
        "corolla_client_steps",
        "corolla_client_failovers",
        "corolla_client_bans",
        "corolla_client_hop_seconds",
    ):
        assert wanted in names


def test_every_peer_series_carries_the_model_label() -> None:
    """The process collector's series and the scraped state's too; the model may be set after creation."""
    metrics = PeerMetrics()
    metrics.model = "org/model"
    sessions = SessionTable(1024, idle_timeout=60, page_tokens=16)
    metrics.watch(sessions=sessions, scheduler=Scheduler(), record=_record, labels={"peer_id": "p"})
    metrics.step(tokens=1, prompt=False, wait=0.0, seconds=0.001)
    found = samples(generate_latest(metrics.registry).decode(), model="org/model")  # asserts on each
    assert any(name.startswith("process_") for name, _ in found)
    assert len(found) > 40


def test_scraped_state_is_read_from_the_peer() -> None:
    metrics = PeerMetrics(model="m")
    sessions = SessionTable(1024, idle_timeout=60, page_tokens=16)
    record: list[PeerRecord | None] = [None]
    metrics.watch(sessions=sessions, scheduler=Scheduler(), record=lambda: record[0], labels={"peer_id": "p"})
    found = samples(generate_latest(metrics.registry).decode(), model="m")
    assert value(found, "corolla_peer_cache_pages", state="free") == 64
    assert value(found, "corolla_peer_cache_pages", state="used") == 0
    assert found[("corolla_peer_cache_usage_ratio", ())] == 0
    assert ("corolla_peer_announced_throughput_steps_per_second", ()) not in found  # nothing announced yet
    record[0] = _record()
    found = samples(generate_latest(metrics.registry).decode(), model="m")
    assert value(found, "corolla_peer_announced_throughput_steps_per_second") == 12.5
    assert (value(found, "corolla_peer_span_start_block"), value(found, "corolla_peer_span_end_block")) == (
        0,
        2,
    )
    info = {"peer_id": "p", "version": "1.0", "dtype": "float32", "quantization": "none"}
    assert value(found, "corolla_peer_info", **info) == 1


def _states(found: Samples) -> dict[str, float]:
    return {dict(labels)["state"]: v for (name, labels), v in found.items() if name == "corolla_peer_state"}


def test_the_peer_state_is_an_enum_gauge() -> None:
    """One series per state, 1 for the current one: a state change moves values, never a label set."""
    metrics = PeerMetrics(model="m")
    record = [_record()]
    sessions = SessionTable(1024, idle_timeout=60, page_tokens=16)
    metrics.watch(sessions=sessions, scheduler=Scheduler(), record=lambda: record[0], labels={"peer_id": "p"})
    online = _states(samples(generate_latest(metrics.registry).decode(), model="m"))
    assert online == {"joining": 0, "online": 1, "draining": 0, "offline": 0}
    record[0] = record[0].model_copy(update={"state": PeerState.DRAINING})
    found = samples(generate_latest(metrics.registry).decode(), model="m")
    assert _states(found) == {"joining": 0, "online": 0, "draining": 1, "offline": 0}
    assert not [labels for name, labels in found if name == "corolla_peer_info" and "state" in dict(labels)]


@pytest.mark.parametrize(
    ("reason", "label"),
    [("UNAVAILABLE", "UNAVAILABLE"), ("spot check: differs by 3.2", "spot_check"), ("whatever", "other")],
)
def test_ban_reasons_are_a_closed_set(reason: str, label: str) -> None:
    assert ban_reason(reason) == label


# ---- the interceptor ----------------------------------------------------------------------------------


class _Servicer(peer_pb2_grpc.PeerServicer):
    async def Info(self, request, context):
        return peer_pb2.InfoReply(model_id="counted")

    async def Forward(self, request, context):
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "full")

    async def Push(self, request, context):
        raise RuntimeError("a bug")

    async def Session(self, request_iterator, context):
        async for _ in request_iterator:
            error = peer_pb2.StepError(step_id=1, code=grpc.StatusCode.NOT_FOUND.value[0], message="gone")
            yield peer_pb2.SessionReply(error=error)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "position mismatch")


async def _calls(metrics: PeerMetrics, *, guarded: bool) -> list[grpc.StatusCode]:
    guard = [SwarmGuard("token")] if guarded else []
    server = grpc.aio.server(interceptors=[MetricsInterceptor(metrics), *guard])
    peer_pb2_grpc.add_PeerServicer_to_server(_Servicer(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    codes = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = peer_pb2_grpc.PeerStub(channel)
            calls = [
                lambda: stub.Info(peer_pb2.InfoRequest(), timeout=10),
                lambda: stub.Forward(peer_pb2.ForwardRequest(), timeout=10),
                lambda: stub.Push(peer_pb2.PushRequest(push_token=b"x" * 16), timeout=10),
            ]
            for call in calls[:1] if guarded else calls:
                try:
                    await call()
                    codes.append(grpc.StatusCode.OK)
                except grpc.aio.AioRpcError as e:
                    codes.append(e.code())
            stream = stub.Session(iter([peer_pb2.SessionRequest(close=peer_pb2.Close())]), timeout=10)
            try:
                async for _ in stream:
                    pass
            except grpc.aio.AioRpcError as e:
                codes.append(e.code())
    finally:
        # a call's status reaches the client (`abort` sends it) just before its handler ends and is counted
        await server.stop(grace=2.0)
    return codes


def test_the_interceptor_counts_calls_bytes_and_errors_by_status_code() -> None:
    metrics = PeerMetrics()
    codes = asyncio.run(_calls(metrics, guarded=False))
    assert codes == [
        grpc.StatusCode.OK,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.FAILED_PRECONDITION,
    ]
    found = samples(generate_latest(metrics.registry).decode(), model="")
    for method in ("Info", "Forward", "Push", "Session"):
        assert value(found, "corolla_peer_requests_total", method=method) == 1
    errors = {labels: v for (name, labels), v in found.items() if name == "corolla_peer_errors_total"}
    assert errors == {
        (("code", "RESOURCE_EXHAUSTED"), ("method", "Forward")): 1,
        (("code", "UNKNOWN"), ("method", "Push")): 1,
        (("code", "NOT_FOUND"), ("method", "Session")): 1,  # the step error sent on the stream
        (("code", "FAILED_PRECONDITION"), ("method", "Session")): 1,  # and the stream's end
    }
    info_bytes = len(peer_pb2.InfoReply(model_id="counted").SerializeToString())
    assert value(found, "corolla_peer_sent_bytes_total", method="Info") == info_bytes
    assert value(found, "corolla_peer_received_bytes_total", method="Push") == 18  # the 16-byte token
    assert value(found, "corolla_peer_received_bytes_total", method="Session") == 2  # one `close`


def test_calls_another_interceptor_refuses_are_counted() -> None:
    metrics = PeerMetrics()
    refused = grpc.StatusCode.UNAUTHENTICATED
    assert asyncio.run(_calls(metrics, guarded=True)) == [refused, refused]
    found = samples(generate_latest(metrics.registry).decode(), model="")
    for method in ("Info", "Session"):
        assert value(found, "corolla_peer_errors_total", method=method, code="UNAUTHENTICATED") == 1


# ---- in-process sessions -----------------------------------------------------------------------------


def _run(connection: SwarmConnection, kill_at: int | None = None, swarm: FakeSwarm | None = None) -> None:
    session = connection.new_session(max_length=64)
    position = 0
    try:
        for index, seq in enumerate(STEPS):
            if index == kill_at and swarm is not None:
                swarm[session.route[1].peer_id].kill()
            hidden, positions = (
                hidden_states(1, seq, seed=index),
                torch.arange(position, position + seq)[None],
            )
            connection.runtime.run(session.astep(hidden, positions), timeout=STEP_LIMIT)
            position += seq
    finally:
        connection.runtime.run(session.aclose(), timeout=STEP_LIMIT)


def _peer_samples(service: Any) -> Samples:
    return samples(generate_latest(service.metrics.registry).decode(), model=service.config.model_id)


def test_a_session_moves_every_hops_counters_and_the_clients(fake_swarm, connect) -> None:
    swarm = fake_swarm([(0, 1), (1, 3), (3, 4)], model_id="tiny")
    connection = connect(swarm)
    client = instrument(connection)
    _run(connection)
    tokens = sum(STEPS)  # 7 + 1 + 1 + 1 + 1 positions through every hop
    for index, peer in enumerate(swarm.peers):
        found = _peer_samples(peer.service)
        assert value(found, "corolla_peer_steps_total") == len(STEPS)
        assert value(found, "corolla_peer_tokens_total", phase="prompt") == STEPS[0]
        assert value(found, "corolla_peer_tokens_total", phase="generated") == tokens - STEPS[0]
        assert value(found, "corolla_peer_step_seconds_count") == len(STEPS)
        assert value(found, "corolla_peer_queue_wait_seconds_count") == len(STEPS)
        pushed = value(found, "corolla_peer_sent_bytes_total", method="Push")
        assert (pushed > tokens * 64 * 4) == (index < 2)  # every hop but the last pushes float32 hiddens
    found = samples(generate_latest(client.registry).decode())
    assert value(found, "corolla_client_sessions_total") == 1
    assert value(found, "corolla_client_steps_total") == len(STEPS)
    assert value(found, "corolla_client_step_seconds_count") == len(STEPS)
    # each decode step is measured at its first hop at least, at each of the 3 at most
    assert len(STEPS) - 1 <= value(found, "corolla_client_hop_seconds_count") <= 3 * (len(STEPS) - 1)
    assert not any(name.startswith(("corolla_client_failovers", "corolla_client_bans")) for name, _ in found)


def _usage(service: Any) -> float:
    usage = _peer_samples(service)[("corolla_peer_cache_usage_ratio", ())]
    assert 0 <= usage <= 1
    return usage


def test_drafts_count_as_generated_and_the_cache_usage_moves(fake_swarm, connect) -> None:
    """A prompt, a speculative step verifying a draft (3 positions), a rollback of 2 rejected positions
    with the next step (2 positions): everything after the prompt is generated. The cache usage rises with
    the session's pages and falls back to 0 when it closes."""
    swarm = fake_swarm([(0, 4)], model_id="tiny", max_cache_tokens=64, page_tokens=4)  # 16 pages
    (peer,) = swarm.peers
    service = peer.service
    service.metrics.watch(
        sessions=peer.sessions, scheduler=peer.scheduler, record=peer.make_record, labels={}
    )
    connection = connect(swarm)
    session = connection.new_session(max_length=32)
    assert _usage(service) == 0
    try:
        for index, (base, seq, rollback) in enumerate([(0, 9, None), (9, 3, None), (10, 2, 10)]):
            hidden, positions = hidden_states(1, seq, seed=index), torch.arange(base, base + seq)[None]
            connection.runtime.run(session.astep(hidden, positions, rollback_to=rollback), timeout=STEP_LIMIT)
        assert _usage(service) == 3 / 16  # 12 positions in pages of 4
    finally:
        connection.runtime.run(session.aclose(), timeout=STEP_LIMIT)
    found = _peer_samples(service)
    assert value(found, "corolla_peer_tokens_total", phase="prompt") == 9
    assert value(found, "corolla_peer_tokens_total", phase="generated") == 5
    deadline = time.monotonic() + 10  # the peer frees the pages as the close arrives
    while time.monotonic() < deadline and _usage(service) != 0:
        time.sleep(0.05)
    assert _usage(service) == 0


def test_a_failover_and_its_ban_are_counted_by_status_code(fake_swarm, connect) -> None:
    swarm = fake_swarm([(0, 1), (1, 3), (1, 3), (3, 4)])
    connection = connect(swarm)
    client = instrument(connection)
    _run(connection, kill_at=3, swarm=swarm)
    found = samples(generate_latest(client.registry).decode())
    assert value(found, "corolla_client_failovers_total", code="UNAVAILABLE") == 1
    assert value(found, "corolla_client_bans_total", reason="UNAVAILABLE") == 1
    assert value(found, "corolla_client_steps_total") == len(STEPS)
    assert value(found, "corolla_client_step_errors_total") == 0


# ---- a real peer process, scraped --------------------------------------------------------------------

NEW_TOKENS = 6
PROMPT = 5


@pytest.fixture(scope="module")
def metered(checkpoint, tmp_path_factory) -> Iterator[LocalSwarm]:
    """Two peer processes with metrics on a free port and JSON logs."""
    options = ("--model-id", "metered", "--throughput", "100", "--metrics-port", "0", "--log-format", "json")
    with running(tmp_path_factory.mktemp("metered"), checkpoint("llama"), ["0:2", "2:4"], *options) as swarm:
        yield swarm


def scrape(process: Process) -> Samples:
    ready = process.ready()
    assert ready is not None and ready["metrics_port"], ready
    url = f"http://127.0.0.1:{ready['metrics_port']}/metrics"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return samples(reply.read().decode(), model="metered")


def _moved(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.mark.swarm
def test_a_generation_moves_a_running_peers_metrics(metered: LocalSwarm, checkpoint, local) -> None:
    first, second = metered.peers
    before = [scrape(first), scrape(second)]
    model = without_eos(
        AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=metered.initial_peers, model_id="metered"
        )
    )
    try:
        prompt = torch.randint(3, VOCAB, (1, PROMPT), generator=torch.Generator().manual_seed(7))
        options = dict(max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
        assert torch.equal(out, local.generate(prompt, attention_mask=torch.ones_like(prompt), **options))
    finally:
        model.shutdown()
    after = [scrape(first), scrape(second)]
    for old, new in zip(before, after, strict=True):
        assert _moved(old, new, "corolla_peer_tokens_total", phase="prompt") == PROMPT
        # each generated token but the last goes through
        assert _moved(old, new, "corolla_peer_tokens_total", phase="generated") == NEW_TOKENS - 1
        assert _moved(old, new, "corolla_peer_steps_total") == NEW_TOKENS
        assert _moved(old, new, "corolla_peer_step_seconds_count") == NEW_TOKENS
        assert _moved(old, new, "corolla_peer_batch_size_count", kind="step") == NEW_TOKENS
        assert _moved(old, new, "corolla_peer_requests_total", method="Session") == 1
        assert not [key for key in new if key[0] == "corolla_peer_errors_total"]
        assert value(new, "corolla_peer_announced_throughput_steps_per_second") == 50.0  # 100 / 2 blocks
    # every step rides one push stream from the first peer (a fresh one only if a previous run's was retired)
    assert _moved(before[1], after[1], "corolla_peer_requests_total", method="PushStream") <= 1
    assert _moved(before[1], after[1], "corolla_peer_received_bytes_total", method="PushStream") > 0
    assert _moved(before[0], after[0], "corolla_peer_sent_bytes_total", method="Push") > 0
    info = {key: v for key, v in after[0].items() if key[0] == "corolla_peer_info"}
    assert [dict(labels)["peer_id"] for labels in (key[1] for key in info)] == [first.peer_id]
    deadline = time.monotonic() + 20  # the session closes after generate() returns
    while time.monotonic() < deadline and value(scrape(first), "corolla_peer_sessions") != 0:
        time.sleep(0.2)
    final = scrape(first)
    assert value(final, "corolla_peer_sessions") == 0
    assert value(final, "corolla_peer_cache_pages", state="used") == 0
    assert value(final, "corolla_peer_cache_usage_ratio") == 0
    assert value(final, "corolla_peer_state", state="online") == 1


@pytest.mark.swarm
def test_json_logs_are_one_object_per_line(metered: LocalSwarm) -> None:
    for peer in metered.peers:
        lines = [line for line in peer.text().splitlines() if line.strip()]
        assert lines
        entries = [json.loads(line) for line in lines]
        assert all({"time", "level", "logger", "message"} <= set(entry) for entry in entries)
        assert any(entry["message"].startswith("serving model=metered") for entry in entries)


def test_a_clients_metrics_are_served_over_http() -> None:
    metrics = ClientMetrics()
    metrics.steps.inc(3)
    port = metrics.serve(0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            found = samples(reply.read().decode())
    finally:
        metrics.close()
    assert value(found, "corolla_client_steps_total") == 3
    assert not [name for name, _ in found if name.endswith("_created")]  # served without `_created` series
