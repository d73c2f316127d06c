"""Per-request sampling parameters, validated once when the request arrives."""

from __future__ import annotations

import dataclasses

from sgjax.constrained.grammar import Constraint
from sgjax.executor.sampler import MAX_LOGIT_BIAS, TOP_LOGPROBS


@dataclasses.dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0  # minus this times the token's count in the output so far
    presence_penalty: float = 0.0  # minus this if the token occurred in the output so far
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of seen tokens
    seed: int | None = None  # None: drawn from the engine's random_seed stream
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    n: int = 1
    logprobs: bool = False  # return the chosen tokens' logprobs
    top_logprobs_num: int = 0  # and this many most likely alternatives per token
    logprob_start_len: int = -1  # >= 0: also the prompt tokens' logprobs from this position on
    # Constraints on the output, at most one (see sgjax/constrained):
    regex: str | None = None
    json_schema: str | dict | None = None  # a JSON schema, or its JSON text
    ebnf: str | None = None  # a Lark or GBNF grammar
    choices: list[str] | None = None  # the output is exactly one of these strings
    # Added to the logits of these token ids before sampling (OpenAI's logit_bias: -100 bans, 100 forces);
    # keys may arrive as strings (JSON), validation makes them ints. Logprobs stay the model's own.
    logit_bias: dict[int, float] | None = None

    @classmethod
    def from_dict(cls, d: dict | None) -> "SamplingParams":
        d = dict(d or {})
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        params = cls(**d)
        params.validate()
        return params

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def constraint(self) -> Constraint | None:
        return Constraint.from_params(self.regex, self.json_schema, self.ebnf, self.choices)

    @property
    def uses_penalties(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)

    def validate(self) -> None:
        def need(ok: bool, message: str):
            if not ok:
                raise ValueError(message)

        need(isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 0,
             f"max_new_tokens must be a non-negative integer; got {self.max_new_tokens!r}")
        need(isinstance(self.temperature, (int, float)) and 0 <= self.temperature <= 100,
             f"temperature must be in [0, 100]; got {self.temperature!r}")
        need(isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
             f"top_p must be in (0, 1]; got {self.top_p!r}")
        need(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1),
             f"top_k must be -1 or >= 1; got {self.top_k!r}")
        need(isinstance(self.min_p, (int, float)) and 0 <= self.min_p <= 1,
             f"min_p must be in [0, 1]; got {self.min_p!r}")
        need(isinstance(self.n, int) and 1 <= self.n <= 128, f"n must be in [1, 128]; got {self.n!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(isinstance(value, (int, float)) and -2 <= value <= 2, f"{name} must be in [-2, 2]; got {value!r}")
        need(isinstance(self.repetition_penalty, (int, float)) and 0 < self.repetition_penalty <= 2,
             f"repetition_penalty must be in (0, 2]; got {self.repetition_penalty!r}")
        need(isinstance(self.logprob_start_len, int) and self.logprob_start_len >= -1,
             f"logprob_start_len must be an integer >= -1; got {self.logprob_start_len!r}")
        need(isinstance(self.top_logprobs_num, int) and 0 <= self.top_logprobs_num <= TOP_LOGPROBS,
             f"top_logprobs_num must be in [0, {TOP_LOGPROBS}]; got {self.top_logprobs_num!r}")
        need(self.seed is None or isinstance(self.seed, int), f"seed must be an integer; got {self.seed!r}")
        need(self.stop is None or isinstance(self.stop, (str, list)), "stop must be a string or a list of strings")
        need(all(isinstance(s, str) and s for s in self.stop_strings),
             "stop must be a non-empty string or a list of them")
        need(self.stop_token_ids is None or (isinstance(self.stop_token_ids, list) and all(
            isinstance(t, int) for t in self.stop_token_ids)), "stop_token_ids must be a list of integers")
        for name in ("ignore_eos", "skip_special_tokens", "logprobs"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        self.constraint  # raises ValueError for several constraints or a malformed one
        if self.logit_bias is not None:
            need(isinstance(self.logit_bias, dict), "logit_bias must be an object of token id: bias")
            need(len(self.logit_bias) <= MAX_LOGIT_BIAS,
                 f"logit_bias has {len(self.logit_bias)} entries; at most {MAX_LOGIT_BIAS} are supported")
            bias = {}
            for token, value in self.logit_bias.items():
                try:
                    token_id = int(token)
                except (TypeError, ValueError):
                    token_id = -1
                need(token_id >= 0 and not isinstance(token, (bool, float)),
                     f"logit_bias keys must be token ids (non-negative integers); got {token!r}")
                need(isinstance(value, (int, float)) and not isinstance(value, bool) and -100 <= value <= 100,
                     f"logit_bias values must be numbers in [-100, 100]; got {value!r} for token {token_id}")
                bias[token_id] = float(value)
            self.logit_bias = bias or None
