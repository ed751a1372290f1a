"""Autograd through remote spans: stateless `Forward` hop by hop and `Backward` in reverse, each retried on
another peer for the same blocks; and the trainable prompts (`ptune`, `deep_ptune`) that live on the client.

    forward:   hidden ─▶ [0, a) ─▶ [a, b) ─▶ [b, n) ─▶ output      (client relays; keeps each hop's input)
    backward:  grad_in ◀─ [0, a) ◀─ [a, b) ◀─ [b, n) ◀─ grad_out   (each peer backpropagates its forward)
A training forward asks each peer to keep its graph for the Backward (`peer.gradients`); a peer that has
let it go recomputes the forward from the input the Backward carries again, so any peer serving the blocks
can answer it: a failed hop is re-run on another; when no single peer serves them any more, the span's
forward is re-run through the new hops first to get their inputs. Either way the gradients are the same.
With the "int8" wire only hidden states travel as blockwise int8 (a hop's input, sent again identically
with its backward, and its output); gradients and the per-block prompts stay float32: they are the smaller
share of a training step's bytes, and quantizing them would add noise to every update.
A pass may name an adapter the peers serve (frozen: routes then use only peers serving it) or carry the
client's own LoRA (`client.lora`): each hop gets its blocks' modules, and Backward returns their gradients.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
import torch
from torch import nn

from client.checks import result_problem
from client.errors import PeerFailure, Retries, SwarmError
from client.route import Hop, Needs, plan_forward_route
from client.streams import rpc_failure
from protos import peer_pb2
from protos.errors import InvalidInputError
from protos.tensors import decoded_dtype, from_message, to_message, wire_dtype_from_name

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from client.lora import SwarmLora
    from client.swarm import SwarmConnection

logger = logging.getLogger(__name__)

TUNING_MODES = ("ptune", "deep_ptune")
Result = TypeVar("Result")


@dataclass(frozen=True)
class HopInput:
    """What a hop of a forward received: enough to run its backward on any peer serving its blocks."""

    start: int
    end: int
    hidden: torch.Tensor  # [batch, seq, hidden] entering block `start`, as decoded from the wire dtype
    hop: Hop | None = None  # the peer that ran the forward: the backward tries it first
    mask: torch.Tensor | None = None  # the pass's attention mask [batch, seq] (int64 0/1); None: no padding
    token: bytes = b""  # the forward's graph kept by `hop` for the Backward; b"": none kept


@dataclass(frozen=True)
class Adaptation:
    """What a pass runs the blocks with besides their weights: a served `adapter` (by name; "" none) or the
    client's own `lora` with its A and B `tensors` (as `SwarmLora.tensors()` orders them)."""

    adapter: str = ""
    lora: SwarmLora | None = None
    tensors: tuple[torch.Tensor, ...] = field(default=())
    keep: bool = False  # a training pass: peers keep each forward's graph for its Backward

    def fill(self, request: Any, start: int, end: int) -> None:
        """Set a Forward/Backward request's adapter or its blocks' LoRA modules."""
        request.adapter = self.adapter
        if self.lora is not None:
            request.lora.extend(self.lora.messages(list(self.tensors), start, end))


NONE = Adaptation()


