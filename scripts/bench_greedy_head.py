"""The greedy LM head alone (kernels/gpu/greedy_head.py) at decode-sized row counts, against the head's read.

A synchronised timing read ~0.47 ms for the greedy head of a batch-1 Llama-3-8B step on an H200, against 0.25 ms
for reading the 1.05 GB head at the copy bandwidth; queued, as the engine runs it, it takes 0.286 ms at 64 rows
(docs/benchmark-history.md, "the greedy head re-measured"). The tiles in `greedy_head.tiles_for` were timed on an
H100 at 64 rows and up. This times, for each row count, XLA's path (float32 logits, then argmax and
logsumexp), the head's matmul alone (bf16 out), and the fused kernel with `tiles_for`'s tiles and over a sweep
of tiles (first block sizes at 4 warps / 3 stages, then warps x stages for the best few), each as a share of
the copy bandwidth. Every fused variant's tokens are checked against XLA's.

    python scripts/bench_greedy_head.py --rows 1,64
"""

from __future__ import annotations

import argparse
import functools
import itertools

import jax
import jax.numpy as jnp
from bench_common import copy_bandwidth, queued_call_s, ratio_to_floor, run_header

from sgjax.kernels.gpu import greedy_head


def xla_greedy(hidden, head):
    logits = jnp.einsum("rh,vh->rv", hidden, head, preferred_element_type=jnp.float32)
    token = jnp.argmax(logits, axis=-1)
    return token, jnp.take_along_axis(logits, token[:, None], 1)[:, 0] - jax.nn.logsumexp(logits, axis=-1)


def time_fused(hidden, head, reference, tiles: dict) -> float | None:
    """Seconds a call with these tiles, or None where they do not compile or give other tokens."""
    fn = jax.jit(functools.partial(greedy_head.greedy_from_head, **tiles))
    try:
        tokens, _ = fn(hidden, head)
        if not bool(jnp.all(tokens == reference)):
            print(f"  tiles {tiles}: other tokens than XLA's", flush=True)
            return None
        return queued_call_s(fn, hidden, head)
    except Exception as e:  # shared memory exceeded, Triton lowering limits
        print(f"  tiles {tiles}: {type(e).__name__}: {str(e).splitlines()[0][:120]}", flush=True)
        return None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,64")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--block-m", default="16,32,64")
    p.add_argument("--block-v", default="64,128,256")
    p.add_argument("--block-k", default="64,128,256")
    p.add_argument("--finalists", type=int, default=2, help="block sizes swept again over warps x stages")
    args = p.parse_args()
    print(run_header())
    bandwidth = copy_bandwidth()
    head = jax.random.normal(jax.random.key(0), (args.vocab, args.hidden), jnp.bfloat16)
    floor = head.nbytes / bandwidth
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, head {head.nbytes / 1e9:.2f} GB: floor {floor * 1e3:.3f} ms",
          flush=True)
    matmul = jax.jit(lambda h, w: jnp.einsum("rh,vh->rv", h, w))
    summary = []
    for rows in (int(r) for r in args.rows.split(",")):
        hidden = jax.random.normal(jax.random.key(rows), (rows, args.hidden), jnp.bfloat16)
        reference, _ = jax.jit(xla_greedy)(hidden, head)
        base = {"xla greedy": queued_call_s(jax.jit(xla_greedy), hidden, head),
                "matmul alone": queued_call_s(matmul, hidden, head)}
        default = greedy_head.tiles_for(rows, args.vocab, args.hidden)
        base["fused, tiles_for"] = time_fused(hidden, head, reference, default)
        sweep = {}
        # Row blocks smaller than the rows read the head once per block: only 64 is kept below the rows.
        block_ms = [bm for bm in map(int, args.block_m.split(",")) if bm >= rows or bm == 64]
        for bm, bv, bk in itertools.product(block_ms, *(map(int, s.split(",")) for s in (args.block_v, args.block_k))):
            tiles = dict(block_m=bm, block_v=bv, block_k=bk, num_warps=4, num_stages=3)
            sweep[tuple(tiles.items())] = time_fused(hidden, head, reference, tiles)
        ranked = sorted((t, k) for k, t in sweep.items() if t)
        for _, key in ranked[:args.finalists]:
            for warps, stages in itertools.product((4, 8), (2, 3, 4, 6)):
                tiles = dict(key) | dict(num_warps=warps, num_stages=stages)
                if tuple(tiles.items()) not in sweep:
                    sweep[tuple(tiles.items())] = time_fused(hidden, head, reference, tiles)
        ranked = sorted((t, k) for k, t in sweep.items() if t)
        print(f"\nrows {rows}: tiles_for {default}")
        for name, t in base.items():
            print(f"  {name:<18} {t * 1e3:8.3f} ms  {ratio_to_floor(floor, t):6.1%} of copy" if t
                  else f"  {name:<18} failed")
        for t, key in ranked[:8]:
            print(f"  fused {dict(key)}  {t * 1e3:.3f} ms  {ratio_to_floor(floor, t):6.1%}")
        summary.append((rows, base, ranked[0] if ranked else None))
    print("\nrows | xla greedy ms | matmul alone ms | fused tiles_for ms | best fused ms (of copy) | best tiles")
    for rows, base, best in summary:
        cells = [f"{base[k] * 1e3:.3f}" if base[k] else "-" for k in base]
        best_cell = f"{best[0] * 1e3:.3f} ({ratio_to_floor(floor, best[0]):.1%}) | {dict(best[1])}" if best else "- | -"
        print(f"{rows} | " + " | ".join(cells) + f" | {best_cell}")


if __name__ == "__main__":
    main()
