"""The TPU attention kernel against kernels/reference.py, in the TPU interpreter on the CPU."""

import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.kernels.tpu import ragged_paged_attention as tpu_kernel
from tests.kernel_cases import GRID, grid_case_and_reference, relative_error


# The extra tilings on decodes, large pages with a window, and padded heads: the cases whose blocks they change
# most (the interpreter's DMAs are the suite's slowest part; every case runs the default tiling in both dtypes).
TILED_CASES = (GRID[0], GRID[3], GRID[5])


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_tpu_kernel_matches_reference(case, dtype, tolerance):
    """The TPU kernel in the TPU interpreter (its DMAs, semaphores and SMEM scalars simulated)."""
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, dtype)
    # the default; one token per query block (decode batches); small query blocks walking one page at
    # a time (many double-buffered K/V blocks per program). The tilings in bfloat16, the dtype served; float32
    # checks the default's math at a tight tolerance.
    tilings = ((None, None), (1, None), (4, 1)) if dtype == jnp.bfloat16 and case in TILED_CASES else ((None, None),)
    for block_q, pages_per_block in tilings:
        got = tpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, block_q=block_q,
                                                pages_per_block=pages_per_block, **kwargs)
        assert got.shape == q.shape
        assert not np.asarray(got[total:]).any(), "padding tokens get zeros"
        rel = relative_error(got[:total], want)
        assert rel < tolerance, f"block_q={block_q}, pages_per_block={pages_per_block}: relative error {rel:.2e}"
