"""A real peer that lies: `python -m tests.hostile_peer --corrupt nan|shape|perturb <corolla serve args>` runs
`corolla serve` unchanged except that every output of its span (session steps, reported and pushed alike,
and Forward replies) comes out garbled: all NaN, twice as many positions, or plausible values off by 0.01.
`start_peers` starts such peers and honest ones together for a test; each is stopped by PID."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from client import local_swarm
from client.local_swarm import LocalProcess
from peer import main as peer_main
from peer.blocks import HostedSpan

MODES = ("nan", "shape", "perturb")


def garble(output: torch.Tensor, mode: str) -> torch.Tensor:
    """`output` [batch, seq, hidden] as the hostile peer sends it."""
    if mode == "nan":
        return torch.full_like(output, float("nan"))
    if mode == "shape":
        return torch.cat([output, output], dim=1)
    if mode == "perturb":
        return output + 0.01
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


class HostileSpan(HostedSpan):
    """A hosted span whose forward outputs are garbled (`mode`); backward stays honest."""

    mode: ClassVar[str] = "nan"

    def forward(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return garble(super().forward(hidden, *args, **kwargs), self.mode)

    def forward_batch(self, items: Any, **kwargs: Any) -> list[torch.Tensor | Exception]:
        """Inference steps and stateless Forwards: each output garbled."""
        outputs = super().forward_batch(items, **kwargs)
        return [output if isinstance(output, Exception) else garble(output, self.mode) for output in outputs]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.hostile_peer",
        description="corolla serve, with every output of the span garbled; other options go to corolla serve",
    )
    parser.add_argument("--corrupt", choices=MODES, required=True, help="how outputs are garbled")
    args, serve_args = parser.parse_known_args(argv)
    HostileSpan.mode = args.corrupt
    peer_main.HostedSpan = HostileSpan  # type: ignore[misc]  # the peer loads its span through this name
    return peer_main.serve_main(serve_args, prog="corolla serve")


def start_peers(
    log_dir: Path,
    model: Path | str,
    initial_peers: list[str],
    peers: list[tuple[str, str | None, Sequence[str]]],
    *,
    env: dict[str, str] | None = None,
) -> list[LocalProcess]:
    """Start peers (blocks, corruption mode or None for an honest one, `corolla serve` options) at once,
    then wait for each to serve; all are stopped if one fails to start."""
    started: list[LocalProcess] = []
    try:
        for blocks, mode, options in peers:
            # the helpers `corolla serve` processes start with; a hostile one takes the args after "serve"
            args = local_swarm._peer_args(model, blocks, initial_peers, tuple(options))
            if mode is not None:
                args = ["--corrupt", mode, *args[1:]]
            name = f"{len(started)}-{mode or 'honest'}-{blocks.replace(':', '-')}"
            log = local_swarm._peer_log(log_dir, blocks, name)
            module = "protos.cli" if mode is None else "tests.hostile_peer"
            started.append(local_swarm._spawn(args, log, env, module=module))
        for process in started:
            local_swarm._serving(process)
    except BaseException:
        for process in started:
            process.stop()
        raise
    return started


if __name__ == "__main__":
    sys.exit(main())
