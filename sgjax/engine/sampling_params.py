"""Per-request sampling parameters, validated once when the request arrives.

The names and meanings are SGLang's (`python/sglang/srt/sampling/sampling_params.py`), so SGLang's clients send
theirs unchanged; a parameter sgjax cannot honour is rejected by name, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import functools

import regex

from sgjax.constrained.grammar import Constraint
from sgjax.executor.sampler import MAX_LOGIT_BIAS, MAX_TOKEN_IDS_LOGPROB, TOP_LOGPROBS

UNTIL_CONTEXT_END = 2**31 - 1  # max_new_tokens null: generate until the context is full
# SGLang's parameters that sgjax rejects when set, and why
NOT_SUPPORTED = {
    "structural_tag": "structural_tag is not supported; constrain the output with json_schema, regex or ebnf",
    "beam_width": "beam search (beam_width) is not supported",
    "watermark": "watermarking is not supported",
}
# SGLang's parameters that are accepted and have nothing to do here: custom_params feeds a custom logit
# processor (which /generate rejects), stream_interval batches stream events (sgjax sends one a step).
ACCEPTED_AND_UNUSED = {"custom_params": dict, "stream_interval": int}
INT32_MAX = 2**31 - 1  # the step's arrays hold counts, positions and token ids as int32


def is_int(value, low: int, high: int = INT32_MAX) -> bool:
    """An integer (true and false are not) in [low, high]."""
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def is_number(value, low: float, high: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high


# Room kept in a row's logit-bias arrays for the EOS ids that min_new_tokens bans
EOS_BIAS_ROOM = 16


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
    stop: str | list[str] | None = None  # the output ends before the first of these strings (see no_stop_trim)
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None  # the output ends once its text matches one (the match kept)
    min_new_tokens: int = 0  # EOS and stop_token_ids are banned until this many tokens are out
    no_stop_trim: bool = False  # keep the matched stop string (and a stop token's text) in the output
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True  # passed to the tokenizer's decode (slow tokenizers use it)
    n: int = 1
    logprobs: bool = False  # return the chosen tokens' logprobs
    top_logprobs_num: int = 0  # and this many most likely alternatives per token
    logprob_start_len: int = -1  # >= 0: also the prompt tokens' logprobs from this position on
    token_ids_logprob: list[int] | None = None  # and these tokens' logprobs at every position
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
        """Parameters as a client sends them (SGLang's names; null means the default, as in SGLang)."""
        d = dict(d or {})
        for name, reason in NOT_SUPPORTED.items():
            if d.pop(name, None) is not None:
                raise ValueError(reason)
        for name, kind in ACCEPTED_AND_UNUSED.items():
            value = d.pop(name, None)
            if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
                raise ValueError(f"{name} must be {'an object' if kind is dict else 'an integer'}; got {value!r}")
        seed = d.pop("sampling_seed", None)  # SGLang's name for the seed
        if seed is not None:
            if d.get("seed") is not None and d["seed"] != seed:
                raise ValueError("sampling_seed and seed are the same parameter; give one")
            d["seed"] = seed
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown sampling parameters: {sorted(unknown)}")
        if "max_new_tokens" in d and d["max_new_tokens"] is None:
            d["max_new_tokens"] = UNTIL_CONTEXT_END
        params = cls(**{k: v for k, v in d.items() if v is not None})
        params.validate()
        return params

    @property
    def stop_patterns(self) -> list[regex.Pattern]:
        if self.stop_regex is None:
            return []
        return [compiled(p) for p in ([self.stop_regex] if isinstance(self.stop_regex, str) else self.stop_regex)]

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

        need(is_int(self.max_new_tokens, 0), f"max_new_tokens must be an integer in [0, {INT32_MAX}]; "
             f"got {self.max_new_tokens!r}")
        need(is_number(self.temperature, 0, 100), f"temperature must be in [0, 100]; got {self.temperature!r}")
        need(is_number(self.top_p, 0, 1) and self.top_p > 0, f"top_p must be in (0, 1]; got {self.top_p!r}")
        need(self.top_k == -1 and not isinstance(self.top_k, bool) or is_int(self.top_k, 1),
             f"top_k must be -1 or an integer in [1, {INT32_MAX}]; got {self.top_k!r}")
        need(is_number(self.min_p, 0, 1), f"min_p must be in [0, 1]; got {self.min_p!r}")
        need(is_int(self.n, 1, 128), f"n must be in [1, 128]; got {self.n!r}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            need(is_number(value, -2, 2), f"{name} must be in [-2, 2]; got {value!r}")
        need(is_number(self.repetition_penalty, 0, 2) and self.repetition_penalty > 0,
             f"repetition_penalty must be in (0, 2]; got {self.repetition_penalty!r}")
        need(is_int(self.logprob_start_len, -1), f"logprob_start_len must be an integer in [-1, {INT32_MAX}]; "
             f"got {self.logprob_start_len!r}")
        need(is_int(self.top_logprobs_num, 0, TOP_LOGPROBS),
             f"top_logprobs_num must be in [0, {TOP_LOGPROBS}]; got {self.top_logprobs_num!r}")
        ids = self.token_ids_logprob
        need(ids is None or (isinstance(ids, list) and 0 < len(ids) <= MAX_TOKEN_IDS_LOGPROB
                             and all(is_int(t, 0) for t in ids)),
             f"token_ids_logprob must be a list of 1 to {MAX_TOKEN_IDS_LOGPROB} token ids; got {ids!r}")
        need(self.seed is None or is_int(self.seed, -2**63, 2**64 - 1),
             f"seed must be a 64-bit integer; got {self.seed!r}")
        need(self.stop is None or isinstance(self.stop, (str, list)), "stop must be a string or a list of strings")
        need(all(isinstance(s, str) and s for s in self.stop_strings),
             "stop must be a non-empty string or a list of them")
        need(self.stop_token_ids is None or (isinstance(self.stop_token_ids, list) and all(
            is_int(t, 0) for t in self.stop_token_ids)), "stop_token_ids must be a list of token ids")
        for name in ("ignore_eos", "skip_special_tokens", "logprobs", "no_stop_trim", "spaces_between_special_tokens"):
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false")
        need(is_int(self.min_new_tokens, 0),
             f"min_new_tokens must be an integer in [0, {INT32_MAX}]; got {self.min_new_tokens!r}")
        patterns = [self.stop_regex] if isinstance(self.stop_regex, str) else self.stop_regex or []
        need(isinstance(patterns, list) and all(isinstance(p, str) and p for p in patterns),
             "stop_regex must be a non-empty string or a list of them")
        for pattern in patterns:
            try:
                compiled(pattern)
            except regex.error as e:
                raise ValueError(f"stop_regex {pattern!r} is not a valid regular expression: {e}") from None
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
        if self.min_new_tokens:
            banned = len(self.logit_bias or ()) + len(self.stop_token_ids or ())
            need(banned <= MAX_LOGIT_BIAS - EOS_BIAS_ROOM,
                 f"min_new_tokens with logit_bias and stop_token_ids: at most {MAX_LOGIT_BIAS - EOS_BIAS_ROOM} "
                 f"entries together; got {banned}")


@functools.lru_cache(maxsize=256)
def compiled(pattern: str) -> regex.Pattern:
    """A stop_regex pattern, compiled once per process: by `regex`, Python's `re` with the same syntax and a
    time limit on a search (output_processor.match_stop_regex), which a pattern that backtracks without end
    would otherwise spend on the engine thread."""
    return regex.compile(pattern)
