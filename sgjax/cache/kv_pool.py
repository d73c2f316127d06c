"""The paged KV pool on device: per layer, K and V arrays of shape [KVH, num_pages, page_size, D].

Head-major, so one KV head's page is a contiguous [page_size, D] tile for the attention kernels. KV
heads are split over the mesh's "tensor" axis like the attention heads that read them (replicated
when the axis does not divide them). Page 0 is the null page: padding tokens write there and no
sequence reads it, so the allocator hands out pages 1..num_pages-1 only.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from sgjax.platform.mesh import TENSOR, named_sharding

NULL_PAGE = 0
KV_AXES = (TENSOR, None, None, None)


@dataclasses.dataclass(frozen=True)
class KVPoolConfig:
    num_pages: int  # including the null page
    page_size: int  # tokens per page
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    # What the arrays hold, where the attention kernels want other than `dtype` (Kernels.bf16_pool_as_bits:
    # a bfloat16 pool as its raw bits, uint16, on a CPU)
    storage_dtype: str | None = None

    @classmethod
    def for_model(cls, cfg, num_pages: int, page_size: int, dtype: str | None = None,
                  bf16_as_bits: bool = False) -> "KVPoolConfig":
        """The pool of a model config: anything with num_layers, num_kv_heads, head_dim and dtype (the cache
        layer sits below the models and does not import their config)."""
        dtype = dtype or cfg.dtype
        storage = "uint16" if bf16_as_bits and dtype == "bfloat16" else None
        return cls(num_pages, page_size, cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, dtype, storage)

    @property
    def page_shape(self) -> tuple[int, int, int, int]:
        return (self.num_kv_heads, self.num_pages, self.page_size, self.head_dim)

    @property
    def bytes_per_page(self) -> int:
        """K and V bytes of one page over all layers (what sizing the pool from free memory divides by)."""
        itemsize = jnp.dtype(self.dtype).itemsize
        return 2 * self.num_layers * self.page_size * self.num_kv_heads * self.head_dim * itemsize


class KVPool:
    """Owns the device arrays; the model runner passes `caches` into each step and stores what returns."""

    def __init__(self, cfg: KVPoolConfig, mesh: Mesh):
        if cfg.num_pages < 2:
            raise ValueError(f"KV pool needs at least 2 pages (one is the null page); got {cfg.num_pages}")
        if not 1 <= cfg.page_size <= 128:
            raise ValueError(f"page size must be between 1 and 128 tokens; got {cfg.page_size}")
        self.config = cfg
        self.sharding = named_sharding(KV_AXES, cfg.page_shape, mesh)
        storage = cfg.storage_dtype or cfg.dtype
        zeros = jax.jit(
            lambda: [(jnp.zeros(cfg.page_shape, storage), jnp.zeros(cfg.page_shape, storage))
                     for _ in range(cfg.num_layers)],
            out_shardings=self.sharding,
        )
        self.caches: list[tuple[jax.Array, jax.Array]] = [tuple(kv) for kv in zeros()]
