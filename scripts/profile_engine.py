"""Where an engine step's time goes: a jax.profiler trace of the Engine in steady state, summarised.

Runs a workload on dummy weights of a real shape, traces a window of steady-state steps with
jax.profiler (Perfetto JSON), and prints: the window's wall time, how much of it the GPU was busy
(the rest is the device waiting for the host), and the GPU time by kernel, largest first, with a
coarse category (matmul, attention, sampling sort, ...).

    python scripts/profile_engine.py --model llama-3-8b --num-prompts 512 --output-len 256
    python scripts/profile_engine.py --constrained   # 64 requests under a JSON schema

Known problem (2026-11-22, H100, JAX 0.11.2): with the trace running, the engine's steps failed with
CUDA_ERROR_LAUNCH_FAILED in two of three runs, while the same workloads without the profiler ran
clean; the figures of a run with such errors (printed before the summary) are not to be trusted.
Session 4 saw the error text: "Failed to check stream capturing status", i.e. the trace collides with
XLA's CUDA-graph command buffers; profile_step.py --trace (the forward pass alone) traces cleanly.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import tempfile
import threading
import time

import jax
import numpy as np

from sgjax.engine import Engine
from sgjax.models.presets import PRESETS, write_preset

CATEGORIES = [  # (category, substrings of kernel names), first match wins
    ("attention (Pallas)", ("ragged_paged", "paged_attention", "attention", "mosaic_gpu")),
    ("matmul", ("gemm", "cublas", "cutlass", "matmul", "dot", "sm90_xmma", "nvjet")),
    ("sort / top-k (sampling)", ("sort", "topk", "top_k", "radix")),
    ("KV scatter", ("scatter",)),
    ("memcpy", ("memcpy", "memset", "copy")),
    ("reductions", ("reduce",)),
    ("other fusions", ("fusion", "loop", "input", "wrapped")),
]


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


def load_trace(folder: str) -> dict:
    paths = glob.glob(os.path.join(folder, "**", "*.trace.json.gz"), recursive=True)
    if not paths:
        raise FileNotFoundError(f"no Perfetto trace under {folder}")
    with gzip.open(paths[0]) as f:
        return json.load(f)


def busy_time(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end) intervals."""
    total, end = 0.0, -np.inf
    for s, e in sorted(intervals):
        if e > end:
            total += e - max(s, end)
            end = e
    return total


def summarise(trace: dict, window_us: float, top: int = 20) -> None:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "gpu" in n.lower() or "device" in n.lower()}
    print("trace processes:", sorted(set(names.values()))[:12])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e]
    if not kernels:
        print("no device events found")
        return
    by_name, by_cat, calls = collections.Counter(), collections.Counter(), collections.Counter()
    for e in kernels:
        by_name[e["name"]] += e["dur"]
        by_cat[category(e["name"])] += e["dur"]
        calls[e["name"]] += 1
    busy = busy_time([(e["ts"], e["ts"] + e["dur"]) for e in kernels])
    span = max(e["ts"] + e["dur"] for e in kernels) - min(e["ts"] for e in kernels)
    total = sum(by_name.values())
    print(f"traced window {window_us / 1e3:.1f} ms; device events span {span / 1e3:.1f} ms, GPU busy "
          f"{busy / 1e3:.1f} ms = {busy / span * 100:.1f}% of the span (the rest: waiting for the host)")
    print(f"\n{'category':28s} {'ms':>9s} {'share':>7s}")
    for cat, us in by_cat.most_common():
        print(f"{cat:28s} {us / 1e3:9.1f} {us / total * 100:6.1f}%")
    print(f"\n{'kernel (top ' + str(top) + ')':70s} {'ms':>9s} {'share':>7s} {'calls':>6s} {'us/call':>8s}")
    for name, us in by_name.most_common(top):
        print(f"{name[:70]:70s} {us / 1e3:9.2f} {us / total * 100:6.1f}% {calls[name]:6d} {us / calls[name]:8.1f}")
    gaps, counts = idle_before(kernels)
    idle = sum(gaps.values())
    print(f"\n{'GPU idle before kernel (top 10)':70s} {'ms':>9s} {'share':>7s} {'calls':>6s} {'us/call':>8s}")
    for name, us in gaps.most_common(10):
        print(f"{name[:70]:70s} {us / 1e3:9.2f} {us / max(idle, 1e-9) * 100:6.1f}% {counts[name]:6d} "
              f"{us / counts[name]:8.1f}")


def idle_before(kernels: list[dict]) -> tuple[collections.Counter, collections.Counter]:
    """GPU idle time (us) summed by the kernel that ended each idle gap, and how many kernels of each
    name started after one: where a step waits (for a launch, a graph boundary, the host) between kernels."""
    gaps, counts = collections.Counter(), collections.Counter()
    end = None
    for e in sorted(kernels, key=lambda e: e["ts"]):
        if end is not None and e["ts"] > end:
            gaps[e["name"]] += e["ts"] - end
        counts[e["name"]] += 1
        end = e["ts"] + e["dur"] if end is None else max(end, e["ts"] + e["dur"])
    return gaps, counts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-running-requests", type=int, default=128)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--warmup-s", type=float, default=8.0, help="seconds of serving before the trace starts")
    p.add_argument("--trace-s", type=float, default=2.0)
    p.add_argument("--constrained", action="store_true", help="64 requests under a long-key JSON schema")
    p.add_argument("--tokenizer", default=None, help="with --constrained: a tokenizer folder (default: train one)")
    args = p.parse_args()

    folder = tempfile.mkdtemp()
    write_preset(args.model, folder)
    vocab = PRESETS[args.model][1]["vocab_size"]
    params = {"max_new_tokens": args.output_len, "temperature": 0, "ignore_eos": True}
    if args.constrained:
        from bench_constrained import long_key_schema

        from sgjax.testing.bench_tokenizer import train_bench_tokenizer

        train_bench_tokenizer(folder, vocab)
        params = {"json_schema": json.dumps(long_key_schema(8)), "temperature": 0, "max_new_tokens": 1500}
        args.num_prompts = min(args.num_prompts, 64)
    engine = Engine(folder, load_format="dummy", max_running_requests=args.max_running_requests,
                    context_length=args.context_length)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(100, 20000, args.input_len).tolist() for _ in range(args.num_prompts)]
    engine.generate(input_ids=prompts[:2], sampling_params={"max_new_tokens": 4})  # warm-up
    done = threading.Event()
    threading.Thread(target=lambda: (engine.generate(input_ids=prompts, sampling_params=params), done.set()),
                     daemon=True).start()
    time.sleep(args.warmup_s)
    if done.is_set():
        raise SystemExit("the workload ended before the trace: lower --warmup-s or raise --num-prompts")
    trace_dir = tempfile.mkdtemp()
    steps = engine.num_steps
    jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
    t0 = time.perf_counter()
    time.sleep(args.trace_s)
    window = (time.perf_counter() - t0) * 1e6
    jax.profiler.stop_trace()
    steps = engine.num_steps - steps
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.model}, "
          f"{len(engine.scheduler.running)} running requests, {steps} steps traced "
          f"({window / 1e3 / max(steps, 1):.2f} ms per step)")
    summarise(load_trace(trace_dir), window)
    done.wait()
    engine.shutdown()


if __name__ == "__main__":
    main()
