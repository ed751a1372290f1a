"""`make demo`: a local swarm (a DHT bootstrap and 3 peers on 127.0.0.1) serving SmolLM2-135M-Instruct;
streams a chat answer through it, shows the route and the speed next to local transformers, then asks the
same through the OpenAI-compatible gateway (`corolla api`) and shows how to talk to it."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import urllib.request
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from client.errors import short_id
from client.local_swarm import LocalSwarm, running, start_api
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
        answer = tokenizer.decode(swarm_out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        same_text = _through_the_api(swarm, model_dir, args.prompt, args.max_new_tokens) == answer
        emit(f"same text through the OpenAI API: {'yes' if same_text else 'NO'}")
    return 0 if same and same_text else 1


def _through_the_api(swarm: LocalSwarm, model_dir: Path, prompt: str, max_tokens: int) -> str:
    """Start `corolla api` on the swarm, ask `prompt` over HTTP, print how to do the same; the answer."""
    emit("\nstarting the OpenAI-compatible gateway (corolla api) on 127.0.0.1 ...")
    api = start_api(swarm.log_dir, model_dir, swarm.initial_peers)
    try:
        body = {
            "model": model_dir.name,
            "messages": [{"role": "user", "content": prompt}],
            "temperature": 0,
            "max_tokens": max_tokens,
        }
        request = urllib.request.Request(
            api.address + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=300) as reply:
            answer = str(json.load(reply)["choices"][0]["message"]["content"])
        emit(f"POST {api.address}/chat/completions -> {answer!r}")
        emit(
            "\ntalk to a swarm like to OpenAI: run `corolla api MODEL --initial-peers MADDR...`, then\n"
            f"  curl {api.address}/chat/completions -H 'Content-Type: application/json' \\\n"
            f'    -d \'{{"model": "{model_dir.name}", "messages": [{{"role": "user", "content": "Hi!"}}], '
            '"stream": true}\'\n'
            "or, with the openai SDK:\n"
            f'  OpenAI(base_url="{api.address}", api_key="unused").chat.completions.create(\n'
            f'      model="{model_dir.name}", messages=[{{"role": "user", "content": "Hi!"}}])'
        )
        return answer
    finally:
        api.stop()


if __name__ == "__main__":
    sys.exit(main())
