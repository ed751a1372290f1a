"""Cost of a failover on SmolLM2-135M-Instruct: the middle hop of a 6-peer local swarm (two peers per span)
is killed (SIGKILL) or frozen (SIGSTOP) after a few generated tokens, at short and long contexts.

Prints JSON, per scenario: the time from the fault to the next token (`fault_to_next_token_s`) and the
extra time it took (`recovery_s`: that gap minus a normal decode step), when the client gave up on the hop
(`detect_s`) and had its replacement replayed (`replaced_s`), the positions replayed, the failovers counted
by the session (also those before the fault), and whether the tokens equal those of a no-fault run. The
client runs with its default settings (`ClientConfig()`: adaptive hop deadlines, pings). Each scenario gets
fresh peers under its own model id (no dead record or cache is reused), each warmed up by one forward of
the prompt's length.

    python bench/failover.py [--contexts 128 1024] [--new-tokens 8] [--fault-token 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import statistics
import time

import grpc
import torch
from transformers.utils import logging as hf_logging

from client.config import ClientConfig
from client.local_swarm import LocalProcess, LocalSwarm, running
from client.model import AutoDistributedModelForCausalLM
from client.session import InferenceSession
from protos import peer_pb2, peer_pb2_grpc
from protos.checkpoint import load_config
from protos.prepare import prepare_default_model
from protos.tensors import to_message

SPANS = ["0:10", "0:10", "10:20", "10:20", "20:30", "20:30"]
PEER_OPTIONS = ("--step-timeout", "2", "--announce-period", "5", "--throughput", "10")
FAULTS = {"killed": signal.SIGKILL, "frozen": signal.SIGSTOP}


class _Clock:
    """A streamer: the time of every put (the prompt first), and a fault sent to a hop at token `at`."""

    def __init__(self, session: InferenceSession, peers: dict[str, LocalProcess], at: int, sig: int | None):
        self.session, self.peers, self.at, self.sig = session, peers, at, sig
        self.times: list[float] = []
        self.fault_time: float | None = None
        self.faulted: LocalProcess | None = None
        self.failovers_before_fault = 0

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        if self.sig is not None and len(self.times) - 1 == self.at:
            if len(self.session.route) < 3:
                raise RuntimeError(f"expected a 3-hop route, got {self.session.route}")
            self.faulted = self.peers[self.session.route[1].peer_id]
            os.kill(self.faulted.popen.pid, self.sig)
            self.fault_time = time.perf_counter()
            self.failovers_before_fault = self.session.num_failovers

    def end(self) -> None:
        pass


def _warm_up(peers: list[LocalProcess], context: int, hidden_size: int) -> None:
    """A stateless forward of `context` positions on every peer: no measured step pays a cold start."""
    hidden = to_message(torch.randn(1, context, hidden_size))  # [batch, seq, hidden]
    options = [("grpc.max_receive_message_length", 2**30)]
    for peer, span in zip(peers, SPANS, strict=True):
        start, end = map(int, span.split(":"))
        with grpc.insecure_channel(peer.address, options=options) as channel:
            request = peer_pb2.ForwardRequest(start=start, end=end, hidden=hidden)
            peer_pb2_grpc.PeerStub(channel).Forward(request, timeout=120)


def _run(swarm: LocalSwarm, model_id: str, peers: list[LocalProcess], prompt, args, sig):
    """One greedy generation; returns the tokens, the streamer and the session's failover count."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        swarm.model,
        initial_peers=swarm.initial_peers,
        model_id=model_id,
    )
    model.generation_config.eos_token_id = None  # always exactly --new-tokens tokens
    model.generation_config.pad_token_id = 0
    try:
        with model.inference_session(max_length=prompt.shape[1] + args.new_tokens) as session:
            clock = _Clock(session, {p.peer_id: p for p in peers}, args.fault_token, sig)
            try:
                out = model.generate(
                    prompt,
                    attention_mask=torch.ones_like(prompt),
                    max_new_tokens=args.new_tokens,
                    min_new_tokens=args.new_tokens,
                    do_sample=False,
                    streamer=clock,
                )
            finally:
                if clock.faulted is not None and sig == signal.SIGSTOP:
                    os.kill(clock.faulted.popen.pid, signal.SIGCONT)
            return out, clock, session
    finally:
        model.shutdown()


