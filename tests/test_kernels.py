"""Kernels against their definitions in interpret mode on the CPU: the K/V write, fp8 pools, query-block
plans, the fused add + norm, the greedy head, the top-k / top-p cut; lowering for CUDA."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax.kernels import reference
from sgjax.kernels.gpu import paged_prefill_mgpu
from sgjax.kernels.gpu import ragged_paged_attention as gpu_kernel
from sgjax.kernels.gpu.attention import paged_attention as gpu_attention
from sgjax.kernels.metadata import plan_query_blocks
from sgjax.kernels.tpu import ragged_paged_attention as tpu_kernel
from tests.kernel_cases import GRID, grid_case_and_reference, random_case, relative_error


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


def test_pallas_backend_is_the_cpu_attention_on_a_cpu(caplog):
    from sgjax.kernels import cpu, resolve_backend, select

    with caplog.at_level("WARNING"):
        assert resolve_backend("pallas") == "cpu"
    assert not caplog.text
    assert select("pallas").attention is cpu.attention
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
