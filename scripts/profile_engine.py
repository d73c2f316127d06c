"""Where an engine step's time goes: a jax.profiler trace of the Engine in steady state, summarised.

Runs a workload on dummy weights of a real shape, traces a window of steady-state steps with
jax.profiler (Perfetto JSON), and prints: the window's wall time, how much of it the GPU was busy
(the rest is the device waiting for the host), and the GPU time by kernel, largest first, with a
coarse category (matmul, attention, sampling sort, ...).

    python scripts/profile_engine.py --model llama-3-8b --num-prompts 512 --output-len 256
    python scripts/profile_engine.py --constrained   # 64 requests under a JSON schema
    SGJAX_XLA_SKIP_TEMP=0 XLA_FLAGS=--xla_gpu_enable_command_buffer= python scripts/profile_engine.py \
        --dataset sharegpt --num-prompts 1000 --max-running-requests 1024 --context-length 4096 --windows 6.5:1.5

Known problem (2026-11-22, H100, JAX 0.11.2): with the trace running, the engine's steps failed with
CUDA_ERROR_LAUNCH_FAILED in two of three runs, while the same workloads without the profiler ran
clean; the figures of a run with such errors (printed before the summary) are not to be trusted.
The error text, "Failed to check stream capturing status", says the trace collides with
XLA's CUDA-graph command buffers; profile_step.py --trace (the forward pass alone) traces cleanly.
Seen again 2026-11-23 (JAX 0.11.2) on the ShareGPT-like workload, in the sampling program. With
command buffers off (the third command above) the trace ran clean: its kernel times hold, but the
host then enqueues each kernel itself and the profiler slows it further, so the GPU idle it reports
is the profiler's, not the engine's (bench_offline.py's timeline measures the engine's).
"""

from __future__ import annotations

import argparse
import asyncio
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
from bench_common import run_header

from sgjax.config import add_engine_arguments, engine_args_from_namespace
from sgjax.engine import Engine
from sgjax.models.presets import PRESETS, write_preset
from sgjax.testing import workloads

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


def steps_in_trace(kernels: list[dict], num_layers: int) -> int:
    """Forward passes in the trace: the Triton attention kernel runs once a layer in every step. (The
    engine's step counter, read when the window closes, misses the steps the trace records while it
    stops, which can take seconds with the engine running on.) Steps whose attention all went to the
    Mosaic GPU prefill kernel are not counted: on the decode-sized steps of a steady state there are none."""
    calls = sum(1 for e in kernels if "ragged_paged_attention" in e["name"])
    return round(calls / num_layers)


def summarise(trace: dict, window_us: float, top: int = 20, num_layers: int = 0, timeline: bool = False) -> None:
    """Print the trace's GPU time by category and kernel, and its idle gaps; per step when `num_layers`
    is given (steps counted by `steps_in_trace`); with `timeline`, one layer's kernels in order."""
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    names = {e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    device_pids = {pid for pid, n in names.items() if "gpu" in n.lower() or "device" in n.lower()}
    print("trace processes:", sorted(set(names.values()))[:12])
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in device_pids and "dur" in e]
    if not kernels:
        print("no device events found")
        return
    steps = steps_in_trace(kernels, num_layers) if num_layers else 0
    if steps:
        print(f"{steps} steps in the trace (Triton attention calls / {num_layers} layers)")
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
    per = f"{'ms/step':>8s}" if steps else ""
    print(f"\n{'category':28s} {'ms':>9s} {'share':>7s} {per}")
    for cat, us in by_cat.most_common():
        print(f"{cat:28s} {us / 1e3:9.1f} {us / total * 100:6.1f}% " + (f"{us / 1e3 / steps:8.2f}" if steps else ""))
    if steps:
        print(f"{'GPU busy':28s} {busy / 1e3:9.1f} {'':7s} {busy / 1e3 / steps:8.2f}")
    print(f"\n{'kernel (top ' + str(top) + ')':70s} {'ms':>9s} {'share':>7s} {'calls':>6s} {'us/call':>8s}")
    for name, us in by_name.most_common(top):
        print(f"{name[:70]:70s} {us / 1e3:9.2f} {us / total * 100:6.1f}% {calls[name]:6d} {us / calls[name]:8.1f}")
    gaps, counts = idle_before(kernels)
    idle = sum(gaps.values())
    print(f"\n{'GPU idle before kernel (top 10)':70s} {'ms':>9s} {'share':>7s} {'calls':>6s} {'us/call':>8s}")
    for name, us in gaps.most_common(10):
        print(f"{name[:70]:70s} {us / 1e3:9.2f} {us / max(idle, 1e-9) * 100:6.1f}% {counts[name]:6d} "
              f"{us / counts[name]:8.1f}")
    if timeline:
        layer_timeline(kernels)


