"""Evaluate SmolLM2-135M-Instruct through a local swarm of 3 peers with EleutherAI's lm-evaluation-harness,
next to local transformers on the same weights.

The peers (separate processes on 127.0.0.1) serve blocks 0-9, 10-19 and 20-29. The tasks are written by this
script into a temporary folder (JSONL data and lm-eval task YAML, read by `TaskManager(include_path=...)`; no
hub): 16 general-knowledge questions with 4 choices each (`multiple_choice`: lm-eval scores every choice by
its loglikelihood, in right-padded batches) and 10 sentences to complete by greedy generation
(`generate_until`, left-padded batches with an attention mask). Both models go through lm-eval's own `HFLM`
at `--batch-size`; prints their scores and whether every per-sample loglikelihood agrees within 1e-5 and
every generation is identical.

    pip install 'lm-eval>=0.4.9,<0.5'                  # a dev dependency: `make install` does it
    HF_HUB_OFFLINE=1 python examples/lm_eval_swarm.py [--batch-size 8]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from lm_eval.evaluator import simple_evaluate
from lm_eval.models.huggingface import HFLM
from lm_eval.tasks import TaskManager
from transformers import AutoModelForCausalLM, AutoTokenizer

from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
TOLERANCE = 1e-5
QUIZ_TASK, COMPLETION_TASK = "swarm_quiz", "swarm_completions"
QUIZ = [  # (question, choices, index of the right one)
    ("What color is the sky on a clear day?", ["blue", "green", "red", "black"], 0),
    ("How many legs does a spider have?", ["six", "eight", "ten", "four"], 1),
    ("Which animal says moo?", ["a cat", "a dog", "a cow", "an owl"], 2),
    ("What is the capital of France?", ["Berlin", "Madrid", "Rome", "Paris"], 3),
    ("What do bees make?", ["milk", "silk", "honey", "bread"], 2),
    ("What is frozen water called?", ["steam", "ice", "sand", "glass"], 1),
    ("Which is the largest planet in the solar system?", ["Mars", "Jupiter", "Venus", "Mercury"], 1),
    ("How many days are there in a week?", ["five", "six", "seven", "ten"], 2),
    ("Which season comes after winter?", ["spring", "summer", "autumn", "winter"], 0),
    ("What do you use to write on paper?", ["a spoon", "a pen", "a shoe", "a cup"], 1),
    ("Which of these is a fruit?", ["a carrot", "an onion", "an apple", "a potato"], 2),
    ("What gas do plants take in from the air?", ["oxygen", "helium", "carbon dioxide", "neon"], 2),
    ("Who wrote Romeo and Juliet?", ["Charles Dickens", "William Shakespeare", "Mark Twain", "Homer"], 1),
    ("What is the boiling point of water at sea level?", ["0 C", "50 C", "100 C", "200 C"], 2),
    ("Which animal is known as the king of the jungle?", ["the lion", "the mouse", "the frog", "the cow"], 0),
    ("How many hours are there in a day?", ["twelve", "twenty-four", "sixty", "one hundred"], 1),
]
COMPLETIONS = [  # (prompt, answer) for greedy generation up to the first newline, period or comma
    ("The capital of France is", "Paris"),
    ("The capital of Japan is", "Tokyo"),
    ("The color of fresh grass is", "green"),
    ("The opposite of hot is", "cold"),
    ("A dog has four", "legs"),
    ("The largest ocean on Earth is the", "Pacific Ocean"),
    ("The animal that barks is the", "dog"),
    ("Water freezes at zero degrees", "Celsius"),
    ("The sun rises in the", "east"),
    ("The first letter of the English alphabet is the letter", "A"),
]


def write_tasks(root: Path) -> None:
    """The two tasks' data and YAML under `root`; the datasets library caches there too."""
    quiz, completions = root / "quiz.jsonl", root / "completions.jsonl"
    quiz.write_text("".join(json.dumps(dict(question=q, choices=c, answer=a)) + "\n" for q, c, a in QUIZ))
    completions.write_text("".join(json.dumps(dict(prompt=p, answer=a)) + "\n" for p, a in COMPLETIONS))
    common = dict(dataset_path="json", test_split="train")
    tasks: dict[str, dict[str, Any]] = {
        QUIZ_TASK: dict(
            dataset_kwargs=dict(data_files=dict(train=str(quiz)), cache_dir=str(root / "cache")),
            output_type="multiple_choice",
            doc_to_text="Question: {{question}}\nAnswer:",
            doc_to_choice="{{choices}}",
            doc_to_target="{{answer}}",
            metric_list=[
                dict(metric="acc", aggregation="mean", higher_is_better=True),
                dict(metric="acc_norm", aggregation="mean", higher_is_better=True),
            ],
        ),
        COMPLETION_TASK: dict(
            dataset_kwargs=dict(data_files=dict(train=str(completions)), cache_dir=str(root / "cache")),
            output_type="generate_until",
            doc_to_text="{{prompt}}",
            doc_to_target="{{answer}}",
            generation_kwargs=dict(until=["\n", ".", ","], max_gen_toks=16, do_sample=False),
            metric_list=[
                dict(
                    metric="exact_match",
                    aggregation="mean",
                    higher_is_better=True,
                    ignore_case=True,
                    ignore_punctuation=True,
                    regexes_to_ignore=[" "],
                )
            ],
        ),
    }
    for name, config in tasks.items():
        (root / f"{name}.yaml").write_text(yaml.safe_dump(dict(task=name, **common, **config)))


