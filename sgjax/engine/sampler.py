"""On-device sampling for a batch of rows, each with its own parameters and seed.

Runs inside the compiled step, so the only thing that crosses to the host is one token id and one
logprob per row. A row's random key is fold_in(seed, output position): the same seed gives the same
tokens whatever else shares the batch.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; <= 0 = whole vocabulary
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32
    position: jax.Array  # [B] int32: index of the token being sampled among the request's outputs

    @classmethod
    def build(cls, params: list, seeds: list[int], positions: list[int], size: int) -> "SamplingBatch":
        """Host-side arrays padded to `size` rows (padding rows are greedy)."""
        def col(values, dtype, fill):
            out = np.full(size, fill, dtype)
            out[: len(values)] = values
            return out

        return cls(
            temperature=col([p.temperature for p in params], np.float32, 0.0),
            top_k=col([p.top_k for p in params], np.int32, -1),
            top_p=col([p.top_p for p in params], np.float32, 1.0),
            min_p=col([p.min_p for p in params], np.float32, 0.0),
            seed=col([s & 0xFFFFFFFF for s in seeds], np.uint32, 0),
            position=col(positions, np.int32, 0),
        )


def sample(logits: jax.Array, s: SamplingBatch) -> tuple[jax.Array, jax.Array]:
    """logits [B, V] float32 -> (token ids [B], their logprobs under the unmodified distribution [B])."""
    vocab = logits.shape[-1]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1)

    scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    order = jnp.argsort(-scaled, axis=-1)
    sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    drop = (s.top_k[:, None] > 0) & (rank >= s.top_k[:, None])
    drop |= (jnp.cumsum(probs, axis=-1) - probs) >= s.top_p[:, None]  # keep the smallest set reaching top_p
    drop |= probs < s.min_p[:, None] * probs[:, :1]
    sorted_logits = jnp.where(drop, -jnp.inf, sorted_logits)

    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, s.position)
    choice = jax.vmap(jax.random.categorical)(keys, sorted_logits)
    sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0]
    tokens = jnp.where((s.temperature == 0) | (s.top_k == 1), greedy, sampled).astype(jnp.int32)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
