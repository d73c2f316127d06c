"""Offline throughput of the Engine (all requests submitted at once), on dummy weights of a real shape.

Workloads (sgjax/testing/workloads.py): `sharegpt` (log-normal lengths with ShareGPT's means),
`fixed` (--input-len / --output-len), `shared-prefix` (SGLang's generated-shared-prefix). With
--compare-radix the same workload runs again with the radix cache disabled.

    python scripts/bench_offline.py --model llama-3-8b --dataset sharegpt --num-prompts 1000
    python scripts/bench_offline.py --dataset shared-prefix --compare-radix
    python scripts/bench_offline.py --schedule-policy lof --step-token-target 384 --max-running-requests 512
    python scripts/bench_offline.py --tokenizer DIR   # detokenize every token, as a server does

With --kv-cache-dtype fp8_* the floors count the fp8 pool's bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import functools
import gc
import os
import pstats
import shutil
import tempfile
import time

import jax
import numpy as np
from bench_common import Table, copy_bandwidth, matmul_params, matmul_rate, ratio_to_floor, run_header, step_sizes

from sgjax.config import add_engine_arguments, engine_args_from_namespace
from sgjax.engine import Engine, detokenizer
from sgjax.executor import model_runner
from sgjax.engine.core import EngineCore
from sgjax.engine.stats import HOST_BOUND_WAIT_S, StepRecord
from sgjax.executor import buckets
from sgjax.executor.buckets import token_buckets
from sgjax.models.presets import PRESETS, write_preset
from sgjax.testing import workloads


# The engine's options this benchmark offers; it sets the model folder and dummy weights itself.
ENGINE_FLAGS = ("mesh", "max_running_requests", "chunked_prefill_size", "schedule_policy", "step_token_target",
                "context_length", "mem_fraction_static", "min_token_bucket", "num_pages", "disable_overlap_schedule",
                "attention_backend", "kv_cache_dtype")


def make_workload(args, vocab: int) -> workloads.Workload:
    if args.dataset == "sharegpt":
        return workloads.sharegpt_like(args.num_prompts, vocab, max_len=args.max_len)
    if args.dataset == "fixed":
        return workloads.fixed(args.num_prompts, vocab, input_len=args.input_len, output_len=args.output_len)
    return workloads.shared_prefix(vocab, num_groups=args.num_groups, prompts_per_group=args.prompts_per_group,
                                   system_len=args.system_len, question_len=args.question_len,
                                   output_len=args.output_len)


PROFILE = cProfile.Profile()


def profile_engine_thread() -> None:
    """cProfile on the engine thread (--profile-host): where the host's time per step goes."""
    loop = EngineCore._loop

    def profiled(self) -> None:
        PROFILE.enable()
        try:
            loop(self)
        finally:
            PROFILE.disable()

    EngineCore._loop = profiled


def run(args, folder: str, disable_radix_cache: bool) -> dict:
    t0 = time.perf_counter()
    # The bucket grids the engine compiles (the engine has no option for them; here for A/B runs)
    model_runner.token_buckets = functools.partial(token_buckets, decode_step=args.decode_bucket_step)
    buckets.ROW_BUCKET_GROWTH = args.row_bucket_growth
    buckets.HALFWAY_ROW_BUCKETS = not args.no_halfway_row_buckets
    if args.profile_host:
        profile_engine_thread()
    engine = Engine(args=engine_args_from_namespace(args, model_path=folder, load_format="dummy",
                                                    disable_radix_cache=disable_radix_cache),
                    kernel_options={"greedy_head": not args.no_fused_greedy_head})
    startup = time.perf_counter() - t0
    print(f"token buckets: {engine.runner.buckets}; sampling row buckets: {engine.runner.row_buckets}", flush=True)
    work = make_workload(args, engine.loaded.config.vocab_size)
    engine.generate(input_ids=work.prompts[:2], sampling_params={"max_new_tokens": 4, "temperature": 0})  # warm-up
    if engine.radix is not None:
        engine.flush_cache()
        engine.radix.reset_stats()
    preemptions, shared_steps = engine.scheduler.num_preemptions, engine.runner.num_shared_prefix_steps
    before = engine.timings()
    engine.stats.step_log = []
    t0 = time.perf_counter()
    done = []
    for prompt, out_len in zip(work.prompts, work.output_lens):  # per-request lengths: one call each, async
        done.append(engine.make_requests(input_ids=prompt, sampling_params={
            "max_new_tokens": out_len, "temperature": 0, "ignore_eos": True}))
    results = asyncio.run(engine.run_to_end([r for reqs in done for r in reqs]))
    elapsed = time.perf_counter() - t0
    after = engine.timings()
    out_tokens = sum(len(r.output_ids) for r in results)
    in_tokens = sum(len(p) for p in work.prompts)
    stats = dict(description=work.description, startup=startup, elapsed=elapsed, out_tps=out_tokens / elapsed,
                 total_tps=(out_tokens + in_tokens) / elapsed, steps=after["steps"] - before["steps"],
                 preemptions=engine.scheduler.num_preemptions - preemptions,
                 shared_steps=engine.runner.num_shared_prefix_steps - shared_steps,
                 hit_rate=engine.radix.hit_rate if engine.radix else 0.0,
                 device_wait=(after["device_wait_s"] - before["device_wait_s"]) / elapsed,
                 backend=engine.kernels.backend,
                 pages=engine.allocator.num_usable, end=t0 + elapsed,
                 host={k: after["host_s"][k] - before["host_s"][k] for k in ("schedule", "enqueue", "process")},
                 log=engine.stats.step_log, out_tokens=out_tokens, model=model_sizes(engine), work=work,
                 step_sizes=step_sizes(before, after),
                 detokenizer="none" if engine.tokenizer is None
                 else "stream" if detokenizer.stream_backend(engine.tokenizer) else "window")
    engine.shutdown()
    if args.profile_host:  # the whole run, warm-up included; the thread stopped, so its profile is complete
        pstats.Stats(PROFILE).sort_stats("tottime").print_stats(30)
    del engine
    gc.collect()
    return stats


