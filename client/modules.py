"""The client's side of a model, loaded without any block: input embeddings, final norm, LM head and the
family's code around the block loop (learned positions, embedding norms, logit soft-capping); and
`ClientModules`, which runs them alone (`embed`, `head`) for parity tests and tools."""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from protos.checkpoint import build_skeleton, load_config, load_weights, parse_dtype, resolve_model_path
from protos.errors import InvalidInputError
from protos.partition import (
    Anatomy,
    Role,
    StopForward,
    checkpoint_key_filter,
    detect_tuple_output,
    hidden_argument,
    install_slots,
    locate,
    materialized_bytes,
    module_filter,
)

logger = logging.getLogger(__name__)


def load_client_model(
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype,
    *,
    model_class: type[PreTrainedModel] | None = None,
) -> tuple[PreTrainedModel, Anatomy]:
    """The causal-LM model with only its client-side weights materialized; the blocks stay on meta."""
    folder = resolve_model_path(name_or_path)
    skeleton = build_skeleton(load_config(folder), dtype, model_class=model_class)
    anatomy = locate(skeleton)
    load_weights(
        skeleton,
        Path(folder),
        wanted_key=checkpoint_key_filter(anatomy, Role.CLIENT),
        wanted_module=module_filter(anatomy, Role.CLIENT),
        dtype=dtype,
    )
    return skeleton, anatomy


class ClientModules:
    """Embeddings and head of a causal LM; `embed` gives the hidden states entering block 0 and `head` the
    logits from the hidden states leaving the last block, each computed by the family's own forward."""

    def __init__(self, model: PreTrainedModel, anatomy: Anatomy) -> None:
        self.model = model
        self.anatomy = anatomy
        self._lock = threading.Lock()
        self._final_hidden: torch.Tensor | None = None  # set for the duration of one `head` call
        install_slots(model, anatomy, self._dispatch)
        self.tuple_output = detect_tuple_output(model, anatomy)

    @classmethod
    def load(
        cls, name_or_path: str | os.PathLike[str], *, dtype: str | torch.dtype = torch.float32
    ) -> ClientModules:
        model, anatomy = load_client_model(name_or_path, parse_dtype(dtype))
        modules = cls(model, anatomy)
        logger.info("client modules loaded bytes=%d", modules.parameter_bytes())
        return modules

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def parameter_bytes(self) -> int:
        return materialized_bytes(self.model)

    @torch.inference_mode()
    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states entering block 0 [batch, seq, hidden] for `input_ids` [batch, seq]."""
        if input_ids.ndim != 2:
            raise InvalidInputError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
        kwargs = {}
        if positions is not None and "position_ids" in self.anatomy.owner_params:
            kwargs["position_ids"] = positions
        with self._lock:
            try:
                self.anatomy.owner(self.model)(input_ids=input_ids, use_cache=False, **kwargs)
            except StopForward as stop:
                return stop.value
        raise RuntimeError("the model's forward returned before reaching block 0")

    @torch.inference_mode()
    def head(self, hidden: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [batch, seq, vocab] from the hidden states leaving the last block [batch, seq, hidden]."""
        if hidden.ndim != 3 or hidden.shape[-1] != self.anatomy.hidden_size:
            raise InvalidInputError(
                f"hidden must be [batch, seq, {self.anatomy.hidden_size}], got shape {tuple(hidden.shape)}"
            )
        dummy = hidden.new_zeros(*hidden.shape[:-1], self.anatomy.embed_dim)
        kwargs = {"position_ids": positions} if positions is not None else {}
        with self._lock:
            self._final_hidden = hidden
            try:
                return self.model(inputs_embeds=dummy, use_cache=False, **kwargs).logits
            finally:
                self._final_hidden = None

    def _dispatch(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self._final_hidden is None:
            # `embed`: block 0 receives exactly the hidden states the family computed from the tokens
            raise StopForward(hidden_argument(args, kwargs))
        last = index == self.anatomy.num_blocks - 1
        hidden = self._final_hidden if last else hidden_argument(args, kwargs)
        return (hidden, None) if self.tuple_output else hidden
