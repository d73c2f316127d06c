"""@function programs and how they run: one state per call, in threads for batches and streams.

run() and run_batch() take SGLang's sampling arguments (max_new_tokens, temperature, stop, ...) as the
defaults of every gen in the program that does not set its own (sampling.py); their defaults are SGLang's.
A failed expression is kept in the state (state.error()); an exception of the program's own Python code is
raised by run() and run_batch(), as SGLang's are (state.py).
"""

from __future__ import annotations

import concurrent.futures
import functools
import inspect
import threading

from sgjax.lang.api import backend_of
from sgjax.lang.global_config import global_config
from sgjax.lang.sampling import SAMPLING_ARGS, SamplingDefaults
from sgjax.lang.state import ProgramState


def _defaults(arguments: dict) -> SamplingDefaults:
    """The sampling arguments among run()'s or run_batch()'s (their locals()); None leaves a field at its
    default."""
    return SamplingDefaults(**{k: v for k, v in arguments.items() if k in SAMPLING_ARGS and v is not None})


class SglFunction:
    def __init__(self, func, num_api_spec_tokens: int | None = None, bind_arguments: dict | None = None):
        self.func = func
        self.num_api_spec_tokens = num_api_spec_tokens
        self.bind_arguments = dict(bind_arguments or {})
        params = list(inspect.signature(func).parameters.values())
        if not params:
            raise TypeError(f"{func.__name__}: a program's first argument is its state (def f(s, ...))")
        self.arg_names = [p.name for p in params[1:]]
        self.arg_defaults = [p.default for p in params[1:] if p.default is not inspect.Parameter.empty]
        functools.update_wrapper(self, func)

    def bind(self, **kwargs) -> "SglFunction":
        """The program with some arguments fixed."""
        unknown = set(kwargs) - set(self.arg_names)
        if unknown:
            raise TypeError(f"{self.func.__name__} has no arguments {sorted(unknown)}")
        return SglFunction(self.func, self.num_api_spec_tokens, {**self.bind_arguments, **kwargs})

    def _state(self, backend, stream: bool, defaults: SamplingDefaults) -> ProgramState:
        return ProgramState(backend_of(backend), defaults=defaults, num_api_spec_tokens=self.num_api_spec_tokens,
                            stream=stream)

    def _execute(self, state: ProgramState, args, kwargs) -> None:
        try:
            state.ret_value = self.func(state, *args, **{**kwargs, **self.bind_arguments})
        except BaseException as e:
            state._finish(e)
            raise
        state._finish()
        if global_config.verbosity >= 2:
            print(state.text())

    def run(self, *args, max_new_tokens: int = 128, n: int = 1, stop: str | list[str] | None = None,
            stop_token_ids: list[int] | None = None, stop_regex: str | list[str] | None = None,
            temperature: float = 1.0, top_p: float = 1.0, top_k: int = -1, min_p: float = 0.0,
            frequency_penalty: float = 0.0, presence_penalty: float = 0.0, ignore_eos: bool = False,
            return_logprob: bool | None = None, logprob_start_len: int | None = None,
            top_logprobs_num: int | None = None, return_text_in_logprobs: bool | None = None,
            stream: bool = False, backend=None, use_thread: bool = True, **kwargs) -> ProgramState:
        """Run the program (its arguments in *args / **kwargs; the sampling arguments are every gen's
        defaults). With stream=True it runs in a thread and the state is returned at once (read it with
        state.text_iter(), or state.sync() to wait). use_thread is accepted for SGLang's signature."""
        defaults = _defaults(locals())
        state = self._state(backend, stream, defaults)
        if not stream:
            self._execute(state, args, kwargs)
            return state

        def work():
            try:
                self._execute(state, args, kwargs)
            except BaseException:
                pass  # kept in the state: text_iter(), sync() and error() give it

        threading.Thread(target=work, daemon=True, name=f"sgl-{self.func.__name__}").start()
        return state

    def run_batch(self, batch_kwargs: list[dict] | list[tuple], *, max_new_tokens: int = 128, n: int = 1,
                  stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None,
                  stop_regex: str | list[str] | None = None, temperature: float = 1.0, top_p: float = 1.0,
                  top_k: int = -1, min_p: float = 0.0, frequency_penalty: float = 0.0,
                  presence_penalty: float = 0.0, ignore_eos: bool = False, return_logprob: bool | None = None,
                  logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                  return_text_in_logprobs: bool | None = None, backend=None, num_threads: int | str = "auto",
                  progress_bar: bool = False, generator_style: bool = False):
        """Run the program once per dict (or tuple of positional values) of arguments, num_threads at a
        time; the states in input order (a generator of them with generator_style=True). A failed expression
        does not stop the others (its state's error() has it); the program's own Python exception is raised."""
        defaults = _defaults(locals())
        batch = [self._as_kwargs(args) for args in batch_kwargs]
        if num_threads == "auto":
            num_threads = 64
        num_threads = max(1, min(int(num_threads), len(batch) or 1))
        states = [self._state(backend, False, defaults) for _ in batch]
        runs = self._run_all(states, batch, num_threads, progress_bar)
        if generator_style:
            return runs
        for _ in runs:
            pass
        return states

    def _as_kwargs(self, args) -> dict:
        if isinstance(args, dict):
            return args
        if not isinstance(args, (list, tuple)) or not \
                len(self.arg_names) - len(self.arg_defaults) <= len(args) <= len(self.arg_names):
            raise TypeError(f"run_batch takes dicts of arguments or tuples of {self.func.__name__}'s "
                            f"{self.arg_names}; got {args!r}")
        return dict(zip(self.arg_names, args))

    def _run_all(self, states: list[ProgramState], batch: list[dict], num_threads: int, progress_bar: bool):
        """Runs the programs; yields each state, in input order, once it is done."""
        bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(states), desc=self.func.__name__)

        def one(state, kwargs):
            try:
                self._execute(state, (), kwargs)
            finally:
                if bar is not None:
                    bar.update()

        try:
            with concurrent.futures.ThreadPoolExecutor(num_threads) as pool:
                futures = [pool.submit(one, st, kw) for st, kw in zip(states, batch)]
                for future, state in zip(futures, states):
                    future.result()
                    yield state
        finally:
            if bar is not None:
                bar.close()

    def __call__(self, *args, **kwargs) -> ProgramState:
        return self.run(*args, **kwargs)


def function(func=None, *, num_api_spec_tokens: int | None = None):
    """Decorator: `@function` or `@function(num_api_spec_tokens=64)`."""
    if func is None:
        return lambda f: SglFunction(f, num_api_spec_tokens)
    return SglFunction(func, num_api_spec_tokens)