DECODE_BANDS = (1, 16, 64, 128, 192, 256, 512, 1 << 30)


def model_sizes(engine) -> dict:
    """What a step must move and compute: weight bytes read (all but the input embedding, of which a step
    reads only its tokens' rows), K/V bytes per token, parameters multiplied per token (all but the
    embedding and the LM head, which only sampled rows go through)."""
    runner, cfg = engine.runner, engine.loaded.config
    head = runner.head
    untied = not cfg.tie_word_embeddings
    return dict(weight_bytes=sum(x.nbytes for x in runner.weights) - head.nbytes * untied,
                kv_bytes_per_token=runner.pool.config.bytes_per_page / runner.page_size,
                layer_params=matmul_params(runner.weights, cfg.vocab_size))


def step_floor_s(log: list[StepRecord], model: dict, bandwidth: float, matmul_rate: float,
                 in_sequence: bool = False) -> float:
    """The physical floor of the steps a run made: each step at the slower of reading its bytes (weights,
    and the K/V its attention needs) at the copy bandwidth and doing its matmuls (2 x layer parameters
    per token) at the bf16 matmul rate, both measured on this device. Attention FLOPs and the LM head's
    matmul are left out, so the floor is a little optimistic for long prefills.

    `in_sequence`: the attention's K/V reads follow the matmuls instead of hiding under them, as the
    kernels of one GPU stream run (each layer's attention needs its q/k/v matmul's output and the o
    matmul needs the attention's): max(weights, matmuls) + K/V per step."""
    total, weights = 0.0, model["weight_bytes"] / bandwidth
    for step in log:
        kv = step.kv_tokens * model["kv_bytes_per_token"] / bandwidth
        compute = 2 * model["layer_params"] * (step.decodes + step.prefill_tokens) / matmul_rate
        total += max(weights, compute) + kv if in_sequence else max(weights + kv, compute)
    return total


def workload_floor_s(work, model: dict, bandwidth: float, matmul_rate: float) -> float:
    """A floor for any schedule of a workload without shared prefixes, kernels in sequence: every token's
    matmuls, or the weights read by the steps its longest output needs (one token per request a step),
    whichever is slower, plus the K/V that decoding reads (output token i attends to prompt + i tokens).
    Prefill attention is left out."""
    tokens = sum(len(p) for p in work.prompts) + sum(work.output_lens)
    compute = 2 * model["layer_params"] * tokens / matmul_rate
    weights = max(work.output_lens) * model["weight_bytes"] / bandwidth
    return max(compute, weights) + decode_kv_tokens(work) * model["kv_bytes_per_token"] / bandwidth


def decode_kv_tokens(work) -> float:
    """K/V tokens a workload's decoding reads in all: output token i attends to prompt + i tokens."""
    ins = np.array([len(p) for p in work.prompts], np.float64)
    outs = np.array(work.output_lens, np.float64)
    return float((outs * ins + outs * (outs - 1) / 2).sum())


