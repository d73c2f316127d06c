"""The top-k / top-p cut of sampled rows without a sort, in Pallas (Triton lowering), for the GPU.

A row's top-k and top-p filters keep a token when fewer than top_k tokens score higher and those tokens
hold less than top_p of the probability (`sampler.kept_by_filters` states the rule). Both conditions only
loosen as the score rises, so the kept tokens are those at or above one cut. XLA found it by sorting each
row: 1.1 ms at 64 rows of a 128256-entry vocabulary on an H100, 4.3 ms at 384.

Here the cut is found 4 bits at a time over the scores as ordered 32-bit keys (`ordered_key`), in 8
passes. In each pass every program reads one chunk of one row and counts, for each of the 16 candidates
for the next digit, the tokens at or above it and their probability; XLA sums the chunks and keeps the
highest candidate at which the kept set would still be too large. The cut is the key found that way:
tokens at or above it are kept. After the first passes few blocks of a row hold keys in the cut's current
range, and the others skip the 16 comparisons a token. On an H100 the cut takes 0.43 ms at 64 rows and
2.1 ms at 384, against the sort's 1.15 and 4.3 (still compute-bound in the first passes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

DIGIT_BITS = 4
CANDIDATES = 1 << DIGIT_BITS


def ordered_key(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-0.0 counted as 0.0)."""
    bits = jax.lax.bitcast_convert_type(x + 0.0, jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def _kernel(x_ref, top_ref, inv_total_ref, cut_ref, count_ref, mass_ref, *, shift: int, block: int,
            steps: int, vocab: int):
    """Program (row, chunk): the chunk's tokens and probability at or above each candidate digit."""
    row, chunk = pl.program_id(0), pl.program_id(1)
    top, inv_total, cut = top_ref[row], inv_total_ref[row], cut_ref[row]
    candidates = jax.lax.broadcasted_iota(jnp.int32, (1, CANDIDATES), 1)

    def accumulate(i, acc):
        count, mass = acc
        start = (chunk * steps + i) * block
        valid = start + jax.lax.broadcasted_iota(jnp.int32, (block,), 0) < vocab
        x = plgpu.load(x_ref.at[row, pl.ds(start, block)], mask=valid, other=0.0)
        key = ordered_key(x)
        digit = ((key >> shift) & (CANDIDATES - 1)).astype(jnp.int32)
        if shift + DIGIT_BITS < 32:
            high = key >> (shift + DIGIT_BITS)
            # Past the cut's bits so far: at or above every candidate (level 16); below them: none (-1).
            level = jnp.where(high > cut, CANDIDATES, jnp.where(high == cut, digit, -1))
        else:
            level = digit
        level = jnp.where(valid, level, -1)
        prob = jnp.where(valid, jnp.exp(x - top) * inv_total, 0.0)

        def by_candidate():  # 16 compares a token: only for blocks with tokens in the cut's current range
            at_or_above = level[:, None] >= candidates  # [block, 16]
            return (count + jnp.sum(at_or_above.astype(jnp.float32), axis=0),
                    mass + jnp.sum(jnp.where(at_or_above, prob[:, None], 0.0), axis=0))

        def above_or_below():  # every token is above all candidates (adds to each) or below all (to none)
            above = level == CANDIDATES
            return count + jnp.sum(above.astype(jnp.float32)), mass + jnp.sum(jnp.where(above, prob, 0.0))

        # After the first passes few blocks hold tokens in the cut's range.
        in_range = jnp.sum(((level >= 0) & (level < CANDIDATES)).astype(jnp.int32)) > 0
        return jax.lax.cond(in_range, by_candidate, above_or_below)

    zeros = jnp.zeros((CANDIDATES,), jnp.float32)
    count, mass = jax.lax.fori_loop(0, steps, accumulate, (zeros, zeros))
    count_ref[...] = count
    mass_ref[...] = mass


@functools.partial(jax.jit, static_argnames=("block", "steps", "num_warps", "interpret"))
def filter_cut(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, *, block: int = 512, steps: int = 8,
               num_warps: int = 4, interpret: bool = False) -> jax.Array:
    """scaled logits [B, V] float32, top_k [B] int32 (<= 0: no limit), top_p [B] float32 -> each row's cut
    [B] uint32: its top-k / top-p filters keep exactly the tokens whose `ordered_key` is >= the cut.

    Each program reads `steps` blocks of `block` tokens of one row (a power of two)."""
    if scaled.ndim != 2 or block & (block - 1):
        raise ValueError(f"filter_cut takes scaled logits [B, V] and a power-of-two block; got {scaled.shape}, "
                         f"block {block}")
    rows, vocab = scaled.shape
    chunks = pl.cdiv(vocab, block * steps)
    top = jnp.max(scaled, axis=-1)
    inv_total = 1.0 / jnp.sum(jnp.exp(scaled - top[:, None]), axis=-1)
    max_count = jnp.where(top_k > 0, top_k, vocab + 1).astype(jnp.float32)[:, None]
    max_mass = jnp.where(top_p < 1, top_p, jnp.inf)[:, None]  # top_p 1 keeps all, whatever the sum's rounding
    partial = pl.BlockSpec((None, None, CANDIDATES), lambda r, c: (r, c, 0))
    cut = jnp.zeros((rows,), jnp.uint32)
    for shift in range(32 - DIGIT_BITS, -1, -DIGIT_BITS):
        count, mass = pl.pallas_call(
            functools.partial(_kernel, shift=shift, block=block, steps=steps, vocab=vocab),
            grid=(rows, chunks),
            out_specs=[partial, partial],
            out_shape=[jax.ShapeDtypeStruct((rows, chunks, CANDIDATES), jnp.float32)] * 2,
            compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
            interpret=interpret,
            name="filter_cut",
        )(scaled, top, inv_total, cut)
        too_many = (count.sum(1) >= max_count) | (mass.sum(1) >= max_mass)  # at or above candidate d
        # The highest such candidate (too_many holds from 0 up to it). None at the first pass: the filters
        # keep the whole row, and the cut stays 0, below every key.
        digit = jnp.maximum(too_many.sum(-1) - 1, 0).astype(jnp.uint32)
        cut = (cut << DIGIT_BITS) | digit
    return cut
