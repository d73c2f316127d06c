"""The CPU attention (kernels/cpu.py) against kernels/reference.py, its definition: the kernel grid, ragged
batches mixing short and long rows, prefix-cached rows and prompt chunks, and page tables far wider than
the step's sequences (a model's whole context)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.kernels import cpu, reference
from tests.kernel_cases import GRID, grid_case_and_reference, random_case, relative_error


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-5), (jnp.bfloat16, 1e-2)])
def test_cpu_attention_matches_reference_on_the_kernel_grid(case, dtype, tolerance):
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, dtype)
    got = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, **kwargs))(q, k_pages, v_pages, meta)
    assert got.shape == q.shape and got.dtype == q.dtype
    assert relative_error(got[:total], want) < tolerance
    assert not np.asarray(got[total:]).any(), "padding tokens get zeros"


@pytest.mark.parametrize("page_size,window,softcap", [(16, None, None), (1, None, None), (8, 40, 20.0)])
def test_cpu_attention_on_ragged_steps_with_wide_page_tables(page_size, window, softcap):
    """Decodes beside long prefix-cached rows and prompt chunks (one starting from nothing, one after a cached
    prefix), the page table padded to 512 pages as a model's context makes it: blocks past a row's end and
    rows shorter than the longest read nothing they should not."""
    q_lens, cached = [1, 130, 1, 17, 1, 64], [700, 0, 3, 250, 129, 128]
    q, k_pages, v_pages, meta, total = random_case(7, num_heads=6, num_kv_heads=2, head_dim=32, page_size=page_size,
                                                   q_lens=q_lens, cached=cached, dtype=jnp.float32, extra_tokens=11,
                                                   extra_seqs=5)
    width = max(512, meta.page_table.shape[1])
    meta.page_table = jnp.pad(meta.page_table, ((0, 0), (0, width - meta.page_table.shape[1])))
    kwargs = {"scale": 32**-0.5, "sliding_window": window, "softcap": softcap}
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total]
    got = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, **kwargs))(q, k_pages, v_pages, meta)
    assert relative_error(got[:total], want) < 1e-5


def test_cpu_attention_is_one_program_for_every_length():
    """The walk over key blocks stops at the step's longest row, decided on the device: the same compiled
    function serves a short step and a long one with the reference's results."""
    attend = jax.jit(lambda *a: cpu.ragged_paged_attention(*a, scale=0.25))
    outs = []
    for cached in ([3, 5], [900, 1000]):
        q, k_pages, v_pages, meta, total = random_case(3, num_heads=4, num_kv_heads=1, head_dim=16, page_size=16,
                                                       q_lens=[1, 1], cached=cached, dtype=jnp.float32, extra_tokens=0,
                                                       extra_seqs=0)
        meta.page_table = jnp.pad(meta.page_table, ((0, 0), (0, 70 - meta.page_table.shape[1])))
        k_pages = jnp.pad(k_pages, ((0, 0), (0, 140 - k_pages.shape[1]), (0, 0), (0, 0)))
        v_pages = jnp.pad(v_pages, ((0, 0), (0, 140 - v_pages.shape[1]), (0, 0), (0, 0)))
        want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, scale=0.25)
        outs.append(relative_error(attend(q, k_pages, v_pages, meta), want))
    assert attend._cache_size() == 1
    assert max(outs) < 1e-5


def test_bf16_pool_held_as_bits_reads_and_writes_what_a_bf16_pool_does():
    """Kernels.bf16_pool_as_bits: a bfloat16 pool stored as its uint16 bits gives the bfloat16 pool's attention
    output exactly, and the step's K/V land in it as the same bits."""
    q, k_pages, v_pages, meta, total = random_case(5, num_heads=4, num_kv_heads=2, head_dim=16, page_size=8,
                                                   q_lens=[1, 20, 1], cached=[30, 0, 9], dtype=jnp.bfloat16,
                                                   extra_tokens=3, extra_seqs=1)
    k = jax.random.normal(jax.random.PRNGKey(1), (q.shape[0], 2, 16), jnp.bfloat16)
    v = jax.random.normal(jax.random.PRNGKey(2), (q.shape[0], 2, 16), jnp.bfloat16)
    attend = jax.jit(lambda *a: cpu.attention(*a, scale=0.25))

    def as_bits(x):
        return jax.lax.bitcast_convert_type(x, jnp.uint16)

    want, want_k, want_v = attend(q, k, v, k_pages, v_pages, meta)
    got, got_k, got_v = attend(q, k, v, as_bits(k_pages), as_bits(v_pages), meta)
    assert got_k.dtype == jnp.uint16 and got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got_k), np.asarray(as_bits(want_k)))
    np.testing.assert_array_equal(np.asarray(got_v), np.asarray(as_bits(want_v)))
    np.testing.assert_array_equal(np.asarray(got[:total], np.float32), np.asarray(want[:total], np.float32))
    assert relative_error(want[:total], reference.attention(q, k, v, k_pages, v_pages, meta, scale=0.25)[0][:total]) < 1e-2
