"""`make demo`: a local swarm (a DHT bootstrap and 3 peers on 127.0.0.1) serving SmolLM2-135M-Instruct;
streams a chat answer through it, shows the route and the speed next to local transformers."""

from __future__ import annotations

import argparse
import logging
import sys
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from client.errors import short_id
from client.local_swarm import running
from client.model import AutoDistributedModelForCausalLM
from protos.cli import emit
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
PROMPT = "Explain in two sentences why the sky is blue."


class _TimedStreamer(TextStreamer):
    """Prints tokens as they come and notes when each arrives."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.times: list[float] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append(time.perf_counter())
        super().put(value)


def _tokens_per_second(times: list[float]) -> float:
    decode = times[2:]  # skip the prompt and the first token (prefill)
    return (len(decode) - 1) / (decode[-1] - decode[0]) if len(decode) > 1 else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompt", default=PROMPT, help="the user's chat message")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="tokens to generate (default: 48)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)

    model_dir = prepare_default_model()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=False)

    # local transformers first, on an idle machine, for the speed comparison
    local = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    local_streamer = _TimedStreamer(tokenizer)
    local_streamer.on_finalized_text = lambda text, stream_end=False: None  # type: ignore[method-assign]
    local_out = local.generate(**inputs, streamer=local_streamer, **options)
    local_speed = _tokens_per_second(local_streamer.times)
    del local

    emit("starting a DHT bootstrap and 3 peers on 127.0.0.1 ...")
    with running(model_dir, SPANS) as swarm:
        for peer, span in zip(swarm.peers, SPANS, strict=True):
            emit(f"  peer {short_id(peer.peer_id)}  blocks {span:>6}  at {peer.address}")

        model = AutoDistributedModelForCausalLM.from_pretrained(model_dir, initial_peers=swarm.initial_peers)
        emit(f"\nuser: {args.prompt}\nassistant (through the swarm):")
        streamer = _TimedStreamer(tokenizer)
        with model.inference_session(
            max_length=inputs["input_ids"].shape[1] + args.max_new_tokens
        ) as session:
            swarm_out = model.generate(**inputs, streamer=streamer, **options)
            route = " -> ".join(f"{short_id(hop.peer_id)} [{hop.start}:{hop.end})" for hop in session.route)
        swarm_speed = _tokens_per_second(streamer.times)
        model.shutdown()

        emit(f"\nroute: client -> {route} -> client")
        emit(f"through the swarm: {swarm_speed:.1f} tokens/s, local transformers: {local_speed:.1f} tokens/s")
        same = torch.equal(swarm_out, local_out)
        emit(f"same tokens as local transformers: {'yes' if same else 'NO'}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
