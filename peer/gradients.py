"""A span's forward recorded by autograd (`Graph`), its backpropagation, and the graphs a peer keeps
between a training Forward and its Backward (`KeptGraphs`).

A Backward recomputes its forward unless the same peer still holds the graph of the Forward the client
asked it to keep (`ForwardRequest.keep_for_backward`, answered with a random token) and the Backward's
inputs are exactly that forward's: then it only backpropagates, which saves a forward a hop. The kept
graphs are bounded in bytes (least recently kept dropped first) and in time; a graph dropped, never
kept, or kept by a peer that has since died costs a recompute, never a different gradient.

    Forward(keep) ──▶ record ──▶ output (reply) + token ─┐        KeptGraphs: token -> Graph
    Backward(token, same inputs) ──▶ take(token) ──▶ backprop   (else record again, then backprop)
"""

from __future__ import annotations

import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from peer.inputs import check_inputs, check_prompts
from protos.errors import InvalidInputError

if TYPE_CHECKING:
    from peer.adapters import Lora
    from peer.blocks import BatchItem, HostedSpan

TOKEN_BYTES = 16


@dataclass(eq=False)
class Graph:
    """The forward of `inputs` through blocks [start, end) with autograd on: `output` and the leaves its
    gradients are taken for (the input, the prompts if any, then A and B of each trainable LoRA module)."""

    start: int
    end: int
    output: torch.Tensor
    inputs: torch.Tensor
    prompts: torch.Tensor | None
    mask: torch.Tensor | None
    lora: Lora | None
    leaves: list[torch.Tensor] = field(default_factory=list)  # the trainable LoRA's A, B, A, B, ...

    def held_bytes(self) -> int:
        """Bytes of the tensors it holds besides autograd's activations: its own copies of the input, the
        prompts and a client's LoRA (which may be far larger than a short forward's activations)."""
        prompts = [] if self.prompts is None else [self.prompts]
        return sum(t.nbytes for t in [self.inputs, *prompts, *self.leaves])

    def matches(
        self,
        start: int,
        end: int,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        lora: Lora | None,
        trainable: bool,
    ) -> bool:
        """Whether a Backward of these inputs would recompute exactly this graph."""
        if (start, end) != (self.start, self.end) or not _same(self.inputs, hidden):
            return False
        if not (_same(self.prompts, prompts) and _same(self.mask, mask)):
            return False
        if lora is None or self.lora is None:
            return lora is None and self.lora is None
        if not trainable:
            return lora is self.lora  # a served adapter: the very object
        if list(lora.modules) != list(self.lora.modules) or len(self.leaves) != 2 * len(lora.modules):
            return False
        pairs = zip(lora.modules.values(), self.lora.modules.values(), strict=True)
        return all(
            new.scaling == old.scaling and _same(old.a, new.a) and _same(old.b, new.b) for new, old in pairs
        )


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def record(
    span: HostedSpan,
    hidden: torch.Tensor,
    start: int,
    end: int,
    prompts: torch.Tensor | None,
    mask: torch.Tensor | None,
    lora: Lora | None,
    *,
    trainable: bool,
) -> Graph:
    """The span's forward of `hidden` with autograd on (inputs already checked by the span)."""
    # the scheduler runs jobs in inference mode; clones outside it are tensors autograd accepts
    with torch.inference_mode(False), torch.enable_grad():
        inputs = hidden.detach().clone().requires_grad_(True)
        prompt_leaf = None if prompts is None else prompts.detach().clone().requires_grad_(True)
        applied, leaves = (lora, []) if lora is None or not trainable else lora.leaves()
        output = span._run(inputs, None, None, start, end, prompt_leaf, mask=mask, lora=applied)
    kept_lora = lora if not trainable else applied  # a trainable LoRA's leaves hold the values it ran with
    return Graph(start, end, output, inputs, prompt_leaf, mask, kept_lora, leaves)


