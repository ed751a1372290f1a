"""The README is executed as written: every `corolla ...` line of its shell blocks parses with that command's
own parser and builds its configs (placeholders such as MODEL, MADDR... and `[--option N]` stand for
values), and the Python API example runs against a local swarm serving SmolLM2, with only the swarm's
address (the `INITIAL_PEERS = [...]` line) substituted."""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from swarm import running
from test_deploy import Invocation, parse

from protos import cli
from protos.prepare import prepare_default_model
from protos.swarm_key import SwarmKey

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
MADDR = "/ip4/10.0.0.1/tcp/31337/p2p/12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
# the README's placeholders -> values of the type the option takes; any other word is parsed as written
STAND_INS = {"MADDR...": MADDR, "MADDR": MADDR, "N": "16", "T": "0.7"}
SWARM_KEY = "~/.corolla/swarm.key"  # the README's key file: a real one stands in (commands read it)
PEERS_LINE = re.compile(r"^INITIAL_PEERS = \[.*\](?=  #)", flags=re.MULTILINE)


def blocks(language: str) -> list[tuple[int, str]]:
    """(line number of the first line, text) of each fenced block in `language`."""
    return [
        (README[: match.start()].count("\n") + 2, match.group(1))
        for match in re.finditer(rf"^```{language}\n(.*?)^```", README, flags=re.DOTALL | re.MULTILINE)
    ]


def command_lines() -> list[tuple[str, str]]:
    """(README.md:LINE, command) for every `corolla ...` line of the shell blocks, continuations joined."""
    found = []
    for first, text in blocks("bash"):
        lines = text.splitlines()
        for index, line in enumerate(lines):
            if line.startswith("corolla "):
                command, following = line, index + 1
                while command.endswith("\\") and following < len(lines):
                    command = command[:-1] + " " + lines[following].strip()
                    following += 1
                found.append((f"README.md:{first + index}", command))
    return found


@functools.cache
def _swarm_key() -> str:
    folder = Path(tempfile.mkdtemp(prefix="corolla-readme-key-"))
    SwarmKey.create(folder / "swarm.key")
    return str(folder / "swarm.key")


def arguments(synopsis: str) -> list[str]:
    """The command line `synopsis` stands for: `[--opt N]` given, `{a,b}` the first choice, placeholders
    replaced by values."""
    words = []
    for word in shlex.split(synopsis.replace("[", " ").replace("]", " "), comments=True)[1:]:
        if re.fullmatch(r"\{[^}]+\}", word):
            word = word[1:-1].split(",")[0]
        if word.startswith("/ip4/") and word.endswith("..."):  # an address cut short
            word = MADDR
        words.append(_swarm_key() if word == SWARM_KEY else STAND_INS.get(word, word))
    return words


def test_the_readme_has_commands_and_an_install_section() -> None:
    commands = {shlex.split(command)[1] for _, command in command_lines()}
    assert {"dht", "serve", "generate", "prepare-model", "--version"} <= commands
    assert "## Install" in README and "pip install '.[api]'" in README


@pytest.mark.parametrize(("where", "synopsis"), command_lines(), ids=[where for where, _ in command_lines()])
def test_command_line_parses(where: str, synopsis: str) -> None:
    args = arguments(synopsis)
    if args[0] in ("--version", "--help"):
        with contextlib.redirect_stdout(io.StringIO()) as out:
            assert cli.main(args) == 0, f"{where}: {synopsis}"
        assert out.getvalue().strip()
        return
    parse(Invocation(where, args))


@pytest.mark.parametrize(
    ("synopsis", "expected"),
    [
        ('corolla generate MODEL --initial-peers MADDR... [--top-k N] "PROMPT"', ["generate", "MODEL"]),
        ("corolla x [--speculative {ngram,DIR,none}]  # a comment", ["x", "--speculative", "ngram"]),
        ("corolla health M --initial-peers /ip4/10.0.0.1/...", ["health", "M", "--initial-peers", MADDR]),
        (f"corolla keygen {SWARM_KEY}", ["keygen", "KEY"]),
    ],
)
def test_arguments_replace_only_placeholders(synopsis: str, expected: list[str]) -> None:
    args = [("KEY" if arg == _swarm_key() else arg) for arg in arguments(synopsis)]
    assert args[: len(expected)] == expected
    assert "MADDR..." not in args and "N" not in args
    if "PROMPT" in synopsis:
        assert args[-1] == "PROMPT" and MADDR in args


def test_a_wrong_command_line_fails_to_parse() -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        parse(
            Invocation("README.md:0", arguments("corolla serve MODEL --num-blocks ten --initial-peers MADDR"))
        )


def python_example() -> str:
    """The Python API example: the one block that assigns INITIAL_PEERS (the others continue it)."""
    [example] = [text for _, text in blocks("python") if PEERS_LINE.search(text)]
    return example


def test_every_python_block_compiles() -> None:
    for first, text in blocks("python"):
        compile(text, f"README.md:{first}", "exec")


@pytest.mark.slow
@pytest.mark.swarm
def test_python_example_runs_as_written(tmp_path: Path) -> None:
    # the folder the example names: `corolla prepare-model`'s default cache, whatever COROLLA_CACHE_DIR says
    model = prepare_default_model(cache_dir=Path.home() / ".cache" / "corolla")
    with running(tmp_path, model, ["0:30"]) as swarm:
        code, count = PEERS_LINE.subn(f"INITIAL_PEERS = {swarm.initial_peers!r}", python_example())
        assert count == 1
        done = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            timeout=600,
            cwd=tmp_path,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Once upon a time" in done.stdout and len(done.stdout) > len("Once upon a time") + 20
