"""A private swarm against real processes on 127.0.0.1: a keyed `corolla dht` and two keyed peers ([0, 2)
pushes to [2, 4)). With the key, generation and a stateless forward equal transformers'. A DHT node without
the key, or with another swarm's key, fails to bootstrap; started anyway it reads nothing, writes nothing
and is in no member's routing table; a keyed node cannot join the public swarm either. A gRPC caller
without the swarm token (or with a wrong one) gets UNAUTHENTICATED on every RPC, where a member's same
calls go through."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import torch
from families import HIDDEN, VOCAB, without_eos
from hivemind.dht.node import DHTNode
from hivemind.utils.timed_storage import get_dht_time
from records_factory import peer_record
from swarm import LocalSwarm, Process, certificate, channel, running

from client import AutoDistributedModelForCausalLM
from client.config import ClientConfig
from client.errors import SwarmError
from client.health import health_main, read_view
from protos import peer_pb2, peer_pb2_grpc
from protos.dht import JoinError, start_dht_node
from protos.records import block_key, record_to_dht
from protos.swarm import read_records
from protos.swarm_key import METADATA_KEY, SwarmKey
from protos.tensors import to_message

pytestmark = [pytest.mark.swarm, pytest.mark.timeout(300)]

MODEL_ID = "private"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keys")
    for name in ("swarm", "other"):
        SwarmKey.create(folder / f"{name}.key")
    return {name: folder / f"{name}.key" for name in ("swarm", "other")}


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory, keys) -> Iterator[LocalSwarm]:
    key = ("--swarm-key", str(keys["swarm"]))
    with running(
        tmp_path_factory.mktemp("private-swarm"),
        checkpoint("llama"),
        ["0:2", "2:4"],
        "--model-id",
        MODEL_ID,
        *key,
        dht_options=key,
    ) as swarm:
        yield swarm


def _generate(model, prompt: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(prompt)
    return model.generate(
        prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )


def test_members_generate_and_forward_as_transformers(swarm, keys, local, checkpoint, capsys) -> None:
    model = without_eos(
        AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=swarm.initial_peers, model_id=MODEL_ID, swarm_key=keys["swarm"]
        )
    )
    try:
        prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(5))
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            out = _generate(model, prompt)
            route = [hop.peer_id for hop in session.route]
        assert route == [peer.peer_id for peer in swarm.peers]  # a push from one peer to the other
        assert torch.equal(out, _generate(local, prompt))
        with torch.no_grad():
            torch.testing.assert_close(model(prompt).logits, local(prompt).logits, atol=1e-5, rtol=0)
        assert not model.swarm.bans.banned()
    finally:
        model.shutdown()
    options = [MODEL_ID, "--initial-peers", *swarm.initial_peers, "--json"]
    assert health_main([*options, "--swarm-key", str(keys["swarm"])], prog="corolla health") == 0
    report = json.loads(capsys.readouterr().out)
    assert {peer["peer_id"] for peer in report["peers"]} == {p.peer_id for p in swarm.peers}
    assert health_main(options, prog="corolla health") == 1
    assert "another key" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.parametrize("key", [None, "other"])
def test_a_client_without_the_key_cannot_join(swarm, keys, checkpoint, key) -> None:
    with pytest.raises(JoinError, match="none of the initial peers answered"):
        AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"),
            initial_peers=swarm.initial_peers,
            model_id=MODEL_ID,
            swarm_key=keys[key] if key else None,
        )
    config = ClientConfig(initial_peers=swarm.initial_peers, swarm_key=keys[key] if key else None)
    with pytest.raises(SwarmError, match="another key"):
        asyncio.run(read_view(config, MODEL_ID))


async def _in_any_routing_table(member: DHTNode, stranger: DHTNode) -> bool:
    """Whether any member (this one, the DHT process, the peers) lists `stranger` among the nodes nearest
    to its id: in a swarm this small, each member's routing table holds every node it knows."""
    if stranger.node_id in member.protocol.routing_table:
        return True
    nearest = await member.find_nearest_nodes([stranger.node_id], k_nearest=64)
    return stranger.node_id in nearest[stranger.node_id]


