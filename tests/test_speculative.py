"""Speculative decoding through the swarm: the prompt-lookup draft and the adaptive draft length (table
tests), and `generate()` with adaptive prompt lookup over in-process peers of several families equal to
plain greedy decoding token for token, one swarm step per verified draft, the rollback riding the next
step."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import FAST_CLIENT
from fakes import FakeSwarm
from families import VOCAB, without_eos
from transformers import AutoModelForCausalLM

from client.cli import speculation
from client.config import ClientConfig
from client.model import AutoDistributedModelForCausalLM
from client.session import InferenceSession
from client.speculative import AdaptivePromptLookup, DraftLength, ngram_draft
from client.swarm import SwarmConnection


@pytest.mark.parametrize(
    ("ids", "options", "expected"),
    [
        ([], {}, []),
        ([7], {}, []),
        ([1, 2, 3, 4], {}, []),  # no token repeats
        ([1, 2, 3, 1], {}, [2, 3, 1]),  # 1-gram "1" occurred at 0
        ([1, 2, 3, 1], dict(num_tokens=2), [2, 3]),
        ([1, 2, 3, 1], dict(min_ngram=2), []),  # only 1-grams match
        # the longest suffix n-gram wins: "8 9" followed by 5 beats the later "9" followed by 6
        ([8, 9, 5, 9, 6, 8, 9], {}, [5, 9, 6]),
        # the latest earlier occurrence of the n-gram, not the first
        ([4, 1, 2, 4, 3, 3, 4], dict(num_tokens=2), [3, 3]),
        ([4, 1, 2, 4, 3, 3, 4], dict(num_tokens=2, max_ngram=1), [3, 3]),
        # a 3-gram beats the 2- and 1-grams, even when the shorter ones occur later
        ([1, 2, 3, 7, 2, 3, 8, 3, 1, 2, 3], dict(num_tokens=1), [7]),
        ([1, 2, 3, 7, 2, 3, 8, 3, 1, 2, 3], dict(num_tokens=1, max_ngram=2), [8]),
        ([1, 2, 3, 7, 2, 3, 8, 3, 1, 2, 3], dict(num_tokens=1, max_ngram=1), [1]),
        # a loop: the latest earlier occurrence has fewer tokens after it than asked; the copy goes on
        ([5, 5, 5, 5], dict(max_ngram=2), [5, 5, 5]),
        ([1, 2, 3, 1, 2, 3, 1, 2], dict(num_tokens=5, max_ngram=2), [3, 1, 2, 3, 1]),
        ([1, 2, 3, 1, 2, 3, 1, 2], dict(num_tokens=2, max_ngram=2), [3, 1]),
        ([1, 2, 1], dict(num_tokens=0), []),
        # copying: the text so far ends with the start of a sentence of the prompt
        ([10, 11, 12, 13, 14, 15, 0, 10, 11], dict(num_tokens=3), [12, 13, 14]),
    ],
)
def test_ngram_draft(ids: list[int], options: dict[str, int], expected: list[int]) -> None:
    assert ngram_draft(ids, **(dict(num_tokens=3) | options)) == expected


@pytest.mark.parametrize(
    "options",
    [dict(num_tokens=-1), dict(num_tokens=2, min_ngram=0), dict(num_tokens=2, max_ngram=1, min_ngram=2)],
)
def test_ngram_draft_refuses_bad_options(options: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        ngram_draft([1, 2, 1], **options)


@pytest.mark.parametrize(
    ("maximum", "updates", "expected"),
    [
        (8, [], [8]),  # starts at the maximum
        (8, [(8, 8)], [8]),  # full acceptance at the maximum stays there
        (8, [(0, 0)], [8]),  # no draft (no match): nothing learned
        (8, [(8, 3)], [4]),  # rejected after 3 accepted: one beyond what was right
        # rejected at once: a pause of one step, then 1, doubling back to the maximum
        (8, [(8, 0), (0, 0), (1, 1), (2, 2), (4, 4)], [0, 1, 2, 4, 8]),
        (8, [(8, 7), (8, 0), (0, 0), (3, 3)], [8, 0, 1, 6]),  # a short draft kept doubles its own length
        # drafts failing at once in a row: pauses of 1, 2, 4 steps
        (8, [(8, 0), (0, 0), (1, 0), (0, 0), (0, 0), (1, 0)], [0, 1, 0, 0, 1, 0]),
        # a draft accepted in part ends the run of misses: the next miss pauses 1 step again
        (8, [(8, 0), (0, 0), (1, 0), (0, 0), (0, 0), (2, 1), (2, 0), (0, 0)], [0, 1, 0, 0, 1, 2, 0, 1]),
        (16, [(16, 0), (0, 0), (1, 1), (2, 2), (4, 4), (8, 8), (16, 16)], [0, 1, 2, 4, 8, 16, 16]),
        (3, [(3, 1), (2, 2), (3, 3)], [2, 3, 3]),
    ],
)
def test_draft_length_follows_acceptance(
    maximum: int, updates: list[tuple[int, int]], expected: list[int]
) -> None:
    length = DraftLength(maximum)
    seen = [length.current] if not updates else []
    for proposed, accepted in updates:
        length.update(proposed, accepted)
        seen.append(length.current)
    assert seen == expected


def test_draft_length_stays_within_bounds() -> None:
    length = DraftLength(6, minimum=2, initial=1, max_pause=2)
    assert length.current == 2
    length.update(5, 5)
    assert length.current == 6
    seen = []
    for _ in range(3):  # misses in a row: pauses of 1, 2, then at most max_pause = 2 steps
        length.update(length.current, 0)
        seen.append(length.current)
        while length.current == 0:
            length.update(0, 0)
            seen.append(length.current)
    assert seen == [0, 2, 0, 0, 2, 0, 0, 2]
    with pytest.raises(ValueError):
        length.update(2, 3)
    with pytest.raises(ValueError):
        DraftLength(2, minimum=3)


@pytest.mark.parametrize(
    ("speculative", "sampling", "expected"),
    [
        (None, False, ("ngram", {"prompt_lookup_num_tokens": 6})),  # by default where it pays: greedy
        (None, True, ("none", {})),
        ("none", False, ("none", {})),
        ("none", True, ("none", {})),
        ("ngram", False, ("ngram", {"prompt_lookup_num_tokens": 6})),
    ],
)
def test_cli_speculation(speculative: str | None, sampling: bool, expected: tuple[str, dict]) -> None:
    assert speculation(speculative, draft_tokens=6, sampling=sampling) == expected


def test_cli_speculation_with_a_draft_model_folder(tmp_path) -> None:
    assert speculation(str(tmp_path), draft_tokens=4, sampling=False) == (
        str(tmp_path),
        {"num_assistant_tokens": 4},
    )
    for speculative, sampling, tokens in [
        ("ngram", True, 4),  # greedy only
        (str(tmp_path), True, 4),
        (str(tmp_path / "absent"), False, 4),
        ("ngram", False, 0),
    ]:
        with pytest.raises(ValueError):
            speculation(speculative, draft_tokens=tokens, sampling=sampling)


# prompt lookup through in-process peers (tests/fakes.py) of several families: sliding windows (mistral,
# gemma3), ALiBi (bloom), learned positions (gpt2), a mixture of experts (mixtral)
FAMILIES = ["llama", "mistral", "gemma3", "gpt2", "bloom", "mixtral", "qwen3", "opt"]
SPANS = [(0, 1), (1, 3), (3, 4)]
NEW_TOKENS = 40


class _Recorder:
    """Records the drafts transformers' assisted decoding verifies and the steps the swarm receives."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.drafts: list[tuple[int, int]] = []  # (proposed, accepted) per verification
        self.steps: list[tuple[int, int | None]] = []  # (positions, rollback_to) per InferenceSession.astep
        recorder = self

        class Recording(AdaptivePromptLookup):
            def __init__(self, **options: Any) -> None:
                super().__init__(**options)
                self.length = DraftLength(self.length.maximum, max_pause=0)  # draft at every step

            def update_candidate_strategy(self, input_ids, scores, num_matches) -> None:
                recorder.drafts.append((self.proposed, min(num_matches, self.proposed)))
                super().update_candidate_strategy(input_ids, scores, num_matches)

        astep = InferenceSession.astep

        def counted(session, hidden, positions, **kwargs):
            recorder.steps.append((int(hidden.shape[1]), kwargs.get("rollback_to")))
            return astep(session, hidden, positions, **kwargs)

        monkeypatch.setattr("client.model.AdaptivePromptLookup", Recording)
        monkeypatch.setattr(InferenceSession, "astep", counted)