def evaluate(model: Any, tokenizer: Any, manager: TaskManager, batch_size: int) -> dict:
    """lm-eval's results for `model`: scores per task and the logged samples, sorted by document."""
    started = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    results = simple_evaluate(
        model=lm,
        tasks=[QUIZ_TASK, COMPLETION_TASK],
        task_manager=manager,
        log_samples=True,
        bootstrap_iters=0,
    )
    assert results is not None  # None only on ranks other than 0 of a distributed run
    results["seconds"] = time.perf_counter() - started
    for rows in results["samples"].values():
        rows.sort(key=lambda row: row["doc_id"])
    return results


def compare(local: dict, swarm: dict) -> None:
    for task in (QUIZ_TASK, COMPLETION_TASK):
        print(f"\n{task}:")
        for metric, value in local["results"][task].items():
            if metric.endswith(",none") and "stderr" not in metric:
                name, theirs = metric.removesuffix(",none"), swarm["results"][task][metric]
                print(f"  {name:12s} local {value:.3f}   swarm {theirs:.3f}")
    pairs = list(zip(local["samples"][QUIZ_TASK], swarm["samples"][QUIZ_TASK], strict=True))
    deltas = [  # resps: one [(loglikelihood, is_greedy)] per choice
        abs(here[0][0] - there[0][0])
        for a, b in pairs
        for here, there in zip(a["resps"], b["resps"], strict=True)
    ]
    agree = "yes" if max(deltas) <= TOLERANCE else "NO"
    print(
        f"\n{len(deltas)} loglikelihoods, max |local - swarm| = {max(deltas):.1e}; all within 1e-5: {agree}"
    )
    pairs = list(zip(local["samples"][COMPLETION_TASK], swarm["samples"][COMPLETION_TASK], strict=True))
    same = sum(a["resps"] == b["resps"] for a, b in pairs)
    print(f"greedy generations identical: {same}/{len(pairs)}")
    for a, b in pairs:
        print(f"  {a['doc']['prompt']:56s} local {a['resps'][0][0]!r:18s} swarm {b['resps'][0][0]!r}")
    print(f"\nlocal transformers: {local['seconds']:.1f} s, swarm: {swarm['seconds']:.1f} s")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lm_eval", "transformers"):  # lm-eval warns that `pretrained` is a model object: intended
        logging.getLogger(noisy).setLevel(logging.ERROR)

    folder = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    with tempfile.TemporaryDirectory(prefix="corolla-lm-eval-") as root:
        write_tasks(Path(root))
        manager = TaskManager(include_path=root, include_defaults=False)

        local_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        local = evaluate(local_model, tokenizer, manager, args.batch_size)

        with running(folder, SPANS) as swarm:
            model = AutoDistributedModelForCausalLM.from_pretrained(folder, initial_peers=swarm.initial_peers)
            swarm_results = evaluate(model, tokenizer, manager, args.batch_size)
            model.shutdown()
    print(f"SmolLM2-135M-Instruct, lm-eval batch size {args.batch_size}, swarm spans {' '.join(SPANS)}")
    compare(local, swarm_results)


if __name__ == "__main__":
    main()
