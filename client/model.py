"""The client's side of a model: input embeddings, final norm, LM head and the family's code around the
block loop (learned positions, embedding norms, logit soft-capping), loaded without any block; and
`AutoDistributedModelForCausalLM`, the same transformers model with its blocks run by the swarm."""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
from hivemind.dht.node import DHTNode
from transformers import PreTrainedModel
from transformers.cache_utils import Cache, CacheLayerMixin

from client.config import ClientConfig
from client.discovery import BanList, DhtDiscovery, Discovery
from client.finetune import PromptTuning, RemoteSpans, freeze_except
from client.route import PeerStats
from client.runtime import Runtime
from client.session import ChannelPool, InferenceSession
from protos.checkpoint import (
    build_skeleton,
    causal_lm_class,
    load_config,
    load_weights,
    parse_dtype,
    resolve_model_path,
    sequence_classification_class,
)
from protos.dht import start_dht_node
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
from protos.records import model_id_from_path
from protos.tensors import dtype_from_name

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


def _run_owner_probe(model: PreTrainedModel, anatomy: Anatomy) -> None:
    dummy = torch.zeros(1, 2, anatomy.embed_dim, dtype=model.dtype)
    with torch.inference_mode():
        anatomy.owner(model)(inputs_embeds=dummy, use_cache=False)


class ClientModules:
    """Embeddings and head of a causal LM; `embed` gives the hidden states entering block 0 and `head` the
    logits from the hidden states leaving the last block, each computed by the family's own forward."""

    def __init__(self, model: PreTrainedModel, anatomy: Anatomy) -> None:
        self.model = model
        self.anatomy = anatomy
        self._lock = threading.Lock()
        self._final_hidden: torch.Tensor | None = None  # set for the duration of one `head` call
        install_slots(model, anatomy, self._dispatch)
        self.tuple_output = detect_tuple_output(model, anatomy, lambda: _run_owner_probe(model, anatomy))

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


class _LengthLayer(CacheLayerMixin):
    """A cache layer that holds no K/V, only the number of positions the peers hold."""

    is_sliding = False
    is_compileable = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the remote cache holds no K/V: the blocks run on peers")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:  # type: ignore[override]
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.length = 0


class RemoteCache(Cache):
    """What `generate()` sees as `past_key_values`: the length of the peers' caches, and the cache edits
    (beam reorder, rollback) it asks for, sent to the peers with the next step."""

    def __init__(self, session: InferenceSession) -> None:
        self._length = _LengthLayer()
        super().__init__(layers=[self._length])
        self.session = session
        self._length.length = session.position
        self.pending_beam: torch.Tensor | None = None
        self.pending_rollback: int | None = None

    def crop(self, max_length: int) -> None:
        # transformers 5: crop(-n) drops the last n positions; crop(0) only trims sliding windows
        if max_length > 0:
            raise InvalidInputError("crop() takes the negative number of positions to drop")
        if max_length < 0:
            self.pending_rollback = self.get_seq_length() + max_length
            self._length.length = self.pending_rollback

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        beam = beam_idx.to(torch.int64).cpu()
        self.pending_beam = beam if self.pending_beam is None else self.pending_beam[beam]

    def batch_repeat_interleave(self, repeats: int) -> None:
        raise NotImplementedError("repeating the batch of a remote cache is not supported")

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        raise NotImplementedError("selecting rows of a remote cache is not supported")

    def step(self, hidden: torch.Tensor, positions: torch.Tensor, runtime: Runtime) -> torch.Tensor:
        beam, rollback = self.pending_beam, self.pending_rollback
        output = runtime.run(self.session.astep(hidden, positions, beam_indices=beam, rollback_to=rollback))
        self.pending_beam = self.pending_rollback = None
        self._length.length = self.session.position
        return output


