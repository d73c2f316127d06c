"""Minimal greedy generation over the paged KV pool: one prefill step for all prompts, then one
decode step per token. It checks the model and the KV pool end to end without the engine (continuous
batching, radix cache, sampling), and backs `python -m sgjax.generate`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sgjax.executor.batch import SeqChunk, make_batch
from sgjax.cache.kv_pool import KVPool, KVPoolConfig
from sgjax.cache.page_allocator import pages_for
from sgjax.models.loader import LoadedModel


def make_step(graphdef):
    """A jitted step: forward the flat batch and return float32 logits of the chosen rows."""

    @functools.partial(jax.jit, donate_argnums=(1,))
    def step(state, kv_caches, input_ids, positions, meta, rows):
        model = nnx.merge(graphdef, state)
        hidden, kv_caches = model(input_ids, positions, kv_caches, meta)
        return model.compute_logits(hidden[rows]), kv_caches

    return step


def forward_logits(loaded: LoadedModel, prompts: list[list[int]], page_size: int = 16) -> list[np.ndarray]:
    """Logits of every position of each prompt, all prompts in one flat batch ([len, vocab] each)."""
    pool, chunks = _pool_for(loaded, [len(p) for p in prompts], page_size)
    for c, p in zip(chunks, prompts):
        c.tokens = list(p)
    batch = make_batch(chunks, page_size)
    graphdef, state = nnx.split(loaded.model)
    rows = np.arange(len(batch.input_ids), dtype=np.int32)
    logits, pool.caches = make_step(graphdef)(state, pool.caches, batch.input_ids, batch.positions,
                                              batch.meta, rows)
    logits = np.asarray(logits)
    bounds = batch.meta.query_start_loc
    return [logits[bounds[i]:bounds[i + 1]] for i in range(len(prompts))]


def greedy_generate(loaded: LoadedModel, prompts: list[list[int]], max_new_tokens: int,
                    page_size: int = 16) -> list[list[int]]:
    """Greedy continuation of each prompt (no stop tokens): the first max_new_tokens argmax tokens."""
    pool, chunks = _pool_for(loaded, [len(p) + max_new_tokens for p in prompts], page_size)
    graphdef, state = nnx.split(loaded.model)
    step = make_step(graphdef)
    for c, p in zip(chunks, prompts):
        c.tokens = list(p)
    outputs: list[list[int]] = [[] for _ in prompts]
    for _ in range(max_new_tokens):
        batch = make_batch(chunks, page_size)
        logits, pool.caches = step(state, pool.caches, batch.input_ids, batch.positions, batch.meta,
                                   batch.last_token_index)
        next_ids = np.asarray(jnp.argmax(logits, axis=-1))
        for c, out, tok in zip(chunks, outputs, next_ids):
            out.append(int(tok))
            c.num_cached += len(c.tokens)
            c.tokens = [int(tok)]
    return outputs


def _pool_for(loaded: LoadedModel, lengths: list[int], page_size: int) -> tuple[KVPool, list[SeqChunk]]:
    """A pool with contiguous pages for each sequence (page 0 is the null page)."""
    pages_each = [pages_for(n, page_size) for n in lengths]
    pool = KVPool(KVPoolConfig.for_model(loaded.config, 1 + sum(pages_each), page_size), loaded.mesh)
    chunks, first = [], 1
    for n in pages_each:
        chunks.append(SeqChunk(tokens=[], num_cached=0, pages=list(range(first, first + n))))
        first += n
    return pool, chunks
