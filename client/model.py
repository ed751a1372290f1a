"""`AutoDistributedModelForCausalLM` and `AutoDistributedModelForSequenceClassification`: the family's own
transformers model with local embeddings and head and its blocks run by the swarm, so `generate()`,
losses and training work as with transformers."""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from transformers import PreTrainedModel

from client.config import ClientConfig
from client.finetune import PromptTuning, freeze_except
from client.lora import SwarmLora
from client.modules import load_client_model
from client.remote_cache import RemoteCache, SwarmPass
from client.session import InferenceSession
from client.speculative import AdaptivePromptLookup
from client.swarm import SwarmConnection
from protos.checkpoint import (
    build_skeleton,
    causal_lm_class,
    load_config,
    load_weights,
    parse_dtype,
    resolve_model_path,
    sequence_classification_class,
)
from protos.errors import InvalidInputError
from protos.lora import lora_layers
from protos.partition import (
    Anatomy,
    Role,
    checkpoint_key_filter,
    detect_tuple_output,
    hidden_argument,
    install_slots,
    locate,
    module_filter,
    move_loaded,
)
from protos.records import model_id_from_path

if TYPE_CHECKING:
    from peft import LoraConfig

logger = logging.getLogger(__name__)


def _padding_mask(mask: Any) -> torch.Tensor | None:
    """transformers' 2D attention_mask [batch, positions] of 0 (padding) and 1, on the CPU as int64; None
    when there is none or nothing is padding."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim != 2:
        raise InvalidInputError("attention_mask must be a 2D tensor [batch, positions] of 0 and 1")
    if bool(mask.all()):
        return None
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise InvalidInputError("attention_mask holds values other than 0 and 1")
    return mask.to(device="cpu", dtype=torch.int64)


class DistributedModelMixin:
    """Mixed into the family's `*ForCausalLM`: block 0's slot sends the hidden states through the swarm and
    the later slots pass the result on, so the family's own post-block code and `generate()` run locally."""

    swarm: SwarmConnection  # the connection to the swarm, shared by this model's sessions and passes
    _tuple_output: bool = False  # the family's block loop takes outputs[0] from each block
    _causal: bool = True  # a causal LM; False: a classifier (always runs from input embeddings)
    _active_session: InferenceSession | None = None  # set by `inference_session()`
    active_adapter: str | None = None  # a LoRA adapter the peers serve, run by every pass and session
    # `lora`: the client's own trainable LoRA (`from_pretrained(lora=...)`), a submodule when set

    @property
    def _own_lora(self) -> SwarmLora | None:
        return getattr(self, "lora", None)  # a class default would hide the submodule from nn.Module

    def set_adapter(self, adapter_name: list[str] | str | None) -> None:
        """Run the LoRA adapter `adapter_name` that peers serve (`corolla serve --adapters`) from now on;
        None: the base model. Routes then use only peers that announce it."""
        if isinstance(adapter_name, list):
            if len(adapter_name) > 1:
                raise InvalidInputError("the swarm runs one adapter a pass: name one in set_adapter")
            adapter_name = adapter_name[0] if adapter_name else None
        self.active_adapter = adapter_name or None

    def disable_adapters(self) -> None:
        self.active_adapter = None

    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    def _remote(self, hidden: torch.Tensor, prompts: Any, mask: Any) -> torch.Tensor:
        lora, adapter = self._own_lora, self.active_adapter or ""
        return self.swarm.remote(hidden, prompts, mask, adapter=adapter, lora=lora)

    def _swarm_dispatch(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        hidden = hidden_argument(args, kwargs)
        if index == 0:
            cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
            if cache is None:
                cache = next((arg for arg in args if isinstance(arg, (RemoteCache, SwarmPass))), None)
            positions = kwargs.get("position_ids")
            hidden = self._through_swarm(hidden, cache, positions).to(hidden.device)  # the client's modules
        return (hidden, None) if self._tuple_output else hidden  # may be on an accelerator

    def _through_swarm(self, hidden: torch.Tensor, cache: Any, positions: Any) -> torch.Tensor:
        """Block 0's hidden states [batch, seq, hidden] through every block on the swarm, with the attention
        mask the cache carries: a step of the cache's session, or a stateless (differentiable) pass."""
        swarm = self.swarm
        if isinstance(cache, RemoteCache):
            batch, seq = hidden.shape[:2]
            if not isinstance(positions, torch.Tensor) or positions.shape[-1] != seq:
                start = (
                    cache.pending_rollback if cache.pending_rollback is not None else cache.session.position
                )
                positions = torch.arange(start, start + seq).expand(batch, -1)
            # the peers keep the earlier positions' mask: only the new ones travel
            new = None if cache.mask is None else cache.mask[:, -seq:]
            return cache.step(hidden, positions.expand(batch, -1), swarm.runtime, new)
        if isinstance(cache, SwarmPass):
            return self._remote(hidden, cache.prompts, cache.mask)
        if cache is None:  # the family's code dropped the cache (gradient checkpointing): no padding known
            tuning = getattr(self, "prompt_tuning", None)
            return self._remote(hidden, tuning.remote_prompts() if tuning is not None else None, None)
        raise InvalidInputError(
            f"a local {type(cache).__name__} cannot hold the peers' K/V: call generate(), use "
            "inference_session(), or run the model without a cache"
        )

    def forward(self, *args: Any, prompt_placeholders: bool = False, **kwargs: Any) -> Any:
        """The family's forward with its blocks on the swarm. `prompt_placeholders` (set by `generate()` with
        tuned prompts): the first pre_seq_len positions of input_ids stand for the prompts."""
        if len(args) > 1:  # by keyword from here on: the cache is looked up and handed on by name
            names = list(inspect.signature(super().forward).parameters)  # type: ignore[misc]
            if any(name in kwargs for name in names[1 : len(args)]):
                raise InvalidInputError("an argument was passed both by position and by keyword")
            kwargs.update(zip(names[1:], args[1:], strict=False))
            args = args[:1]
        if kwargs.get("past_key_values") is None:
            kwargs["use_cache"] = False  # a plain forward is stateless: one Forward per hop, no session
        output = self._forward(args, kwargs, placeholders=prompt_placeholders)
        if isinstance(getattr(output, "past_key_values", None), SwarmPass):
            output.past_key_values = None  # the pass's mask carrier is not a cache to continue from
        return output

    def _family_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """The family's own forward, handed a cache that carries this call's 2D attention mask to block 0's
        slot: the session's `RemoteCache`, or a new `SwarmPass` for a stateless pass."""
        mask = _padding_mask(kwargs.get("attention_mask"))
        cache = kwargs.get("past_key_values")
        if isinstance(cache, RemoteCache):
            cache.mask = mask
        elif cache is None:
            tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)
            prompts = tuning.remote_prompts() if tuning is not None else None
            kwargs = dict(kwargs, past_key_values=SwarmPass(mask, prompts))
        return super().forward(*args, **kwargs)  # type: ignore[misc]

    def _forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], *, placeholders: bool) -> Any:
        tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)
        if tuning is None and self._causal:
            return self._family_forward(args, kwargs)
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise InvalidInputError("pass input_ids or inputs_embeds")
            embeds = self.get_input_embeddings()(input_ids)  # type: ignore[attr-defined]
        padded = _padding_mask(kwargs.get("attention_mask")) is not None
        if tuning is None:
            if padded and input_ids is not None:  # pools each row's last non-pad token
                return self._family_forward((), dict(kwargs, input_ids=input_ids))
            return self._family_forward((), dict(kwargs, inputs_embeds=embeds))  # the last position
        if placeholders:  # generate(): the first pre_seq_len positions stand for the prompts
            cache = kwargs.get("past_key_values")
            if cache is None or cache.get_seq_length() == 0:
                embeds = tuning.replace_placeholders(embeds)
            return self._family_forward((), dict(kwargs, inputs_embeds=embeds))
        if not self._causal and padded:
            raise InvalidInputError("a classifier with tuned prompts takes unpadded batches only")
        output = self._family_forward((), tuning.prepend(embeds, kwargs, extend_labels=self._causal))
        if self._causal and getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, tuning.pre_seq_len :]  # logits of the caller's positions only
        return output

    @contextlib.contextmanager
    def inference_session(self, *, max_length: int) -> Iterator[InferenceSession]:
        """Keep the peers' caches across `generate()` calls; each call continues the same sequence."""
        if self._own_lora is not None:
            raise InvalidInputError(
                "inference sessions do not carry the client's own LoRA: save it and serve it with "
                "`corolla serve --adapters`, or call generate() outside a session (a stateless pass a token)"
            )
        session = self.swarm.new_session(max_length, adapter=self.active_adapter or "")
        previous, self._active_session = self._active_session, session
        try:
            yield session
        finally:
            self._active_session = previous
            self.swarm.runtime.run(session.aclose())

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)
        if self._own_lora is not None and tuning is None:
            # the client's own LoRA rides stateless Forwards: each token is a pass of the whole sequence
            self._no_lora_sessions()
            return super().generate(inputs, *args, use_cache=False, **kwargs)  # type: ignore[misc]
        if tuning is None:
            return self._generate(inputs, *args, **kwargs)
        if self._active_session is not None or kwargs.get("past_key_values") is not None:
            raise InvalidInputError("generate() with tuned prompts cannot continue a session yet")
        # the prompts enter as `pre_seq_len` placeholder tokens whose embeddings `forward` replaces
        input_ids = inputs if inputs is not None else kwargs.pop("input_ids", None)
        if not isinstance(input_ids, torch.Tensor):
            raise InvalidInputError("generate() with tuned prompts needs input_ids")
        placeholders = input_ids.new_zeros(input_ids.shape[0], tuning.pre_seq_len)
        input_ids = torch.cat([placeholders, input_ids], dim=1)
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = torch.cat(
                [torch.ones_like(placeholders, dtype=mask.dtype), mask], dim=1
            )
        if kwargs.get("max_length") is not None:
            kwargs["max_length"] += tuning.pre_seq_len
        if tuning.deep_prompts is not None or self._own_lora is not None:
            # sessions carry no per-block prompts nor a client's LoRA: each token is a stateless Forward of
            # the whole sequence
            output = super().generate(  # type: ignore[misc]
                input_ids, *args, use_cache=False, prompt_placeholders=True, **kwargs
            )
        else:
            output = self._generate(input_ids, *args, prompt_placeholders=True, **kwargs)
        if isinstance(output, torch.Tensor):
            return output[:, tuning.pre_seq_len :]
        output.sequences = output.sequences[:, tuning.pre_seq_len :]
        return output

    def _generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is not None:
            return super().generate(inputs, *args, **kwargs)  # type: ignore[misc]
        if self._active_session is not None:
            return super().generate(  # type: ignore[misc]
                inputs, *args, past_key_values=RemoteCache(self._active_session), **kwargs
            )
        input_ids = inputs if inputs is not None else kwargs.get("input_ids")
        prompt_length = int(input_ids.shape[-1]) if isinstance(input_ids, torch.Tensor) else 0
        generation_config = kwargs.get("generation_config") or self.generation_config  # type: ignore[attr-defined]
        new_tokens = kwargs.get("max_new_tokens") or generation_config.max_new_tokens
        max_length = (
            prompt_length + new_tokens
            if new_tokens
            else kwargs.get("max_length") or generation_config.max_length
        )
        session = self.swarm.new_session(int(max_length), adapter=self.active_adapter or "")
        try:
            return super().generate(inputs, *args, past_key_values=RemoteCache(session), **kwargs)  # type: ignore[misc]
        finally:
            self.swarm.runtime.run(session.aclose())

    def _get_candidate_generator(self, generation_config: Any, *args: Any, **kwargs: Any) -> Any:
        """Prompt lookup (`prompt_lookup_num_tokens`, the maximum draft length) with a draft length that
        follows the acceptance rate; other candidate generators (a draft model) as transformers builds them.
        Each draft is verified by one step through the swarm; `RemoteCache.crop` sends the rollback of the
        rejected positions with the next step."""
        lookup = generation_config.prompt_lookup_num_tokens
        if lookup is None or generation_config.assistant_early_exit is not None:
            return super()._get_candidate_generator(generation_config, *args, **kwargs)  # type: ignore[misc]
        if generation_config.assistant_ensemble_weight is not None:
            raise InvalidInputError("assistant_ensemble_weight needs a draft model, not prompt lookup")
        logits_processor = kwargs.get("logits_processor")
        return AdaptivePromptLookup(
            max_tokens=lookup,
            max_ngram=generation_config.max_matching_ngram_size or 3,
            max_length=generation_config.max_length,
            eos_token_id=generation_config._eos_token_tensor,
            logits_processor=logits_processor if logits_processor else None,
            vocab_size=self.config.get_text_config().vocab_size,  # type: ignore[attr-defined]
        )

    def _no_lora_sessions(self) -> None:
        """Sessions keep no client LoRA on the peers: generation with one runs stateless passes."""
        if self._own_lora is not None and self._active_session is not None:
            raise InvalidInputError(
                "inference sessions do not carry the client's own LoRA: generate() outside a session runs it "
                "(a stateless pass a token), or save it and serve it with `corolla serve --adapters`"
            )

    def shutdown(self) -> None:
        """Leave the swarm: close streams, channels and the DHT node. Also done at interpreter exit."""
        self.swarm.close()


