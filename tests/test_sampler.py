"""The sampler's program variants against numpy: filters, top logprobs, and batch invariance."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sgjax import kernels
from sgjax.executor.sampler import PenaltyState, SamplerFeatures, SamplingBatch, logit_bias_arrays, sample
from sgjax.engine.sampling_params import SamplingParams

VOCAB, ROWS = 300, 4
FULL = SamplerFeatures(filtered=True, top_logprobs=True, sampled=True)


def batch_of(params: list[SamplingParams], seeds: list[int], positions: list[int]) -> SamplingBatch:
    n = len(params)
    host = SamplingBatch.build(params, seeds, positions, list(range(n)), [0] * n, ROWS, ROWS)
    return jax.tree.map(jnp.asarray, host)


def run(logits, params, seeds, positions, features, penalties=None):
    penalties = penalties or PenaltyState.zeros(ROWS, VOCAB)
    return [np.asarray(x) for x in sample(jnp.asarray(logits), batch_of(params, seeds, positions), penalties,
                                          None, features)]


@pytest.fixture(scope="module")
def logits():
    return np.random.default_rng(0).normal(0, 3, (ROWS, VOCAB)).astype(np.float32)


def test_features_follow_the_parameters():
    plain = SamplingParams(temperature=0.8)
    assert SamplerFeatures.of([plain, SamplingParams(temperature=0)]) == SamplerFeatures(sampled=True)
    assert SamplerFeatures.of([SamplingParams(temperature=0), SamplingParams(top_k=1)]) == SamplerFeatures()
    assert SamplerFeatures.of([plain, SamplingParams(top_p=0.9)]).filtered
    assert SamplerFeatures.of([SamplingParams(temperature=0, repetition_penalty=1.2)]).filtered
    assert not SamplerFeatures.of([SamplingParams(temperature=0, top_p=0.5)]).filtered  # greedy: no filter
    assert not SamplerFeatures.of([SamplingParams(top_k=1)]).filtered  # top_k 1 is greedy
    assert SamplerFeatures.of([plain, SamplingParams(top_logprobs_num=3)]).top_logprobs
    assert SamplerFeatures.of([plain, SamplingParams(token_ids_logprob=[4])]).top_logprobs  # gathered with them
    assert SamplerFeatures.of([plain], masked=True).masked
    assert len(set(SamplerFeatures.all())) == 16


def test_a_rows_token_does_not_depend_on_the_variant_its_batch_needs(logits):
    """A plain temperature row draws the same token whether its neighbours need filtering or not."""
    plain = SamplingParams(temperature=1.0)
    needy = SamplingParams(temperature=0.7, top_p=0.8, repetition_penalty=1.3, top_logprobs_num=5)
    for seed in range(40):
        alone, *_ = run(logits, [plain], [seed], [seed % 7], SamplerFeatures.of([plain]))
        mixed, *_ = run(logits, [plain, needy], [seed, 99], [seed % 7, 0], FULL)
        assert alone[0] == mixed[0]


def test_filters_keep_exactly_numpy_sets(logits):
    """Sampled tokens always lie in the top-k / nucleus / min-p set computed with numpy, and the
    draws cover more than one token of it."""
    cases = [SamplingParams(temperature=1.0, top_k=5), SamplingParams(temperature=0.9, top_p=0.6),
             SamplingParams(temperature=1.2, min_p=0.2)]
    for params in cases:
        row = logits[0] / params.temperature
        order = np.argsort(-row)
        probs = np.exp(row[order] - row[order].max())
        probs /= probs.sum()
        if params.top_k > 0:
            allowed = set(order[: params.top_k].tolist())
        elif params.top_p < 1:
            allowed = set(order[: int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1].tolist())
        else:
            allowed = set(order[probs >= params.min_p * probs[0]].tolist())
        drawn = set()
        for seed in range(60):
            tokens, *_ = run(logits, [params], [seed], [0], FULL)
            drawn.add(int(tokens[0]))
        assert drawn <= allowed, (params, drawn - allowed)
        assert len(drawn) > 1


def test_greedy_and_logprobs_match_numpy(logits):
    asked = [[7, 299, 7], [0], [], [5, 6]]  # token_ids_logprob per row (the third asks for none)
    params = [SamplingParams(temperature=0, top_logprobs_num=3, token_ids_logprob=ids or None) for ids in asked]
    tokens, chosen, top, top_ids, given = run(logits, params, [0] * ROWS, [0] * ROWS, FULL)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_array_equal(tokens, logits.argmax(-1))
    np.testing.assert_allclose(chosen, logprobs.max(-1), rtol=1e-5)
    np.testing.assert_array_equal(top_ids[:, :5], np.argsort(-logprobs, -1)[:, :5])
    np.testing.assert_allclose(top[:, :5], -np.sort(-logprobs, -1)[:, :5], rtol=1e-5)
    for row, ids in enumerate(asked):
        np.testing.assert_allclose(given[row, :len(ids)], logprobs[row, ids], rtol=1e-5)
    # without the top-logprobs feature the tokens are the same and the alternatives are not computed
    plain, _, top0, *_ = run(logits, [SamplingParams(temperature=0)] * ROWS, [0] * ROWS, [0] * ROWS, SamplerFeatures())
    np.testing.assert_array_equal(plain, tokens)
    assert not top0.any()


def test_logit_bias_acts_as_if_added_to_the_logits(logits):
    """A biased batch samples what the unbiased sampler samples from logits + bias (same seeds, so the
    same noise), and reports the model's own logprobs."""
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.9),
              SamplingParams(temperature=0.7, top_p=0.8), SamplingParams(temperature=0)]
    best = logits.argmax(-1)
    biases = [{int(best[0]): -100.0, 7: 3.5}, {int(best[1]): -100.0}, None, {299: 100.0, 0: -2.0}]
    ids, values = logit_bias_arrays(biases, ROWS)
    biased = logits.copy()
    for row, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            biased[row, token] += value
    seeds, positions = [1, 2, 3, 4], [0, 5, 9, 2]
    want = run(biased, params, seeds, positions, FULL)
    penalties = PenaltyState.zeros(ROWS, VOCAB)
    got = [np.asarray(x) for x in sample(jnp.asarray(logits), batch_of(params, seeds, positions), penalties, None,
                                         FULL, (jnp.asarray(ids), jnp.asarray(values)))]
    np.testing.assert_array_equal(got[0], want[0])
    assert got[0][0] != best[0] and got[0][3] == 299
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    np.testing.assert_allclose(got[1], log_softmax[np.arange(ROWS), got[0]], rtol=1e-5, atol=1e-5)


