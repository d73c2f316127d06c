"""The KV pool's size on a CPU: a share of the host's available memory (--mem-fraction-static), at most what every
running request at full context needs, or --num-pages; and clear errors for a pool that cannot serve."""

import pytest

from sgjax.cache import pool_sizing
from sgjax.cache.kv_pool import KVPoolConfig
from sgjax.config import EngineArgs, args_from_cli, build_parser
from sgjax.engine import Engine
from sgjax.platform.mesh import make_mesh

GiB = 1 << 30
POOL = KVPoolConfig(num_pages=2, page_size=16, num_layers=30, num_kv_heads=3, head_dim=64, dtype="bfloat16")


PAGE_BYTES = 2 * 30 * 16 * 3 * 64 * 2


@pytest.mark.parametrize("available,fraction,useful,context,want", [
    (8 * GiB, None, 10**6, 10**5, int(8 * GiB * pool_sizing.CPU_MEM_FRACTION) // PAGE_BYTES),
    # by default at most CPU_POOL_BYTES, or CPU_POOL_CONTEXTS requests at full context if more (and the null page)
    (8 * GiB, None, 10**6, 512, 1 + pool_sizing.CPU_POOL_BYTES // PAGE_BYTES),
    (8 * GiB, None, 10**6, 2000, 1 + pool_sizing.CPU_POOL_CONTEXTS * 2000),
    (8 * GiB, 0.5, 10**6, 512, 4 * GiB // PAGE_BYTES),  # a share asked for is taken whole
    (8 * GiB, 0.5, 1000, 512, 1000),  # capped: more than every request at full context would sit unused
    (None, 0.5, 1234, 512, 1234),  # the host does not say: every request at full context
])
def test_cpu_pool_is_a_share_of_available_host_memory(monkeypatch, available, fraction, useful, context, want):
    monkeypatch.setattr(pool_sizing, "host_available_bytes", lambda: available)
    assert pool_sizing.pages_from_memory(POOL, make_mesh("1x1"), fraction, useful_pages=useful,
                                         context_pages=context) == want


@pytest.mark.parametrize("num_pages", ["0", "-3", "1"])
def test_a_num_pages_that_cannot_be_a_pool_is_refused(num_pages):
    with pytest.raises(ValueError, match=f"num_pages must be at least 2 .*got {num_pages}"):
        args_from_cli(build_parser().parse_args(["--model-path", "m", "--num-pages", num_pages]))


def test_memory_too_small_for_one_request_names_the_context_length(tiny_models, monkeypatch):
    """A pool sized from memory that cannot hold one request of the context length fails at start, saying what
    to change (an explicit --num-pages may be small on purpose: longer requests are refused one by one)."""
    path, _ = tiny_models("llama")
    page_bytes = 2 * 3 * 4 * 4 * 8 * 4  # K and V x 3 layers x 4 tokens x 4 KV heads x head_dim 8 x float32
    monkeypatch.setattr(pool_sizing, "host_available_bytes", lambda: 10 * page_bytes)
    with pytest.raises(ValueError, match=r"fits 5 pages .*context length \(64 tokens\) needs 17.*--context-length"):
        Engine(path, dtype="float32", page_size=4, context_length=64, mem_fraction_static=0.5)
    with pytest.raises(ValueError, match="mem_fraction_static"):
        EngineArgs(model_path=path, mem_fraction_static=0.0)


def test_engine_pool_follows_num_pages_and_the_memory_share(tiny_models, monkeypatch):
    path, _ = tiny_models("llama")
    engine = Engine(path, dtype="float32", page_size=4, context_length=64, num_pages=40, max_running_requests=2)
    try:
        assert engine.num_usable_pages == 39  # the null page aside
    finally:
        engine.shutdown()
    monkeypatch.setattr(pool_sizing, "host_available_bytes", lambda: 10 * GiB)
    engine = Engine(path, dtype="float32", page_size=4, context_length=64, max_running_requests=2,
                    mem_fraction_static=0.5)
    try:  # a tiny model: 10 GiB x 0.5 holds far more than 2 requests of 64 tokens need
        assert engine.num_usable_pages == 2 * 16
    finally:
        engine.shutdown()


def test_accelerator_page_counts_are_stable_across_small_memory_differences():
    """A pool sized from free device memory keeps its shape when that memory moves by a few MB between starts
    (the step programs, and so the persistent compilation cache's keys, depend on it): 7 leading bits kept,
    never more pages than fit, at most 1.6% fewer."""
    for pages in (1, 2, 127, 128, 129, 1000, 37_517, 411_133):
        got = pool_sizing.stable_page_count(pages)
        assert got <= pages and got >= pages * (1 - 1 / 64) and got >= 1
    starts = [pool_sizing.stable_page_count(40_000 + jitter) for jitter in range(0, 200, 7)]
    assert len(set(starts)) == 1
