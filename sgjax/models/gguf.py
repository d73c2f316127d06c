"""GGUF checkpoints (llama.cpp's one-file format): the model config from the file's metadata, and its tensors
under Hugging Face names, dequantized, so the loader places them exactly as it places safetensors weights.

The config is built as the Hugging Face config the file was converted from (transformers fills each family's
defaults, as for a config.json), then read by ModelConfig.from_hf. Tensors are undone from what llama.cpp's
converter (convert_hf_to_gguf.py) did to them: Llama's q/k rows reordered for llama.cpp's interleaved RoPE,
Gemma's norm weights stored as 1 + w, and all dimensions listed innermost first (ne0, ne1, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import numpy as np
from gguf import MODEL_ARCH_NAMES, GGMLQuantizationType, GGUFReader, Keys, get_tensor_name_map

from sgjax.models.config import ModelConfig
from sgjax.models.dequantize import SUPPORTED_TYPES, dequantize

MAGIC = b"GGUF"


@dataclasses.dataclass(frozen=True)
class Family:
    hf_architecture: str
    model_type: str  # transformers' config type
    permuted_qk: bool  # the converter reorders q/k rows from HF's rotate-half RoPE to llama.cpp's interleaved one
    norm_shift: float = 0.0  # the converter adds this to every norm weight (Gemma's norms scale by 1 + w)


# general.architecture -> family. llama.cpp converts Mistral checkpoints as "llama" (full attention, as it runs them).
FAMILIES = {
    "llama": Family("LlamaForCausalLM", "llama", permuted_qk=True),
    "qwen2": Family("Qwen2ForCausalLM", "qwen2", permuted_qk=False),
    "qwen3": Family("Qwen3ForCausalLM", "qwen3", permuted_qk=False),
    "gemma2": Family("Gemma2ForCausalLM", "gemma2", permuted_qk=False, norm_shift=1.0),
}
_REQUIRED = object()


class FastGGUFReader(GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map. The reader makes a few numpy views per metadata
    item (about 250k for a 49k-token vocabulary), and a view of an np.memmap runs memmap's Python
    __array_finalize__ each time, seconds in all for such a file."""

    @property
    def data(self) -> np.ndarray:
        return self._buffer

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._buffer = value.view(np.ndarray)


class GGUFFile:
    """A GGUF file's metadata and tensor table; tensor data stays in the memory map until asked for."""

    def __init__(self, path: str):
        self.path = path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no GGUF file at {path!r}")
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
        if head != MAGIC:
            raise ValueError(f"{path!r} is not a GGUF file: it starts with {head!r}, not {MAGIC!r}")
        try:
            self._reader = FastGGUFReader(path)
        except (ValueError, IndexError, KeyError, OverflowError) as e:
            raise ValueError(f"cannot read the GGUF header of {path!r} (truncated or corrupt file?): {e}") from e
        self.tensors = {t.name: t for t in self._reader.tensors}
        for t in self._reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"GGUF file {path!r} is truncated: tensor {t.name!r} ends at byte "
                                 f"{t.data_offset + t.n_bytes}, the file has {size}")
        self.architecture = str(self.get(Keys.General.ARCHITECTURE))

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        """A metadata value (scalar, string or list); a missing key without a default is an error naming it."""
        field = self._reader.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise ValueError(f"GGUF file {self.path!r} has no metadata key {key!r}")
            return default
        return field.contents()

    def arch_get(self, key: str, default: Any = _REQUIRED) -> Any:
        """`key` with its `{arch}` filled in, e.g. Keys.LLM.BLOCK_COUNT -> "llama.block_count"."""
        return self.get(key.format(arch=self.architecture), default)

    def shape(self, name: str) -> tuple[int, ...]:
        """Row-major shape of a tensor (GGUF lists dimensions innermost first)."""
        return tuple(int(n) for n in reversed(self.tensors[name].shape.tolist()))

    def qtype(self, name: str) -> GGMLQuantizationType:
        return GGMLQuantizationType(int(self.tensors[name].tensor_type))

    def raw(self, name: str) -> np.ndarray:
        """A tensor's bytes as stored (uint8, a view of the memory map)."""
        t = self.tensors[name]
        return self._reader.data[t.data_offset:t.data_offset + t.n_bytes]

    def read(self, name: str) -> np.ndarray:
        """A tensor dequantized to float32, in its row-major shape."""
        if self.qtype(name) not in SUPPORTED_TYPES:
            names = ", ".join(q.name for q in SUPPORTED_TYPES)
            raise ValueError(f"GGUF tensor {name!r} in {self.path!r} is quantized as {self.qtype(name).name}, "
                             f"which sgjax cannot dequantize (supported: {names})")
        return dequantize(self.raw(name), self.qtype(name), self.shape(name))


