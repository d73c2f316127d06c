"""Every field of OpenAI's /v1/completions and /v1/chat/completions requests (openai-python's
CompletionCreateParams and chat CompletionCreateParams) and SGLang's extensions to them, and what sgjax does
with each: one table, read by both endpoints before anything else, and mirrored by the README's.

- supported: the handlers read it.
- ignored: accepted and unused, as vLLM and SGLang accept them: bookkeeping of OpenAI's platform (storage,
  billing, caching and safety identifiers) and hints whose absence changes no output's correctness.
- rejected: a request that asks for it (a value other than null or the default) gets a 400 naming it and why.
Fields in neither OpenAI's request nor SGLang's extensions get a 400, as OpenAI's own API answers them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from sgjax.server.errors import ApiError

SUPPORTED, IGNORED, REJECTED = "supported", "ignored", "rejected"
# Sampling fields SGLang's and vLLM's OpenAI servers take beyond OpenAI's (min_tokens is min_new_tokens)
SAMPLING_EXTENSIONS = ("top_k", "min_p", "repetition_penalty", "ignore_eos", "skip_special_tokens", "stop_token_ids",
                       "regex", "ebnf", "min_tokens", "stop_regex", "no_stop_trim", "spaces_between_special_tokens")


@dataclasses.dataclass(frozen=True)
class Field:
    status: str
    why: str = ""
    # for a rejected field: whether a value asks for nothing sgjax lacks (by default null, false, "", [], {})
    harmless: Callable[[object, dict], bool] = lambda value, body: not value


def supported(why: str = "") -> Field:
    return Field(SUPPORTED, why)


def ignored(why: str) -> Field:
    return Field(IGNORED, why)


def rejected(why: str, harmless: Callable[[object, dict], bool] | None = None) -> Field:
    return Field(REJECTED, why, harmless) if harmless else Field(REJECTED, why)


BOTH = {
    "model": supported("must name the served model"),
    "stream": supported(), "stream_options": supported("include_usage"),
    "temperature": supported(), "top_p": supported(), "n": supported(), "seed": supported(),
    "stop": supported(), "max_tokens": supported(), "frequency_penalty": supported(),
    "presence_penalty": supported(), "logit_bias": supported(), "logprobs": supported(),
    "user": ignored("an end-user identifier for OpenAI's abuse monitoring"),
    # SGLang's and vLLM's extensions of the OpenAI body, in SGLang's sampling parameters' meaning
    **dict.fromkeys(SAMPLING_EXTENSIONS, supported("SGLang's (and vLLM's) extension")),
    "rid": ignored("SGLang's request id: sgjax names the request itself (its id is in the response)"),
    "lora_path": rejected("LoRA adapters are not supported"),
    "return_hidden_states": rejected("return_hidden_states is not supported"),
}

COMPLETIONS = {
    **BOTH,
    "prompt": supported("text, token ids, or a list of either"), "echo": supported(),
    "response_format": supported("SGLang's extension on completions: text, json_object, json_schema"),
    "best_of": rejected("best_of other than n is not supported", lambda value, body: value in (None, body.get("n", 1))),
    "suffix": rejected("suffix (insertion) is not supported"),
}

CHAT = {
    **BOTH,
    "messages": supported("text content only"), "max_completion_tokens": supported(), "top_logprobs": supported(),
    "response_format": supported("text, json_object, json_schema"), "tools": supported(), "tool_choice": supported(),
    "chat_template_kwargs": supported("extra variables for the chat template (e.g. enable_thinking)"),
    "continue_final_message": rejected("continuing the final message is not supported"),
    "separate_reasoning": rejected("reasoning is not separated from the answer",
                                   lambda value, body: value in (None, False)),
    "parallel_tool_calls": ignored("every tool call the model writes is returned"),
    "metadata": ignored("stored completions' tags"),
    "store": ignored("OpenAI's stored completions"),
    "service_tier": ignored("OpenAI's billing tier"),
    "safety_identifier": ignored("an end-user identifier for OpenAI's abuse monitoring"),
    "prompt_cache_key": ignored("prefix caching is automatic (the radix cache)"),
    "prompt_cache_retention": ignored("prefix caching is automatic (the radix cache)"),
    "prompt_cache_options": ignored("prefix caching is automatic (the radix cache)"),
    "prediction": ignored("a speed hint (predicted output); the output does not depend on it"),
    "reasoning_effort": ignored("for reasoning models' hidden reasoning, which sgjax does not separate"),
    "verbosity": ignored("a style hint to OpenAI's models"),
    "modalities": rejected('only text output is supported', lambda value, body: value in (None, ["text"])),
    "audio": rejected("audio output is not supported"),
    "functions": rejected("the deprecated functions are not supported; use tools"),
    "function_call": rejected("the deprecated function_call is not supported; use tool_choice"),
    # even an empty object asks for these
    "web_search_options": rejected("web search is not supported", lambda value, body: value is None),
    "moderation": rejected("moderation is not supported", lambda value, body: value is None),
}


def check_fields(body: dict, table: dict[str, Field], endpoint: str) -> None:
    """400 for a field the endpoint does not have, and for a rejected field that asks for something."""
    unknown = sorted(set(body) - set(table))
    if unknown:
        raise ApiError(f"unknown fields for {endpoint}: {unknown}", param=unknown[0])
    for name, value in body.items():
        field = table[name]
        if field.status == REJECTED and not field.harmless(value, body):
            raise ApiError(f"{name}: {field.why}", param=name)
