"""Model anatomy shared by both sides: where a transformers model keeps its blocks, which modules belong to
the client and which to a peer, and the slots that stand in for blocks so the family's own code runs around
them. Knows nothing about networking or caches."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel

from protos.errors import UnsupportedModelError

# A slot handler gets (block index, positional args, keyword args) exactly as the family's loop called the
# block, and returns what the block would have returned.
SlotHandler = Callable[[int, tuple[Any, ...], dict[str, Any]], Any]


class Role(Enum):
    CLIENT = "client"  # input embeddings, LM head and the small modules around the block loop
    PEER = "peer"  # a span of blocks and the small modules the family runs before its block loop


class StopForward(Exception):
    """Raised inside a slot to leave the family's forward once the value we need exists."""

    def __init__(self, value: Any) -> None:
        super().__init__("stop forward")
        self.value = value


@dataclass(frozen=True)
class Anatomy:
    """Where the parts of one transformers causal-LM model live, by module name."""

    owner_path: str  # module whose forward loops over the blocks ("model", "transformer", "model.decoder")
    layers_attr: str  # the owner's attribute holding the block list ("layers", "h")
    num_blocks: int
    embed_dim: int  # width of `inputs_embeds` the owner expects (OPT's project_in runs on it)
    hidden_size: int  # width of the hidden states between blocks
    embeddings_path: str
    head_path: str | None
    owner_params: frozenset[str]  # keyword arguments the owner's forward accepts

    @property
    def layers_path(self) -> str:
        return f"{self.owner_path}.{self.layers_attr}" if self.owner_path else self.layers_attr

    def owner(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.owner_path) if self.owner_path else model

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return getattr(self.owner(model), self.layers_attr)


def locate(model: PreTrainedModel) -> Anatomy:
    """Find the block list generically: a transformers model names its block class in `_no_split_modules`."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "get_input_embeddings"):
        raise UnsupportedModelError(f"{type(model).__name__} is not a transformers model")
    text_config = config.get_text_config(decoder=True)
    num_blocks = getattr(text_config, "num_hidden_layers", None)
    block_names = set(getattr(model, "_no_split_modules", None) or ())
    found = None
    for name, module in model.named_modules():
        if (
            isinstance(module, nn.ModuleList)
            and len(module) == num_blocks
            and all(type(block).__name__ in block_names for block in module)
        ):
            found = name
            break
    if not found or not num_blocks:
        raise UnsupportedModelError(
            f"{type(model).__name__}: no list of {num_blocks} decoder blocks "
            f"(of {sorted(block_names)}) found; corolla runs decoder-only models that loop over their blocks"
        )
    owner_path, _, layers_attr = found.rpartition(".")
    names = {id(module): name for name, module in model.named_modules()}
    embeddings = model.get_input_embeddings()
    head = model.get_output_embeddings()
    owner = model.get_submodule(owner_path) if owner_path else model
    embed_dim = getattr(embeddings, "embedding_dim", None) or next(embeddings.parameters()).shape[-1]
    return Anatomy(
        owner_path=owner_path,
        layers_attr=layers_attr,
        num_blocks=num_blocks,
        embed_dim=int(embed_dim),
        hidden_size=int(text_config.hidden_size),
        embeddings_path=names[id(embeddings)],
        head_path=names.get(id(head)) if head is not None else None,
        owner_params=frozenset(inspect.signature(owner.forward).parameters),
    )


class Slot(nn.Module):
    """Stands in for block `index` inside the family's loop and hands the call to a handler.

    The real block, if any, is kept unregistered so the owner's parameters stay those of the small modules.
    """

    def __init__(self, index: int, handler: SlotHandler) -> None:
        super().__init__()
        self.index = index
        self.handler = handler

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.handler(self.index, args, kwargs)


def install_slots(model: nn.Module, anatomy: Anatomy, handler: SlotHandler) -> nn.ModuleList:
    """Replace the owner's block list by slots for good; returns the original list of blocks."""
    owner = anatomy.owner(model)
    blocks = getattr(owner, anatomy.layers_attr)
    owner._modules[anatomy.layers_attr] = nn.ModuleList(Slot(i, handler) for i in range(anatomy.num_blocks))
    return blocks


