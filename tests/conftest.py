"""Shared fixtures: tiny checkpoints built once per test session, quiet transformers logging."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from families import save


@pytest.fixture(autouse=True, scope="session")
def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", module="transformers")
    logging.getLogger("transformers").setLevel(logging.ERROR)


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory):
    """`checkpoint(family)` -> folder with the family's tiny model saved as safetensors (built once)."""
    root = tmp_path_factory.mktemp("checkpoints")
    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = save(family, root / family)
        return built[family]

    return get


@pytest.fixture(scope="module")
def local(checkpoint):
    """The tiny Llama as plain transformers loads it: the reference every swarm run is compared with."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint("llama"), dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model
