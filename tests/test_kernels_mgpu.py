"""The Mosaic GPU prefill kernel against kernels/reference.py in its interpreter, the GPU backend that splits a
step between it and the Triton kernel, and both lowered for CUDA on the CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.kernels.gpu import paged_prefill_mgpu
from sgjax.kernels.gpu.attention import paged_attention as gpu_attention
from tests.kernel_cases import grid_case_and_reference, relative_error

# The Mosaic GPU prefill kernel in its interpreter: bf16 only (wgmma), no window or soft-cap (those
# configurations use the Triton kernel), K/V blocks of 64 keys or more. The interpreter takes seconds a
# program (KV head x query block) whatever its work, so these cases have one KV head and no padding
# sequences; test_gpu_backend_splits_a_step_between_its_two_kernels runs the kernel on two KV heads.
MGPU_CASES = [
    # (heads, kv heads, head_dim, page_size, q_lens, cached), pages_per_block, ping-pong and heavy blocks first
    ((4, 1, 64, 16, [37, 1], [200, 40]), 4, False),  # 4 K/V blocks, 2 slots: slots reused; warpgroup 1 walks further
    ((1, 1, 128, 16, [70, 1, 20], [0, 33, 16]), None, True),  # no GQA: 64 tokens a warpgroup
    ((7, 1, 64, 64, [1, 12, 1], [30, 4, 0]), None, True),  # 7 heads per KV head, padded to 8
]


@pytest.mark.parametrize("case,pages_per_block,tuned", MGPU_CASES)
def test_mgpu_prefill_kernel_matches_reference(case, pages_per_block, tuned):
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case + (None, None), jnp.bfloat16,
                                                                               extra_seqs=0)
    got = paged_prefill_mgpu.paged_prefill_attention(q, k_pages, v_pages, meta, scale=kwargs["scale"], interpret=True,
                                                     pages_per_block=pages_per_block, pingpong=tuned,
                                                     heavy_first=tuned)
    assert got.shape == q.shape
    assert relative_error(got[:total], want) < 1e-2


def test_gpu_backend_splits_a_step_between_its_two_kernels():
    """Long chunks to the Mosaic GPU kernel, decodes and short chunks to the Triton kernel (both in their
    interpreters): together they give the reference's output, and neither writes the other's tokens."""
    q_lens, cached = [33, 1, 10], [5, 60, 0]  # a long chunk (>= 32 tokens at 4 heads a KV head), a decode, a short one
    case = (4, 1, 64, 16, q_lens, cached, None, None)
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, jnp.bfloat16)
    got = gpu_attention(q, k_pages, v_pages, meta, prefill_kernel=True, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2
    long = np.repeat(np.asarray(q_lens) >= 32, q_lens)
    only_long = paged_prefill_mgpu.paged_prefill_attention(q, k_pages, v_pages, meta, scale=kwargs["scale"],
                                                           only_long=True, interpret=True)
    assert not np.asarray(only_long[:total][~long].astype(jnp.float32)).any()
    assert relative_error(only_long[:total][long], want[long]) < 1e-2

    # no short sequence with tokens: the backend skips the Triton kernel
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference((4, 1, 64, 16, [33], [40], None, None),
                                                                               jnp.bfloat16)
    got = gpu_attention(q, k_pages, v_pages, meta, prefill_kernel=True, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2
    assert not np.asarray(got[total:]).any(), "padding tokens get zeros"


def test_gpu_backend_lowers_for_cuda_with_the_mosaic_gpu_kernel():
    """The real (not interpreted) Mosaic GPU kernel, with wgmma, TMA and its SMEM layouts, lowered for
    CUDA on the CPU: lowering errors of the installed JAX surface here instead of only on a device."""
    case = (32, 8, 128, 16, [129, 1], [0, 40], None, None)
    (q, k_pages, v_pages, meta, _), kwargs, _ = grid_case_and_reference(case, jnp.bfloat16)
    attend = jax.jit(lambda *args: gpu_attention(*args, prefill_kernel=True, **kwargs))
    text = attend.trace(q, k_pages, v_pages, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" in text.lower()


def test_gpu_backend_keeps_buckets_below_a_block_on_the_triton_kernel():
    """A step whose token bucket is smaller than a Mosaic query block (here 15 tokens for 3 sequence rows,
    as a short prompt chunk in an engine with few rows) can have no long sequence: it runs the Triton
    kernel alone, without the conditional that picks kernels (lowered for CUDA on the CPU)."""
    case = (32, 8, 128, 16, [10], [40], None, None)
    (q, k_pages, v_pages, meta, _), kwargs, _ = grid_case_and_reference(case, jnp.bfloat16)
    assert q.shape[0] > meta.kv_lens.shape[0] and q.shape[0] < paged_prefill_mgpu.tokens_per_block(4)
    attend = jax.jit(lambda *args: gpu_attention(*args, prefill_kernel=True, **kwargs))
    text = attend.trace(q, k_pages, v_pages, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" not in text.lower()
    assert "stablehlo.case" not in text and "stablehlo.if" not in text
