"""ProgramState: the text of a running program, its variables and chat messages, and how each
expression added to it is executed against a backend.

`s += expr` runs expr at once (a gen calls the backend and appends the generated text), so plain
Python control flow can read `s["name"]` on the next line. `s.fork(n)` copies the state into n
branches that run their additions in parallel threads; their prompts share the text before the fork,
which the server's radix cache holds once.

A program run with stream=True records each piece of text as it is appended (with its gen's meta
information so far); text_iter / text_async_iter read them, any number of times, while the program runs.

Errors are SGLang's: an expression that fails (a backend error, a role closed that is not open, a gen the
backend cannot honour) is kept in the state, with a warning, and the program's later expressions are dropped;
run() returns the state and state.error() has the exception. Reading a variable the failure left unset
raises KeyError in the program, which run() raises like any other error of the program's own Python code.

API speculative execution (`@function(num_api_spec_tokens=N)` with an OpenAI-style backend): a gen
asks for N tokens without its stop string; the text after the stop is kept, and the constant text and
gens that follow are matched against it instead of calling the API again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import copy
import dataclasses
import threading
import warnings
from collections.abc import AsyncIterator, Iterator

from sgjax.lang.primitives import (Gen, Image, RoleBegin, RoleEnd, Select, SeparateReasoning, Seq, VarScopeBegin,
                                   VarScopeEnd, assistant, system, user)
from sgjax.lang.sampling import SamplingDefaults, resolve


@dataclasses.dataclass
class Prompt:
    """What a backend sees of the state at a gen or select."""
    text: str  # everything so far, with role markers
    messages: list[dict]  # finished messages, then the open one ({"role", "content", "images"})
    role: str | None  # the open role, if any


class ProgramState:
    def __init__(self, backend, *, defaults: SamplingDefaults | None = None, num_api_spec_tokens: int | None = None,
                 stream: bool = False):
        self.backend = backend
        self._defaults = defaults or SamplingDefaults()
        self._text = ""
        self._vars: dict[str, object] = {}
        self._meta: dict[str, dict] = {}
        self._messages: list[dict] = []
        self._role: str | None = None
        self._role_start = 0
        self._images: list[Image] = []
        self._scopes: dict[str, int] = {}  # open var_scope -> where its text starts
        self._fork_start = 0  # where a fork branch's own text starts
        self._spec_tokens = num_api_spec_tokens
        self._spec = ""  # generated text not yet matched by the program
        self._spec_meta: dict = {}  # the meta information of the call that produced it
        self._stream = stream
        self._chunks: list[tuple[str, str | None, dict | None]] = []  # (text, variable, its meta so far)
        self._changed = threading.Condition()
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

    def get_var(self, name: str):
        if name not in self._vars and self._stream:
            self._done.wait()  # a streamed program may still be producing it
        if name not in self._vars:
            if self._error is not None:
                raise KeyError(f"variable {name!r} was not set: the program failed with {self._error!r}") \
                    from self._error
            raise KeyError(f"no variable {name!r}; the program set {sorted(self._vars)}")
        return self._vars[name]

    def set_var(self, name: str, value) -> None:
        self._vars[name] = value

    __getitem__ = get_var
    __setitem__ = set_var

    def __contains__(self, name: str) -> bool:
        return name in self._vars

    def get_meta_info(self, name: str) -> dict | None:
        """The backend's meta information of the gen or select that set `name` (tokens, logprobs...)."""
        if name not in self._meta and self._stream:
            self._done.wait()
        return self._meta.get(name)

    def sync(self) -> "ProgramState":
        """Wait for a program started with stream=True to end (its error, if any, is in error())."""
        self._done.wait()
        return self

    def error(self) -> BaseException | None:
        """The exception the program ended with (after waiting for it to end), or None."""
        self._done.wait()
        return self._error

    def text_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> Iterator:
        """The text as it is produced (only variable `var_name`'s, if given); with return_meta_data,
        (text, meta information of its gen so far) pairs. Without stream=True: the whole text at once. It ends
        where the program ends, failed or not (see error())."""
        if not self._stream:
            text = self._text if var_name is None else self.get_var(var_name)
            yield (text, self.get_meta_info(var_name) if var_name else None) if return_meta_data else text
            return
        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: len(self._chunks) > seen or self._done.is_set())
                new, finished = self._chunks[seen:], self._done.is_set()
            seen += len(new)
            for text, var, meta in new:
                if var_name is None or var == var_name:
                    yield (text, meta) if return_meta_data else text
            if finished and seen == len(self._chunks):
                break

    async def text_async_iter(self, var_name: str | None = None, return_meta_data: bool = False) -> AsyncIterator:
        """text_iter for asyncio: waits in an executor thread, never blocking the event loop."""
        pieces, end = self.text_iter(var_name, return_meta_data), object()
        loop = asyncio.get_running_loop()
        while (item := await loop.run_in_executor(None, next, pieces, end)) is not end:
            yield item

    # ---- roles and scopes as methods, as SGLang's state has them ----------------------------
    def _role_scope(self, make, expr):
        if expr is not None:
            self += make(expr)
            return None
        return self._open_role(make)

    @contextlib.contextmanager
    def _open_role(self, make):
        begin, end = make()[0], make()[-1]
        self += begin
        yield
        self += end

    def system(self, expr=None):
        """s.system(expr) adds a system message; `with s.system():` wraps what is added inside."""
        return self._role_scope(system, expr)

    def user(self, expr=None):
        return self._role_scope(user, expr)

    def assistant(self, expr=None):
        return self._role_scope(assistant, expr)

    @contextlib.contextmanager
    def var_scope(self, name: str):
        """`with s.var_scope("x"):` sets variable x to the text added inside."""
        self += VarScopeBegin(name)
        yield
        self += VarScopeEnd(name)

    # ---- executing ---------------------------------------------------------------------------
    def __iadd__(self, expr) -> "ProgramState":
        if expr is None:
            raise ValueError("cannot add None to a program state")
        if self._error is None:  # after a failure the program's later expressions are dropped
            try:
                self._execute(expr)
            except Exception as e:
                self._fail(e)
        return self

    def _fail(self, error: Exception) -> None:
        warnings.warn(f"the program failed: {error!r} (kept in state.error(); its later expressions are skipped)",
                      stacklevel=3)
        with self._changed:
            self._error = error
            self._changed.notify_all()

    def fork(self, size: int = 1, position_ids_offset: list[int] | None = None) -> "ForkGroup":
        """size copies of this state; `forks += expr` runs expr on all of them in parallel."""
        if size < 1:
            raise ValueError("fork needs size >= 1")
        if position_ids_offset is not None:
            raise ValueError("fork's position_ids_offset is not supported by sgjax")
        return ForkGroup((self._copy() for _ in range(int(size))), self)

    @contextlib.contextmanager
    def copy(self):
        """`with s.copy() as t:` a branch whose new variables join back into s (as lists) at the end."""
        group = self.fork(1)
        try:
            yield group[0]
        finally:
            group.join()

    def _copy(self) -> "ProgramState":
        twin = ProgramState(self.backend, defaults=self._defaults, num_api_spec_tokens=self._spec_tokens)
        for attr in ("_text", "_role", "_role_start", "_spec", "_spec_meta"):
            setattr(twin, attr, getattr(self, attr))
        twin._vars, twin._meta, twin._scopes = dict(self._vars), dict(self._meta), dict(self._scopes)
        twin._messages, twin._images = copy.deepcopy(self._messages), list(self._images)
        twin._fork_start = len(self._text)
        twin._done.set()  # a branch runs its additions as they are made: it is never waiting to finish
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
            if self.backend.image_placeholder:  # the model's image tokens, where the image is in the text
                self._append(self.backend.image_placeholder)
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
        elif isinstance(expr, VarScopeBegin):
            self._scopes[expr.name] = len(self._text)
        elif isinstance(expr, VarScopeEnd):
            if expr.name not in self._scopes:
                raise ValueError(f"var_scope {expr.name!r} ended without beginning")
            self._vars[expr.name] = self._text[self._scopes.pop(expr.name):]
        elif isinstance(expr, SeparateReasoning):
            for name in expr.names:
                self._separate_reasoning(name, expr)
        else:
            raise TypeError(f"cannot add {type(expr).__name__} to a program state")

    def _append(self, text: str, var: str | None = None, meta: dict | None = None, spec_checked: bool = False) -> None:
        if not spec_checked and var is None and self._spec:
            # Constant text: consume it from the speculated text, or drop the speculation.
            self._spec = self._spec[len(text):] if self._spec.startswith(text) else ""
        self._text += text
        if self._stream and text:
            with self._changed:
                self._chunks.append((text, var, meta))
                self._changed.notify_all()

    def _prompt(self) -> Prompt:
        messages = [dict(m) for m in self._messages]
        if self._role is not None:
            messages.append({"role": self._role, "content": self._text[self._role_start:], "images": self._images})
        return Prompt(self._text, messages, self._role)

    def _set(self, name: str | None, value, meta: dict) -> None:
        if name is not None:
            self._vars[name] = value
            self._meta[name] = meta

    def _gen(self, expr: Gen) -> None:
        gen = resolve(expr, self._defaults)
        self.backend.check(gen)
        if self._spec_tokens and getattr(self.backend, "supports_speculation", False):
            return self._gen_speculative(gen)
        if self._stream:
            pieces = []
            for delta, meta in self.backend.stream(self._prompt(), gen):
                pieces.append(delta)
                if gen.name is not None:
                    self._meta[gen.name] = meta
                self._append(delta, var=gen.name or "", meta=meta)
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
        index, meta = self.backend.select(self._prompt(), sel)
        self._append(sel.choices[index], var=sel.name or "", meta=meta)
        self._set(sel.name, sel.choices[index], meta)

    def _separate_reasoning(self, name: str, expr: SeparateReasoning) -> None:
        """Move the think block of variable `name` to `<name>_reasoning_content`, in the text too."""
        full = self._vars[name]
        reasoning, answer = expr.split(full)
        at = self._text.rfind(full)
        if at >= 0:
            self._text = self._text[:at] + answer + self._text[at + len(full):]
        self._vars[name], self._vars[f"{name}_reasoning_content"] = answer, reasoning

    def _finish(self, error: BaseException | None = None) -> None:
        with self._changed:
            self._error = self._error or error
            self._done.set()
            self._changed.notify_all()

    def __repr__(self) -> str:
        return f"ProgramState({self._text!r})"


