"""The client `tests/test_wan_swarm.py` runs inside a namespace: `python -m tests.wan_client ARGS`, or forked
from the test run's fork server (`tests/forkserver.py`).

ARGS is JSON {model, initial_peers, model_id, prompt, new_tokens, pause_at, folder}. At the `pause_at`-th new
token it writes paused.json (its route) and waits for a file named `resume`, so the test acts (kills, cuts)
between two tokens. It writes result.json: the tokens, per-token times (time.perf_counter(), the failovers'
clock), the route at the first and at the last token, the failovers.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from client import AutoDistributedModelForCausalLM

RESUME_TIMEOUT = 90.0  # seconds the client waits for the test to act at the pause


def _hops(route: Any) -> list[list[Any]]:
    return [[hop.peer_id, hop.start, hop.end] for hop in route]


class Clock:
    """A streamer: the time of each token (the first put is the prompt), the route, the pause."""

    def __init__(self, session: Any, folder: Path, pause_at: int | None) -> None:
        self.session, self.folder, self.pause_at = session, folder, pause_at
        self.seen, self.events, self.first_route = -1, [], None
        self.events: list[list[Any]]
        self.first_route: list[list[Any]] | None

    def put(self, value: torch.Tensor) -> None:
        self.seen += 1
        self.events.append(["token", self.seen, time.perf_counter()])
        if self.seen == 1:
            self.first_route = _hops(self.session.route)
        if self.seen == self.pause_at:
            paused = {"token": self.seen, "route": _hops(self.session.route)}
            (self.folder / "paused.json").write_text(json.dumps(paused))
            deadline = time.perf_counter() + RESUME_TIMEOUT
            while not (self.folder / "resume").exists():
                if time.perf_counter() > deadline:
                    raise TimeoutError("the test did not resume the client")
                time.sleep(0.01)
            self.events.append(["resumed", self.seen, time.perf_counter()])

    def end(self) -> None:
        pass


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("client.latency").setLevel(logging.DEBUG)  # how long the round trips took to measure
    args = json.loads((sys.argv[1:] if argv is None else list(argv))[0])
    folder = Path(args["folder"])
    model = AutoDistributedModelForCausalLM.from_pretrained(
        args["model"], initial_peers=args["initial_peers"], model_id=args["model_id"]
    )
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    prompt = torch.tensor([args["prompt"]])
    new_tokens = args["new_tokens"]
    try:
        with model.inference_session(max_length=prompt.shape[1] + new_tokens) as session:
            clock = Clock(session, folder, args["pause_at"])
            tokens = model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                streamer=clock,
            )
            failovers = [
                {
                    "peer_id": f.peer_id,
                    "reason": f.reason,
                    "failed_at": f.failed_at,
                    "replaced_at": f.replaced_at,
                }
                for f in session.failovers
            ]
            result = {
                "tokens": tokens[0].tolist(),
                "events": clock.events,
                "first_route": clock.first_route,
                "last_route": _hops(session.route),
                "failovers": failovers,
                "num_failovers": session.num_failovers,
            }
        result["banned"] = sorted(model.swarm.bans.banned())
        result["rtts"] = model.swarm.stats.rtts()
    finally:
        model.shutdown()
    (folder / "result.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
