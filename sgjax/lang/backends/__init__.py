"""Where a program's gens and selects run: in-process, over the native API, or any OpenAI endpoint."""

from sgjax.lang.backends.base import Backend
from sgjax.lang.backends.engine import EngineBackend
from sgjax.lang.backends.openai import OpenAI
from sgjax.lang.backends.runtime_endpoint import RuntimeEndpoint

__all__ = ["Backend", "EngineBackend", "OpenAI", "RuntimeEndpoint"]
