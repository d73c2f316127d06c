"""The expressions a program adds to its state: text, gen, select, image, role markers, variable scopes.

They are plain data; ProgramState (state.py) executes them against a backend. Signatures follow SGLang's
frontend (`sglang.lang.api`), so programs port by changing the import.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sgjax.lang.choices import ChoicesMethod, token_length_normalized

ROLES = ("system", "user", "assistant")


class Expr:
    """Something a program can add to its state; `a + b` chains expressions, as in SGLang."""

    def __add__(self, other) -> "Seq":
        return Seq([self]) + other

    def __radd__(self, other) -> "Seq":
        return Seq([other, self])


class Seq(list):
    """Expressions executed in order."""

    def __add__(self, other) -> "Seq":
        return Seq([*self, *(other if isinstance(other, list) else [other])])

    def __radd__(self, other) -> "Seq":
        return Seq([*(other if isinstance(other, list) else [other]), *self])


@dataclasses.dataclass
class Gen(Expr):
    """A generation call. A field left None takes the value run()/run_batch() give (sampling.py)."""
    name: str | None = None
    max_tokens: int | None = None
    min_tokens: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    stop_regex: str | list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    ignore_eos: bool | None = None
    return_logprob: bool | None = None
    logprob_start_len: int | None = None
    top_logprobs_num: int | None = None
    return_text_in_logprobs: bool | None = None
    dtype: type | str | None = None  # int, float, str or bool: constrains the text to look like one
    regex: str | None = None
    json_schema: str | dict | None = None
    seed: int | None = None  # sgjax's addition: a seeded sample is reproducible


@dataclasses.dataclass
class Select(Expr):
    name: str | None
    choices: list[str]
    temperature: float = 0.0
    choices_method: ChoicesMethod = token_length_normalized


@dataclasses.dataclass
class Image(Expr):
    data: bytes  # the encoded image file (PNG, JPEG, ...)
    mime: str


@dataclasses.dataclass
class RoleBegin(Expr):
    role: str


@dataclasses.dataclass
class RoleEnd(Expr):
    role: str


@dataclasses.dataclass
class VarScopeBegin(Expr):
    name: str


@dataclasses.dataclass
class VarScopeEnd(Expr):
    name: str


# model_type -> (start tag, end tag, whether the text is reasoning before any start tag: models whose chat
# template opens the think block itself), as SGLang's reasoning parsers read them
REASONING_FORMATS = {None: ("<think>", "</think>", False), "qwen3": ("<think>", "</think>", False),
                     "deepseek-r1": ("<think>", "</think>", True), "qwen3-thinking": ("<think>", "</think>", True),
                     "step3": ("<think>", "</think>", True), "minimax": ("<think>", "</think>", True),
                     "glm45": ("<think>", "</think>", False), "kimi": ("\u25c1think\u25b7", "\u25c1/think\u25b7", False)}


@dataclasses.dataclass
class SeparateReasoning(Expr):
    """Split the named gens' text into `<name>_reasoning_content` and the answer (the model's think tags)."""
    names: list[str]
    model_type: str | None

    def split(self, text: str) -> tuple[str, str]:
        """(reasoning, answer) of a gen's text. A think block left open (the gen ran out of tokens) is all
        reasoning; text with no think block is all answer, unless the model's format starts inside one."""
        start, end, forced = REASONING_FORMATS[self.model_type]
        if not forced and start not in text:
            return "", text
        body = text
        while body.startswith(start):
            body = body[len(start):]
        reasoning, closed, answer = body.partition(end)
        return (reasoning, answer) if closed else (body, "")


def gen(name: str | None = None, max_tokens: int | None = None, min_tokens: int | None = None,
        n: int | None = None, stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
        stop_regex: str | list[str] | None = None, temperature: float | None = None, top_p: float | None = None,
        top_k: int | None = None, min_p: float | None = None, frequency_penalty: float | None = None,
        presence_penalty: float | None = None, ignore_eos: bool | None = None, return_logprob: bool | None = None,
        logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
        return_text_in_logprobs: bool | None = None, dtype: type | str | None = None,
        choices: list[str] | None = None, choices_method: ChoicesMethod | None = None, regex: str | None = None,
        json_schema: str | dict | None = None, seed: int | None = None) -> Gen | Select:
    """Generate text into variable `name`; with `choices`, a select among them (as SGLang's gen)."""
    if choices:
        return select(name, choices, 0.0 if temperature is None else temperature,
                      choices_method or token_length_normalized)
    if regex is not None:
        try:
            re.compile(regex)
        except re.error as e:
            raise ValueError(f"regex {regex!r} does not compile: {e}") from None
    return Gen(name, max_tokens, min_tokens, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
               frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len, top_logprobs_num,
               return_text_in_logprobs, dtype, regex, json_schema, seed)


