"""How a local 3-peer swarm serves many users at once, on SmolLM2-135M-Instruct.

Prints JSON with three parts:
- concurrency: for each N in --clients, N client processes (each loads the model, then all start together on
  a "go" line on stdin) generate --new-tokens greedy tokens after distinct chat prompts; aggregate decode
  tokens/s (all decoded tokens / from the earliest decode start to the latest end), p50 and p95 per-token
  latency over all clients, and the speedup in tokens/s over N=1;
- interference: p95 decode latency of 4 clients alone and while a fifth sends a --prefill-tokens prompt
  (random token ids, one new token) once the 4 are decoding, and the ratio;
- batched_step: one peer's batched decode step alone (blocks 0:10, `HostedSpan.forward_batch`, no network),
  ms per step and tokens/s per batch size after a 100-token context per sequence.

Peers and clients run as separate processes on 127.0.0.1; clients use one torch thread each, as if on
their own machines. Latencies exclude the prompt and the first (prefill) token.

With --gateway, the users call ONE `corolla api` process instead (streamed greedy chat completions over
HTTP, one thread per user in this process), once per --gateway-modes entry: "engine" (the engine loop,
the default), "threads" (`--no-engine`: each request its own generate()) and "ngram" (the engine with
`--speculative ngram`). For each mode: every prompt alone in turn, then all --gateway-users at once;
aggregate decode tokens/s (tokens after each request's first, from the earliest first token to the latest
last one), completion tokens/s over the whole wall time (prefills included), the speedup over one request
alone, and whether every answer equals its answer alone. CPU seconds of the gateway and the peers per
completion token say how much of a step is per-request overhead on a machine whose cores are shared.

    python bench/concurrency.py [--clients 1,2,4,8,16] [--new-tokens 32] [--prefill-tokens 2000]
                                [--insecure] [--skip-interference] [--skip-step]
                                [--peer-option=--prefill-chunk-tokens=128 ...]
    python bench/concurrency.py --gateway [--gateway-users 8] [--gateway-modes engine,threads]
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TextStreamer

from client.local_swarm import running, start_api
from client.model import AutoDistributedModelForCausalLM
from peer.blocks import HostedSpan
from protos.prepare import prepare_default_model

SPANS = ["0:10", "10:20", "20:30"]
READY_TIMEOUT = 900.0  # seconds for every client process to load the model (many at once on few cores)
RUN_TIMEOUT = 900.0  # seconds for every client process to finish after "go"
STOP_WAIT = 10.0  # seconds a client process gets to exit after SIGTERM before SIGKILL
INTERFERENCE_DECODERS = 4
STEP_BATCHES = [1, 2, 4, 8, 16]
STEP_CONTEXT = 100
STEP_REPEATS = 20
SUBJECTS = [
    "a lighthouse keeper", "a lost robot", "a desert caravan", "a clockmaker's apprentice",
    "a deep-sea diver", "a retired astronaut", "a talking crow", "a village baker",
    "a mountain rescue dog", "a forgotten library", "a night train", "a street violinist",
    "a beekeeper", "an arctic research station", "a chess prodigy", "a stubborn gardener",
]  # fmt: skip
logger = logging.getLogger("bench.concurrency")


class _Clock(TextStreamer):
    """Records (perf_counter, time.time()) at the prompt and at each generated token."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        super().__init__(tokenizer, skip_prompt=True)
        self.times: list[tuple[float, float]] = []

    def put(self, value: torch.Tensor) -> None:
        self.times.append((time.perf_counter(), time.time()))

    def end(self) -> None:
        pass


