"""`corolla health MODEL --initial-peers ...`: which peers announce a model, and which blocks nobody serves.

Reads the DHT once as a client; exit code 0 when ONLINE peers cover every block, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from client.config import ClientConfig
from client.discovery import DhtDiscovery, SwarmView
from client.errors import NoRouteError, SwarmError, format_ranges, short_id
from client.route import block_ranges, missing_blocks
from protos.cli import emit
from protos.dht import JoinError, start_dht_node
from protos.errors import InvalidInputError
from protos.records import model_id_from_path
from protos.settings import (
    add_config_arguments,
    command_parser,
    config_from_arguments,
    validation_problems,
)
from protos.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

_OPTIONS = ("initial_peers", "model_id", "swarm_key")  # the ClientConfig fields this command uses


async def read_view(config: ClientConfig, model_id: str) -> SwarmView:
    """Join the DHT as a client, read the model's records once, leave."""
    swarm_key = SwarmKey.load(config.swarm_key) if config.swarm_key is not None else None
    try:
        node = await start_dht_node(initial_peers=config.initial_peers, client_mode=True, swarm_key=swarm_key)
    except JoinError as e:
        raise SwarmError(str(e)) from e
    except Exception as e:  # hivemind reports unreachable or malformed initial peers in several types
        raise SwarmError(f"cannot join the DHT through --initial-peers: {e}") from e
    try:
        discovery = DhtDiscovery(node, model_id, refresh_period=config.refresh_period)
        try:
            return await discovery.view()
        finally:
            await discovery.close()
    finally:
        await node.shutdown()


def report(view: SwarmView, model_id: str) -> dict[str, Any]:
    """The health of one model's swarm as plain data (what `--json` prints)."""
    missing = missing_blocks(view)
    per_block = view.throughput()
    weakest = min(per_block)
    return {
        "model_id": model_id,
        "num_blocks": view.num_blocks,
        "served": not missing,
        "missing": [list(blocks) for blocks in missing],
        "coverage": view.coverage(),
        "throughput": per_block,
        "bottleneck": {
            "throughput": weakest,
            "blocks": [list(r) for r in block_ranges(b for b, t in enumerate(per_block) if t == weakest)],
        },
        "peers": [
            {"peer_id": peer_id, **record.model_dump(mode="json", exclude={"pings"})}
            for peer_id, record in sorted(view.peers().items(), key=lambda item: (item[1].start, item[1].end))
        ],
    }


def format_report(health: dict[str, Any]) -> str:
    """A table of peers, then the blocks grouped by how many ONLINE peers serve them."""
    num_blocks = health["num_blocks"]
    lines = [f"model {health['model_id']}: {num_blocks} blocks, {len(health['peers'])} peers", ""]
    header = (
        "PEER",
        "STATE",
        "ADDRESS",
        "SPAN",
        "WEIGHTS",
        "STEPS/S",
        "BATCHED TOK/S",
        "LOAD",
        "FREE CACHE",
        "NAME",
    )
    rows = [
        (
            short_id(peer["peer_id"]),
            peer["state"],
            peer["address"],
            f"[{peer['start']},{peer['end']})",
            peer["dtype"] if peer["quantization"] == "none" else f"{peer['dtype']}+{peer['quantization']}",
            f"{peer['throughput']:.1f}",
            f"{peer['batch_throughput']:.1f}" if peer["batch_throughput"] else "-",
            f"{peer['num_sessions']} sessions, {peer['queued']} queued",
            str(peer["free_cache_tokens"]),
            peer["public_name"] or "-",
        )
        for peer in health["peers"]
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines += [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.append("")
    coverage: list[int] = health["coverage"]
    per_block: list[float] = health["throughput"]
    start = 0
    for block in range(1, num_blocks + 1):
        if block == num_blocks or (coverage[block], per_block[block]) != (coverage[start], per_block[start]):
            count = coverage[start]
            served = (
                f"{count} online peer{'s' if count > 1 else ''}, {per_block[start]:.1f} steps/s"
                if count
                else "NOT SERVED"
            )
            lines.append(f"blocks {format_ranges([(start, block)])}: {served}")
            start = block
    bottleneck = health["bottleneck"]
    weakest = format_ranges([tuple(r) for r in bottleneck["blocks"]])
    lines.append(f"bottleneck: {bottleneck['throughput']:.1f} steps/s at blocks {weakest}")
    missing = [tuple(blocks) for blocks in health["missing"]]
    if missing:
        lines.append(f"missing: {NoRouteError(missing, num_blocks=num_blocks)}")
    else:
        lines.append(f"ok: blocks 0..{num_blocks - 1} are all served by ONLINE peers")
    return "\n".join(lines)


def health_main(argv: Sequence[str], prog: str) -> int:
    parser = command_parser(
        prog,
        "Show the peers that announce a model and the blocks nobody serves. Exits 0 when ONLINE peers serve "
        "every block, 1 otherwise.",
    )
    parser.add_argument(
        "model", metavar="MODEL", help="model folder or hub name; its last part is the model id by default"
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")
    add_config_arguments(
        parser, ClientConfig, skip=[name for name in ClientConfig.model_fields if name not in _OPTIONS]
    )
    args = parser.parse_args(list(argv))
    try:
        config = config_from_arguments(ClientConfig, args)
        model_id = config.model_id or model_id_from_path(args.model)
    except ValidationError as e:
        parser.error(validation_problems(e))
    except InvalidInputError as e:
        parser.error(str(e))
    if not config.initial_peers:
        parser.error("--initial-peers is required: the multiaddresses `corolla dht` or a peer printed")
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    logging.getLogger("hivemind").setLevel(logging.ERROR)
    try:
        health = report(asyncio.run(read_view(config, model_id)), model_id)
    except SwarmError as e:
        if args.json:
            emit(json.dumps({"model_id": model_id, "served": False, "error": str(e)}))
        else:
            sys.stderr.write(f"{prog}: {e}\n")
        return 1
    emit(json.dumps(health, indent=2) if args.json else format_report(health))
    return 0 if health["served"] else 1
