"""@function programs and how they run: one state per call, in threads for batches and streams."""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import threading

from sgjax.lang.state import ProgramState

_default_backend = None


def set_default_backend(backend) -> None:
    """The backend programs use when run() is not given one."""
    global _default_backend
    _default_backend = backend


def get_default_backend():
    return _default_backend


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        params = list(inspect.signature(func).parameters)
        if not params:
            raise TypeError(f"{func.__name__}: a program's first argument is its state (def f(s, ...))")
        self.arg_names = params[1:]
        functools.update_wrapper(self, func)

    def _state(self, backend, stream: bool) -> ProgramState:
        backend = backend or _default_backend
        if backend is None:
            raise ValueError("no backend: pass backend= or call sgjax.set_default_backend(...) first")
        return ProgramState(backend, num_api_spec_tokens=self.num_api_spec_tokens, stream=stream)

    def _execute(self, state: ProgramState, args, kwargs) -> None:
        try:
            state.ret_value = self.func(state, *args, **kwargs)
        except BaseException as e:
            state._finish(e)
            raise
        state._finish()

    def run(self, *args, backend=None, stream: bool = False, **kwargs) -> ProgramState:
        """Run the program; with stream=True it runs in a thread and the state is returned at once
        (read it with state.text_iter(), or state.sync() to wait)."""
        state = self._state(backend, stream)
        if not stream:
            self._execute(state, args, kwargs)
            return state

        def work():
            try:
                self._execute(state, args, kwargs)
            except BaseException:
                pass  # kept in the state; text_iter() and sync() raise it

        threading.Thread(target=work, daemon=True, name=f"sgl-{self.func.__name__}").start()
        return state

    def run_batch(self, batch_kwargs: list[dict], *, backend=None, num_threads: int | str = "auto",
                  progress_bar: bool = False) -> list[ProgramState]:
        """Run the program once per dict of arguments, num_threads at a time; states in input order."""
        if num_threads == "auto":
            num_threads = max(1, min(64, len(batch_kwargs)))
        states = [self._state(backend, False) for _ in batch_kwargs]
        with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
            futures = [pool.submit(self._execute, st, (), kw) for st, kw in zip(states, batch_kwargs)]
            done = concurrent.futures.as_completed(futures)
            if progress_bar:
                from tqdm.auto import tqdm

                done = tqdm(done, total=len(futures), desc=self.func.__name__)
            for future in done:
                future.result()
        return states

    def __call__(self, *args, **kwargs) -> ProgramState:
        return self.run(*args, **kwargs)


def function(func=None, *, num_api_spec_tokens: int | None = None):
    """Decorator: `@function` or `@function(num_api_spec_tokens=64)`."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens)
