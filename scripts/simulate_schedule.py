"""The engine's scheduler alone on a benchmark workload, with no model: which steps it makes, and the
physical floor of those steps on a device of given bandwidth and matmul rate.

A run of bench_offline costs ~6 minutes of GPU time (mostly compiling), a simulation a few seconds
of CPU: this is where scheduling policies are compared before one is measured on the device. The
scheduler, page allocator and radix cache are the engine's own; every step's chunks run at once and
every sampled token is the request's next (`ignore_eos`, outputs of exactly max_new_tokens), as in
bench_offline. The cost of a step is bench_offline's in-sequence floor (max(weights, matmuls) + K/V),
counted on the token bucket the step is padded to.

With `--layer-costs` (bench_gemm.py --layer's last line: us a layer besides attention, measured at some
token counts) it also prices the steps with those costs instead of the roofline: each step's layers at its
padded token count, its K/V at `--attention-bandwidth`, plus `--sampling-ms`. That estimate, unlike the
floor, knows that the GEMMs of a few hundred rows run well below the square matmul's rate.

    python scripts/simulate_schedule.py --num-prompts 1000
    python scripts/simulate_schedule.py --policy lof --step-token-target 384 --max-running-requests 512
"""

from __future__ import annotations

import argparse
import functools
import time

import numpy as np
from bench_common import Table, run_header
from bench_offline import decode_kv_tokens, step_floor_s, timeline, workload_floor_s

from sgjax.cache.page_allocator import PageAllocator
from sgjax.cache.radix_cache import RadixCache
from sgjax.config import add_engine_arguments
from sgjax.engine.stats import StepRecord
from sgjax.executor.buckets import ACCELERATOR, bucket_for, token_buckets
from sgjax.engine.request import Request
from sgjax.engine.sampling_params import SamplingParams
from sgjax.engine.scheduler import Scheduler
from sgjax.testing import workloads

# Llama-3-8B in bf16 (the shape bench_offline runs by default): bytes read per step for the weights
# (all but the input embedding), parameters of every token's matmuls (the layers), K/V bytes per token.
LLAMA_3_8B = dict(weight_bytes=2 * (8_030_261_248 - 128_256 * 4096), layer_params=6_979_321_856,
                  kv_bytes_per_token=32 * 2 * 8 * 128 * 2)


def padded_tokens(args):
    """A step's token count -> the bucket the engine's ModelRunner pads it to (on an accelerator)."""
    buckets = token_buckets(args.min_token_bucket or ACCELERATOR.min_token_bucket, args.chunked_prefill_size + args.max_running_requests,
                            decode_rows=args.max_running_requests)
    return functools.partial(bucket_for, buckets)


def parse_layer_costs(text: str) -> tuple[np.ndarray, np.ndarray]:
    """"tokens:us,..." (bench_gemm.py --layer) -> (token counts, us a layer), ascending."""
    pairs = sorted((int(t), float(us)) for t, us in (item.split(":") for item in text.split(",")))
    return np.array([t for t, _ in pairs], np.float64), np.array([us for _, us in pairs])


def layer_cost_s(costs: tuple[np.ndarray, np.ndarray], tokens: float) -> float:
    """Seconds a layer (besides attention) takes at `tokens` rows: linear between measured counts, the
    smallest's cost below them, the largest's cost per token above them."""
    ts, us = costs
    if tokens > ts[-1]:
        return us[-1] * tokens / ts[-1] * 1e-6
    return float(np.interp(tokens, ts, us)) * 1e-6


def measured_s(log: list[StepRecord], args) -> float:
    """The steps priced with the measured layer costs (see the module docstring)."""
    round_up, total = padded_tokens(args), 0.0
    for step in log:
        total += args.layers * layer_cost_s(args.layer_costs, round_up(step.decodes + step.prefill_tokens))
        total += step.kv_tokens * args.model["kv_bytes_per_token"] / args.attention_bandwidth
    return total + len(log) * args.sampling_ms * 1e-3


def even_steps_s(work: workloads.Workload, args) -> float:
    """Any schedule's steps priced the same way, if the layer cost is convex in the token count: the longest
    output's steps, each with an equal share of all tokens, and the K/V decoding reads."""
    steps = max(work.output_lens)
    tokens = sum(len(p) for p in work.prompts) + sum(work.output_lens)
    return (steps * args.layers * layer_cost_s(args.layer_costs, tokens / steps) + steps * args.sampling_ms * 1e-3
            + decode_kv_tokens(work) * args.model["kv_bytes_per_token"] / args.attention_bandwidth)


