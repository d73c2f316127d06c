"""ProgramState: the text of a running program, its variables and chat messages, and how each
expression added to it is executed against a backend.

`s += expr` runs expr at once (a gen calls the backend and appends the generated text), so plain
Python control flow can read `s["name"]` on the next line. `s.fork(n)` copies the state into n
branches that run their additions in parallel threads; their prompts share the text before the fork,
which the server's radix cache holds once.

API speculative execution (`@function(num_api_spec_tokens=N)` with an OpenAI-style backend): a gen
asks for N tokens without its stop string; the text after the stop is kept, and the constant text and
gens that follow are matched against it instead of calling the API again.
"""

from __future__ import annotations

import concurrent.futures
import copy
import dataclasses
import queue
import threading
from collections.abc import Iterator

from sgjax.lang.primitives import Gen, Image, RoleBegin, RoleEnd, Select, Seq


@dataclasses.dataclass
class Prompt:
    """What a backend sees of the state at a gen or select."""
    text: str  # everything so far, with role markers
    messages: list[dict]  # finished messages, then the open one ({"role", "content", "images"})
    role: str | None  # the open role, if any


class ProgramState:
    def __init__(self, backend, *, num_api_spec_tokens: int | None = None, stream: bool = False):
        self.backend = backend
        self._text = ""
        self._vars: dict[str, object] = {}
        self._meta: dict[str, dict] = {}
        self._messages: list[dict] = []
        self._role: str | None = None
        self._role_start = 0
        self._images: list[Image] = []
        self._spec_tokens = num_api_spec_tokens
        self._spec = ""  # generated text not yet matched by the program
        self._spec_meta: dict = {}  # the meta information of the call that produced it
        self._stream: queue.Queue | None = queue.Queue() if stream else None
        self._done = threading.Event()
        self._error: BaseException | None = None
        self.ret_value = None  # what the program function returned

    # ---- reading ---------------------------------------------------------------------------
    def text(self) -> str:
        return self._text

    def messages(self) -> list[dict]:
        """The chat so far as {"role", "content"} dicts (an open message included)."""
        out = [{"role": m["role"], "content": m["content"]} for m in self._messages]
        if self._role is not None:
            out.append({"role": self._role, "content": self._text[self._role_start:]})
        return out

    def __getitem__(self, name: str):
        if name not in self._vars and self._stream is not None:
            self.sync()  # a streamed program may still be producing it
        if name not in self._vars:
            raise KeyError(f"no variable {name!r}; the program set {sorted(self._vars)}")
        return self._vars[name]

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_meta_info(self, name: str) -> dict:
        """The backend's meta information of the gen or select that set `name` (tokens, cached tokens...)."""
        return self._meta[name]

    def sync(self) -> "ProgramState":
        """Wait for a program started with stream=True to end (re-raising its error)."""
        self._done.wait()
        if self._error is not None:
            raise self._error
        return self

    def text_iter(self, var_name: str | None = None) -> Iterator[str]:
        """The text as it is produced (only variable `var_name`'s, if given); needs run(stream=True)."""
        if self._stream is None:
            raise ValueError("text_iter needs a program run with stream=True")
        while True:
            item = self._stream.get()
            if item is None:
                break
            text, name = item
            if var_name is None or name == var_name:
                yield text
        if self._error is not None:
            raise self._error

    # ---- executing ---------------------------------------------------------------------------
    def __iadd__(self, expr) -> "ProgramState":
        self._execute(expr)
        return self

    def fork(self, n: int) -> "ForkGroup":
        """n copies of this state; `forks += expr` runs expr on all of them in parallel."""
        if n < 1:
            raise ValueError("fork needs n >= 1")
        return ForkGroup(self._copy() for _ in range(n))

    def _copy(self) -> "ProgramState":
        twin = ProgramState(self.backend, num_api_spec_tokens=self._spec_tokens)
        for attr in ("_text", "_role", "_role_start", "_spec", "_spec_meta"):
            setattr(twin, attr, getattr(self, attr))
        twin._vars, twin._meta = dict(self._vars), dict(self._meta)
        twin._messages, twin._images = copy.deepcopy(self._messages), list(self._images)
        return twin

    def _execute(self, expr) -> None:
        if expr is None:
            return
        if isinstance(expr, str):
            self._append(expr)
        elif isinstance(expr, (list, tuple, Seq)):
            for e in expr:
                self._execute(e)
        elif isinstance(expr, Gen):
            self._gen(expr)
        elif isinstance(expr, Select):
            self._select(expr)
        elif isinstance(expr, Image):
            if self._role is None:
                raise ValueError("an image must be inside a role, e.g. s += sgl.user(sgl.image(path) + 'text')")
            self._images.append(expr)
        elif isinstance(expr, RoleBegin):
            if self._role is not None:
                raise ValueError(f"{expr.role} message begun inside an open {self._role} message")
            self._append(self.backend.role_markers[expr.role][0])
            self._role, self._role_start, self._images = expr.role, len(self._text), []
        elif isinstance(expr, RoleEnd):
            if self._role != expr.role:
                raise ValueError(f"{expr.role}_end without a matching {expr.role}_begin (open: {self._role})")
            self._messages.append({"role": self._role, "content": self._text[self._role_start:],
                                   "images": self._images})
            self._role, self._images = None, []
            self._append(self.backend.role_markers[expr.role][1])
        else:
            raise TypeError(f"cannot add {type(expr).__name__} to a program state")

    def _append(self, text: str, var: str | None = None, spec_checked: bool = False) -> None:
        if not spec_checked and var is None and self._spec:
            # Constant text: consume it from the speculated text, or drop the speculation.
            self._spec = self._spec[len(text):] if self._spec.startswith(text) else ""
        self._text += text
        if self._stream is not None and text:
            self._stream.put((text, var))

    def _prompt(self) -> Prompt:
        messages = [dict(m) for m in self._messages]
        if self._role is not None:
            messages.append({"role": self._role, "content": self._text[self._role_start:], "images": self._images})
        return Prompt(self._text, messages, self._role)

    def _set(self, name: str | None, value, meta: dict) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta

    def _gen(self, gen: Gen) -> None:
        if self._spec_tokens and getattr(self.backend, "supports_speculation", False):
            return self._gen_speculative(gen)
        if self._stream is not None:
            pieces, meta = [], {}
            for delta, meta in self.backend.stream(self._prompt(), gen):
                pieces.append(delta)
                self._append(delta, var=gen.name or "")
            self._set(gen.name, "".join(pieces), meta)
            return
        text, meta = self.backend.generate(self._prompt(), gen)
        self._append(text, var=gen.name or "")
        self._set(gen.name, text, meta)

    def _gen_speculative(self, gen: Gen) -> None:
        stops = [gen.stop] if isinstance(gen.stop, str) else list(gen.stop or [])
        cuts = [self._spec.find(s) for s in stops if s in self._spec]
        if self._spec and cuts:  # this gen's answer is already in the speculated text
            text, meta = self._spec[:min(cuts)], self._spec_meta
            self._spec = self._spec[min(cuts):]
        else:
            wide = dataclasses.replace(gen, stop=None, max_tokens=max(gen.max_tokens, self._spec_tokens))
            out, meta = self.backend.generate(self._prompt(), wide)
            cuts = [out.find(s) for s in stops if s in out]
            end = min(cuts) if cuts else len(out)
            text, self._spec, self._spec_meta = out[:end], out[end:], meta
        self._append(text, var=gen.name or "", spec_checked=True)
        self._set(gen.name, text, meta)

    def _select(self, sel: Select) -> None:
        self._spec = ""
        index, meta = self.backend.select(self._prompt(), sel.choices)
        self._append(sel.choices[index], var=sel.name or "")
        self._set(sel.name, sel.choices[index], meta)

    def _finish(self, error: BaseException | None = None) -> None:
        self._error = error
        self._done.set()
        if self._stream is not None:
            self._stream.put(None)

    def __repr__(self) -> str:
        return f"ProgramState({self._text!r})"


class ForkGroup(list):
    """Branches of a fork: `forks += expr` runs expr on every branch at once."""

    def __iadd__(self, expr) -> "ForkGroup":
        if len(self) == 1:
            self[0] += expr
            return self
        with concurrent.futures.ThreadPoolExecutor(len(self)) as pool:
            for future in [pool.submit(branch._execute, expr) for branch in self]:
                future.result()
        return self
