"""A gen's sampling parameters: the defaults run()/run_batch() give, filled into each gen's unset fields, and
what the engine and the native API receive. The defaults are SGLang's (SglSamplingParams): temperature 1,
so a program samples unless it or run() asks for temperature=0.
"""

from __future__ import annotations

import dataclasses
import warnings

from sgjax.lang.global_config import global_config
from sgjax.lang.primitives import Gen

# The text a gen with `dtype` may produce (a number's trailing space or newline is a stop string, so the
# model can end it and the value leaves it out)
DTYPE_REGEX = {
    int: r"[-+]?[0-9]+[ \n]*",
    float: r"[-+]?[0-9]*\.?[0-9]+[ \n]*",
    bool: r"(True|False)",
    str: r"\"[\w\d\s]*\"",
}
DTYPE_NAMES = {"int": int, "float": float, "bool": bool, "str": str}


@dataclasses.dataclass
class SamplingDefaults:
    """run()'s and run_batch()'s sampling arguments: every gen's values unless the gen sets its own."""
    max_new_tokens: int = 128
    n: int = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None


SAMPLING_ARGS = frozenset(f.name for f in dataclasses.fields(SamplingDefaults))


def resolve(gen: Gen, defaults: SamplingDefaults) -> Gen:
    """The gen with every unset field taken from the defaults, and a dtype turned into its regex."""
    filled = {"max_tokens": gen.max_tokens if gen.max_tokens is not None else defaults.max_new_tokens,
              "min_tokens": gen.min_tokens or 0}
    for name in SAMPLING_ARGS - {"max_new_tokens"}:
        if getattr(gen, name) is None:
            filled[name] = getattr(defaults, name)
    if gen.dtype is not None:
        dtype = DTYPE_NAMES.get(gen.dtype, gen.dtype) if isinstance(gen.dtype, str) else gen.dtype
        if dtype not in DTYPE_REGEX:
            raise ValueError(f"gen dtype must be int, float, str or bool; got {gen.dtype!r}")
        if gen.regex is not None:
            warnings.warn(f"gen {gen.name!r} has both dtype and regex; the dtype's regex is used", stacklevel=2)
        filled["regex"] = DTYPE_REGEX[dtype]
        if dtype in (int, float):  # a number ends at a space or newline, which the value leaves out
            stop = filled.get("stop", gen.stop)
            filled["stop"] = ([stop] if isinstance(stop, str) else list(stop or [])) + [" ", "\n"]
    resolved = dataclasses.replace(gen, **filled)
    if resolved.n != 1:
        raise ValueError(f"gen {gen.name!r}: n={resolved.n} is not supported in a program; fork the state "
                         "(forks = s.fork(n)) for n parallel samples")
    return resolved


def engine_params(gen: Gen) -> dict:
    """A resolved gen's sampling parameters, as the engine's SamplingParams and /generate take them."""
    params = {"max_new_tokens": gen.max_tokens, "min_new_tokens": gen.min_tokens, "stop": gen.stop or None,
              "stop_token_ids": gen.stop_token_ids or None, "stop_regex": gen.stop_regex or None,
              "temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k, "min_p": gen.min_p,
              "frequency_penalty": gen.frequency_penalty, "presence_penalty": gen.presence_penalty,
              "ignore_eos": gen.ignore_eos, "seed": gen.seed, "regex": gen.regex, "json_schema": gen.json_schema,
              "skip_special_tokens": global_config.skip_special_tokens_in_output,
              "spaces_between_special_tokens": global_config.spaces_between_special_tokens_in_out}
    return {k: v for k, v in params.items() if v is not None}


def logprob_options(gen: Gen) -> dict:
    """The native API's top-level logprob fields a resolved gen asks for (empty when it asks for none)."""
    if not gen.return_logprob:
        return {}
    options = {"return_logprob": True, "top_logprobs_num": gen.top_logprobs_num or 0,
               "return_text_in_logprobs": bool(gen.return_text_in_logprobs)}
    if gen.logprob_start_len is not None:
        options["logprob_start_len"] = gen.logprob_start_len
    return options
