"""Cascade attention on GPUs: a prefix of KV pages that a group of sequences shares is read once per
group of queries instead of once per sequence.

Decoding many requests behind one long system prompt otherwise reads that prompt's K/V once per
request every step (256 requests behind a 2048-token prompt: ~27 ms of an H100's bandwidth a step).
Here a step's attention is two calls of the Triton kernel and a merge:
1. the prefix: one "sequence" per group, whose queries are all its members' new tokens (contiguous in
   the batch) and whose keys are the shared pages, without a causal mask (every member's tokens come
   after the whole prefix); query blocks of several members share each K/V load;
2. each sequence's own suffix: its page table and length shifted past the shared pages (attention
   only depends on key order relative to the query, so the shift changes nothing else);
3. the two partial softmaxes (running max and sum) merged, as flash decoding merges context splits.
Which sequences share what is planned on the host (sgjax/executor/shared_prefix.py, `SharedPrefixes`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from sgjax.kernels.gpu.ragged_paged_attention import (
    combine_partials,
    query_rows,
    ragged_paged_attention_rows,
    tokens_from_rows,
)
from sgjax.kernels.metadata import AttentionMetadata

PREFIX_BLOCK_ROWS = 64  # query rows per block of the prefix call (16 tokens at 4 query heads per KV head)


def prefix_metadata(meta: AttentionMetadata, page_size: int) -> tuple[AttentionMetadata, jax.Array]:
    """The prefix call's view of a step: one sequence per group (its members' tokens; the shared pages
    as its keys), and which groups have a prefix to read."""
    shared = meta.shared
    starts = shared.group_starts
    num_seqs = meta.kv_lens.shape[0]
    first = jnp.minimum(starts[:-1], num_seqs - 1)
    pages = jnp.where(starts[1:] > starts[:-1], shared.shared_pages[first], 0)
    group_meta = AttentionMetadata(slot_mapping=meta.slot_mapping, page_table=meta.page_table[first],
                                   kv_lens=pages * page_size, query_start_loc=meta.query_start_loc[starts])
    return group_meta, pages > 0


def suffix_metadata(meta: AttentionMetadata, page_size: int) -> AttentionMetadata:
    """Each sequence's own pages: its page table and length shifted past its shared pages."""
    shared = meta.shared.shared_pages
    max_pages = meta.page_table.shape[1]
    columns = jnp.minimum(jnp.arange(max_pages, dtype=jnp.int32)[None, :] + shared[:, None], max_pages - 1)
    return dataclasses.replace(meta, page_table=jnp.take_along_axis(meta.page_table, columns, axis=1),
                               kv_lens=meta.kv_lens - shared * page_size, shared=None)


def shared_prefix_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                            scale: float, softcap: float | None = None, interpret: bool = False,
                            **kwargs) -> jax.Array:
    """Causal attention of q [T, H, D] over each token's paged K/V -> [T, H, D], reading the prefixes
    `meta.shared` describes once per group. No sliding window (it could hide part of a prefix)."""
    num_tokens, num_heads, _ = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    padded_group = pl.next_power_of_2(num_heads // num_kv_heads)
    rows = query_rows(q, num_kv_heads)
    common = dict(num_tokens=num_tokens, num_heads=num_heads, scale=scale, softcap=softcap, partials=True,
                  interpret=interpret)
    group_meta, has_prefix = prefix_metadata(meta, page_size)
    block_q = max(1, PREFIX_BLOCK_ROWS // padded_group)
    prefix = ragged_paged_attention_rows(rows, k_pages, v_pages, group_meta, block_q=block_q, kv_splits=1,
                                         causal=False, include=has_prefix, **common)
    suffix = ragged_paged_attention_rows(rows, k_pages, v_pages, suffix_metadata(meta, page_size), **common,
                                         **kwargs)
    # Each call pads its output rows past the last token by its own block size: keep the tokens' rows.
    num_rows = num_tokens * padded_group
    o, m, denom = (jnp.concatenate([p[:, :, :num_rows], s[:, :, :num_rows]], axis=1) for p, s in zip(prefix, suffix))
    return tokens_from_rows(combine_partials(o, m, denom, q.dtype), num_tokens, num_heads)
