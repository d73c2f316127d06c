"""Host-side throughput of the radix prefix cache: insert, match and evict at serving scale.

Workload: `--num-seqs` sequences of `--min-len`..`--max-len` tokens (uniform); each starts with one of
`--num-prefixes` shared "system prompts" (uniform 256..`--max-prefix` tokens) followed by a unique
random suffix. All are inserted, then `--num-queries` prompts of exactly `--query-len` tokens (a cached
sequence's first tokens, then random tokens from the last 128 on) are matched, then the tree is evicted empty in
`--evict-chunk`-token calls. Keys are numpy int32 arrays, as the scheduler holds them.

    python scripts/bench_radix.py [--num-seqs 100000] [--page-size 16]
"""

from __future__ import annotations

import argparse
import gc
import time

import numpy as np
from bench_common import percentiles, run_header

from sgjax.cache.page_allocator import PageAllocator
from sgjax.cache.radix_cache import RadixCache
from sgjax.config import add_engine_arguments


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-seqs", type=int, default=100_000)
    p.add_argument("--min-len", type=int, default=1024)
    p.add_argument("--max-len", type=int, default=8192)
    p.add_argument("--num-prefixes", type=int, default=1000)
    p.add_argument("--max-prefix", type=int, default=4096)
    add_engine_arguments(p, only=("page_size",))
    p.add_argument("--num-queries", type=int, default=10_000)
    p.add_argument("--query-len", type=int, default=8192)
    p.add_argument("--evict-chunk", type=int, default=8192)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    print(run_header(device=False))

    rng = np.random.default_rng(args.seed)
    ps = args.page_size
    prefixes = [rng.integers(0, 128_000, rng.integers(256, args.max_prefix + 1), dtype=np.int32)
                for _ in range(args.num_prefixes)]
    lengths = rng.integers(args.min_len, args.max_len + 1, args.num_seqs)
    owners = rng.integers(0, args.num_prefixes, args.num_seqs)
    total_pages = int(sum(-(-n // ps) for n in lengths)) + 1
    alloc = PageAllocator(total_pages, ps)
    cache = RadixCache(alloc)

    def sequence(i: int) -> np.ndarray:
        prefix = prefixes[owners[i]]
        suffix = np.random.default_rng((args.seed, i)).integers(0, 128_000, max(0, lengths[i] - len(prefix)),
                                                                dtype=np.int32)
        return np.concatenate([prefix, suffix])[: lengths[i]]

    seqs = [sequence(i) for i in range(args.num_seqs)]
    insert_times = np.empty(args.num_seqs)
    for i, seq in enumerate(seqs):
        pages = alloc.alloc(-(-len(seq) // ps))
        t0 = time.perf_counter()
        tree_pages = cache.insert(seq, pages)
        insert_times[i] = time.perf_counter() - t0
        alloc.free(pages[len(tree_pages):])  # the partial last page stays with the "request"
    inserted_tokens = int(lengths.sum())

    # A long-running server freezes its start-up objects so the collector does not rescan them.
    gc.collect()
    gc.freeze()
    long_seqs = [s for s in seqs if len(s) >= args.query_len - 128] or seqs
    match_times = np.empty(args.num_queries)
    hits = 0
    for q in range(args.num_queries):
        seq = long_seqs[rng.integers(len(long_seqs))][: args.query_len - 128]
        base = np.concatenate([seq, rng.integers(0, 128_000, args.query_len - len(seq), dtype=np.int32)])
        t0 = time.perf_counter()
        m = cache.match_prefix(base)
        match_times[q] = time.perf_counter() - t0
        hits += m.num_tokens
    list_query = long_seqs[0][: args.query_len].tolist()
    t0 = time.perf_counter()
    for _ in range(100):
        cache.match_prefix(list_query)
    list_match = (time.perf_counter() - t0) / 100

    cached = cache.cached_tokens
    evict_times = []
    t0 = time.perf_counter()
    while cache.evictable_tokens:
        t1 = time.perf_counter()
        cache.evict(args.evict_chunk)
        evict_times.append(time.perf_counter() - t1)
    evict_total = time.perf_counter() - t0
    assert alloc.num_free == alloc.num_usable, "eviction lost pages"

    insert_p50, insert_p99 = percentiles(insert_times, (50, 99), scale=1e6)
    match_p50, match_p99 = percentiles(match_times, (50, 99), scale=1e6)
    (evict_p50,) = percentiles(evict_times, (50,), scale=1e6)
    print(f"sequences {args.num_seqs}, inserted tokens {inserted_tokens / 1e6:.1f}M, tree tokens "
          f"{cached / 1e6:.1f}M, page size {ps}")
    print(f"insert: {args.num_seqs / insert_times.sum():,.0f} seq/s, "
          f"{inserted_tokens / insert_times.sum() / 1e6:.1f}M tokens/s, p50 {insert_p50:.1f} us, "
          f"p99 {insert_p99:.1f} us")
    print(f"match ({args.query_len}-token numpy prompt): p50 {match_p50:.1f} us, p99 "
          f"{match_p99:.1f} us, mean hit {hits / args.num_queries:.0f} tokens; "
          f"from a Python list: {list_match * 1e6:.1f} us")
    print(f"evict ({args.evict_chunk}-token calls): {cached / evict_total / 1e6:.1f}M tokens/s, p50 "
          f"{evict_p50:.1f} us per call, {len(evict_times)} calls")


if __name__ == "__main__":
    main()
