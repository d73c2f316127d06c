"""Qwen2-VL / Qwen2.5-VL's language model: the Qwen2 decoder (llama.py) with M-RoPE, whose image placeholder tokens
take the vision tower's merged rows instead of their token embedding.

The tower (models/vision/qwen2_vl.py) is not a submodule: it runs as its own program (executor/image_embeddings.py)
and writes its rows into a pool on the device; a step passes the pool and, per token, its row there (-1: a text
token). Positions are [3, T] (multimodal/mrope.py). The checkpoint's decoder tensors have the text models' names
(`model.layers.*`, `lm_head.*`: transformers saves them so), the tower's are `visual.*`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sgjax.kernels import AttentionMetadata
from sgjax.models.layers import KVCache
from sgjax.models.llama import LlamaForCausalLM


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    def __call__(self, input_ids: jax.Array, positions: jax.Array, kv_caches: list[KVCache], meta: AttentionMetadata,
                 image_embeds: tuple[jax.Array, jax.Array] | None = None) -> tuple[jax.Array, list[KVCache]]:
        """positions [3, T]; `image_embeds`: (pool [rows, hidden], each token's row in it or -1)."""
        x = self.model.embed(input_ids)
        if image_embeds is not None:
            pool, rows = image_embeds
            x = jnp.where((rows >= 0)[:, None], pool[jnp.maximum(rows, 0)].astype(x.dtype), x)
        return self.model(input_ids, positions, kv_caches, meta, embeds=x)
