"""A step's host arrays sent to the device as two buffers (int32 and float32) instead of ~20.

Each numpy argument of a compiled call is its own host-to-device transfer inside the call, and on an
H100 the ~20 small arrays of a step (token ids, positions, attention metadata, sampling parameters)
cost about 2 ms of host time per step (scripts/profile_step.py, "queued steps"). Packing them into one
int32 and one float32 buffer makes that two transfers; the program slices them apart again, which
costs the device next to nothing.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Where each leaf of a pytree of arrays lies in the two buffers. Hashable: a static argument."""

    treedef: jax.tree_util.PyTreeDef
    leaves: tuple[tuple[str, int, tuple[int, ...], str], ...]  # (buffer "i"/"f", offset, shape, dtype)
    sizes: tuple[int, int]  # (int32 elements, float32 elements)

    @classmethod
    def of(cls, tree) -> "PackedLayout":
        """The layout of a pytree of numpy arrays or ShapeDtypeStructs (int32, uint32, bool, float32)."""
        leaves, treedef = jax.tree.flatten(tree)
        offsets, entries = {"i": 0, "f": 0}, []
        for leaf in leaves:
            dtype = np.dtype(leaf.dtype)
            if dtype not in (np.int32, np.uint32, np.bool_, np.float32):
                raise TypeError(f"cannot pack arrays of dtype {dtype}")
            kind = "f" if dtype == np.float32 else "i"
            entries.append((kind, offsets[kind], tuple(leaf.shape), dtype.name))
            offsets[kind] += int(np.prod(leaf.shape, dtype=np.int64))
        return cls(treedef, tuple(entries), (offsets["i"], offsets["f"]))

    def abstract(self) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
        return (jax.ShapeDtypeStruct((self.sizes[0],), np.int32), jax.ShapeDtypeStruct((self.sizes[1],), np.float32))


def pack(tree, layout: PackedLayout, out: tuple[np.ndarray, np.ndarray] | None = None
         ) -> tuple[np.ndarray, np.ndarray]:
    """numpy pytree -> (int32 buffer, float32 buffer), laid out as `layout` (which it must match).

    With `out` (an int32 and a float32 array at least that long) the buffers are views of their
    fronts, written in place: a step's page table is megabytes at 1024 sequences, and allocating
    fresh buffers for it each step cost ~3 ms of page faults on the development machine."""
    leaves, treedef = jax.tree.flatten(tree)
    if treedef != layout.treedef or len(leaves) != len(layout.leaves):
        raise ValueError("the arrays do not have the structure they were compiled for")
    if out is None:
        out = np.empty(layout.sizes[0], np.int32), np.empty(layout.sizes[1], np.float32)
    ints, floats = out[0][: layout.sizes[0]], out[1][: layout.sizes[1]]
    if len(ints) < layout.sizes[0] or len(floats) < layout.sizes[1]:
        raise ValueError(f"buffers of {len(ints)} / {len(floats)} elements; the layout needs {layout.sizes}")
    for leaf, (kind, offset, shape, dtype) in zip(leaves, layout.leaves):
        if leaf.shape != shape or leaf.dtype.name != dtype:
            raise ValueError(f"array of shape {leaf.shape} / {leaf.dtype}; compiled for {shape} / {dtype}")
        target = (floats if kind == "f" else ints)[offset:offset + leaf.size]
        target[:] = leaf.view(np.int32).ravel() if dtype == "uint32" else leaf.ravel()
    return ints, floats


def unpack(ints: jax.Array, floats: jax.Array, layout: PackedLayout):
    """Inside a program: the two buffers -> the pytree of arrays `layout` describes."""
    leaves = []
    for kind, offset, shape, dtype in layout.leaves:
        size = int(np.prod(shape, dtype=np.int64))
        flat = (floats if kind == "f" else ints)[offset:offset + size]
        if dtype == "uint32":
            flat = jax.lax.bitcast_convert_type(flat, jnp.uint32)
        elif dtype == "bool":
            flat = flat != 0
        leaves.append(flat.reshape(shape))
    return jax.tree.unflatten(layout.treedef, leaves)