def _worker(args: argparse.Namespace) -> None:
    """One client process: load, warm up, write the ready file, wait for "go", print one JSON line."""
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    subject = SUBJECTS[args.index % len(SUBJECTS)]
    subject += f" (story {args.index})" if args.index >= len(SUBJECTS) else ""
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": f"Write a short story about {subject}."}],
        add_generation_prompt=True,
        tokenize=False,
    )
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    remote = AutoDistributedModelForCausalLM.from_pretrained(
        args.folder, initial_peers=args.initial_peers, insecure=args.insecure
    )
    try:
        remote.generate(**inputs, max_new_tokens=2, do_sample=False)  # routes, streams, first-call costs
        Path(args.ready_file).touch()
        if sys.stdin.readline().strip() != "go":
            return  # the parent went away
        if args.worker == "prefill":
            seeded = torch.Generator().manual_seed(args.index)
            ids = torch.randint(100, 40000, (1, args.prefill_tokens), generator=seeded)
            start = time.time()
            remote.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False
            )
            result: dict[str, Any] = {"start": start, "end": time.time()}
        else:
            clock = _Clock(tokenizer)
            k = args.new_tokens
            remote.generate(**inputs, max_new_tokens=k, min_new_tokens=k, do_sample=False, streamer=clock)
            tokens = clock.times[1:]  # after the prompt; the first token is the prefill's
            latencies = [(b[0] - a[0]) * 1000 for a, b in itertools.pairwise(tokens)]
            result = {"latencies_ms": latencies, "start": tokens[0][1], "end": tokens[-1][1]}
        print(json.dumps(result), flush=True)
    finally:
        remote.shutdown()