def test_the_filter_kernel_draws_the_tokens_the_sort_draws():
    """Sampled rows with top-k / top-p / min-p filters draw the same token whether the cut comes from
    sorting the vocabulary or from kernels/gpu/filter_cut.py (interpreted): the same kept sets, the same
    noise. Mutating the kernel's rule (e.g. counting `>` for `>=`) changes tokens here."""
    rng = np.random.default_rng(3)
    vocab, rows = 700, 24
    logits = rng.normal(0, 2, (rows, vocab)).astype(np.float32)
    logits[:, ::5] = logits[:, 1:2]  # ties
    params = [SamplingParams(temperature=float(t), top_k=int(k), top_p=float(p), min_p=float(m))
              for t, k, p, m in zip(rng.choice([0.5, 1.0, 1.5], rows), rng.choice([-1, 3, 40], rows),
                                    rng.choice([1.0, 0.9, 0.3], rows), rng.choice([0.0, 0.0, 0.1], rows))]
    host = SamplingBatch.build(params, list(range(rows)), [5] * rows, list(range(rows)), [0] * rows, rows, rows)
    batch = jax.tree.map(jnp.asarray, host)
    features = SamplerFeatures.of(params)
    assert features.filtered and features.sampled
    penalties = PenaltyState.zeros(rows, vocab)
    kernel = kernels.select("pallas_interpret").top_k_top_p_keep
    draws = {name: np.asarray(sample(jnp.asarray(logits), batch, penalties, None, features, None, keep)[0])
             for name, keep in (("sort", None), ("kernel", kernel))}
    np.testing.assert_array_equal(draws["kernel"], draws["sort"])
    assert len(set(draws["sort"].tolist())) > rows // 2  # real draws, not one token
