"""Would a batch-1 projection run faster if its weight were read into L2 just before it?

A batch-1 decode step leaves HBM idle while latency-bound kernels run (attention, norms: ~0.8 ms a step of
Llama-3-8B on an H200; docs/benchmark-history.md, "where a batch-1 step goes"). The o projection's weight
(32 MB) fits in an H100/H200's 50 MB L2, so programs added to the attention kernel could read it there first.
This measures the two things that idea needs, over a stack of distinct weights (none in L2 from the call before):
- the projection (one row against a [N, K] weight, through XLA) with the weight cold, and right after a
  Pallas kernel read the whole weight (`touch`, loads marked evict_last): the difference is the most
  such a prefetch could save;
- how fast `touch` itself reads, which bounds how much of it attention's ~10 us could hide.

    python scripts/bench_warm_weight.py
    python scripts/bench_warm_weight.py --shape 6144x4096 --programs 128,256
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from bench_common import Table, queued_call_s, run_header

COLUMNS = 1024  # the weight is read as rows of this many elements
TILE_ROWS = 16  # rows a program loads at once


def _touch_kernel(w_ref, out_ref, *, rows: int, policy: str):
    """Reads this program's `rows` rows of the weight; their sum is written so no load is dead code."""
    first = pl.program_id(0) * rows

    def body(j, acc):
        tile = plgpu.load(w_ref.at[pl.ds(first + j * TILE_ROWS, TILE_ROWS), :], eviction_policy=policy)
        return acc + tile.astype(jnp.float32)

    acc = lax.fori_loop(0, rows // TILE_ROWS, body, jnp.zeros((TILE_ROWS, COLUMNS), jnp.float32))
    out_ref[...] = jnp.full(out_ref.shape, acc.sum())


def touch(w: jax.Array, programs: int, fraction: float = 1.0, policy: str = "evict_last",
          interpret: bool = False) -> jax.Array:
    """Read the first `fraction` of w through L2 -> [programs, 16] float32 (each row its program's sum)."""
    flat = w.reshape(-1, COLUMNS)
    rows = int(flat.shape[0] * fraction) // programs
    if rows % TILE_ROWS:
        raise ValueError(f"{programs} programs would each read {rows} rows, not a multiple of {TILE_ROWS}")
    return pl.pallas_call(
        functools.partial(_touch_kernel, rows=rows, policy=policy), grid=(programs,),
        in_specs=[pl.BlockSpec(flat.shape, lambda p: (0, 0))],
        out_specs=pl.BlockSpec((1, 16), lambda p: (p, 0)),
        out_shape=jax.ShapeDtypeStruct((programs, 16), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
    )(flat)


def project(x, w):
    """x [1, K] @ w [N, K] -> [1, K], so products chain: for N > K its outputs folded K at a time (each is
    used, so XLA cannot skip part of the weight)."""
    y = jnp.einsum("ti,oi->to", x, w).astype(x.dtype)
    n, k = w.shape
    return y if n == k else jnp.pad(y, ((0, 0), (0, -n % k))).reshape(1, -1, k).sum(axis=1)


def chains(programs: int, fraction: float, policy: str):
    """(cold, warm, touch only): each a jitted chain through every weight of the stack."""
    def after(x, s):  # x, made to depend on the touch's result without changing it
        return x + (s[0, 0] * 0).astype(x.dtype)

    @jax.jit
    def cold(x, ws):
        for w in ws:
            x = project(x, w)
        return x

    @jax.jit
    def warm(x, ws):
        for w in ws:
            x = project(after(x, touch(w, programs, fraction, policy)), w)
        return x

    @jax.jit
    def touch_only(x, ws):
        for w in ws:
            x = after(x, touch(w, programs, fraction, policy))
        return x

    return cold, warm, touch_only


def us_per_weight(fn, x, ws, calls: int = 20, repeats: int = 5) -> float:
    """Best of `repeats` runs of `calls` queued calls, per weight of the stack."""
    return queued_call_s(fn, x, ws, calls=calls, rounds=repeats, summary=min) / len(ws) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="4096x4096", help="the weight, N x K (default: Llama-3-8B's o projection)")
    p.add_argument("--weights", type=int, default=32, help="distinct weights in the stack (a model's layers)")
    p.add_argument("--programs", default="64,128,256", help="programs of the touch kernel, one case each")
    p.add_argument("--fractions", default="1,0.5", help="parts of the weight touched, one case each")
    args = p.parse_args()
    print(run_header())

    n, k = (int(v) for v in args.shape.split("x"))
    key = jax.random.PRNGKey(0)
    ws = [jax.random.normal(jax.random.fold_in(key, i), (n, k), jnp.bfloat16) * 0.01 for i in range(args.weights)]
    x = jax.random.normal(key, (1, k), jnp.bfloat16)
    expected = float(ws[0].astype(jnp.float32).sum())
    got = float(touch(ws[0], 128)[:, 0].sum())
    if abs(got - expected) > 1e-2 * max(1.0, abs(expected)):
        raise SystemExit(f"touch read {got}, the weight sums to {expected}")
    nbytes = n * k * 2
    print(f"weight {n}x{k} bf16 ({nbytes / 1e6:.1f} MB), {args.weights} distinct; us per weight")
    cold = us_per_weight(chains(128, 1.0, "evict_last")[0], x, ws)
    print(f"projection, weight cold: {cold:.2f} us ({nbytes / cold / 1e6:.2f} TB/s)")
    table = Table(("programs", ">8"), ("fraction", ">8"), ("policy", ">12"), ("touch", ">7.2f"),
                  ("touch TB/s", ">10.2f"), ("proj after", ">10.2f"), ("saved", ">6.2f"))
    print(table.header())
    cases = [(int(pr), float(f), "evict_last") for f in args.fractions.split(",") for pr in args.programs.split(",")]
    cases.append((128, 1.0, "evict_normal"))
    for programs, fraction, policy in cases:
        _, warm, touch_only = chains(programs, fraction, policy)
        both, alone = us_per_weight(warm, x, ws), us_per_weight(touch_only, x, ws)
        print(table.row(programs, fraction, policy, alone, nbytes * fraction / alone / 1e6, both - alone,
                        cold - (both - alone)))


if __name__ == "__main__":
    main()