if TYPE_CHECKING:

    class DistributedCausalLM(DistributedModelMixin, PreTrainedModel):
        """What `AutoDistributedModelForCausalLM.from_pretrained` returns, for type checkers."""


class AutoDistributedModelForCausalLM:
    """Loads a causal LM whose blocks run on a swarm; the result is the family's own transformers class
    (e.g. `LlamaForCausalLM`) with local embeddings and head, so `generate()` works as with transformers.

    `tuning_mode="ptune"` adds `pre_seq_len` trainable prompt embeddings before the inputs; `"deep_ptune"`
    also trainable prompts added to the hidden states entering every block (on the peers). Only the prompts
    require gradients; they stay float32 whatever `dtype` the model runs in. Further keyword arguments are
    `ClientConfig` fields; `swarm=` reuses a `SwarmConnection` (then no DHT is joined).
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        initial_peers: list[str] | None = None,
        dtype: str | torch.dtype = torch.float32,
        model_id: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        swarm: SwarmConnection | None = None,
        device: str | torch.device = "cpu",
        active_adapter: str | None = None,
        lora: LoraConfig | str | os.PathLike[str] | None = None,
        **config: Any,
    ) -> DistributedCausalLM:
        torch_dtype = parse_dtype(dtype)
        family_class = causal_lm_class(load_config(resolve_model_path(name_or_path)))
        model, anatomy = load_client_model(name_or_path, torch_dtype, model_class=_distributed(family_class))
        trainable = _add_prompts(model, anatomy, tuning_mode, pre_seq_len)
        return _join(
            model,
            anatomy,
            name_or_path,
            torch_dtype,
            trainable,
            swarm,
            model_id,
            initial_peers,
            config,
            device,
            adapters=(active_adapter, lora),
        )


class AutoDistributedModelForSequenceClassification:
    """The family's `*ForSequenceClassification` over the swarm: a trainable float32 head (new, initialized
    as transformers does) on the client's last position, optionally with tuned prompts as for a causal LM.
    A padded batch (`attention_mask`) is pooled at each row's last token that is not the config's
    pad_token_id, as transformers does; with tuned prompts, batches must be unpadded."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        initial_peers: list[str] | None = None,
        num_labels: int = 2,
        dtype: str | torch.dtype = torch.float32,
        model_id: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        swarm: SwarmConnection | None = None,
        device: str | torch.device = "cpu",
        active_adapter: str | None = None,
        lora: LoraConfig | str | os.PathLike[str] | None = None,
        **config: Any,
    ) -> DistributedCausalLM:
        torch_dtype = parse_dtype(dtype)
        folder = resolve_model_path(name_or_path)
        hf_config = load_config(folder)
        hf_config.num_labels = num_labels
        if hf_config.pad_token_id is None:
            hf_config.pad_token_id = 0  # transformers asks for one with batches > 1; unused from embeddings
        skeleton = build_skeleton(
            hf_config,
            torch_dtype,
            model_class=_distributed(sequence_classification_class(hf_config), causal=False),
        )
        anatomy = locate(skeleton)
        heads = [name for name, _ in skeleton.named_children() if name != skeleton.base_model_prefix]

        def is_head(name: str) -> bool:
            return any(name == head or name.startswith(head + ".") for head in heads)

        client_modules, client_keys = (
            module_filter(anatomy, Role.CLIENT),
            checkpoint_key_filter(anatomy, Role.CLIENT),
        )
        load_weights(
            skeleton,
            Path(folder),
            wanted_key=lambda key: client_keys(key) and key.startswith(skeleton.base_model_prefix + "."),
            wanted_module=lambda name: client_modules(name) and not is_head(name),
            dtype=torch_dtype,
        )
        trainable = [_new_head(skeleton, name) for name in heads]
        trainable += _add_prompts(skeleton, anatomy, tuning_mode, pre_seq_len)
        return _join(
            skeleton,
            anatomy,
            name_or_path,
            torch_dtype,
            trainable,
            swarm,
            model_id,
            initial_peers,
            config,
            device,
            adapters=(active_adapter, lora),
        )


