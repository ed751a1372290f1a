"""The `corolla` command: dispatches each subcommand to the side it drives, importing only that side; and
what every command shares: `emit`, the one way a command writes its result on stdout (logs and progress go
to stderr), logging setup, the ready file a supervisor or test waits for, and the installed version."""

from __future__ import annotations

import importlib
import json
import logging
import os
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

# name -> ("module:function" taking (argv, prog), one-line help); modules load lazily so `--help` is fast
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare-model": (
        "protos.prepare:main",
        "build a local safetensors folder (the default SmolLM2-135M-Instruct, or from a GGUF file)",
    ),
    "dht": ("peer.main:dht_main", "run a bootstrap DHT node and print its multiaddresses"),
    "serve": ("peer.main:serve_main", "serve a span of a model's blocks to the swarm"),
    "generate": ("client.cli:main", "generate text through the swarm, streamed to stdout"),
    "health": ("client.health:health_main", "show which peers serve a model and which blocks nobody serves"),
    "keygen": ("protos.swarm_key:keygen_main", "write a new random swarm key for a private swarm"),
    "api": (
        "client.cli:api_main",
        "serve the OpenAI API (chat, completions) over the swarm",
    ),
}


def emit(text: str) -> None:
    """A command's result on stdout, one line (or block) at a time, flushed: a pipe reads it as it comes."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr, force=True
    )
    for noisy in ("hivemind", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def write_ready_file(path: Path, content: dict[str, Any]) -> None:
    """Replace `path` with `content` as JSON; written next to it first, so a reader never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as handle:
        json.dump(content, handle)
    os.replace(handle.name, path)


def corolla_version() -> str:
    try:
        return version("corolla")
    except PackageNotFoundError:
        return "0+unknown"


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: corolla COMMAND [options]",
        "",
        "Run large language models as a peer-to-peer swarm.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "Run `corolla COMMAND --help` for the options of one command."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"corolla: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    module_name, _, function = COMMANDS[name][0].partition(":")
    entry = getattr(importlib.import_module(module_name), function)
    return int(entry(rest, prog=f"corolla {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