def backprop(
    graph: Graph, grad: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
    """(grad of the input, of the prompts or None, of each LoRA leaf or None where unused) for `grad` of
    the graph's output; the graph is spent afterwards."""
    wrt = [graph.inputs] if graph.prompts is None else [graph.inputs, graph.prompts]
    with torch.inference_mode(False), torch.enable_grad():
        grads = torch.autograd.grad(
            graph.output, [*wrt, *graph.leaves], grad_outputs=grad.detach().clone(), allow_unused=True
        )
    grad_input = grads[0]
    if grad_input is None:  # cannot happen: the output depends on the input
        raise RuntimeError("the span's output does not depend on its input")
    grad_prompts = grads[1] if graph.prompts is not None else None
    return grad_input, grad_prompts, list(grads[len(wrt) :])


class SpanGradients:
    """`HostedSpan`'s backward passes: input (and prompt, LoRA) gradients of stateless forwards, recomputed
    or from a kept `Graph`. The weights stay frozen; nothing is kept unless `record` is asked to."""

    if TYPE_CHECKING:  # what it uses of HostedSpan
        batches: bool

        def _check_span(self, start: int | None, end: int | None) -> tuple[int, int]: ...

        def _run_packed(
            self, items: list[BatchItem], lengths: list[int], start: int, end: int
        ) -> list[torch.Tensor]: ...

    def _span(self) -> HostedSpan:
        return cast("HostedSpan", self)

    def backward_batch(
        self,
        items: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]],
        *,
        start: int | None = None,
        end: int | None = None,
    ) -> list[torch.Tensor | Exception]:
        """Input gradients of several stateless forwards of blocks [start, end), given as (hidden, grad of
        the output, mask or None) of any shapes, from one packed forward and one backward (padded ones
        alone); each as `backward` would give it alone (within float rounding), or the error it raised."""
        from peer.blocks import BatchItem  # blocks.py builds on this module

        start, end = self._check_span(start, end)
        results: list[torch.Tensor | Exception] = [RuntimeError("not run")] * len(items)
        valid: list[int] = []
        for index, (hidden, grad_output, mask) in enumerate(items):
            try:
                check_inputs(self._span(), hidden, None, None, start, end, mask)
                if grad_output.shape != hidden.shape or grad_output.dtype != hidden.dtype:
                    raise InvalidInputError("grad_output must match hidden in shape and dtype")
            except InvalidInputError as e:
                results[index] = e
            else:
                valid.append(index)
        if len(valid) > 1 and self.batches and all(items[i][2] is None for i in valid):
            with torch.inference_mode(False), torch.enable_grad():
                inputs = [items[i][0].detach().clone().requires_grad_(True) for i in valid]
                outputs = self._run_packed([BatchItem(x) for x in inputs], [0] * len(valid), start, end)
                grads = [items[i][1].detach().clone() for i in valid]
                for i, grad in zip(valid, torch.autograd.grad(outputs, inputs, grads), strict=True):
                    results[i] = grad
            return results
        for i in valid:
            try:
                hidden, grad_output, mask = items[i]
                results[i] = self._gradients(hidden, grad_output, start, end, None, mask)[0]
            except Exception as e:
                results[i] = e
        return results

    def backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        adapter: Lora | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Gradients of a stateless forward of blocks [start, end): recomputes the forward of `hidden`
        [batch, seq, hidden_size] (with `mask` and a frozen served `adapter`, as `forward`) with autograd on
        and backpropagates `grad_output` (same shape) into the inputs. Returns (grad of hidden, grad of
        prompts or None); the weights stay frozen, nothing is kept.
        """
        grad_input, grad_prompts, _ = self._backward(
            hidden, grad_output, adapter, start, end, prompts, mask, trainable=False
        )
        return grad_input, grad_prompts

    def lora_backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        lora: Lora | None,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        trainable: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        """`backward` with `lora` applied; with `trainable`, also the gradients of its A and B matrices
        in `Lora.modules` order (A, B, A, B, ...; None for a layer the forward did not reach)."""
        return self._backward(hidden, grad_output, lora, start, end, prompts, mask, trainable=trainable)

    def _backward(
        self,
        hidden: torch.Tensor,
        grad_output: torch.Tensor,
        lora: Lora | None,
        start: int | None,
        end: int | None,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        *,
        trainable: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        start, end = self._check_span(start, end)
        check_inputs(self._span(), hidden, None, None, start, end, mask)
        check_prompts(self._span(), prompts, hidden, start, end)
        if grad_output.shape != hidden.shape or grad_output.dtype != hidden.dtype:
            raise InvalidInputError(
                f"grad_output must match hidden ({hidden.dtype} {tuple(hidden.shape)}), got "
                f"{grad_output.dtype} {tuple(grad_output.shape)}"
            )
        return self._gradients(hidden, grad_output, start, end, prompts, mask, lora, trainable=trainable)

    def _gradients(
        self,
        hidden: torch.Tensor,
        grad: torch.Tensor,
        start: int,
        end: int,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None = None,
        lora: Lora | None = None,
        *,
        trainable: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        graph = record(self._span(), hidden, start, end, prompts, mask, lora, trainable=trainable)
        return backprop(graph, grad)

    def record(
        self,
        hidden: torch.Tensor,
        *,
        start: int | None = None,
        end: int | None = None,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        lora: Lora | None = None,
        trainable: bool = False,
    ) -> Graph:
        """`forward` with autograd on, its graph kept for a later `gradients.backprop` (a training Forward
        whose Backward comes to this peer); checks its inputs as `forward` does."""
        start, end = self._check_span(start, end)
        check_inputs(self._span(), hidden, None, None, start, end, mask)
        check_prompts(self._span(), prompts, hidden, start, end)
        return record(self._span(), hidden, start, end, prompts, mask, lora, trainable=trainable)

    def backprop(
        self, graph: Graph, grad_output: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor | None]]:
        """`lora_backward`'s result for a graph `record` kept, from the gradient of its output."""
        if grad_output.shape != graph.output.shape or grad_output.dtype != graph.output.dtype:
            raise InvalidInputError("grad_output must match the kept forward's output in shape and dtype")
        return backprop(graph, grad_output)


