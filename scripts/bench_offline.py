"""Offline throughput of the Engine on random prompts of fixed length (a first version; issue 9 adds
the ShareGPT-like and shared-prefix workloads and the radix on/off comparison).

    python scripts/bench_offline.py --model llama-3-8b --num-prompts 256 --input-len 256 --output-len 128
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from sgjax.engine import Engine
from sgjax.models.presets import PRESETS, write_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=256)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-running-requests", type=int, default=64)
    p.add_argument("--chunked-prefill-size", type=int, default=256)
    p.add_argument("--context-length", type=int, default=2048)
    p.add_argument("--mem-fraction-static", type=float, default=0.6)
    p.add_argument("--min-token-bucket", type=int, default=64)
    p.add_argument("--mesh", default="1x1")
    p.add_argument("--disable-overlap-schedule", action="store_true")
    p.add_argument("--attention-backend", default="pallas", choices=["pallas", "reference"])
    args = p.parse_args()

    t0 = time.perf_counter()
    engine = Engine(write_preset(args.model, tempfile.mkdtemp()), load_format="dummy", mesh=args.mesh,
                    max_running_requests=args.max_running_requests, chunked_prefill_size=args.chunked_prefill_size,
                    context_length=args.context_length, mem_fraction_static=args.mem_fraction_static,
                    min_token_bucket=args.min_token_bucket, disable_overlap_schedule=args.disable_overlap_schedule,
                    attention_backend=args.attention_backend)
    startup = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.loaded.config.vocab_size, args.input_len).tolist()
               for _ in range(args.num_prompts)]
    params = {"temperature": 0, "max_new_tokens": args.output_len, "ignore_eos": True}
    engine.generate(input_ids=prompts[:2], sampling_params={**params, "max_new_tokens": 4})  # warm-up
    steps = engine.num_steps
    t0 = time.perf_counter()
    results = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - t0
    out_tokens = sum(r["meta_info"]["completion_tokens"] for r in results)
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, {args.model} (dummy), "
          f"attention {engine.attention_backend}, overlap {'off' if args.disable_overlap_schedule else 'on'}")
    print(f"start-up {startup:.1f} s ({len(engine.runner.buckets)} buckets), KV pool "
          f"{engine.allocator.num_usable} pages of {engine.args.page_size}")
    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out: {elapsed:.2f} s, "
          f"{out_tokens / elapsed:,.0f} output tok/s, {(out_tokens + args.num_prompts * args.input_len) / elapsed:,.0f}"
          f" total tok/s, {engine.num_steps - steps} steps, {engine.scheduler.num_preemptions} preemptions")
    engine.shutdown()


if __name__ == "__main__":
    main()
