"""The module-level calls of SGLang's frontend beside the expressions: the default backend, flush_cache,
get_server_info, and the in-process backends Runtime and Engine."""

from __future__ import annotations

import weakref

from sgjax.lang.backends import Backend, EngineBackend
from sgjax.lang.global_config import global_config

_wrapped: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # Engine -> its EngineBackend


def set_default_backend(backend) -> None:
    """The backend programs use when run() is not given one (an sgjax Engine is taken as is)."""
    global_config.default_backend = backend


def get_default_backend():
    return global_config.default_backend


def backend_of(backend=None) -> Backend:
    """The backend to run on: the one given or the default; an Engine is wrapped, a Runtime unwrapped."""
    backend = backend if backend is not None else global_config.default_backend
    if backend is None:
        raise ValueError("no backend: pass backend= or call sgl.set_default_backend(...) first")
    if isinstance(backend, Backend):
        return backend
    if hasattr(backend, "endpoint"):
        return backend_of(backend.endpoint)
    if hasattr(backend, "make_requests") and hasattr(backend, "tokenizer"):  # an sgjax Engine
        if backend not in _wrapped:
            _wrapped[backend] = EngineBackend(backend)
        return _wrapped[backend]
    raise TypeError(f"not a backend: {type(backend).__name__} (use sgl.RuntimeEndpoint, sgl.OpenAI, sgl.Runtime "
                    "or an sgjax Engine)")


def flush_cache(backend=None) -> bool:
    """Empty the backend's prefix cache; False with no backend or while requests run."""
    if backend is None and global_config.default_backend is None:
        return False
    return backend_of(backend).flush_cache()


def get_server_info(backend=None) -> dict | None:
    """The server's (or in-process engine's) information; None with no backend."""
    if backend is None and global_config.default_backend is None:
        return None
    return backend_of(backend).get_server_info()


def Runtime(model_path: str, **engine_args) -> EngineBackend:  # noqa: N802 (SGLang's name)
    """An engine in this process as a backend, with shutdown(); engine_args are EngineArgs fields."""
    from sgjax.engine import Engine as _Engine

    return EngineBackend(_Engine(model_path, **engine_args), owns_engine=True)


def Engine(model_path: str, **engine_args):  # noqa: N802 (SGLang's name)
    """sgjax's Engine (sgjax.engine.Engine); programs take it as a backend as it is."""
    from sgjax.engine import Engine as _Engine

    return _Engine(model_path, **engine_args)
