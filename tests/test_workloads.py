"""Benchmark workloads have the shapes their descriptions promise."""

import numpy as np

from sgjax.testing import workloads


def test_sharegpt_like_lengths_have_sharegpt_means():
    w = workloads.sharegpt_like(4000, 1000, max_len=4096)
    ins = np.array([len(p) for p in w.prompts])
    outs = np.array(w.output_lens)
    assert abs(ins.mean() - 220) < 20 and abs(outs.mean() - 200) < 20
    assert ins.min() >= 4 and ins.max() <= 4096 and np.median(ins) < ins.mean()  # right-skewed


def test_shared_prefix_groups_share_their_system_prompt():
    w = workloads.shared_prefix(1000, num_groups=3, prompts_per_group=4, system_len=50, question_len=5)
    assert len(w.prompts) == 12 and all(len(p) == 55 for p in w.prompts)
    systems = {tuple(p[:50]) for p in w.prompts}
    assert len(systems) == 3
    assert len({tuple(p) for p in w.prompts}) == 12
