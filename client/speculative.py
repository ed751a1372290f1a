"""Speculative decoding through the swarm: prompt-lookup drafts (`ngram_draft`), a draft length that follows
the acceptance rate (`DraftLength`), and the transformers candidate generator that uses both. Pure
bookkeeping on token ids: it knows nothing of peers, sessions or the wire."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, cast

import torch
from transformers.generation.candidate_generator import PromptLookupCandidateGenerator


def ngram_draft(ids: Sequence[int], *, num_tokens: int, max_ngram: int = 3, min_ngram: int = 1) -> list[int]:
    """Prompt lookup: the (at most `num_tokens`) tokens that followed the latest earlier occurrence of the
    longest suffix n-gram of `ids` (`max_ngram` >= n >= `min_ngram`) that occurred before; [] when none.

    The latest occurrence, not the first as transformers' lookup takes: text being copied or edited
    repeats what came just before it more often than what opened the prompt. The copy may run past the end
    of `ids` into the draft itself (an overlapping copy, as in LZ77), so a loop of period k drafts the full
    `num_tokens`, not only the k tokens its latest occurrence has after it.
    """
    if num_tokens < 0 or min_ngram < 1 or max_ngram < min_ngram:
        raise ValueError("ngram_draft needs num_tokens >= 0 and 1 <= min_ngram <= max_ngram")
    length = len(ids)
    if num_tokens == 0:
        return []
    ids = list(ids)
    for size in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = ids[length - size :]
        # an occurrence starting at `start` is earlier when it ends before the suffix does, so a token follows
        for start in range(length - size - 1, -1, -1):
            if ids[start : start + size] == suffix:
                follow = start + size
                draft = ids[follow : follow + num_tokens]
                while len(draft) < num_tokens:  # past the end of ids: copy the draft's own start
                    draft.append(draft[len(draft) - (length - follow)])
                return draft
    return []


class DraftLength:
    """The number of tokens to draft next (`current`; 0: draft nothing this step), adapted to how many of
    the last draft the model accepted.

    Rule: a fully accepted draft doubles the length (up to `maximum`); a draft rejected after `accepted` > 0
    tokens sets it to `accepted + 1`; a draft rejected at its first token sets it to `minimum` and pauses
    drafting for 1 step, then 2, 4, ... (at most `max_pause`) while drafts keep failing at once, until one
    is accepted in part. Why: over a WAN a verification step costs one chain traversal whatever its length,
    so the length should reach the maximum within a few steps while text is copied, and a rejection says
    exactly how far the draft was right. On CPU peers a step of 2 positions costs about twice one of 1
    (matrix-vector against matrix-matrix products: measured 1.7-2x on SmolLM2), so on text that does not
    repeat, drafts that fail at once must stop, not just shrink: the pause makes their cost vanish while a
    probe now and then notices when copying starts. transformers' heuristic schedule (+2 on full
    acceptance, -1 otherwise, never below 1) and vLLM's fixed-length n-gram proposer never stop drafting.
    """

    def __init__(
        self, maximum: int, *, minimum: int = 1, initial: int | None = None, max_pause: int = 32
    ) -> None:
        if minimum < 1 or maximum < minimum or max_pause < 0:
            raise ValueError("DraftLength needs 1 <= minimum <= maximum and max_pause >= 0")
        self.minimum, self.maximum, self.max_pause = minimum, maximum, max_pause
        self._length = self._clamp(maximum if initial is None else initial)
        self._misses = 0  # drafts in a row rejected at their first token
        self._pause = 0  # steps left without drafting

    @property
    def current(self) -> int:
        return 0 if self._pause else self._length

    def _clamp(self, length: int) -> int:
        return max(self.minimum, min(self.maximum, length))

    def update(self, proposed: int, accepted: int) -> None:
        """Adapt to a draft of `proposed` tokens of which the model accepted the first `accepted` (0 and 0
        after a step without a draft)."""
        if not 0 <= accepted <= proposed:
            raise ValueError("update needs 0 <= accepted <= proposed")
        if proposed == 0:
            self._pause = max(0, self._pause - 1)
        elif accepted == proposed:
            self._length, self._misses = self._clamp(max(self._length, proposed) * 2), 0
        elif accepted > 0:
            self._length, self._misses = self._clamp(accepted + 1), 0
        else:
            self._length, self._misses = self.minimum, self._misses + 1
            self._pause = min(self.max_pause, 2 ** (self._misses - 1))


class AdaptivePromptLookup(PromptLookupCandidateGenerator):
    """transformers' prompt-lookup candidate generator with `ngram_draft`'s lookup and a `DraftLength`
    (transformers' own keeps a fixed length and ignores how many candidates were accepted). Batch size 1,
    as assisted generation requires."""

    def __init__(
        self,
        *,
        max_tokens: int,
        max_ngram: int,
        max_length: int,
        min_ngram: int = 2,
        eos_token_id: torch.Tensor | None = None,
        logits_processor: Any = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__(
            eos_token_id=eos_token_id,
            num_output_tokens=max_tokens,
            max_matching_ngram_size=max_ngram,
            max_length=max_length,
            logits_processor=logits_processor,
            vocab_size=vocab_size,
        )
        self.min_ngram = min(min_ngram, max_ngram)  # a lone repeated token is too weak a hint to draft on
        self.length = DraftLength(max_tokens)
        self.proposed = 0
        self.num_proposed = self.num_accepted = 0  # totals over the call, for benchmarks and logs

    def get_candidates(  # type: ignore[override]  # no draft logits: None, as transformers' lookup returns
        self, input_ids: torch.LongTensor, **kwargs: Any
    ) -> tuple[torch.LongTensor, None]:
        """`input_ids` [1, seq] followed by the draft [1, seq + n]; n = 0 when the lookup finds nothing."""
        input_length = int(input_ids.shape[-1])
        # the model also decodes one token after the draft: stay within max_length
        num_tokens = max(0, min(self.length.current, self.max_length - input_length - 1))
        draft = []
        if num_tokens:
            ids = input_ids[0].tolist()
            draft = ngram_draft(
                ids, num_tokens=num_tokens, max_ngram=self.max_matching_ngram_size, min_ngram=self.min_ngram
            )
            draft = self._allowed(input_ids, draft)
        self.proposed = len(draft)
        if not draft:
            return input_ids, None
        chosen = torch.tensor([draft], dtype=input_ids.dtype, device=input_ids.device)
        return torch.cat([input_ids, chosen], dim=1), None  # type: ignore[return-value]

    def _allowed(self, input_ids: torch.Tensor, draft: list[int]) -> list[int]:
        """The draft cut before its first end-of-sequence token (the model must not run past the end) and
        before the first token the logits processors forbid, as transformers' lookup does."""
        if self.eos_token_id is not None:
            eos = set(torch.as_tensor(self.eos_token_id).flatten().tolist())
            draft = next((draft[:i] for i, token in enumerate(draft) if token in eos), draft)
        if self.logits_processor is None or not draft or self.vocab_size is None:
            return draft
        sequence = cast("torch.LongTensor", input_ids)
        for i, token in enumerate(draft):
            ones = torch.ones((1, self.vocab_size), device=input_ids.device)  # processors may edit in place
            score = self.logits_processor(sequence, ones)[0, token]
            if bool(torch.isneginf(score)) or float(score) == torch.finfo(score.dtype).min:
                return draft[:i]
            sequence = cast("torch.LongTensor", torch.cat([sequence, sequence.new_tensor([[token]])], dim=1))
        return draft

    def update_candidate_strategy(
        self, input_ids: torch.LongTensor, scores: torch.Tensor, num_matches: int
    ) -> None:
        self.length.update(self.proposed, min(num_matches, self.proposed))
        self.num_proposed += self.proposed
        self.num_accepted += min(num_matches, self.proposed)
