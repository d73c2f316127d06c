"""Paged prefill attention for Hopper GPUs, in Pallas Mosaic GPU (TMA copies and wgmma): the prefill
half of the GPU backend, where the Triton kernel (`ragged_paged_attention.py`) reaches only ~30% of the
tensor cores' rate. Checked against `kernels/reference.py` on the device (scripts/bench_attention.py)
and, in the Mosaic GPU interpreter on a CPU, with the matrix products as plain dots (the interpreter
has no register-operand wgmma).

One CTA per (KV head, query block): a block is 128 query rows, i.e. 128 / G' tokens of one sequence
times the G query heads sharing the KV head (padded to G', a power of two), gathered into aligned
[KV heads, blocks, 128, D] tiles (`metadata.queries_by_block`). Output rows go to the Triton kernel's
row layout ([KV heads, T * G', D]) with TMA stores of power-of-two row counts from an untiled SMEM
buffer, so a block ending mid-way never writes the next sequence's rows. Three warpgroups: two
compute 64 rows each, one copies K/V a block of `pages_per_block` pages at a time, page by page
through the page table, into a ring of `stages` SMEM slots (each page one TMA copy; a slot's barrier
waits for all of them). The compute warpgroups run an online softmax over the slots (flash attention)
and hand each slot back once read. Causal masking over the cached prefix is applied only on the blocks
that reach past a warpgroup's first position. No sliding window or soft-capping, and head_dim 64 or 128
(SMEM): other configurations use the Triton kernel.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from sgjax.kernels.gpu.ragged_paged_attention import tokens_from_rows
from sgjax.kernels.metadata import AttentionMetadata, plan_query_blocks, queries_by_block, token_positions

ROWS_PER_WG = 64  # rows of one wgmma: a warpgroup's share of a query block
COMPUTE_WGS = 2
BLOCK_ROWS = ROWS_PER_WG * COMPUTE_WGS
MASK_VALUE = -1e30
LOG2E = math.log2(math.e)


def supports(q_dtype, kv_dtype, head_dim: int, page_size: int, group: int, sliding_window, softcap) -> bool:
    """Whether this kernel serves the configuration (else the Triton kernel does). Its wgmma reads K/V
    pages as they are, in the queries' dtype: an fp8 pool goes to the Triton kernel, which widens them."""
    return (jnp.dtype(q_dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and jnp.dtype(kv_dtype) == jnp.dtype(q_dtype) and head_dim in (64, 128)
            and page_size % 8 == 0 and group <= ROWS_PER_WG and sliding_window is None and softcap is None)


def tokens_per_block(group: int) -> int:
    return BLOCK_ROWS // pl.next_power_of_2(group)


def long_sequences(meta: AttentionMetadata, group: int) -> jax.Array:
    """[B] bool: the sequences with at least a block of new tokens, which this kernel serves best (a
    decode would fill 1 / 32 of a block)."""
    return meta.query_start_loc[1:] - meta.query_start_loc[:-1] >= tokens_per_block(group)


def _interpret_params():
    try:  # public from JAX 0.11 on
        return plgpu.InterpretParams()
    except AttributeError:
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams

        return InterpretGPUParams()


def _kernel(seq_ref, start_ref, valid_ref, kv_lens_ref, qsl_ref, page_table_ref, q_ref, k_ref, v_ref, out_ref,
            scoped, *, padded_group: int, pages_per_block: int, stages: int, scale: float, pingpong: bool,
            heavy_first: bool, interpret: bool):
    (q_smem, k_smem, v_smem, *o_tiles), (k_ready, v_ready, q_ready), (k_free, v_free), turn = scoped
    head, block, wg = lax.axis_index("head"), lax.axis_index("block"), lax.axis_index("wg")
    if heavy_first:  # a sequence's later blocks walk more keys: start them first, so the last wave is short
        block = seq_ref.shape[0] - 1 - block
    seq, t0, valid = seq_ref[block], start_ref[block], valid_ref[block]
    q_end, kv_len = qsl_ref[seq + 1], kv_lens_ref[seq]
    page_size = k_ref.shape[-2]
    block_kv = pages_per_block * page_size
    tokens_per_wg = ROWS_PER_WG // padded_group
    div = lambda x, n: lax.div(x, jnp.int32(n))  # noqa: E731  (of non-negative values)

    def wg_steps(w):
        """(first position, K/V blocks to walk, blocks needing no mask) of compute warpgroup w's rows."""
        first_tok = t0 + w * tokens_per_wg
        first = kv_len - q_end + first_tok  # position of its first token
        last = kv_len - q_end + jnp.minimum(first_tok + tokens_per_wg, q_end) - 1
        real = (valid > 0) & (first_tok < q_end)
        return first, jnp.where(real, div(last + block_kv, block_kv), 0), jnp.where(real, div(first + 1, block_kv), 0)

    total_steps = jnp.maximum(wg_steps(0)[1], wg_steps(1)[1])

    def layout(x):
        return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA)

    def row_layout(x):
        return x if interpret else plgpu.layout_cast(x, plgpu.Layout.WGMMA.reduce(1))

    def iota(dim):
        shape = (ROWS_PER_WG, block_kv)
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, dim)
        return plgpu.broadcasted_iota(jnp.int32, shape, dim, layout=plgpu.Layout.WGMMA)

    def take_turns():
        # Ping-pong (pingpong=True): the compute warpgroups meet here twice a step, half a step apart,
        # so one's softmax runs while the other's matrix products use the tensor cores.
        if pingpong:
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

    def scores(q_tile, k_tile):
        if interpret:
            s = jnp.dot(q_tile[...], k_tile[...].T, preferred_element_type=jnp.float32)
            take_turns()
            return s

        def run(acc_ref):
            plgpu.wgmma(acc_ref, q_tile, plgpu.transpose_ref(k_tile, (1, 0)))
            take_turns()  # while the wgmma runs
            return acc_ref[...]

        return pl.run_scoped(run, plgpu.ACC((ROWS_PER_WG, block_kv), jnp.float32))

    def add_pv(acc, p, v_tile):
        if interpret:
            return acc + jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)
        return pl.run_state(lambda acc_ref: plgpu.wgmma(acc_ref, p, v_tile))(plgpu.ACC.init(acc))

    def store_rows(out, o_tile, out_rows, first_row, num_rows):
        """Rows [0, num_rows) of `out` to out_rows[first_row:], so rows past a sequence's end are never
        written: one branch per possible count (a multiple of G'), each a few copies of 64, 32, ... rows
        at static SMEM offsets (TMA boxes have static shapes; Mosaic GPU slices SMEM at static offsets)."""
        o_tile[...] = out
        plgpu.commit_smem()
        for count in range(padded_group, ROWS_PER_WG + 1, padded_group):
            @pl.when(num_rows == count)
            def _():
                done, size = 0, ROWS_PER_WG
                while size:
                    if count & size:
                        plgpu.copy_smem_to_gmem(o_tile.at[pl.ds(done, size)],
                                                out_rows.at[pl.ds(first_row + done, size)])
                        done += size
                    size //= 2

    @pl.when((wg < COMPUTE_WGS) & (valid > 0))  # blocks past the plan's end do nothing
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        q_tile = q_smem.at[wg]
        first_row = (t0 + wg * tokens_per_wg) * padded_group
        plgpu.copy_gmem_to_smem(q_ref.at[head, block, pl.ds(wg * ROWS_PER_WG, ROWS_PER_WG)], q_tile, q_ready.at[wg])
        plgpu.barrier_wait(q_ready.at[wg])
        first, steps, full_steps = wg_steps(wg)
        # Padding rows (past the sequence's last token) take its last position: finite, never stored.
        row_pos = jnp.minimum(first + div(iota(0), padded_group), kv_len - 1)

        def step(kv_step, carry, masked: bool):
            acc, m, denom = carry
            slot = lax.rem(kv_step, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])
            s = scores(q_tile, k_smem.at[slot]) * (scale * LOG2E)  # in log2 units: exp2 below
            plgpu.barrier_arrive(k_free.at[slot])
            if masked:
                s = jnp.where(kv_step * block_kv + iota(1) <= row_pos, s, MASK_VALUE)
            m_next = jnp.maximum(m, s.max(axis=1))
            correction = jnp.exp2(m - m_next)
            p = jnp.exp2(s - lax.broadcast_in_dim(m_next, s.shape, [0]))
            denom = denom * correction + p.sum(axis=1)
            acc = acc * lax.broadcast_in_dim(correction, acc.shape, [0])
            if pingpong:
                plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(v_ready.at[slot])
            if pingpong:
                plgpu.barrier_wait(turn)
            acc = add_pv(acc, p.astype(v_smem.dtype), v_smem.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            return acc, m_next, denom

        def hand_back(kv_step, _):
            # Blocks only the other warpgroup needs: released unread, but each only once it has arrived.
            # Arriving sooner could complete a slot's phase with two arrivals from this warpgroup while
            # the other still reads it; the copy warpgroup would then overwrite the slot under it.
            slot = lax.rem(kv_step, jnp.int32(stages))
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_arrive(k_free.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])
            plgpu.barrier_arrive(v_free.at[slot])
            take_turns()  # keep meeting the other warpgroup as often as a step does
            take_turns()

        carry = (layout(jnp.zeros((ROWS_PER_WG, q_smem.shape[-1]), jnp.float32)),
                 row_layout(jnp.full((ROWS_PER_WG,), MASK_VALUE, jnp.float32)),
                 row_layout(jnp.zeros((ROWS_PER_WG,), jnp.float32)))
        pl.when(wg == 1)(take_turns)  # half a step behind warpgroup 0
        carry = lax.fori_loop(0, full_steps, functools.partial(step, masked=False), carry)
        acc, _, denom = lax.fori_loop(full_steps, steps, functools.partial(step, masked=True), carry)
        lax.fori_loop(steps, total_steps, hand_back, None)
        pl.when(wg == 0)(take_turns)
        denom = jnp.where(denom > 0, denom, 1.0)
        out = (acc / lax.broadcast_in_dim(denom, acc.shape, [0])).astype(q_tile.dtype)
        num_rows = jnp.clip(q_end * padded_group - first_row, 0, ROWS_PER_WG)
        # One whole 2-D buffer per warpgroup: JAX 0.11's Mosaic GPU layout inference fails on a store
        # into a slice of a 3-D one.
        for w in range(COMPUTE_WGS):
            @pl.when(wg == w)
            def _():
                store_rows(out, o_tiles[w], out_ref.at[head], first_row, num_rows)
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WGS)
    def _copy():
        plgpu.set_max_registers(40, action="decrease")

        def load(kv_step, slot, pages_ref, smem, ready):
            for p in range(pages_per_block):
                page = page_table_ref[seq, kv_step * pages_per_block + p]
                plgpu.copy_gmem_to_smem(pages_ref.at[head, page], smem.at[slot, pl.ds(p * page_size, page_size)],
                                        ready.at[slot])

        for s in range(stages):
            @pl.when(s < total_steps)
            def _():
                load(s, s, k_ref, k_smem, k_ready)
                load(s, s, v_ref, v_smem, v_ready)

        @pl.loop(stages, jnp.maximum(total_steps, stages))
        def _(kv_step):
            slot = lax.rem(kv_step, jnp.int32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            load(kv_step, slot, k_ref, k_smem, k_ready)
            plgpu.barrier_wait(v_free.at[slot])
            load(kv_step, slot, v_ref, v_smem, v_ready)

        @pl.loop(jnp.maximum(total_steps - stages, 0), total_steps)
        def _(kv_step):  # the last blocks' releases: every phase of a barrier is waited for
            slot = lax.rem(kv_step, jnp.int32(stages))
            plgpu.barrier_wait(k_free.at[slot])
            plgpu.barrier_wait(v_free.at[slot])


def paged_prefill_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                            only_long: bool = False, **kwargs) -> jax.Array:
    """Causal attention of q [T, H, D] (bf16/f16) over each token's paged K/V ([KVH, pages, page_size, D])
    -> [T, H, D]. Every sequence's tokens fill whole 128-row blocks: meant for prefill chunks. With
    `only_long`, only the tokens of `long_sequences` are served (the others get zeros). Options:
    `paged_prefill_rows`."""
    num_tokens, num_heads, _ = q.shape
    rows = paged_prefill_rows(q, k_pages, v_pages, meta, only_long=only_long, **kwargs)
    served = jnp.arange(num_tokens) < meta.query_start_loc[-1]
    if only_long:
        served &= long_sequences(meta, num_heads // k_pages.shape[0])[token_positions(meta, num_tokens)[0]]
    return jnp.where(served[:, None, None], tokens_from_rows(rows, num_tokens, num_heads), 0)


@functools.partial(jax.jit, static_argnames=("scale", "only_long", "pages_per_block",
                                             "stages", "pingpong", "heavy_first", "interpret"))
def paged_prefill_rows(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *,
                       scale: float, only_long: bool = False,
                       pages_per_block: int | None = None, stages: int = 2, pingpong: bool = True,
                       heavy_first: bool = True, interpret: bool = False) -> jax.Array:
    """The kernel on q [T, H, D] -> output rows by KV head [KVH, T * G', D], the layout of the Triton
    kernel's `query_rows`; rows of tokens it does not serve (padding; with `only_long`, short
    sequences) are left undefined.

    Defaults from scripts/bench_attention.py on an H100 (4k causal prefill, Llama-3-8B heads): 128 keys a block (64: 0.364 ms against 0.316), 2 slots (3 measured 0.312 before the
    output buffers took their SMEM), ping-pong and heavy blocks first (0.367 ms with neither, 0.340 /
    0.331 with one, 0.316 with both)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    padded_group = pl.next_power_of_2(group)
    if not supports(q.dtype, k_pages.dtype, head_dim, page_size, group, None, None):
        raise ValueError(f"paged_prefill_attention does not serve dtype {q.dtype} over {k_pages.dtype} pages, "
                         f"head_dim {head_dim}, page_size {page_size}, group {group}")
    if pages_per_block is None:  # 128 keys a block
        pages_per_block = max(1, 128 // page_size)
    block_kv = pages_per_block * page_size
    if block_kv % 64:
        raise ValueError(f"a K/V block of {block_kv} keys: wgmma needs a multiple of 64")
    block_q = tokens_per_block(group)
    include = long_sequences(meta, group) if only_long else None
    # Each included sequence has at least block_q tokens, so at most one partial block each.
    max_blocks = max(1, 2 * (num_tokens // block_q)) if only_long else None
    seq, start, valid = plan_query_blocks(meta.query_start_loc, num_tokens, block_q, include, max_blocks)
    # Queries gathered into aligned blocks: TMA into tiled SMEM at a row offset that is not a known
    # multiple of 8 fails in JAX 0.11's Mosaic GPU, and a sequence's rows start anywhere.
    q_blocks = queries_by_block(q, start, num_kv_heads, BLOCK_ROWS)
    page_table = jnp.pad(meta.page_table, ((0, 0), (0, pages_per_block)))  # reads past the end hit page 0

    if interpret:
        transforms = ()
    else:  # wgmma operand tiles: 8 rows by 128 bytes, swizzled
        transforms = (plgpu.TilingTransform((8, 128 // q.dtype.itemsize)), plgpu.SwizzleTransform(128))
    scratch = [plgpu.SMEM((COMPUTE_WGS, ROWS_PER_WG, head_dim), q.dtype, transforms=transforms),
               plgpu.SMEM((stages, block_kv, head_dim), k_pages.dtype, transforms=transforms),
               plgpu.SMEM((stages, block_kv, head_dim), v_pages.dtype, transforms=transforms),
               *[plgpu.SMEM((ROWS_PER_WG, head_dim), q.dtype)] * COMPUTE_WGS]  # untiled: sliced by row counts
    kernel = functools.partial(_kernel, padded_group=padded_group, pages_per_block=pages_per_block, stages=stages,
                               scale=scale, pingpong=pingpong, heavy_first=heavy_first, interpret=interpret)

    def entry(*refs):
        pl.run_scoped(
            lambda *scoped: kernel(*refs, scoped),
            scratch,
            (plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
             plgpu.Barrier(num_arrivals=pages_per_block, num_barriers=stages),
             plgpu.Barrier(num_barriers=COMPUTE_WGS)),
            (plgpu.Barrier(num_arrivals=COMPUTE_WGS, num_barriers=stages),) * 2,
            plgpu.Barrier(num_arrivals=COMPUTE_WGS),
            collective_axes="wg",
        )

    return plgpu.kernel(
        entry,
        out_type=jax.ShapeDtypeStruct((num_kv_heads, num_tokens * padded_group, head_dim), q.dtype),
        grid=(num_kv_heads, seq.shape[0]),
        grid_names=("head", "block"),
        num_threads=COMPUTE_WGS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=_interpret_params() if interpret else None,
    )(seq, start, valid, meta.kv_lens, meta.query_start_loc, page_table, q_blocks, k_pages, v_pages)
