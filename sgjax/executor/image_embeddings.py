"""The vision tower as its own compiled step, and the device pool its output rows wait in for the forward passes.

A vision-language model's tower (models/vision) turns each image's patches into one row per placeholder token.
Those rows are written into a pool on the device ([rows, hidden], in the decoder's dtype): each image gets pool rows
from a host-side free list until every one of its tokens has run (the prompt chunks that cover it may be several
steps), and a step's forward pass gathers its image tokens' rows from the pool by index (models/qwen2_vl.py). The
pool has fixed shape, so neither the encoder's nor the forward pass's programs depend on which images are where.

Images are encoded together, in one call per group that fits the largest patch bucket, padded to the next bucket
(powers of two): one program per bucket, compiled at start-up, or at its first use on a CPU (ShapePolicy.lazy).
"""

from __future__ import annotations

import functools
import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sgjax.models.vision.qwen2_vl import VisionTower, vision_metadata

logger = logging.getLogger(__name__)

SMALLEST_PATCH_BUCKET = 64


def patch_buckets(merge_unit: int, largest: int, smallest: int = SMALLEST_PATCH_BUCKET) -> list[int]:
    """Patch counts to compile the tower for: powers of two (whole merge blocks) up to the first >= `largest`."""
    buckets = [max(smallest, merge_unit)]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return buckets


def _encode(graphdef, state_def, weights, pool, pixels, meta, rows):
    tower = nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))
    out = tower(pixels, meta)
    return pool.at[rows].set(out.astype(pool.dtype), mode="drop")  # padding rows name no pool row: dropped


class ImageEmbeddingPool:
    def __init__(self, tower: VisionTower, mesh, *, num_rows: int, hidden_size: int, dtype, max_patches: int,
                 lazy: bool):
        """`max_patches`: the most patches one image can have (the processor's max_pixels): the largest bucket."""
        self.cfg = tower.config
        self.num_rows = num_rows
        self.buckets = patch_buckets(self.cfg.merge_unit, max_patches)
        graphdef, state = nnx.split(tower)
        self.weights, state_def = jax.tree.flatten(state)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.pool = jnp.zeros((num_rows, hidden_size), dtype, device=replicated)
        self._free = list(range(num_rows - 1, -1, -1))
        self._step = jax.jit(functools.partial(_encode, graphdef, state_def), donate_argnums=1)
        self.compiled: dict[int, object] = {}
        if not lazy:
            for bucket in self.buckets:
                self._compile(bucket)

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> np.ndarray | None:
        """n pool rows (not necessarily contiguous), or None if fewer are free."""
        if n > len(self._free):
            return None
        rows, self._free[-n:] = self._free[-n:], []
        return np.asarray(rows[::-1], np.int32)

    def free(self, rows: np.ndarray) -> None:
        self._free.extend(rows.tolist())

    def _compile(self, bucket: int) -> None:
        started, m = time.perf_counter(), self.cfg.spatial_merge_size
        meta = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            vision_metadata([(1, m, m)], self.cfg, num_patches=bucket))  # shapes: bucket only
        pixels = jax.ShapeDtypeStruct((bucket, self.cfg.patch_dim), np.float32)
        rows = jax.ShapeDtypeStruct((bucket // self.cfg.merge_unit,), np.int32)
        self.compiled[bucket] = self._step.lower(self.weights, self.pool, pixels, meta, rows).compile()
        logger.info("compiled the vision tower for %d patches in %.1f s", bucket, time.perf_counter() - started)

    def encode(self, images: list[tuple[np.ndarray, tuple[int, int, int], np.ndarray]]) -> None:
        """Enqueue the tower on (pixel_values, grid_thw, pool rows) of each image; its rows land in the pool."""
        group, patches = [], 0
        for image in images:
            n = len(image[0])
            if group and patches + n > self.buckets[-1]:
                self._encode_group(group)
                group, patches = [], 0
            group.append(image)
            patches += n
        if group:
            self._encode_group(group)

    def _encode_group(self, group) -> None:
        total = sum(len(pixels) for pixels, _, _ in group)
        bucket = next((b for b in self.buckets if b >= total), None)
        if bucket is None:
            raise ValueError(f"an image of {total} patches exceeds the vision tower's largest bucket {self.buckets[-1]}")
        pixels = np.zeros((bucket, self.cfg.patch_dim), np.float32)
        pixels[:total] = np.concatenate([p for p, _, _ in group])
        rows = np.full(bucket // self.cfg.merge_unit, self.num_rows, np.int32)  # padding: past the pool, dropped
        merged = np.concatenate([r for _, _, r in group])
        rows[:len(merged)] = merged
        meta = vision_metadata([g for _, g, _ in group], self.cfg, num_patches=bucket)
        if bucket not in self.compiled:  # lazy: its first use
            self._compile(bucket)
        self.pool = self.compiled[bucket](self.weights, self.pool, pixels, meta, rows)
