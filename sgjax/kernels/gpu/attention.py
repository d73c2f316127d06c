"""The GPU attention backend: which kernel serves which tokens of a step.

Decode steps, and GPUs other than Hopper, use the Triton kernel alone (`ragged_paged_attention.py`).
On Hopper, a step with prefill chunks gives the sequences with at least a query block of new tokens to
the Mosaic GPU kernel (`paged_prefill_mgpu.py`, ~2x the Triton kernel's rate on a 4k prefill) and the
rest (decodes, short chunks) to the Triton kernel; both write output rows in the same layout, and each
token's output is taken from the kernel that served it.
SGJAX_MGPU_PREFILL=0 in the environment keeps the Triton kernel for everything (for comparisons).
Steps planned with shared prefixes (`meta.shared`, only on steps of up to one token per sequence row)
read each group's prefix once (`shared_prefix.py`, cascade attention).
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from sgjax.kernels.gpu import paged_prefill_mgpu
from sgjax.kernels.gpu.ragged_paged_attention import (
    query_rows,
    ragged_paged_attention,
    ragged_paged_attention_rows,
    token_major,
)
from sgjax.kernels.gpu.shared_prefix import shared_prefix_attention
from sgjax.kernels.metadata import AttentionMetadata, token_positions


@functools.cache
def mgpu_prefill_available() -> bool:
    """A Hopper GPU (the kernel's wgmma), and not turned off by SGJAX_MGPU_PREFILL=0."""
    device = jax.devices()[0]
    hopper = device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")
    return hopper and os.environ.get("SGJAX_MGPU_PREFILL", "1") != "0"


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None, prefill_kernel: bool | None = None,
                    interpret: bool = False) -> jax.Array:
    """Causal attention of q [T, H, D] over each token's paged K/V -> [T, H, D]. `prefill_kernel`:
    whether the Mosaic GPU kernel serves the long chunks (default: `mgpu_prefill_available()`, when not
    interpreting)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    kwargs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, interpret=interpret)
    if prefill_kernel is None:
        prefill_kernel = not interpret and mgpu_prefill_available()
    # Only a sequence with a query block of new tokens goes to the Mosaic kernel: a step can have one if
    # its bucket holds more tokens than sequences (decode steps do not: max_running_requests is always
    # a bucket, executor/buckets.py) and at least a block's worth (a short prompt chunk in an
    # engine with fewer rows than its smallest bucket cannot be long; the conditional below would only
    # cost it idle time).
    prefill_step = meta.kv_lens.shape[0] < num_tokens and num_tokens >= paged_prefill_mgpu.tokens_per_block(group)
    if meta.shared is not None and sliding_window is None:
        return shared_prefix_attention(q, k_pages, v_pages, meta, scale=scale, softcap=softcap, interpret=interpret)
    if not (prefill_kernel and prefill_step and paged_prefill_mgpu.supports(q.dtype, k_pages.dtype, head_dim,
                                                                             page_size, group, sliding_window,
                                                                             softcap)):
        return ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)
    long = paged_prefill_mgpu.long_sequences(meta, group)
    # Both kernels write output rows by KV head; each only its own tokens' rows. The Triton kernel (and
    # its layout passes, ~0.14 ms on a lone 4k prefill) runs only when some short sequence has tokens.
    padded_group = pl.next_power_of_2(group)
    long_rows = paged_prefill_mgpu.paged_prefill_rows(q, k_pages, v_pages, meta, scale=scale, only_long=True,
                                                      interpret=interpret)
    long_out = token_major(long_rows, num_tokens, padded_group)
    is_long = long[token_positions(meta, num_tokens)[0]][:, None, None, None]

    def with_short():
        short_rows = ragged_paged_attention_rows(query_rows(q, num_kv_heads), k_pages, v_pages, meta,
                                                 num_tokens=num_tokens, num_heads=num_heads, include=~long, **kwargs)
        return jnp.where(is_long, long_out, token_major(short_rows, num_tokens, padded_group))

    q_lens = meta.query_start_loc[1:] - meta.query_start_loc[:-1]
    out = lax.cond(jnp.any(~long & (q_lens > 0)), with_short, lambda: jnp.where(is_long, long_out, 0))
    return out[:, :, :group].reshape(num_tokens, num_heads, head_dim)
