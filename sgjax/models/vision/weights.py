"""A vision tower's weights from a checkpoint folder or a state dict, placed on the mesh by each parameter's `axes`.

Towers mirror Hugging Face's module tree under a prefix (`visual.` or `model.visual.`, whichever the checkpoint
uses). A parameter whose metadata has `checkpoint_reshape` takes a tensor of the same size in HF's flat layout
(a fused qkv [3 * E, E] as [3, heads, D, E]).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from sgjax.models.loader import CheckpointTensors
from sgjax.platform.mesh import named_sharding

# transformers' save_pretrained and the Qwen checkpoints write `visual.*`; GLM's and other converters keep the
# in-memory name
VISION_PREFIXES = ("visual.", "model.visual.")


def load_tower(make_tower: Callable[[], nnx.Module], source: str | Mapping[str, np.ndarray], mesh: Mesh, dtype,
               name: str) -> nnx.Module:
    """The tower `make_tower` builds, with weights from a model folder (safetensors) or a state dict of numpy
    arrays under HF names, cast to `dtype`. `name` names the tower in errors."""
    tensors, where = (CheckpointTensors(source), repr(source)) if isinstance(source, str) else (source, "the state dict")
    prefix = next((p for p in VISION_PREFIXES if f"{p}patch_embed.proj.weight" in tensors), None)
    if prefix is None:
        raise KeyError(f"{where} has no vision tower tensors (looked for {' or '.join(VISION_PREFIXES)}patch_embed.*)")
    graphdef, abstract = nnx.split(nnx.eval_shape(make_tower))
    flat = nnx.to_flat_state(abstract)
    target = np.dtype(dtype)
    values = []
    for path, var in flat:
        key = prefix + ".".join(str(p) for p in path)
        if key not in tensors:
            raise KeyError(f"{where} has no tensor {key!r} (needed by the {name} vision tower)")
        array = tensors.get(key)
        shape = tuple(var.shape)
        if tuple(array.shape) != shape:
            if not (var.get_metadata().get("checkpoint_reshape") and array.size == np.prod(shape)):
                raise ValueError(f"tensor {key!r} has shape {tuple(array.shape)}; the vision config implies {shape}")
            array = array.reshape(shape)
        sharding = named_sharding(var.get_metadata().get("axes"), shape, mesh)
        values.append(jax.make_array_from_callback(
            shape, sharding, lambda index, src=array: np.asarray(src[index]).astype(target)))
    state = nnx.from_flat_state([(path, var.replace(value)) for (path, var), value in zip(flat, values)])
    return nnx.merge(graphdef, state)
