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

import aiohttp
import numpy as np

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


async def run(args, work: workloads.Workload) -> list[dict]:
    rng = np.random.default_rng(0)
    limit = asyncio.Semaphore(args.max_concurrency)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(headers=headers, timeout=timeout) as session:
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
    args = p.parse_args()

    if args.backend == "openai" and args.model is None:
        import urllib.request

        with urllib.request.urlopen(f"{args.base_url}/v1/models") as r:
            args.model = json.loads(r.read())["data"][0]["id"]
    if args.dataset == "sharegpt":
        work = workloads.sharegpt_like(args.num_prompts, args.vocab_size, max_len=args.max_len)
    elif args.dataset == "fixed":
        work = workloads.fixed(args.num_prompts, args.vocab_size, input_len=args.input_len,
                               output_len=args.output_len)
    else:
        work = workloads.shared_prefix(args.vocab_size, output_len=args.output_len)
    t0 = time.perf_counter()
    results = asyncio.run(run(args, work))
    elapsed = time.perf_counter() - t0
    ok = [r for r in results if not r.get("error")]
    failed = len(results) - len(ok)
    ttft = np.array([r["chunks"][0] - r["start"] for r in ok]) * 1e3
    itl = np.concatenate([np.diff(r["chunks"]) for r in ok if len(r["chunks"]) > 1] or [np.zeros(0)]) * 1e3
    e2e = np.array([r["end"] - r["start"] for r in ok]) * 1e3
    out_tokens = sum(r["out_tokens"] for r in ok)
    print(work.description)
    print(f"{len(ok)} requests ok, {failed} failed in {elapsed:.2f} s: {len(ok) / elapsed:.2f} req/s, "
          f"{out_tokens / elapsed:,.0f} output tok/s (request rate {args.request_rate}, "
          f"max concurrency {args.max_concurrency})")
    for name, values in (("TTFT", ttft), ("ITL", itl), ("E2E", e2e)):
        if len(values):
            p50, p90, p99 = np.percentile(values, [50, 90, 99])
            print(f"{name:>5} ms: p50 {p50:9.1f}  p90 {p90:9.1f}  p99 {p99:9.1f}")
    if failed:
        print("first error:", next(r["error"] for r in results if r.get("error")))


if __name__ == "__main__":
    main()
