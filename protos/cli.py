"""The `corolla` command: dispatches each subcommand to the side it drives, importing only that side; and
what every command shares: `emit`, the one way a command writes its result on stdout (logs and progress go
to stderr), logging setup (text or JSON lines), progress lines, the ready file a supervisor or test waits
for, and the installed version."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

PROGRESS_REFRESH_PERIOD = 0.5  # seconds between redraws of a progress line

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
    "peer-id": (
        "protos.identity:peer_id_main",
        "print the peer id (or multiaddress) of a node's identity file, offline",
    ),
    "api": (
        "client.cli:api_main",
        "serve the OpenAI API (chat, completions) over the swarm",
    ),
    "monitor": (
        "client.monitor:monitor_main",
        "serve a live web page (and JSON) of a swarm's peers and coverage",
    ),
}


def emit(text: str) -> None:
    """A command's result on stdout, one line (or block) at a time, flushed: a pipe reads it as it comes."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


# the standard names whatever a library renamed them to (hivemind calls WARNING "WARN")
_LEVELS = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": _LEVELS.get(record.levelno, record.levelname),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_requested_level: int | None = None  # --log-level (or a command's LOG_LEVEL variable), once given


def request_log_level(name: str) -> None:
    """Log at `name` (one of LOG_LEVELS) from now on, whatever level a command would choose itself: set at
    once, so a command that only calls `logging.basicConfig` keeps it, and by every `setup_logging`."""
    global _requested_level
    _requested_level = logging.getLevelName(name.upper())
    setup_logging()


def log_level_requested() -> bool:
    return _requested_level is not None


def take_log_level(argv: list[str]) -> tuple[list[str], str | None]:
    """`argv` without its `--log-level LEVEL` (or `--log-level=LEVEL`), and LEVEL; before any `--`."""
    rest: list[str] = []
    level = None
    words = iter(argv)
    for word in words:
        if word == "--":
            rest += [word, *words]
        elif word == "--log-level":
            level = next(words, "")
        elif word.startswith("--log-level="):
            level = word.partition("=")[2]
        else:
            rest.append(word)
    return rest, level


def setup_logging(level: int | None = None, *, log_format: str = "text", default: int = logging.INFO) -> None:
    """Logs on stderr: `text` lines, or `json` (one object per line, for log collectors), at `level`, else
    the one --log-level asked for, else `default`."""
    level = level if level is not None else _requested_level if _requested_level is not None else default
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
        from hivemind.utils.logging import use_hivemind_log_handler  # the commands that log JSON load it

        use_hivemind_log_handler("nowhere")  # hivemind's own text handler off: its records come here too
        logging.captureWarnings(True)  # Python's warnings too: every line on stderr is one JSON object
        # and no progress bars from transformers or the hub (read at import, or switched off if loaded)
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if "transformers" in sys.modules:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for noisy in ("hivemind", "transformers"):  # their DEBUG is a flood: WARNING unless asked for less
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@contextlib.contextmanager
def progress(what: str, *, enabled: bool = True) -> Iterator[None]:
    """A progress line on stderr while something long runs (loading a span, measuring throughput): `what`
    and the time so far, refreshed twice a second. Only on a terminal: logs collected from a file or a
    pipe stay clean."""
    from tqdm import tqdm  # loaded by the commands that wait, not by every `corolla --help`

    disable = None if enabled else True  # None: on a terminal only
    bar = tqdm(desc=what, bar_format="{desc}: {elapsed}", file=sys.stderr, leave=False, disable=disable)
    done = threading.Event()

    def tick() -> None:
        while not done.wait(PROGRESS_REFRESH_PERIOD):
            bar.refresh()

    ticker = threading.Thread(target=tick, name="corolla-progress", daemon=True)
    if not bar.disable:
        ticker.start()
    try:
        yield
    finally:
        done.set()
        if ticker.is_alive():
            ticker.join()
        bar.close()


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


def add_log_level(parser: argparse.ArgumentParser) -> None:
    """List --log-level in the help of a command whose parser is written by hand (the dispatcher applies it
    before the command runs)."""
    parser.add_argument(
        "--log-level", choices=LOG_LEVELS, help="log at this level and above (default: the command's own)"
    )


def _usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: corolla COMMAND [options]    (or: corolla --version)",
        "",
        "Run large language models as a peer-to-peer swarm.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "Run `corolla COMMAND --help` for the options of one command. Every command takes --log-level "
        f"{{{','.join(LOG_LEVELS)}}}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        print(f"corolla {corolla_version()}")
        return 0
    name, (rest, level) = argv[0], take_log_level(argv[1:])
    if name not in COMMANDS:
        print(f"corolla: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    if level is not None:  # every command takes it, also those whose parser does not list it
        if level.upper() not in LOG_LEVELS:
            print(f"corolla {name}: --log-level: choose from {', '.join(LOG_LEVELS)}", file=sys.stderr)
            return 2
        request_log_level(level)
    # every command computes on a machine it may share with peers of the same pipeline: OpenMP threads that
    # spin after each forward would take the core the next stage needs (set before torch starts its threads)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    module_name, _, function = COMMANDS[name][0].partition(":")
    try:
        entry = getattr(importlib.import_module(module_name), function)
        return int(entry(rest, prog=f"corolla {name}") or 0)
    except ImportError as e:  # a module of an extra this install lacks: name the extra, no traceback
        from protos.extras import missing_extra

        problem = missing_extra(e, needed_by=f"corolla {name}")
        if problem is None:
            raise
        print(problem, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
