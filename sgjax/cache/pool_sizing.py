"""How many KV pages fit on the device: mem_fraction_static of its memory, less what is in use (the weights)."""

from __future__ import annotations

import jax
from jax.sharding import Mesh

from sgjax.cache.kv_pool import KVPoolConfig
from sgjax.platform.device_memory import cuda_memory_info, xla_memory_limit
from sgjax.platform.mesh import TENSOR


def pages_from_memory(pool_cfg: KVPoolConfig, mesh: Mesh, mem_fraction_static: float, cpu_pages: int) -> int:
    """Pages that fit in `mem_fraction_static` of device memory after the weights; `cpu_pages` on a CPU, which
    reports no memory limit."""
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    if "bytes_limit" not in stats and device.platform == "gpu":
        # XLA's VMM allocator (SKIP_TEMP command buffers) reports no limit: ask the driver
        info = cuda_memory_info(device.local_hardware_id)
        if info is not None:
            free, total = info
            stats = {"bytes_limit": xla_memory_limit(total), "bytes_in_use": total - free}
    if "bytes_limit" not in stats:
        if device.platform != "cpu":
            raise ValueError(f"{device.device_kind} reports no memory limit: give num_pages (--num-pages)")
        return cpu_pages
    tensor = mesh.shape[TENSOR]
    per_device = pool_cfg.bytes_per_page // (tensor if pool_cfg.num_kv_heads % tensor == 0 else 1)
    free = stats["bytes_limit"] * mem_fraction_static - stats["bytes_in_use"]
    pages = int(free // per_device)
    if pages < 2:
        raise ValueError(f"no device memory left for the KV pool ({free / 2**30:.1f} GiB free after weights); "
                         "raise mem_fraction_static or use a larger mesh")
    return pages
