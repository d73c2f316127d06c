"""On-device sampling for a batch of rows, each with its own parameters and seed.

Runs inside the compiled step, so what crosses to the host per row is one token id, its logprob and
the top TOP_LOGPROBS alternatives. A row's random key is fold_in(seed, output position): the same
seed gives the same tokens whatever else shares the batch.

Penalties read PenaltyState: per request slot, how often each token occurred in the output (frequency
and presence penalties, OpenAI's definition) and whether it occurred anywhere in prompt or output
(repetition penalty, HF's definition). The step updates it from its own input tokens, so a request
that runs all its tokens through the model (penalised requests skip the prefix cache) has exact counts.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sgjax.constrained.bitmask import apply_bitmask

TOP_LOGPROBS = 20  # most alternatives a request may ask for per token
MAX_LOGIT_BIAS = 300  # most logit_bias entries a request may give (the step's bias arrays are this wide)
MAX_TOKEN_IDS_LOGPROB = 20  # most token_ids_logprob ids a request may give (a row's id buffer is this wide)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingBatch:
    temperature: jax.Array  # [B] float32; 0 = greedy
    top_k: jax.Array  # [B] int32; <= 0 = whole vocabulary
    top_p: jax.Array  # [B] float32
    min_p: jax.Array  # [B] float32
    frequency_penalty: jax.Array  # [B] float32
    presence_penalty: jax.Array  # [B] float32
    repetition_penalty: jax.Array  # [B] float32; 1 = off
    seed: jax.Array  # [B] uint32
    position: jax.Array  # [B] int32: index of the token being sampled among the request's outputs
    slot: jax.Array  # [B] int32: the request's row in PenaltyState (padding rows: the spare last slot)
    prompt_len: jax.Array  # [B] int32: inputs at positions >= this are output tokens
    # [B, MAX_TOKEN_IDS_LOGPROB] int32: the row's token_ids_logprob (unused entries 0), whose logprobs come
    # with the top logprobs: a fixed width, so requests asking for other ids share the compiled programs
    token_ids: jax.Array

    @classmethod
    def build(cls, params: list, seeds: list[int], positions: list[int], slots: list[int],
              prompt_lens: list[int], size: int, spare_slot: int) -> "SamplingBatch":
        """Host-side arrays padded to `size` rows (padding rows are greedy and unpenalised)."""
        def col(values, dtype, fill):
            out = np.full(size, fill, dtype)
            out[: len(values)] = values
            return out

        token_ids = np.zeros((size, MAX_TOKEN_IDS_LOGPROB), np.int32)
        for row, p in enumerate(params):
            if p.token_ids_logprob:
                token_ids[row, : len(p.token_ids_logprob)] = p.token_ids_logprob
        return cls(
            temperature=col([p.temperature for p in params], np.float32, 0.0),
            top_k=col([p.top_k for p in params], np.int32, -1),
            top_p=col([p.top_p for p in params], np.float32, 1.0),
            min_p=col([p.min_p for p in params], np.float32, 0.0),
            frequency_penalty=col([p.frequency_penalty for p in params], np.float32, 0.0),
            presence_penalty=col([p.presence_penalty for p in params], np.float32, 0.0),
            repetition_penalty=col([p.repetition_penalty for p in params], np.float32, 1.0),
            seed=col([s & 0xFFFFFFFF for s in seeds], np.uint32, 0),
            position=col(positions, np.int32, 0),
            slot=col(slots, np.int32, spare_slot),
            prompt_len=col(prompt_lens, np.int32, 0),
            token_ids=token_ids,
        )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PenaltyState:
    output_counts: jax.Array  # [slots + 1, V] int32
    seen: jax.Array  # [slots + 1, V] bool: in prompt or output

    @classmethod
    def zeros(cls, num_slots: int, vocab: int, sharding=None) -> "PenaltyState":
        make = jax.jit(lambda: cls(jnp.zeros((num_slots + 1, vocab), jnp.int32),
                                   jnp.zeros((num_slots + 1, vocab), jnp.bool_)), out_shardings=sharding)
        return make()


def update_penalty_state(state: PenaltyState, s: SamplingBatch, input_ids, token_rows, token_pos,
                         valid) -> PenaltyState:
    """Count this step's input tokens in their requests' slots. Every request's tokens are counted; only
    a penalised request's slot is read, and it was cleared when that request started (clear_penalty_rows)."""
    slots = s.slot[token_rows]
    is_output = valid & (token_pos >= s.prompt_len[token_rows])
    counts = state.output_counts.at[slots, input_ids].add(is_output.astype(jnp.int32))
    seen = state.seen.at[slots, input_ids].max(valid)
    return PenaltyState(counts, seen)


