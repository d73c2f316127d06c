"""The model's matmuls alone, at the token counts the engine runs, against a square matmul's rate.

Prefill steps ran their layer matmuls at ~80% of the rate an 8192^3 matmul reaches (docs/benchmark-history.md,
"where prefill goes"). This times each projection of a Llama-shaped layer as the model computes it (weights in
Hugging Face's [out, in] layout, the fused q/k/v and gate/up stacks), the same with [in, out] weights,
and the whole gated MLP (gate/up, SiLU x up, down), each jitted and queued back to back, so it shows
whether the loss is in the matmul kernels XLA picks for these shapes or around them. With --sweep it
runs again under other XLA GEMM flags (each in a fresh process: XLA reads its flags once).

With --skinny it times the decode-sized products (a few rows against each whole weight, [N, K] as the model
keeps it) through XLA and through sgjax/kernels/gpu/skinny_matmul.py at several tilings, each against the
weight's bytes at the measured copy bandwidth (distinct weights a call, so none is served from L2).

With --layer it times instead everything of a layer but its attention (q/k/v, o, the residual adds and
norms, gate/up, SiLU x up, down) in a stack of distinct layers, at each token count: the cost curve a step
of the engine pays besides attention and sampling. Its last line is the `--layer-costs` argument of
simulate_schedule.py, which prices a schedule's steps with it.

    python scripts/bench_gemm.py --tokens 256,768,8192 --sweep
    python scripts/bench_gemm.py --skinny --tokens 1,16
    python scripts/bench_gemm.py --layer --tokens 64,128,192,256,320,384,512,640,768,1024,2048,8192
"""

from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Table, copy_bandwidth, matmul_rate, queued_call_s, run_header

from sgjax.kernels.gpu import skinny_matmul as skinny

SWEEP = {  # name -> extra XLA_FLAGS
    "default": "",
    "no Triton GEMM": "--xla_gpu_enable_triton_gemm=false",
    "cuBLASLt": "--xla_gpu_enable_cublaslt=true",
}


def shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """name -> weight shape in the model's layout (contraction last): Llama's per-layer projections."""
    group = heads // kv_heads
    return {"q/k/v": (kv_heads, group + 2, head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate/up": (2, intermediate, hidden), "down": (hidden, intermediate)}


def rms_norm(h, eps: float = 1e-5):
    h32 = h.astype(jnp.float32)
    return (h32 * jax.lax.rsqrt(jnp.mean(h32 * h32, -1, keepdims=True) + eps)).astype(h.dtype)


def layers_without_attention(x, residual, layers, heads: int, head_dim: int):
    """A stack of Llama layers in the model's weight layouts, the attention replaced by the query itself
    (the o projection's input has the attention output's shape), so the stack costs what a step's layers
    cost besides attention."""
    for qkv_w, o_w, gate_up_w, down_w in layers:
        qkv = jnp.tensordot(x, qkv_w, axes=[[1], [3]])  # [T, kv_heads, group + 2, head_dim]
        attention = qkv[:, :, :-2].reshape(x.shape[0], heads * head_dim)
        residual = residual + jnp.tensordot(attention, o_w, axes=[[1], [1]])
        y = jnp.tensordot(rms_norm(residual), gate_up_w, axes=[[1], [2]])  # [T, 2, I]
        residual = residual + jnp.einsum("ti,oi->to", jax.nn.silu(y[:, 0]) * y[:, 1], down_w)
        x = rms_norm(residual)
    return x, residual


def run_layers(args) -> None:
    """us a layer for the stack above at each token count."""
    table = shapes(args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim)
    keys = jax.random.split(jax.random.key(0), 4 * args.stack)
    layers = [tuple(jax.random.normal(keys[4 * i + j], shape, jnp.bfloat16) * 0.02
                    for j, shape in enumerate(table.values())) for i in range(args.stack)]
    params = sum(int(np.prod(shape)) for shape in table.values())
    rate = matmul_rate()
    step = jax.jit(functools.partial(layers_without_attention, heads=args.heads, head_dim=args.head_dim))
    print(f"square 8192^3 matmul {rate / 1e12:.0f} TFLOP/s; {args.stack} distinct layers a call")
    report = Table(("tokens", ">7"), ("us a layer", ">11.1f"), ("TFLOP/s", ">8.0f"), ("of square", ">9.1%"),
                   ("us a token", ">11.3f"))
    print(report.header())
    costs = []
    for t in args.tokens:
        x = jax.random.normal(jax.random.key(t), (t, args.hidden), jnp.bfloat16)
        us = queued_call_s(step, x, x, layers, calls=10, rounds=5) / args.stack * 1e6
        flops = 2 * params * t
        print(report.row(t, us, flops / us / 1e6, flops / us / 1e6 / (rate / 1e12), us / t))
        costs.append(f"{t}:{us:.1f}")
    print("--layer-costs " + ",".join(costs))


# The slabs tried first (block_n, block_k, split_k) at 4 warps and 4 stages, for each weight and padded row
# count, those giving 64-2112 programs (1/2-16 per multiprocessor); then the best slab at each launch shape.
SKINNY_SLABS = [(bn, bk, split) for bn in (16, 32, 64, 128) for bk in (64, 128, 256, 512)
                for split in (1, 2, 4, 7, 8, 14, 16)]
SKINNY_LAUNCH = [(warps, stages) for warps in (2, 4, 8) for stages in (2, 3, 4, 6)]


def sweep_skinny(x, n: int, k: int, timed) -> tuple[float, dict | None]:
    """(seconds, tiles) of the fastest tiling of skinny_matmul for x @ w.T found by a two-stage sweep."""
    def try_tiles(tiles):
        try:
            return timed(functools.partial(skinny.skinny_matmul, **tiles))
        except Exception as e:  # a tiling Triton rejects (registers, shared memory): skip it, say so
            print(f"    tiles {tiles} failed: {str(e).splitlines()[0][:100]}")
            return float("inf")

    best = (float("inf"), None)
    for bn, bk, split in SKINNY_SLABS:
        if skinny.supports(x.shape[0], n, k, bn, bk, split) and 64 <= n // bn * split <= 2112:
            tiles = dict(block_n=bn, block_k=bk, split_k=split, num_warps=4, num_stages=4)
            best = min(best, (try_tiles(tiles), tiles), key=lambda b: b[0])
    if best[1] is None:
        return best
    for warps, stages in SKINNY_LAUNCH:
        tiles = {**best[1], "num_warps": warps, "num_stages": stages}
        if tiles != best[1]:
            best = min(best, (try_tiles(tiles), tiles), key=lambda b: b[0])
    return best


def run_skinny(args) -> None:
    """Decode-sized products x [T, K] @ w[N, K].T: XLA against the Pallas kernel's tilings, in % of the
    weight's bytes at the copy bandwidth. The kernel pads rows to 16, so its sweep runs once per padded count."""
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {args.stack} distinct weights a call")
    report = Table(("tokens", ">7"), ("matmul", ">8"), ("N x K", ">13"), ("XLA us", ">8.1f"), ("of copy", ">8.1%"),
                   ("tiles_for us", ">12.1f"), ("of copy", ">8.1%"), ("best us", ">8.1f"), ("of copy", ">8.1%"),
                   ("best tiles", ""))
    table = {"q/k/v": ((args.heads + 2 * args.kv_heads) * args.head_dim, args.hidden),
             "o": (args.hidden, args.heads * args.head_dim), "gate/up": (2 * args.intermediate, args.hidden),
             "down": (args.hidden, args.intermediate), "lm head": (args.vocab, args.hidden)}
    rows = sorted({skinny.padded_rows(t) for t in args.tokens})
    results, tuned, best_by_shape = [], {}, {}
    for name, (n, k) in table.items():
        if args.matmuls and name not in args.matmuls.split(","):
            continue
        stack = args.stack if name != "lm head" else 2
        weights = [jax.random.normal(jax.random.key(i), (n, k), jnp.bfloat16) for i in range(stack)]

        def timer(x):
            def timed(matmul):
                fn = jax.jit(lambda a, ws: [matmul(a, w) for w in ws])
                return queued_call_s(fn, x, weights, calls=10, rounds=3) / stack
            return timed

        best_at = best_by_shape[(n, k)] = {}
        for r in rows:
            x = jax.random.normal(jax.random.key(r), (r, k), jnp.bfloat16)
            best_at[r] = sweep_skinny(x, n, k, timer(x))
        for t in args.tokens:
            timed = timer(jax.random.normal(jax.random.key(t), (t, k), jnp.bfloat16))
            xla = timed(lambda a, w: jnp.einsum("ti,oi->to", a, w))
            chosen = skinny.tiles_for(t, n, k)  # what the model would use (layers.SKINNY_MATMUL)
            model_s = timed(functools.partial(skinny.skinny_matmul, **chosen)) if chosen else float("inf")
            best_s, best_tiles = best_at[skinny.padded_rows(t)]
            if best_s < xla:
                tuned.setdefault((n, k), []).append(t)
            ideal = n * k * 2 / bandwidth
            results.append(report.row(t, name, f"{n}x{k}", xla * 1e6, ideal / xla, model_s * 1e6, ideal / model_s,
                                      best_s * 1e6, ideal / best_s, str(best_tiles)))
            print(results[-1], flush=True)
    print(report.header())
    print("\n".join(results))
    print("faster than XLA at every token count asked (TUNED_TILES candidates): " + "; ".join(
        f"{shape}: {[tiles for _, tiles in best_at_shape.values()]}" for shape, best_at_shape in best_by_shape.items()
        if len(tuned.get(shape, [])) == len(args.tokens)))


def run(args) -> None:
    key = jax.random.key(0)
    rate = matmul_rate()
    print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"square 8192^3 matmul: {rate / 1e12:.0f} TFLOP/s")
    report = Table(("tokens", ">7"), ("matmul", ">8"), ("layout", ">9"), ("us", ">9.1f"), ("TFLOP/s", ">8.0f"),
                   ("of square", ">9.1%"))
    print(report.header())
    table = shapes(args.hidden, args.intermediate, args.heads, args.kv_heads, args.head_dim)
    for t in args.tokens:
        x = jax.random.normal(key, (t, args.hidden), jnp.bfloat16)
        for name, shape in table.items():
            k = shape[-1]
            xin = jax.random.normal(key, (t, k), jnp.bfloat16)
            out_size = int(np.prod(shape[:-1]))
            flops = 2 * t * k * out_size
            w = jax.random.normal(key, shape, jnp.bfloat16)
            model = jax.jit(lambda a, b: jnp.tensordot(a, b, axes=[[1], [b.ndim - 1]]))
            w_t = jnp.asarray(w.reshape(out_size, k).T)
            plain = jax.jit(lambda a, b: a @ b)
            for layout, fn, weight in (("[out,in]", model, w), ("[in,out]", plain, w_t)):
                s = queued_call_s(fn, xin, weight, calls=20, rounds=3)
                print(report.row(t, name, layout, s * 1e6, flops / s / 1e12, flops / s / rate))
        gate_up = jax.random.normal(key, table["gate/up"], jnp.bfloat16)
        down = jax.random.normal(key, table["down"], jnp.bfloat16)

        def mlp(a, gu, d):
            y = jnp.tensordot(a, gu, axes=[[1], [2]])  # [T, 2, I]
            return jnp.einsum("ti,oi->to", jax.nn.silu(y[:, 0]) * y[:, 1], d)

        flops = 2 * t * args.hidden * args.intermediate * 3
        s = queued_call_s(jax.jit(mlp), x, gate_up, down, calls=20, rounds=3)
        print(report.row(t, "MLP", "model", s * 1e6, flops / s / 1e12, flops / s / rate))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="256,768,8192", help="token counts (rows of the activations)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=128256, help="--skinny: the LM head's rows")
    p.add_argument("--skinny", action="store_true", help="decode-sized products: XLA against kernels/gpu/skinny_matmul")
    p.add_argument("--matmuls", default="", help="--skinny: only these, comma-separated (q/k/v,o,gate/up,down,lm head)")
    p.add_argument("--layer", action="store_true", help="time a layer without its attention instead (see above)")
    p.add_argument("--stack", type=int, default=8, help="--layer: distinct layers a call (weights not in L2)")
    p.add_argument("--sweep", action="store_true", help="run again under each XLA GEMM flag set: " + ", ".join(SWEEP))
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not args.sweep:
        print(run_header())
        (run_skinny if args.skinny else run_layers if args.layer else run)(args)
        return
    argv = [a for a in sys.argv[1:] if a != "--sweep"]
    for name, flags in SWEEP.items():
        print(f"\n=== {name}", flush=True)
        env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip())
        subprocess.run([sys.executable, __file__, *argv], env=env, check=False)


if __name__ == "__main__":
    main()
