"""The GPU attention backend: which kernel serves which tokens of a step.

Decode steps, and GPUs other than Hopper, use the Triton kernel alone (`ragged_paged_attention.py`).
On Hopper, a step with prefill chunks gives the sequences with at least a query block of new tokens to
the Mosaic GPU kernel (`paged_prefill_mgpu.py`, ~2x the Triton kernel's rate on a 4k prefill) and the
rest (decodes, short chunks) to the Triton kernel; each leaves the other's tokens at zero.
"""

from __future__ import annotations

import functools

import jax

from sgjax.kernels.gpu import paged_prefill_mgpu
from sgjax.kernels.gpu.ragged_paged_attention import ragged_paged_attention
from sgjax.kernels.metadata import AttentionMetadata


@functools.cache
def is_hopper() -> bool:
    device = jax.devices()[0]
    return device.platform == "gpu" and str(getattr(device, "compute_capability", "")).startswith("9.")


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, meta: AttentionMetadata, *, scale: float,
                    sliding_window: int | None = None, softcap: float | None = None, prefill_kernel: bool | None = None,
                    interpret: bool = False) -> jax.Array:
    """Causal attention of q [T, H, D] over each token's paged K/V -> [T, H, D]. `prefill_kernel`:
    whether the Mosaic GPU kernel serves the long chunks (default: on Hopper, when not interpreting)."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, _, page_size, _ = k_pages.shape
    group = num_heads // num_kv_heads
    kwargs = dict(scale=scale, sliding_window=sliding_window, softcap=softcap, interpret=interpret)
    if prefill_kernel is None:
        prefill_kernel = not interpret and is_hopper()
    prefill_step = num_tokens > meta.kv_lens.shape[0]  # decode steps have no more tokens than sequences
    if not (prefill_kernel and prefill_step and paged_prefill_mgpu.supports(q.dtype, head_dim, page_size, group,
                                                                             sliding_window, softcap)):
        return ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)
    long = paged_prefill_mgpu.long_sequences(meta, group)
    short_out = ragged_paged_attention(q, k_pages, v_pages, meta, include=~long, **kwargs)
    long_out = paged_prefill_mgpu.paged_prefill_attention(q, k_pages, v_pages, meta, scale=scale, only_long=True,
                                                          interpret=interpret)
    return short_out + long_out  # each is zero on the other's tokens
