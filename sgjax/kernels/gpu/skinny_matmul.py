"""x @ w.T for a few rows (a decode step of a few sequences), in Pallas (Triton lowering), for the GPU.

Such a step is one pass over the weights, so it can go no faster than they stream from memory. On an H200
the engine's batch-1 Llama-3-8B step took 4.88 ms: its weights read at ~3.3 TB/s, where 32-bit copies run
at 4.19 (BENCHMARKS.md session 27), so the matmuls XLA picks for [16, K] x [N, K] leave ~20% of the memory's
rate unused. Here each program streams one [block_n, K / split_k] slab of the weight, in [block_n, block_k]
tiles, through registers against all the rows; `split_k` programs share an output slab (for enough programs
when N is small) and their float32 partial sums are added afterwards.

NOT yet timed on a GPU. The model uses it only when asked (`sgjax.models.layers.SKINNY_MATMUL`, off by default;
`scripts/bench_one_batch.py --engine --skinny-matmul`); `scripts/bench_gemm.py --skinny` times it against XLA.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_ROWS = 16  # Triton's dot needs at least 16 rows


def supports(rows: int, n: int, k: int, block_n: int, block_k: int, split_k: int) -> bool:
    """Triton's tiles are static and unmasked: they must divide the weight, and a split's share of K must
    be a power of two (a block's shape)."""
    if rows > 4 * MIN_ROWS or n % block_n or k % split_k:
        return False
    share = k // split_k
    return share % block_k == 0 and share & (share - 1) == 0


def tiles_for(rows: int, n: int, k: int, programs: int = 264) -> dict | None:
    """skinny_matmul's tile arguments for x [rows, k] @ w [n, k].T, or None where none fits. A first guess, not
    yet tuned on a GPU: 64-column slabs in 128-wide steps, split along K until there are `programs` programs
    (two per multiprocessor of an H100 / H200) or no finer power-of-two split fits."""
    block_n = next((b for b in (64, 32, 16) if n % b == 0), None)
    if block_n is None:
        return None
    fits = [(split, bk) for split in range(1, 65) for bk in (128, 64, 32, 16)
            if supports(rows, n, k, block_n, bk, split)]
    if not fits:
        return None
    enough = [s for s, _ in fits if (n // block_n) * s >= programs]
    split = min(enough) if enough else max(s for s, _ in fits)
    block_k = max(bk for s, bk in fits if s == split)
    return dict(block_n=block_n, block_k=block_k, split_k=split)


def _kernel(x_ref, w_ref, o_ref, *, block_k: int):
    share = w_ref.shape[1]

    def accumulate(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    rows, block_n = o_ref.shape
    o_ref[...] = jax.lax.fori_loop(0, share // block_k, accumulate, jnp.zeros((rows, block_n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("block_n", "block_k", "split_k", "num_warps", "num_stages",
                                             "interpret"))
def skinny_matmul(x: jax.Array, w: jax.Array, *, block_n: int = 64, block_k: int = 128, split_k: int = 1,
                  num_warps: int = 4, num_stages: int = 4, interpret: bool = False) -> jax.Array:
    """x [M, K] (M <= 64), w [N, K] -> x @ w.T [M, N] in x's dtype, accumulated in float32."""
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or not supports(m, n, k, block_n, block_k, split_k):
        raise ValueError(f"skinny_matmul needs x [M <= 64, K], w [N, K] with N a multiple of {block_n} and K "
                         f"split {split_k} ways into powers of two divisible by {block_k}; got {x.shape}, {w.shape}")
    rows = max(MIN_ROWS, 1 << (m - 1).bit_length())  # a power of two: a block's shape
    xp = jnp.pad(x.astype(w.dtype), ((0, rows - m), (0, 0)))
    share = k // split_k
    partial = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid=(n // block_n, split_k),
        in_specs=[pl.BlockSpec((rows, share), lambda j, s: (0, s)),
                  pl.BlockSpec((block_n, share), lambda j, s: (j, s))],
        out_specs=pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="skinny_matmul",
    )(xp, w)
    return partial.sum(axis=0)[:m].astype(x.dtype)