def _distributed(family_class: type[PreTrainedModel], *, causal: bool = True) -> type[PreTrainedModel]:
    """The family's class with the swarm mixed in (its own forward, post-block code and `generate()`);
    `causal=False`: a classifier. Its `forward` shows the family's signature and `prompt_placeholders`:
    `generate()` reads it to pass position ids derived from the attention mask (left padding), as it does
    for the family's own model, and to pass `prompt_placeholders` on to every call."""

    def forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        return DistributedModelMixin.forward(self, *args, **kwargs)

    signature = inspect.signature(family_class.forward)
    parameters = list(signature.parameters.values())
    placeholders = inspect.Parameter("prompt_placeholders", inspect.Parameter.KEYWORD_ONLY, default=False)
    at = next(
        (i for i, p in enumerate(parameters) if p.kind is inspect.Parameter.VAR_KEYWORD), len(parameters)
    )
    parameters.insert(at, placeholders)
    forward.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    return type(
        f"Distributed{family_class.__name__}",
        (DistributedModelMixin, family_class),
        {"forward": forward, "_causal": causal},
    )


def _new_head(model: PreTrainedModel, name: str) -> torch.nn.Module:
    """A float32 head initialized as transformers initializes a new one (the checkpoint has none)."""
    head = model.get_submodule(name)
    head.to_empty(device="cpu")
    head.to(torch.float32)
    for module in head.modules():
        model._init_weights(module)
    head.register_forward_pre_hook(_inputs_to_float32)
    return head


