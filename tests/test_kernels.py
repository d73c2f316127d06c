"""Pallas kernels against kernels/reference.py (the definition), in interpret mode on the CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.kernels import reference
from sgjax.kernels.gpu import paged_prefill_mgpu
from sgjax.kernels.gpu import ragged_paged_attention as gpu_kernel
from sgjax.kernels.gpu.attention import paged_attention as gpu_attention
from sgjax.kernels.metadata import plan_query_blocks
from sgjax.kernels.tpu import ragged_paged_attention as tpu_kernel


def random_case(seed, *, num_heads, num_kv_heads, head_dim, page_size, q_lens, cached, dtype, extra_tokens=5,
                extra_seqs=2):
    """A mixed batch: each sequence has `cached` tokens in the pool and `q_len` new ones; padded with
    `extra_tokens` tokens and `extra_seqs` empty sequences."""
    rng = np.random.default_rng(seed)
    pages_each = [-(-(c + n) // page_size) for c, n in zip(cached, q_lens)]
    num_pages = 1 + sum(pages_each) + 3
    order = rng.permutation(np.arange(1, num_pages))  # scattered pages, as after some serving
    chunks, at = [], 0
    for c, n, p in zip(cached, q_lens, pages_each):
        chunks.append(SeqChunk(rng.integers(0, 100, n).tolist(), c, order[at:at + p].tolist()))
        at += p
    total = sum(q_lens)
    batch = make_batch(chunks, page_size, num_tokens=total + extra_tokens, num_seqs=len(chunks) + extra_seqs)
    meta = jax.tree.map(jnp.asarray, batch.meta)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((total + extra_tokens, num_heads, head_dim)), dtype)
    return q, k_pages, v_pages, meta, total


def test_write_kv_writes_each_token_in_its_slot_and_drops_padding():
    """Against a numpy oracle: each real token's K/V lands at its page and offset, padding tokens (slots
    past the pool) write nothing, every other slot keeps its value."""
    q, k_pages, v_pages, meta, total = random_case(3, num_heads=4, num_kv_heads=2, head_dim=8, page_size=4,
                                                   q_lens=[3, 1, 9], cached=[0, 6, 2], dtype=jnp.float32,
                                                   extra_tokens=7)
    rng = np.random.default_rng(4)
    k, v = (jnp.asarray(rng.standard_normal((q.shape[0], 2, 8)), jnp.float32) for _ in range(2))
    new_k, new_v = jax.jit(reference.write_kv)(k_pages, v_pages, k, v, meta.slot_mapping)
    slots = np.asarray(meta.slot_mapping)
    assert (slots[total:] >= k_pages.shape[1] * k_pages.shape[2]).all()  # padding points past the pool
    for pages, new, x in ((k_pages, new_k, k), (v_pages, new_v, v)):
        want = np.asarray(pages).reshape(2, -1, 8).copy()
        want[:, slots[:total]] = np.asarray(x)[:total].swapaxes(0, 1)
        np.testing.assert_array_equal(np.asarray(new).reshape(2, -1, 8), want)


GRID = [
    # (heads, kv heads, head_dim, page_size, q_lens, cached, window, softcap)
    (8, 2, 64, 16, [1, 1, 1, 1], [5, 40, 17, 100], None, None),  # decodes
    (8, 8, 128, 16, [37, 1, 20, 1], [0, 33, 16, 7], None, None),  # mixed prefill + decode, no GQA
    (4, 1, 256, 32, [9, 50], [64, 3], 8, 30.0),  # Gemma-2-like: window and soft-cap
    (16, 4, 128, 128, [3, 130, 1], [200, 0, 257], 64, None),  # large pages, window
    (8, 2, 64, 64, [70], [0], None, 5.0),  # one long prefill chunk
    (14, 2, 64, 16, [1, 12, 1], [30, 4, 0], None, None),  # 7 heads per KV head (Qwen2.5-7B): padded to 8
]


def grid_case_and_reference(case, dtype, **extra):
    """A GRID case's inputs, the attention options it names, and the reference's output (float32).
    `extra`: random_case's padding (extra_tokens, extra_seqs), where not its defaults."""
    heads, kv_heads, head_dim, page_size, q_lens, cached, window, softcap = case
    inputs = random_case(len(q_lens) + head_dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         page_size=page_size, q_lens=q_lens, cached=cached, dtype=dtype, **extra)
    q, k_pages, v_pages, meta, total = inputs
    kwargs = dict(scale=head_dim**-0.5, sliding_window=window, softcap=softcap)
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total].astype(jnp.float32)
    return inputs, kwargs, want


