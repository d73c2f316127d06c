"""The CLIP vision transformer (LLaVA's tower): square tiles -> patch embeddings (a strided conv, as one matmul)
with a class token and learned positions -> pre-LayerNorm -> encoder layers (LayerNorm, attention, LayerNorm,
MLP, each residual) -> the hidden states of every layer.

A tile is one image of the model's image_size (LLaVA-1.5: the center crop; LLaVA-NeXT: the resized whole image and
its anyres tiles); tiles never attend to each other, so attention is batched over tiles with no mask. Only the
layers up to the deepest one read (`num_layers`) are built: LLaVA reads the second-to-last. The final
post_layernorm is CLIP's pooled output, which LLaVA never reads, so it is not here.
Module and parameter names mirror Hugging Face's CLIPVisionTransformer.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from sgjax.models.config import DTYPES
from sgjax.models.layers import COLUMN, ROW, Linear
from sgjax.models.vision.qwen2_vl import ACTIVATIONS, LayerNorm


@dataclasses.dataclass(frozen=True)
class ClipConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int  # layers built (the deepest one read); the checkpoint may have more
    num_heads: int
    image_size: int = 336
    patch_size: int = 14
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    dtype: str = "float32"

    @property
    def side(self) -> int:
        """Patches per tile side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.side**2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def jnp_dtype(self):
        return DTYPES[self.dtype]

    @classmethod
    def from_hf(cls, v: Mapping, num_layers: int, dtype: str = "float32") -> ClipConfig:
        """From a CLIPVisionConfig's dict, building `num_layers` of its layers."""
        if v.get("model_type", "clip_vision_model") != "clip_vision_model":
            raise ValueError(f"vision tower {v.get('model_type')!r} is not supported here (supported: CLIP)")
        if not 0 <= num_layers <= v["num_hidden_layers"]:
            raise ValueError(f"the tower reads layer {num_layers}; CLIP has {v['num_hidden_layers']}")
        if v.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ValueError(f"vision activation {v['hidden_act']!r} is not supported (supported: {sorted(ACTIVATIONS)})")
        return cls(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"], num_layers=num_layers,
                   num_heads=v["num_attention_heads"], image_size=v.get("image_size", 224),
                   patch_size=v.get("patch_size", 32), num_channels=v.get("num_channels", 3),
                   hidden_act=v.get("hidden_act", "quick_gelu"), layer_norm_eps=v.get("layer_norm_eps", 1e-5),
                   dtype=dtype)


class ClipEmbeddings(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        e, dt, p = cfg.hidden_size, cfg.jnp_dtype, cfg.patch_size
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (e,), dt), axes=(None,))
        init = jax.random.normal(rngs.params(), (e, cfg.num_channels, p, p), dt) * (cfg.num_channels * p * p)**-0.5
        self.patch_embedding = nnx.Dict(weight=nnx.Param(init, axes=(None,) * 4))
        positions = jax.random.normal(rngs.params(), (cfg.num_patches + 1, e), dt) * 0.02
        self.position_embedding = nnx.Dict(weight=nnx.Param(positions, axes=(None, None)))
        self.cfg = cfg

    def __call__(self, tiles: jax.Array) -> jax.Array:
        """[n, C, S, S] -> [n, 1 + patches, E]: the class token, then the patches row by row."""
        cfg, n = self.cfg, tiles.shape[0]
        s, p = cfg.side, cfg.patch_size
        w = self.patch_embedding["weight"][...]
        patches = tiles.reshape(n, cfg.num_channels, s, p, s, p).transpose(0, 2, 4, 1, 3, 5)
        x = jnp.einsum("nijk,ek->nije", patches.reshape(n, s, s, -1).astype(w.dtype), w.reshape(w.shape[0], -1))
        cls = jnp.broadcast_to(self.class_embedding[...], (n, 1, w.shape[0]))
        x = jnp.concatenate([cls, x.reshape(n, s * s, -1)], axis=1)
        return x + self.position_embedding["weight"][...]


class ClipAttention(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        e, dt = cfg.hidden_size, cfg.jnp_dtype
        self.q_proj, self.k_proj, self.v_proj = (Linear(e, e, bias=True, axes=COLUMN, dtype=dt, rngs=rngs)
                                                 for _ in range(3))
        self.out_proj = Linear(e, e, bias=True, axes=ROW, dtype=dt, rngs=rngs)
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x: jax.Array) -> jax.Array:
        """Bidirectional attention within each tile: x [n, L, E]."""
        n, length, _ = x.shape
        q, k, v = (proj(x).reshape(n, length, self.heads, self.head_dim) for proj in (self.q_proj, self.k_proj,
                                                                                       self.v_proj))
        scores = jnp.einsum("nqhd,nkhd->nhqk", q, k, preferred_element_type=jnp.float32) * self.head_dim**-0.5
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        return self.out_proj(jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, length, -1))


class ClipMLP(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        e, i, dt = cfg.hidden_size, cfg.intermediate_size, cfg.jnp_dtype
        self.fc1 = Linear(e, i, bias=True, axes=COLUMN, dtype=dt, rngs=rngs)
        self.fc2 = Linear(i, e, bias=True, axes=ROW, dtype=dt, rngs=rngs)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(self.act(self.fc1(x)))


class ClipEncoderLayer(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        e, eps, dt = cfg.hidden_size, cfg.layer_norm_eps, cfg.jnp_dtype
        self.layer_norm1 = LayerNorm(e, eps, dt)
        self.self_attn = ClipAttention(cfg, rngs)
        self.layer_norm2 = LayerNorm(e, eps, dt)
        self.mlp = ClipMLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class ClipEncoder(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        self.layers = nnx.List([ClipEncoderLayer(cfg, rngs) for _ in range(cfg.num_layers)])


class ClipVisionTransformer(nnx.Module):
    def __init__(self, cfg: ClipConfig, rngs: nnx.Rngs):
        self.config = cfg
        self.embeddings = ClipEmbeddings(cfg, rngs)
        self.pre_layrnorm = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, cfg.jnp_dtype)  # HF's spelling
        self.encoder = ClipEncoder(cfg, rngs)

    def __call__(self, tiles: jax.Array) -> list[jax.Array]:
        """tiles [n, C, S, S] -> hidden states [n, 1 + patches, E]: the embeddings' (index 0), then each layer's."""
        x = self.pre_layrnorm(self.embeddings(tiles))
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states
