"""In-process backend: an Engine in this Python process. Supports every gen field, select with every
choices method, streaming with meta information per chunk; images with a vision-language model (not in a
select's prompt)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from sgjax.engine.chat_template import role_markers
from sgjax.lang.backends.base import Backend, ChoiceScores, choice_start
from sgjax.lang.primitives import Gen
from sgjax.lang.sampling import engine_params


class EngineBackend(Backend):
    def __init__(self, engine, owns_engine: bool = False):
        if engine.tokenizer is None:
            raise ValueError("the frontend language needs an engine with a tokenizer (not dummy weights)")
        self.engine = engine
        self.owns_engine = owns_engine  # shutdown() stops it (sgl.Runtime made it)
        self.role_markers = role_markers(engine.tokenizer)
        self.image_placeholder = engine.image_placeholder

    @property
    def endpoint(self) -> "EngineBackend":
        return self  # SGLang's Runtime exposes its backend as .endpoint

    def shutdown(self) -> None:
        if self.owns_engine:
            self.engine.shutdown()

    def _params(self, gen: Gen) -> dict:
        params = engine_params(gen)
        if gen.return_logprob:
            params.update(logprobs=True, top_logprobs_num=gen.top_logprobs_num or 0)
            if gen.logprob_start_len is not None:
                params["logprob_start_len"] = gen.logprob_start_len
        return params

    def _meta(self, req, gen: Gen) -> dict:
        """The request's meta information as the native API gives it ([logprob, id, text] entries)."""
        meta = req.result()["meta_info"]
        decode = self.engine.tokenizer.decode
        with_text = bool(gen.return_text_in_logprobs)

        def entries(pairs):
            return [[lp, tok, decode([tok]) if with_text else None] for lp, tok in pairs]

        for key in ("output_token_logprobs", "input_token_logprobs"):
            if key in meta:
                meta[key] = entries(meta[key])
        for key in ("output_top_logprobs", "input_top_logprobs"):
            if key in meta:
                meta[key] = [entries(top) if top else None for top in meta[key]]
        return meta

    def generate(self, prompt, gen: Gen) -> tuple[str, dict]:
        (req,) = self.engine.make_requests(prompt.text, self._params(gen), image_data=self.image_data(prompt))
        asyncio.run(self.engine.run_to_end([req]))
        return req.text, self._meta(req, gen)

    def stream(self, prompt, gen: Gen) -> Iterator[tuple[str, dict]]:
        for delta, req in self.engine.stream(prompt.text, self._params(gen), image_data=self.image_data(prompt)):
            yield delta, self._meta(req, gen)

    def score_choices(self, prompt, choices: list[str], unconditional: bool) -> ChoiceScores:
        """Each choice's token logprobs after the prompt, all choices (and their unconditional scoring) in
        one batch."""
        self.no_images(prompt, "select")
        prefix = self.engine.tokenize(prompt.text)
        requests, spans = [], []
        for choice in choices:
            ids = self.engine.tokenize(prompt.text + choice)
            start = choice_start(prefix, ids)
            spans.append(ids[start:])
            requests += self.engine.make_requests(input_ids=ids, sampling_params={
                "max_new_tokens": 0, "logprob_start_len": start, "temperature": 0})
        alone = [self.engine.make_requests(input_ids=span, sampling_params={
            "max_new_tokens": 0, "logprob_start_len": 0, "temperature": 0})[0] for span in spans] if unconditional else []
        asyncio.run(self.engine.run_to_end(requests + alone))
        token_logprobs = [[[req.input_logprobs[q][0], tok, None] for q, tok in
                           zip(sorted(req.input_logprobs), span)] for req, span in zip(requests, spans)]
        uncond = [[0.0] + [req.input_logprobs[q][0] for q in sorted(req.input_logprobs) if q > 0]
                  for req in alone] if unconditional else None
        return ChoiceScores(token_logprobs, uncond, {"cached_tokens": [r.cached_tokens for r in requests]})

    def flush_cache(self) -> bool:
        return self.engine.flush_cache()

    def get_server_info(self) -> dict:
        engine = self.engine
        return {"model_path": engine.args.model_path, "context_length": engine.context_length,
                "max_total_num_tokens": engine.num_usable_pages * engine.args.page_size}
