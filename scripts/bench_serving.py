"""Drive a running server (sgjax, SGLang, vLLM: OpenAI-compatible or SGLang-native) and report request
throughput, output tokens/s, and TTFT / inter-token latency / end-to-end latency percentiles.

Requests are streamed so the first token's arrival is seen; they arrive as a Poisson process at
--request-rate per second (inf: all at once), at most --max-concurrency in flight.

    python -m sgjax.server --model-path DIR --port 30000 &
    python scripts/bench_serving.py --base-url http://127.0.0.1:30000 --backend openai --model NAME \
        --dataset sharegpt --num-prompts 200 --request-rate 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import urllib.request

import aiohttp
import numpy as np
from bench_common import percentiles, run_header

from sgjax.testing import workloads


async def one_request(session, args, prompt: list[int], max_tokens: int) -> dict:
    """Stream one request; returns its arrival times of text and its output token count."""
    if args.backend == "openai":
        url, body = f"{args.base_url}/v1/completions", {
            "model": args.model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    else:
        url, body = f"{args.base_url}/generate", {
            "input_ids": prompt, "stream": True,
            "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True}}
    start = time.perf_counter()
    chunks, out_tokens, error = [], 0, None
    async with session.post(url, json=body) as r:
        if r.status != 200:
            return {"error": f"HTTP {r.status}: {(await r.text())[:200]}"}
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            data = json.loads(line.removeprefix("data:").strip())
            if args.backend == "openai":
                if data.get("usage"):
                    out_tokens = data["usage"]["completion_tokens"]
                if data.get("choices") and data["choices"][0].get("text"):
                    chunks.append(time.perf_counter())
            else:
                out_tokens = data["meta_info"]["completion_tokens"]
                chunks.append(time.perf_counter())
    end = time.perf_counter()
    if not chunks:
        error = "no output"
    return {"start": start, "chunks": chunks, "end": end, "out_tokens": out_tokens, "error": error}


def auth_headers(args) -> dict:
    return {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}


async def run(args, work: workloads.Workload) -> list[dict]:
    rng = np.random.default_rng(0)
    limit = asyncio.Semaphore(args.max_concurrency)
    headers = auth_headers(args)
    timeout = aiohttp.ClientTimeout(total=None)
    # aiohttp's default connector holds at most 100 connections, which would cap the concurrency there.
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout, connector=connector) as session:
        async def limited(prompt, n):
            async with limit:
                return await one_request(session, args, prompt, n)

        tasks = []
        for prompt, n in zip(work.prompts, work.output_lens):
            tasks.append(asyncio.create_task(limited(prompt, n)))
            if not math.isinf(args.request_rate):
                await asyncio.sleep(rng.exponential(1 / args.request_rate))
        return await asyncio.gather(*tasks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:30000")
    p.add_argument("--backend", default="openai", choices=["openai", "sglang"])
    p.add_argument("--model", default=None, help="model name for the OpenAI API (default: the server's first)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "fixed", "shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=1024)
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--max-concurrency", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="seed of the workload's prompts and lengths")
    p.add_argument("--flush-cache", action="store_true",
                   help="POST /flush_cache first, so a repeated workload does not find its prompts in the radix cache")
    p.add_argument("--output-json", default=None, help="append the run's arguments and figures to this file")
    args = p.parse_args()
    print(run_header(device=False))

    if args.backend == "openai" and args.model is None:
        request = urllib.request.Request(f"{args.base_url}/v1/models", headers=auth_headers(args))
        with urllib.request.urlopen(request) as r:
            args.model = json.loads(r.read())["data"][0]["id"]
    if args.dataset == "sharegpt":
        work = workloads.sharegpt_like(args.num_prompts, args.vocab_size, max_len=args.max_len, seed=args.seed)
    elif args.dataset == "fixed":
        work = workloads.fixed(args.num_prompts, args.vocab_size, input_len=args.input_len,
                               output_len=args.output_len, seed=args.seed)
    else:
        work = workloads.shared_prefix(args.vocab_size, output_len=args.output_len, seed=args.seed)
    if args.flush_cache:
        request = urllib.request.Request(f"{args.base_url}/flush_cache", method="POST", headers=auth_headers(args))
        urllib.request.urlopen(request).close()
    t0 = time.perf_counter()
    results = asyncio.run(run(args, work))
    elapsed = time.perf_counter() - t0
    summary = summarize(results, work, elapsed)
    print(work.description)
    print(f"{summary['ok']} requests ok, {summary['failed']} failed in {elapsed:.2f} s: {summary['req_per_s']:.2f} "
          f"req/s, {summary['out_tok_per_s']:,.0f} output tok/s, {summary['total_tok_per_s']:,.0f} total tok/s "
          f"(request rate {args.request_rate}, max concurrency {args.max_concurrency}, mean in flight "
          f"{summary['mean_in_flight']:.0f})")
    if summary["short"]:
        print(f"WARNING: {summary['short']} requests returned fewer tokens than asked "
              f"({summary['out_tokens']} of {summary['asked_tokens']})")
    for name in ("TTFT", "TPOT", "ITL", "E2E"):
        if name in summary:
            p50, p90, p99 = summary[name]
            print(f"{name:>5} ms: p50 {p50:9.1f}  p90 {p90:9.1f}  p99 {p99:9.1f}")
    if summary["failed"]:
        print("first error:", next(r["error"] for r in results if r.get("error")))
    if args.output_json:
        with open(args.output_json, "a") as f:
            f.write(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **summary}) + "\n")


def summarize(results: list[dict], work: workloads.Workload, elapsed: float) -> dict:
    """Throughput and latency percentiles (ms) of a run; TPOT is a request's (E2E - TTFT) / (tokens - 1)."""
    done = [(r, len(p), n) for r, p, n in zip(results, work.prompts, work.output_lens) if not r.get("error")]
    ok = [r for r, _, _ in done]
    out_tokens = sum(r["out_tokens"] for r in ok)
    summary = {
        "ok": len(ok), "failed": len(results) - len(ok), "elapsed_s": elapsed,
        "req_per_s": len(ok) / elapsed, "out_tok_per_s": out_tokens / elapsed,
        "total_tok_per_s": (out_tokens + sum(p for _, p, _ in done)) / elapsed,
        "out_tokens": out_tokens, "asked_tokens": sum(n for _, _, n in done),
        "short": sum(r["out_tokens"] < n for r, _, n in done),
        "mean_in_flight": sum(r["end"] - r["start"] for r in ok) / elapsed,
        "events": sum(len(r["chunks"]) for r in ok),  # streamed events that carried output
    }
    ttft = [r["chunks"][0] - r["start"] for r in ok]
    tpot = [(r["end"] - r["chunks"][0]) / (r["out_tokens"] - 1) for r in ok if r["out_tokens"] > 1]
    itl = np.concatenate([np.diff(r["chunks"]) for r in ok if len(r["chunks"]) > 1] or [np.zeros(0)])
    e2e = [r["end"] - r["start"] for r in ok]
    for name, values in (("TTFT", ttft), ("TPOT", tpot), ("ITL", itl), ("E2E", e2e)):
        if len(values):
            summary[name] = percentiles(values, (50, 90, 99), scale=1e3)
    return summary


if __name__ == "__main__":
    main()