def _baseline(out: torch.Tensor, clock: _Clock, session: InferenceSession) -> dict:
    gaps = [b - a for a, b in itertools.pairwise(clock.times[1:])]  # after the prompt and the prefill token
    return {
        "tokens": out,
        "normal_token_s": statistics.median(gaps),
        "first_token_s": round(clock.times[1] - clock.times[0], 3),
        "failovers": session.num_failovers,
    }


def _scenario(swarm: LocalSwarm, context: int, fault: str, prompt, baselines: dict, args) -> dict:
    model_id = f"smollm2-bench-{fault}-{context}-{os.getpid()}"
    peers = swarm.start_peers(SPANS, "--model-id", model_id, *PEER_OPTIONS)
    try:
        _warm_up(peers, context, load_config(swarm.model).hidden_size)
        if context not in baselines:  # the no-fault run: once per context, on the first scenario's peers
            baselines[context] = _baseline(*_run(swarm, model_id, peers, prompt, args, None))
        out, clock, session = _run(swarm, model_id, peers, prompt, args, FAULTS[fault])
    finally:
        for process in peers:
            process.stop()
    if clock.fault_time is None or clock.faulted is None:
        raise RuntimeError(f"no fault was sent: only {len(clock.times) - 1} tokens came out")
    baseline = baselines[context]
    to_next = clock.times[args.fault_token + 1] - clock.fault_time
    failovers = [event for event in session.failovers if event.peer_id == clock.faulted.peer_id]
    return {
        "fault": fault,
        "context": context,
        "recovery_s": round(to_next - baseline["normal_token_s"], 3),
        "fault_to_next_token_s": round(to_next, 3),
        "detect_s": round(failovers[0].failed_at - clock.fault_time, 3) if failovers else None,
        "replaced_s": round(failovers[0].replaced_at - clock.fault_time, 3) if failovers else None,
        "reason": failovers[0].reason if failovers else None,
        "normal_token_ms": round(baseline["normal_token_s"] * 1000, 2),
        "tokens_replayed": failovers[0].replay_positions if failovers else None,
        "failovers": session.num_failovers,
        "failovers_before_fault": clock.failovers_before_fault,
        "same_output": bool(torch.equal(out, baseline["tokens"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--contexts", type=int, nargs="+", default=[128, 1024], help="prompt lengths in tokens"
    )
    parser.add_argument("--new-tokens", type=int, default=8, help="generated tokens per run (greedy)")
    parser.add_argument(
        "--fault-token", type=int, default=3, help="the fault is sent when this generated token is out"
    )
    parser.add_argument(
        "--faults", nargs="+", choices=list(FAULTS), default=list(FAULTS), help="faults to measure"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompt token ids")
    args = parser.parse_args()
    if not 1 <= args.fault_token < args.new_tokens:
        parser.error("--fault-token must be at least 1 and less than --new-tokens")
    hf_logging.disable_progress_bar()
    folder = prepare_default_model()
    started = time.perf_counter()
    baselines: dict[int, dict] = {}
    results = []
    with running(folder, []) as swarm:  # one DHT; each scenario starts (and stops) its own peers
        for context in args.contexts:
            generator = torch.Generator().manual_seed(args.seed)
            prompt = torch.randint(100, 40000, (1, context), generator=generator)
            for fault in args.faults:
                results.append(_scenario(swarm, context, fault, prompt, baselines, args))
    no_fault = {
        context: {key: value for key, value in run.items() if key in ("first_token_s", "failovers")}
        for context, run in baselines.items()
    }
    print(
        json.dumps(
            {
                "model": str(folder),
                "peers": SPANS,
                "new_tokens": args.new_tokens,
                "fault_token": args.fault_token,
                "client": ClientConfig().model_dump(
                    include={"min_hop_timeout", "hop_timeout_factor", "ping_timeout"}
                ),
                "no_fault_runs": no_fault,
                "scenarios": results,
                "wall_s": round(time.perf_counter() - started, 1),
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
