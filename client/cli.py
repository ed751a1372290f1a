"""`corolla generate`: stream a completion through the swarm to stdout."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Generate text with a model served by a swarm. The embeddings and LM head run here, the "
        "blocks on the swarm's peers; tokens are printed as they are generated.",
    )
    parser.add_argument(
        "model", help="checkpoint folder (needs config, tokenizer and client weights) or hub name"
    )
    parser.add_argument("prompt", help="the prompt text (with --chat: the user's message)")
    parser.add_argument(
        "--initial-peers", nargs="+", required=True, metavar="MADDR", help="DHT multiaddresses of the swarm"
    )
    parser.add_argument(
        "--swarm-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="a private swarm's key file (`corolla keygen`); none: the public swarm",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default: 64)")
    parser.add_argument(
        "--temperature", type=float, default=0.0, help="sampling temperature; 0 decodes greedily (default: 0)"
    )
    parser.add_argument(
        "--top-p", type=float, default=None, help="nucleus sampling: keep this probability mass"
    )
    parser.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    parser.add_argument("--seed", type=int, default=None, help="random seed, for repeatable sampling")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument(
        "--model-id", default=None, help="the swarm's name for the model (default: from MODEL)"
    )
    parser.add_argument("--dtype", default="float32", help="dtype of the local embeddings and head")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the route and failovers to stderr")
    return parser


def main(argv: Sequence[str], prog: str) -> int:
    parser = _parser(prog)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from transformers import AutoTokenizer, TextStreamer

    from client.model import AutoDistributedModelForCausalLM
    from protos.errors import CorollaError
    from protos.swarm_key import SwarmKey, SwarmKeyError

    if args.swarm_key is not None:
        try:
            SwarmKey.load(args.swarm_key)
        except SwarmKeyError as e:
            parser.error(str(e))

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if args.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = args.prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not args.chat)
    try:
        model = AutoDistributedModelForCausalLM.from_pretrained(
            args.model,
            initial_peers=args.initial_peers,
            dtype=args.dtype,
            model_id=args.model_id,
            swarm_key=args.swarm_key,
        )
    except CorollaError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    sampling = args.temperature > 0
    options = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling)
    if sampling:
        options.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
        if args.seed is not None:
            torch.manual_seed(args.seed)
    try:
        model.generate(
            **inputs, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **options
        )
    except CorollaError as e:
        print(f"\n{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        model.shutdown()
    return 0
