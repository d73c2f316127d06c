"""Gemma 2: the Llama decoder plus sandwich norms, (1 + w) norms, GeGLU, scaled embeddings, and
attention/final logit soft-capping. Alternating sliding windows come from ModelConfig.sliding_windows."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from sgjax.kernels import AttentionMetadata, Kernels
from sgjax.models.config import ModelConfig
from sgjax.models.layers import Attention, GatedMLP, KVCache, RMSNorm
from sgjax.models.llama import DecoderModel, LlamaForCausalLM


class Gemma2DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels, rngs: nnx.Rngs):
        # kernels.add_rms_norm is not used: the sandwich norms leave no residual add to fuse
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype, offset=True)  # noqa: E731
        self.input_layernorm = norm()
        self.self_attn = Attention(cfg, layer_idx, kernels, rngs)
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.mlp = GatedMLP(cfg, rngs, cpu=kernels.cpu_matmuls)
        self.post_feedforward_layernorm = norm()

    def __call__(self, x, pending, positions, kv: KVCache, meta: AttentionMetadata):
        """DecoderLayer's interface; Gemma's sandwich norms leave no add to hand on (pending stays None)."""
        h, kv = self.self_attn(self.input_layernorm(x), positions, kv, meta)
        x = x + self.post_attention_layernorm(h)
        h = self.mlp(self.pre_feedforward_layernorm(x))
        return x + self.post_feedforward_layernorm(h), None, kv


class Gemma2Model(DecoderModel):
    layer_class = Gemma2DecoderLayer
    norm_offset = True

    def embed(self, input_ids):
        x = self.embed_tokens(input_ids)
        # HF rounds the normalizer to the activation dtype before multiplying; so do we.
        return x * jnp.asarray(x.shape[-1] ** 0.5, dtype=x.dtype)


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_class = Gemma2Model