class ForkGroup(list):
    """Branches of a fork: `forks += expr` runs expr on every branch at once; `forks += lambda i: ...` or a
    list gives each branch its own expression."""

    def __init__(self, branches, parent: ProgramState | None = None):
        super().__init__(branches)
        self.parent = parent

    def __iadd__(self, expr) -> "ForkGroup":
        if callable(expr):
            exprs = [expr(i) for i in range(len(self))]
        elif isinstance(expr, (list, tuple)) and not isinstance(expr, Seq):
            if len(expr) != len(self):
                raise ValueError(f"{len(expr)} expressions for {len(self)} fork branches")
            exprs = list(expr)
        else:
            exprs = [expr] * len(self)
        if len(self) == 1:
            self[0] += exprs[0]
            return self
        with concurrent.futures.ThreadPoolExecutor(len(self)) as pool:
            # each branch keeps its own error, as SGLang's forks do
            for future in [pool.submit(branch.__iadd__, e) for branch, e in zip(self, exprs)]:
                future.result()
        return self

    def join(self, mode: str = "gather_variable") -> None:
        """Bring the branches back into the state they forked from: their new variables as lists
        ("gather_variable"), or their new text appended in order ("concate_and_append")."""
        if self.parent is None:
            raise ValueError("join needs the fork group of a state (s.fork(n))")
        if mode == "gather_variable":
            before = set(self.parent._vars)
            for branch in self:
                for name in branch._vars.keys() - before:
                    self.parent._vars.setdefault(name, []).append(branch._vars[name])
        elif mode == "concate_and_append":
            for branch in self:
                self.parent._append(branch._text[branch._fork_start:])
        else:
            raise ValueError(f"join mode must be 'gather_variable' or 'concate_and_append'; got {mode!r}")