@functools.lru_cache(maxsize=4)
def _open_cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return GGUFFile(path)


def open_gguf(path: str) -> GGUFFile:
    """The parsed file, shared by callers in one process (config, then weights) while it is unchanged."""
    path = os.path.realpath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no GGUF file at {path!r}")
    stat = os.stat(path)
    return _open_cached(path, stat.st_mtime_ns, stat.st_size)


def find_gguf(path: str, *, beside_safetensors: bool = False) -> str | None:
    """The GGUF file `path` stands for: `path` itself if it is a .gguf file, or the one .gguf file in folder
    `path` (only where the folder holds no safetensors weights, unless `beside_safetensors`); else None."""
    if os.path.isfile(path):
        return path if path.endswith(".gguf") else None
    if not os.path.isdir(path):
        return None
    names = sorted(os.listdir(path))
    ggufs = [n for n in names if n.endswith(".gguf")]
    if not ggufs or (not beside_safetensors and any(n.endswith(".safetensors") for n in names)):
        return None
    if len(ggufs) > 1:
        raise ValueError(f"model folder {path!r} holds several GGUF files ({', '.join(ggufs)}); pass the path of one")
    return os.path.join(path, ggufs[0])


def family_of(f: GGUFFile) -> Family:
    if f.architecture not in FAMILIES:
        raise ValueError(f"GGUF architecture {f.architecture!r} ({f.path!r}) is not supported "
                         f"(supported: {', '.join(sorted(FAMILIES))})")
    return FAMILIES[f.architecture]