class DistributedModelMixin:
    """Mixed into the family's `*ForCausalLM`: block 0's slot sends the hidden states through the swarm and
    the later slots pass the result on, so the family's own post-block code and `generate()` run locally."""

    _corolla: _SwarmLink

    def _swarm_dispatch(self, index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        link = self._corolla
        hidden = hidden_argument(args, kwargs)
        if index == 0:
            cache = kwargs.get("past_key_values", kwargs.get("layer_past"))
            if cache is None:
                cache = next((arg for arg in args if isinstance(arg, RemoteCache)), None)
            if isinstance(cache, RemoteCache):
                batch, seq = hidden.shape[:2]
                positions = kwargs.get("position_ids")
                if not isinstance(positions, torch.Tensor) or positions.shape[-1] != seq:
                    start = (
                        cache.pending_rollback
                        if cache.pending_rollback is not None
                        else cache.session.position
                    )
                    positions = torch.arange(start, start + seq).expand(batch, -1)
                hidden = cache.step(hidden, positions.expand(batch, -1), link.runtime)
            elif cache is None:
                # differentiable: a loss on the output backpropagates through the peers to the client
                tuning = getattr(self, "prompt_tuning", None)
                hidden = link.remote(hidden, tuning.remote_prompts() if tuning is not None else None)
            else:
                raise InvalidInputError(
                    f"a local {type(cache).__name__} cannot hold the peers' K/V: call generate(), use "
                    "inference_session(), or run the model without a cache"
                )
        return (hidden, None) if link.tuple_output else hidden

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("past_key_values") is None:
            kwargs["use_cache"] = False  # a plain forward is stateless: one Forward per hop, no session
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise InvalidInputError(
                "padded batches are not supported over the swarm yet; send rows separately"
            )
        link = self._corolla
        tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)
        if tuning is None and link.causal:
            return super().forward(*args, **kwargs)  # type: ignore[misc]
        if len(args) > 1:
            raise InvalidInputError("pass the arguments after input_ids by keyword")
        input_ids = args[0] if args else kwargs.pop("input_ids", None)
        embeds = kwargs.pop("inputs_embeds", None)
        if embeds is None:
            if input_ids is None:
                raise InvalidInputError("pass input_ids or inputs_embeds")
            embeds = self.get_input_embeddings()(input_ids)  # type: ignore[attr-defined]
        if tuning is None:  # a classifier pools the last position of an unpadded batch
            return super().forward(inputs_embeds=embeds, **kwargs)  # type: ignore[misc]
        if link.placeholders:  # generate(): the first pre_seq_len positions stand for the prompts
            cache = kwargs.get("past_key_values")
            if cache is None or cache.get_seq_length() == 0:
                embeds = tuning.replace_placeholders(embeds)
            return super().forward(inputs_embeds=embeds, **kwargs)  # type: ignore[misc]
        output = super().forward(**tuning.prepend(embeds, kwargs, extend_labels=link.causal))  # type: ignore[misc]
        if link.causal and getattr(output, "logits", None) is not None:
            output.logits = output.logits[:, tuning.pre_seq_len :]  # logits of the caller's positions only
        return output

    @contextlib.contextmanager
    def inference_session(self, *, max_length: int) -> Iterator[InferenceSession]:
        """Keep the peers' caches across `generate()` calls; each call continues the same sequence."""
        link = self._corolla
        session = link.new_session(max_length)
        previous, link.active_session = link.active_session, session
        try:
            yield session
        finally:
            link.active_session = previous
            link.runtime.run(session.aclose())

    def generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        tuning: PromptTuning | None = getattr(self, "prompt_tuning", None)
        if tuning is None:
            return self._generate(inputs, *args, **kwargs)
        if self._corolla.active_session is not None or kwargs.get("past_key_values") is not None:
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
        link = self._corolla
        link.placeholders = True
        try:
            if tuning.deep_prompts is not None:
                # sessions carry no per-block prompts: each token is a stateless Forward of the whole sequence
                output = super().generate(input_ids, *args, use_cache=False, **kwargs)  # type: ignore[misc]
            else:
                output = self._generate(input_ids, *args, **kwargs)
        finally:
            link.placeholders = False
        if isinstance(output, torch.Tensor):
            return output[:, tuning.pre_seq_len :]
        output.sequences = output.sequences[:, tuning.pre_seq_len :]
        return output

    def _generate(self, inputs: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        link = self._corolla
        if kwargs.get("past_key_values") is not None:
            return super().generate(inputs, *args, **kwargs)  # type: ignore[misc]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and not bool(mask.all()):
            raise InvalidInputError(
                "padded batches are not supported over the swarm yet; send rows separately"
            )
        if link.active_session is not None:
            return super().generate(  # type: ignore[misc]
                inputs, *args, past_key_values=RemoteCache(link.active_session), **kwargs
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
        session = link.new_session(int(max_length))
        try:
            return super().generate(inputs, *args, past_key_values=RemoteCache(session), **kwargs)  # type: ignore[misc]
        finally:
            link.runtime.run(session.aclose())

    def shutdown(self) -> None:
        """Leave the swarm: close streams, channels and the DHT node. Also done at interpreter exit."""
        self._corolla.close()


if TYPE_CHECKING:

    class DistributedCausalLM(DistributedModelMixin, PreTrainedModel):
        """What `AutoDistributedModelForCausalLM.from_pretrained` returns, for type checkers."""


class _SwarmLink:
    """What a distributed model holds to reach the swarm."""

    def __init__(self, config: ClientConfig, model_id: str, num_blocks: int, wire_dtype: str) -> None:
        self.config = config
        self.wire_dtype = wire_dtype
        self.runtime = Runtime()
        self.channels = ChannelPool(max_message_bytes=config.max_message_bytes)
        self.bans = BanList(config.ban_timeout, config.ban_backoff, config.max_ban_timeout)
        self.stats = PeerStats()  # what this client measured of each peer, shared by its sessions
        self.tuple_output = False
        self.active_session: InferenceSession | None = None
        self.causal = True  # a causal LM; False: a classifier (always runs from input embeddings)
        self.placeholders = False  # inside generate() with tuned prompts

        async def connect() -> tuple[DHTNode, Discovery]:
            node = await start_dht_node(initial_peers=config.initial_peers, client_mode=True)
            discovery = DhtDiscovery(
                node, model_id, num_blocks=num_blocks, refresh_period=config.refresh_period
            )
            discovery.start()
            return node, discovery

        self.node, self.discovery = self.runtime.run(connect(), timeout=60)
        self.remote = RemoteSpans(
            discovery=self.discovery,
            bans=self.bans,
            channels=self.channels,
            config=config,
            runtime=self.runtime,
            wire_dtype=dtype_from_name(wire_dtype),
        )

    def new_session(self, max_length: int) -> InferenceSession:
        return InferenceSession(
            discovery=self.discovery,
            bans=self.bans,
            channels=self.channels,
            config=self.config,
            max_length=max_length,
            wire_dtype=self.wire_dtype,
            stats=self.stats,
        )

    def close(self) -> None:
        async def close() -> None:
            await self.channels.close()
            await self.discovery.close()
            await self.node.shutdown()

        with contextlib.suppress(Exception):
            self.runtime.run(close(), timeout=30)
        self.runtime.close()


class AutoDistributedModelForCausalLM:
    """Loads a causal LM whose blocks run on a swarm; the result is the family's own transformers class
    (e.g. `LlamaForCausalLM`) with local embeddings and head, so `generate()` works as with transformers.

    `tuning_mode="ptune"` adds `pre_seq_len` trainable prompt embeddings before the inputs; `"deep_ptune"`
    also trainable prompts added to the hidden states entering every block (on the peers). Only the prompts
    require gradients; they stay float32 whatever `dtype` the model runs in.
    """

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        initial_peers: list[str],
        dtype: str | torch.dtype = torch.float32,
        model_id: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        **config: Any,
    ) -> DistributedCausalLM:
        torch_dtype = parse_dtype(dtype)
        family_class = causal_lm_class(load_config(resolve_model_path(name_or_path)))
        distributed_class = type(
            f"Distributed{family_class.__name__}", (DistributedModelMixin, family_class), {}
        )
        model, anatomy = load_client_model(name_or_path, torch_dtype, model_class=distributed_class)
        return _join_swarm(
            model,
            anatomy,
            name_or_path,
            initial_peers=initial_peers,
            dtype=torch_dtype,
            model_id=model_id,
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            config=config,
        )


class AutoDistributedModelForSequenceClassification:
    """The family's `*ForSequenceClassification` over the swarm: a trainable float32 head (new, initialized
    as transformers does) on the client's last position, optionally with tuned prompts as for a causal LM.
    Batches must be unpadded (every row the same length)."""

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike[str],
        *,
        initial_peers: list[str],
        num_labels: int = 2,
        dtype: str | torch.dtype = torch.float32,
        model_id: str | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        **config: Any,
    ) -> DistributedCausalLM:
        torch_dtype = parse_dtype(dtype)
        folder = resolve_model_path(name_or_path)
        hf_config = load_config(folder)
        hf_config.num_labels = num_labels
        if hf_config.pad_token_id is None:
            hf_config.pad_token_id = 0  # transformers asks for one with batches > 1; unused from embeddings
        family_class = sequence_classification_class(hf_config)
        distributed_class = type(
            f"Distributed{family_class.__name__}", (DistributedModelMixin, family_class), {}
        )
        skeleton = build_skeleton(hf_config, torch_dtype, model_class=distributed_class)
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
        trainable = []
        for name in heads:
            head = skeleton.get_submodule(name)
            head.to_empty(device="cpu")
            head.to(torch.float32)
            for module in head.modules():
                skeleton._init_weights(module)
            head.register_forward_pre_hook(_inputs_to_float32)
            trainable.append(head)
        return _join_swarm(
            skeleton,
            anatomy,
            name_or_path,
            initial_peers=initial_peers,
            dtype=torch_dtype,
            model_id=model_id,
            tuning_mode=tuning_mode,
            pre_seq_len=pre_seq_len,
            config=config,
            causal=False,
            trainable=trainable,
        )


