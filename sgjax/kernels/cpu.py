"""Ragged paged attention for the CPU: the reference's math, with a cost that follows the step's tokens.

The reference gathers every page of the page table for every token, so a step costs O(tokens x
context length) however short its sequences are (at SmolLM2's 8192-token context, a decode step read
8192 keys a token where it had 30). Here the keys are walked in blocks of BLOCK_KEYS, with an online
softmax (flash attention's running max and sum), for only as many blocks as the step's longest sequence
needs: the loop's trip count is computed on the device, so one compiled program serves every length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgjax.kernels.metadata import AttentionMetadata, token_positions
from sgjax.kernels.reference import write_kv

BLOCK_KEYS = 128  # keys a loop iteration reads per token: ~a few hundred KB of K/V for a small model's batch
NEG_INF = -1e30  # finite, so a row with nothing visible yet (padding, or a block past its end) stays NaN-free


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                           scale: float, sliding_window: int | None = None,
                           softcap: float | None = None) -> jax.Array:
    """Causal attention of q [T, H, D] over the paged K/V of each token's sequence -> [T, H, D]; padding
    tokens (after query_start_loc[-1]) get zeros."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    block_pages = max(1, BLOCK_KEYS // page_size)
    block = block_pages * page_size
    seq, pos = token_positions(meta, num_tokens)
    valid = jnp.arange(num_tokens) < meta.query_start_loc[-1]
    kv_len = jnp.where(valid, meta.kv_lens[seq], 0)
    # Padded to whole blocks with the null page (masked: past every kv_len).
    page_table = meta.page_table
    pad = -page_table.shape[1] % block_pages
    if pad:
        page_table = jnp.pad(page_table, ((0, 0), (0, pad)))
    token_pages = page_table[seq]  # [T, pages]
    qg = q.reshape(num_tokens, num_kv_heads, group, head_dim).astype(jnp.float32) * scale
    first = jnp.zeros((num_tokens,), jnp.int32)
    if sliding_window is not None:  # blocks wholly before every token's window hold nothing it sees
        first = jnp.maximum(pos - sliding_window + 1, 0)
    first_block = jnp.min(jnp.where(valid, first, jnp.iinfo(jnp.int32).max)) // block
    num_blocks = (jnp.max(kv_len) + block - 1) // block

    def attend_block(i, carry):
        running_max, running_sum, acc = carry
        pages = jax.lax.dynamic_slice_in_dim(token_pages, i * block_pages, block_pages, axis=1)  # [T, bp]
        k = k_pages[:, pages].reshape(num_kv_heads, num_tokens, block, head_dim)
        v = v_pages[:, pages].reshape(num_kv_heads, num_tokens, block, head_dim)
        scores = jnp.einsum("tkgd,ktld->tkgl", qg, k.astype(jnp.float32))
        if softcap is not None:
            scores = softcap * jnp.tanh(scores / softcap)
        key_pos = i * block + jnp.arange(block, dtype=jnp.int32)[None, :]
        visible = (key_pos <= pos[:, None]) & (key_pos < kv_len[:, None])
        if sliding_window is not None:
            visible &= pos[:, None] - key_pos < sliding_window
        visible = visible[:, None, None, :]
        scores = jnp.where(visible, scores, NEG_INF)
        new_max = jnp.maximum(running_max, scores.max(axis=-1))
        correction = jnp.exp(running_max - new_max)
        probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
        running_sum = running_sum * correction + probs.sum(axis=-1)
        acc = acc * correction[..., None] + jnp.einsum("tkgl,ktld->tkgd", probs, v.astype(jnp.float32))
        return new_max, running_sum, acc

    shape = (num_tokens, num_kv_heads, group)
    init = (jnp.full(shape, NEG_INF, jnp.float32), jnp.zeros(shape, jnp.float32),
            jnp.zeros((*shape, head_dim), jnp.float32))
    _, total, acc = jax.lax.fori_loop(first_block, num_blocks, attend_block, init)
    out = acc / jnp.maximum(total, jnp.finfo(jnp.float32).tiny)[..., None]
    return out.reshape(num_tokens, num_heads, head_dim).astype(q.dtype)


def attention(q, k, v, k_pages, v_pages, meta: AttentionMetadata, **kwargs):
    """Backend entry point: write this step's K/V into the pool, then attend. Returns (out, k_pages, v_pages)."""
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta.slot_mapping)
    return ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs), k_pages, v_pages
