"""A step's host inputs: make_batch (whole-batch numpy) against a per-sequence construction of the same
arrays, the token buckets' padding bound, and the packed transfer buffers' round trip."""

import numpy as np
import pytest

from sgjax.executor.batch import PADDING_SLOT, SeqChunk, make_batch
from sgjax.cache.kv_pool import NULL_PAGE


def naive_batch(chunks, page_size, num_tokens, num_seqs, max_pages):
    ids, positions, slots = [], [], []
    page_table = np.full((num_seqs, max_pages), NULL_PAGE, np.int32)
    kv_lens, qsl, last = np.zeros(num_seqs, np.int32), [0], np.zeros(num_seqs, np.int32)
    for b, c in enumerate(chunks):
        for j, token in enumerate(c.tokens):
            pos = c.num_cached + j
            ids.append(token)
            positions.append(pos)
            slots.append(c.pages[pos // page_size] * page_size + pos % page_size)
        page_table[b, :len(c.pages)] = c.pages
        kv_lens[b] = c.num_cached + len(c.tokens)
        qsl.append(qsl[-1] + len(c.tokens))
        last[b] = qsl[-1] - 1
    pad = num_tokens - len(ids)
    slots += [PADDING_SLOT + len(slots) + i for i in range(pad)]
    qsl += [qsl[-1]] * (num_seqs + 1 - len(qsl))
    return ids + [0] * pad, positions + [0] * pad, slots, page_table, kv_lens, qsl, last


@pytest.mark.parametrize("seed", range(5))
def test_make_batch_matches_a_per_sequence_construction(seed):
    rng = np.random.default_rng(seed)
    page_size, max_pages, chunks = 4, 12, []
    free = list(rng.permutation(np.arange(1, 400)))
    for _ in range(int(rng.integers(1, 9))):
        cached = int(rng.integers(0, 30))
        n = 1 if rng.random() < 0.5 else int(rng.integers(1, 15))
        pages = [int(free.pop()) for _ in range(-(-(cached + n) // page_size) + int(rng.integers(0, 2)))]
        chunks.append(SeqChunk(rng.integers(-3, 500, n).tolist(), cached, pages))
    total = sum(len(c.tokens) for c in chunks)
    want = naive_batch(chunks, page_size, total + 7, len(chunks) + 3, max_pages)
    # Into a fresh page table, and into a reused buffer that holds a previous step's pages (the runner's)
    reused = rng.integers(0, 400, (len(chunks) + 3, max_pages)).astype(np.int32)
    for out in (None, reused):
        batch = make_batch(chunks, page_size, num_tokens=total + 7, num_seqs=len(chunks) + 3, max_pages=max_pages,
                           page_table_out=out)
        got = (batch.input_ids, batch.positions, batch.meta.slot_mapping, batch.meta.page_table, batch.meta.kv_lens,
               batch.meta.query_start_loc, batch.last_token_index)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, np.asarray(w, np.int32))
    assert batch.meta.page_table is reused


def test_make_batch_names_a_sequence_without_enough_pages():
    with pytest.raises(ValueError, match="sequence 1 needs 9 tokens of pages; has 2 pages"):
        make_batch([SeqChunk([1], 0, [3]), SeqChunk([1, 2], 7, [4, 5])], 4, num_tokens=8, num_seqs=4, max_pages=4)


@pytest.mark.parametrize("bad_page", [9, 40, -1])
def test_make_batch_refuses_a_page_outside_the_pool(bad_page):
    chunks = [SeqChunk([1, 2], 0, [3]), SeqChunk([1], 4, [5, bad_page])]
    with pytest.raises(ValueError, match=f"page {bad_page} is outside the KV pool of 9 pages"):
        make_batch(chunks, 4, pool_pages=9)
    make_batch(chunks[:1], 4, pool_pages=9)  # the pool's pages are accepted
    make_batch([SeqChunk([1, 2], 0, [8])], 4, pool_pages=9)


@pytest.mark.parametrize("smallest,largest,decode_rows,step", [
    (16, 2304, 0, 256), (64, 4096, 32, 256), (512, 1500, 0, 256), (16, 8, 0, 256), (16, 8448, 256, 256),
    (16, 9216, 1024, 256), (16, 1200, 300, 256), (16, 513, 1, 256), (16, 584, 72, 256), (16, 9192, 1000, 256),
    (1, 8224, 32, 32), (1, 1040, 16, 32)])  # the CPU's ShapePolicy: from 1 token, 32 apart
def test_token_buckets_bound_the_padding(smallest, largest, decode_rows, step):
    from sgjax.executor.buckets import BUCKET_GROWTH, DECODE_BUCKET_STEP, token_buckets

    buckets = token_buckets(smallest, largest, step, decode_rows=decode_rows)
    assert buckets[0] == min(smallest, decode_rows or smallest) and buckets[-1] >= largest
    assert buckets == sorted(set(buckets))
    assert len(buckets) == 1 or buckets[-2] < largest  # no bucket beyond the first that fits
    for n in range(1, largest + 1):
        padded = min(b for b in buckets if b >= n)
        # a decode step of all rows is never padded past the rows (the attention kernels would take it
        # for a possible prefill)
        assert n > decode_rows or padded <= decode_rows
        # small steps at most double (and never below `smallest`); decode steps above that pad by less
        # than DECODE_BUCKET_STEP; large ones grow by less than BUCKET_GROWTH and one step
        if n <= step:
            assert padded <= max(2 * n - 1, smallest)
        elif n <= decode_rows:
            assert padded < n + DECODE_BUCKET_STEP
        else:
            assert padded < BUCKET_GROWTH * n + step


@pytest.mark.parametrize("max_seqs", [1, 64, 72, 128, 300, 512, 1000, 1024, 3000])
def test_row_buckets_bound_the_padding(max_seqs):
    """Sampling rows: up to 256 rounded up to 64, 128 or 256 (on an H100 a 192-row bucket sampled slower
    than 256 rows); past 256, by less than half again (the LM head's matmul is compute-bound there and its
    time follows the rows); never past max_seqs."""
    from sgjax.executor.buckets import row_buckets

    buckets = row_buckets(max_seqs)
    assert buckets == sorted(set(buckets)) and buckets[-1] == max_seqs
    for n in range(1, max_seqs + 1):
        padded = min(b for b in buckets if b >= n)
        if n <= 256:
            assert padded in (max_seqs, 64 if n <= 64 else 128 if n <= 128 else 256)
        else:
            assert padded == max_seqs or 2 * padded <= 3 * n + 128
    assert len(buckets) <= 2 * max(1, max_seqs.bit_length() - 5)


def test_packed_host_inputs_round_trip():
    """pack -> unpack gives back every array bit for bit (uint32 above 2^31, bools, floats, shapes)."""
    import jax

    from sgjax.executor.host_inputs import PackedLayout, pack, unpack

    rng = np.random.default_rng(0)
    tree = (rng.integers(-5, 100, 7).astype(np.int32), {"seed": np.array([0, 2**31 + 5, 2**32 - 1], np.uint32),
                                                        "reset": np.array([True, False, True]),
                                                        "t": rng.random((2, 3)).astype(np.float32)},
            rng.integers(0, 9, (4, 5)).astype(np.int32))
    layout = PackedLayout.of(tree)
    ints, floats = pack(tree, layout)
    assert (ints.dtype, floats.dtype, ints.size, floats.size) == (np.int32, np.float32, 7 + 3 + 3 + 20, 6)
    back = jax.jit(unpack, static_argnums=2)(ints, floats, layout)
    for want, got in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(np.asarray(got), want)
    with pytest.raises(ValueError, match="compiled for"):
        pack((tree[0][:3], tree[1], tree[2]), layout)
    # into longer buffers that hold an earlier step's values: views of their fronts, every element rewritten
    out = np.full(ints.size + 9, -7, np.int32), np.full(floats.size + 2, np.nan, np.float32)
    in_place = pack(tree, layout, out)
    assert in_place[0].base is out[0] and in_place[1].base is out[1]
    np.testing.assert_array_equal(in_place[0], ints)
    np.testing.assert_array_equal(in_place[1], floats)
    with pytest.raises(ValueError, match="layout needs"):
        pack(tree, layout, (out[0][:5], out[1]))
