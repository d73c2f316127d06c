"""Ragged paged attention for GPUs, in Pallas (Triton lowering): the optimisation of
`kernels/reference.py:ragged_paged_attention`, checked against it in tests.

Work is split into query blocks that never straddle sequences: block i covers `block_q` tokens of one
sequence (its prefill chunk, or its single decode token) for one KV head, i.e. block_q * G' rows of
queries (the G query heads sharing the KV head, padded to G', a power of two as Triton's tiles need),
so K/V pages are read once per group. Each program walks
that sequence's pages through the page table, `pages_per_block` pages at a time, with an online
softmax (flash attention), applying the causal mask over the cached prefix, the sliding window and
logit soft-capping. Pages past the block's last position, or before the window, are never read.

Decode batches with few query blocks (up to 512) also split each block's pages up to `kv_splits` ways across
programs (flash decoding), each taking at least `min_blocks_per_split` blocks: each writes an
unnormalised partial output with its running max and sum, and a small jnp step combines them.
Larger decode-sized steps (no more tokens than sequences, unsplit) take 2 tokens a block and load each
key block's page ids one block ahead. Blocks run longest walk first, each block's KV heads side by side,
so that a long context does not run on alone after the rest of the grid has finished.

Queries come as rows by KV head (`query_rows`) or, for power-of-two groups, as q [T, H, D] viewed as
[T, KVH, G, D]: read in place, with the unsplit output written in the same layout (no layout passes
around the kernel). An fp8 pool is widened to float16 in registers (see `_kernel`).

Two modes serve cascade attention (shared_prefix.py): `causal=False` lets every query see all of its
sequence's keys (a prefix shared by a group's queries), and `partials=True` returns the unnormalised
pieces instead of the output, to be merged with another call's.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from sgjax.kernels.metadata import AttentionMetadata, plan_query_blocks

MASK_VALUE = -1e30
DECODE_KV_SPLITS = 4  # context splits of small decode batches (see ragged_paged_attention_rows); A/B knob


def _kernel(seq_ref, start_ref, valid_ref, *refs, **options):
    """One program: query block `program_id(1)` of KV head `program_id(0)`, context split `program_id(2)`."""
    i = pl.program_id(1)
    _serve_block(seq_ref[i], start_ref[i], valid_ref[i], pl.program_id(2), *refs, **options)


def _serve_block(seq, t0, valid, split, kv_lens_ref, qsl_ref, page_table_ref, q_ref, k_ref, v_ref, *refs,
                 block_q: int, group: int, padded_group: int, pages_per_block: int, scale: float,
                 window: int | None, softcap: float | None, exact: bool, kv_splits: int, min_blocks_per_split: int,
                 causal: bool, partials: bool, prefetch: int, q_by_token: bool):
    q_start, q_end, kv_len = qsl_ref[seq], qsl_ref[seq + 1], kv_lens_ref[seq]
    rows = block_q * padded_group
    page_size, head_dim = k_ref.shape[-2], k_ref.shape[-1]
    block_k = pages_per_block * page_size
    dot = functools.partial(plgpu.dot, allow_tf32=False if exact else None)

    row = jnp.arange(rows, dtype=jnp.int32)
    tok = t0 + row // padded_group
    row_ok = (tok < q_end) & (valid > 0) & (row % padded_group < group)
    # Not causal (a shared prefix read for the queries that follow it): every query sees all kv_len keys,
    # as one at position kv_len - 1 would.
    offset = kv_len - (q_end - q_start) if causal else kv_len - 1 - (t0 - q_start)
    pos = offset + tok - q_start if causal else jnp.full((rows,), kv_len - 1, jnp.int32)
    # An fp8 pool's pages are widened to float16, not the queries' bf16: e4m3/e5m2 -> f16 is one
    # conversion instruction per pair (and exact), where bf16 needs two steps through f32, and those
    # conversions, not the halved bytes, bounded the fp8 kernel. The queries and the probabilities go to
    # f16 for the dots too (accumulated in f32 either way).
    compute_dtype = jnp.float16 if jnp.dtype(k_ref.dtype).itemsize == 1 else q_ref.dtype
    if q_by_token:  # q_ref [T, G, D]: this KV head's query heads, token by token (see ragged_paged_attention)
        in_range = (t0 + jnp.arange(block_q, dtype=jnp.int32) < q_ref.shape[0])[:, None, None]
        q = plgpu.load(q_ref.at[pl.ds(t0, block_q)], mask=in_range, other=0).reshape(rows, head_dim)
    else:
        q = q_ref[pl.ds(t0 * padded_group, rows), :]
    q = q.astype(compute_dtype)

    last = jnp.minimum(offset + jnp.minimum(t0 + block_q, q_end) - 1 - q_start, kv_len - 1)
    end_block = jnp.where(valid > 0, pl.cdiv(last + 1, block_k), 0)
    start_block = 0 if window is None else jnp.maximum(offset + t0 - q_start - window + 1, 0) // block_k

    table_blocks = page_table_ref.shape[1] // pages_per_block

    def block_pages(kb):
        return page_table_ref[seq, pl.ds(jnp.clip(kb, 0, table_blocks - 1) * pages_per_block, pages_per_block)]

    def block_kv(pages):
        # An fp8 pool is widened in registers: the bytes read are what it saves.
        k, v = k_ref[pages].reshape(block_k, head_dim), v_ref[pages].reshape(block_k, head_dim)
        return k.astype(compute_dtype), v.astype(compute_dtype)

    def fetch(kb):
        """What the loop carries of block kb ahead of its use (`prefetch`): nothing, its page ids, or its K/V."""
        return () if prefetch == 0 else (block_pages(kb),) if prefetch == 1 else block_kv(block_pages(kb))

    def body(kb, carry, masked: bool, hi):
        o, m, denom, *ahead = carry
        # Prefetching: block kb + 1's loads are issued before block kb's math, so their latency overlaps
        # it (the last block fetches itself again, from cache).
        ahead_next = fetch(jnp.minimum(kb + 1, hi - 1))
        if prefetch == 0:
            k, v = block_kv(block_pages(kb))
        elif prefetch == 1:
            k, v = block_kv(ahead[0])
        else:
            k, v = ahead
        s = dot(q, k, trans_b=True) * scale
        if softcap is not None:
            s = softcap * jnp.tanh(s / softcap)
        if masked:
            j = kb * block_k + jnp.arange(block_k, dtype=jnp.int32)
            visible = row_ok[:, None] & (j[None, :] <= pos[:, None]) & (j[None, :] < kv_len)
            if window is not None:
                visible &= pos[:, None] - j[None, :] < window
            s = jnp.where(visible, s, MASK_VALUE)
        m_next = jnp.maximum(m, s.max(axis=-1))
        correction = jnp.exp(m - m_next)
        p = jnp.exp(s - m_next[:, None])
        denom_next = correction * denom + p.sum(axis=-1)
        o_next = correction[:, None] * o + dot(p.astype(v.dtype), v)
        return (o_next, m_next, denom_next, *ahead_next)

    # Blocks wholly before the block's first position need no mask (every row sees all their keys):
    # they run without it, and only the blocks on the diagonal (or in a window's reach) build one.
    # Rows that are padding see real keys there too: finite values, never stored.
    full_end = start_block if window is not None else (offset + t0 - q_start + 1) // block_k

    def walk(lo, hi, carry):
        carry = (*carry, *fetch(jnp.minimum(lo, hi - 1)))
        carry = jax.lax.fori_loop(lo, jnp.minimum(hi, full_end), functools.partial(body, masked=False, hi=hi), carry)
        carry = jax.lax.fori_loop(jnp.maximum(lo, full_end), hi, functools.partial(body, masked=True, hi=hi), carry)
        return carry[:3]

    init = (jnp.zeros((rows, head_dim), jnp.float32), jnp.full((rows,), MASK_VALUE, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    block_rows = pl.ds(t0 * padded_group, rows)
    if kv_splits == 1 and not partials:
        o, _, denom = walk(start_block, end_block, init)
        o_ref = refs[-1]
        out = (o / jnp.where(denom > 0, denom, 1.0)[:, None]).astype(o_ref.dtype)
        if q_by_token:
            plgpu.store(o_ref.at[pl.ds(t0, block_q)], out.reshape(block_q, padded_group, head_dim),
                        mask=row_ok.reshape(block_q, padded_group)[:, :, None])
        else:
            plgpu.store(o_ref.at[block_rows, :], out, mask=row_ok[:, None])
        return
    # Short contexts use fewer splits: each program walks at least min_blocks_per_split blocks, so its
    # loads pipeline; the splits left without blocks only write an empty partial result.
    per_split = jnp.maximum(pl.cdiv(end_block - start_block, kv_splits), min_blocks_per_split)
    lo = start_block + split * per_split
    o, m, denom = walk(lo, jnp.minimum(lo + per_split, end_block), init)
    o_ref, m_ref, d_ref = refs[-3:]
    plgpu.store(o_ref.at[block_rows, :], o, mask=row_ok[:, None])
    plgpu.store(m_ref.at[block_rows], m, mask=row_ok)
    plgpu.store(d_ref.at[block_rows], denom, mask=row_ok)


def query_rows(q: jax.Array, num_kv_heads: int) -> jax.Array:
    """q [T, H, D] -> query rows by KV head [KVH, T * G', D]: row token * G' + m is query head m of the KV
    head's group (G' the group size rounded up to a power of two; its padding heads are zero)."""
    num_tokens, num_heads, head_dim = q.shape
    group = num_heads // num_kv_heads
    padded_group = pl.next_power_of_2(group)
    rows = q.reshape(num_tokens, num_kv_heads, group, head_dim).transpose(1, 0, 2, 3)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, padded_group - group), (0, 0)))
    return rows.reshape(num_kv_heads, num_tokens * padded_group, head_dim)


def token_major(rows: jax.Array, num_tokens: int, padded_group: int) -> jax.Array:
    """Output rows [KVH, >= T * G', D] -> [T, KVH, G', D]."""
    num_kv_heads, _, head_dim = rows.shape
    rows = rows[:, : num_tokens * padded_group].reshape(num_kv_heads, num_tokens, padded_group, head_dim)
    return rows.transpose(1, 0, 2, 3)


def tokens_from_rows(rows: jax.Array, num_tokens: int, num_heads: int) -> jax.Array:
    """Output rows [KVH, >= T * G', D] -> [T, H, D], without the padding heads."""
    num_kv_heads, _, head_dim = rows.shape
    group = num_heads // num_kv_heads
    out = token_major(rows, num_tokens, pl.next_power_of_2(group))[:, :, :group]
    return out.reshape(num_tokens, num_heads, head_dim)


def ragged_paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                           include: jax.Array | None = None, **kwargs) -> jax.Array:
    """Causal attention of q [T, H, D] over each token's paged K/V ([KVH, pages, page_size, D]) -> [T, H, D];
    only for the tokens of the sequences `include` marks ([B] bool) when given (the others get zeros).
    Options: `ragged_paged_attention_rows`."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_pages.shape[0]
    group = num_heads // num_kv_heads
    # Power-of-two groups: the queries as they come, viewed by KV head (free): no layout pass before the
    # kernel, and an unsplit kernel writes the output in the same layout, so none after it either (~7 us a
    # layer of a 384-token step). Padded groups go through the row layout.
    by_token = group == pl.next_power_of_2(group)
    queries = q.reshape(num_tokens, num_kv_heads, group, head_dim) if by_token else query_rows(q, num_kv_heads)
    out = ragged_paged_attention_rows(queries, k_pages, v_pages, meta, num_tokens=num_tokens, num_heads=num_heads,
                                      include=include, **kwargs)
    if out.ndim == 4:
        return out.reshape(num_tokens, num_heads, head_dim)
    return tokens_from_rows(out, num_tokens, num_heads)


@functools.partial(jax.jit, static_argnames=("num_tokens", "num_heads", "scale", "sliding_window", "softcap",
                                             "block_q", "pages_per_block", "kv_splits", "min_blocks_per_split",
                                             "num_warps", "num_stages", "causal", "partials", "prefetch",
                                             "interpret"))
def ragged_paged_attention_rows(q_rows: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata,
                                *, num_tokens: int, num_heads: int, scale: float, sliding_window: int | None = None,
                                softcap: float | None = None, block_q: int | None = None,
                                pages_per_block: int | None = None, kv_splits: int | None = None,
                                min_blocks_per_split: int = 2, num_warps: int = 4, num_stages: int = 1,
                                include: jax.Array | None = None, causal: bool = True, partials: bool = False,
                                prefetch: int | None = None, interpret: bool = False):
    """The kernel on query rows (`query_rows`) -> output rows [KVH, >= T * G', D] in the same layout (rows of
    tokens it does not serve are zero). Queries may also come token-major, [T, KVH, G, D] with G a power of
    two (q [T, H, D] reshaped): the output is then [T, KVH, G, D] too, unless the context is split (the
    combined partials come back as rows, [KVH, T * G, D]).

    `causal=False`: each query sees all of its sequence's kv_lens keys (a shared prefix, see
    shared_prefix.py). `prefetch`: what of the next key block each iteration loads ahead (0 nothing, 1 its
    page ids, 2 its K/V; default 1 on unsplit decode-sized steps, else 0). `partials=True`: return the
    unnormalised softmax pieces instead, (out [KVH, S, R, D] float32, running max [KVH, S, R], sum [KVH,
    S, R]) over the S context splits, for `combine_partials` to merge with others."""
    head_dim = q_rows.shape[-1]
    q_by_token = q_rows.ndim == 4
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    padded_group = pl.next_power_of_2(group)
    num_seqs = meta.kv_lens.shape[0]
    # Defaults from scripts/bench_attention.py on an H100: decode batches one token per
    # block, 64 keys a step, 4 warps; prefill 64 query rows (16 tokens at G=4) by 64 keys, 4 warps. A
    # 4k causal prefill alone ran faster with 128 rows by 128 keys and 8 warps (0.597 against 0.652 ms),
    # but in the engine's mixed steps every decode sequence then fills a 32-token block: their prefill
    # steps went from ~235 to 253 ms in a ShareGPT-like run, so the smaller tile stays.
    # Decode batches of up to 512 query blocks (64 tokens at 8 KV heads) split the context 4 ways: with
    # few programs, each walking its context alone is latency-bound (engine-shaped batch 16 at context
    # 2k: 0.20 ms a layer unsplit, 0.083 ms split 4 ways, 0.088 ms 8 ways); larger batches have programs
    # enough and splitting slowed them (batch 256 at context 512: 0.34 ms split 8 ways against 0.26 ms).
    # A full batch of 64 at 2k ran faster unsplit (0.246 against 0.267 ms), but the engine's 64-token
    # bucket mostly holds fewer sequences: splitting it only from 32 tokens made a ShareGPT-like run 6%
    # slower, and capping the splits on the device by the real number of tokens made the full batch
    # slower still (0.285 ms: split programs at 3 pipeline stages walking the whole context).
    # One pipeline stage everywhere (Triton's software pipelining off): num_stages=1 was timed
    # against the earlier 4 (unsplit decode), 2 (split decode) and 3 (prefill) on an H100 and it won in
    # every case: batch 64 at 2k / 8k 0.257 -> 0.221 / 0.869 -> 0.783 ms, batch 256 at 512 0.253 ->
    # 0.223, engine-shaped batch 1 at 1k 0.029 -> 0.019 ms a layer, batch 16 at 2k 0.080 -> 0.064,
    # a 4k causal prefill 0.661 -> 0.617 ms.
    # Unsplit decode-sized steps take 2 tokens a block (8 query rows at G'=4) and load the
    # next block's page ids ahead. Such steps carry prompt chunks under step_token_target, and one token
    # a block made each chunk token walk its context alone: 190 decodes + a 194-token chunk after 700
    # cached went 0.226 -> 0.182 ms a layer, with chunks of 150 and 44 0.178 -> 0.165, 384 decodes alone
    # 0.280 -> 0.277 (bench_attention --cases mixed). Four tokens a block cost pure decode 4%, loading
    # the next block's K/V ahead 2-10%, two KV heads a program 20-25%; running the longest walks first
    # changed nothing while KV heads were the grid's slow axis; with the KV heads as the fast axis
    # (below) longest walks first took the mixed cases 0.163 / 0.180 /
    # 0.276 -> 0.135 / 0.165 / 0.237 ms a layer, batch 1 at 1k 0.075 -> 0.063, but uniform batch 256 at
    # 512 0.224 -> 0.235; end to end (ShareGPT-like, lof + 384) 16.73 -> 15.78 s.
    if q_by_token and q_rows.shape[:3] != (num_tokens, num_kv_heads, padded_group):
        raise ValueError(f"token-major queries {q_rows.shape} do not match {num_tokens} tokens of {num_kv_heads} KV "
                         f"heads in groups of {padded_group} (a power of two)")
    decode = num_tokens <= num_seqs
    if kv_splits is None:  # split only small decode batches: larger ones have programs enough
        kv_splits = DECODE_KV_SPLITS if decode and num_tokens * num_kv_heads <= 512 else 1
    if block_q is None:
        block_q = (max(1, 8 // padded_group) if kv_splits == 1 else 1) if decode else max(16, 64 // padded_group)
    if pages_per_block is None:
        pages_per_block = max(1, 64 // page_size)
    if prefetch is None:
        prefetch = 1 if decode and kv_splits == 1 else 0
    rows = block_q * padded_group
    blocks = plan_query_blocks(meta.query_start_loc, num_tokens, block_q, include)
    seq, start, valid = blocks
    # Longest walks first, all KV heads of a block side by side (heads are the grid's fastest axis): a
    # program walking a long context alone then starts with the first wave instead of, for the last KV
    # heads, near the end of the grid, where it ran on after every other program had finished.
    q_end = meta.query_start_loc[seq + 1]
    walk = jnp.where(valid > 0, meta.kv_lens[seq] - (q_end - jnp.minimum(start + block_q, q_end)), -1)
    order = jnp.argsort(-walk, stable=True)
    blocks = [x[order] for x in blocks]

    if not q_by_token:  # a block's reads run up to `rows` past the last token (token-major loads are masked)
        q_rows = jnp.pad(q_rows, ((0, 0), (0, rows), (0, 0)))
    page_table = jnp.pad(meta.page_table, ((0, 0), (0, pages_per_block)))  # reads past the end hit page 0
    full = lambda *shape: pl.BlockSpec(shape, lambda h, i, s: (0,) * len(shape))  # noqa: E731
    per_head = lambda *shape: pl.BlockSpec((None, *shape), lambda h, i, s: (h,) + (0,) * len(shape))  # noqa: E731
    per_split = lambda *shape: pl.BlockSpec((None, None, *shape), lambda h, i, s: (h, s) + (0,) * len(shape))  # noqa: E731
    kernel = functools.partial(_kernel, block_q=block_q, group=group,
                               padded_group=padded_group,
                               pages_per_block=pages_per_block, scale=scale, window=sliding_window, softcap=softcap,
                               exact=q_rows.dtype == jnp.float32, kv_splits=kv_splits,
                               min_blocks_per_split=min_blocks_per_split, causal=causal, partials=partials,
                               prefetch=prefetch, q_by_token=q_by_token)
    # Outputs start initialised (zeros; running max at MASK_VALUE) so rows no block owns stay harmless.
    num_rows = num_tokens * padded_group if q_by_token else q_rows.shape[1]
    by_head = pl.BlockSpec((num_tokens, None, padded_group, head_dim), lambda h, i, s: (0, h, 0, 0))
    q_spec = by_head if q_by_token else per_head(*q_rows.shape[1:])
    if kv_splits == 1 and not partials:
        outputs = [jnp.zeros_like(q_rows)]
        out_specs = [by_head if q_by_token else per_head(num_rows, head_dim)]
    else:
        outputs = [jnp.zeros((num_kv_heads, kv_splits, num_rows, head_dim), jnp.float32),
                   jnp.full((num_kv_heads, kv_splits, num_rows), MASK_VALUE, jnp.float32),
                   jnp.zeros((num_kv_heads, kv_splits, num_rows), jnp.float32)]
        out_specs = [per_split(num_rows, head_dim), per_split(num_rows), per_split(num_rows)]
    inputs = [*blocks, meta.kv_lens, meta.query_start_loc, page_table, q_rows, k_pages, v_pages]
    results = pl.pallas_call(
        kernel,
        grid=(num_kv_heads, blocks[0].shape[0], kv_splits),
        in_specs=[full(*x.shape) for x in inputs[:-3]] + [q_spec] + [per_head(*x.shape[1:]) for x in inputs[-2:]]
        + out_specs,
        out_specs=out_specs,
        out_shape=[jax.ShapeDtypeStruct(x.shape, x.dtype) for x in outputs],
        input_output_aliases={len(inputs) + k: k for k in range(len(outputs))},
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="ragged_paged_attention",  # the kernel's name in profiles
    )(*inputs, *outputs)
    if kv_splits == 1 and not partials:
        return results[0]
    return tuple(results) if partials else combine_partials(*results, q_rows.dtype)


def combine_partials(o: jax.Array, m: jax.Array, denom: jax.Array, dtype) -> jax.Array:
    """Unnormalised softmax pieces over parts of the keys (axis 1: out [KVH, S, R, D], running max and sum
    [KVH, S, R]) -> the attention output rows [KVH, R, D] over all of them."""
    weight = jnp.exp(m - m.max(axis=1, keepdims=True))
    total = (weight * denom).sum(axis=1)
    return ((weight[..., None] * o).sum(axis=1) / jnp.where(total > 0, total, 1.0)[..., None]).astype(dtype)