class RemoteSpans:
    """Stateless passes through blocks [0, num_blocks) of the swarm, differentiable through `__call__`."""

    def __init__(self, swarm: SwarmConnection) -> None:
        self.swarm = swarm
        self.config = swarm.config
        self.wire_dtype = wire_dtype_from_name(swarm.wire_dtype)  # of hidden states; BLOCKWISE_INT8: "int8"
        self.dtype = decoded_dtype(self.wire_dtype)  # of what comes back, and of gradients and prompts sent

    def __call__(
        self,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        *,
        adapter: str = "",
        lora: SwarmLora | None = None,
    ) -> torch.Tensor:
        """`hidden` [batch, seq, hidden] through every block; `prompts` [num_blocks, batch or 1, pre_seq_len,
        hidden] are added to the first positions entering each block; `mask` [batch, seq] marks padding (0)
        as transformers' attention_mask does; `adapter` names a served LoRA adapter, `lora` is the client's
        own. Gradients flow to hidden, prompts and the client's LoRA."""
        if mask is not None and bool(mask.all()):
            mask = None  # nothing padded: sent as an unpadded pass (peers batch those together)
        elif mask is not None:
            mask = mask.to(device="cpu", dtype=torch.int64)
        if adapter and lora is not None:
            raise InvalidInputError("a pass takes a served adapter or the client's own lora, not both")
        tensors = () if lora is None else tuple(lora.tensors())
        trained = [hidden, *([] if prompts is None else [prompts]), *tensors]
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in trained)  # a Backward will follow
        output: torch.Tensor = _ThroughSwarm.apply(
            hidden, prompts, self, mask, Adaptation(adapter, lora, keep=keep), *tensors
        )
        return output

    async def aforward(
        self,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None = None,
        *,
        start: int = 0,
        end: int | None = None,
        mask: torch.Tensor | None = None,
        adaptation: Adaptation = NONE,
    ) -> tuple[torch.Tensor, list[HopInput]]:
        """Blocks [start, end) hop by hop; returns the output (in `hidden`'s dtype) and each hop's input."""
        view = await self.swarm.discovery.view()
        end = view.num_blocks if end is None else end
        current = hidden.to(self.dtype)
        hops: list[HopInput] = []
        block = start
        while block < end:

            async def forward(
                route: list[Hop], inputs: torch.Tensor = current
            ) -> tuple[Hop, tuple[torch.Tensor, bytes]]:
                return route[0], await self._forward_hop(route[0], inputs, prompts, mask, adaptation)

            hop, (output, token) = await self._retrying(
                "forward", block, end, current, forward, adapter=adaptation.adapter
            )
            hops.append(HopInput(hop.start, hop.end, current, hop, mask, token))
            current, block = output.to(self.dtype), hop.end
        return current.to(hidden.dtype), hops

    async def abackward(
        self,
        hops: list[HopInput],
        grad_output: torch.Tensor,
        prompts: torch.Tensor | None,
        adaptation: Adaptation = NONE,
    ) -> tuple[torch.Tensor, torch.Tensor | None, list[torch.Tensor]]:
        """Gradients of the inputs, prompts and client's LoRA tensors of a forward whose hops are `hops`, from
        the gradient of its output [batch, seq, hidden]; the hops are visited in reverse."""
        grad = grad_output.to(self.dtype)
        grads = _Grads(
            None if prompts is None else torch.zeros_like(prompts, dtype=torch.float32),
            [torch.zeros_like(t, dtype=torch.float32) for t in adaptation.tensors],
        )
        for hop in reversed(hops):
            grad = await self._backward_span(hop, grad, prompts, grads, adaptation)
        return grad.to(grad_output.dtype), grads.prompts, grads.lora

    async def _backward_span(
        self,
        span: HopInput,
        grad: torch.Tensor,
        prompts: torch.Tensor | None,
        grads: _Grads,
        adaptation: Adaptation,
    ) -> torch.Tensor:
        async def backward(route: list[Hop]) -> torch.Tensor:
            if len(route) > 1:
                # the span now takes several hops (say its peer died): recompute their inputs first
                logger.info("backward split blocks=[%d,%d) hops=%d", span.start, span.end, len(route))
                _, inner = await self.aforward(
                    span.hidden,
                    prompts,
                    start=span.start,
                    end=span.end,
                    mask=span.mask,
                    adaptation=adaptation,
                )
                result = grad
                for hop_input in reversed(inner):
                    result = await self._backward_span(hop_input, result, prompts, grads, adaptation)
                return result
            return await self._backward_hop(route[0], span, grad, prompts, grads, adaptation)

        return await self._retrying(
            "backward",
            span.start,
            span.end,
            span.hidden,
            backward,
            first=span.hop,
            adapter=adaptation.adapter,
        )

    async def _retrying(
        self,
        kind: str,
        start: int,
        end: int,
        hidden: torch.Tensor,
        attempt: Callable[[list[Hop]], Awaitable[Result]],
        *,
        first: Hop | None = None,
        adapter: str = "",
    ) -> Result:
        """`attempt` on a route over [start, end) from the current view (`first` alone on the first try,
        unless it failed since), again on another route after each failure, under the failure policy."""
        retries = Retries(self.config, self.swarm.bans, what=f"{kind} blocks=[{start},{end})")
        batch, seq = hidden.shape[:2]
        needs = Needs(batch_size=batch, forward_tokens=batch * seq, adapter=adapter)
        while True:
            try:
                view = await self.swarm.discovery.view(refresh=bool(retries.failures))
                excluded = retries.excluded()
                if first is not None and not retries.failures and first.peer_id not in excluded:
                    route = [first]
                else:
                    route = plan_forward_route(view, start=start, end=end, banned=excluded, needs=needs)
                return await attempt(route)
            except (PeerFailure, SwarmError) as error:
                await retries.failed(error)

    async def _forward_hop(
        self,
        hop: Hop,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        mask: torch.Tensor | None,
        adaptation: Adaptation,
    ) -> tuple[torch.Tensor, bytes]:
        """The hop's output, and the token of its graph if it kept it (`adaptation.keep`)."""
        request = peer_pb2.ForwardRequest(
            start=hop.start,
            end=hop.end,
            hidden=to_message(hidden, dtype=self.wire_dtype),
            keep_for_backward=adaptation.keep,
        )
        adaptation.fill(request, hop.start, hop.end)
        reply = await self._call(hop, "Forward", request, prompts, mask)
        if reply.lora_modules != len(request.lora):  # a peer predating LoRA ignores the modules
            raise PeerFailure(  # avoided for this call, not banned: an older peer is not a faulty one
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"applied {reply.lora_modules} of {len(request.lora)} LoRA modules",
                hop.peer_id,
            )
        return self._decode(reply.hidden, "hidden", hidden.shape, hop), reply.backward_token

    async def _backward_hop(
        self,
        hop: Hop,
        span: HopInput,
        grad: torch.Tensor,
        prompts: torch.Tensor | None,
        grads: _Grads,
        adaptation: Adaptation,
    ) -> torch.Tensor:
        request = peer_pb2.BackwardRequest(
            start=hop.start,
            end=hop.end,
            hidden=to_message(span.hidden, dtype=self.wire_dtype),  # the bytes its forward was sent
            grad_output=to_message(grad),
        )
        if span.hop is not None and span.hop.peer_id == hop.peer_id:  # the peer that may have kept its graph
            request.forward_token = span.token
        adaptation.fill(request, hop.start, hop.end)
        reply = await self._call(hop, "Backward", request, prompts, span.mask)
        # gradients overflow honestly in fp16, and a non-finite gradient sent gives one back (loss scaling
        # expects to see both); anything else non-finite is the peer's fault
        finite = self.wire_dtype != torch.float16 and bool(torch.isfinite(grad).all())
        grad_input = self._decode(reply.grad_input, "grad_input", span.hidden.shape, hop, finite=finite)
        if prompts is not None and grads.prompts is not None:
            expected = prompts[hop.start : hop.end].shape
            piece = self._decode(reply.grad_prompts, "grad_prompts", expected, hop, finite=finite)
            grads.prompts[hop.start : hop.end] += piece.float()
        if adaptation.lora is not None:
            self._add_lora_grads(reply, hop, adaptation, grads, finite=finite)
        return grad_input.to(self.dtype)

    def _add_lora_grads(
        self, reply: peer_pb2.BackwardReply, hop: Hop, adaptation: Adaptation, grads: _Grads, *, finite: bool
    ) -> None:
        """Add a Backward reply's LoRA gradients into `grads.lora`; any mismatch with what was sent (count,
        order, modules, shapes) is the hop's failure. Checked whole before anything is added."""
        lora = adaptation.lora
        if lora is None:
            return
        indices = lora.span_keys(hop.start, hop.end)
        if len(reply.grad_lora) != len(indices):
            raise PeerFailure(
                grpc.StatusCode.INTERNAL,
                f"bad grad_lora: {len(reply.grad_lora)} of {len(indices)}",
                hop.peer_id,
            )
        pieces = []
        for index, message in zip(indices, reply.grad_lora, strict=True):
            if (message.block, message.module) != lora.keys[index]:
                raise PeerFailure(
                    grpc.StatusCode.INTERNAL, "bad grad_lora: modules out of order", hop.peer_id
                )
            a, b = adaptation.tensors[2 * index], adaptation.tensors[2 * index + 1]
            pieces.append(
                (2 * index, self._decode(message.lora_a, "grad_lora_a", a.shape, hop, finite=finite))
            )
            pieces.append(
                (2 * index + 1, self._decode(message.lora_b, "grad_lora_b", b.shape, hop, finite=finite))
            )
        for position, piece in pieces:
            grads.lora[position] += piece.float()

    async def _call(
        self, hop: Hop, rpc: str, request: Any, prompts: torch.Tensor | None, mask: torch.Tensor | None
    ) -> Any:
        """The stateless `rpc` ("Forward" or "Backward") on `hop`, with its blocks' share of the per-block
        prompts and the attention mask; a gRPC error becomes the hop's `PeerFailure`."""
        if prompts is not None:
            request.prompts.CopyFrom(to_message(prompts[hop.start : hop.end], dtype=self.dtype))
        if mask is not None:
            request.attention_mask.CopyFrom(to_message(mask))
        call = getattr(self.swarm.channels.stub(hop.address, hop.certificate, relay=hop.relay), rpc)
        try:
            return await call(request, timeout=self.config.forward_timeout)
        except grpc.aio.AioRpcError as e:
            raise rpc_failure(e, hop.peer_id, f"{rpc.lower()} failed") from None

    def _decode(
        self, message: peer_pb2.Tensor, name: str, shape: torch.Size, hop: Hop, *, finite: bool = True
    ) -> torch.Tensor:
        """A reply's tensor, which must have `shape`, the dtype the wire decodes to and (hidden states) only
        finite values; anything else is a failure of the hop (retried elsewhere), never an error that escapes
        the retry loop."""
        try:
            tensor = from_message(
                message, max_bytes=self.config.max_message_bytes, expected_ndim=len(shape), name=name
            )
        except Exception as e:  # the peer's reply is garbled, not the caller's request
            raise PeerFailure(grpc.StatusCode.INTERNAL, f"bad reply: {e}", hop.peer_id) from None
        problem = result_problem(tensor, shape=shape, dtype=self.dtype, finite=finite)
        if problem is not None:
            raise PeerFailure(grpc.StatusCode.INTERNAL, f"bad {name}: {problem}", hop.peer_id)
        self.swarm.bans.served(hop.peer_id)
        return tensor