def clear_penalty_rows(state: PenaltyState, slots: jax.Array) -> PenaltyState:
    """Zero the rows of `slots` [N] (penalised requests starting over in them; padding: the spare slot).

    Clearing only the rows of the requests that need it, apart from the steps: clearing admitted rows
    inside every step read and wrote the whole state ([1025, 128256] int32 + bool: 1.3 GB of traffic,
    ~0.5 ms a step at 1024 running requests, whether or not any request was penalised)."""
    return PenaltyState(state.output_counts.at[slots].set(0), state.seen.at[slots].set(False))


def apply_penalties(logits: jax.Array, state: PenaltyState, s: SamplingBatch) -> jax.Array:
    counts = state.output_counts[s.slot]
    seen = state.seen[s.slot]
    rep = s.repetition_penalty[:, None]
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    return logits - s.frequency_penalty[:, None] * counts - s.presence_penalty[:, None] * (counts > 0)


@dataclasses.dataclass(frozen=True)
class SamplerFeatures:
    """What a step's sampling must compute, decided on the host from its rows' parameters.

    Each combination is its own compiled program, so a step pays only for what its rows ask for: the
    top-k/top-p/min-p cut (a full-vocabulary sort, or kernels/gpu/filter_cut.py), the penalty gathers,
    the top-20 logprobs (a top-k of 20 is another sort on the GPU), the grammar masks, and the random
    noise of sampled rows (a full-vocabulary Gumbel draw per row, which an all-greedy batch skips).
    XLA's conditionals would decide on the device but read their predicate on the host, a wait per step
    (measured: 1.5x slower steps).
    """
    filtered: bool = False  # some row uses top_k > 1, top_p < 1 or min_p > 0, or a penalty
    top_logprobs: bool = False  # some row wants its top alternatives or its token_ids_logprob ids' logprobs
    masked: bool = False  # some row is limited by a grammar bitmask or has a logit_bias (both come together)
    sampled: bool = False  # some row samples (temperature > 0, top_k != 1); else every row is greedy

    @classmethod
    def of(cls, params: list, masked: bool = False) -> "SamplerFeatures":
        return cls(filtered=any(p.temperature > 0 and (p.top_k > 1 or p.top_p < 1 or p.min_p > 0) or p.uses_penalties
                                for p in params),
                   top_logprobs=any(p.top_logprobs_num > 0 or p.token_ids_logprob for p in params), masked=masked,
                   sampled=any(p.temperature > 0 and p.top_k != 1 for p in params))

    @classmethod
    def all(cls) -> list["SamplerFeatures"]:
        return [cls(*flags) for flags in itertools.product((False, True), repeat=4)]


