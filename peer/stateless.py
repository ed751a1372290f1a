"""Stateless Forward and Backward on the compute queue: after inference steps, until the call's deadline,
and in pieces of whole rows (at most `chunk_tokens` tokens each) so that a decode step waits for at most
one piece of a large training batch, never for the whole of it. Rows are independent through a span, so
the pieces put together are the batch's result (up to float rounding of the prompts' summed gradient).
Pieces without prompts of different calls queued at once run as one batched forward (or backward), those
of one served adapter together; a client's own LoRA runs alone, and its gradients add up over the pieces."""

from __future__ import annotations

import functools
import time
from typing import Any

import torch

from peer.blocks import BatchItem, HostedSpan
from peer.gradients import Graph, KeptGraphs
from peer.requests import BackwardRequest, ForwardRequest, backward_bytes
from peer.scheduler import Priority, Scheduler, StepWork


def row_chunks(batch: int, seq: int, chunk_tokens: int) -> list[slice]:
    """Slices of whole rows of at most `chunk_tokens` tokens each (one row when a row is longer)."""
    rows = max(chunk_tokens // max(seq, 1), 1)
    return [slice(first, min(first + rows, batch)) for first in range(0, batch, rows)]


def _rows(prompts: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    """The prompts of some rows: per-row prompts [blocks, batch, ...] are sliced, shared ones [blocks, 1,
    ...] serve every row."""
    if prompts is None or prompts.shape[1] == 1:
        return prompts
    return prompts[:, rows]


def _mask_rows(mask: torch.Tensor | None, rows: slice) -> torch.Tensor | None:
    return None if mask is None else mask[rows]


def _job(kind: str, hidden: torch.Tensor, blocks: int, remaining: float | None) -> dict[str, Any]:
    return {
        "priority": Priority.STATELESS,
        "kind": kind,
        "cost": hidden.shape[0] * hidden.shape[1] * blocks,
        "deadline": None if remaining is None else time.monotonic() + remaining,
    }


async def forward(
    scheduler: Scheduler,
    span: HostedSpan,
    request: ForwardRequest,
    *,
    chunk_tokens: int,
    remaining: float | None,
) -> torch.Tensor:
    """The span's output for `request` [batch, seq, hidden] in the span's dtype; `remaining`: seconds the
    caller still waits (None: no deadline)."""
    hidden = request.hidden.to(span.dtype)
    prompts = None if request.prompts is None else request.prompts.to(span.dtype)
    blocks = request.end - request.start
    outputs = []
    for rows in row_chunks(hidden.shape[0], hidden.shape[1], chunk_tokens):
        part, prompt, mask = hidden[rows], _rows(prompts, rows), _mask_rows(request.attention_mask, rows)
        if prompt is None and not request.trainable:
            item = BatchItem(part, mask=mask, lora=request.lora)
            work = StepWork(span, request.start, request.end, item)
            outputs.append(await scheduler.step(work, **_job("forward", part, blocks, remaining)))
            continue
        outputs.append(
            await scheduler.run(
                functools.partial(
                    span.forward,
                    part,
                    start=request.start,
                    end=request.end,
                    prompts=prompt,
                    mask=mask,
                    lora=request.lora,
                ),
                **_job("forward", part, blocks, remaining),
            )
        )
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs)


async def backward(
    scheduler: Scheduler,
    span: HostedSpan,
    request: BackwardRequest,
    *,
    chunk_tokens: int,
    remaining: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(grad of the inputs, grad of the prompts or None) for `request`, as `HostedSpan.backward`."""
    hidden, grad_output = request.hidden.to(span.dtype), request.grad_output.to(span.dtype)
    prompts = None if request.prompts is None else request.prompts.to(span.dtype)
    blocks = request.end - request.start
    grad_inputs: list[torch.Tensor] = []
    grad_prompts: list[torch.Tensor] = []
    for rows in row_chunks(hidden.shape[0], hidden.shape[1], chunk_tokens):
        part, part_grad, prompt = hidden[rows], grad_output[rows], _rows(prompts, rows)
        mask = _mask_rows(request.attention_mask, rows)
        if prompt is None and request.lora is None:
            item = BatchItem(part, mask=mask)
            work = StepWork(span, request.start, request.end, item, grad_output=part_grad)
            grad_inputs.append(await scheduler.step(work, **_job("backward", part, blocks, remaining)))
            continue
        grad_input, grad_prompt = await scheduler.run(
            functools.partial(
                span.backward,
                part,
                part_grad,
                start=request.start,
                end=request.end,
                prompts=prompt,
                mask=mask,
                adapter=request.lora,
            ),
            **_job("backward", part, blocks, remaining),
        )
        grad_inputs.append(grad_input)
        if grad_prompt is not None:
            grad_prompts.append(grad_prompt)
    grad_input = grad_inputs[0] if len(grad_inputs) == 1 else torch.cat(grad_inputs)
    if prompts is None or not grad_prompts:
        return grad_input, None
    if len(grad_prompts) == 1:
        return grad_input, grad_prompts[0]
    if prompts.shape[1] == 1:  # shared by every row: each piece's gradient adds up
        return grad_input, torch.stack(grad_prompts).sum(dim=0)
    return grad_input, torch.cat(grad_prompts, dim=1)


async def lora_backward(
    scheduler: Scheduler,
    span: HostedSpan,
    request: BackwardRequest,
    *,
    chunk_tokens: int,
    remaining: float | None,
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """`backward` of a request carrying the client's own LoRA: also the gradients of its A and B matrices
    (`HostedSpan.lora_backward`), summed over the pieces."""
    hidden, grad_output = request.hidden.to(span.dtype), request.grad_output.to(span.dtype)
    prompts = None if request.prompts is None else request.prompts.to(span.dtype)
    blocks = request.end - request.start
    grad_inputs: list[torch.Tensor] = []
    grad_prompts: list[torch.Tensor] = []
    grad_lora: list[torch.Tensor | None] = []
    for rows in row_chunks(hidden.shape[0], hidden.shape[1], chunk_tokens):
        part, prompt = hidden[rows], _rows(prompts, rows)
        grad_input, grad_prompt, grads = await scheduler.run(
            functools.partial(
                span.lora_backward,
                part,
                grad_output[rows],
                request.lora,
                start=request.start,
                end=request.end,
                prompts=prompt,
                mask=_mask_rows(request.attention_mask, rows),
            ),
            **_job("backward", part, blocks, remaining),
        )
        grad_inputs.append(grad_input)
        if grad_prompt is not None:
            grad_prompts.append(grad_prompt)
        grad_lora = (
            grads if not grad_lora else [_add(old, new) for old, new in zip(grad_lora, grads, strict=True)]
        )
    grad_input = grad_inputs[0] if len(grad_inputs) == 1 else torch.cat(grad_inputs)
    if prompts is None or not grad_prompts:
        return grad_input, None, grad_lora
    if prompts.shape[1] == 1:  # shared by every row: each piece's gradient adds up
        return grad_input, torch.stack(grad_prompts).sum(dim=0), grad_lora
    return grad_input, torch.cat(grad_prompts, dim=1), grad_lora


def _add(total: torch.Tensor | None, piece: torch.Tensor | None) -> torch.Tensor | None:
    if total is None:
        return piece
    return total if piece is None else total + piece


async def forward_kept(
    scheduler: Scheduler,
    span: HostedSpan,
    request: ForwardRequest,
    kept: KeptGraphs,
    *,
    remaining: float | None,
) -> tuple[torch.Tensor, bytes]:
    """A training Forward whose graph is kept for its Backward: (the output, the graph's token, b"" when
    the budget cannot hold it). Runs as one piece, alone."""
    hidden = request.hidden.to(span.dtype)
    prompts = None if request.prompts is None else request.prompts.to(span.dtype)
    graph = await scheduler.run(
        functools.partial(
            span.record,
            hidden,
            start=request.start,
            end=request.end,
            prompts=prompts,
            mask=request.attention_mask,
            lora=request.lora,
            trainable=request.trainable,
        ),
        **_job("forward", hidden, request.end - request.start, remaining),
    )
    activations = backward_bytes(hidden.shape, request.end - request.start, itemsize=span.dtype.itemsize)
    return graph.output.detach(), kept.keep(graph, activations + graph.held_bytes())


def kept_graph(span: HostedSpan, request: BackwardRequest, kept: KeptGraphs) -> Graph | None:
    """The graph a Backward's token names, if it is kept and its inputs are exactly the request's."""
    graph = kept.take(request.token) if request.token else None
    if graph is None:
        return None
    prompts = None if request.prompts is None else request.prompts.to(span.dtype)
    inputs = (request.hidden.to(span.dtype), prompts, request.attention_mask)
    if not graph.matches(request.start, request.end, *inputs, request.lora, request.trainable):
        return None
    return graph


async def backprop_kept(
    scheduler: Scheduler, span: HostedSpan, request: BackwardRequest, graph: Graph, *, remaining: float | None
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """`lora_backward`'s result for a request whose forward's graph was kept: backpropagation only."""
    grad_output = request.grad_output.to(span.dtype)
    return await scheduler.run(
        functools.partial(span.backprop, graph, grad_output),
        **_job("backward", grad_output, request.end - request.start, remaining),
    )
