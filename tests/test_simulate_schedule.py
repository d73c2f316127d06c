"""simulate_schedule's pricing of a schedule with measured layer costs, against a direct recomputation."""

import argparse
import pathlib
import sys

import numpy as np
import pytest

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
import simulate_schedule as sim  # noqa: E402

from sgjax.testing import workloads  # noqa: E402

COSTS = "64:200,128:210,256:240,512:360"


def args(**kw) -> argparse.Namespace:
    base = dict(num_pages=4000, page_size=16, disable_radix_cache=False, max_running_requests=64,
                chunked_prefill_size=128, context_length=2048, policy="lof", step_token_target=96,
                min_token_bucket=16, model=sim.LLAMA_3_8B, bandwidth=2.6e12, matmul_rate=750e12,
                layer_costs=sim.parse_layer_costs(COSTS), layers=32, attention_bandwidth=2.0e12, sampling_ms=0.5,
                arrival_steps=0)
    base.update(kw)
    return argparse.Namespace(**base)


def test_layer_cost_is_piecewise_linear_in_the_measured_points():
    costs = sim.parse_layer_costs("512:360,64:200,256:240,128:210")  # any order
    assert sim.layer_cost_s(costs, 128) == pytest.approx(210e-6)
    assert sim.layer_cost_s(costs, 192) == pytest.approx(225e-6)  # halfway between 128 and 256
    assert sim.layer_cost_s(costs, 16) == pytest.approx(200e-6)  # below the smallest: its cost
    assert sim.layer_cost_s(costs, 1024) == pytest.approx(720e-6)  # above: the largest's cost a token


def test_priced_steps_sum_each_steps_layers_kv_and_sampling():
    a = args()
    work = workloads.sharegpt_like(60, 1000, max_len=200, seed=3)
    log, _ = sim.simulate(work, a)
    ts, us = [64, 128, 256, 512], [200, 210, 240, 360]
    round_up, expected = sim.padded_tokens(a), 0.0
    for step in log:
        tokens = step.decodes + step.prefill_tokens
        bucket = round_up(tokens)
        assert bucket >= tokens
        layer = np.interp(bucket, ts, us) * 1e-6 if bucket <= 512 else 360e-6 * bucket / 512
        expected += 32 * layer + step.kv_tokens * sim.LLAMA_3_8B["kv_bytes_per_token"] / 2.0e12 + 0.5e-3
    assert sim.measured_s(log, a) == pytest.approx(expected)


def test_even_steps_never_cost_more_than_the_schedule_with_a_convex_cost():
    # Linear-above-the-floor costs are convex, so the even split is a lower bound for any schedule of the
    # workload's tokens over at least its longest output's steps.
    a = args(layer_costs=sim.parse_layer_costs("16:100,128:100,1024:800"))
    work = workloads.sharegpt_like(60, 1000, max_len=200, seed=4)
    log, _ = sim.simulate(work, a)
    assert len(log) >= max(work.output_lens)
    assert sim.even_steps_s(work, a) <= sim.measured_s(log, a)


def test_a_spread_arrival_runs_only_what_has_arrived():
    """Requests arriving over N steps: each step computes no more than the tokens of the requests arrived by
    then could hold (a naive count), every token is still computed once, and the run takes at least as many
    steps as with every request there at the start."""
    work = workloads.sharegpt_like(40, 1000, max_len=120, seed=2)
    at_once, _ = sim.simulate(work, args())
    spread_steps = 30
    log, _ = sim.simulate(work, args(arrival_steps=spread_steps))
    total = sum(len(p) for p in work.prompts) + sum(work.output_lens) - len(work.prompts)  # last token: no step
    assert sum(r.decodes + r.prefill_tokens for r in log) == total == sum(r.decodes + r.prefill_tokens
                                                                          for r in at_once)
    assert len(log) >= len(at_once)
    done = 0
    for k, record in enumerate(log[:spread_steps]):  # no idle steps here: the first request is there at once
        arrived = [i for i in range(len(work.prompts)) if i * spread_steps // len(work.prompts) <= k]
        done += record.decodes + record.prefill_tokens
        assert done <= sum(len(work.prompts[i]) + work.output_lens[i] for i in arrived)
