"""Attention inputs shared by the kernel tests: random paged batches and the grid of shapes every
kernel is checked on against kernels/reference.py."""

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.kernels import reference


def random_case(seed, *, num_heads, num_kv_heads, head_dim, page_size, q_lens, cached, dtype, extra_tokens=5,
                extra_seqs=2):
    """A mixed batch: each sequence has `cached` tokens in the pool and `q_len` new ones; padded with
    `extra_tokens` tokens and `extra_seqs` empty sequences."""
    rng = np.random.default_rng(seed)
    pages_each = [-(-(c + n) // page_size) for c, n in zip(cached, q_lens)]
    num_pages = 1 + sum(pages_each) + 3
    order = rng.permutation(np.arange(1, num_pages))  # scattered pages, as after some serving
    chunks, at = [], 0
    for c, n, p in zip(cached, q_lens, pages_each):
        chunks.append(SeqChunk(rng.integers(0, 100, n).tolist(), c, order[at:at + p].tolist()))
        at += p
    total = sum(q_lens)
    batch = make_batch(chunks, page_size, num_tokens=total + extra_tokens, num_seqs=len(chunks) + extra_seqs)
    meta = jax.tree.map(jnp.asarray, batch.meta)
    shape = (num_kv_heads, num_pages, page_size, head_dim)
    k_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    v_pages = jnp.asarray(rng.standard_normal(shape), dtype)
    q = jnp.asarray(rng.standard_normal((total + extra_tokens, num_heads, head_dim)), dtype)
    return q, k_pages, v_pages, meta, total


# The interpreters' time follows the kernels' grid (KV heads x query blocks), so each case has the fewest
# heads that keep its point; the decodes and the long chunk keep two KV heads.
GRID = [
    # (heads, kv heads, head_dim, page_size, q_lens, cached, window, softcap)
    (8, 2, 64, 16, [1, 1, 1, 1], [5, 40, 17, 100], None, None),  # decodes
    (2, 2, 128, 16, [37, 1, 20, 1], [0, 33, 16, 7], None, None),  # mixed prefill + decode, no GQA
    (4, 1, 256, 32, [9, 50], [64, 3], 8, 30.0),  # Gemma-2-like: window and soft-cap
    (4, 1, 128, 128, [3, 130, 1], [200, 0, 257], 64, None),  # large pages, window
    (4, 2, 64, 64, [70], [0], None, 5.0),  # one long prefill chunk
    (7, 1, 64, 16, [1, 12, 1], [30, 4, 0], None, None),  # 7 heads per KV head (Qwen2.5-7B): padded to 8
]


def grid_case_and_reference(case, dtype, **extra):
    """A GRID case's inputs, the attention options it names, and the reference's output (float32).
    `extra`: random_case's padding (extra_tokens, extra_seqs), where not its defaults."""
    heads, kv_heads, head_dim, page_size, q_lens, cached, window, softcap = case
    inputs = random_case(len(q_lens) + head_dim, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                         page_size=page_size, q_lens=q_lens, cached=cached, dtype=dtype, **extra)
    q, k_pages, v_pages, meta, total = inputs
    kwargs = dict(scale=head_dim**-0.5, sliding_window=window, softcap=softcap)
    want = reference.ragged_paged_attention(q, k_pages, v_pages, meta, **kwargs)[:total].astype(jnp.float32)
    return inputs, kwargs, want


def relative_error(got, want) -> float:
    got = got.astype(jnp.float32)
    assert np.isfinite(np.asarray(got)).all()
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