def layer_timeline(kernels: list[dict], anchor: str = "ragged_paged_attention") -> None:
    """Print one layer's kernels in the order they ran (from the middle call of `anchor`, once a layer, to
    the next), each with the GPU idle before it: how many passes a layer takes and what the gaps between
    them cost, which the per-kernel totals do not show."""
    ordered = sorted(kernels, key=lambda e: e["ts"])
    marks = [i for i, e in enumerate(ordered) if anchor in e["name"]]
    if len(marks) < 3:
        print(f"\nno layer timeline: {len(marks)} calls of {anchor} in the trace")
        return
    first, last = marks[len(marks) // 2], marks[len(marks) // 2 + 1]
    start, end = ordered[first]["ts"], ordered[first - 1]["ts"] + ordered[first - 1]["dur"]
    busy = idle = 0.0
    print(f"\n{'one layer, in order':70s} {'at us':>8s} {'idle us':>8s} {'us':>8s}")
    for e in ordered[first:last]:
        gap = max(0.0, e["ts"] - end)
        idle, busy = idle + gap, busy + e["dur"]
        print(f"{e['name'][:70]:70s} {e['ts'] - start:8.1f} {gap:8.1f} {e['dur']:8.1f}")
        end = max(end, e["ts"] + e["dur"])
    print(f"{last - first} kernels: {busy:.1f} us of kernels, {idle:.1f} us idle between them")


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
    p.add_argument("--dataset", default="fixed", choices=["fixed", "sharegpt"],
                   help="fixed: --input-len / --output-len; sharegpt: bench_offline's ShareGPT-like lengths")
    p.add_argument("--num-prompts", type=int, default=512)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=256)
    add_engine_arguments(p, only=("max_running_requests", "context_length", "chunked_prefill_size",
                                  "mem_fraction_static", "schedule_policy", "step_token_target", "kv_cache_dtype"),
                         defaults={"max_running_requests": 128, "context_length": 2048, "chunked_prefill_size": 8192,
                                   "mem_fraction_static": 0.9})
    p.add_argument("--warmup-s", type=float, default=8.0, help="seconds of serving before the trace starts")
    p.add_argument("--trace-s", type=float, default=2.0)
    p.add_argument("--top", type=int, default=20, help="kernels to list by GPU time")
    p.add_argument("--windows", default=None,
                   help="several traces, 'start:length,...' in seconds after the workload starts (overrides "
                        "--warmup-s / --trace-s), e.g. 6:1.5,14:1.5 for the large-batch phase and the tail")
    p.add_argument("--constrained", action="store_true", help="64 requests under a long-key JSON schema")
    p.add_argument("--tokenizer", default=None, help="with --constrained: a tokenizer folder (default: train one)")
    args = p.parse_args()
    print(run_header())

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
    engine = Engine(args=engine_args_from_namespace(args, model_path=folder, load_format="dummy"))
    if args.dataset == "sharegpt" and not args.constrained:
        work = workloads.sharegpt_like(args.num_prompts, vocab)
        requests = [r for prompt, out_len in zip(work.prompts, work.output_lens) for r in
                    engine.make_requests(input_ids=prompt, sampling_params=dict(params, max_new_tokens=out_len))]
        print(work.description)
    else:
        rng = np.random.default_rng(0)
        requests = engine.make_requests(input_ids=[rng.integers(100, min(20000, vocab), args.input_len).tolist()
                                                   for _ in range(args.num_prompts)], sampling_params=params)
    engine.generate(input_ids=[requests[0].prompt_ids], sampling_params={"max_new_tokens": 4})  # warm-up
    done = threading.Event()
    threading.Thread(target=lambda: (asyncio.run(engine.run_to_end(requests)), done.set()), daemon=True).start()
    started = time.perf_counter()
    windows = [tuple(map(float, w.split(":"))) for w in args.windows.split(",")] if args.windows else \
        [(args.warmup_s, args.trace_s)]
    traced = []  # summarised after the workload: parsing a trace would hold the GIL against the engine thread
    for start, length in windows:
        time.sleep(max(0.0, start - (time.perf_counter() - started)))
        if done.is_set():  # writing the previous trace can take seconds: later windows start late
            print(f"the workload ended before the trace at {start} s: start earlier or add prompts")
            break
        start = time.perf_counter() - started
        trace_dir = tempfile.mkdtemp()
        running = len(engine.scheduler.running)
        jax.profiler.start_trace(trace_dir, create_perfetto_trace=True)
        t0 = time.perf_counter()
        time.sleep(length)
        window = (time.perf_counter() - t0) * 1e6
        jax.profiler.stop_trace()
        header = (f"\n=== window {start:.1f}-{start + length:.1f} s: {args.model}, "
                  f"{running}-{len(engine.scheduler.running)} running requests")
        traced.append((header, trace_dir, window))
    done.wait()
    print(f"workload done in {time.perf_counter() - started:.2f} s (traces included)")
    num_layers = engine.loaded.config.num_layers
    for header, trace_dir, window in traced:
        print(header)
        summarise(load_trace(trace_dir), window, top=args.top, num_layers=num_layers)
    engine.shutdown()


if __name__ == "__main__":
    main()
