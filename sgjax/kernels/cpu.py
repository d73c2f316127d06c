"""Ragged paged attention for the CPU: the reference's math, with a cost that follows the step's tokens.

The reference gathers every page of the page table for every token, so a step costs O(tokens x
context length) however short its sequences are (at SmolLM2's 8192-token context, a decode step read
8192 keys a token where it had 30). Here the keys are walked in blocks of BLOCK_KEYS, with an online
softmax (flash attention's running max and sum), for only as many blocks as the step's longest sequence
needs: the loop's trip count is computed on the device, so one compiled program serves every length.

A step of decodes only runs vectorized over its tokens, each reading its own sequence's keys. A step with
prompt chunks goes one query block (QUERY_BLOCK tokens of one sequence) after another, each reading its
sequence's keys once and only the key blocks it can see: a 200-token prompt gathered its keys 200 times when
every token read its own (the gather and the copies around it took most of a prefill step's attention).
Everything stays in KV-head-major order ([KVH, ...], the pool's own) so the loops have no transposes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from sgjax.kernels.metadata import AttentionMetadata, plan_query_blocks, token_query_blocks
from sgjax.kernels.reference import write_kv

BLOCK_KEYS = 128  # keys a loop iteration reads per query block: ~a few hundred KB of K/V for a small model
QUERY_BLOCK = 64  # queries a block of a prompt chunk: rows for a matmul; the rest of a chunk's last block is waste
NEG_INF = -1e30  # finite, so a row with nothing visible yet (padding, or a block past its end) stays NaN-free


def _online_softmax_block(q, k, v, visible, carry, softcap):
    """One key block's step of flash attention's online softmax: q [KVH, Q, G, D] against k, v [KVH, L, D]
    where `visible` [Q, L]; carry (running max, running sum [KVH, Q, G], accumulator [KVH, Q, G, D])."""
    running_max, running_sum, acc = carry
    scores = jnp.einsum("kqgd,kld->kqgl", q, k)
    if softcap is not None:
        scores = softcap * jnp.tanh(scores / softcap)
    visible = visible[None, :, None, :]
    scores = jnp.where(visible, scores, NEG_INF)
    new_max = jnp.maximum(running_max, scores.max(axis=-1))
    correction = jnp.exp(running_max - new_max)
    probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    running_sum = running_sum * correction + probs.sum(axis=-1)
    acc = acc * correction[..., None] + jnp.einsum("kqgl,kld->kqgd", probs, v)
    return new_max, running_sum, acc


def _key_blocks(page_table: jax.Array, page_size: int) -> tuple[jax.Array, int, int]:
    """(page table padded to whole key blocks with the null page, pages a block, keys a block): the loops read
    keys a block of BLOCK_KEYS at a time; the padding is masked, being past every kv_len."""
    block_pages = max(1, BLOCK_KEYS // page_size)
    pad = -page_table.shape[1] % block_pages
    if pad:
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    return page_table, block_pages, block_pages * page_size


def _gather_keys(pages: jax.Array, index: jax.Array) -> jax.Array:
    """pages[:, index] in float32. A pool of bfloat16 bits (uint16, Kernels.bf16_pool_as_bits) is widened by a
    shift, the exact conversion: XLA's CPU compiler has no bfloat16 gather and converted a bfloat16 pool whole
    to float32 at every layer (120 whole-pool converts a SmolLM2 decode step, most of its time)."""
    if pages.dtype != jnp.uint16:
        return pages[:, index].astype(jnp.float32)
    return jax.lax.bitcast_convert_type(pages[:, index].astype(jnp.uint32) << 16, jnp.float32)


def _attend_blocks(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, block_q: int, *,
                   scale: float, sliding_window: int | None, softcap: float | None) -> jax.Array:
    """Attention with queries in blocks of `block_q` tokens of one sequence each -> [T, H, D] float32."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    page_table, block_pages, block = _key_blocks(meta.page_table, page_size)
    qsl = meta.query_start_loc
    num_seqs = meta.kv_lens.shape[0]
    bound = min(num_tokens, -(-num_tokens // block_q) + num_seqs)
    seq, start, valid = plan_query_blocks(qsl, num_tokens, block_q, max_blocks=bound)
    valid = valid.astype(bool)
    q_lens = qsl[1:] - qsl[:-1]
    count = jnp.where(valid, jnp.minimum(qsl[seq + 1] - start, block_q), 0)  # real queries of each block
    first_pos = meta.kv_lens[seq] - q_lens[seq] + (start - qsl[seq])
    place = jnp.arange(block_q, dtype=jnp.int32)
    pos = first_pos[:, None] + place[None, :]  # [NB, QB]
    real = place[None, :] < count[:, None]
    kv_len = jnp.where(valid, meta.kv_lens[seq], 0)

    tok = jnp.clip(start[:, None] + place[None, :], 0, num_tokens - 1)
    qg = (q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim)
    qb = qg[tok].transpose(2, 0, 1, 3, 4)  # [KVH, NB, QB, G, D]

    block_table = page_table[seq]  # [NB, pages]
    lowest = jnp.zeros_like(pos)
    if sliding_window is not None:  # key blocks wholly before every query's window hold nothing it sees
        lowest = jnp.maximum(pos - sliding_window + 1, 0)
    first_key_block = jnp.min(jnp.where(real, lowest, jnp.iinfo(jnp.int32).max)) // block
    num_key_blocks = (jnp.max(kv_len) + block - 1) // block

    step = jax.vmap(_online_softmax_block, in_axes=(1, 1, 1, 0, 1, None), out_axes=1)  # over the query blocks

    def attend_key_block(i, carry):
        pages = jax.lax.dynamic_slice_in_dim(block_table, i * block_pages, block_pages, axis=1)  # [NB, bp]
        k = _gather_keys(k_pages, pages).reshape(num_kv_heads, bound, block, head_dim)
        v = _gather_keys(v_pages, pages).reshape(num_kv_heads, bound, block, head_dim)
        key_pos = i * block + jnp.arange(block, dtype=jnp.int32)
        visible = (key_pos[None, None, :] <= pos[:, :, None]) & (key_pos[None, None, :] < kv_len[:, None, None])
        if sliding_window is not None:
            visible &= pos[:, :, None] - key_pos[None, None, :] < sliding_window
        return step(qb, k, v, visible, carry, softcap)

    shape = (num_kv_heads, bound, block_q, group)
    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(first_key_block, num_key_blocks, attend_key_block, init)
    out_blocks = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]  # [KVH, NB, QB, G, D]

    token_block, token_place = token_query_blocks(meta, num_tokens, block_q)
    out = out_blocks[:, jnp.clip(token_block, 0, bound - 1), token_place]  # [KVH, T, G, D]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    return jnp.where((jnp.arange(num_tokens) < qsl[-1])[:, None, None], out, 0.0)


def _attend_block_by_block(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                           block_q: int, *, scale: float, sliding_window: int | None,
                           softcap: float | None) -> jax.Array:
    """Attention of a step with prompt chunks: one query block (of one sequence) after another, each over only
    the key blocks it can see, so a step costs what its real blocks need (its causal triangle; never the
    empty blocks that pad the plan to its static bound). A block holding one token (a decode row beside the
    chunks) takes a one-query program, not block_q queries' worth. -> [T, H, D] float32."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    page_table, block_pages, block = _key_blocks(meta.page_table, page_size)
    qsl = meta.query_start_loc
    seq, start, valid = plan_query_blocks(qsl, num_tokens, block_q)
    q_lens = qsl[1:] - qsl[:-1]
    # Padded by a block, so a block's window never runs past the end (dynamic_slice would shift it back).
    q_padded = jnp.pad((q.astype(jnp.float32) * scale).reshape(num_tokens, num_kv_heads, group, head_dim),
                       ((0, block_q), (0, 0), (0, 0), (0, 0)))
    out = jnp.zeros((num_tokens + block_q, num_kv_heads, group, head_dim), jnp.float32)

    def attend(rows: int, s, first, count, out):
        queries = jax.lax.dynamic_slice_in_dim(q_padded, first, rows).transpose(1, 0, 2, 3)  # [KVH, rows, G, D]
        pos = meta.kv_lens[s] - q_lens[s] + (first - qsl[s]) + jnp.arange(rows, dtype=jnp.int32)
        lowest = 0 if sliding_window is None else jnp.maximum(pos[0] - sliding_window + 1, 0)
        last = pos[0] + count  # keys past the block's last query are never visible

        def key_block(i, carry):
            pages = jax.lax.dynamic_slice_in_dim(page_table[s], i * block_pages, block_pages)
            k = _gather_keys(k_pages, pages).reshape(num_kv_heads, block, head_dim)
            v = _gather_keys(v_pages, pages).reshape(num_kv_heads, block, head_dim)
            key_pos = i * block + jnp.arange(block, dtype=jnp.int32)
            visible = key_pos[None, :] <= pos[:, None]
            if sliding_window is not None:
                visible &= pos[:, None] - key_pos[None, :] < sliding_window
            return _online_softmax_block(queries, k, v, visible, carry, softcap)

        shape = (num_kv_heads, rows, group)
        init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
                jnp.zeros((*shape, head_dim), jnp.float32))
        _, total, acc = jax.lax.fori_loop(lowest // block, (last + block - 1) // block, key_block, init)
        result = (acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]).transpose(1, 0, 2, 3)
        window = jax.lax.dynamic_slice_in_dim(out, first, rows)
        mine = (jnp.arange(rows) < count)[:, None, None, None]  # the block's tokens, not the next sequence's
        return jax.lax.dynamic_update_slice_in_dim(out, jnp.where(mine, result, window), first, 0)

    def query_block(b, out):
        s, first = seq[b], start[b]
        count = jnp.minimum(qsl[s + 1] - first, block_q)
        return jax.lax.cond(count == 1, functools.partial(attend, 1), functools.partial(attend, block_q),
                            s, first, count, out)

    out = jax.lax.fori_loop(0, jnp.sum(valid), query_block, out)
    return out[:num_tokens].reshape(num_tokens, num_heads, head_dim)


# A nested jit: the model calls this once a layer with the same shapes, and tracing it once instead of for
# every layer took seconds off each step program's trace (which a start with a warm compilation cache still
# pays for every program).
@functools.partial(jax.jit, static_argnames=("scale", "sliding_window", "softcap"))
def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                           scale: float, sliding_window: int | None = None,
                           softcap: float | None = None) -> jax.Array:
    """Causal attention of q [T, H, D] over the paged K/V of each token's sequence -> [T, H, D]; padding
    tokens (after query_start_loc[-1]) get zeros."""
    num_tokens = q.shape[0]
    kwargs = {"scale": scale, "sliding_window": sliding_window, "softcap": softcap}

    def one_token_blocks(q):
        return _attend_blocks(q, k_pages, v_pages, meta, 1, **kwargs)

    if num_tokens <= 1 or QUERY_BLOCK <= 1:
        return one_token_blocks(q).astype(q.dtype)

    def query_blocks(q):
        return _attend_block_by_block(q, k_pages, v_pages, meta, min(QUERY_BLOCK, num_tokens), **kwargs)

    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    # On a CPU a cond runs one branch: a step of decodes pays nothing for the prompt path.
    return jax.lax.cond(jnp.max(q_lens) <= 1, one_token_blocks, query_blocks, q).astype(q.dtype)


def _write_kv(k_pages, v_pages, k, v, slot_mapping):
    """The reference's write_kv; into a pool of bfloat16 bits (uint16) as bits (see _gather_keys; a bfloat16
    scatter converted the whole pool to float32 and back around each layer's write)."""
    if k_pages.dtype == jnp.uint16:
        def bits(x):
            return jax.lax.bitcast_convert_type(x.astype(jnp.bfloat16), jnp.uint16)

        k, v = bits(k), bits(v)
    return write_kv(k_pages, v_pages, k, v, slot_mapping)


def attention(q, k, v, k_pages, v_pages, meta: AttentionMetadata, **kwargs):
    """Backend entry point: write this step's K/V into the pool, then attend. Returns (out, k_pages, v_pages)."""
    k_pages, v_pages = _write_kv(k_pages, v_pages, k, v, meta.slot_mapping)
    return ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs), k_pages, v_pages
