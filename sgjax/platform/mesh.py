"""The device mesh ("data", "tensor") and how a logical axis annotation becomes a sharding.

Parameters are annotated with the mesh axis each dimension is split over ("tensor" for heads and MLP
columns, None for replicated). A dimension that the axis size does not divide stays replicated, so a
model with 2 KV heads still runs on tensor=8 (the KV heads are then replicated, as vLLM does).
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, TENSOR = "data", "tensor"
AxisNames = Sequence[str | None]


def parse_mesh_shape(spec: str | tuple[int, int]) -> tuple[int, int]:
    """'2x4' -> (data=2, tensor=4)."""
    if isinstance(spec, tuple):
        return spec
    try:
        data, tensor = (int(x) for x in spec.lower().split("x"))
    except ValueError:
        raise ValueError(f"mesh {spec!r} must look like DATAxTENSOR, e.g. '1x8' or '2x4'") from None
    if data < 1 or tensor < 1:
        raise ValueError(f"mesh {spec!r} must have positive sizes")
    return data, tensor


def make_mesh(spec: str | tuple[int, int] = "1x1", devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A Mesh with axes ("data", "tensor") over the first data*tensor devices."""
    data, tensor = parse_mesh_shape(spec)
    devices = list(devices if devices is not None else jax.devices())
    if data * tensor > len(devices):
        raise ValueError(f"mesh {data}x{tensor} needs {data * tensor} devices; {len(devices)} available")
    grid = np.array(devices[: data * tensor]).reshape(data, tensor)
    return Mesh(grid, (DATA, TENSOR))


def partition_spec(axes: AxisNames | None, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Axis annotation -> PartitionSpec, replicating any dimension the mesh axis does not divide."""
    if not axes:
        return PartitionSpec()
    if len(axes) != len(shape):
        raise ValueError(f"axis annotation {tuple(axes)} does not match shape {tuple(shape)}")
    resolved = [a if a is not None and dim % mesh.shape[a] == 0 else None for a, dim in zip(axes, shape)]
    return PartitionSpec(*resolved)


def named_sharding(axes: AxisNames | None, shape: Sequence[int], mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, partition_spec(axes, shape, mesh))
