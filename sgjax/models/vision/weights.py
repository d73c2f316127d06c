"""A vision tower's weights: each parameter read from the checkpoint tensor its path names, checked, cast and placed
on the mesh by its `axes` (every device reads only its slice)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax.models.loader import CheckpointTensors
from sgjax.platform.mesh import named_sharding


def load_module_weights(make: Callable[[], nnx.Module], tensors: Mapping, name_of: Callable[[str], str | None],
                        mesh: Mesh, dtype, *, where: str, what: str) -> nnx.Module:
    """The module `make()` builds, with weights from `tensors` (a state dict or CheckpointTensors): parameter path
    "a.b.c" comes from tensor `name_of("a.b.c")` (None: not in `where`). A parameter with `checkpoint_reshape`
    metadata may have another shape of the same size (a fused [3 * E, E] as [3, heads, D, E])."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    flat = nnx.to_flat_state(abstract)
    target = np.dtype(dtype)
    values = []
    for path, var in flat:
        key = ".".join(str(p) for p in path)
        name = name_of(key)
        if name is None or name not in tensors:
            raise KeyError(f"{where} has no tensor {name or key!r} (needed by the {what})")
        array = tensors.get(name)
        shape = tuple(var.shape)
        if tuple(array.shape) != shape:
            if not (var.get_metadata().get("checkpoint_reshape") and array.size == np.prod(shape)):
                raise ValueError(f"tensor {name!r} has shape {tuple(array.shape)}; the vision config implies {shape}")
            array = array.reshape(shape)
        sharding = named_sharding(var.get_metadata().get("axes"), shape, mesh)
        values.append(jax.make_array_from_callback(
            shape, sharding, lambda index, src=array: np.asarray(src[index]).astype(target)))
    state = nnx.from_flat_state([(path, var.replace(value)) for (path, var), value in zip(flat, values)])
    return nnx.merge(graphdef, state)


# transformers' save_pretrained and the Qwen checkpoints write `visual.*`; GLM's and other converters keep the
# in-memory name
VISUAL_PREFIXES = ("visual.", "model.visual.")


def load_visual_tower(make: Callable[[], nnx.Module], source: str | Mapping, mesh: Mesh, dtype, *,
                      what: str) -> nnx.Module:
    """A tower kept under `visual.` or `model.visual.` (Qwen2-VL's, GLM-4.1V's) with weights from a model folder
    (safetensors) or a state dict of numpy arrays under HF names."""
    tensors, where = (CheckpointTensors(source), repr(source)) if isinstance(source, str) else (source, "the state dict")
    prefix = next((p for p in VISUAL_PREFIXES if f"{p}patch_embed.proj.weight" in tensors), None)
    if prefix is None:
        raise KeyError(f"{where} has no vision tower tensors (looked for {' or '.join(VISUAL_PREFIXES)}patch_embed.*)")
    return load_module_weights(make, tensors, lambda key: prefix + key, mesh, dtype, where=where, what=what)