def timeline(log: list[StepRecord], end: float, floor=None) -> list[tuple]:
    """Steps grouped by what they ran: (kind, steps, seconds until the next launch, decode rows, seconds
    the engine thread waited for their results, steps it did not wait for at all, seconds of the
    in-sequence floor of these steps or None). `floor`: a step's floor in seconds (step_floor_s of one
    step), to show which kind of step is furthest from it.

    Steps are pipelined, so the time between two launches is the step's share of the run; a step whose
    results were ready when the engine thread asked (no wait) was bounded by the host, not the device."""
    groups: dict[int, list] = {}  # keyed by the decode band's lower bound; 0: steps with prefill
    for step, nxt in zip(log, [x.launched for x in log[1:]] + [end]):
        band = 0 if step.prefill_tokens else max(b for b in DECODE_BANDS if b <= step.decodes)
        if band not in groups:
            upper = DECODE_BANDS[DECODE_BANDS.index(band) + 1] - 1 if band else 0
            name = f"decode {band}+" if upper >= DECODE_BANDS[-1] - 1 else f"decode {band}-{upper}"
            groups[band] = [name if band else "with prefill", 0, 0.0, 0, 0.0, 0,
                            0.0 if floor else None]
        g = groups[band]
        g[1], g[2], g[3] = g[1] + 1, g[2] + nxt - step.launched, g[3] + step.decodes
        g[4], g[5] = g[4] + step.waited, g[5] + (step.waited < HOST_BOUND_WAIT_S)
        if floor:
            g[6] += floor(step)
    return [tuple(groups[band]) for band in sorted(groups)]


