"""The client's own LoRA for the remote blocks: PEFT's `LoraConfig` (rank, alpha, target modules, layers,
patterns), an A [rank, in] and B [out, rank] parameter for every targeted layer of every block, trained
on the client. Each Forward and Backward carries the modules of its hop's blocks; the peers apply them to
their frozen weights and Backward returns their gradients (`client.finetune`). Saved and loaded in PEFT's
format: `peft.PeftModel.from_pretrained` on a local transformers model loads what `save_pretrained`
writes, and `corolla serve --adapters` serves it.

    model = AutoDistributedModelForCausalLM.from_pretrained(
        path, initial_peers=peers, lora=LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model(input_ids=ids, labels=ids).loss.backward()      # gradients land in model.lora's parameters
    model.lora.save_pretrained("my-adapter")
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from protos import lora as lora_format
from protos import peer_pb2
from protos.errors import InvalidInputError
from protos.lora import Key, Layer
from protos.tensors import to_message

if TYPE_CHECKING:
    from peft import LoraConfig

INITS = (True, False, "gaussian")  # PEFT's init_lora_weights values this module reproduces


class SwarmLora(nn.Module):
    """Trainable LoRA weights for the layers `config` targets among `layers` ((block, path) -> (in, out)
    of every block of the model); `layers_path` is where the model keeps its blocks ("model.layers")."""

    def __init__(self, config: LoraConfig, layers: Mapping[Key, Layer], layers_path: str) -> None:
        super().__init__()
        from peft.tuners.tuners_utils import check_target_module_exists

        lora_format.check_config(config)
        if config.lora_dropout:
            raise InvalidInputError(
                f"lora_dropout={config.lora_dropout} is not supported through the swarm: the peers apply the "
                "LoRA without dropout; set lora_dropout=0.0"
            )
        if config.init_lora_weights not in INITS:
            raise InvalidInputError(
                f"init_lora_weights={config.init_lora_weights!r} is not supported through the swarm: use "
                "True (PEFT's default), False or 'gaussian', or load trained weights with `lora=FOLDER`"
            )
        self.config = copy.deepcopy(config)
        self.layers_path = layers_path
        self.keys: list[Key] = sorted(
            key for key in layers if check_target_module_exists(config, f"{layers_path}.{key[0]}.{key[1]}")
        )
        if not self.keys:
            raise InvalidInputError(f"target_modules {config.target_modules!r} match no layer of the blocks")
        self.scaling: dict[Key, float] = {}
        self.lora_a = nn.ParameterDict()
        self.lora_b = nn.ParameterDict()
        for key in self.keys:
            rank, self.scaling[key] = lora_format.rank_and_scaling(config, layers_path, *key)
            in_features, out_features = layers[key]
            a, b = torch.empty(rank, in_features), torch.zeros(out_features, rank)
            _initialize(a, b, config.init_lora_weights, rank)
            self.lora_a[_name(key)] = nn.Parameter(a)
            self.lora_b[_name(key)] = nn.Parameter(b)

    @classmethod
    def from_pretrained(
        cls, folder: str | os.PathLike[str], layers: Mapping[Key, Layer], layers_path: str
    ) -> SwarmLora:
        """The adapter saved in `folder` (PEFT's format), to train further or to run as the client's own."""
        config = lora_format.load_config(folder)
        config.lora_dropout = 0.0  # dropout only acts in training, and the swarm applies none
        config.init_lora_weights = True
        lora = cls(config, layers, layers_path)
        weights = lora_format.read_weights(folder, layers_path)
        if set(weights) != set(lora.keys):
            extra = sorted(set(weights) ^ set(lora.keys))[:4]
            raise InvalidInputError(f"{folder}: its weights and its config's target modules differ ({extra})")
        with torch.no_grad():
            for key, (a, b) in weights.items():
                if a.shape != lora.a(key).shape or b.shape != lora.b(key).shape:
                    raise InvalidInputError(f"{folder}: block {key[0]} {key[1]} has the wrong shape")
                lora.a(key).copy_(a)
                lora.b(key).copy_(b)
        return lora

    def a(self, key: Key) -> nn.Parameter:
        return self.lora_a[_name(key)]

    def b(self, key: Key) -> nn.Parameter:
        return self.lora_b[_name(key)]

    def weights(self) -> dict[Key, tuple[torch.Tensor, torch.Tensor]]:
        """(block, path) -> (A, B), detached."""
        return {key: (self.a(key).detach(), self.b(key).detach()) for key in self.keys}

    def tensors(self) -> list[torch.Tensor]:
        """A and B of every module in `keys` order: what the autograd function through the swarm takes."""
        return [tensor for key in self.keys for tensor in (self.a(key), self.b(key))]

    def span_keys(self, start: int, end: int) -> list[int]:
        """Indices into `keys` of the modules inside blocks [start, end)."""
        return [index for index, (block, _) in enumerate(self.keys) if start <= block < end]

    def messages(self, tensors: list[torch.Tensor], start: int, end: int) -> list[peer_pb2.LoraModule]:
        """The `LoraModule`s of blocks [start, end), from `tensors` (as `tensors()` orders them)."""
        return [
            peer_pb2.LoraModule(
                block=self.keys[index][0],
                module=self.keys[index][1],
                lora_a=to_message(tensors[2 * index].detach()),
                lora_b=to_message(tensors[2 * index + 1].detach()),
                scaling=self.scaling[self.keys[index]],
            )
            for index in self.span_keys(start, end)
        ]

    def save_pretrained(self, folder: str | os.PathLike[str]) -> str:
        """Write the adapter in PEFT's format (`adapter_config.json`, `adapter_model.safetensors`)."""
        config = copy.deepcopy(self.config)
        config.inference_mode = True
        path = lora_format.write_adapter(folder, config, self.weights(), self.layers_path)
        return str(path)

    def extra_repr(self) -> str:
        return f"r={self.config.r}, modules={len(self.keys)}, target_modules={self.config.target_modules!r}"


def _name(key: Key) -> str:
    return f"{key[0]}:{key[1]}".replace(".", "/")  # ParameterDict keys cannot hold dots


def _initialize(a: torch.Tensor, b: torch.Tensor, init: Any, rank: int) -> None:
    """PEFT's initializations: True, A as `nn.Linear` initializes a weight and B zeros (the adapter starts
    as the identity); "gaussian", A normal with std 1/rank; False, both random (tests)."""
    if init == "gaussian":
        nn.init.normal_(a, std=1 / rank)
    else:
        nn.init.kaiming_uniform_(a, a=math.sqrt(5))
    if init is False:
        nn.init.kaiming_uniform_(b, a=math.sqrt(5))
