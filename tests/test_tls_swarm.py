"""TLS bound to peer identities, against real peer processes: a server that takes over a peer's address
with another key fails the client's handshake before any call reaches it, the client bans that peer and
routes to an honest one, and the generation equals transformers'. A plaintext peer (`--insecure`) is not
used by a TLS client at all."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator

import grpc
import pytest
import torch
from families import VOCAB, without_eos
from swarm import Process, running

from client import AutoDistributedModelForCausalLM
from protos import peer_pb2, peer_pb2_grpc
from protos.identity import Identity
from protos.tls import ServerTls

pytestmark = pytest.mark.swarm

NEW_TOKENS = 12


class Impostor(peer_pb2_grpc.PeerServicer):
    """Answers every call with garbage and counts the calls that got through the TLS handshake."""

    def __init__(self) -> None:
        self.calls = 0

    async def Info(self, request, context):
        self.calls += 1
        return peer_pb2.InfoReply(model_id="tls")

    async def Session(self, request_iterator, context):
        self.calls += 1
        yield peer_pb2.SessionReply()

    async def Forward(self, request, context):
        self.calls += 1
        return peer_pb2.ForwardReply()


class ImpostorServer:
    """A gRPC server in a thread of its own, on a given port, with a certificate of another identity."""

    def __init__(self, port: int) -> None:
        self.servicer = Impostor()
        self.port = port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(30)

    async def _start(self) -> grpc.aio.Server:
        server = grpc.aio.server()
        peer_pb2_grpc.add_PeerServicer_to_server(self.servicer, server)
        credentials = ServerTls.create(Identity.load_or_create(None)).server_credentials()
        if server.add_secure_port(f"127.0.0.1:{self.port}", credentials) != self.port:
            raise RuntimeError(f"port {self.port} is taken")
        await server.start()
        return server

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(None), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)


@pytest.fixture(scope="module")
def peers(checkpoint, tmp_path_factory) -> Iterator[dict[str, Process]]:
    """The DHT, a fast TLS peer "taken" (its address is taken over below), a slower honest TLS peer, and a
    fast plaintext peer a TLS client must never use; all serve [0, 4) of the tiny Llama."""
    with running(tmp_path_factory.mktemp("tls-swarm"), checkpoint("llama"), []) as swarm:
        [taken] = swarm.start_peers(["0:4"], "--model-id", "tls", "--throughput", "1000")
        [honest] = swarm.start_peers(["0:4"], "--model-id", "tls", "--throughput", "10")
        [plain] = swarm.start_peers(["0:4"], "--model-id", "tls", "--throughput", "5000", "--insecure")
        yield {"dht": swarm.dht, "taken": taken, "honest": honest, "plain": plain}


def _generate(model, prompt: torch.Tensor) -> torch.Tensor:
    mask = torch.ones_like(prompt)
    return model.generate(
        prompt, attention_mask=mask, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False
    )


def test_a_server_at_a_peers_address_with_another_key_fails_the_handshake(peers, local, checkpoint) -> None:
    taken = peers["taken"]
    port = int(taken.address.rsplit(":", 1)[1])
    # the peer dies without a word (its signed record stays in the DHT until it expires), and another
    # server takes its address: what an attacker who hijacks the address or the record's host can do
    assert taken.stop(signal.SIGKILL) != 0
    impostor = ImpostorServer(port)
    model = None
    try:
        model = without_eos(
            AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint("llama"), initial_peers=peers["dht"].maddrs, model_id="tls"
            )
        )
        prompt = torch.randint(3, VOCAB, (1, 7), generator=torch.Generator().manual_seed(3))
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            out = _generate(model, prompt)
            route = [hop.peer_id for hop in session.route]
        assert torch.equal(out, _generate(local, prompt))
        assert route == [peers["honest"].peer_id]  # neither the impostor nor the plaintext peer
        assert taken.peer_id in model.swarm.bans.banned()
        assert impostor.servicer.calls == 0  # no call got past the handshake
    finally:
        if model is not None:
            model.shutdown()
        impostor.stop()


def test_a_plaintext_peer_serves_only_insecure_clients(peers, local, checkpoint) -> None:
    model = without_eos(
        AutoDistributedModelForCausalLM.from_pretrained(
            checkpoint("llama"), initial_peers=peers["dht"].maddrs, model_id="tls", insecure=True
        )
    )
    try:
        prompt = torch.randint(3, VOCAB, (1, 5), generator=torch.Generator().manual_seed(4))
        with model.inference_session(max_length=prompt.shape[1] + NEW_TOKENS) as session:
            out = _generate(model, prompt)
            route = [hop.peer_id for hop in session.route]
        assert route == [peers["plain"].peer_id]  # the only peer it can reach (TLS peers refuse plaintext)
        assert torch.equal(out, _generate(local, prompt))
    finally:
        model.shutdown()
