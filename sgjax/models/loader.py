"""Load a Hugging Face model folder into a sharded sgjax model.

Each parameter is built with `jax.make_array_from_callback`: every device receives only its own slice,
read lazily from a memory map of the safetensors shard, so the whole model is never materialised on
one device (nor, beyond the page cache, on the host). A fused projection (q/k/v, gate/up) is stacked
on the host from the HF tensors it names, one layer at a time. A GGUF file (`load_format="gguf"`, chosen by
"auto" for a .gguf path) goes the same way, each tensor dequantized whole on the host under its HF name
(sgjax/models/gguf.py). `load_format="dummy"` instead makes random weights of the configured shapes on their
devices, for benchmarks of real sizes with no files.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import struct

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from tqdm.auto import tqdm

from sgjax.kernels import REFERENCE, Kernels
from sgjax.models.config import DTYPES, ModelConfig
from sgjax.models.gguf import GGUFTensors, find_gguf, gguf_model_config
from sgjax.models.gguf_tokenizer import UnsupportedGGUFTokenizer, tokenizer_from_gguf
from sgjax.models.registry import get_model_class
from sgjax.platform.mesh import TENSOR, named_sharding

LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
SAFETENSORS_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class CheckpointTensors:
    """Tensor name -> lazily read numpy view, across all safetensors shards of a folder."""

    def __init__(self, model_path: str):
        index_path = os.path.join(model_path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            with open(index_path) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            for name in files:
                if not os.path.isfile(os.path.join(model_path, name)):
                    raise FileNotFoundError(f"checkpoint shard {name!r} listed in {index_path} is missing")
        else:
            files = sorted(n for n in os.listdir(model_path) if n.endswith(".safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors weights in model folder {model_path!r}")
        self._tensors: dict[str, tuple[np.memmap, str, int, int, tuple[int, ...]]] = {}
        for name in files:
            self._read_header(os.path.join(model_path, name))

    def _read_header(self, path: str) -> None:
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
        data = np.memmap(path, dtype=np.uint8, mode="r")
        base = 8 + header_len
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if info["dtype"] not in SAFETENSORS_DTYPES:
                raise ValueError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            begin, end = info["data_offsets"]
            self._tensors[name] = (data, info["dtype"], base + begin, base + end, tuple(info["shape"]))

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self._tensors[name][4]

    def get(self, name: str) -> np.ndarray:
        data, dtype, begin, end, shape = self._tensors[name]
        return data[begin:end].view(SAFETENSORS_DTYPES[dtype]).reshape(shape)


class PrefixedTensors:
    """A checkpoint's tensors under our names where it nests them elsewhere: `prefixes` maps a prefix of ours to the
    checkpoint's candidates for it (the first one present wins; LLaVA's `model.` is `language_model.model.`)."""

    def __init__(self, tensors: CheckpointTensors, prefixes: dict[str, tuple[str, ...]]):
        self.tensors, self.prefixes = tensors, prefixes

    def _name(self, name: str) -> str:
        for ours, theirs in self.prefixes.items():
            if name.startswith(ours):
                rest = name[len(ours):]
                return next((t + rest for t in theirs if t + rest in self.tensors), name)
        return name

    def __contains__(self, name: str) -> bool:
        return self._name(name) in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors.shape(self._name(name))

    def get(self, name: str) -> np.ndarray:
        return self.tensors.get(self._name(name))


@dataclasses.dataclass
class LoadedModel:
    model: nnx.Module
    config: ModelConfig
    mesh: Mesh
    kernels: Kernels = REFERENCE  # what the model calls; the runner's sampling uses the same choice
    vision: nnx.Module | None = None  # a vision-language model's tower (models/vision), run by its own program
    # The dtype the KV pool keeps when it is not the compute dtype's (a bfloat16 model computed in float32 on a
    # CPU: CPU_BF16_COMPUTE); None: config.dtype.
    kv_dtype: str | None = None


def checkpoint_name(path: tuple) -> str:
    """nnx state path -> Hugging Face tensor name (our module tree mirrors HF's)."""
    return ".".join(str(p) for p in path)


logger = logging.getLogger(__name__)

# On a CPU the weights are float32 unless a dtype is asked for: the CPU has the memory, and bfloat16 rounds
# every activation.
CPU_DTYPE = "float32"
# An asked-for bfloat16 model is computed in float32 on a CPU, its weights' values rounded to bfloat16 and its KV
# cache bfloat16, unless its weights are to stay bfloat16 (`cpu_bf16_weights`, half their memory): XLA's CPU
# compiler has no bfloat16 arithmetic, so every bfloat16 product and elementwise op widens to float32 and rounds
# back, and a prompt's step took 1.5x float32's (SmolLM2, 200 tokens on 2 cores: 0.66 s against 0.45 s).
CPU_BF16_COMPUTE = "float32"


def load_model(
    model_path: str,
    mesh: Mesh,
    *,
    dtype: str | None = None,
    load_format: str = "auto",
    kernels: Kernels = REFERENCE,
    seed: int = 0,
    cpu_bf16_weights: bool = False,
) -> LoadedModel:
    """Build the model named by `model_path` (a folder with config.json, or a GGUF file) with weights on
    `mesh`, calling `kernels` (sgjax.kernels.select; the pure-jnp reference by default). `dtype` None: the
    checkpoint's, except on a CPU (CPU_DTYPE); bfloat16 on a CPU: see CPU_BF16_COMPUTE."""
    on_cpu = mesh.devices.flat[0].platform == "cpu"
    rounded_to = None  # the dtype the weights' values are rounded to, when they are held in a wider one
    if dtype is None and on_cpu:
        dtype = CPU_DTYPE
    elif dtype == "bfloat16" and on_cpu and not cpu_bf16_weights:
        dtype, rounded_to = CPU_BF16_COMPUTE, "bfloat16"
    elif dtype == "float16" and on_cpu:  # bfloat16 has its CPU paths (Kernels.cpu_matmuls, bf16_pool_as_bits)
        logger.warning("float16 on a CPU: only float32 (the CPU's default) and bfloat16 have tuned CPU paths")
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load format {load_format!r} is not one of {LOAD_FORMATS}")
    gguf_file = None
    if load_format != "safetensors":
        gguf_file = find_gguf(model_path, beside_safetensors=load_format == "gguf")
    if load_format == "gguf" and gguf_file is None:
        raise FileNotFoundError(f"load format 'gguf': {model_path!r} is not a .gguf file or a folder holding one")
    if gguf_file is not None:
        cfg = gguf_model_config(gguf_file, dtype)
    else:
        cfg = ModelConfig.from_pretrained(model_path, dtype)
    cfg = dataclasses.replace(cfg, fuse_qkv=cfg.num_kv_heads % mesh.shape[TENSOR] == 0)
    model_class = get_model_class(cfg.architecture)
    graphdef, abstract_state = nnx.split(
        nnx.eval_shape(lambda: model_class(cfg, kernels=kernels, rngs=nnx.Rngs(0))))
    flat = nnx.to_flat_state(abstract_state)
    shardings = [named_sharding(var.get_metadata().get("axes"), var.shape, mesh) for _, var in flat]

    if load_format == "dummy":
        values = _random_weights(flat, shardings, seed, rounded_to)
    else:
        tensors = GGUFTensors(gguf_file, cfg) if gguf_file is not None else CheckpointTensors(model_path)
        if getattr(model_class, "checkpoint_prefixes", None) and gguf_file is None:
            tensors = PrefixedTensors(tensors, model_class.checkpoint_prefixes)
        values = _read_checkpoint(tensors, model_path, flat, shardings, cfg, rounded_to)
    state = nnx.from_flat_state([(path, var.replace(value)) for (path, var), value in zip(flat, values)])
    vision = None
    if cfg.vision is not None:
        # its families import this module
        from sgjax.models.vision.spec import vision_spec

        spec = vision_spec(cfg.architecture)
        vision = (spec.tower(cfg.vision, rngs=nnx.Rngs(seed)) if load_format == "dummy"
                  else spec.load_tower(model_path, mesh, cfg=cfg.vision))
    return LoadedModel(nnx.merge(graphdef, state), cfg, mesh, kernels, vision, kv_dtype=rounded_to)


def _random_weights(flat, shardings, seed: int, rounded_to: str | None = None) -> list[jax.Array]:
    """Random weights made on their devices: N(0, 1/fan_in) matrices, unit norms, zero biases.

    One small jitted initialiser per (shape, dtype, sharding), so a 32-layer model compiles a
    handful of programs rather than one huge one.
    """
    key = jax.random.key(seed)
    values = []
    for i, ((path, var), sharding) in enumerate(zip(tqdm(flat, desc="dummy weights", unit="tensor"), shardings)):
        name = checkpoint_name(path)
        kind = "ones" if "norm" in name else "zeros" if name.endswith("bias") else "normal"
        init = _init_fn(tuple(var.shape), np.dtype(var.dtype), sharding, kind, rounded_to)
        values.append(init(jax.random.fold_in(key, i)))
    return values


@functools.lru_cache(maxsize=None)
def _init_fn(shape, dtype, sharding, kind, rounded_to):
    def init(key):
        if kind == "normal":
            w = jax.random.normal(key, shape, jnp.float32) * shape[-1] ** -0.5
            return (w.astype(rounded_to) if rounded_to else w).astype(dtype)
        return (jnp.ones if kind == "ones" else jnp.zeros)(shape, dtype)

    return jax.jit(init, out_shardings=sharding)


def _read_checkpoint(tensors: CheckpointTensors | GGUFTensors, model_path: str, flat, shardings,
                     cfg: ModelConfig, rounded_to: str | None = None) -> list[jax.Array]:
    target = np.dtype(cfg.jnp_dtype)
    steps = [np.dtype(DTYPES[rounded_to]), target] if rounded_to else [target]
    values = []
    for (path, var), sharding in zip(tqdm(flat, desc="loading weights", unit="tensor"), shardings):
        name = checkpoint_name(path)
        meta = var.get_metadata()
        shape = tuple(var.shape)
        if meta.get("checkpoint_parts"):
            source = _stacked(tensors, name, shape, meta["checkpoint_parts"], meta["checkpoint_axis"],
                              model_path, cfg)
        elif meta.get("checkpoint_reshape"):  # a stack HF keeps flat: [out..., in] as [prod(out), in]
            hf_shape = (math.prod(shape[:-1]), shape[-1]) if name.endswith("weight") else (math.prod(shape),)
            source = _tensor(tensors, name, hf_shape, model_path, cfg).reshape(shape)
        else:
            source = _tensor(tensors, name, shape, model_path, cfg)
        values.append(jax.make_array_from_callback(
            tuple(var.shape), sharding, lambda index, src=source: _cast(np.asarray(src[index]), steps)
        ))
    return values


def _cast(x: np.ndarray, dtypes: list) -> np.ndarray:
    for dtype in dtypes:
        x = x.astype(dtype)
    return x


def _tensor(tensors: CheckpointTensors | GGUFTensors, name: str, shape: tuple[int, ...], model_path: str,
            cfg: ModelConfig):
    """A checkpoint tensor (safetensors: lazily read), checked to exist with the shape the config implies."""
    if name not in tensors:
        raise KeyError(f"checkpoint in {model_path!r} has no tensor {name!r} (needed by {cfg.architecture})")
    if tensors.shape(name) != shape:
        raise ValueError(f"checkpoint tensor {name!r} has shape {tensors.shape(name)}; "
                         f"the config implies {shape}")
    return tensors.get(name)


def _stacked(tensors: CheckpointTensors | GGUFTensors, name: str, shape: tuple[int, ...], parts, axis: int,
             model_path: str, cfg: ModelConfig) -> np.ndarray:
    """A fused parameter (e.g. `...self_attn.qkv_proj.weight`) from the HF tensors of its parts
    (`...self_attn.q_proj.weight`, ...): each reshaped to its slots of `axis`, concatenated along it,
    in the checkpoint's dtype (the caller casts each device's slice, as for any tensor)."""
    module, _, leaf = name.rsplit(".", 2)
    pieces = []
    for part, slots in parts:
        part_shape = shape[:axis] + (slots,) + shape[axis + 1:]
        # HF keeps a weight as [out, in] and a bias as [out]: everything but `in` flattened.
        hf_shape = (math.prod(part_shape[:-1]), part_shape[-1]) if leaf == "weight" else (math.prod(part_shape),)
        pieces.append(np.asarray(_tensor(tensors, f"{module}.{part}.{leaf}", hf_shape, model_path, cfg))
                      .reshape(part_shape))
    return np.concatenate(pieces, axis=axis)


def load_tokenizer(model_path: str):
    """The checkpoint's Hugging Face tokenizer, with a clear error when its files are missing. For a GGUF file,
    the tokenizer (and its chat template) is built from the file's metadata (sgjax/models/gguf_tokenizer.py)."""
    import transformers

    gguf_file = find_gguf(model_path)
    try:
        if gguf_file is not None:
            try:
                return tokenizer_from_gguf(gguf_file)
            except UnsupportedGGUFTokenizer:
                # Sentencepiece vocabularies ("llama", e.g. TinyLlama) and unlisted pre-tokenizers: transformers
                # builds those (slower, and it imports torch), rather than sgjax guessing at their details.
                folder, name = os.path.split(os.path.abspath(gguf_file))
                return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
        return transformers.AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError, KeyError) as e:
        raise FileNotFoundError(f"cannot load a tokenizer from {model_path!r}: {e}") from e
