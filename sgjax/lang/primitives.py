"""The expressions a program adds to its state: text, gen, select, image, and role markers.

They are plain data; ProgramState (state.py) executes them against a backend.
"""

from __future__ import annotations

import dataclasses
from typing import Any

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
    name: str | None
    max_tokens: int = 128
    stop: str | list[str] | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    ignore_eos: bool = False
    seed: int | None = None
    regex: str | None = None
    json_schema: str | dict | None = None
    choices: list[str] | None = None  # generated under a choices constraint (select picks by logprob)

    def sampling_params(self) -> dict:
        """The engine's SamplingParams fields for this call."""
        params = {"max_new_tokens": self.max_tokens, "stop": self.stop, "temperature": self.temperature,
                  "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                  "frequency_penalty": self.frequency_penalty, "presence_penalty": self.presence_penalty,
                  "ignore_eos": self.ignore_eos, "seed": self.seed, "regex": self.regex,
                  "json_schema": self.json_schema, "choices": self.choices}
        return {k: v for k, v in params.items() if v is not None}


@dataclasses.dataclass
class Select(Expr):
    name: str | None
    choices: list[str]


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


def gen(name: str | None = None, max_tokens: int = 128, stop: str | list[str] | None = None,
        temperature: float = 0.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
        frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
        seed: int | None = None, regex: str | None = None, json_schema: str | dict | None = None,
        choices: list[str] | None = None) -> Gen:
    """Generate text into variable `name` (greedy by default, as SGLang's frontend)."""
    return Gen(name, max_tokens, stop, temperature, top_p, top_k, min_p, frequency_penalty, presence_penalty,
               ignore_eos, seed, regex, json_schema, choices)


def select(name: str | None = None, choices: list[str] | None = None) -> Select:
    """Append the choice the model finds most likely (mean token logprob), stored in `name`."""
    if not choices or not all(isinstance(c, str) for c in choices):
        raise ValueError("select needs a non-empty list of strings as choices")
    return Select(name, list(choices))


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
