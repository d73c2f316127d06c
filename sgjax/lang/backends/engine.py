"""In-process backend: an Engine in this Python process."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from sgjax.lang.backends.base import Backend, choice_start, pick
from sgjax.engine.chat_template import role_markers
from sgjax.lang.primitives import Gen


class EngineBackend(Backend):
    def __init__(self, engine):
        if engine.tokenizer is None:
            raise ValueError("the frontend language needs an engine with a tokenizer (not dummy weights)")
        self.engine = engine
        self.role_markers = role_markers(engine.tokenizer)

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        self.no_images(prompt)
        out = self.engine.generate(prompt.text, gen.sampling_params())
        return out["text"], out["meta_info"]

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        self.no_images(prompt)
        for delta, req in self.engine.stream(prompt.text, gen.sampling_params()):
            yield delta, (req.result()["meta_info"] if req.finished else {})

    def select(self, prompt, choices: list[str]) -> tuple[int, dict]:
        """Mean logprob of each choice's tokens after the prompt, all choices in one batch."""
        self.no_images(prompt)
        prefix = self.engine.tokenize(prompt.text)
        requests, starts = [], []
        for choice in choices:
            ids = self.engine.tokenize(prompt.text + choice)
            starts.append(choice_start(prefix, ids))
            requests += self.engine.make_requests(input_ids=ids, sampling_params={
                "max_new_tokens": 0, "logprob_start_len": starts[-1], "temperature": 0})
        asyncio.run(self.engine.run_to_end(requests))
        scores = []
        for req in requests:
            logprobs = [req.input_logprobs[q][0] for q in sorted(req.input_logprobs)]
            scores.append(sum(logprobs) / len(logprobs))
        return pick(scores), {"normalized_prompt_logprobs": scores,
                              "cached_tokens": [r.cached_tokens for r in requests]}
