"""`HostedSpan.backward` equals autograd through transformers' own model for several families: gradients of
a sub-span's input and of its per-block prompts, with the weights frozen and nothing kept afterwards."""

from __future__ import annotations

import pytest
import torch
from families import HIDDEN, build

from peer.blocks import HostedSpan
from protos.errors import InvalidInputError
from protos.partition import hidden_argument, locate, replace_hidden

START, END, PRE_SEQ_LEN = 1, 3, 2


def _reference(model, hidden: torch.Tensor, prompts: torch.Tensor, grad_output: torch.Tensor):
    """Run the whole model on dummy embeddings; hooks put `hidden` into block START, add the prompts before
    blocks START..END-1 and catch block END-1's output. Returns (output, grad of hidden, grad of prompts)."""
    blocks = locate(model).blocks(model)
    leaf, prompt_leaf = hidden.clone().requires_grad_(True), prompts.clone().requires_grad_(True)
    caught: dict[str, torch.Tensor] = {}

    class Caught(Exception):
        pass

    def before(index: int):
        def hook(module, args, kwargs):
            current = leaf if index == START else hidden_argument(args, kwargs)
            prompt = prompt_leaf[index - START]
            current = torch.cat([current[:, :PRE_SEQ_LEN] + prompt, current[:, PRE_SEQ_LEN:]], dim=1)
            return replace_hidden(args, kwargs, current)

        return hook

    def after(module, args, output):
        caught["output"] = output[0] if isinstance(output, tuple) else output
        raise Caught

    handles = [blocks[i].register_forward_pre_hook(before(i), with_kwargs=True) for i in range(START, END)]
    handles.append(blocks[END - 1].register_forward_hook(after))
    try:
        model(inputs_embeds=torch.zeros(*hidden.shape[:2], locate(model).embed_dim), use_cache=False)
    except Caught:
        pass
    finally:
        for handle in handles:
            handle.remove()
    output = caught["output"]
    grads = torch.autograd.grad(output, [leaf, prompt_leaf], grad_outputs=grad_output)
    return output, *grads


@pytest.mark.parametrize("family", ["llama", "gpt2", "bloom", "falcon", "gemma3", "mixtral"])
def test_backward_matches_autograd_through_transformers(family: str) -> None:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 6, HIDDEN, generator=generator)
    prompts = torch.randn(END - START, 1, PRE_SEQ_LEN, HIDDEN, generator=generator)
    grad_output = torch.randn(2, 6, HIDDEN, generator=generator)
    reference = build(family)
    reference.requires_grad_(False)
    output, grad_hidden, grad_prompts = _reference(reference, hidden, prompts, grad_output)

    span = HostedSpan.from_model(build(family), START, END)
    with torch.inference_mode():  # as the peer's scheduler runs it
        forward = span.forward(hidden, prompts=prompts)
        got_hidden, got_prompts = span.backward(hidden, grad_output, prompts=prompts)
    torch.testing.assert_close(forward, output.detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(got_hidden, grad_hidden, atol=1e-5, rtol=0)
    torch.testing.assert_close(got_prompts, grad_prompts, atol=1e-5, rtol=0)
    assert all(p.grad is None and not p.requires_grad for p in span.blocks.parameters())


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((1, 1, PRE_SEQ_LEN, HIDDEN), r"prompts must be \[2, "),
        ((2, 3, PRE_SEQ_LEN, HIDDEN), r"prompts must be"),
        ((2, 1, 7, HIDDEN), r"prompts must be"),
        ((2, 1, PRE_SEQ_LEN, 32), r"prompts must be"),
    ],
)
def test_bad_prompts_are_refused(shape, message: str) -> None:
    span = HostedSpan.from_model(build("llama"), START, END)
    hidden = torch.randn(2, 6, HIDDEN)
    with pytest.raises(InvalidInputError, match=message):
        span.backward(hidden, hidden, prompts=torch.zeros(shape))
    with pytest.raises(InvalidInputError, match="grad_output must match"):
        span.backward(hidden, hidden[:, :5])