@dataclass
class _Grads:
    """What a backward accumulates besides the input gradient: of the prompts and of the client's LoRA."""

    prompts: torch.Tensor | None
    lora: list[torch.Tensor]


class _ThroughSwarm(torch.autograd.Function):
    """Forward through the swarm; backward through the same blocks in reverse (possibly other peers)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        prompts: torch.Tensor | None,
        remote: RemoteSpans,
        mask: torch.Tensor | None,
        pass_: Adaptation,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        detached = None if prompts is None else prompts.detach()
        adaptation = Adaptation(pass_.adapter, pass_.lora, tuple(t.detach() for t in tensors), pass_.keep)
        output, hops = remote.swarm.runtime.run(
            remote.aforward(hidden.detach(), detached, mask=mask, adaptation=adaptation)
        )
        ctx.remote, ctx.hops, ctx.prompts, ctx.adaptation = remote, hops, detached, adaptation
        return output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        remote: RemoteSpans = ctx.remote
        adaptation: Adaptation = ctx.adaptation
        grad_input, grad_prompts, grad_lora = remote.swarm.runtime.run(
            remote.abackward(ctx.hops, grad_output, ctx.prompts, adaptation)
        )
        if grad_prompts is not None and ctx.prompts is not None:
            grad_prompts = grad_prompts.to(ctx.prompts.dtype)
        lora_grads = [g.to(t.dtype) for g, t in zip(grad_lora, adaptation.tensors, strict=True)]
        return grad_input, grad_prompts, None, None, None, *lora_grads


class PromptTuning(nn.Module):
    """Trainable prompts on the client, float32 whatever dtype the model runs in.

    `ptune`: `input_prompts` [pre_seq_len, embed_dim] are prepended to the input embeddings.
    `deep_ptune`: also `deep_prompts` [num_blocks, pre_seq_len, hidden], added by the peers to the first
    `pre_seq_len` hidden states entering each block (zeros at first: training starts from plain `ptune`).
    """

    def __init__(
        self, mode: str, pre_seq_len: int, *, embeddings: nn.Module, num_blocks: int, hidden_size: int
    ) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise InvalidInputError(f"tuning_mode must be one of {', '.join(TUNING_MODES)}, got {mode!r}")
        if pre_seq_len < 1:
            raise InvalidInputError(f"tuning_mode={mode!r} needs pre_seq_len >= 1, got {pre_seq_len}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        weight = embeddings.get_parameter("weight")
        # start from the embeddings of random tokens: prompts of the scale the blocks were trained on
        tokens = torch.randint(0, weight.shape[0], (pre_seq_len,))
        self.input_prompts = nn.Parameter(weight.detach()[tokens].to(torch.float32).clone())
        self.deep_prompts: nn.Parameter | None = None
        if mode == "deep_ptune":
            self.deep_prompts = nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size))

    def remote_prompts(self) -> torch.Tensor | None:
        """The per-block prompts as sent to the peers: [num_blocks, 1, pre_seq_len, hidden]."""
        return None if self.deep_prompts is None else self.deep_prompts.unsqueeze(1)

    def prepend(
        self, inputs_embeds: torch.Tensor, kwargs: dict[str, Any], *, extend_labels: bool
    ) -> dict[str, Any]:
        """The family forward's keyword arguments with the prompts before the inputs [batch, seq, embed]."""
        if kwargs.get("position_ids") is not None:
            raise InvalidInputError("position_ids cannot be combined with prompt tuning")
        batch = inputs_embeds.shape[0]
        prompts = self.input_prompts.to(inputs_embeds.dtype).expand(batch, -1, -1)
        kwargs = dict(kwargs, inputs_embeds=torch.cat([prompts, inputs_embeds], dim=1))
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor):
            kwargs["attention_mask"] = torch.cat([mask.new_ones(batch, self.pre_seq_len), mask], dim=1)
        labels = kwargs.get("labels")
        if extend_labels and isinstance(labels, torch.Tensor):
            ignored = labels.new_full((batch, self.pre_seq_len), -100)  # transformers' ignore index
            kwargs["labels"] = torch.cat([ignored, labels], dim=1)
        return kwargs

    def replace_placeholders(self, inputs_embeds: torch.Tensor) -> torch.Tensor:
        """Inputs [batch, seq, embed] whose first `pre_seq_len` positions are placeholders, with the prompts
        in their place (generation: transformers' `generate` sees `pre_seq_len` extra tokens)."""
        batch = inputs_embeds.shape[0]
        prompts = self.input_prompts.to(inputs_embeds.dtype).expand(batch, -1, -1)
        return torch.cat([prompts, inputs_embeds[:, self.pre_seq_len :]], dim=1)


def prompted_loss(model: PreTrainedModel, prompts: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """`ptune` written directly on a whole local transformers causal LM: the causal-LM loss of `input_ids`
    [batch, seq] with `prompts` [pre_seq_len, embed] before their embeddings and ignored by the loss. What a
    swarm's `ptune` training is checked against (tests, benchmarks); it shares no code with `PromptTuning`."""
    batch, pre_seq_len = len(input_ids), len(prompts)
    embeds = torch.cat([prompts.expand(batch, -1, -1), model.get_input_embeddings()(input_ids)], dim=1)
    labels = torch.cat([torch.full((batch, pre_seq_len), -100), input_ids], dim=1)
    return model(inputs_embeds=embeds, labels=labels).loss


def freeze_except(model: nn.Module, trainable: list[nn.Module]) -> None:
    """Only the parameters of `trainable` require gradients; everything else on the client is frozen."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for module in trainable:
        for parameter in module.parameters():
            parameter.requires_grad_(True)
