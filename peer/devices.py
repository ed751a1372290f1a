"""Where a peer computes (`corolla serve --device auto|cpu|cuda[:N]|mps`) and in which dtype by default:
float32 on the CPU (the exact path), bfloat16 on a CUDA GPU that supports it, float16 on other
accelerators."""

from __future__ import annotations

import platform
import re

import torch

from peer.config import DEVICE_PATTERN
from protos.errors import InvalidInputError


def resolve_device(name: str) -> torch.device:
    """The torch device of a `--device` value; `InvalidInputError` for one this machine does not have."""
    if not re.match(DEVICE_PATTERN, name):
        raise InvalidInputError(f"unknown device {name!r}; expected auto, cpu, cuda, cuda:N or mps")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInputError(f"--device {name}: this torch build or machine has no CUDA GPU")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInputError(f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInputError("--device mps: Apple's Metal backend is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> str:
    """The dtype name of a `--dtype` value; `auto` is float32 on the CPU and 16-bit on an accelerator."""
    if name != "auto":
        return name
    if device.type == "cpu":
        return "float32"
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bfloat16"
    return "float16"


def device_name(device: torch.device) -> str:
    """What a throughput measurement depends on besides the model: the device and, on the CPU, threads."""
    if device.type == "cuda":
        return f"cuda-{torch.cuda.get_device_name(device).replace(' ', '_')}"
    if device.type == "cpu":
        return f"cpu-{platform.machine()}-{torch.get_num_threads()}threads"
    return device.type


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings on an accelerator would measure only the launches)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
