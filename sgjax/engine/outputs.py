"""RequestOutput: the caller side's view of one request, kept up to date from the engine's TokenDeltas.

The server and the Engine API read these, never the engine's own Request (which lives on the engine thread,
possibly in another process)."""

from __future__ import annotations

import dataclasses
import time

from sgjax.engine.messages import Finished, TokenDelta
from sgjax.engine.sampling_params import SamplingParams
from sgjax.multimodal.inputs import MultimodalInputs


@dataclasses.dataclass(eq=False)
class RequestOutput:
    rid: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int = 0  # of its random draws
    group: str | None = None  # the n samples of one prompt share it
    text: str = ""
    output_ids: list[int] = dataclasses.field(default_factory=list)
    output_logprobs: list[float] = dataclasses.field(default_factory=list)
    output_top_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)
    output_ids_logprobs: list[list[tuple[float, int]]] = dataclasses.field(default_factory=list)  # token_ids_logprob's
    # prompt position -> (logprob of that prompt token, top alternatives, token_ids_logprob ids' logprobs)
    input_logprobs: dict[int, tuple[float, list, list]] = dataclasses.field(default_factory=dict)
    cached_tokens: int = 0
    finish_reason: dict | None = None
    finished: bool = False
    arrival_time: float = dataclasses.field(default_factory=time.monotonic)
    first_token_time: float | None = None
    admit_time: float | None = None  # when the engine first scheduled it
    finish_time: float | None = None
    user_rid: str | None = None  # the rid the caller gave (shared by a prompt's n samples), if any
    submitted: bool = False  # sent to the engine's core
    images: MultimodalInputs | None = None  # its images, prepared (prompt_ids has their placeholders expanded)

    def apply(self, delta: TokenDelta) -> None:
        """Add what the request gained in a step."""
        self.output_ids.extend(delta.output_ids)
        self.output_logprobs.extend(delta.output_logprobs)
        self.output_top_logprobs.extend(delta.output_top_logprobs)
        self.output_ids_logprobs.extend(delta.output_ids_logprobs)
        if delta.input_logprobs:
            self.input_logprobs.update(delta.input_logprobs)
        self.text += delta.text
        self.cached_tokens = delta.cached_tokens
        if delta.first_token_time is not None:
            self.first_token_time = delta.first_token_time
        if delta.admit_time is not None:
            self.admit_time = delta.admit_time
        if isinstance(delta, Finished):
            self.finished, self.finish_reason, self.finish_time = True, delta.finish_reason, time.monotonic()

    def result(self) -> dict:
        """The finished request as SGLang's native API returns it."""
        meta = {"id": self.rid, "finish_reason": self.finish_reason, "prompt_tokens": len(self.prompt_ids),
                "completion_tokens": len(self.output_ids), "cached_tokens": self.cached_tokens}
        if self.finished:
            meta["e2e_latency"] = self.finish_time - self.arrival_time
        if self.params.logprobs:
            meta["output_token_logprobs"] = list(zip(self.output_logprobs, self.output_ids))
        if self.params.top_logprobs_num:
            meta["output_top_logprobs"] = self.output_top_logprobs
        if self.params.token_ids_logprob:
            meta["output_token_ids_logprobs"] = self.output_ids_logprobs
        start = self.params.logprob_start_len
        if start >= 0 and (self.finished or self.prompt_logprobs_done):  # as SGLang: from the first token on
            positions = range(start, len(self.prompt_ids))
            entries = [self.input_logprobs.get(q) for q in positions]
            meta["input_token_logprobs"] = [(e[0] if e else None, self.prompt_ids[q])
                                            for e, q in zip(entries, positions)]
            if self.params.top_logprobs_num:
                meta["input_top_logprobs"] = [e[1] if e else None for e in entries]
            if self.params.token_ids_logprob:
                meta["input_token_ids_logprobs"] = [e[2] if e else None for e in entries]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    @property
    def prompt_logprobs_done(self) -> bool:
        """Whether every prompt position from logprob_start_len on has its logprob (position 0 has none)."""
        return len(self.input_logprobs) >= len(self.prompt_ids) - max(self.params.logprob_start_len, 1)