@dataclass
class _Kept:
    graph: Graph
    nbytes: int
    expires: float


class KeptGraphs:
    """Graphs of training Forwards awaiting their Backward: at most `max_bytes` in all (the least recently
    kept are dropped first) and each for at most `timeout` seconds. A token is random and used once."""

    def __init__(self, *, max_bytes: int, timeout: float) -> None:
        self.max_bytes = max_bytes
        self.timeout = timeout
        self.nbytes = 0
        self.dropped = 0  # graphs let go before their Backward came (budget or time)
        self._graphs: OrderedDict[bytes, _Kept] = OrderedDict()

    def __len__(self) -> int:
        return len(self._graphs)

    def keep(self, graph: Graph, nbytes: int, *, now: float | None = None) -> bytes:
        """Keep `graph` and return its token; b"" (nothing kept) when it alone is over the budget."""
        now = time.monotonic() if now is None else now
        self._expire(now)
        if nbytes > self.max_bytes:
            return b""
        while self._graphs and self.nbytes + nbytes > self.max_bytes:
            self._drop(next(iter(self._graphs)))
        token = secrets.token_bytes(TOKEN_BYTES)
        self._graphs[token] = _Kept(graph, nbytes, now + self.timeout)
        self.nbytes += nbytes
        return token

    def take(self, token: bytes, *, now: float | None = None) -> Graph | None:
        """The graph kept under `token` (it is no longer kept), or None."""
        self._expire(time.monotonic() if now is None else now)
        kept = self._graphs.pop(token, None) if len(token) == TOKEN_BYTES else None
        if kept is None:
            return None
        self.nbytes -= kept.nbytes
        return kept.graph

    def clear(self) -> None:
        for token in list(self._graphs):
            self._drop(token)

    def _expire(self, now: float) -> None:
        while self._graphs:
            token, kept = next(iter(self._graphs.items()))
            if kept.expires > now:  # kept in time order with one timeout: the oldest expires first
                return
            self._drop(token)

    def _drop(self, token: bytes) -> None:
        kept = self._graphs.pop(token)
        self.nbytes -= kept.nbytes
        self.dropped += 1