@pytest.mark.parametrize("key", [None, "other"])
def test_a_dht_node_without_the_key_never_enters_the_swarm(swarm, keys, key) -> None:
    member_key = SwarmKey.load(keys["swarm"])
    stranger_key = SwarmKey.load(keys[key]) if key else None

    async def scenario() -> None:
        member = await start_dht_node(initial_peers=swarm.initial_peers, swarm_key=member_key)
        peers = [*swarm.initial_peers, *map(str, await member.get_visible_maddrs())]
        try:
            with pytest.raises(JoinError, match="another key"):
                await start_dht_node(initial_peers=peers, swarm_key=stranger_key)
            with pytest.raises(JoinError):
                await start_dht_node(initial_peers=peers, client_mode=True, swarm_key=stranger_key)
            stranger = await start_dht_node(
                initial_peers=peers, swarm_key=stranger_key, ensure_bootstrap_success=False
            )
            try:
                assert await read_records(member, MODEL_ID, 4)  # the swarm's records are there...
                assert await read_records(stranger, MODEL_ID, 4) == {}  # ...but not for the stranger
                record = record_to_dht(peer_record(0, 4, 1e6, port=6666))
                stranger_id = stranger.peer_id.to_base58()
                expiration = get_dht_time() + 60
                key = block_key(MODEL_ID, 0)
                assert not await stranger.store(
                    key, record, expiration, subkey=stranger_id, exclude_self=True
                )
                assert stranger_id not in await read_records(member, MODEL_ID, 4)
                assert not await _in_any_routing_table(member, stranger)
            finally:
                await stranger.shutdown()
        finally:
            await member.shutdown()

    asyncio.run(scenario())


def test_a_keyed_node_cannot_join_the_public_swarm(keys) -> None:
    async def scenario() -> None:
        public = await start_dht_node()
        try:
            maddrs = [str(maddr) for maddr in await public.get_visible_maddrs()]
            with pytest.raises(JoinError, match="private swarm key"):
                await start_dht_node(initial_peers=maddrs, swarm_key=SwarmKey.load(keys["swarm"]))
            joined = await start_dht_node(initial_peers=maddrs)  # the public swarm works as before
            await joined.shutdown()
        finally:
            await public.shutdown()

    asyncio.run(scenario())


def _hidden() -> peer_pb2.Tensor:
    return to_message(torch.randn(1, 3, HIDDEN, generator=torch.Generator().manual_seed(0)))


def _outcomes(process: Process, metadata: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Each RPC's status code name ("OK" when it succeeds), called with `metadata` over TLS."""
    requests = {
        "Info": peer_pb2.InfoRequest(),
        "Forward": peer_pb2.ForwardRequest(start=0, end=2, hidden=_hidden()),
        "Backward": peer_pb2.BackwardRequest(start=0, end=2, hidden=_hidden(), grad_output=_hidden()),
        "Push": peer_pb2.PushRequest(step=peer_pb2.Step(session_id="s", hidden=_hidden()), push_token=b"t"),
    }
    outcomes = {}
    with channel(process) as open_channel:
        stub = peer_pb2_grpc.PeerStub(open_channel)
        for name, request in requests.items():
            try:
                getattr(stub, name)(request, metadata=metadata, timeout=30)
                outcomes[name] = "OK"
            except grpc.RpcError as e:
                outcomes[name] = e.code().name
        try:
            replies = stub.Session(iter([peer_pb2.SessionRequest()]), metadata=metadata, timeout=30)
            list(replies)
            outcomes["Session"] = "OK"
        except grpc.RpcError as e:
            outcomes["Session"] = e.code().name
        try:  # a member's made-up frame gets a nack, and the stream ends OK once the caller's frames do
            list(stub.PushStream(iter([requests["Push"]]), metadata=metadata, timeout=30))
            outcomes["PushStream"] = "OK"
        except grpc.RpcError as e:
            outcomes["PushStream"] = e.code().name
    return outcomes


def test_every_rpc_refuses_a_caller_without_the_token(swarm, keys) -> None:
    first = swarm.peers[0]
    token = SwarmKey.load(keys["swarm"]).grpc_token(certificate(first))
    member = _outcomes(first, ((METADATA_KEY, token),))
    # a member gets past the guard: a valid Forward/Backward/Info succeeds, made-up ones get the usual codes
    assert member["Info"] == member["Forward"] == member["Backward"] == "OK"
    assert "UNAUTHENTICATED" not in member.values()
    refused = dict.fromkeys(
        ["Info", "Forward", "Backward", "Push", "Session", "PushStream"], "UNAUTHENTICATED"
    )
    assert _outcomes(first, ()) == refused
    wrong = SwarmKey.load(keys["other"]).grpc_token(certificate(first))
    assert _outcomes(first, ((METADATA_KEY, wrong),)) == refused
    for_another_peer = SwarmKey.load(keys["swarm"]).grpc_token(certificate(swarm.peers[1]))
    assert _outcomes(first, ((METADATA_KEY, for_another_peer),)) == refused
    assert "grpc call refused: no valid swarm token" in first.text()
