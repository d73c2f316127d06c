"""How many KV pages fit on the device: mem_fraction_static of its memory, less what is in use (the weights);
on a CPU a share of the host's available memory."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from sgjax.cache.kv_pool import KVPoolConfig
from sgjax.cache.page_allocator import pages_for
from sgjax.platform.device_memory import cuda_memory_info, host_available_bytes, xla_memory_limit
from sgjax.platform.mesh import TENSOR


DEFAULT_MEM_FRACTION = 0.85
# On a CPU the pool shares the host's memory with everything else the user runs: a smaller share by default.
CPU_MEM_FRACTION = 0.3
# ... and by default at most CPU_POOL_BYTES, or two requests at full context where that is more. The pool's
# shape is part of every step program's key in the persistent compilation cache, so a size read off the host's
# free memory changed from one start to the next and missed the cache; and the pool is zeroed at start (6 GB
# took 3-10 s on 2 cores). 1 GiB holds ~23k tokens of SmolLM2 in float32: more than a CPU decodes at once.
CPU_POOL_BYTES = 1 << 30
CPU_POOL_CONTEXTS = 2


def pages_from_memory(pool_cfg: KVPoolConfig, mesh: Mesh, mem_fraction_static: float | None, useful_pages: int,
                      context_pages: int) -> int:
    """Pages that fit in `mem_fraction_static` of device memory after the weights (0.85 by default); on a CPU,
    in that share of the host's available memory, at most `useful_pages` (every running request at full
    context: the host's memory is everyone's); with no share given, CPU_MEM_FRACTION of it and at most
    CPU_POOL_BYTES or CPU_POOL_CONTEXTS times `context_pages` (one request at full context), the larger."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        if mem_fraction_static is None:
            fraction = CPU_MEM_FRACTION
            useful_pages = min(useful_pages, 1 + max(CPU_POOL_BYTES // pool_cfg.bytes_per_page,
                                                     CPU_POOL_CONTEXTS * context_pages))
        else:
            fraction = mem_fraction_static
        available = host_available_bytes()
        if available is None:
            return useful_pages
        return min(useful_pages, int(available * fraction // pool_cfg.bytes_per_page))
    fraction = DEFAULT_MEM_FRACTION if mem_fraction_static is None else mem_fraction_static
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats and device.platform == "gpu":
        # XLA's VMM allocator (SKIP_TEMP command buffers) reports no limit: ask the driver
        info = cuda_memory_info(device.local_hardware_id)
        if info is not None:
            free, total = info
            stats = {"bytes_limit": xla_memory_limit(total), "bytes_in_use": total - free}
    if "bytes_limit" not in stats:
        raise ValueError(f"{device.device_kind} reports no memory limit: give num_pages (--num-pages)")
    tensor = mesh.shape[TENSOR]
    per_device = pool_cfg.bytes_per_page // (tensor if pool_cfg.num_kv_heads % tensor == 0 else 1)
    free = stats["bytes_limit"] * fraction - stats["bytes_in_use"]
    pages = stable_page_count(int(free // per_device))
    if pages < 2:
        raise ValueError(f"no device memory left for the KV pool ({free / 2**30:.1f} GiB free after weights); "
                         "raise mem_fraction_static or use a larger mesh")
    return pages


def stable_page_count(pages: int) -> int:
    """`pages` rounded down to its 7 leading bits (at most 1.6% fewer): free device memory differs by some MB
    from one start to the next, and a pool shape that moved with it changed every step program, so a restart
    found none of them in the persistent compilation cache."""
    step = 1 << max(0, pages.bit_length() - 7)
    return pages // step * step


def check_pool_fits(num_pages: int, context_length: int, page_size: int, bytes_per_page: int) -> None:
    """A clear error when the pool cannot hold one request of the context length (the null page aside)."""
    need = pages_for(context_length, page_size) + 1
    if num_pages < need:
        gib = num_pages * bytes_per_page / 2**30
        raise ValueError(f"the KV pool fits {num_pages} pages of {page_size} tokens ({gib:.2f} GiB); one request of the "
                         f"context length ({context_length} tokens) needs {need}: lower --context-length, or raise "
                         "--mem-fraction-static, or give --num-pages")