def simulate(work: workloads.Workload, args) -> tuple[list[StepRecord], Scheduler]:
    """The steps the scheduler makes for `work`, with time in each record's `launched` field (the sum of
    the floors of the steps before it)."""
    allocator = PageAllocator(args.num_pages, args.page_size)
    radix = None if args.disable_radix_cache else RadixCache(allocator)
    round_up = padded_tokens(args)  # as the engine's ModelRunner pads steps
    scheduler = Scheduler(allocator, radix, max_running_requests=args.max_running_requests,
                          chunked_prefill_size=args.chunked_prefill_size, context_length=args.context_length,
                          policy=args.policy, step_token_target=args.step_token_target,
                          round_up=round_up)
    requests = [Request(str(i), prompt, SamplingParams(max_new_tokens=out, ignore_eos=True), seed=i)
                for i, (prompt, out) in enumerate(zip(work.prompts, work.output_lens))]
    # Request i arrives before step i * arrival_steps // n (all before the first step by default), in the
    # workload's order, as bench_serving sends a burst
    arrivals = [i * args.arrival_steps // len(requests) for i in range(len(requests))]
    log, clock, step, arrived = [], 0.0, 0, 0
    while arrived < len(requests) or scheduler.has_work():
        while arrived < len(requests) and arrivals[arrived] <= step:
            scheduler.add(requests[arrived])
            arrived += 1
        step += 1
        if not scheduler.has_work():
            continue  # nothing has arrived yet: the engine idles through this step
        batch = scheduler.schedule()
        if not batch:
            raise RuntimeError("the scheduler made an empty step with requests left: out of KV pages?")
        decodes = sum(n == 1 for _, n in batch)
        record = StepRecord(clock, decodes, sum(n for _, n in batch) - decodes,
                            sum(r.num_computed + n for r, n in batch))
        padded = StepRecord(0, 0, round_up(record.decodes + record.prefill_tokens), record.kv_tokens)
        clock += step_floor_s([padded], args.model, args.bandwidth, args.matmul_rate, in_sequence=True)
        log.append(record)
        for req, n in batch:
            was_prefill = req.num_pending > 1
            req.num_computed += n
            if was_prefill:
                scheduler.cache_prefill(req)
            if req.num_pending == 0:
                req.output_ids.append(0)
                if len(req.output_ids) >= req.params.max_new_tokens:
                    scheduler.finish(req)
    return log, scheduler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=1000)
    p.add_argument("--max-len", type=int, default=1024, help="longest prompt / output (sharegpt-like)")
    # bench_offline's engine options; the KV pool an H100 holds at 0.9 of its memory (~26k pages), as the
    # simulation has no device to size it from. --policy is this script's older spelling of --schedule-policy.
    add_engine_arguments(p, only=("schedule_policy", "max_running_requests", "chunked_prefill_size",
                                  "step_token_target", "context_length", "num_pages", "page_size", "min_token_bucket",
                                  "disable_radix_cache"),
                         defaults={"max_running_requests": 1024, "chunked_prefill_size": 8192, "context_length": 4096,
                                   "num_pages": 26_000},
                         names={"schedule_policy": "policy"})
    p.add_argument("--bandwidth", type=float, default=2.6e12,
                   help="bytes/s (an H100's bf16 copy rate by the older one-call measure; its memory is faster)")
    p.add_argument("--matmul-rate", type=float, default=750e12, help="bf16 FLOP/s (an H100's, measured)")
    p.add_argument("--layer-costs", type=parse_layer_costs, default=None,
                   help="tokens:us,... a layer besides attention (bench_gemm.py --layer): price the steps with them")
    p.add_argument("--layers", type=int, default=32, help="--layer-costs: layers a step")
    p.add_argument("--attention-bandwidth", type=float, default=None,
                   help="--layer-costs: bytes/s the attention reads K/V at (default --bandwidth)")
    p.add_argument("--sampling-ms", type=float, default=0.0, help="--layer-costs: the LM head and sampling a step")
    p.add_argument("--arrival-steps", type=int, default=0,
                   help="the requests arrive spread evenly over this many steps, in order (a served burst; "
                        "default 0: all before the first step, as offline)")
    p.add_argument("--kv-bytes", type=int, default=2, choices=(1, 2), help="bytes a K/V element: 2 bf16, 1 fp8")
    args = p.parse_args()
    print(run_header(device=False))
    args.model = dict(LLAMA_3_8B, kv_bytes_per_token=LLAMA_3_8B["kv_bytes_per_token"] // 2 * args.kv_bytes)
    args.attention_bandwidth = args.attention_bandwidth or args.bandwidth

    work = workloads.sharegpt_like(args.num_prompts, 128_256, max_len=args.max_len)
    t0 = time.perf_counter()
    log, scheduler = simulate(work, args)
    took = time.perf_counter() - t0
    end = log[-1].launched + step_floor_s(log[-1:], args.model, args.bandwidth, args.matmul_rate, True)
    outs = sum(work.output_lens)
    print(f"{work.description}; policy {args.policy}, max running {args.max_running_requests}, chunked prefill "
          f"{args.chunked_prefill_size}, {args.num_pages} pages; simulated in {took:.1f} s")
    table = Table(("step kind", ">18"), ("steps", ">7"), ("floor s", "8.2f"), ("share", "6.1%"), ("ms/step", "8.2f"),
                  ("decode rows", ">12,"))
    print(table.header())
    for kind, steps, seconds, rows, *_ in timeline(log, end):
        print(table.row(kind, steps, seconds, seconds / end, seconds / steps * 1e3, rows))
    floor = workload_floor_s(work, args.model, args.bandwidth, args.matmul_rate)
    sizes = np.array([r.decodes + r.prefill_tokens for r in log], np.float64)
    print(f"steps {len(log)} ({sizes.mean():.0f} +- {sizes.std():.0f} tokens a step), preemptions "
          f"{scheduler.num_preemptions}; in-sequence floor of these steps (padded "
          f"to their buckets) {end:.2f} s = {outs / end:,.0f} out tok/s; any schedule {floor:.2f} s = "
          f"{outs / floor:,.0f} out tok/s")
    if args.layer_costs is not None:
        priced, even = measured_s(log, args), even_steps_s(work, args)
        print(f"priced with the measured layer costs, K/V at {args.attention_bandwidth / 1e12:.2f} TB/s and "
              f"{args.sampling_ms} ms of sampling a step: these steps {priced:.2f} s = {outs / priced:,.0f} out "
              f"tok/s; even steps {even:.2f} s = {outs / even:,.0f} out tok/s")


if __name__ == "__main__":
    main()