def print_timeline(rows: list[tuple]) -> None:
    total = sum(r[2] for r in rows)
    with_floor = rows and rows[0][6] is not None
    columns = [("step kind", "<18"), ("steps", ">6"), ("s", ">7.2f"), ("share", ">6.1%"), ("ms/step", ">8.2f"),
               ("decode rows", ">12,"), ("wait ms/step", ">12.2f"), ("host-bound", ">10.0%")]
    table = Table(*columns, *([("floor ms/step", ">13.2f"), ("of floor", ">8.1%")] if with_floor else []), indent="  ")
    print(table.header())
    for kind, steps, seconds, decodes, waited, unwaited, floor in rows:
        cells = [kind, steps, seconds, seconds / total, seconds / steps * 1e3, decodes, waited / steps * 1e3,
                 unwaited / steps]
        print(table.row(*cells, *([floor / steps * 1e3, ratio_to_floor(floor, seconds)] if with_floor else [])))
    print(f"  (wait: the engine thread waiting for the step's results; host-bound: steps it waited less than "
          f"{HOST_BOUND_WAIT_S * 1e3:.1f} ms for" + ("; floor: kernels in sequence, as below" if with_floor else "")
          + ")")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--dataset", default="sharegpt", choices=["sharegpt", "fixed", "shared-prefix"])
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=1024, help="sharegpt: longest prompt / output")
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=512)
    p.add_argument("--num-groups", type=int, default=16)
    p.add_argument("--prompts-per-group", type=int, default=32)
    p.add_argument("--system-len", type=int, default=2048)
    p.add_argument("--question-len", type=int, default=128)
    p.add_argument("--compare-radix", action="store_true", help="run again with the radix cache disabled")
    # An offline batch runs more requests at once than a server's default, in larger prefill chunks.
    add_engine_arguments(p, only=ENGINE_FLAGS, defaults={"max_running_requests": 1024, "chunked_prefill_size": 8192,
                                                         "context_length": 4096, "mem_fraction_static": 0.9})
    p.add_argument("--profile-host", action="store_true", help="cProfile the engine thread, print the top functions")
    p.add_argument("--decode-bucket-step", type=int, default=buckets.DECODE_BUCKET_STEP,
                   help="token buckets for decode steps every this many rows (256: the engine's earlier, coarser grid)")
    p.add_argument("--row-bucket-growth", type=int, default=buckets.ROW_BUCKET_GROWTH,
                   help="sampling row buckets grow by this factor from 64 (4: the engine's earlier, coarser grid)")
    p.add_argument("--no-halfway-row-buckets", action="store_true",
                   help="sampling row buckets without the halfway points (the engine's earlier grid)")
    p.add_argument("--no-fused-greedy-head", action="store_true",
                   help="greedy sampling through XLA's float32 logits, not the fused head kernel")
    p.add_argument("--tokenizer", default=None,
                   help="folder with a tokenizer (its vocabulary the model's): the engine then detokenizes every "
                        "token, as it does for a server; default none (token ids only)")
    p.add_argument("--window-detokenizer", action="store_true",
                   help="with --tokenizer: detokenize by Python decodes of a window, not the Rust stream")
    args = p.parse_args()
    print(run_header())

    folder = write_preset(args.model, tempfile.mkdtemp())
    if args.tokenizer:
        for name in os.listdir(args.tokenizer):
            if name.startswith(("tokenizer", "special_tokens")):
                shutil.copy(os.path.join(args.tokenizer, name), folder)
    if args.window_detokenizer:
        detokenizer.DecodeStream = None  # IncrementalDetokenizer then takes its window of Python decodes
    runs = [("radix cache on", run(args, folder, False))]
    if args.compare_radix:
        runs.append(("radix cache off", run(args, folder, True)))
    detok = runs[0][1]["detokenizer"]
    print(f"\n{args.model} (dummy weights), attention {runs[0][1]['backend']}, "
          f"overlap {'off' if args.disable_overlap_schedule else 'on'}, KV cache {args.kv_cache_dtype}, "
          f"detokenizer {detok}")
    print(runs[0][1]["description"])
    table = Table(("", "<16"), ("s", ">7.2f"), ("out tok/s", ">10,.0f"), ("total tok/s", ">12,.0f"), ("steps", ">6"),
                  ("ms/step", ">8.2f"), ("preempt", ">8"), ("hit rate", ">9.1%"), ("dev wait", ">9.1%"))
    print(table.header())
    for name, s in runs:
        print(table.row(name, s["elapsed"], s["out_tps"], s["total_tps"], s["steps"],
                        s["elapsed"] / max(s["steps"], 1) * 1e3, s["preemptions"], s["hit_rate"], s["device_wait"]))
    print("dev wait: share of the run the engine thread waited for step results (near 0: the host is the "
          "bottleneck)")
    for name, s in runs:
        print(f"engine thread, {name}, ms/step: " + ", ".join(
            f"{k} {v / max(s['steps'], 1) * 1e3:.2f}" for k, v in s["host"].items())
              + f"; {s['step_sizes']}; steps reading shared prefixes once (cascade): {s['shared_steps']}")
    on_gpu = jax.default_backend() == "gpu"
    if on_gpu:  # measured after the runs, on the same device
        bandwidth, rate = copy_bandwidth(), matmul_rate()
    for name, s in runs:
        print(f"timeline, {name}:")
        floor = None
        if on_gpu:
            def floor(step, model=s["model"]):
                return step_floor_s([step], model, bandwidth, rate, in_sequence=True)
        print_timeline(timeline(s["log"], s["end"], floor))
    if len(runs) == 2:
        print(f"radix cache speed-up: {runs[0][1]['out_tps'] / runs[1][1]['out_tps']:.2f}x")
    if on_gpu:
        print(f"floor of the steps run (each at the slower of its bytes at {bandwidth / 1e12:.2f} TB/s copy "
              f"bandwidth and its layer matmuls at {rate / 1e12:.0f} TFLOP/s bf16, both measured now):")
        for name, s in runs:
            floor = step_floor_s(s["log"], s["model"], bandwidth, rate)
            print(f"  {name}: {floor:.2f} s for {len(s['log'])} steps ({s['out_tokens'] / floor:,.0f} out tok/s at "
                  f"the floor); the run took {s['elapsed']:.2f} s = {ratio_to_floor(floor, s['elapsed']):.1%} of the "
                  f"floor's speed")
        print("the same with each step's K/V read after its matmuls (kernels in sequence, as one GPU stream runs):")
        for name, s in runs:
            floor = step_floor_s(s["log"], s["model"], bandwidth, rate, in_sequence=True)
            print(f"  {name}: {floor:.2f} s ({s['out_tokens'] / floor:,.0f} out tok/s); the run = "
                  f"{ratio_to_floor(floor, s['elapsed']):.1%} of this floor's speed")
        if args.dataset != "shared-prefix":
            s = runs[0][1]
            floor = workload_floor_s(s["work"], s["model"], bandwidth, rate)
            print(f"floor of any schedule of this workload, kernels in sequence (all matmuls or the weights read by "
                  f"the longest output's steps, + decode K/V): {floor:.2f} s = {s['out_tokens'] / floor:,.0f} "
                  f"out tok/s")
    print(f"start-up {runs[0][1]['startup']:.1f} s, KV pool {runs[0][1]['pages']} pages")


if __name__ == "__main__":
    main()
