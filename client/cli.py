"""`corolla generate` (stream a completion through the swarm to stdout) and `corolla api` (serve the OpenAI
HTTP API over the swarm, `client/gateway.py`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError

from client.config import LOCAL_DEVICE_PATTERN, ClientConfig, GatewayConfig, GenerateConfig
from protos.cli import setup_logging, write_ready_file
from protos.records import is_loopback, model_id_from_path
from protos.settings import add_config_arguments, command_parser, config_from_arguments, validation_problems

logger = logging.getLogger(__name__)


def _parser(prog: str) -> argparse.ArgumentParser:
    parser = command_parser(
        prog,
        description="Generate text with a model served by a swarm. The embeddings and LM head run here, the "
        "blocks on the swarm's peers; tokens are printed as they are generated.",
    )
    add_config_arguments(parser, GenerateConfig, positional=["model", "prompt"])
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="log the route and failovers to stderr (--log-level INFO)",
    )
    add_config_arguments(parser, ClientConfig)  # how the client finds and treats the swarm, as `corolla api`
    return parser


def device_problem(name: str) -> str | None:
    """Why `--device name` cannot hold the client's modules here, or None."""
    if not re.match(LOCAL_DEVICE_PATTERN, name):
        return f"--device {name}: expected cpu, cuda, cuda:N or mps"
    if name.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {name}: this torch build or machine has no CUDA GPU"
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        return f"--device {name}: only {torch.cuda.device_count()} CUDA GPU(s) here"
    if name == "mps" and not torch.backends.mps.is_available():
        return "--device mps: Apple's Metal backend is not available here"
    return None


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
    try:
        config = config_from_arguments(GenerateConfig, args)
        client = config_from_arguments(ClientConfig, args)
    except ValidationError as e:
        parser.error(validation_problems(e))
    if not client.initial_peers:
        parser.error("--initial-peers is required: the DHT multiaddresses of the swarm")
    setup_logging(logging.INFO if args.verbose else None, default=logging.WARNING)  # stdout is the text
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    from client.model import AutoDistributedModelForCausalLM
    from protos.errors import CorollaError
    from protos.swarm_key import SwarmKey, SwarmKeyError

    if client.swarm_key is not None:
        try:
            SwarmKey.load(client.swarm_key)
        except SwarmKeyError as e:
            parser.error(str(e))

    if (problem := device_problem(config.device)) is not None:
        parser.error(problem)
    sampling = config.temperature > 0
    try:
        mode, speculative = speculation(
            config.speculative, draft_tokens=config.draft_tokens, sampling=sampling
        )
    except ValueError as e:
        parser.error(str(e))
    if mode not in ("none", "ngram"):
        try:  # a draft model that cannot load fails before joining the swarm
            # typed as a Module: transformers' `@wraps(Module.to)` override hides `to`'s signature from mypy
            draft: torch.nn.Module = AutoModelForCausalLM.from_pretrained(mode, dtype=config.dtype)
            speculative["assistant_model"] = draft.to(config.device).eval()
        except (OSError, ValueError) as e:
            parser.error(f"--speculative: cannot load the draft model in {mode}: {e}")
    tokenizer = AutoTokenizer.from_pretrained(config.model)
    if config.chat:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": config.prompt}], add_generation_prompt=True, tokenize=False
        )
    else:
        text = config.prompt
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=not config.chat).to(config.device)
    try:
        model_id = client.model_id or model_id_from_path(config.model)
        print(f"{prog}: model id {model_id}", file=sys.stderr)
        model = AutoDistributedModelForCausalLM.from_pretrained(
            config.model,
            dtype=config.dtype,
            device=config.device,
            model_id=model_id,
            active_adapter=config.adapter,
            **client.model_dump(exclude={"model_id"}),
        )
    except CorollaError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    metrics = None
    if config.metrics_port is not None:
        from client.metrics import instrument

        metrics = instrument(model.swarm)
        metrics.serve(config.metrics_port)
    options: dict[str, Any] = dict(max_new_tokens=config.max_new_tokens, do_sample=sampling, **speculative)
    if sampling:
        options.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
        if config.seed is not None:
            torch.manual_seed(config.seed)
    try:
        model.generate(
            **inputs, streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True), **options
        )
    except CorollaError as e:
        print(f"\n{prog}: {e}", file=sys.stderr)
        return 1
    finally:
        if metrics is not None:
            metrics.close()
        model.shutdown()
    return 0


def _parse(argv: Sequence[str], prog: str) -> tuple[GatewayConfig, ClientConfig]:
    parser = command_parser(
        prog,
        description="Serve the OpenAI HTTP API (/v1/chat/completions, /v1/completions, /v1/models) for a "
        "model whose blocks a swarm serves; the embeddings and LM head run here. Running requests decode "
        "together, one batched step per token, each choice in its own inference session.",
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
    if keyless and not config.allow_anonymous and not is_loopback(config.host):
        parser.error(
            f"listening on {config.host} without --api-key would open the swarm to anyone who reaches the "
            "port; set --api-key (or COROLLA_API_API_KEY), or pass --allow-anonymous"
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

    model_id = client.model_id or model_id_from_path(config.model)
    if (problem := device_problem(config.device)) is not None:
        logger.error("cannot start: %s", problem)
        return 1
    model = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(config.model)
        options = client.model_dump(exclude={"model_id"})
        model = AutoDistributedModelForCausalLM.from_pretrained(
            config.model, dtype=config.dtype, device=config.device, model_id=model_id, **options
        )
        gateway = Gateway(model, tokenizer, config, name=config.served_model_name or model_id)
    except (CorollaError, OSError) as e:
        logger.error("cannot start: %s", e)
        if model is not None:  # a chat template that does not render: leave the swarm before exiting
            model.shutdown()
        return 1
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
