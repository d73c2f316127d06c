"""The model's matmuls alone, at the token counts the engine runs, against a square matmul's rate.

Prefill steps ran their layer matmuls at ~80% of the rate an 8192^3 matmul reaches (docs/benchmark-history.md,
"where prefill goes"). This times each projection of a Llama-shaped layer as the model computes it (weights in
Hugging Face's [out, in] layout, the fused q/k/v and gate/up stacks), the same with [in, out] weights,
and the whole gated MLP (gate/up, SiLU x up, down), each jitted and queued back to back, so it shows
whether the loss is in the matmul kernels XLA picks for these shapes or around them. With --sweep it
runs again under other XLA GEMM flags (each in a fresh process: XLA reads its flags once).

With --layer it times instead everything of a layer but its attention (q/k/v, o, the residual adds and
norms, gate/up, SiLU x up, down) in a stack of distinct layers, at each token count: the cost curve a step
of the engine pays besides attention and sampling. Its last line is the `--layer-costs` argument of
simulate_schedule.py, which prices a schedule's steps with it.

    python scripts/bench_gemm.py --tokens 256,768,8192 --sweep
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
from bench_common import Table, matmul_rate, queued_call_s, run_header

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
    p.add_argument("--layer", action="store_true", help="time a layer without its attention instead (see above)")
    p.add_argument("--stack", type=int, default=8, help="--layer: distinct layers a call (weights not in L2)")
    p.add_argument("--sweep", action="store_true", help="run again under each XLA GEMM flag set: " + ", ".join(SWEEP))
    args = p.parse_args()
    args.tokens = [int(t) for t in args.tokens.split(",")]
    if not args.sweep:
        print(run_header())
        (run_layers if args.layer else run)(args)
        return
    argv = [a for a in sys.argv[1:] if a != "--sweep"]
    for name, flags in SWEEP.items():
        print(f"\n=== {name}", flush=True)
        env = dict(os.environ, XLA_FLAGS=" ".join([os.environ.get("XLA_FLAGS", ""), flags]).strip())
        subprocess.run([sys.executable, __file__, *argv], env=env, check=False)


if __name__ == "__main__":
    main()
