"""Turn per-sequence work (new tokens, cached length, pages) into the flat arrays a step consumes."""

from __future__ import annotations

import dataclasses

import numpy as np

from sgjax.cache.kv_pool import NULL_PAGE
from sgjax.kernels import AttentionMetadata


@dataclasses.dataclass
class SeqChunk:
    tokens: list[int]  # tokens to run this step (a prefill chunk, or the one decode token)
    num_cached: int  # tokens of this sequence already in the KV cache
    pages: list[int]  # pages covering num_cached + len(tokens) tokens, in order


@dataclasses.dataclass
class FlatBatch:
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32
    meta: AttentionMetadata  # numpy arrays; jit moves them to the device
    last_token_index: np.ndarray  # [B] int32: row of each sequence's last token, for its logits


def make_batch(chunks: list[SeqChunk], page_size: int, *, num_tokens: int | None = None,
               num_seqs: int | None = None, max_pages: int | None = None) -> FlatBatch:
    """Concatenate the chunks, padded to num_tokens / num_seqs / max_pages (a compiled bucket)."""
    total = sum(len(c.tokens) for c in chunks)
    num_tokens = num_tokens or total
    num_seqs = num_seqs or len(chunks)
    max_pages = max_pages or max(1, max(len(c.pages) for c in chunks))
    if total > num_tokens or len(chunks) > num_seqs:
        raise ValueError(f"batch of {total} tokens / {len(chunks)} sequences exceeds bucket "
                         f"{num_tokens} / {num_seqs}")
    ids = np.zeros(num_tokens, np.int32)
    positions = np.zeros(num_tokens, np.int32)
    slots = np.arange(num_tokens, dtype=np.int32) % page_size + NULL_PAGE * page_size
    page_table = np.full((num_seqs, max_pages), NULL_PAGE, np.int32)
    kv_lens = np.zeros(num_seqs, np.int32)
    qsl = np.zeros(num_seqs + 1, np.int32)
    last = np.zeros(num_seqs, np.int32)
    start = 0
    for b, c in enumerate(chunks):
        n, end_len = len(c.tokens), c.num_cached + len(c.tokens)
        if len(c.pages) * page_size < end_len or len(c.pages) > max_pages:
            raise ValueError(f"sequence {b} needs {end_len} tokens of pages; has {len(c.pages)} pages "
                             f"of {page_size} (max {max_pages})")
        pos = np.arange(c.num_cached, end_len, dtype=np.int32)
        ids[start:start + n] = c.tokens
        positions[start:start + n] = pos
        slots[start:start + n] = np.asarray(c.pages, np.int32)[pos // page_size] * page_size + pos % page_size
        page_table[b, :len(c.pages)] = c.pages
        kv_lens[b] = end_len
        start += n
        qsl[b + 1] = start
        last[b] = start - 1
    qsl[len(chunks) + 1:] = start
    meta = AttentionMetadata(slot_mapping=slots, page_table=page_table, kv_lens=kv_lens, query_start_loc=qsl)
    return FlatBatch(ids, positions, meta, last)
