"""Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2/2.5, Qwen3), variants chosen by ModelConfig.

The forward pass takes a flat batch of tokens (prefill chunks and decodes mixed), reads and writes
K/V through the paged pool, and returns hidden states; logits are computed only where asked for.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sgjax.kernels import REFERENCE, AttentionMetadata, Kernels
from sgjax.models.config import ModelConfig
from sgjax.models.layers import (
    COLUMN,
    Attention,
    Embedding,
    GatedMLP,
    KVCache,
    Linear,
    RMSNorm,
)


class DecoderLayer(nnx.Module):
    """Layers take and return the residual stream with an addend still to add (`pending`, None at the
    first layer): the MLP's output is added by the next layer's input norm, or the final norm, so each
    residual add and the norm after it run as one pass where a kernel can (RMSNorm.add_and_norm)."""

    def __init__(self, cfg: ModelConfig, layer_idx: int, kernels: Kernels, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.self_attn = Attention(cfg, layer_idx, kernels, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype)
        self.mlp = GatedMLP(cfg, rngs, cpu=kernels.cpu_matmuls)
        self.norm_kernel = kernels.add_rms_norm

    def __call__(self, x, pending, positions, kv: KVCache, meta: AttentionMetadata):
        """-> (residual stream, the MLP output to add to it, kv)."""
        x, normed = self.input_layernorm.add_and_norm(x, pending, self.norm_kernel)
        h, kv = self.self_attn(normed, positions, kv, meta)
        x, normed = self.post_attention_layernorm.add_and_norm(x, h, self.norm_kernel)
        return x, self.mlp(normed), kv


class DecoderModel(nnx.Module):
    layer_class = DecoderLayer
    norm_offset = False  # Gemma's norms scale by (1 + w)

    def __init__(self, cfg: ModelConfig, kernels: Kernels, rngs: nnx.Rngs):
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.jnp_dtype, rngs)
        self.layers = nnx.List([self.layer_class(cfg, i, kernels, rngs) for i in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.jnp_dtype, offset=self.norm_offset)
        self.norm_kernel = kernels.add_rms_norm

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens(input_ids)

    def __call__(self, input_ids, positions, kv_caches: list[KVCache], meta: AttentionMetadata, embeds=None):
        """`embeds`: the input rows, where the caller has made them (images spliced in); else the tokens'."""
        x, pending = self.embed(input_ids) if embeds is None else embeds, None
        new_caches = []
        for layer, kv in zip(self.layers, kv_caches):
            x, pending, kv = layer(x, pending, positions, kv, meta)
            new_caches.append(kv)
        return self.norm.add_and_norm(x, pending, self.norm_kernel)[1], new_caches


class LlamaForCausalLM(nnx.Module):
    """Token ids + positions + paged KV -> hidden states; `compute_logits` for chosen rows."""

    model_class = DecoderModel

    def __init__(self, cfg: ModelConfig, *, kernels: Kernels = REFERENCE, rngs: nnx.Rngs):
        """`kernels` (sgjax.kernels.select): the attention and fused norm the layers call."""
        self.config = cfg
        self.model = self.model_class(cfg, kernels, rngs)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False, axes=COLUMN,
                                  dtype=cfg.jnp_dtype, rngs=rngs)

    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVCache],
                 meta: AttentionMetadata) -> tuple[jax.Array, list[KVCache]]:
        """Returns (hidden [T, hidden_size], updated kv_caches)."""
        return self.model(input_ids, positions, kv_caches, meta)

    @property
    def head_weight_name(self) -> str:
        """Checkpoint name of the [vocab, hidden] matrix `compute_logits` multiplies by."""
        return "model.embed_tokens.weight" if self.lm_head is None else "lm_head.weight"

    def compute_logits(self, hidden: jax.Array) -> jax.Array:
        """Float32 logits [..., vocab] of the given hidden states."""
        head = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return logits_from_head(hidden, head[...], self.config.final_logit_softcap)


def logits_from_head(hidden: jax.Array, head: jax.Array, softcap: float | None) -> jax.Array:
    """Float32 logits of hidden states [..., H] against the head matrix [vocab, H], soft-capped if asked.
    A function of the one matrix, so that sampling programs take only it, not the whole model."""
    logits = jnp.einsum("...h,vh->...v", hidden, head, preferred_element_type=jnp.float32)
    return softcap * jnp.tanh(logits / softcap) if softcap else logits