def _looping_prompt(seed: int) -> torch.Tensor:
    """Random tokens with a repeated stretch: text to copy, and tiny random models fall into loops."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randint(3, VOCAB, (12,), generator=generator)
    return torch.cat([text, torch.tensor([1]), text[:6]]).unsqueeze(0)


def _greedy(model: Any, prompt: torch.Tensor, **options: Any) -> torch.Tensor:
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
        **options,
    )


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, checkpoint):
    """(distributed model over in-process peers of one family, the local transformers model)."""
    folder = checkpoint(request.param)
    swarm = FakeSwarm(folder)
    swarm.add_many(SPANS)
    connection = SwarmConnection.from_discovery(swarm.discovery, ClientConfig(**FAST_CLIENT))
    model = without_eos(AutoDistributedModelForCausalLM.from_pretrained(folder, swarm=connection))
    local = without_eos(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval())
    yield model, local
    connection.close()
    swarm.close()


@pytest.mark.parametrize("seed", [0, 1])
def test_prompt_lookup_equals_plain_greedy(pair, monkeypatch, seed: int) -> None:
    model, local = pair
    prompt = _looping_prompt(seed)
    expected = _greedy(local, prompt)
    recorder = _Recorder(monkeypatch)
    # 1-gram drafts: tiny random models repeat single tokens often, so drafts are kept and rejected
    out = _greedy(model, prompt, prompt_lookup_num_tokens=8, max_matching_ngram_size=1)
    assert torch.equal(out, expected)
    assert sum(accepted for _, accepted in recorder.drafts) > 0  # drafts were verified and kept
    # one step through the swarm per verification, plus none for rollbacks: they ride the next step
    assert len(recorder.steps) == len(recorder.drafts)
    cache, pending = 0, None  # positions the peers hold, and the rollback the next step must carry
    for i, ((proposed, accepted), (positions, rollback_to)) in enumerate(
        zip(recorder.drafts, recorder.steps, strict=True)
    ):
        assert rollback_to == pending
        sent = (prompt.shape[1] if i == 0 else 1) + proposed  # the last token decoded, then the draft
        assert positions == sent
        cache += sent - (proposed - accepted)
        pending = cache if proposed > accepted else None
    assert any(proposed > accepted for proposed, accepted in recorder.drafts)  # and some rolled back


@pytest.mark.swarm
def test_prompt_lookup_through_peer_processes(checkpoint, local, tmp_path, monkeypatch) -> None:
    """The same through a DHT and three peer processes: the tokens of plain greedy decoding, one step per
    verified draft, and rollbacks that ride the next step."""
    from swarm import running

    prompt = _looping_prompt(0)
    expected = _greedy(local, prompt)
    with running(tmp_path, checkpoint("llama"), ["0:1", "1:3", "3:4"], "--model-id", "llama") as swarm:
        model = without_eos(
            AutoDistributedModelForCausalLM.from_pretrained(
                checkpoint("llama"), initial_peers=swarm.initial_peers, model_id="llama"
            )
        )
        try:
            assert torch.equal(_greedy(model, prompt), expected)
            recorder = _Recorder(monkeypatch)
            out = _greedy(model, prompt, prompt_lookup_num_tokens=8, max_matching_ngram_size=1)
        finally:
            model.shutdown()
    assert torch.equal(out, expected)
    assert len(recorder.steps) == len(recorder.drafts)
    assert sum(accepted for _, accepted in recorder.drafts) > 0
    rolled_back = [i for i, (proposed, accepted) in enumerate(recorder.drafts[:-1]) if accepted < proposed]
    assert rolled_back and all(recorder.steps[i + 1][1] is not None for i in rolled_back)
    assert all(rollback is None for i, (_, rollback) in enumerate(recorder.steps) if i - 1 not in rolled_back)
