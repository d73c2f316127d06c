"""Cascade attention: the host's grouping of sequences by shared prefix pages (against a naive
oracle), and the GPU kernel reading each group's prefix once (interpret mode, against the reference)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.kernels import reference
from sgjax.kernels.gpu.attention import paged_attention as gpu_attention
from sgjax.executor.shared_prefix import MIN_SHARED_TOKENS, order_by_first_page
from tests.kernel_cases import relative_error


def naive_shared_pages(chunks: list[SeqChunk], sizes: list[int], page_size: int) -> list[int]:
    """Per sequence: the pages its whole group has alike, wholly before each member's first new token."""
    out, at = [0] * len(chunks), 0
    for size in sizes:
        group = chunks[at:at + size]
        common = 0
        while all(common < c.num_cached // page_size and c.pages[common] == group[0].pages[common] for c in group):
            common += 1
        for i in range(at, at + size):
            out[i] = common if common * page_size >= MIN_SHARED_TOKENS else 0
        at += size
    return out


def radix_like_chunks(seed: int, page_size: int, q_lens: list[int]) -> list[SeqChunk]:
    """Sequences as the radix cache leaves them: several behind each of three prompt prefixes (one member
    matching only part of its prefix, one prefix too short to share), and loners; pages scattered."""
    rng = np.random.default_rng(seed)
    free = iter(rng.permutation(np.arange(1, 2000)).tolist())
    prefixes = [[next(free) for _ in range(n)] for n in (12, 9, 3)]
    # (prefix, pages of it matched, own cached tokens after it) per sequence; None: a loner
    layout = [(0, 12, 5), (1, 9, 30), (0, 12, 0), (None, 0, 90), (0, 8, 40), (1, 9, 3), (2, 3, 20), (2, 3, 9),
              (1, 9, 17), (None, 0, 10)]
    chunks = []
    for (which, matched, own), n in zip(layout, itertools.cycle(q_lens)):
        pages = prefixes[which][:matched] if which is not None else []
        cached = len(pages) * page_size + own
        pages = pages + [next(free) for _ in range(-(-(cached + n) // page_size) - len(pages))]
        chunks.append(SeqChunk(rng.integers(0, 100, n).tolist(), cached, pages))
    return chunks


def test_order_by_first_page_groups_largest_first():
    keys = [5, None, 7, 5, 9, 7, 5, None, 3]
    order, sizes = order_by_first_page(keys, max_groups=8)
    assert sizes == [3, 2] and order == [0, 3, 6, 2, 5, 1, 4, 7, 8]  # singletons (9, 3) are not groups
    order, sizes = order_by_first_page(keys, max_groups=1)
    assert sizes == [3] and order == [0, 3, 6, 1, 2, 4, 5, 7, 8]
    assert order_by_first_page([None, 1, 2], max_groups=4) == ([0, 1, 2], [])


@pytest.mark.parametrize("max_groups", [4, 1])
def test_shared_pages_match_a_naive_scan(max_groups):
    page_size = 8
    chunks = radix_like_chunks(0, page_size, [1])
    order, sizes = order_by_first_page([c.pages[0] if c.num_cached >= page_size else None for c in chunks],
                                       max_groups)
    chunks = [chunks[i] for i in order]
    batch = make_batch(chunks, page_size, num_seqs=16, max_pages=40, max_prefix_groups=max_groups,
                       prefix_groups=sizes)
    shared = batch.meta.shared
    want = naive_shared_pages(chunks, sizes[:max_groups], page_size)
    assert shared.shared_pages.tolist() == want + [0] * (16 - len(chunks))
    bounds = np.cumsum([0] + sizes[:max_groups]).tolist()
    assert shared.group_starts.tolist() == bounds + [bounds[-1]] * (max_groups + 1 - len(bounds))
    if max_groups == 4:  # the partial member shortens its group's prefix; the 3-page prefix is too short
        assert sorted(set(want)) == [0, 8, 9]


@pytest.mark.parametrize("q_lens,num_tokens,num_seqs", [
    ([1], 16, 16),  # a decode step as the engine pads it: one token per block, context splits
    ([1, 4, 1, 9], 48, 12),  # prefill chunks among decodes, more tokens than sequence rows
])
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_gpu_kernel_reads_shared_prefixes_once(q_lens, num_tokens, num_seqs, dtype, tolerance):
    page_size, num_heads, num_kv_heads, head_dim = 8, 8, 2, 64
    chunks = radix_like_chunks(1, page_size, q_lens)
    order, sizes = order_by_first_page([c.pages[0] if c.num_cached >= page_size else None for c in chunks], 4)
    chunks = [chunks[i] for i in order]
    batch = make_batch(chunks, page_size, num_tokens=num_tokens, num_seqs=num_seqs, max_pages=40,
                       max_prefix_groups=4, prefix_groups=sizes)
    assert (batch.meta.shared.shared_pages > 0).sum() >= 6  # the case really shares prefixes
    rng = np.random.default_rng(2)
    shape = (num_kv_heads, 2000, page_size, head_dim)
    k_pages, v_pages = (jnp.asarray(rng.standard_normal(shape), dtype) for _ in range(2))
    q = jnp.asarray(rng.standard_normal((num_tokens, num_heads, head_dim)), dtype)
    meta = jax.tree.map(jnp.asarray, batch.meta)
    total = int(batch.meta.query_start_loc[-1])
    for softcap in (None, 20.0):
        kwargs = dict(scale=head_dim**-0.5, softcap=softcap)
        want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total].astype(jnp.float32)
        got = gpu_attention(q, k_pages, v_pages, meta, interpret=True, **kwargs)
        assert relative_error(got[:total], want) < tolerance
        assert not np.asarray(got[total:]).any()  # padding tokens get zeros


def test_cli_sets_the_number_of_shared_prefix_groups():
    from sgjax.config import EngineArgs, args_from_cli, build_parser

    assert args_from_cli(build_parser().parse_args(["--model-path", "m"]))[0].shared_prefix_groups == 32
    engine_args, _ = args_from_cli(build_parser().parse_args(["--model-path", "m", "--shared-prefix-groups", "0"]))
    assert engine_args.shared_prefix_groups == 0
    with pytest.raises(ValueError, match="shared_prefix_groups"):
        EngineArgs(model_path="m", shared_prefix_groups=-1)