def relative_error(got, want) -> float:
    got = got.astype(jnp.float32)
    assert np.isfinite(np.asarray(got)).all()
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


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


@pytest.mark.parametrize("case", GRID)
@pytest.mark.parametrize("dtype,tolerance", [(jnp.float32, 1e-4), (jnp.bfloat16, 1e-2)])
def test_tpu_kernel_matches_reference(case, dtype, tolerance):
    """The TPU kernel in the TPU interpreter (its DMAs, semaphores and SMEM scalars simulated)."""
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, dtype)
    # the default; one token per query block (decode batches); small query blocks walking one page at
    # a time (many double-buffered K/V blocks per program)
    for block_q, pages_per_block in ((None, None), (1, None), (4, 1)):
        got = tpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, block_q=block_q,
                                                pages_per_block=pages_per_block, **kwargs)
        assert got.shape == q.shape
        assert not np.asarray(got[total:]).any(), "padding tokens get zeros"
        rel = relative_error(got[:total], want)
        assert rel < tolerance, f"block_q={block_q}, pages_per_block={pages_per_block}: relative error {rel:.2e}"


@pytest.mark.parametrize("kv_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("case", [GRID[0], GRID[1], GRID[2]])
def test_kernels_read_an_fp8_pool_as_the_reference_does(case, kv_dtype):
    """bf16 queries over an fp8 pool (--kv-cache-dtype): the GPU kernel (decode-sized and split variants),
    the TPU kernel and the GPU backend against the reference on the same fp8 pages."""
    (q, k_pages, v_pages, meta, total), kwargs, _ = grid_case_and_reference(case, jnp.bfloat16)
    k_pages, v_pages = k_pages.astype(kv_dtype), v_pages.astype(kv_dtype)
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total].astype(jnp.float32)
    for variant in (dict(), dict(block_q=2, prefetch=1), dict(kv_splits=3, min_blocks_per_split=1)):
        got = gpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, **variant, **kwargs)
        assert got.dtype == q.dtype
        assert relative_error(got[:total], want) < 1e-2, variant
    # the Mosaic GPU kernel reads pages in the queries' dtype: the backend gives fp8 chunks to the Triton one
    head_dim, page_size = q.shape[-1], k_pages.shape[2]
    group = q.shape[1] // k_pages.shape[0]
    assert not paged_prefill_mgpu.supports(q.dtype, kv_dtype, head_dim, page_size, group, None, None)
    got = gpu_attention(q, k_pages, v_pages, meta, prefill_kernel=True, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2
    got = tpu_kernel.ragged_paged_attention(q, k_pages, v_pages, meta, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2


def test_write_kv_into_an_fp8_pool_rounds_and_saturates():
    """Values round to the nearest fp8 value (numpy's ml_dtypes cast, the oracle) and those beyond the
    format's range are stored as its largest value, not NaN or inf."""
    pages = jnp.zeros((1, 3, 2, 4), jnp.float8_e4m3fn)
    k = jnp.asarray([[[0.3, -1.7, 1000.0, -5000.0]], [[2.0, 0.01, -448.0, 449.0]]], jnp.float32)
    new_k, _ = reference.write_kv(pages, pages, k, k, jnp.asarray([2, 5], jnp.int32))
    got = np.asarray(new_k.astype(jnp.float32)).reshape(6, 4)
    want = np.clip(np.asarray(k)[:, 0], -448, 448).astype(jnp.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(got[[2, 5]], want)
    assert got[[2, 5]].tolist()[0][2:] == [448.0, -448.0]
    assert not got[[0, 1, 3, 4]].any()


# The Mosaic GPU prefill kernel in its interpreter: bf16 only (wgmma), no window or soft-cap (those
# configurations use the Triton kernel), K/V blocks of 64 keys or more. The interpreter takes seconds a
# program (KV head x query block) whatever its work, so these cases have one KV head and no padding
# sequences; test_gpu_backend_splits_a_step_between_its_two_kernels runs the kernel on two KV heads.
MGPU_CASES = [
    # (heads, kv heads, head_dim, page_size, q_lens, cached), pages_per_block, ping-pong and heavy blocks first
    ((4, 1, 64, 16, [37, 1], [200, 40]), 4, True),  # 4 K/V blocks, 2 slots: slots reused; warpgroup 1 walks further
    ((4, 1, 64, 16, [37, 1], [200, 40]), 4, False),
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
    q_lens, cached = [40, 1, 10, 1, 33], [5, 60, 0, 7, 100]  # long chunks: >= 32 tokens at 4 heads a KV head
    case = (8, 2, 64, 16, q_lens, cached, None, None)
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference(case, jnp.bfloat16)
    got = gpu_attention(q, k_pages, v_pages, meta, prefill_kernel=True, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2
    long = np.repeat(np.asarray(q_lens) >= 32, q_lens)
    only_long = paged_prefill_mgpu.paged_prefill_attention(q, k_pages, v_pages, meta, scale=kwargs["scale"],
                                                           only_long=True, interpret=True)
    assert not np.asarray(only_long[:total][~long].astype(jnp.float32)).any()
    assert relative_error(only_long[:total][long], want[long]) < 1e-2

    # no short sequence with tokens: the backend skips the Triton kernel
    (q, k_pages, v_pages, meta, total), kwargs, want = grid_case_and_reference((8, 2, 64, 16, [33], [40], None, None),
                                                                               jnp.bfloat16)
    got = gpu_attention(q, k_pages, v_pages, meta, prefill_kernel=True, interpret=True, **kwargs)
    assert relative_error(got[:total], want) < 1e-2
    assert not np.asarray(got[total:]).any(), "padding tokens get zeros"


def test_gpu_backend_lowers_for_cuda_with_the_mosaic_gpu_kernel():
    """The real (not interpreted) Mosaic GPU kernel, with wgmma, TMA and its SMEM layouts, lowered for
    CUDA on the CPU: lowering errors of the installed JAX surface here instead of only on a device."""
    case = (32, 8, 128, 16, [300, 129, 1], [0, 500, 40], None, None)
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


@pytest.mark.parametrize("block_q", [1, 2, 16])
@pytest.mark.parametrize("full_decode", [False, True])
def test_query_blocks_match_a_naive_plan_and_stay_in_the_batch(block_q, full_decode):
    """Blocks of block_q tokens never straddle sequences, cover every token of the included sequences once
    and, past the last, start inside the batch (kernels read a block's queries before checking it).
    `full_decode`: one token per sequence filling the bucket, where there are as many blocks as tokens."""
    rng = np.random.default_rng(block_q)
    q_lens = np.ones(48, np.int64) if full_decode else rng.choice([0, 1, 1, 1, 2, 5, 40], size=48)
    include = np.ones(48, bool) if full_decode else rng.random(48) < 0.8
    num_tokens = int(q_lens.sum()) + (0 if full_decode else 7)  # padding tokens after the last sequence's
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    want = [(b, int(qsl[b]) + j) for b in range(48) if include[b] for j in range(0, int(q_lens[b]), block_q)]
    seq, start, valid = (np.asarray(x) for x in
                         plan_query_blocks(jnp.asarray(qsl), num_tokens, block_q, jnp.asarray(include)))
    got = [(int(b), int(t)) for b, t, ok in zip(seq, start, valid) if ok]
    assert got == want
    assert not valid[len(want):].any()
    assert ((start >= 0) & (start < num_tokens)).all()


def test_pallas_backend_falls_back_with_a_warning_on_cpu(caplog):
    from sgjax.kernels import resolve_backend

    with caplog.at_level("WARNING"):
        assert resolve_backend("pallas") == "reference"
    assert "no Pallas attention kernel for platform 'cpu'" in caplog.text
    assert resolve_backend("reference") == "reference"
    with pytest.raises(ValueError, match="unknown attention backend"):
        resolve_backend("flash")


@pytest.mark.parametrize("rows,width,dtype", [(8, 64, jnp.bfloat16), (6, 128, jnp.bfloat16), (5, 32, jnp.float32)])
def test_add_rms_norm_kernel_matches_the_models_add_then_norm(rows, width, dtype):
    """The fused residual add + RMSNorm (interpreted) against the model's own add, then RMSNorm module:
    the same sum and, rounded as the module rounds, the same normalised rows. The layer's path without
    the kernel (RMSNorm.add_and_norm) is that add, then the module."""
    from sgjax.kernels.gpu.add_rms_norm import add_rms_norm
    from sgjax.models.layers import RMSNorm

    rng = np.random.default_rng(rows + width)
    x, h = (jnp.asarray(rng.standard_normal((rows, width)) * 3, dtype) for _ in range(2))
    norm = RMSNorm(width, 1e-5, dtype)
    norm.weight[...] = jnp.asarray(rng.standard_normal(width), dtype)
    want_sum = x + h
    want_normed = norm(want_sum)
    got_sum, got_normed = add_rms_norm(x, h, norm.weight[...], eps=1e-5, interpret=True)
    plain_sum, plain_normed = norm.add_and_norm(x, h)
    np.testing.assert_array_equal(np.asarray(got_sum, np.float32), np.asarray(want_sum, np.float32))
    np.testing.assert_array_equal(np.asarray(plain_sum, np.float32), np.asarray(want_sum, np.float32))
    np.testing.assert_array_equal(np.asarray(plain_normed, np.float32), np.asarray(want_normed, np.float32))
    # float32: the mean's summation order may differ in the last bits; bf16 rounds those away
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == jnp.float32 else dict(rtol=0, atol=0)
    np.testing.assert_allclose(np.asarray(got_normed, np.float32), np.asarray(want_normed, np.float32), **tol)
    with pytest.raises(ValueError, match="power of two"):
        add_rms_norm(x[:, : width - 1], h[:, : width - 1], norm.weight[...][: width - 1], eps=1e-5, interpret=True)


def test_triton_kernels_lower_for_cuda():
    """The fused add + norm, the greedy head (with the engine's tiles for a 128k vocabulary), the top-k /
    top-p cut and the attention kernel on token-major queries, lowered for CUDA on the CPU (Triton's rules on
    shapes and reshapes are checked there, not in the interpreter)."""
    from sgjax.kernels.gpu.add_rms_norm import add_rms_norm
    from sgjax.kernels.gpu.filter_cut import filter_cut
    from sgjax.kernels.gpu.greedy_head import greedy_from_head, tiles_for

    x = jnp.ones((24, 256), jnp.bfloat16)
    text = jax.jit(lambda x: add_rms_norm(x, x, x[0], eps=1e-6)).trace(x).lower(lowering_platforms=("cuda",)).as_text()
    assert "add_rms_norm" in text
    head = jax.ShapeDtypeStruct((128256, 4096), jnp.bfloat16)
    for rows in (64, 128, 384):
        greedy = jax.jit(functools.partial(greedy_from_head, **tiles_for(rows, *head.shape)))
        text = greedy.trace(jax.ShapeDtypeStruct((rows, 4096), jnp.bfloat16), head).lower(
            lowering_platforms=("cuda",)).as_text()
        assert "greedy_head" in text
    rows_of = functools.partial(jax.ShapeDtypeStruct, (384,))
    text = jax.jit(filter_cut).trace(jax.ShapeDtypeStruct((384, 128256), jnp.float32), rows_of(jnp.int32),
                                     rows_of(jnp.float32)).lower(lowering_platforms=("cuda",)).as_text()
    assert "filter_cut" in text
    case = (32, 8, 128, 16, [1, 1, 6], [40, 300, 20], None, None)
    (q, k_pages, v_pages, meta, _), kwargs, _ = grid_case_and_reference(case, jnp.bfloat16)
    attend = jax.jit(lambda *args: gpu_kernel.ragged_paged_attention(*args, **kwargs))
    text = attend.trace(q, k_pages, v_pages, meta).lower(lowering_platforms=("cuda",)).as_text()
    assert "ragged_paged_attention" in text and "transpose" not in text


@pytest.mark.parametrize("rows,vocab,width,softcap,tiles", [
    (5, 512, 64, None, dict(block_m=16, block_v=128, block_k=32)),
    (70, 1024, 128, None, dict(block_m=64, block_v=256, block_k=64)),  # rows padded to two row blocks
    (9, 256, 64, 30.0, dict(block_m=16, block_v=64, block_k=64)),
])
def test_greedy_head_kernel_matches_argmax_and_log_softmax(rows, vocab, width, softcap, tiles):
    """The fused LM head + greedy pick (interpreted) against jnp: argmax of the float32 logits and their
    log_softmax at it. Ties across and within vocabulary blocks go to the first index, as jnp.argmax."""
    from sgjax.kernels.gpu.greedy_head import greedy_from_head
    from sgjax.models.llama import logits_from_head

    rng = np.random.default_rng(rows)
    hidden = jnp.asarray(rng.standard_normal((rows, width)), jnp.bfloat16)
    head = np.asarray(rng.standard_normal((vocab, width)) * 0.1, np.float32)
    head[[3, 5, vocab // 2, vocab - 1]] = head[3] * 4  # ties in one block and across blocks
    head = jnp.asarray(head, jnp.bfloat16)
    logits = logits_from_head(hidden, head, softcap)
    tokens, logprobs = greedy_from_head(hidden, head, softcap, interpret=True, **tiles)
    want = jnp.argmax(logits, axis=-1)
    assert (want == 3).any() and (want != 3).any()  # some rows pick the tied entries, some do not
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want))
    want_logprobs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), want[:, None], axis=-1)[:, 0]
    np.testing.assert_allclose(np.asarray(logprobs), np.asarray(want_logprobs), rtol=1e-5, atol=1e-5)


def test_greedy_head_tiles_divide_the_shapes_or_are_refused():
    from sgjax.kernels.gpu.greedy_head import greedy_from_head, tiles_for

    assert tiles_for(384, 128256, 4096) == dict(block_m=128, block_v=256, block_k=64, num_warps=8, num_stages=4)
    assert tiles_for(64, 151936, 3584)["block_v"] == 128  # Qwen2's vocabulary is a multiple of 128, not 256
    assert tiles_for(8, 500, 64) is None  # no power-of-two tile of 16 or more divides 500
    with pytest.raises(ValueError, match="multiple of 128"):
        greedy_from_head(jnp.ones((4, 64)), jnp.ones((500, 64)), interpret=True)


def _kept_by_sorting(row: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """The oracle: sort the row, cut the sorted order where top-k or top-p (float64 sums) first drops a
    token, keep every token scoring at least the last one kept (ties at the cut all kept)."""
    order = np.argsort(-row, kind="stable")
    ranked = row[order]
    probs = np.exp(ranked.astype(np.float64) - ranked.max())
    probs /= probs.sum()
    drop = ((top_k > 0) & (np.arange(len(row)) >= top_k)) | ((top_p < 1) & (np.cumsum(probs) - probs >= top_p))
    return row >= np.min(np.where(drop, np.inf, ranked))


@pytest.mark.parametrize("vocab,block,steps", [(3000, 64, 4), (1000, 128, 2), (4096, 512, 8)])
def test_filter_cut_keeps_the_sorted_cut(vocab, block, steps):
    """The filter_cut kernel (interpreted) against sorting, row by row: top-k and top-p alone and together,
    ties planted at the cut, masked (-inf) tokens, negative scores, a vocabulary the blocks do not divide."""
    from sgjax.kernels.gpu.filter_cut import filter_cut, ordered_key

    rng = np.random.default_rng(vocab)
    rows = 48
    x = rng.normal(0, 3, (rows, vocab)).astype(np.float32)
    x[:, ::7] = x[:, 3:4]  # a seventh of each row ties with one score
    x[1] = np.round(x[1])  # few distinct scores
    x[2, :200] = -np.inf  # grammar-masked tokens
    x[3] -= 50.0  # every score negative
    top_k = rng.choice([-1, 1, 5, 50, vocab - 1, vocab], rows)
    top_p = rng.choice([1.0, 0.99, 0.9, 0.5, 0.1], rows).astype(np.float32)
    top_k[:4], top_p[:4] = [-1, 7, 40, -1], [0.9, 1.0, 0.8, 0.95]
    cut = filter_cut(jnp.asarray(x), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p), block=block, steps=steps,
                     interpret=True)
    kept = np.asarray(ordered_key(jnp.asarray(x)) >= cut[:, None])
    for r in range(rows):
        np.testing.assert_array_equal(kept[r], _kept_by_sorting(x[r], top_k[r], top_p[r]),
                                      err_msg=f"row {r}: top_k {top_k[r]}, top_p {top_p[r]}")
    assert kept.sum(1).min() >= 1 and (kept.sum(1) < vocab).any()
    with pytest.raises(ValueError, match="power-of-two block"):
        filter_cut(jnp.asarray(x), jnp.asarray(top_k, jnp.int32), jnp.asarray(top_p), block=96, interpret=True)


def test_ordered_key_keeps_the_order_of_floats():
    from sgjax.kernels.gpu.filter_cut import ordered_key

    x = np.array([-np.inf, -3e38, -2.5, -1e-30, -0.0, 0.0, 1e-30, 1.0, 1.5, 3e38, np.inf], np.float32)
    keys = np.asarray(ordered_key(jnp.asarray(x))).astype(np.int64)
    assert (np.diff(keys)[:4] > 0).all() and keys[4] == keys[5] and (np.diff(keys)[5:] > 0).all()