def _inputs_to_float32(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)


def _join_swarm(
    model: PreTrainedModel,
    anatomy: Anatomy,
    name_or_path: str | os.PathLike[str],
    *,
    initial_peers: list[str],
    dtype: torch.dtype,
    model_id: str | None,
    tuning_mode: str | None,
    pre_seq_len: int,
    config: dict[str, Any],
    causal: bool = True,
    trainable: list[torch.nn.Module] | None = None,
) -> DistributedCausalLM:
    """Connect a loaded client model to the swarm, add the prompts of `tuning_mode` and freeze the rest."""
    client_config = ClientConfig(initial_peers=list(initial_peers), **config)
    trainable = list(trainable or [])
    if tuning_mode is not None:
        tuning = PromptTuning(
            tuning_mode,
            pre_seq_len,
            embeddings=model.get_input_embeddings(),
            num_blocks=anatomy.num_blocks,
            hidden_size=anatomy.hidden_size,
        )
        model.prompt_tuning = tuning
        trainable.append(tuning)
    elif pre_seq_len:
        raise InvalidInputError("pre_seq_len needs a tuning_mode (ptune or deep_ptune)")
    freeze_except(model, trainable)
    link = _SwarmLink(
        client_config,
        model_id or client_config.model_id or model_id_from_path(str(name_or_path)),
        anatomy.num_blocks,
        client_config.wire_dtype or str(dtype).removeprefix("torch."),
    )
    link.causal = causal
    distributed = cast("DistributedCausalLM", model)
    distributed._corolla = link
    install_slots(distributed, anatomy, distributed._swarm_dispatch)
    link.tuple_output = _probe_tuple_output(distributed, anatomy)
    logger.info(
        "client ready model=%s blocks=%d tuning=%s trainable=%d",
        name_or_path,
        anatomy.num_blocks,
        tuning_mode,
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return distributed


def _probe_tuple_output(model: PreTrainedModel, anatomy: Anatomy) -> bool:
    return detect_tuple_output(model, anatomy, lambda: _run_owner_probe(model, anatomy))
