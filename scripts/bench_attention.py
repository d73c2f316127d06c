"""Attention kernels on the device: checks against the reference, then times decode and prefill.

Decode: batch 64 at context 2k and 8k with Llama-3-8B heads (32 q / 8 KV, d=128), as a fraction of
the HBM bandwidth measured by a copy in the same run; JAX's bundled Pallas paged_attention side by
side. Prefill: one 4096-token causal chunk, as a fraction of the bf16 matmul rate measured in the
same run, by the Triton kernel and by the Mosaic GPU prefill kernel (which the GPU backend uses for
long chunks on Hopper); jax.nn.dot_product_attention (cuDNN) side by side. Shared prefix: a decode
batch in groups behind long common prompts, with and without cascade attention (reading each group's
prefix once), against the bandwidth needed to read every distinct K/V page once.

    python scripts/bench_attention.py [--page-size 16] [--cases decode,engine,mixed,prefill,shared]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from bench_common import Table, copy_bandwidth, matmul_rate, queued_call_s, run_header

from sgjax.config import add_engine_arguments
from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.kernels import reference
from sgjax.kernels.gpu.attention import paged_attention
from sgjax.kernels.gpu.paged_prefill_mgpu import paged_prefill_attention
from sgjax.kernels.gpu.ragged_paged_attention import ragged_paged_attention
from sgjax.executor.shared_prefix import order_by_first_page

H, KVH, D = 32, 8, 128


def paged_case(batch: int, q_len: int, context: int, page_size: int, seed: int = 0, table_width: int = 0,
               num_tokens: int = 0, num_seqs: int = 0):
    """Random K/V pages for `batch` sequences of `context` tokens, `q_len` of them new; the page table is
    `table_width` pages wide if given (the engine pads it to its context length), the batch padded to
    `num_tokens` tokens and `num_seqs` sequences if given (the engine's bucket and running limit)."""
    rng = np.random.default_rng(seed)
    pages_each = -(-context // page_size)
    num_pages = 1 + batch * pages_each
    order = rng.permutation(np.arange(1, num_pages))
    chunks = [SeqChunk([0] * q_len, context - q_len, order[b * pages_each:(b + 1) * pages_each].tolist())
              for b in range(batch)]
    meta = jax.tree.map(jnp.asarray, make_batch(chunks, page_size, max_pages=table_width or None,
                                                num_tokens=num_tokens or None, num_seqs=num_seqs or None).meta)
    kshape = (KVH, num_pages, page_size, D)
    k = jax.random.normal(jax.random.key(seed + 1), kshape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(seed + 2), kshape, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(seed + 3), (num_tokens or batch * q_len, H, D), jnp.bfloat16)
    return q, k, v, meta


def mixed_case(decodes: int, chunks: list[tuple[int, int]], page_size: int, num_tokens: int, num_seqs: int,
               mean_context: float = 400, seed: int = 0, pool_pages: int = 0, contiguous: bool = False):
    """A step as step_token_target schedules them (prompt chunks inside decode steps): `decodes` one-token rows
    with log-normal contexts (sigma 0.8, 16-2048 tokens) and prompt chunks (new tokens, cached tokens),
    padded to `num_tokens` tokens and `num_seqs` rows. Pages are drawn at random from a pool of
    `pool_pages` (at least those needed), or laid out one sequence after another (`contiguous`).
    Returns q, k, v, meta and the distinct K/V tokens."""
    rng = np.random.default_rng(seed)
    contexts = np.clip(rng.lognormal(np.log(mean_context) - 0.32, 0.8, decodes), 16, 2048).astype(int)
    spans = [(1, int(c)) for c in contexts] + [(n, cached + n) for n, cached in chunks]
    pages_each = [-(-ctx // page_size) for _, ctx in spans]
    num_pages = max(1 + sum(pages_each), pool_pages)
    order = np.arange(1, num_pages) if contiguous else rng.permutation(np.arange(1, num_pages))
    at, seq_chunks = 0, []
    for (n, ctx), pages in zip(spans, pages_each):
        seq_chunks.append(SeqChunk([0] * n, ctx - n, order[at:at + pages].tolist()))
        at += pages
    meta = jax.tree.map(jnp.asarray, make_batch(seq_chunks, page_size, max_pages=4096 // page_size,
                                                num_tokens=num_tokens, num_seqs=num_seqs).meta)
    kshape = (KVH, num_pages, page_size, D)
    k = jax.random.normal(jax.random.key(seed + 1), kshape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(seed + 2), kshape, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(seed + 3), (num_tokens, H, D), jnp.bfloat16)
    return q, k, v, meta, sum(ctx for _, ctx in spans)


def shared_prefix_case(groups: int, per_group: int, prefix: int, own: int, page_size: int, max_groups: int = 32):
    """A decode batch of groups x per_group sequences; each group's share a `prefix`-token prompt prefix
    (the same pages), then `own` tokens of their own. Returns q, k, v and the metadata with the groups."""
    rng = np.random.default_rng(11)
    prefix_pages, own_pages = prefix // page_size, -(-own // page_size)
    num_pages = 1 + groups * prefix_pages + groups * per_group * own_pages
    free = iter(rng.permutation(np.arange(1, num_pages)).tolist())
    shared = [[next(free) for _ in range(prefix_pages)] for _ in range(groups)]
    chunks = [SeqChunk([0], prefix + own - 1, shared[g] + [next(free) for _ in range(own_pages)])
              for _ in range(per_group) for g in range(groups)]  # members arrive interleaved
    order, sizes = order_by_first_page([c.pages[0] for c in chunks], max_groups)
    batch = make_batch([chunks[i] for i in order], page_size, max_prefix_groups=max_groups, prefix_groups=sizes)
    meta = jax.tree.map(jnp.asarray, batch.meta)
    kshape = (KVH, num_pages, page_size, D)
    k = jax.random.normal(jax.random.key(1), kshape, jnp.bfloat16)
    v = jax.random.normal(jax.random.key(2), kshape, jnp.bfloat16)
    q = jax.random.normal(jax.random.key(3), (len(chunks), H, D), jnp.bfloat16)
    return q, k, v, meta


def kernel_config(cfg: str, scale: float):
    """'block_q:pages_per_block:kv_splits:num_warps[:num_stages[:min_blocks_per_split[:prefetch]]]'
    (0 = default; prefetch 1 = page ids, 2 = K/V, 3 = nothing) -> (label, jitted kernel)."""
    bq, ppb, splits, warps, stages, min_blocks, prefetch = (int(x) for x in (cfg + ":0:0:0").split(":")[:7])
    kw = dict(block_q=bq or None, pages_per_block=ppb or None, kv_splits=splits or None, num_warps=warps or 4,
              num_stages=stages or 1, min_blocks_per_split=min_blocks or 2)
    if prefetch:
        kw["prefetch"] = prefetch % 3
    fn = jax.jit(lambda q, k, v, m: ragged_paged_attention(q, k, v, m, scale=scale, **kw))
    return (f"sgjax {cfg}" if any((bq, ppb, splits, warps, stages, prefetch)) else "sgjax defaults"), fn


def as_layers(fn, layers: int):
    """`layers` calls in one program, as a model's layers make them: small calls are timed on the device,
    not by the host's dispatch of one call. Returns a function of the same arguments (time / layers)."""
    def many(q, k, v, m):
        out = q
        for _ in range(layers):
            out = fn(out, k, v, m)
        return out

    return jax.jit(many)


def rel_error(got, want) -> float:
    got, want = got.astype(jnp.float32), want.astype(jnp.float32)
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_arguments(p, only=("page_size",))
    p.add_argument("--decode-configs", default="0:0:0:0,1:4:4:4:3,1:4:1:4:3,1:4:1:4:4,1:4:1:2:3,1:8:1:8:3",
                   help="block_q:pages_per_block:kv_splits:num_warps[:num_stages[:min_blocks_per_split]] for "
                   "decode (0 = the kernel's default)")
    p.add_argument("--small-decode-configs", default="0:0:0:0,1:4:1:4:3,1:4:4:4:3:2,1:4:8:4:3:2,1:4:4:4:3:8",
                   help="the same for engine-shaped small decode batches")
    p.add_argument("--prefill-configs", default="0:0:0:0,16:4:1:4:3,32:4:1:4:3,32:8:1:8:3,64:4:1:8:2",
                   help="the same for prefill")
    p.add_argument("--mgpu-configs", default="8:2:1:1,8:2:0:1,8:2:1:0,8:2:0:0,4:2:1:1",
                   help="pages_per_block:stages:pingpong:heavy_first for the Mosaic GPU prefill kernel")
    p.add_argument("--cases", default="decode,engine,prefill,shared", help="which groups of cases to time")
    p.add_argument("--mixed-configs", default="0:0:0:0,1:0:0:4:0:0:3,0:0:2:4,0:8:0:4",
                   help="the same for steps of decodes and prompt chunks in a decode-sized bucket (the second: "
                        "one token a block, nothing loaded ahead, as decode-sized steps ran before 2-token blocks)")
    p.add_argument("--mixed-pool-pages", type=int, default=0,
                   help="KV pool pages the mixed cases draw their pages from at random (0: just those needed)")
    p.add_argument("--mixed-contiguous", action="store_true", help="mixed cases: each sequence's pages in a row")
    p.add_argument("--kv-dtype", default="bfloat16", choices=["bfloat16", "float8_e4m3fn", "float8_e5m2"],
                   help="the pool's dtype in the decode and mixed cases (the limit counts its bytes)")
    p.add_argument("--engine-cases", default="1:512,16:2048,16:4000,32:512,64:512",
                   help="batch:context of the engine-shaped small decode cases")
    args = p.parse_args()
    cases = set(args.cases.split(","))
    ps = args.page_size
    print(run_header())
    bw, peak = copy_bandwidth(), matmul_rate()
    print(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
    scale = D**-0.5
    rows = []

    # correctness first, on a mixed batch with a window and soft-cap
    q, k, v, meta = paged_case(4, 37, 300, ps, seed=5)
    for kw in ({}, {"sliding_window": 64, "softcap": 30.0}):
        want = reference.ragged_paged_attention(q, k, v, meta, scale=scale, **kw)
        got = ragged_paged_attention(q, k, v, meta, scale=scale, **kw)
        print(f"check vs reference {kw or ''}: relative error {rel_error(got, want):.2e}")
        got = paged_attention(q, k, v, meta, scale=scale, **kw)  # long chunks to the Mosaic GPU kernel
        print(f"check the GPU backend vs reference {kw or ''}: relative error {rel_error(got, want):.2e}")

    from jax.experimental.pallas.ops.gpu import paged_attention as jax_paged

    for batch, context, width in ((64, 2048, 0), (64, 8192, 0), (256, 512, 2048), (1, 1024, 2048)):
        if "decode" not in cases:
            break
        q, k, v, meta = paged_case(batch, 1, context, ps, seed=context, table_width=width // ps)
        k, v = k.astype(args.kv_dtype), v.astype(args.kv_dtype)
        kv_bytes = 2 * batch * context * KVH * D * k.dtype.itemsize
        case = f"decode b{batch} ctx{context}" + (f" (table {width})" if width else "")
        for cfg in args.decode_configs.split(","):
            name, fn = kernel_config(cfg, scale)
            t = queued_call_s(fn, q, k, v, meta)
            rows.append((case, name, t, kv_bytes / t / bw, None))
        if width or k.dtype != q.dtype:
            continue  # JAX's kernel is timed on the plain bf16 cases
        tables = meta.page_table
        lengths = meta.kv_lens
        fn = jax.jit(lambda q, k, v, t, n: jax_paged.paged_attention(q * scale, k, v, t, n, pages_per_compute_block=8))
        try:
            t = queued_call_s(fn, q, k, v, tables, lengths)
            want = fn(q, k, v, tables, lengths)
            err = rel_error(ragged_paged_attention(q, k, v, meta, scale=scale), want)
            rows.append((case, "jax pallas paged_attention", t, kv_bytes / t / bw, err))
        except Exception as e:  # report, keep going
            print(f"jax paged_attention failed: {type(e).__name__}: {str(e)[:200]}")

    # Engine-shaped small decode batches (bucket 64 tokens, 256 sequence rows, a 4096-token page table),
    # 32 calls per program as in a 32-layer forward pass: whether splitting the context pays
    layers = 32
    for batch, context in (tuple(int(x) for x in c.split(":")) for c in args.engine_cases.split(",")):
        if "engine" not in cases:
            break
        q, k, v, meta = paged_case(batch, 1, context, ps, seed=batch, table_width=4096 // ps, num_tokens=64,
                                   num_seqs=256)
        kv_bytes = 2 * batch * context * KVH * D * 2
        case = f"engine b{batch} ctx{context} (x{layers})"
        for cfg in args.small_decode_configs.split(","):
            name, fn = kernel_config(cfg, scale)
            t = queued_call_s(as_layers(fn, layers), q, k, v, meta, calls=5) / layers
            rows.append((case, name, t, kv_bytes / t / bw, None))

    # Steps as step_token_target makes them on a ShareGPT-like workload (bucket 384, 512 rows): ~190
    # decodes and ~190 prompt tokens in one or two chunks; and as many decodes alone
    # (pages drawn from a pool of --mixed-pool-pages: an engine's pool spans tens of GB)
    for decodes, chunks in ((190, ((150, 300), (44, 0))), (190, ((194, 700),)), (190, ((64, 0), (64, 0), (66, 0))),
                            (384, ())):
        if "mixed" not in cases:
            break
        q, k, v, meta, kv_tokens = mixed_case(decodes, list(chunks), ps, num_tokens=384, num_seqs=512,
                                              pool_pages=args.mixed_pool_pages, contiguous=args.mixed_contiguous)
        k, v = k.astype(args.kv_dtype), v.astype(args.kv_dtype)
        kv_bytes = 2 * kv_tokens * KVH * D * k.dtype.itemsize
        case = f"mixed {decodes}+{'+'.join(str(n) for n, _ in chunks) or '0'} (x{layers})"
        want = reference.ragged_paged_attention(q, k, v, meta, scale=scale)
        for cfg in args.mixed_configs.split(","):
            name, fn = kernel_config(cfg, scale)
            err = rel_error(fn(q, k, v, meta)[:decodes + sum(n for n, _ in chunks)],
                            want[:decodes + sum(n for n, _ in chunks)])
            t = queued_call_s(as_layers(fn, layers), q, k, v, meta, calls=5) / layers
            rows.append((case, name, t, kv_bytes / t / bw, err))

    # Shared prefixes (the generated-shared-prefix workload's decode steps): 16 groups behind 2048-token
    # prompts, 256 requests; limit = the bytes of every distinct page read once
    for groups, per_group, prefix, own in ((16, 16, 2048, 384), (16, 64, 2048, 384), (4, 16, 2048, 128)):
        if "shared" not in cases:
            break
        q, k, v, meta = shared_prefix_case(groups, per_group, prefix, own, ps)
        batch = groups * per_group
        case = f"shared b{batch} {groups}x{prefix}+{own}"
        per_token = KVH * D * 2 * 2
        needed = (groups * prefix + batch * own) * per_token
        plain_meta = dataclasses.replace(meta, shared=None)
        plain = paged_attention(q, k, v, plain_meta, scale=scale)
        # errors: the plain kernel against the reference (which gathers every token's context: batches of up
        # to 256 only), cascade against the plain kernel
        errors = {"without cascade": rel_error(plain, reference.ragged_paged_attention(q, k, v, plain_meta,
                                                                                       scale=scale))
                  if batch <= 256 else None,
                  "cascade": rel_error(paged_attention(q, k, v, meta, scale=scale), plain)}
        for name, m in (("without cascade", plain_meta), ("cascade", meta)):
            fn = as_layers(jax.jit(lambda q, k, v, m: paged_attention(q, k, v, m, scale=scale)), layers)
            t = queued_call_s(fn, q, k, v, m, calls=5) / layers
            rows.append((case, name, t, needed / t / bw, errors[name]))

    if "prefill" in cases:
        rows += prefill_rows(args, ps, scale, peak)

    table = Table(("case", "<32"), ("kernel", "<30"), ("ms", ">8.3f"), ("of limit", ">9.1%"), ("rel err", ">8"))
    print("\n" + table.header())
    for case, name, t, frac, err in rows:
        print(table.row(case, name, t * 1e3, frac, "" if err is None else f"{err:.1e}"))
    print("limit: decode = KV bytes / copy bandwidth; prefill = causal FLOPs / bf16 matmul rate")


def prefill_rows(args, ps: int, scale: float, peak: float) -> list:
    """One 4096-token causal prefill: the Triton kernel's tiles, the Mosaic GPU kernel, the backend, cuDNN."""
    rows = []
    T = 4096
    q, k, v, meta = paged_case(1, T, T, ps, seed=7)
    flops = 4 * T * T * H * D / 2  # causal: half of QK^T and PV
    for cfg in args.prefill_configs.split(","):
        name, fn = kernel_config(cfg, scale)
        try:
            t = queued_call_s(fn, q, k, v, meta, calls=10)
            rows.append(("prefill 4096", name, t, flops / t / peak, None))
        except Exception as e:
            print(f"prefill config {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
    for cfg in args.mgpu_configs.split(","):
        ppb, stages, pingpong, heavy = (int(x) for x in cfg.split(":"))
        fn = jax.jit(functools.partial(paged_prefill_attention, scale=scale, pages_per_block=ppb, stages=stages,
                                       pingpong=bool(pingpong), heavy_first=bool(heavy)))
        try:
            t = queued_call_s(fn, q, k, v, meta, calls=10)
            rows.append(("prefill 4096", f"mosaic gpu {cfg}", t, flops / t / peak, None))
        except Exception as e:
            print(f"mosaic gpu config {cfg} failed: {type(e).__name__}: {str(e)[:300]}")
    fn = jax.jit(lambda q, k, v, m: paged_attention(q, k, v, m, scale=scale))
    t = queued_call_s(fn, q, k, v, meta, calls=10)
    rows.append(("prefill 4096", "sgjax GPU backend", t, flops / t / peak, None))
    dense_k = k[:, 1:].reshape(KVH, -1, D)[:, :T]  # contiguous copy for cuDNN (pages are permuted; timing only)
    dense_v = v[:, 1:].reshape(KVH, -1, D)[:, :T]
    qb, kb, vb = q[None], dense_k.transpose(1, 0, 2)[None], dense_v.transpose(1, 0, 2)[None]
    fn = jax.jit(lambda a, b, c: jax.nn.dot_product_attention(a, b, c, scale=scale, is_causal=True,
                                                               implementation="cudnn"))
    try:
        t = queued_call_s(fn, qb, kb, vb, calls=10)
        rows.append(("prefill 4096", "cudnn dot_product_attention", t, flops / t / peak, None))
    except Exception as e:
        print(f"cudnn failed: {type(e).__name__}: {str(e)[:300]}")
    return rows


if __name__ == "__main__":
    main()
