"""Benchmark workloads as token ids, generated offline (no dataset download).

- `sharegpt_like`: input and output lengths drawn from log-normal distributions with ShareGPT's
  means (about 220 prompt and 200 output tokens in the conversations SGLang and vLLM benchmark with),
  sigma 1.0 (a heavy right tail, as real chats have), clipped to [4, max_len]. Token ids are uniform:
  with dummy weights their values do not matter, only the lengths.
- `fixed`: every prompt `input_len` tokens, every output `output_len`.
- `shared_prefix`: SGLang's "generated-shared-prefix": `num_groups` long system prompts, each
  followed by `prompts_per_group` different short questions.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class Workload:
    prompts: list[list[int]]
    output_lens: list[int]
    description: str


def _lognormal_lengths(rng, mean: float, n: int, max_len: int, sigma: float = 1.0) -> np.ndarray:
    mu = np.log(mean) - sigma**2 / 2  # so that the (unclipped) mean is `mean`
    return np.clip(rng.lognormal(mu, sigma, n).astype(int), 4, max_len)


def sharegpt_like(num_prompts: int, vocab: int, *, mean_input: float = 220, mean_output: float = 200,
                  max_len: int = 1024, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    ins = _lognormal_lengths(rng, mean_input, num_prompts, max_len)
    outs = _lognormal_lengths(rng, mean_output, num_prompts, max_len)
    prompts = [rng.integers(0, vocab, n).tolist() for n in ins]
    return Workload(prompts, outs.tolist(), f"ShareGPT-like: {num_prompts} prompts, lognormal lengths "
                    f"(mean {ins.mean():.0f} in / {outs.mean():.0f} out, max {max_len})")


def fixed(num_prompts: int, vocab: int, *, input_len: int, output_len: int, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    return Workload([rng.integers(0, vocab, input_len).tolist() for _ in range(num_prompts)],
                    [output_len] * num_prompts, f"fixed: {num_prompts} prompts, {input_len} in / {output_len} out")


def shared_prefix(vocab: int, *, num_groups: int = 16, prompts_per_group: int = 32, system_len: int = 2048,
                  question_len: int = 128, output_len: int = 128, seed: int = 0) -> Workload:
    rng = np.random.default_rng(seed)
    prompts = []
    for _ in range(num_groups):
        system = rng.integers(0, vocab, system_len).tolist()
        prompts += [system + rng.integers(0, vocab, question_len).tolist() for _ in range(prompts_per_group)]
    order = rng.permutation(len(prompts))  # requests of a group arrive interleaved with others
    return Workload([prompts[i] for i in order], [output_len] * len(prompts),
                    f"shared prefix: {num_groups} groups x {prompts_per_group} prompts, system {system_len} + "
                    f"question {question_len} tokens, {output_len} out")