def logit_bias_arrays(biases: list[dict[int, float] | None], rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-row logit biases as `sample` takes them: token ids and values [rows, MAX_LOGIT_BIAS], row i
    from biases[i] (None: no bias); unused entries add 0 to token 0."""
    ids = np.zeros((rows, MAX_LOGIT_BIAS), np.int32)
    values = np.zeros((rows, MAX_LOGIT_BIAS), np.float32)
    for row, bias in enumerate(biases):
        if bias:
            ids[row, : len(bias)] = list(bias)
            values[row, : len(bias)] = list(bias.values())
    return ids, values


def sample(logits: jax.Array, s: SamplingBatch, penalties: PenaltyState, bitmask: jax.Array | None = None,
           features: SamplerFeatures = SamplerFeatures(filtered=True, top_logprobs=True, sampled=True),
           bias: tuple[jax.Array, jax.Array] | None = None, filter_kernel: Callable | None = None):
    """logits [B, V] float32 -> token ids [B], their logprobs [B], top logprobs and ids [B, TOP_LOGPROBS],
    and the logprobs of each row's `s.token_ids` [B, MAX_TOKEN_IDS_LOGPROB].

    Logprobs are of the model's distribution (before logit biases, grammar masks, penalties,
    temperature and filters). `bias` (token ids [B, K] int32, values [B, K] float32; unused entries
    have value 0) is added to each row's logits first. `bitmask` ([B, V/32] int32 packed bits, see
    constrained/bitmask.py) limits each row to the tokens its grammar allows. Without
    `features.top_logprobs` the top alternatives and the token ids' logprobs are zeros; without
    `features.sampled` every row takes its best token (the caller decides, SamplerFeatures.of).

    A sampled row takes argmax(logits / T + Gumbel noise) over the tokens its filters keep, the noise
    drawn in vocabulary order from (seed, position): so a row's token does not depend on which
    program variant its batch needed. Filters keep every token scoring at least the last one the
    sorted top-k / top-p / min-p cut keeps (ties at the cut are all kept).
    """
    batch, vocab = logits.shape
    # Logprobs as logit - logsumexp, gathered where needed: the [B, V] log-softmax is never written out.
    log_total = jax.nn.logsumexp(logits, axis=-1)
    if features.top_logprobs:
        top_logits, top_ids = jax.lax.top_k(logits, min(TOP_LOGPROBS, vocab))
        top_logprobs = top_logits - log_total[:, None]
        ids_logprobs = jnp.take_along_axis(logits, s.token_ids, axis=-1) - log_total[:, None]
    else:
        top_logprobs = jnp.zeros((batch, min(TOP_LOGPROBS, vocab)), jnp.float32)
        top_ids = jnp.zeros((batch, min(TOP_LOGPROBS, vocab)), jnp.int32)
        ids_logprobs = jnp.zeros(s.token_ids.shape, jnp.float32)
    model_logits = logits
    if bias is not None:
        bias_ids, bias_values = bias
        logits = logits.at[jnp.arange(batch)[:, None], bias_ids].add(bias_values)
    if bitmask is not None:
        logits = apply_bitmask(logits, bitmask)
    if features.filtered:
        logits = apply_penalties(logits, penalties, s)
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if features.sampled:
        drawn = _draw(logits, s, features.filtered, filter_kernel)
        tokens = jnp.where((s.temperature == 0) | (s.top_k == 1), tokens, drawn)
    chosen = jnp.take_along_axis(model_logits, tokens[:, None], axis=-1)[:, 0] - log_total
    return tokens, chosen, top_logprobs, top_ids.astype(jnp.int32), ids_logprobs


def _draw(logits: jax.Array, s: SamplingBatch, filtered: bool, filter_kernel: Callable | None) -> jax.Array:
    """Each row's draw from softmax(logits / T), restricted by its filters when `filtered`."""
    vocab = logits.shape[-1]
    scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
    if filtered:
        scaled = jnp.where(kept_by_filters(scaled, s.top_k, s.top_p, s.min_p, filter_kernel), scaled, -jnp.inf)
    keys = jax.vmap(lambda seed, pos: jax.random.fold_in(jax.random.key(seed), pos))(s.seed, s.position)
    noise = jax.vmap(lambda key: jax.random.gumbel(key, (vocab,), jnp.float32))(keys)
    return jnp.argmax(scaled + noise, axis=-1).astype(jnp.int32)


def kept_by_filters(scaled: jax.Array, top_k: jax.Array, top_p: jax.Array, min_p: jax.Array,
                    kernel: Callable | None = None) -> jax.Array:
    """Which tokens each row's filters keep ([B, V] bool), from its scaled logits [B, V].

    A token is kept when fewer than top_k tokens score higher (top_k <= 0: no limit), the tokens scoring
    higher hold less than top_p of the probability (top_p 1: no limit), and its probability is at least
    min_p times the best's: what cutting the sorted row keeps, ties at the cut all kept, the best token
    always. With a `kernel` (Kernels.top_k_top_p_keep) the top-k / top-p cut comes without the
    full-vocabulary sort (4.3 ms at 384 rows on an H100)."""
    vocab = scaled.shape[-1]
    if kernel is not None:
        probs = jax.nn.softmax(scaled, axis=-1)
        above_min_p = probs >= min_p[:, None] * probs.max(axis=-1, keepdims=True)
        return kernel(scaled, top_k, top_p) & above_min_p
    sorted_logits = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    rank = jnp.arange(vocab)[None, :]
    drop = (top_k[:, None] > 0) & (rank >= top_k[:, None])
    # the smallest set reaching top_p (top_p 1 keeps all, whatever the sum's rounding)
    drop |= (top_p[:, None] < 1) & ((jnp.cumsum(probs, axis=-1) - probs) >= top_p[:, None])
    drop |= probs < min_p[:, None] * probs[:, :1]
    threshold = jnp.min(jnp.where(drop, jnp.inf, sorted_logits), axis=-1)  # the best token is never dropped
    return scaled >= threshold[:, None]
