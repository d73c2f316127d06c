"""Where an engine step's time goes, without a profiler: each of the engine's compiled programs timed alone.

Builds the Engine on dummy weights of a real shape, then drives its ModelRunner directly: decode
batches of B sequences at context L through the forward pass and through every sampling variant,
the device synchronised after each call (median of --repeat, bench_common.synced_call_s), and the
host-side `prepare` of the same batch. Printed against the decode floor (weight bytes + KV bytes
read / copy bandwidth measured in the same run). bench_offline.py's ms/step and "dev wait" then
split a real run into device and host time. (A jax.profiler trace of the running engine failed
with CUDA launch errors: see profile_engine.py.)

    python scripts/profile_step.py --model llama-3-8b --batch-sizes 1,64,128,256 --context 512
    python scripts/profile_step.py --batch-sizes 190,300 --context 400 --chunk 194:129 --prefill 0 \
        --max-running-requests 512 [--kv-cache-dtype fp8_e4m3] [--longest 2000]   # step_token_target's mixed steps
    python scripts/profile_step.py --batch-sizes 64 --prefill 0 --max-running-requests 512 \
        --sampling-rows 64,128,192,256,320,384,448,512   # greedy sampling's cost by padded rows
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import tempfile
import time

import jax
from bench_common import Table, copy_bandwidth, matmul_params, ratio_to_floor, run_header, synced_call_s
from profile_engine import load_trace, summarise

from sgjax.config import add_engine_arguments, engine_args_from_namespace
from sgjax.constrained.bitmask import allow_all
from sgjax.engine import Engine
from sgjax.executor import programs
from sgjax.executor.batch import SeqChunk
from sgjax.executor.sampler import SamplerFeatures, SamplingBatch
from sgjax.engine.sampling_params import SamplingParams
from sgjax.models.presets import PRESETS, write_preset


def queued(runner, prepared, calls: int = 30) -> tuple[float, float]:
    """`calls` steps (forward + greedy sampling) enqueued without waiting, as the engine does:
    (host ms per step spent enqueueing, wall ms per step until all are done). If enqueueing takes as
    long as the device, the calls block on something and host work cannot overlap the device."""
    jax.block_until_ready(runner.launch(prepared).hidden)
    t0 = time.perf_counter()
    for _ in range(calls):
        handle = runner.launch(prepared)
        runner.sample(handle)
    t1 = time.perf_counter()
    jax.block_until_ready(handle.device_outputs)
    t2 = time.perf_counter()
    return (t1 - t0) / calls * 1e3, (t2 - t0) / calls * 1e3


def in_a_loop(runner, prepared, calls: int = 30) -> tuple[float, float]:
    """`calls` steps as the engine's loop runs them: launch step N+1 (forward + sampling), then wait for
    step N's results: (wall ms per step, ms per step waiting for results). Equal to `queued`'s wall time
    when the host keeps the device busy."""
    previous = runner.launch(prepared)
    runner.sample(previous)
    runner.collect(previous)
    waited, t0 = 0.0, time.perf_counter()
    for _ in range(calls):
        handle = runner.launch(prepared)
        runner.sample(handle)
        t = time.perf_counter()
        runner.collect(previous)
        waited += time.perf_counter() - t
        previous = handle
    runner.collect(previous)
    return (time.perf_counter() - t0) / calls * 1e3, waited / calls * 1e3


def on_device(prepared):
    """The same step with its packed host arrays already on the device (no transfers in the call)."""
    return dataclasses.replace(prepared, ints=jax.device_put(prepared.ints), floats=jax.device_put(prepared.floats))


def trace_forward(runner, prepared, calls: int = 5) -> tuple[str, float]:
    """A jax.profiler trace of `calls` forward passes queued back to back: (trace folder, window in us)."""
    folder = tempfile.mkdtemp()
    jax.profiler.start_trace(folder, create_perfetto_trace=True)
    t0 = time.perf_counter()
    for _ in range(calls):
        hidden = runner.launch(prepared).hidden
    jax.block_until_ready(hidden)
    window = (time.perf_counter() - t0) * 1e6
    jax.profiler.stop_trace()
    return folder, window


def sampling_curve(runner, softcap: float | None, prepared, rows: list[int], repeat: int) -> None:
    """Greedy sampling compiled for each padded row count, timed on a launched step's hidden rows: what a
    sampling row bucket costs. Through XLA (the LM head's float32 logits, then logsumexp and argmax) and,
    where the runner has the kernel, the fused greedy head (kernels/gpu/greedy_head.py). "sync": the
    device synchronised after each call (includes the dispatch); "queued": `repeat` calls back to back."""
    handle = runner.launch(prepared)
    head = runner.kernels.greedy_head
    paths = [("xla", None)] + ([("fused", head)] if head is not None else [])
    table = Table(("sampling rows", ">13"), *((f"{name} {how}", ">14.3f") for name, _ in paths
                                              for how in ("sync ms", "queued ms")))
    print(table.header())
    for n in rows:
        cells = []
        for _, kernel in paths:
            program = jax.jit(functools.partial(programs.sample_step, softcap, kernel, None, SamplerFeatures(), n,
                                                runner.sampling_layout))
            call = functools.partial(program, runner.head, handle.hidden, handle.ints, handle.floats,
                                     runner.penalties, None, None, None)
            cells.append(synced_call_s(call, repeat) * 1e3)
            cells.append(synced_call_s(lambda: [call() for _ in range(repeat)], 3) * 1e3 / repeat)
        print(table.row(n, *cells), flush=True)


def dump_hlo(text: str, folder: str) -> None:
    """Save a program's optimised HLO and print how its matmuls are lowered (cuBLAS custom calls or
    Triton GEMM fusions, which may carry fused producers such as a norm or a convert)."""
    with open(os.path.join(folder, "prefill.hlo"), "w") as f:
        f.write(text)
    kinds = {"cuBLAS": '"__cublas$gemm"', "cuBLASLt": '"__cublas$lt$matmul', "Triton GEMM fusion": '"__triton_gemm"',
             "cuDNN fusion": '"__cudnn$fusion"'}
    print("prefill HLO matmul kernels: " + ", ".join(f"{k} {text.count(v)}" for k, v in kinds.items()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--batch-sizes", default="1,64,128,256")
    p.add_argument("--context", type=int, default=512, help="cached tokens of each decoding sequence")
    p.add_argument("--prefill", type=int, default=1024, help="also time one prefill step of this many tokens")
    p.add_argument("--prefill-prompts", type=int, default=1,
                   help="split the prefill step's tokens into this many prompts (ShareGPT's steps: ~45 of ~200)")
    add_engine_arguments(p, only=("context_length", "mem_fraction_static", "kv_cache_dtype"),
                         defaults={"context_length": 2048, "mem_fraction_static": 0.8})
    p.add_argument("--repeat", type=int, default=20)
    p.add_argument("--chunk", default=None, metavar="NEW:CACHED",
                   help="add a prompt chunk of NEW tokens after CACHED ones to every decode batch (the mixed "
                        "steps step_token_target makes; the batch size counts its decodes)")
    # Not EngineArgs' flag: its default here is derived from the batch sizes, which the engine's field cannot say.
    p.add_argument("--max-running-requests", type=int, default=0,
                   help="the engine's (its sequence rows and buckets); default: the largest batch (+1 with --chunk)")
    p.add_argument("--longest", type=int, default=0, metavar="CTX",
                   help="give the first decoding sequence CTX cached tokens (the long row a mixed step carries)")
    p.add_argument("--trace", action="store_true", help="also trace 5 forward passes per batch size with "
                   "jax.profiler and print the GPU time by kernel")
    p.add_argument("--top", type=int, default=30, help="with --trace: kernels to list by GPU time")
    p.add_argument("--timeline", action="store_true", help="with --trace: also list one layer's kernels in order, "
                   "with the GPU idle between them")
    p.add_argument("--sampling-rows", default=None, metavar="R,R,...",
                   help="also time greedy sampling compiled for each of these padded row counts")
    p.add_argument("--dump-hlo", default=None, metavar="DIR",
                   help="write the prefill step's optimised HLO to DIR/prefill.hlo and count its matmul kernels")
    args = p.parse_args()
    print(run_header())

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    chunk_new, chunk_cached = (int(x) for x in args.chunk.split(":")) if args.chunk else (0, 0)
    max_running = args.max_running_requests or max(sizes) + (chunk_new > 0)
    folder = write_preset(args.model, tempfile.mkdtemp())
    engine = Engine(args=engine_args_from_namespace(
        args, model_path=folder, load_format="dummy", max_running_requests=max_running, min_token_bucket=16,
        context_length=max(args.context_length, args.prefill + 16, chunk_new + chunk_cached + 16),
        chunked_prefill_size=max(args.prefill, chunk_new)))
    runner, ps = engine.runner, engine.args.page_size
    weight_bytes = sum(x.nbytes for x in runner.weights)
    bandwidth = copy_bandwidth()
    vocab = engine.loaded.config.vocab_size
    print(f"{args.model}: weights {weight_bytes / 1e9:.2f} GB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, max_running_requests {max_running}, KV cache "
          f"{args.kv_cache_dtype}" + (f", each batch + a {chunk_new}-token chunk after {chunk_cached}"
                                      if chunk_new else ""))
    variants = {"greedy": (SamplingParams(temperature=0), None),
                "temperature": (SamplingParams(temperature=0.8), None),
                "top_p + penalty": (SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.1), None),
                "top logprobs": (SamplingParams(temperature=0, top_logprobs_num=5), None),
                "grammar mask": (SamplingParams(temperature=0), allow_all(max_running, vocab))}
    pages_each = -(-(args.context + 1) // ps)
    table = Table(("batch", ">5"), ("prepare ms", ">10.2f"), ("forward ms", ">10.2f"), ("floor ms", ">9.2f"),
                  ("floor/fwd", ">9.1%"), *((f"{name} ms", ">20.2f") for name in variants))
    print(table.header())
    pool_pages = runner.pool.config.num_pages
    chunk_pages = -(-(chunk_new + chunk_cached) // ps)
    long_pages = -(-(args.longest + 1) // ps) if args.longest else 0
    if max(sizes) * pages_each + chunk_pages + long_pages >= pool_pages:
        raise SystemExit(f"batch {max(sizes)} at context {args.context} needs {max(sizes) * pages_each} KV pages; "
                         f"the pool has {pool_pages - 1}: lower --context or the batch size")
    for b in sizes:
        chunks = [SeqChunk([1], args.context, list(range(1 + i * pages_each, 1 + (i + 1) * pages_each)))
                  for i in range(b)]
        if chunk_new:
            first = 1 + b * pages_each
            chunks.append(SeqChunk([1] * chunk_new, chunk_cached, list(range(first, first + chunk_pages))))
        if args.longest:
            first = 1 + b * pages_each + chunk_pages
            chunks[0] = SeqChunk([1], args.longest, list(range(first, first + long_pages)))
        kv_bytes = (b * (args.context + 1) + (args.longest - args.context if args.longest else 0) + chunk_new
                    + chunk_cached) * engine.runner.pool.config.bytes_per_page // ps
        floor = (weight_bytes + kv_bytes) / bandwidth * 1e3

        def sampling_for(params: SamplingParams) -> SamplingBatch:
            n = len(chunks)
            return SamplingBatch.build([params] * n, [0] * n, [0] * n, list(range(n)), [1] * n,
                                       max_running, runner.spare_slot)

        greedy = sampling_for(SamplingParams(temperature=0))
        # host work alone: waiting on its result would count the transfers it starts
        prepare_ms = synced_call_s(lambda: runner.prepare(chunks, greedy, SamplerFeatures()), args.repeat,
                                   sync=False) * 1e3
        prepared = runner.prepare(chunks, greedy, SamplerFeatures())
        forward_ms = synced_call_s(lambda: runner.launch(prepared).hidden, args.repeat) * 1e3
        row = [b, prepare_ms, forward_ms, floor, ratio_to_floor(floor, forward_ms)]
        for params, mask in variants.values():
            # A step with these parameters, launched once: its sampling is then timed alone.
            handle = runner.launch(runner.prepare(chunks, sampling_for(params), SamplerFeatures()))
            _, sampler = runner.sampler_for(SamplerFeatures.of([params], masked=mask is not None), b)
            row.append(synced_call_s(lambda: sampler(
                runner.head, handle.hidden, handle.ints, handle.floats, runner.penalties, *runner.mask_args(mask)),
                args.repeat) * 1e3)
        print(table.row(*row), flush=True)
        host, wall = queued(runner, prepared)
        host_dev, wall_dev = queued(runner, on_device(prepared))
        loop_wall, loop_wait = in_a_loop(runner, prepared)
        print(f"      queued steps: enqueue {host:.2f} ms / step {wall:.2f} ms; with inputs already on the device "
              f"{host_dev:.2f} / {wall_dev:.2f} ms; as the engine's loop runs them {loop_wall:.2f} ms "
              f"(waiting for results {loop_wait:.2f})", flush=True)
        if args.trace:  # summarised at once, so that a later batch's failure does not lose it
            folder, window = trace_forward(runner, prepared)
            print(f"\n--- forward pass at batch {b}, 5 calls traced ---")
            summarise(load_trace(folder), window, top=args.top, timeline=args.timeline)
            print(flush=True)
    if args.sampling_rows:
        sampling_curve(runner, engine.loaded.config.final_logit_softcap, prepared,
                       [int(r) for r in args.sampling_rows.split(",")], args.repeat)
    if args.prefill:
        n = args.prefill_prompts
        if not 1 <= n <= max_running:
            raise SystemExit(f"--prefill-prompts must be 1..{max_running} (the step's rows)")
        lens = [args.prefill // n + (i < args.prefill % n) for i in range(n)]
        chunks, first_page = [], 1
        for length in lens:
            pages = -(-length // ps)
            chunks.append(SeqChunk(list(range(length)), 0, list(range(first_page, first_page + pages))))
            first_page += pages
        sampling = SamplingBatch.build([SamplingParams(temperature=0)] * n, [0] * n, [0] * n, list(range(n)), lens,
                                       max_running, runner.spare_slot)
        prepared = runner.prepare(chunks, sampling, SamplerFeatures())
        ms = synced_call_s(lambda: runner.launch(prepared).hidden, args.repeat) * 1e3
        if args.dump_hlo:
            dump_hlo(runner.compiled[prepared.program].as_text(), args.dump_hlo)
        params = matmul_params(runner.weights, vocab)
        print(f"prefill {args.prefill} tokens in {n} prompts: forward {ms:.2f} ms, "
              f"{2 * params * args.prefill / ms / 1e9:.0f} TFLOP/s of layer matmuls ({params / 1e9:.2f}B parameters)")
        if args.trace:
            folder, window = trace_forward(runner, prepared)
            print("\n--- prefill forward pass, 5 calls traced ---")
            summarise(load_trace(folder), window, top=args.top, timeline=args.timeline)
    engine.shutdown()


if __name__ == "__main__":
    main()
