"""The vision tower as its own compiled step, and the device pool its output rows wait in for the forward passes.

A vision-language model's tower (models/vision, through its VisionSpec) turns each image's pixel rows (patches,
or whole tiles) into one row per placeholder token.
Those rows are written into a pool on the device ([rows, hidden], in the decoder's dtype): each image gets pool rows
from a host-side free list until every one of its tokens has run (the prompt chunks that cover it may be several
steps), and a step's forward pass gathers its image tokens' rows from the pool by index (models/qwen2_vl.py). The
pool has fixed shape, so neither the encoder's nor the forward pass's programs depend on which images are where.

Images are encoded together, in one call per group that fits the largest bucket of input rows, padded to the next
bucket (the tower's smallest, doubled): one program per bucket, compiled at start-up, or at its first use on a CPU
(ShapePolicy.lazy).
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

from sgjax.models.vision.spec import VisionSpec

logger = logging.getLogger(__name__)


def patch_buckets(smallest: int, largest: int) -> list[int]:
    """Input row counts to compile the tower for: `smallest` doubled up to the first >= `largest`."""
    buckets = [smallest]
    while buckets[-1] < largest:
        buckets.append(buckets[-1] * 2)
    return buckets


def _encode(graphdef, state_def, weights, pool, pixels, meta, rows):
    tower = nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))
    out = tower(pixels, meta)
    return pool.at[rows].set(out.astype(pool.dtype), mode="drop")  # padding rows name no pool row: dropped


class ImageEmbeddingPool:
    def __init__(self, tower: nnx.Module, spec: VisionSpec, mesh, *, num_rows: int, hidden_size: int, dtype,
                 max_patches: int, lazy: bool):
        """`max_patches`: the most input rows one image can have (VisionSpec.max_rows): the largest bucket."""
        self.cfg, self.spec = tower.config, spec
        self.num_rows = num_rows
        self.buckets = patch_buckets(self.cfg.smallest_bucket, max_patches)
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
        started = time.perf_counter()
        meta = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                            self.spec.metadata([], self.cfg, bucket))  # shapes: bucket only
        pixels = jax.ShapeDtypeStruct((bucket, self.cfg.input_dim), np.float32)
        rows = jax.ShapeDtypeStruct((self.cfg.output_rows(bucket),), np.int32)
        self.compiled[bucket] = self._step.lower(self.weights, self.pool, pixels, meta, rows).compile()
        logger.info("compiled the vision tower for %d input rows in %.1f s", bucket, time.perf_counter() - started)

    def encode(self, images: list[tuple[np.ndarray, tuple[int, ...], np.ndarray]]) -> None:
        """Enqueue the tower on (pixel_values, grid, pool rows) of each image; its rows land in the pool."""
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
            raise ValueError(f"an image of {total} input rows exceeds the vision tower's largest bucket "
                             f"{self.buckets[-1]}")
        pixels = np.zeros((bucket, self.cfg.input_dim), np.float32)
        pixels[:total] = np.concatenate([p for p, _, _ in group])
        rows = np.full(self.cfg.output_rows(bucket), self.num_rows, np.int32)  # padding: past the pool, dropped
        merged = np.concatenate([r for _, _, r in group])
        rows[:len(merged)] = merged
        meta = self.spec.metadata([g for _, g, _ in group], self.cfg, bucket)
        if bucket not in self.compiled:  # lazy: its first use
            self._compile(bucket)
        self.pool = self.compiled[bucket](self.weights, self.pool, pixels, meta, rows)
