"""Token masks as packed bits: 32 tokens per int32 word, filled on the host, applied on the device.

A row of all ones (-1 words) allows every token, so unconstrained rows of a batch cost nothing extra.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from llguidance.numpy import fill_next_token_bitmask_par


def num_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


def allow_all(rows: int, vocab_size: int) -> np.ndarray:
    return np.full((rows, num_words(vocab_size)), -1, np.int32)


def force_token(bitmask: np.ndarray, row: int, token: int) -> None:
    """Allow only `token` in this row."""
    bitmask[row] = 0
    bitmask[row, token // 32] = np.int32(np.uint32(1 << (token % 32)).view(np.int32))


def fill_rows(executor, matchers: list[tuple[object, int]], bitmask: np.ndarray) -> None:
    """Each (matcher, row): the tokens its grammar allows next, computed in parallel threads."""
    if matchers:
        fill_next_token_bitmask_par(executor, matchers, bitmask)


def allowed_tokens(bitmask: jax.Array, vocab_size: int) -> jax.Array:
    """[B, words] int32 -> [B, vocab_size] bool."""
    ids = jnp.arange(vocab_size)
    words = bitmask[:, ids // 32]
    return ((words >> (ids % 32)) & 1).astype(jnp.bool_)


def apply_bitmask(logits: jax.Array, bitmask: jax.Array) -> jax.Array:
    return jnp.where(allowed_tokens(bitmask, logits.shape[-1]), logits, -jnp.inf)
