"""What every attention backend reads besides q/k/v: where each sequence's tokens and pages are."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SharedPrefixes:
    """Groups of a step's sequences that begin with the same KV pages (prompts with a common radix-cached
    prefix), for backends that read such a prefix once per group (cascade attention); the others ignore it.

    Group g is sequences group_starts[g]:group_starts[g+1] (contiguous in the batch; unused groups are
    empty); each member's first shared_pages[b] pages are the group's common prefix, all before the
    sequence's first new token. Sequences outside every group, or in a group not worth it, have 0.
    """

    group_starts: jax.Array  # [G + 1] int32, non-decreasing
    shared_pages: jax.Array  # [B] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMetadata:
    """A flat batch of T new tokens from B sequences (prefill chunks and decodes mixed).

    Sequence b owns tokens query_start_loc[b]:query_start_loc[b+1] of the flat batch; they are the
    last tokens of its kv_lens[b] tokens, whose K/V live in pages page_table[b, :]. Padding sequences
    have kv_lens 0 and no tokens; padding tokens lie after query_start_loc[B] and write their K/V to
    slot 0..page_size-1 of the reserved null page 0, which no sequence reads.
    """

    slot_mapping: jax.Array  # [T] int32: page * page_size + offset where token t's K/V goes
    page_table: jax.Array  # [B, max_pages] int32
    kv_lens: jax.Array  # [B] int32: tokens in the cache after this step (cached prefix + new)
    query_start_loc: jax.Array  # [B + 1] int32: prefix sums of new tokens per sequence
    shared: SharedPrefixes | None = None  # common page prefixes, where the step was planned with them


def token_positions(meta: AttentionMetadata, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """(sequence index, absolute position) of each token of the flat batch."""
    qsl = meta.query_start_loc
    num_seqs = meta.kv_lens.shape[0]
    tok = jnp.arange(num_tokens, dtype=jnp.int32)
    # compare_all: no while loop, whose predicate XLA's GPU backend would read on the host every iteration
    seq = jnp.searchsorted(qsl[1:], tok, side="right", method="compare_all")
    seq = jnp.clip(seq, 0, num_seqs - 1).astype(jnp.int32)
    q_lens = qsl[1:] - qsl[:-1]
    pos = meta.kv_lens[seq] - q_lens[seq] + (tok - qsl[seq])
    return seq, pos


def _blocks_per_seq(query_start_loc: jax.Array, block_q: int, include: jax.Array | None) -> jax.Array:
    """Blocks of each sequence at `block_q` tokens a block."""
    q_lens = query_start_loc[1:] - query_start_loc[:-1]
    blocks = (q_lens + block_q - 1) // block_q
    return blocks if include is None else jnp.where(include, blocks, 0)


def plan_query_blocks(query_start_loc: jax.Array, num_tokens: int, block_q: int, include: jax.Array | None = None,
                      max_blocks: int | None = None):
    """Query blocks of `block_q` tokens that never straddle sequences, for the attention kernels; only
    of the sequences `include` marks ([B] bool) when given.

    Returns (sequence, first token, valid) of each block, over a static upper bound on their number
    (`max_blocks` when the caller knows a tighter one). Blocks past the last are not valid and start
    at token 0, so a kernel's reads for them stay inside its query array.
    """
    num_seqs = query_start_loc.shape[0] - 1
    blocks_per_seq = _blocks_per_seq(query_start_loc, block_q, include)
    ends = jnp.cumsum(blocks_per_seq)
    # Every block holds at least one token, so there are never more blocks than tokens; with larger
    # blocks each sequence leaves at most one partial block. The kernels launch a program per block of
    # this bound: a decode-sized bucket of 384 tokens and 512 rows at 2 tokens a block had 704, of which
    # at most 384 can hold tokens.
    num_blocks = max_blocks or min(num_tokens, -(-num_tokens // block_q) + num_seqs)
    i = jnp.arange(num_blocks, dtype=jnp.int32)
    seq = jnp.minimum(jnp.searchsorted(ends, i, side="right", method="compare_all"), num_seqs - 1).astype(jnp.int32)
    start = query_start_loc[seq] + (i - (ends[seq] - blocks_per_seq[seq])) * block_q
    valid = i < ends[-1]
    return seq, jnp.where(valid, start, 0).astype(jnp.int32), valid.astype(jnp.int32)


def token_query_blocks(meta: AttentionMetadata, num_tokens: int, block_q: int) -> tuple[jax.Array, jax.Array]:
    """(query block, place in the block) of each token under `plan_query_blocks`: the inverse map."""
    qsl = meta.query_start_loc
    blocks_per_seq = _blocks_per_seq(qsl, block_q, None)
    first_block = jnp.cumsum(blocks_per_seq) - blocks_per_seq
    seq, _ = token_positions(meta, num_tokens)
    j = jnp.maximum(jnp.arange(num_tokens, dtype=jnp.int32) - qsl[seq], 0)
    return (first_block[seq] + j // block_q).astype(jnp.int32), (j % block_q).astype(jnp.int32)


def queries_by_block(q: jax.Array, start: jax.Array, num_kv_heads: int, rows: int) -> jax.Array:
    """Queries [T, H, D] gathered into aligned blocks [KVH, blocks, rows, D] for kernels that read a
    block as one tile: row r of block i is token start[i] + r // G', query head r % G' of the KV
    head's group (G' the group size rounded up to a power of two; rows past a sequence repeat real
    tokens, never stored back)."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    padded_group = 1 << (group - 1).bit_length()
    r = jnp.arange(rows, dtype=jnp.int32)
    tok = jnp.clip(start[:, None] + r[None, :] // padded_group, 0, num_tokens - 1)
    member = jnp.minimum(r % padded_group, group - 1)
    q_grouped = q.reshape(num_tokens, num_kv_heads, group, head_dim)
    return q_grouped[tok, :, jnp.broadcast_to(member, tok.shape)].transpose(2, 0, 1, 3)


def tokens_from_blocks(out_blocks: jax.Array, meta: AttentionMetadata, num_tokens: int, block_q: int,
                       num_heads: int) -> jax.Array:
    """The inverse of `queries_by_block` for outputs: [KVH, blocks, rows, D] -> [T, H, D]; padding
    tokens get zeros."""
    num_kv_heads, num_blocks, _, head_dim = out_blocks.shape
    group = num_heads // num_kv_heads
    padded_group = 1 << (group - 1).bit_length()
    block, place = token_query_blocks(meta, num_tokens, block_q)
    block = jnp.clip(block, 0, num_blocks - 1)
    heads = place[:, None] * padded_group + jnp.arange(group, dtype=jnp.int32)[None, :]  # [T, G]
    out = out_blocks[:, block[:, None], heads]  # [KVH, T, G, D]
    out = out.transpose(1, 0, 2, 3).reshape(num_tokens, num_heads, head_dim)
    is_real = jnp.arange(num_tokens) < meta.query_start_loc[-1]
    return jnp.where(is_real[:, None, None], out, 0)
