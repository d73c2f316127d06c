"""The Triton attention kernel against kernels/reference.py, in its interpreter on the CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.kernels import reference
from sgjax.kernels.gpu import ragged_paged_attention as gpu_kernel
from tests.kernel_cases import GRID, grid_case_and_reference, random_case, relative_error


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_gpu_kernel_matches_reference(case, dtype, tolerance):
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, dtype)
    # the default; the context split three ways (flash decoding), into blocks of any length or >= 2;
    # one token per query block (what batches with no more tokens than sequences use), whole or split;
    # two tokens a block (decode-sized steps with prompt chunks); the next block's page ids or K/V loaded
    # ahead (none, page ids, K/V), with and without splits
    variants = [dict(block_q=None), dict(kv_splits=3, min_blocks_per_split=1), dict(kv_splits=3),
                dict(block_q=1), dict(block_q=1, kv_splits=3), dict(block_q=2, prefetch=0),
                dict(block_q=2, prefetch=1), dict(block_q=1, prefetch=2), dict(kv_splits=3, prefetch=1),
                dict(block_q=2, kv_splits=3, min_blocks_per_split=1, prefetch=2)]
    for variant in variants:
        got = gpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, **variant, **kwargs)
        assert got.shape == q.shape
        rel = relative_error(got[:total], want)
        assert rel < tolerance, f"{variant}: relative error {rel:.2e}"


def test_gpu_kernel_on_an_engine_like_decode_batch():
    """A few decodes in a batch padded to many more sequences than tokens (as the engine pads to
    max_running_requests): the default takes the small decode path (one token a block, the context
    split)."""
    q, k_pages, v_pages, meta, total = random_case(3, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
                                                   q_lens=[1, 1, 1], cached=[90, 3, 300], dtype=jnp.float32,
                                                   extra_tokens=13, extra_seqs=29)
    kwargs = dict(scale=0.125)
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total]
    got = gpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, **kwargs)[:total]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


def test_gpu_kernel_on_a_decode_sized_step_with_prompt_chunks():
    """Decodes and prompt chunks in a bucket of no more tokens than sequence rows (the engine's mixed
    steps), two tokens a query block: the reference's result."""
    q, k_pages, v_pages, meta, total = random_case(7, num_heads=8, num_kv_heads=2, head_dim=64, page_size=16,
                                                   q_lens=[1, 9, 1, 6, 1], cached=[90, 30, 300, 0, 17],
                                                   dtype=jnp.float32, extra_tokens=3, extra_seqs=20)
    assert q.shape[0] <= meta.kv_lens.shape[0]
    kwargs = dict(scale=0.125)
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total]
    got = gpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, kv_splits=1, block_q=2,
                                            **kwargs)[:total]
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)
