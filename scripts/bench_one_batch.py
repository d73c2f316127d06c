"""Latency of one prefill and of decode steps at several batch sizes, against the HBM floor.

A first version (issue 9 extends it): static batches through sgjax.executor.greedy's jitted step with the
attention backend given (the reference backend gathers whole sequences, so it is far from the kernel
the engine will use). Decode floor = (weight bytes + KV bytes read per step) / HBM bandwidth, the
bandwidth measured by a device-to-device copy in the same run.

    python scripts/bench_one_batch.py --model llama-3-8b --batch-sizes 1,16,64 --input-len 1024

With --engine, decode is instead measured in the Engine as it serves: B requests of --input-len
prompt tokens decode --output-len tokens each, and a decode step's time is the median gap between
consecutive step launches while all B decode (the engine's own step log; forward pass and sampling
overlapped with the host's work, as in serving). This is the per-token latency a user sees.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np
from bench_common import (Table, copy_bandwidth, copy_bandwidth_one_call, matmul_params, ratio_to_floor, run_header,
                          synced_call_s)
from flax import nnx

from sgjax.cache.kv_pool import KVPool, KVPoolConfig
from sgjax.config import add_engine_arguments, engine_args_from_namespace, mesh_from_namespace
from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.executor.greedy import make_step
from sgjax.kernels import resolve_backend
from sgjax.kernels.gpu import ragged_paged_attention
from sgjax.platform.mesh import make_mesh
from sgjax.models.loader import load_model
from sgjax.models.presets import PRESETS, write_preset


def engine_decode(args, folder: str, sizes: list[int]) -> None:
    """Decode ms per step in the running Engine at each batch size, against the HBM floor."""
    from sgjax.engine import Engine

    ragged_paged_attention.DECODE_KV_SPLITS = args.decode_kv_splits
    n_in, n_out = args.input_len, args.output_len
    engine = Engine(args=engine_args_from_namespace(
        args, model_path=folder, load_format="dummy", max_running_requests=max(sizes),
        context_length=n_in + n_out + args.page_size, chunked_prefill_size=max(n_in, args.prefill_tokens)),
        kernel_options={"greedy_head": not args.no_fused_greedy_head, "filter_cut": not args.no_filter_cut_kernel})
    weight_bytes = sum(x.nbytes for x in engine.runner.weights)
    bytes_per_token = engine.runner.pool.config.bytes_per_page // args.page_size
    bandwidth = copy_bandwidth()
    print(f"{args.model} dummy weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s "
          f"({copy_bandwidth_one_call() / 1e12:.2f} by the older one-call measure)")
    sampling = {"temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    how = "greedy" if args.temperature == 0 else ", ".join(f"{k} {v}" for k, v in sampling.items())
    print(f"\nengine decode steps, {n_in}-token prompts, {n_out} tokens each ({how}; context {n_in}-{n_in + n_out})")
    table = Table(("batch", ">5"), ("step ms", ">8.2f"), ("HBM floor ms", ">12.2f"), ("floor/actual", ">12.1%"),
                  ("tokens/s", ">9.0f"), ("steps", ">6"), ("wait ms", ">8.2f"))
    print(table.header())
    rng = np.random.default_rng(0)
    for bs in sizes:
        prompts = [rng.integers(0, engine.loaded.config.vocab_size, n_in).tolist() for _ in range(bs)]
        engine.stats.step_log = []
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": n_out, "ignore_eos": True, **sampling})
        log = engine.stats.step_log
        steady = [(a, b) for a, b in zip(log, log[1:]) if a.prefill_tokens == 0 and a.decodes == bs and b.decodes == bs]
        if not steady:
            print(f"{bs:>5} no step decoded all {bs} requests without a prompt chunk beside them (the first "
                  f"finished before the last was prefilled): raise --prefill-tokens or --output-len")
            continue
        step_s = float(np.median([b.launched - a.launched for a, b in steady]))
        # how long the engine thread waited for a step's results (near 0: the host bounds the step)
        wait_s = float(np.median([a.waited for a, _ in steady]))
        kv_bytes = bs * (n_in + n_out // 2) * bytes_per_token  # mean context over the decode
        floor = (weight_bytes + kv_bytes) / bandwidth
        print(table.row(bs, step_s * 1e3, floor * 1e3, ratio_to_floor(floor, step_s), bs / step_s, len(steady),
                        wait_s * 1e3))
    engine.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", choices=sorted(PRESETS))
    p.add_argument("--batch-sizes", default="1,16,64")
    p.add_argument("--input-len", type=int, default=1024)
    add_engine_arguments(p, only=("page_size", "mesh", "attention_backend"))
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--engine", action="store_true", help="measure decode in the serving Engine instead")
    p.add_argument("--output-len", type=int, default=256, help="with --engine: tokens decoded per request")
    p.add_argument("--prefill-tokens", type=int, default=8192,
                   help="with --engine: prompt tokens a step may prefill (so every request runs before the first ends)")
    p.add_argument("--no-fused-greedy-head", action="store_true",
                   help="with --engine: greedy sampling through XLA's float32 logits, not the fused head kernel")
    p.add_argument("--temperature", type=float, default=0.0, help="with --engine: sampling temperature (0: greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="with --engine: nucleus filter of sampled rows")
    p.add_argument("--top-k", type=int, default=-1, help="with --engine: top-k filter of sampled rows")
    p.add_argument("--no-filter-cut-kernel", action="store_true",
                   help="with --engine: top-k / top-p cuts by sorting the vocabulary, not the filter-cut kernel")
    p.add_argument("--decode-kv-splits", type=int, default=ragged_paged_attention.DECODE_KV_SPLITS,
                   help="with --engine: context splits of small decode batches in the attention kernel")
    args = p.parse_args()
    print(run_header())

    folder = write_preset(args.model, tempfile.mkdtemp())
    if args.engine:
        engine_decode(args, folder, [int(b) for b in args.batch_sizes.split(",")])
        return
    t0 = time.perf_counter()
    loaded = load_model(folder, make_mesh(mesh_from_namespace(args)), load_format="dummy",
                        attention_backend=resolve_backend(args.attention_backend, args.page_size))
    jax.block_until_ready(jax.tree.leaves(loaded.model))
    load_s = time.perf_counter() - t0
    cfg = loaded.config
    graphdef, state = nnx.split(loaded.model)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    bandwidth = copy_bandwidth()
    step = make_step(graphdef)
    print(f"{args.model} dummy weights {weight_bytes / 1e9:.2f} GB loaded in {load_s:.1f} s, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s ({copy_bandwidth_one_call() / 1e12:.2f} by the older one-call measure)")

    ps, n_in = args.page_size, args.input_len
    rows = []
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        pages_each = -(-(n_in + 1) // ps)
        pool = KVPool(KVPoolConfig.for_model(cfg, 1 + bs * pages_each, ps), loaded.mesh)
        chunks = [SeqChunk(list(np.random.default_rng(b).integers(0, cfg.vocab_size, n_in)), 0,
                           list(range(1 + b * pages_each, 1 + (b + 1) * pages_each))) for b in range(bs)]
        prefill = make_batch(chunks[:1], ps)

        def run_prefill():
            logits, pool.caches = step(state, pool.caches, prefill.input_ids, prefill.positions, prefill.meta,
                                       prefill.last_token_index)
            return logits

        prefill_s = synced_call_s(run_prefill, args.repeat)
        decode = make_batch([SeqChunk([1], n_in, c.pages) for c in chunks], ps)

        def run_decode():
            logits, pool.caches = step(state, pool.caches, decode.input_ids, decode.positions, decode.meta,
                                       decode.last_token_index)
            return logits

        decode_s = synced_call_s(run_decode, args.repeat)
        kv_bytes = bs * (n_in + 1) * pool.config.bytes_per_page // ps
        floor = (weight_bytes + kv_bytes) / bandwidth
        flops = 2 * matmul_params(jax.tree.leaves(state), cfg.vocab_size) * n_in  # layer matmuls only
        rows.append((bs, prefill_s * 1e3, flops / prefill_s / 1e12, decode_s * 1e3, floor * 1e3,
                     ratio_to_floor(floor, decode_s), bs / decode_s))
        pool.caches = None  # free this batch's KV pool before the next is made

    print(f"\nprefill of {n_in} tokens (one sequence) and one decode step at context {n_in}, "
          f"attention backend {args.attention_backend}")
    table = Table(("batch", ">5"), ("prefill ms", ">10.2f"), ("prefill TFLOP/s", ">15.1f"), ("decode ms", ">9.2f"),
                  ("HBM floor ms", ">12.2f"), ("floor/actual", ">12.1%"), ("tokens/s", ">9.0f"))
    print(table.header())
    for r in rows:
        print(table.row(*r))


if __name__ == "__main__":
    main()