@dataclass
class _Process:
    popen: subprocess.Popen[bytes]
    ready_file: Path
    stdout: Path
    stderr: Path

    def failure(self, what: str) -> RuntimeError:
        tail = self.stderr.read_text(errors="replace")[-3000:]
        return RuntimeError(f"client process {self.popen.pid} {what}:\n{tail}")

    def go(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(b"go\n")
        self.popen.stdin.close()

    def result(self, deadline: float) -> dict[str, Any]:
        try:
            self.popen.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired as e:
            raise self.failure("did not finish in time") from e
        lines = self.stdout.read_text().strip().splitlines()
        if self.popen.returncode != 0 or not lines or not lines[-1].startswith("{"):
            raise self.failure(f"exited with {self.popen.returncode} and no result")
        return json.loads(lines[-1])

    def stop(self) -> None:
        if self.popen.stdin is not None and not self.popen.stdin.closed:
            self.popen.stdin.close()  # one still waiting for "go" reads EOF and leaves the swarm
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(STOP_WAIT)


def _spawn(
    folder: Path, peers: list[str], args: argparse.Namespace, role: str, index: int, tmp: Path
) -> _Process:
    files = [tmp / f"{role}-{index}.{suffix}" for suffix in ("ready", "out", "err")]
    command = [sys.executable, os.path.abspath(__file__), "--worker", role, "--folder", str(folder)]
    command += ["--index", str(index), "--ready-file", str(files[0]), "--initial-peers", *peers]
    command += ["--new-tokens", str(args.new_tokens), "--prefill-tokens", str(args.prefill_tokens)]
    command += ["--insecure"] if args.insecure else []
    with files[1].open("wb") as out, files[2].open("wb") as err:
        popen = subprocess.Popen(
            command, stdin=subprocess.PIPE, stdout=out, stderr=err, start_new_session=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )  # fmt: skip
    return _Process(popen, *files)


def _run_clients(
    folder: Path,
    peers: list[str],
    args: argparse.Namespace,
    decoders: int,
    prefill_delay: float | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, float]:
    """Decode results, the prefill sender's result (when `prefill_delay` is set) and the "go" wall time."""
    roles = [("decode", i) for i in range(decoders)]
    roles += [("prefill", decoders)] if prefill_delay is not None else []
    processes: list[_Process] = []
    with tempfile.TemporaryDirectory(prefix="corolla-concurrency-") as tmp:
        try:
            for role, index in roles:
                processes.append(_spawn(folder, peers, args, role, index, Path(tmp)))
            deadline = time.monotonic() + READY_TIMEOUT
            for process in processes:
                while not process.ready_file.exists():
                    if process.popen.poll() is not None:
                        raise process.failure(f"exited with {process.popen.returncode} while loading")
                    if time.monotonic() > deadline:
                        raise process.failure("was not ready in time")
                    time.sleep(0.05)
            go = time.time()
            for process in processes[:decoders]:
                process.go()
            if prefill_delay is not None:
                time.sleep(prefill_delay)
                processes[-1].go()
            deadline = time.monotonic() + RUN_TIMEOUT
            results = [process.result(deadline) for process in processes]
        finally:
            for process in processes:
                process.stop()
    return results[:decoders], (results[-1] if prefill_delay is not None else None), go


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    low, high = math.floor(k), math.ceil(k)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def _summary(results: list[dict[str, Any]]) -> dict[str, Any]:
    latencies = [ms for result in results for ms in result["latencies_ms"]]
    start, end = min(r["start"] for r in results), max(r["end"] for r in results)
    return {
        "clients": len(results),
        "decoded_tokens": len(latencies),
        "decode_seconds": round(end - start, 3),
        "tokens_per_s": round(len(latencies) / (end - start), 2),
        "p50_ms": round(_percentile(latencies, 0.5), 2),
        "p95_ms": round(_percentile(latencies, 0.95), 2),
    }


def _interference(folder: Path, peers: list[str], args: argparse.Namespace) -> dict[str, Any]:
    alone, _, go = _run_clients(folder, peers, args, INTERFERENCE_DECODERS)
    delay = statistics.median(r["start"] - go for r in alone)  # the 4 are decoding by then
    logger.info("interference: alone done; prefill sender starts %.2fs after the decoders", delay)
    mixed, prefill, _ = _run_clients(folder, peers, args, INTERFERENCE_DECODERS, prefill_delay=delay)
    assert prefill is not None
    base, loaded = _summary(alone), _summary(mixed)
    decode_start, decode_end = min(r["start"] for r in mixed), max(r["end"] for r in mixed)
    overlap = min(decode_end, prefill["end"]) - max(decode_start, prefill["start"])
    return {
        "decoders": INTERFERENCE_DECODERS,
        "prefill_tokens": args.prefill_tokens,
        "prefill_delay_s": round(delay, 3),
        "prefill_seconds": round(prefill["end"] - prefill["start"], 3),
        "prefill_overlap_with_decode_s": round(max(overlap, 0.0), 3),
        "alone": base,
        "with_prefill": loaded,
        "p95_ratio": round(loaded["p95_ms"] / base["p95_ms"], 3),
    }


def _batched_step(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """Median batched decode step of blocks 0:10 per batch size, or None and why it could not run."""
    try:
        from peer.blocks import BatchItem  # being written alongside this benchmark
    except ImportError as e:
        return None, f"peer.blocks.BatchItem is missing: {e}"
    span = HostedSpan.load(folder, 0, 10)
    if not hasattr(span, "forward_batch"):
        return None, "HostedSpan.forward_batch is missing"
    torch.manual_seed(0)
    results: dict[str, Any] = {"blocks": "0:10", "context": STEP_CONTEXT, "threads": torch.get_num_threads()}
    try:
        with torch.inference_mode():
            for batch in STEP_BATCHES:
                caches = [span.new_cache() for _ in range(batch)]
                for cache in caches:
                    span.forward(torch.randn(1, STEP_CONTEXT, span.hidden_size), cache)
                positions = torch.tensor([[STEP_CONTEXT]])
                hiddens = [torch.randn(1, 1, span.hidden_size) for _ in caches]
                items = [
                    BatchItem(hidden=h, cache=c, positions=positions)
                    for h, c in zip(hiddens, caches, strict=True)
                ]
                times = []
                for _ in range(STEP_REPEATS + 2):  # the first two warm up
                    started = time.perf_counter()
                    outputs = span.forward_batch(items)
                    times.append(time.perf_counter() - started)
                    for cache in caches:
                        cache.crop(-1)
                diff = 0.0
                for hidden, cache, output in zip(hiddens, caches, outputs, strict=True):
                    if isinstance(output, Exception):
                        raise output
                    diff = max(diff, float((span.forward(hidden, cache, positions) - output).abs().max()))
                    cache.crop(-1)
                seconds = statistics.median(times[2:])
                results[str(batch)] = {
                    "ms_per_step": round(seconds * 1000, 3),
                    "tokens_per_s": round(batch / seconds, 1),
                    "max_abs_diff_vs_forward": diff,
                }
    except Exception as e:  # an API still being written: report, keep the swarm results
        return None, f"forward_batch failed: {type(e).__name__}: {e}"
    return results, None


def _chat_stream(url: str, index: int, new_tokens: int) -> dict[str, Any]:
    """One streamed greedy chat completion; its text, completion tokens and the times of its chunks."""
    import httpx

    subject = SUBJECTS[index % len(SUBJECTS)]
    body = {
        "model": "served",
        "messages": [{"role": "user", "content": f"Write a short story about {subject}."}],
        "temperature": 0,
        "max_tokens": new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent, times, text, tokens = time.time(), [], "", 0
    with httpx.stream("POST", url + "/chat/completions", json=body, timeout=RUN_TIMEOUT) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            if "error" in chunk:
                raise RuntimeError(f"request {index} failed: {chunk['error']}")
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    times.append(time.time())
                    text += choice["delta"]["content"]
    return {"text": text, "completion_tokens": tokens, "sent": sent, "first": times[0], "end": times[-1]}


def _users(url: str, indices: list[int], new_tokens: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Requests for `indices` all at once (one thread each): their results and the aggregate figures."""
    from concurrent.futures import ThreadPoolExecutor

    started = time.time()
    with ThreadPoolExecutor(len(indices)) as pool:
        results = list(pool.map(lambda i: _chat_stream(url, i, new_tokens), indices))
    ended = time.time()
    decoded = sum(r["completion_tokens"] - 1 for r in results)
    first, last = min(r["first"] for r in results), max(r["end"] for r in results)
    total = sum(r["completion_tokens"] for r in results)
    return results, {
        "users": len(indices),
        "completion_tokens": total,
        "decode_tokens_per_s": round(decoded / (last - first), 2),
        "tokens_per_s_with_prefill": round(total / (ended - started), 2),
        "wall_s": round(ended - started, 3),
        "max_ttft_s": round(max(r["first"] - r["sent"] for r in results), 3),
    }


def _cpu_seconds(pids: list[int]) -> float:
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in pids)


def _gateway(folder: Path, swarm: Any, args: argparse.Namespace) -> list[dict[str, Any]]:
    """For each mode: one `corolla api` process, every prompt alone in turn, then all users at once."""
    peers = swarm.initial_peers
    rows = []
    indices = list(range(args.gateway_users))
    for mode in args.gateway_modes.split(","):
        options = ["--served-model-name", "served", "--max-concurrent-requests", str(max(16, len(indices)))]
        options += ["--insecure"] if args.insecure else []
        options += ["--no-engine"] if mode == "threads" else []
        options += ["--speculative", "ngram"] if mode == "ngram" else []
        with tempfile.TemporaryDirectory(prefix="corolla-gateway-") as tmp:
            api = start_api(Path(tmp), folder, peers, *options)
            try:
                _chat_stream(api.address, 0, 4)  # routes, streams, first-call costs
                pids = [api.popen.pid, *(peer.popen.pid for peer in swarm.peers)]
                cpu = _cpu_seconds(pids)
                alone = [_users(api.address, [i], args.new_tokens) for i in indices]
                cpu_alone, cpu = _cpu_seconds(pids) - cpu, _cpu_seconds(pids)
                logger.info("gateway %s: %d requests alone done", mode, len(alone))
                together, figures = _users(api.address, indices, args.new_tokens)
                cpu_together = _cpu_seconds(pids) - cpu
            finally:
                api.stop()
        single = statistics.mean(a[1]["decode_tokens_per_s"] for a in alone)
        single_with_prefill = statistics.mean(a[1]["tokens_per_s_with_prefill"] for a in alone)
        rows.append(
            {
                "mode": mode,
                "alone": {
                    "decode_tokens_per_s": round(single, 2),
                    "tokens_per_s_with_prefill": round(single_with_prefill, 2),
                },
                "together": figures,
                "speedup": round(figures["decode_tokens_per_s"] / single, 3),
                "speedup_with_prefill": round(figures["tokens_per_s_with_prefill"] / single_with_prefill, 3),
                "cpu_ms_per_token": {
                    "alone": round(1000 * cpu_alone / sum(a[1]["completion_tokens"] for a in alone), 2),
                    "together": round(1000 * cpu_together / figures["completion_tokens"], 2),
                },
                "answers_unchanged": all(
                    t["text"] == a[0][0]["text"] for t, a in zip(together, alone, strict=True)
                ),
            }
        )
        logger.info("gateway %s: %s", mode, json.dumps(rows[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", default="1,2,4,8,16", help="comma-separated numbers of clients at once")
    parser.add_argument("--new-tokens", type=int, default=32, help="generated tokens per client")
    parser.add_argument("--prefill-tokens", type=int, default=2000, help="prompt of the interfering client")
    parser.add_argument(
        "--insecure", action="store_true", help="plaintext gRPC between clients and peers (default: TLS)"
    )
    parser.add_argument("--skip-interference", action="store_true", help="skip the prefill interference run")
    parser.add_argument("--skip-step", action="store_true", help="skip the batched step of one span alone")
    parser.add_argument(
        "--gateway", action="store_true", help="users through one `corolla api` instead of client processes"
    )
    parser.add_argument("--gateway-users", type=int, default=8, help="requests at once through the gateway")
    parser.add_argument(
        "--gateway-modes",
        default="engine,threads",
        help="comma-separated: engine (the engine loop), threads (--no-engine), ngram (the engine with "
        "--speculative ngram)",
    )
    parser.add_argument(
        "--peer-option",
        action="append",
        default=[],
        metavar="OPTION",
        help="an option for every peer, e.g. --peer-option=--prefill-chunk-tokens=128 (repeatable)",
    )
    internal = parser.add_argument_group("client process (internal, started by this script)")
    internal.add_argument("--worker", choices=["decode", "prefill"], help="run as one client process")
    internal.add_argument("--folder", help="model folder")
    internal.add_argument("--initial-peers", nargs="+", default=[], help="DHT multiaddresses")
    internal.add_argument("--index", type=int, default=0, help="which prompt")
    internal.add_argument("--ready-file", help="created once the model is loaded")
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.new_tokens < 2:
        parser.error("--new-tokens must be at least 2 (the first token is the prefill's)")
    clients = [int(n) for n in args.clients.split(",")]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request otherwise
    folder = prepare_default_model()

    rows: list[dict[str, Any]] = []
    interference = None
    peer_options = (["--insecure"] if args.insecure else []) + [
        f"--{option}" if not option.startswith("--") else option for option in args.peer_option
    ]
    if args.gateway:
        with running(folder, SPANS, *peer_options) as swarm:
            gateway = _gateway(folder, swarm, args)
        report = {
            "model": str(folder),
            "peers": SPANS,
            "tls": not args.insecure,
            "peer_options": peer_options,
            "new_tokens": args.new_tokens,
            "cpu_count": os.cpu_count(),
            "gateway": gateway,
            "goal": {"8_users_speedup": 3.0},
        }
        print(json.dumps(report, indent=2))
        return
    with running(folder, SPANS, *peer_options) as swarm:
        for n in clients:
            logger.info("%d client(s) at once", n)
            rows.append(_summary(_run_clients(folder, swarm.initial_peers, args, n)[0]))
        if not args.skip_interference:
            logger.info("prefill interference")
            interference = _interference(folder, swarm.initial_peers, args)
    single = next((row["tokens_per_s"] for row in rows if row["clients"] == 1), None)
    for row in rows:
        row["speedup"] = round(row["tokens_per_s"] / single, 3) if single else None

    step, why = (None, "--skip-step") if args.skip_step else _batched_step(folder)
    report: dict[str, Any] = {
        "model": str(folder),
        "peers": SPANS,
        "tls": not args.insecure,
        "peer_options": peer_options,
        "new_tokens": args.new_tokens,
        "concurrency": rows,
        "interference": interference,
        "batched_step": step,
    }
    if why is not None:
        report["batched_step_skipped"] = why
    report["goal"] = {"8_users_speedup": 3.0, "interference_p95_ratio": 2.0}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
