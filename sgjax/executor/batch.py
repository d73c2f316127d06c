"""Turn per-sequence work (new tokens, cached length, pages) into the flat arrays a step consumes."""

from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import numpy as np

from sgjax.cache.kv_pool import NULL_PAGE
from sgjax.kernels import AttentionMetadata
from sgjax.executor.shared_prefix import shared_prefix_metadata

# Padding tokens' K/V slots: PADDING_SLOT + their index, unique and past any pool (pages x page size),
# so the K/V write drops them and its slots stay unique (kernels/reference.py: write_kv).
PADDING_SLOT = 1 << 30


@dataclasses.dataclass
class SeqChunk:
    tokens: list[int]  # tokens to run this step (a prefill chunk, or the one decode token)
    num_cached: int  # tokens of this sequence already in the KV cache
    pages: list[int] | np.ndarray  # pages covering num_cached + len(tokens) tokens, in order
    # M-RoPE models (make_batch's `mrope`): the tokens' [3, n] positions (None: their indices, on all three rows);
    # vision-language models (`images`): each token's row in the image embedding pool (None: all text, -1)
    positions: np.ndarray | None = None
    image_rows: np.ndarray | None = None


@dataclasses.dataclass
class FlatBatch:
    input_ids: np.ndarray  # [T] int32
    positions: np.ndarray  # [T] int32 ([3, T] with `mrope`)
    meta: AttentionMetadata  # numpy arrays; jit moves them to the device
    last_token_index: np.ndarray  # [B] int32: row of each sequence's last token, for its logits
    image_rows: np.ndarray | None = None  # [T] int32 with `images`: each token's image embedding row, -1 for text


def make_batch(chunks: list[SeqChunk], page_size: int, *, num_tokens: int | None = None,
               num_seqs: int | None = None, max_pages: int | None = None, max_prefix_groups: int = 0,
               prefix_groups: Sequence[int] = (), pool_pages: int | None = None,
               page_table_out: np.ndarray | None = None, images: bool = False, mrope: bool = False) -> FlatBatch:
    """Concatenate the chunks, padded to num_tokens / num_seqs / max_pages (a compiled bucket).

    With `images` (vision-language models) the batch has image_rows; with `mrope` positions are [3, num_tokens].

    With `max_prefix_groups` the metadata also describes the shared prefixes of the leading groups of
    chunks (`prefix_groups`: their sizes, as shared_prefix.order_by_first_page ordered them).
    With `pool_pages` (the KV pool's size) a page id outside the pool is refused here: on a GPU the
    kernels would read and write out of bounds (an illegal address that ends the process).
    With `page_table_out` (int32 [num_seqs, max_pages]) the page table is written there instead of into a
    new array: with a fresh table of 512 x 256 pages a ShareGPT-like step took 0.78 ms here, with a reused one
    0.57 ms (the development machine; a fresh one is page-faulted in at each step)."""
    total = sum(len(c.tokens) for c in chunks)
    num_tokens = num_tokens or total
    num_seqs = num_seqs or len(chunks)
    max_pages = max_pages or max(1, max(len(c.pages) for c in chunks))
    if total > num_tokens or len(chunks) > num_seqs:
        raise ValueError(f"batch of {total} tokens / {len(chunks)} sequences exceeds bucket "
                         f"{num_tokens} / {num_seqs}")
    n = len(chunks)
    lens = np.fromiter((len(c.tokens) for c in chunks), np.int32, n)
    num_cached = np.fromiter((c.num_cached for c in chunks), np.int32, n)
    num_pages = np.fromiter((len(c.pages) for c in chunks), np.int32, n)
    end_lens = num_cached + lens
    short = np.flatnonzero((num_pages * page_size < end_lens) | (num_pages > max_pages))
    if len(short):
        b = int(short[0])
        raise ValueError(f"sequence {b} needs {end_lens[b]} tokens of pages; has {num_pages[b]} pages "
                         f"of {page_size} (max {max_pages})")
    # Whole-batch numpy: a step has up to hundreds of sequences, so no per-sequence array work.
    if page_table_out is None:
        page_table = np.full((num_seqs, max_pages), NULL_PAGE, np.int32)
    else:
        if page_table_out.shape != (num_seqs, max_pages) or page_table_out.dtype != np.int32:
            raise ValueError(f"page_table_out is {page_table_out.shape} {page_table_out.dtype}; "
                             f"the batch needs ({num_seqs}, {max_pages}) int32")
        page_table = page_table_out
        page_table.fill(NULL_PAGE)
    flat_pages = np.concatenate([np.asarray(c.pages, np.int32) for c in chunks]) if n else np.zeros(0, np.int32)
    if pool_pages is not None and len(flat_pages) and not 0 <= flat_pages.min() <= flat_pages.max() < pool_pages:
        bad = int(flat_pages[(flat_pages < 0) | (flat_pages >= pool_pages)][0])
        raise ValueError(f"page {bad} is outside the KV pool of {pool_pages} pages")
    page_rows = np.repeat(np.arange(n), num_pages)
    page_table[page_rows, np.arange(len(flat_pages)) - np.repeat(np.cumsum(num_pages) - num_pages, num_pages)] = \
        flat_pages
    qsl = np.full(num_seqs + 1, total, np.int32)
    qsl[0] = 0
    qsl[1:n + 1] = np.cumsum(lens)
    token_seq = np.repeat(np.arange(n), lens)
    pos = np.arange(total, dtype=np.int32) - qsl[token_seq] + num_cached[token_seq]
    ids = np.zeros(num_tokens, np.int32)
    ids[:total] = np.fromiter(itertools.chain.from_iterable(c.tokens for c in chunks), np.int32, total)
    positions = np.zeros(num_tokens, np.int32)
    positions[:total] = pos
    slots = PADDING_SLOT + np.arange(num_tokens, dtype=np.int32)  # unique, past the pool: not written
    slots[:total] = page_table[token_seq, pos // page_size] * page_size + pos % page_size
    kv_lens = np.zeros(num_seqs, np.int32)
    kv_lens[:n] = end_lens
    last = np.zeros(num_seqs, np.int32)
    last[:n] = qsl[1:n + 1] - 1
    meta = AttentionMetadata(slot_mapping=slots, page_table=page_table, kv_lens=kv_lens, query_start_loc=qsl)
    if max_prefix_groups:
        meta.shared = shared_prefix_metadata(page_table, num_cached, prefix_groups[:max_prefix_groups], page_size,
                                             max_prefix_groups)
    batch = FlatBatch(ids, positions, meta, last)
    if mrope:
        batch.positions = np.repeat(positions[None], 3, axis=0)
        for c, start in zip(chunks, qsl[:n].tolist()):
            if c.positions is not None:
                batch.positions[:, start:start + len(c.tokens)] = c.positions
    if images:
        batch.image_rows = np.full(num_tokens, -1, np.int32)
        for c, start in zip(chunks, qsl[:n].tolist()):
            if c.image_rows is not None:
                batch.image_rows[start:start + len(c.tokens)] = c.image_rows
    return batch
