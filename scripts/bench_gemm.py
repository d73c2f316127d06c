"""The model's matmuls alone, at the token counts the engine runs, against a square matmul's rate.

Prefill steps ran their layer matmuls at ~80% of the rate an 8192^3 matmul reaches (BENCHMARKS.md,
session 11). This times each projection of a Llama-shaped layer as the model computes it (weights in
Hugging Face's [out, in] layout, the fused q/k/v and gate/up stacks), the same with [in, out] weights,
and the whole gated MLP (gate/up, SiLU x up, down), each jitted and queued back to back, so it shows
whether the loss is in the matmul kernels XLA picks for these shapes or around them. With --sweep it
runs again under other XLA GEMM flags (each in a fresh process: XLA reads its flags once).

    python scripts/bench_gemm.py --tokens 256,768,8192 --sweep
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from bench_attention import matmul_rate, median_time

SWEEP = {  # name -> extra XLA_FLAGS
    "default": "",
    "no Triton GEMM": "--xla_gpu_enable_triton_gemm=false",
    "cuBLASLt": "--xla_gpu_enable_cublaslt=true",
}


def shapes(hidden: int, intermediate: int, heads: int, kv_heads: int, head_dim: int) -> dict:
    """name -> (weight shape in the model's layout, contraction size): Llama's per-layer projections."""
    group = heads // kv_heads
    return {"q/k/v": (kv_heads, group + 2, head_dim, hidden), "o": (hidden, heads * head_dim),
            "gate/up": (2, intermediate, hidden), "down": (hidden, intermediate)}


def run(args) -> None:
    key = jax.random.key(0)
    rate = matmul_rate()
    print(f"{jax.devices()[0].device_kind}, jax {jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(f"square 8192^3 matmul: {rate / 1e12:.0f} TFLOP/s")
    print(f"{'tokens':>7} {'matmul':>8} {'layout':>9} {'us':>9} {'TFLOP/s':>8} {'of square':>9}")
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
                s = median_time(fn, xin, weight, repeat=20, rounds=3)
                print(f"{t:>7} {name:>8} {layout:>9} {s * 1e6:>9.1f} {flops / s / 1e12:>8.0f} "
                      f"{flops / s / rate:>9.1%}")
        gate_up = jax.random.normal(key, table["gate/up"], jnp.bfloat16)
        down = jax.random.normal(key, table["down"], jnp.bfloat16)

        def mlp(a, gu, d):
            y = jnp.tensordot(a, gu, axes=[[1], [2]])  # [T, 2, I]
            return jnp.einsum("ti,oi->to", jax.nn.silu(y[:, 0]) * y[:, 1], d)

        flops = 2 * t * args.hidden * args.intermediate * 3
        s = median_time(jax.jit(mlp), x, gate_up, down, repeat=20, rounds=3)
        print(f"{t:>7} {'MLP':>8} {'model':>9} {s * 1e6:>9.1f} {flops / s / 1e12:>8.0f} {flops / s / rate:>9.1%}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", default="256,768,8192", help="token counts (rows of the activations)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sweep", action="store_true", help="run again under each XLA GEMM flag set: " + ", ".join(SWEEP))
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not args.sweep:
        run(args)
        return
    argv = [a for a in sys.argv[1:] if a != "--sweep"]
    for name, flags in SWEEP.items():
        print(f"\n=== {name}", flush=True)
        env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip())
        subprocess.run([sys.executable, __file__, *argv], env=env, check=False)


if __name__ == "__main__":
    main()
