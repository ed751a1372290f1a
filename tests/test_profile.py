"""What a peer reports about its steps in `Info` (`peer.stats`): where its inference steps spent their time,
its CPU time, its weights and device, which `bench/decode.py --profile` splits per hop."""

from __future__ import annotations

import grpc
from test_inprocess import STEPS, run

from protos import peer_pb2, peer_pb2_grpc

STAGES = {"steps", "decode", "wait", "compute", "encode", "report", "push"}


def _info(address: str) -> peer_pb2.InfoReply:
    with grpc.insecure_channel(address) as channel:
        return peer_pb2_grpc.PeerStub(channel).Info(peer_pb2.InfoRequest(), timeout=5)


def test_info_splits_every_step_by_stage(fake_swarm, connect) -> None:
    swarm = fake_swarm([(0, 1), (1, 3), (3, 4)])
    before = {peer.peer_id: _info(peer.address) for peer in swarm.peers}
    run(connect(swarm))
    for peer in swarm.peers:
        old, new = before[peer.peer_id], _info(peer.address)
        assert set(new.step_seconds) == STAGES
        delta = {k: new.step_seconds[k] - old.step_seconds[k] for k in STAGES}
        assert delta["steps"] == len(STEPS)  # every step of the session counted once at every hop
        assert delta["compute"] > 0 and all(value >= 0 for value in delta.values())
        assert (delta["push"] > 0) == (peer.end < 4)  # the last hop pushes to nobody
        assert new.cpu_seconds >= old.cpu_seconds > 0
        assert (new.quantization, new.device) == ("none", "cpu")
