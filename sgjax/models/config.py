"""ModelConfig: the few numbers a decoder needs, read once from a Hugging Face config.json (or from a GGUF
file's metadata, through the HF config it implies: sgjax/models/gguf.py).

transformers fills each family's defaults (Qwen2's qkv bias, Gemma 2's alternating windows), and
we copy out only what the model code reads, so model code never touches an HF config object.
Both the transformers 4.x (`rope_scaling`, `rope_theta`) and 5.x (`rope_parameters`) spellings work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: tuple[tuple[str, Any], ...] | None = None  # sorted items, hashable for jit
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    rotary_dim: int = 0  # features of each head that RoPE turns (GLM-4: half); 0: all of head_dim
    rope_interleaved: bool = False  # GLM-4: RoPE pairs features (2i, 2i + 1), not (i, i + rotary_dim / 2)
    checkpoint_gate_up: bool = False  # GLM-4: the checkpoint holds gate and up as one `gate_up_proj` tensor
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    sliding_windows: tuple[int | None, ...] = ()  # per layer; None = full attention
    # Gemma 2
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    query_pre_attn_scalar: float | None = None
    dtype: str = "bfloat16"
    # q/k/v as one matmul; the loader turns it off when the mesh's "tensor" axis does not divide the KV heads
    fuse_qkv: bool = True
    # Vision-language models (models/vision/spec.py): image placeholders take the tower's rows. M-RoPE (Qwen2-VL,
    # Qwen2.5-VL) splits the rotary frequencies into sections rotated by the temporal, row and column positions
    # (positions are [3, T]).
    mrope_section: tuple[int, ...] = ()
    image_token_id: int | None = None
    # The tokens around an image's placeholder where the chat template writes them (Qwen: <|vision_start|>...)
    image_wrapper_ids: tuple[int, ...] = ()
    vision: Any = None  # the family's vision config (VisionSpec.config)

    @property
    def is_multimodal(self) -> bool:
        return self.vision is not None

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @property
    def rope_scaling_dict(self) -> dict[str, Any] | None:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @classmethod
    def from_pretrained(cls, model_path: str, dtype: str | None = None) -> "ModelConfig":
        """Read `model_path/config.json`, or the metadata of the GGUF file `model_path` names (a .gguf file, or
        a folder holding one and no safetensors); `dtype` overrides the checkpoint's dtype."""
        from sgjax.models.gguf import find_gguf, gguf_model_config

        gguf_file = find_gguf(model_path)
        if gguf_file is not None:
            return gguf_model_config(gguf_file, dtype)
        path = os.path.join(model_path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no config.json in model folder {model_path!r}")
        with open(path) as f:
            raw = json.load(f)
        architectures = raw.get("architectures") or []
        if not architectures:
            raise ValueError(f"{path} has no 'architectures' entry; cannot choose a model class")
        from sgjax.models.registry import check_supported

        check_supported(architectures[0])
        import transformers

        hf = transformers.AutoConfig.from_pretrained(model_path)
        return cls.from_hf(hf, architectures[0], dtype)

    @classmethod
    def from_hf(cls, hf, architecture: str, dtype: str | None = None) -> "ModelConfig":
        """Copy the fields we use out of a transformers PretrainedConfig."""
        # its families import this module
        from sgjax.models.vision.spec import is_vision_language, vision_spec

        outer = hf
        vision_language = is_vision_language(architecture)
        spec = vision_spec(architecture) if vision_language else None
        if vision_language:  # the decoder's numbers are in text_config; the embeddings' tying is the outer one's
            hf = hf.get_text_config()
        get = lambda name, default=None: getattr(hf, name, default)  # noqa: E731
        num_heads = hf.num_attention_heads
        head_dim = get("head_dim") or hf.hidden_size // num_heads
        rope = dict(get("rope_parameters") or get("rope_scaling") or {})
        rope_theta = rope.pop("rope_theta", None) or get("rope_theta") or 10000.0
        mrope_section = tuple(rope.pop("mrope_section", ()) or ())
        partial_rotary = rope.pop("partial_rotary_factor", None) or get("partial_rotary_factor") or 1.0
        if rope.get("type") == "mrope":  # transformers 4.x's spelling of M-RoPE over default frequencies
            rope.pop("type")
        family = _text_family(hf) if vision_language else architecture.removesuffix("ForCausalLM")
        if vision_language and spec.mrope and not mrope_section:
            mrope_section = MROPE_DEFAULTS[family]  # transformers' defaults for these models
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in ("default", "linear", "llama3"):
            raise ValueError(f"rope type {rope_type!r} is not supported (supported: default, linear, llama3)")
        rope_scaling = None if rope_type == "default" else tuple(sorted(rope.items()))

        layer_types = get("layer_types")
        window = get("sliding_window")
        if layer_types:
            windows = tuple(window if t == "sliding_attention" else None for t in layer_types)
        elif (architecture.startswith("Mistral") or getattr(hf, "model_type", None) == "mistral") and window:
            windows = (window,) * hf.num_hidden_layers
        else:
            windows = (None,) * hf.num_hidden_layers

        attention_bias = bool(get("attention_bias", False))
        if dtype is None:
            dtype = str(get("dtype") or getattr(outer, "dtype", None) or get("torch_dtype")
                        or "bfloat16").removeprefix("torch.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not supported (choose from {sorted(DTYPES)})")
        is_gemma = family.startswith("Gemma")
        return cls(
            architecture=architecture,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=num_heads,
            num_kv_heads=get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            max_position_embeddings=get("max_position_embeddings", 8192),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            qkv_bias=family in ("Qwen2", "Glm4") or attention_bias,
            o_bias=attention_bias and family not in ("Qwen2", "Glm4"),
            mlp_bias=bool(get("mlp_bias", False)),
            qk_norm=family == "Qwen3",
            rotary_dim=int(head_dim * partial_rotary) if partial_rotary != 1.0 else 0,
            rope_interleaved=family == "Glm4",
            checkpoint_gate_up=family == "Glm4",
            tie_word_embeddings=bool(getattr(outer, "tie_word_embeddings", False)),
            hidden_act=(get("hidden_activation") if is_gemma else None) or get("hidden_act") or "silu",
            sliding_windows=windows,
            attn_logit_softcap=get("attn_logit_softcapping") if is_gemma else None,
            final_logit_softcap=get("final_logit_softcapping") if is_gemma else None,
            query_pre_attn_scalar=get("query_pre_attn_scalar") if is_gemma else None,
            dtype=dtype,
            mrope_section=mrope_section,
            image_token_id=getattr(outer, "image_token_id", None) if vision_language else None,
            image_wrapper_ids=_image_wrapper_ids(outer) if vision_language else (),
            vision=spec.config(outer.to_dict(), dtype) if vision_language else None,
        )


# A vision-language model's text_config model_type -> the decoder family it is (its flags in from_hf)
TEXT_FAMILIES = {"qwen2_vl_text": "Qwen2", "qwen2_5_vl_text": "Qwen2", "qwen2": "Qwen2", "llama": "Llama",
                 "mistral": "Mistral", "glm4v_text": "Glm4"}
MROPE_DEFAULTS = {"Qwen2": (16, 24, 24), "Glm4": (8, 12, 12)}  # M-RoPE sections a config may leave out


def _text_family(text_config) -> str:
    model_type = getattr(text_config, "model_type", None)
    if model_type not in TEXT_FAMILIES:
        raise ValueError(f"a {model_type!r} decoder under a vision tower is not supported "
                         f"(supported: {sorted(TEXT_FAMILIES)})")
    return TEXT_FAMILIES[model_type]


def _image_wrapper_ids(hf) -> tuple[int, ...]:
    """The tokens a chat template writes around an image's placeholder: Qwen's <|vision_start|>/<|vision_end|>,
    GLM's <|begin_of_image|>/<|end_of_image|>."""
    for start, end in (("vision_start_token_id", "vision_end_token_id"), ("image_start_token_id", "image_end_token_id")):
        ids = (getattr(hf, start, None), getattr(hf, end, None))
        if None not in ids:
            return ids
    return ()
