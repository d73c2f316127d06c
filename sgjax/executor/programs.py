"""The functions the model runner compiles: a step's forward pass and its sampling (see model_runner.py for
why their inputs and outputs are laid out as they are)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sgjax.executor.host_inputs import unpack
from sgjax.executor.sampler import TOP_LOGPROBS, SamplerFeatures, sample, update_penalty_state
from sgjax.kernels.metadata import token_positions
from sgjax.models.llama import logits_from_head


def merge_model(model_def, weights):
    graphdef, state_def = model_def
    return nnx.merge(graphdef, jax.tree.unflatten(state_def, weights))


def forward(model_def, with_prompt, layout, rows_sharding, weights, kv_caches, penalties, hidden_rows, resident, ints,
             floats, prev_tokens, image_pool=None):
    # Into the donated resident buffers first, and read from there (see the module docstring).
    # The barrier keeps XLA from reading slices of the copy from the fresh buffers instead (it did on a GPU).
    resident = jax.lax.optimization_barrier(
        tuple(jax.lax.dynamic_update_slice(buffer, step, (0,)) for buffer, step in zip(resident, (ints, floats))))
    # A vision-language model's inputs end with each token's row in `image_pool` (executor/image_embeddings.py).
    sampling, input_ids, positions, meta, rows, targets, *image_rows = unpack(*resident, layout)
    from_previous = jnp.clip(-input_ids - 1, 0, prev_tokens.shape[0] - 1)
    input_ids = jnp.where(input_ids < 0, prev_tokens[from_previous], input_ids)
    model = merge_model(model_def, weights)
    images = {} if image_pool is None else {"image_embeds": (image_pool, image_rows[0])}
    hidden, kv_caches = model(input_ids, positions, kv_caches, meta, **images)
    token_rows, token_pos = token_positions(meta, input_ids.shape[0])
    valid = jnp.arange(input_ids.shape[0]) < meta.query_start_loc[-1]
    penalties = update_penalty_state(penalties, sampling, input_ids, token_rows, token_pos, valid)
    # Into the donated buffer (same shape, dtype and sharding): an output XLA cannot fill with temporaries.
    out = (jax.lax.with_sharding_constraint(hidden[rows].astype(hidden_rows.dtype), rows_sharding),)
    if with_prompt:
        logprobs = jax.nn.log_softmax(model.compute_logits(hidden), axis=-1)
        target_logprobs = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
        top = jax.lax.top_k(logprobs, min(TOP_LOGPROBS, logprobs.shape[-1]))
        ids_logprobs = jnp.take_along_axis(logprobs, sampling.token_ids[token_rows], axis=-1)  # token_ids_logprob
        prompt_out = (target_logprobs, top[0], top[1].astype(jnp.int32), ids_logprobs)
        # replicated: host 0 reads them, also where the mesh spans other hosts' devices
        out = (*out, *(jax.lax.with_sharding_constraint(x, rows_sharding) for x in prompt_out))
    return out, kv_caches, penalties, resident


def sample_step(softcap, head_kernel, filter_kernel, features, rows, sampling_layout, head, hidden, ints, floats,
            penalties, bitmask, bias_ids, bias_values):
    """Sampling of the first `rows` rows (the step's sequences, rounded up); the other rows' outputs are
    zeros, so every variant returns max_seqs rows, as the next forward pass reads its tokens. The sampling
    parameters lie at the front of the step's packed buffers (ModelRunner._abstract_inputs). All-greedy
    rows with a `head_kernel` (Kernels.greedy_head) take the fused LM head + argmax where it has a tiling.

    Returns the tokens (for the next forward pass) and, for the host, one int32 array [max_seqs, W]: per
    row its token, its logprob's bits, and with top logprobs the TOP_LOGPROBS best logprobs' bits, their
    token ids and the bits of the row's token_ids_logprob logprobs (W = 2 + 2 * TOP_LOGPROBS +
    MAX_TOKEN_IDS_LOGPROB; else 2)."""
    sampling = unpack(ints, floats, sampling_layout)
    full = hidden.shape[0]
    bias = None if bitmask is None else (bias_ids, bias_values)
    if rows < full:
        hidden, sampling = hidden[:rows], jax.tree.map(lambda x: x[:rows], sampling)
        bitmask = None if bitmask is None else bitmask[:rows]
        bias = None if bias is None else (bias_ids[:rows], bias_values[:rows])
    fused = head_kernel(hidden, head, softcap) if head_kernel is not None and features == SamplerFeatures() else None
    if fused is not None:
        tokens, logprobs = fused
    else:
        tokens, logprobs, top_logprobs, top_ids, ids_logprobs = sample(
            logits_from_head(hidden, head, softcap), sampling, penalties, bitmask, features, bias, filter_kernel)
    columns = [tokens[:, None], jax.lax.bitcast_convert_type(logprobs, jnp.int32)[:, None]]
    if features.top_logprobs:
        columns += [jax.lax.bitcast_convert_type(top_logprobs, jnp.int32), top_ids,
                    jax.lax.bitcast_convert_type(ids_logprobs, jnp.int32)]
    padding = [(0, full - rows), (0, 0)]
    return jnp.pad(tokens, padding[:1]), jnp.pad(jnp.concatenate(columns, axis=1), padding)
