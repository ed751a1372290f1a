"""lm-evaluation-harness over the swarm, as a user runs it: `HFLM(pretrained=model)` on the distributed tiny
chat Llama (in-process peers) and on transformers' own model of the same folder, over a local multiple-choice
task and a `generate_until` task (YAML over JSONL in a tmp dir, no hub). At batch sizes 1, 4 and 8 (batches of
prompts of different lengths, so padded) the per-sample loglikelihoods agree within 1e-5 and the greedy
generations are identical."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from chat_checkpoint import save_chat_checkpoint
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM
from client.swarm import SwarmConnection

pytestmark = pytest.mark.slow  # lm-eval's harness takes a while: `make test`, not `make test-fast`

SPANS = [(0, 2), (2, 4)]
BATCH_SIZES = [1, 4, 8]
ATOL = 1e-5
MAX_GEN_TOKS = 16

QUESTIONS = [  # (question, choices, index of the right one); choices of different lengths pad every batch
    ("What color is the sky on a clear day?", ["blue", "green", "bright red", "purple"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which animal says moo?", ["a cat", "a dog", "a cow", "an owl"], 2),
    ("What is two plus three?", ["four", "six", "five"], 2),
    ("Which is the largest planet?", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
    ("What do bees make?", ["milk", "silk", "honey"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Where does the sun rise?", ["in the east", "in the west", "in the north"], 0),
]
PROMPTS = [  # (prompt, reference answer)
    ("Q: What is the capital of France?\nA:", "Paris"),
    ("Q: Name a fruit.\nA:", "apple"),
    ("Q: What comes after Monday in the week?\nA:", "Tuesday"),
    ("Q: 2+2=\nA:", "4"),
    ("Q: Which ocean lies between Europe and America, to the west of Portugal?\nA:", "Atlantic"),
    ("Q: Say hi.\nA:", "hi"),
]


def _write_tasks(root: Path, cache: Path) -> None:
    """Two task YAML files over JSONL data in `root`; the datasets library caches under `cache`."""
    mc, gen = root / "mc.jsonl", root / "gen.jsonl"
    mc.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUESTIONS))
    gen.write_text("".join(json.dumps(dict(prompt=p, answer=a)) + "\n" for p, a in PROMPTS))
    common = dict(dataset_path="json", test_split="train")
    tasks = {
        "swarm_mc": dict(
            **common,
            dataset_kwargs=dict(data_files=dict(train=str(mc)), cache_dir=str(cache)),
            output_type="multiple_choice",
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_choice="{{choices}}",
            doc_to_target="{{answer}}",
            metric_list=[dict(metric="acc", aggregation="mean", higher_is_better=True)],
        ),
        "swarm_gen": dict(
            **common,
            dataset_kwargs=dict(data_files=dict(train=str(gen)), cache_dir=str(cache)),
            output_type="generate_until",
            doc_to_text="{{prompt}}",
            doc_to_target="{{answer}}",
            generation_kwargs=dict(until=["\n"], max_gen_toks=MAX_GEN_TOKS, do_sample=False),
            metric_list=[dict(metric="exact_match", aggregation="mean", higher_is_better=True)],
        ),
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(json.dumps(dict(task=name, **config)))  # JSON is YAML


@pytest.fixture(scope="module")
def folder(checkpoint, tmp_path_factory) -> Path:
    return save_chat_checkpoint(checkpoint("llama"), tmp_path_factory.mktemp("chat"))


@pytest.fixture(scope="module")
def task_manager(tmp_path_factory) -> TaskManager:
    root = tmp_path_factory.mktemp("lm_eval_tasks")
    _write_tasks(root, tmp_path_factory.mktemp("datasets_cache"))
    return TaskManager(include_path=str(root), include_defaults=False)


@pytest.fixture(scope="module")
def swarm_model(folder):
    swarm = FakeSwarm(folder)
    swarm.add_many(SPANS)
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    yield AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection)
    connection.close()
    swarm.close()


@pytest.fixture(scope="module")
def local_model(folder):
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _evaluate(model: Any, folder: Path, task_manager: TaskManager, batch_size: int) -> dict[str, Any]:
    """{"swarm_mc": [[(loglikelihood, is_greedy) per choice] per question], "swarm_gen": [text per prompt],
    "calls": [(batch size, left-padded) per forward call the harness made]}."""
    calls: list[tuple[int, bool]] = []

    def record(_: Any, args: tuple, kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs["input_ids"]
        mask = kwargs.get("attention_mask")
        calls.append((ids.shape[0], mask is not None and not bool(mask.all())))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        lm = HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(folder), batch_size=batch_size)
        results = simple_evaluate(
            model=lm,
            tasks=["swarm_mc", "swarm_gen"],
            task_manager=task_manager,
            log_samples=True,
            bootstrap_iters=0,
            random_seed=None,  # greedy: nothing to seed, so leave the test process's global RNGs alone
            numpy_random_seed=None,
            torch_random_seed=None,
        )
    finally:
        hook.remove()
    assert results is not None
    samples = {task: sorted(rows, key=lambda row: row["doc_id"]) for task, rows in results["samples"].items()}
    return {
        "swarm_mc": [[tuple(choice[0]) for choice in row["resps"]] for row in samples["swarm_mc"]],
        "swarm_gen": [row["filtered_resps"][0] for row in samples["swarm_gen"]],
        "calls": calls,
    }


@pytest.fixture(scope="module")
def local_runs(local_model, folder, task_manager) -> dict[int, dict[str, Any]]:
    return {size: _evaluate(local_model, folder, task_manager, size) for size in BATCH_SIZES}


def _assert_equal(got: dict[str, Any], expected: dict[str, Any]) -> None:
    assert len(got["swarm_mc"]) == len(QUESTIONS)
    for row, (got_choices, expected_choices) in enumerate(
        zip(got["swarm_mc"], expected["swarm_mc"], strict=True)
    ):
        got_ll = torch.tensor([ll for ll, _ in got_choices], dtype=torch.float64)
        expected_ll = torch.tensor([ll for ll, _ in expected_choices], dtype=torch.float64)
        torch.testing.assert_close(got_ll, expected_ll, atol=ATOL, rtol=0, msg=f"question {row}")
        assert [greedy for _, greedy in got_choices] == [greedy for _, greedy in expected_choices]
    assert got["swarm_gen"] == expected["swarm_gen"]


@pytest.mark.parametrize("batch_size", BATCH_SIZES)
def test_lm_eval_through_the_swarm_equals_local_transformers(
    swarm_model, folder, task_manager, local_runs, batch_size
) -> None:
    got = _evaluate(swarm_model, folder, task_manager, batch_size)
    _assert_equal(got, local_runs[batch_size])
    _assert_equal(got, local_runs[1])  # and the unbatched reference: batching and padding change nothing
    # the harness sent the swarm the same batches as the local model, of that size, left-padded for generate
    assert got["calls"] == local_runs[batch_size]["calls"]
    assert max(size for size, _ in got["calls"]) == batch_size
    assert any(padded for _, padded in got["calls"]) == (batch_size > 1)


def test_the_reference_compares_something(local_runs) -> None:
    """Generations that differ from prompt to prompt and run past the first token, loglikelihoods that
    differ from choice to choice: equal outputs above are not equal by accident."""
    reference = local_runs[1]
    assert len(set(reference["swarm_gen"])) == len(PROMPTS)
    assert all(len(text) > 1 for text in reference["swarm_gen"])
    assert len({round(ll, 3) for choices in reference["swarm_mc"] for ll, _ in choices}) == sum(
        len(choices) for _, choices, _ in QUESTIONS
    )