def hidden_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def replace_hidden(
    args: tuple[Any, ...], kwargs: dict[str, Any], hidden: torch.Tensor
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def detect_tuple_output(
    model: nn.Module, anatomy: Anatomy, run_owner: Callable[[], Any] | None = None
) -> bool:
    """Does the family's loop take `outputs[0]` from each block (Bloom, Falcon) or thread a tensor through?

    Probe with slots: slot 0 returns the object it received; if slot 1 receives that very object, the loop
    threads tensors. Annotations are not trusted (Gemma3's says tuple but returns a tensor).
    `run_owner` runs the owner's forward once on a dummy input (default: two positions of zero embeddings
    in the model's dtype); the slots must already be installed.
    """
    if run_owner is None:
        run_owner = functools.partial(_run_owner_on_zeros, model, anatomy)
    if anatomy.num_blocks < 2:
        annotation = str(inspect.signature(type(anatomy.blocks(model)[0]).forward).return_annotation)
        return annotation.startswith("tuple")
    seen: dict[int, Any] = {}
    owner = anatomy.owner(model)
    saved = owner._modules[anatomy.layers_attr]

    def probe(index: int, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        seen[index] = hidden_argument(args, kwargs)
        if index == 1:
            raise StopForward(None)
        return seen[index]

    owner._modules[anatomy.layers_attr] = nn.ModuleList(Slot(i, probe) for i in range(anatomy.num_blocks))
    try:
        run_owner()
    except StopForward:
        pass
    finally:
        owner._modules[anatomy.layers_attr] = saved
    if 1 not in seen:
        raise UnsupportedModelError("the model's forward did not call its blocks in order")
    return seen[1] is not seen[0]


def block_key_pattern(anatomy: Anatomy) -> re.Pattern[str]:
    """Matches the block index in a module, parameter or checkpoint key, with or without legacy prefixes."""
    return re.compile(r"(?:^|\.)" + re.escape(anatomy.layers_attr) + r"\.(\d+)(?:\.|$)")


def checkpoint_key_filter(
    anatomy: Anatomy, role: Role, start: int = 0, end: int = 0
) -> Callable[[str], bool]:
    """Which checkpoint keys a role reads, decided before any renaming so legacy and per-expert keys work.

    Blocks are matched by index; embeddings and the LM head by their module name or a suffix of it
    (older checkpoints lack the owner prefix, e.g. GPT-2's `wte.weight`).
    """
    pattern = block_key_pattern(anatomy)
    client_only = [anatomy.embeddings_path] + ([anatomy.head_path] if anatomy.head_path else [])

    def is_client_only(key: str) -> bool:
        module = key.rpartition(".")[0]
        return any(path == module or path.endswith("." + module) for path in client_only if module)

    def wanted(key: str) -> bool:
        match = pattern.search(key)
        if match:
            return role is Role.PEER and start <= int(match.group(1)) < end
        if is_client_only(key):
            return role is Role.CLIENT
        return True

    return wanted


def module_filter(anatomy: Anatomy, role: Role, start: int = 0, end: int = 0) -> Callable[[str], bool]:
    """Which modules (by name in the model) a role materializes."""
    pattern = re.compile(re.escape(anatomy.layers_path) + r"\.(\d+)(?:\.|$)")
    client_only = [anatomy.embeddings_path] + ([anatomy.head_path] if anatomy.head_path else [])

    def wanted(name: str) -> bool:
        match = pattern.match(name)
        if match:
            return role is Role.PEER and start <= int(match.group(1)) < end
        if name == anatomy.layers_path:
            return role is Role.PEER
        if any(name == path or name.startswith(path + ".") for path in client_only):
            return role is Role.CLIENT
        return True

    return wanted


def materialized_tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Parameters and buffers that hold memory (not on the meta device), each once."""
    seen: set[int] = set()
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor.device.type != "meta" and id(tensor) not in seen:
            seen.add(id(tensor))
            yield tensor


def move_loaded(model: nn.Module, device: torch.device) -> None:
    """Move the loaded tensors of `model` to `device` (trainable ones stay trainable, tied ones stay tied);
    the blocks it does not hold stay empty (meta)."""
    moved: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, parameter in module.named_parameters(recurse=False):
            if not parameter.is_meta and parameter.device != device:
                if id(parameter) not in moved:
                    copy = nn.Parameter(parameter.detach().to(device), requires_grad=parameter.requires_grad)
                    moved[id(parameter)] = copy
                module.register_parameter(name, moved[id(parameter)])
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and not buffer.is_meta and buffer.device != device:
                persistent = name not in module._non_persistent_buffers_set
                module.register_buffer(name, buffer.to(device), persistent=persistent)


def materialized_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in materialized_tensors(model))


def _run_owner_on_zeros(model: nn.Module, anatomy: Anatomy) -> None:
    dtype = next(model.parameters()).dtype
    dummy = torch.zeros(1, 2, anatomy.embed_dim, dtype=dtype)
    with torch.inference_mode():
        anatomy.owner(model)(inputs_embeds=dummy, use_cache=False)
