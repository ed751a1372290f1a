"""`corolla generate` (stream a completion through the swarm to stdout) and `corolla api` (serve the OpenAI
HTTP API over the swarm, `client/gateway.py`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from client.config import ClientConfig, GatewayConfig
from protos.cli import setup_logging, write_ready_file
from protos.records import is_loopback
from protos.settings import add_config_arguments, config_from_arguments, validation_problems

logger = logging.getLogger(__name__)

DRAFT_TOKENS = 16  # the longest draft by default: a rejected one shrinks the next (client/speculative.py)


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
    parser.add_argument(
        "--adapter",
        default=None,
        metavar="NAME",
        help="run the LoRA adapter NAME that peers serve (`corolla serve --adapters NAME=DIR`) on every "
        "block: the route then uses only peers announcing it, and the command fails, naming the adapters "
        "the swarm serves, when no peer does (default: the base model)",
    )
    parser.add_argument(
        "--speculative",
        default=None,
        metavar="{ngram,DIR,none}",
        help="speculative decoding, greedy only, with the same tokens as plain greedy decoding: each step "
        "sends a draft of the next tokens through the swarm, which verifies it in one chain traversal. "
        "ngram: draft from the text so far (prompt lookup: what followed the last time the latest tokens "
        "occurred), with a draft length that follows how much of the drafts the model accepts; pays when "
        "the answer repeats the prompt (editing, quoting, code); on text that does not repeat, drafts that "
        "fail pause drafting, so it costs little (a few percent on CPU peers, where a step of several "
        "positions costs about twice one of a single position). "
        "DIR: a local folder of a small draft model with the same tokenizer, run here with transformers. "
        "none: one token per step. Default: ngram when decoding greedily, none when sampling",
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=DRAFT_TOKENS,
        metavar="N",
        help=f"the longest draft one step verifies (ngram: the maximum of the adaptive length; DIR: the "
        f"draft model's starting length, which transformers then adapts) (default: {DRAFT_TOKENS})",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log the route and failovers to stderr")
    return parser


def speculation(speculative: str | None, *, draft_tokens: int, sampling: bool) -> tuple[str, dict[str, Any]]:
    """The speculative mode for `--speculative` ("none", "ngram" or a draft model folder) and the
    `generate()` options it adds (without the draft model itself); `ValueError` says why an option is
    refused."""
    if draft_tokens < 1:
        raise ValueError("--draft-tokens must be at least 1")
    mode = speculative if speculative is not None else ("none" if sampling else "ngram")
    if mode == "none":
        return mode, {}
    if sampling:
        raise ValueError("--speculative decodes greedily: use --temperature 0 (or --speculative none)")
    if mode == "ngram":
        return mode, {"prompt_lookup_num_tokens": draft_tokens}
    if not Path(mode).is_dir():
        raise ValueError(f"--speculative: {mode} is neither ngram, none nor a draft model folder")
    return mode, {"num_assistant_tokens": draft_tokens}


def main(argv: Sequence[str], prog: str) -> int:
    parser = _parser(prog)
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr)
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from client.model import AutoDistributedModelForCausalLM
    from protos.errors import CorollaError
    from protos.swarm_key import SwarmKey, SwarmKeyError

    if args.swarm_key is not None:
        try:
            SwarmKey.load(args.swarm_key)
        except SwarmKeyError as e:
            parser.error(str(e))

    sampling = args.temperature > 0
    try:
        mode, speculative = speculation(args.speculative, draft_tokens=args.draft_tokens, sampling=sampling)
    except ValueError as e:
        parser.error(str(e))
    if mode not in ("none", "ngram"):
        try:  # a draft model that cannot load fails before joining the swarm
            speculative["assistant_model"] = AutoModelForCausalLM.from_pretrained(
                mode, dtype=args.dtype
            ).eval()
        except (OSError, ValueError) as e:
            parser.error(f"--speculative: cannot load the draft model in {mode}: {e}")
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
            active_adapter=args.adapter,
        )
    except CorollaError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    options: dict[str, Any] = dict(max_new_tokens=args.max_new_tokens, do_sample=sampling, **speculative)
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


def _parse(argv: Sequence[str], prog: str) -> tuple[GatewayConfig, ClientConfig]:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models) for a "
        "model whose blocks a swarm serves; the embeddings and LM head run here. Running requests decode "
        "together, one batched step per token, each choice in its own inference session. Every option can "
        "also be set as a COROLLA_<OPTION> environment variable.",
    )
    add_config_arguments(parser, GatewayConfig, positional=["model"])
    add_config_arguments(parser, ClientConfig)
    namespace = parser.parse_args(list(argv))
    try:
        config = config_from_arguments(GatewayConfig, namespace)
        client = config_from_arguments(ClientConfig, namespace)
    except ValidationError as e:
        parser.error(validation_problems(e))
    if not client.initial_peers:
        parser.error("--initial-peers is required: the DHT multiaddresses of the swarm")
    keyless = config.api_key is None and not config.api_keys
    if keyless and not config.allow_no_api_key and not is_loopback(config.host):
        parser.error(
            f"listening on {config.host} without --api-key would open the swarm to anyone who reaches the "
            "port; set --api-key (or COROLLA_API_KEY), or pass --allow-no-api-key"
        )
    return config, client


def api_main(argv: Sequence[str], prog: str) -> int:
    """`corolla api`: load the client's modules, join the swarm and serve the gateway until stopped."""
    config, client = _parse(argv, prog)
    setup_logging(log_format=config.log_format)
    import uvicorn
    from transformers import AutoTokenizer

    from client.gateway import Gateway
    from client.model import AutoDistributedModelForCausalLM
    from protos.errors import CorollaError
    from protos.records import model_id_from_path

    model_id = client.model_id or model_id_from_path(config.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        options = client.model_dump(exclude={"model_id"})
        model = AutoDistributedModelForCausalLM.from_pretrained(
            config.model, dtype=config.dtype, model_id=model_id, **options
        )
    except (CorollaError, OSError) as e:
        logger.error("cannot start: %s", e)
        return 1
    gateway = Gateway(model, tokenizer, config, name=config.served_model_name or model_id)
    server = uvicorn.Server(
        uvicorn.Config(
            gateway.app(),
            host=config.host,
            port=config.port,
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=int(config.drain_timeout),
        )
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            # uvicorn takes these while it serves and raises them again once stopped: a no-op here, so the
            # swarm connection (DHT node and daemon) closes below instead of the process dying at once
            loop.add_signal_handler(sig, lambda: None)
        task = asyncio.ensure_future(server.serve())
        while not server.started and not task.done():
            await asyncio.sleep(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            url = f"http://{config.host}:{port}/v1"
            logger.info("serving %s at %s", gateway.name, url)
            if config.ready_file is not None:
                write_ready_file(config.ready_file, {"url": url, "port": port, "pid": os.getpid()})
        await task

    try:
        asyncio.run(serve())
    finally:
        if config.ready_file is not None:
            config.ready_file.unlink(missing_ok=True)
        gateway.close()
        model.shutdown()
    return 0
