"""Ragged paged attention for TPUs, in Pallas (Mosaic TPU lowering): the same contract as the GPU
kernel and `kernels/reference.py:ragged_paged_attention`, checked against the reference in tests (in
the TPU interpreter, `interpret=True`, on a CPU).

TPU shapes differ from the GPU kernel's in two ways. Query blocks are gathered by the wrapper into
an aligned [KV heads, blocks, rows, D] array (a block: `block_q` tokens of one sequence times the G
query heads of one KV head, padded to at least 8 rows, the sublane tile), so each program's queries
and output are one BlockSpec tile and the outputs come back with one gather; the GPU kernel instead
reads and writes rows at any offset. And the K/V pages stay in HBM: each program copies
`pages_per_block` pages a block at a time into a VMEM buffer with DMAs, double-buffered so the next
block's copies run under this block's matmuls. Scalars (block plan, sequence lengths, page table) are
prefetched into SMEM. The online softmax, the causal mask over the cached prefix, the sliding window
and logit soft-capping are as in the GPU kernel; pages past a block's last position, or before its
window, are never copied.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from sgjax.kernels.metadata import AttentionMetadata, plan_query_blocks, queries_by_block, tokens_from_blocks

MASK_VALUE = -1e30
MIN_ROWS = 8  # the TPU's sublane tile: a query block has at least this many rows


def _kernel(seq_ref, start_ref, valid_ref, kv_lens_ref, qsl_ref, page_table_ref,  # SMEM scalars
            q_ref, k_hbm, v_hbm, o_ref, k_buf, v_buf, sems, *,
            block_q: int, group: int, padded_group: int, pages_per_block: int, pages_stride: int, scale: float,
            window: int | None, softcap: float | None, exact: bool):
    h, i = pl.program_id(0), pl.program_id(1)
    seq, t0, valid = seq_ref[i], start_ref[i], valid_ref[i]
    q_start, q_end, kv_len = qsl_ref[seq], qsl_ref[seq + 1], kv_lens_ref[seq]
    rows, head_dim = q_ref.shape
    page_size = k_buf.shape[1] // pages_per_block
    block_k = pages_per_block * page_size

    offset = kv_len - (q_end - q_start)  # position of the sequence's first new token
    last = jnp.minimum(offset + jnp.minimum(t0 + block_q, q_end) - 1 - q_start, kv_len - 1)
    end_block = jnp.where(valid > 0, (last + block_k) // block_k, 0)
    start_block = 0 if window is None else jnp.maximum(offset + t0 - q_start - window + 1, 0) // block_k
    start_block = jnp.minimum(start_block, end_block)

    def copies(kb, slot):
        """The DMAs of block kb's pages into buffer `slot` (rebuilt to wait: a descriptor is its args)."""
        out = []
        for p in range(pages_per_block):
            page = page_table_ref[seq * pages_stride + kb * pages_per_block + p]
            rows_p = pl.ds(p * page_size, page_size)
            out.append(pltpu.make_async_copy(k_hbm.at[h, page], k_buf.at[slot, rows_p], sems.at[0, slot]))
            out.append(pltpu.make_async_copy(v_hbm.at[h, page], v_buf.at[slot, rows_p], sems.at[1, slot]))
        return out

    @pl.when(start_block < end_block)
    def _():
        for c in copies(start_block, 0):
            c.start()

    # Row r of the block: token t0 + r // G', query head r % G' of the group (padding rows masked).
    row = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (rows, block_k), 1)
    tok = t0 + row // padded_group
    row_ok = (row < block_q * padded_group) & (row % padded_group < group) & (tok < q_end)
    pos = offset + tok - q_start
    q = q_ref[...]
    precision = jax.lax.Precision.HIGHEST if exact else None

    def body(kb, carry):
        acc, m, denom = carry
        slot = (kb - start_block) % 2

        @pl.when(kb + 1 < end_block)
        def _():
            for c in copies(kb + 1, 1 - slot):
                c.start()

        for c in copies(kb, slot):
            c.wait()
        k, v = k_buf[slot].astype(q.dtype), v_buf[slot].astype(q.dtype)  # an fp8 pool widened after the DMA
        s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), precision=precision,
                                preferred_element_type=jnp.float32) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        j = kb * block_k + col
        visible = row_ok & (j <= pos) & (j < kv_len)
        if window is not None:
            visible &= pos - j < window
        s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=-1, keepdims=True))
        correction = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next)
        denom_next = correction * denom + p.sum(axis=-1, keepdims=True)
        pv = jax.lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
                                 preferred_element_type=jnp.float32)
        return correction * acc + pv, m_next, denom_next

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((rows, 1), jnp.float32))
    acc, _, denom = jax.lax.fori_loop(start_block, end_block, body, init)
    o_ref[...] = (acc / jnp.where(denom > 0, denom, 1.0)).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "softcap", "block_q", "pages_per_block",
                                             "interpret"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                           scale: float, sliding_window: int | None = None, softcap: float | None = None,
                           block_q: int | None = None, pages_per_block: int | None = None,
                           interpret: bool = False) -> jax.Array:
    """Causal attention of q [T, H, D] over each token's paged K/V ([KVH, pages, page_size, D]) -> [T, H, D]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    padded_group = pl.next_power_of_2(group)
    num_seqs = meta.kv_lens.shape[0]
    # Defaults chosen for the MXU's 128-wide tiles, not yet measured on a TPU: decode batches one token
    # per block; prefill blocks of 128 query rows; 128 keys per K/V block.
    decode = num_tokens <= num_seqs
    if block_q is None:
        block_q = 1 if decode else max(1, 128 // padded_group)
    if pages_per_block is None:
        pages_per_block = max(1, 128 // page_size)
    rows = max(MIN_ROWS, block_q * padded_group)
    rows += -rows % MIN_ROWS
    seq, start, valid = plan_query_blocks(meta.query_start_loc, num_tokens, block_q)
    num_blocks = seq.shape[0]

    q_blocks = queries_by_block(q, start, num_kv_heads, rows)

    # The page table flat in SMEM, padded so a block's reads past a sequence's last page hit page 0.
    page_table = jnp.pad(meta.page_table, ((0, 0), (0, pages_per_block)))
    pages_stride = page_table.shape[1]
    kernel = functools.partial(_kernel, block_q=block_q, group=group, padded_group=padded_group,
                               pages_per_block=pages_per_block, pages_stride=pages_stride, scale=scale,
                               window=sliding_window, softcap=softcap, exact=q.dtype == jnp.float32)
    tile = pl.BlockSpec((None, None, rows, head_dim), lambda h, i, *_: (h, i, 0, 0))
    buffer = pltpu.VMEM((2, pages_per_block * page_size, head_dim), k_pages.dtype)
    out_blocks = pl.pallas_call(
        kernel,
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=6, grid=(num_kv_heads, num_blocks),
            in_specs=[tile, pl.BlockSpec(memory_space=pl.ANY), pl.BlockSpec(memory_space=pl.ANY)],
            out_specs=tile,
            scratch_shapes=[buffer, buffer, pltpu.SemaphoreType.DMA((2, 2))]),
        out_shape=jax.ShapeDtypeStruct(q_blocks.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel")),
        interpret=pltpu.InterpretParams() if interpret else False,
    )(seq, start, valid, meta.kv_lens, meta.query_start_loc, page_table.reshape(-1), q_blocks, k_pages, v_pages)

    return tokens_from_blocks(out_blocks, meta, num_tokens, block_q, num_heads).astype(q.dtype)