def _inputs_to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _add_prompts(
    model: PreTrainedModel, anatomy: Anatomy, tuning_mode: str | None, pre_seq_len: int
) -> list[torch.nn.Module]:
    """The trainable prompts of `tuning_mode`, installed on the model as `prompt_tuning`."""
    if tuning_mode is None:
        if pre_seq_len:
            raise InvalidInputError("pre_seq_len needs a tuning_mode (ptune or deep_ptune)")
        return []
    tuning = PromptTuning(
        tuning_mode,
        pre_seq_len,
        embeddings=model.get_input_embeddings(),
        num_blocks=anatomy.num_blocks,
        hidden_size=anatomy.hidden_size,
    )
    model.prompt_tuning = tuning
    return [tuning]


def _client_lora(
    model: PreTrainedModel, anatomy: Anatomy, lora: LoraConfig | str | os.PathLike[str]
) -> SwarmLora:
    """The client's LoRA for the model's blocks (still on meta: their shapes only)."""
    blocks = anatomy.blocks(model)
    layers = {
        (index, path): shape
        for index, block in enumerate(blocks)
        for path, shape in lora_layers(block).items()
    }
    if isinstance(lora, (str, os.PathLike)):
        return SwarmLora.from_pretrained(lora, layers, anatomy.layers_path)
    return SwarmLora(lora, layers, anatomy.layers_path)


