"""GLM-4.1V / GLM-4.6V-Flash's language model: the GLM-4 decoder with 3D rope, whose image placeholder tokens take
the vision tower's rows (models/vision/glm4v.py) as Qwen2-VL's do (models/qwen2_vl.py).

GLM-4's layer is Llama's with two more norms: one on the attention's output and one on the MLP's, each before its
residual add. Its rope turns only the first half of each head (ModelConfig.rotary_dim), in interleaved pairs
(rope_interleaved), with the frequencies split into temporal/row/column sections (M-RoPE: mrope_section). The
checkpoint fuses gate and up into one `gate_up_proj` (checkpoint_gate_up) and names the decoder
`model.language_model.*`.
"""

from __future__ import annotations

from typing import ClassVar

import jax
from flax import nnx

from sgjax.kernels import AttentionMetadata, Kernels
from sgjax.models.config import ModelConfig
from sgjax.models.layers import Attention, GatedMLP, KVCache, RMSNorm
from sgjax.models.llama import DecoderModel
from sgjax.models.qwen2_vl import Qwen2VLForConditionalGeneration


class Glm4DecoderLayer(nnx.Module):
    """h = attn(input_norm(x)); x += post_self_attn_norm(h); then pending = post_mlp_norm(mlp(post_attention_norm(x))),
    which the next layer's input norm (or the final norm) adds, as DecoderLayer hands on its MLP output."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels, rngs: nnx.Rngs):
        h, eps, dt = cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype
        self.input_layernorm = RMSNorm(h, eps, dt)
        self.self_attn = Attention(cfg, layer_idx, kernels, rngs)
        self.post_self_attn_layernorm = RMSNorm(h, eps, dt)
        self.post_attention_layernorm = RMSNorm(h, eps, dt)  # HF's name for the norm before the MLP
        self.mlp = GatedMLP(cfg, rngs, cpu=kernels.cpu_matmuls)
        self.post_mlp_layernorm = RMSNorm(h, eps, dt)
        self.norm_kernel = kernels.add_rms_norm

    def __call__(self, x: jax.Array, pending: jax.Array | None, positions: jax.Array, kv: KVCache,
                 meta: AttentionMetadata) -> tuple[jax.Array, jax.Array, KVCache]:
        """-> (residual stream, the normed MLP output to add to it, kv)."""
        x, normed = self.input_layernorm.add_and_norm(x, pending, self.norm_kernel)
        h, kv = self.self_attn(normed, positions, kv, meta)
        x, normed = self.post_attention_layernorm.add_and_norm(x, self.post_self_attn_layernorm(h), self.norm_kernel)
        return x, self.post_mlp_layernorm(self.mlp(normed)), kv


class Glm4TextModel(DecoderModel):
    layer_class = Glm4DecoderLayer


class Glm4vForConditionalGeneration(Qwen2VLForConditionalGeneration):
    model_class = Glm4TextModel
    checkpoint_prefixes: ClassVar[dict[str, tuple[str, ...]]] = {"model.": ("model.language_model.",)}