def _typed_gen(dtype: type):
    def typed(name: str | None = None, max_tokens: int | None = None, n: int | None = None,
              stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
              stop_regex: str | list[str] | None = None, temperature: float | None = None,
              top_p: float | None = None, top_k: int | None = None, min_p: float | None = None,
              frequency_penalty: float | None = None, presence_penalty: float | None = None,
              ignore_eos: bool | None = None, return_logprob: bool | None = None,
              logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
              return_text_in_logprobs: bool | None = None) -> Gen:
        return Gen(name, max_tokens, None, n, stop, stop_token_ids, stop_regex, temperature, top_p, top_k, min_p,
                   frequency_penalty, presence_penalty, ignore_eos, return_logprob, logprob_start_len,
                   top_logprobs_num, return_text_in_logprobs, dtype)

    typed.__name__ = f"gen_{'int' if dtype is int else 'string'}"
    typed.__doc__ = f"gen(..., dtype={dtype.__name__}): the text of {'an integer' if dtype is int else 'a quoted string'}."
    return typed


gen_int = _typed_gen(int)
gen_string = _typed_gen(str)


def select(name: str | None = None, choices: list[str] | None = None, temperature: float = 0.0,
           choices_method: ChoicesMethod = token_length_normalized) -> Select:
    """Append the choice the model finds most likely (by `choices_method`), stored in `name`."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("select needs a non-empty list of strings as choices")
    if temperature > 1e-5:
        raise ValueError(f"select scores its choices by logprob; temperature must be 0, got {temperature}")
    if not isinstance(choices_method, ChoicesMethod):
        raise ValueError("choices_method must be sgl.token_length_normalized, sgl.greedy_token_selection or "
                         "sgl.unconditional_likelihood_normalized")
    return Select(name, list(choices), temperature, choices_method)


def image(source: str | bytes) -> Image:
    """An image from a file path, an http(s) URL, or the file's bytes."""
    import io

    from PIL import Image as PILImage

    if isinstance(source, bytes):
        data = source
    elif isinstance(source, str) and source.startswith(("http://", "https://")):
        import urllib.request

        with urllib.request.urlopen(source, timeout=30) as r:
            data = r.read()
    elif isinstance(source, str):
        with open(source, "rb") as f:
            data = f.read()
    else:
        raise ValueError(f"image takes a path, a URL or bytes; got {type(source).__name__}")
    try:
        with PILImage.open(io.BytesIO(data)) as im:
            fmt = im.format or "PNG"
    except Exception as e:
        raise ValueError(f"not a readable image: {e}") from None
    return Image(data, f"image/{fmt.lower()}")


def video(path: str, num_frames: int) -> Expr:
    """Video input: not supported yet by any sgjax backend."""
    raise NotImplementedError(f"sgl.video({path!r}, {num_frames}): sgjax serves no video model yet; pass frames "
                              "as sgl.image(...) to a vision model instead")


def separate_reasoning(expr: Any = None, model_type: str | None = None) -> Seq:
    """Run expr, then move each of its gens' reasoning (the think block) to `<name>_reasoning_content`."""
    names = []

    def collect(e):
        if isinstance(e, (Gen, Select)):
            if not e.name:
                raise ValueError("separate_reasoning needs a named gen (its reasoning goes to <name>_reasoning_content)")
            names.append(e.name)
        elif isinstance(e, list):
            for x in e:
                collect(x)

    collect(expr)
    if model_type not in REASONING_FORMATS:
        raise ValueError(f"separate_reasoning: unknown model_type {model_type!r}; known: "
                         f"{sorted(k for k in REASONING_FORMATS if k)} (or None for <think> tags)")
    return Seq([expr, SeparateReasoning(names, model_type)])


def _role(role: str, *content: Any) -> Seq:
    return Seq([RoleBegin(role), *content, RoleEnd(role)])


def system(*content: Any) -> Seq:
    return _role("system", *content)


def user(*content: Any) -> Seq:
    return _role("user", *content)


def assistant(*content: Any) -> Seq:
    return _role("assistant", *content)


def system_begin() -> RoleBegin:
    return RoleBegin("system")


def system_end() -> RoleEnd:
    return RoleEnd("system")


def user_begin() -> RoleBegin:
    return RoleBegin("user")


def user_end() -> RoleEnd:
    return RoleEnd("user")


def assistant_begin() -> RoleBegin:
    return RoleBegin("assistant")


def assistant_end() -> RoleEnd:
    return RoleEnd("assistant")
