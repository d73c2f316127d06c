"""x @ w.T for a few rows (a decode step of a few sequences), in Pallas (Triton lowering), for the GPU.

Such a step is one pass over the weights, so it can go no faster than they stream from memory. Each program
streams one [block_n, K / split_k] slab of the weight, in [block_n, block_k] tiles, through registers against
all the rows; `split_k` programs share an output slab (for enough programs when N is small) and their float32
partial sums are added afterwards (split_k 1 writes the output directly).

Measured on an H200 (BENCHMARKS.md session 28): alone, it beat XLA only on Llama-3-8B's two small projections
(q/k/v, o) and by 0.2-3 us; in the engine it made the batch-1 step no faster (4.71 / 4.72 ms against XLA's
4.66 / 4.70), because inside the forward pass XLA's matmuls run faster than alone and already read the layer
weights at ~91% of the copy rate. So the model uses it only when asked (`sgjax.models.layers.SKINNY_MATMUL`, off
by default; `scripts/bench_one_batch.py --engine --skinny-matmul`), and then only for the shapes in TUNED_TILES;
`scripts/bench_gemm.py --skinny` times it against XLA and finds the tiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

MIN_ROWS = 16  # Triton's dot needs at least 16 rows


def padded_rows(m: int) -> int:
    """The rows the kernel computes for m rows of x: a power of two (a block's shape), at least MIN_ROWS."""
    return max(MIN_ROWS, 1 << (m - 1).bit_length())


def supports(rows: int, n: int, k: int, block_n: int, block_k: int, split_k: int) -> bool:
    """Triton's tiles are static and unmasked: they must divide the weight, and a split's share of K must
    be a power of two (a block's shape)."""
    if rows > 4 * MIN_ROWS or n % block_n or k % split_k:
        return False
    share = k // split_k
    return share % block_k == 0 and share & (share - 1) == 0


# Tilings that beat XLA's matmul alone on an H200 (`scripts/bench_gemm.py --skinny`, BENCHMARKS.md session 28),
# by weight shape (N, K), for steps of up to 16 rows; elsewhere XLA was as fast or faster alone. (In the engine
# not even these were faster: the model path stays off.)
TUNED_TILES: dict[tuple[int, int], dict] = {
    (6144, 4096): dict(block_n=32, block_k=256, split_k=1, num_warps=4, num_stages=4),  # Llama-3-8B q/k/v
    (4096, 4096): dict(block_n=32, block_k=128, split_k=4, num_warps=4, num_stages=4),  # Llama-3-8B o
}


def tiles_for(rows: int, n: int, k: int) -> dict | None:
    """skinny_matmul's tile arguments for x [rows, k] @ w [n, k].T where they were tuned (TUNED_TILES), else None."""
    return TUNED_TILES.get((n, k)) if rows <= MIN_ROWS else None


def _kernel(x_ref, w_ref, o_ref, *, block_k: int):
    share = w_ref.shape[1]

    def accumulate(i, acc):
        x = x_ref[:, pl.ds(i * block_k, block_k)]
        w = w_ref[:, pl.ds(i * block_k, block_k)]
        return acc + jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    rows, block_n = o_ref.shape
    acc = jax.lax.fori_loop(0, share // block_k, accumulate, jnp.zeros((rows, block_n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


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
    rows = padded_rows(m)
    xp = jnp.pad(x.astype(w.dtype), ((0, rows - m), (0, 0)))
    share = k // split_k
    if split_k == 1:  # the sums are whole: written in x's dtype, with no second kernel to add them up
        out_spec = pl.BlockSpec((rows, block_n), lambda j, s: (0, j))
        out_shape = jax.ShapeDtypeStruct((rows, n), x.dtype)
    else:  # each split's float32 partial sums, added after
        out_spec = pl.BlockSpec((None, rows, block_n), lambda j, s: (s, 0, j))
        out_shape = jax.ShapeDtypeStruct((split_k, rows, n), jnp.float32)
    out = pl.pallas_call(
        functools.partial(_kernel, block_k=block_k),
        grid=(n // block_n, split_k),
        in_specs=[pl.BlockSpec((rows, share), lambda j, s: (0, s)),
                  pl.BlockSpec((block_n, share), lambda j, s: (j, s))],
        out_specs=out_spec,
        out_shape=out_shape,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="skinny_matmul",
    )(xp, w)
    return (out if split_k == 1 else out.sum(axis=0))[:m].astype(x.dtype)