def _join(
    model: PreTrainedModel,
    anatomy: Anatomy,
    name_or_path: str | os.PathLike[str],
    dtype: torch.dtype,
    trainable: list[torch.nn.Module],
    swarm: SwarmConnection | None,
    model_id: str | None,
    initial_peers: list[str] | None,
    config: dict[str, Any],
    device: str | torch.device,
    *,
    adapters: tuple[str | None, LoraConfig | str | os.PathLike[str] | None] = (None, None),
) -> DistributedCausalLM:
    """Freeze all but `trainable` (and the client's own LoRA), move the client's modules to `device`,
    connect the loaded client model to the swarm and route its blocks there (hidden states cross to the CPU
    and back once per call). `adapters`: the served adapter to run and the client's LoRA (a `LoraConfig`
    for a new one, a PEFT folder to train further)."""
    active_adapter, lora = adapters
    if active_adapter is not None and lora is not None:
        raise InvalidInputError("pass active_adapter (served by peers) or lora (the client's own), not both")
    if lora is not None:
        model.lora = _client_lora(model, anatomy, lora)
        trainable = [*trainable, model.lora]
    freeze_except(model, trainable)
    if swarm is None:
        client_config = ClientConfig(initial_peers=list(initial_peers or []), **config)
        model_id = model_id or client_config.model_id or model_id_from_path(str(name_or_path))
        logger.info("joining the swarm model_id=%s", model_id)
        swarm = SwarmConnection.connect(
            client_config,
            model_id=model_id,
            num_blocks=anatomy.num_blocks,
            wire_dtype=client_config.wire_dtype or str(dtype).removeprefix("torch."),
        )
    elif config or initial_peers:
        raise InvalidInputError("pass the client options to the SwarmConnection, not with swarm=")
    distributed = cast("DistributedCausalLM", model)
    distributed.swarm = swarm
    distributed.active_adapter = active_adapter or None
    install_slots(distributed, anatomy, distributed._swarm_dispatch)
    move_loaded(distributed, torch.device(device))
    distributed._tuple_output = detect_tuple_output(distributed, anatomy)
    logger.info(
        "client ready model=%s blocks=%d trainable=%d",
        name_or_path,
        anatomy.num_blocks,
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return distributed