def hf_config_dict(f: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config (as keyword arguments of its config class) that the file was converted from."""
    family = family_of(f)
    heads = int(f.arch_get(Keys.Attention.HEAD_COUNT))
    kv_heads = f.arch_get(Keys.Attention.HEAD_COUNT_KV, heads)
    if isinstance(kv_heads, list):
        raise ValueError(f"GGUF file {f.path!r} has a KV head count per layer; sgjax needs one for all layers")
    hidden = int(f.arch_get(Keys.LLM.EMBEDDING_LENGTH))
    # RoPE covers whole heads in these families, so rope.dimension_count is the head size where key_length is absent.
    head_dim = f.arch_get(Keys.Attention.KEY_LENGTH, None) or f.arch_get(Keys.Rope.DIMENSION_COUNT, None)
    layers = int(f.arch_get(Keys.LLM.BLOCK_COUNT))
    config = dict(
        architectures=[family.hf_architecture],
        vocab_size=f.shape("token_embd.weight")[0],
        hidden_size=hidden,
        intermediate_size=int(f.arch_get(Keys.LLM.FEED_FORWARD_LENGTH)),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim or hidden // heads),
        rms_norm_eps=float(f.arch_get(Keys.Attention.LAYERNORM_RMS_EPS)),
        max_position_embeddings=int(f.arch_get(Keys.LLM.CONTEXT_LENGTH)),
        rope_theta=float(f.arch_get(Keys.Rope.FREQ_BASE, 10000.0)),
        tie_word_embeddings="output.weight" not in f.tensors,
    )
    scaling = _rope_scaling(f)
    if scaling:
        config["rope_scaling"] = scaling
    if family.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in f.tensors
        config["mlp_bias"] = "blk.0.ffn_up.bias" in f.tensors
    if family.model_type == "gemma2":
        config.update(
            sliding_window=int(f.arch_get(Keys.Attention.SLIDING_WINDOW)),
            attn_logit_softcapping=f.arch_get(Keys.LLM.ATTN_LOGIT_SOFTCAPPING, None),
            final_logit_softcapping=f.arch_get(Keys.LLM.FINAL_LOGIT_SOFTCAPPING, None),
            # Not in the metadata: llama.cpp scales queries by head_dim**-0.5, except in Gemma 2 27B (46 layers),
            # by (hidden / heads)**-0.5, as its HF config's query_pre_attn_scalar says.
            query_pre_attn_scalar=hidden // heads if layers == 46 else config["head_dim"],
        )
    return config


def _rope_scaling(f: GGUFFile) -> dict[str, Any] | None:
    kind = f.arch_get(Keys.Rope.SCALING_TYPE, None)
    factor = f.arch_get(Keys.Rope.SCALING_FACTOR, None) or f.arch_get("{arch}.rope.scale_linear", None)
    if kind is None:  # files older than rope.scaling.type have only a linear factor
        kind = "linear" if factor and factor != 1.0 else "none"
    if kind == "none":
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    raise ValueError(f"GGUF file {f.path!r} uses RoPE scaling {kind!r}; sgjax supports none, linear and "
                     f"per-frequency factors (rope_freqs)")


def gguf_model_config(path: str, dtype: str | None = None) -> ModelConfig:
    """ModelConfig of a GGUF file; `dtype` (default bfloat16) is what its weights are dequantized to."""
    import transformers

    f = open_gguf(path)
    family = family_of(f)
    hf = transformers.AutoConfig.for_model(family.model_type, **hf_config_dict(f))
    cfg = ModelConfig.from_hf(hf, family.hf_architecture, dtype or "bfloat16")
    if "rope_freqs.weight" in f.tensors:
        # Llama 3.1-style scaling, which llama.cpp stores as one divisor per RoPE frequency.
        factors = f.read("rope_freqs.weight").reshape(-1)
        if factors.size != cfg.head_dim // 2:
            raise ValueError(f"GGUF tensor 'rope_freqs.weight' has {factors.size} factors; head size "
                             f"{cfg.head_dim} needs {cfg.head_dim // 2}")
        cfg = dataclasses.replace(cfg, rope_scaling=(("factors", tuple(float(x) for x in factors)),
                                                     ("rope_type", "freq_factors")))
    return cfg


class GGUFTensors:
    """The loader's CheckpointTensors interface over a GGUF file: Hugging Face tensor name -> float32 array,
    dequantized and undone from the converter's changes (read whole: quantized blocks cannot be sliced)."""

    def __init__(self, path: str, cfg: ModelConfig):
        self.file = open_gguf(path)
        self.family = family_of(self.file)
        self.cfg = cfg
        arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == self.file.architecture)
        self._name_map = get_tensor_name_map(arch, cfg.num_layers)

    def gguf_name(self, name: str) -> str | None:
        """GGUF name of a Hugging Face tensor name (gguf's own table, as llama.cpp's converter names them)."""
        module, _, leaf = name.rpartition(".")
        mapped = self._name_map.get_name(module)
        return f"{mapped}.{leaf}" if mapped else None

    def __contains__(self, name: str) -> bool:
        return self.gguf_name(name) in self.file.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.shape(self.gguf_name(name))

    def get(self, name: str) -> np.ndarray:
        gguf_name = self.gguf_name(name)
        w = self.file.read(gguf_name)
        if self.family.permuted_qk and gguf_name.split(".")[-2] in ("attn_q", "attn_k"):
            heads = self.cfg.num_heads if gguf_name.split(".")[-2] == "attn_q" else self.cfg.num_kv_heads
            w = unpermute_qk(w, heads)
        if self.family.norm_shift and name.endswith("norm.weight"):
            w = w - np.float32(self.family.norm_shift)
        return w


def unpermute_qk(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order. Within each head the converter stores row i of the first half of HF's
    rows (rotate-half RoPE pairs i with i + D/2) at 2i and its partner at 2i + 1 (llama.cpp pairs neighbours);
    works for a weight [heads * D, in] and a bias [heads * D]."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
