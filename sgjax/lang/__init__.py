"""The frontend language: programs of generation calls (`import sgjax as sgl`).

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://localhost:30000"))
    print(qa.run(question="What is JAX?")["answer"])
"""

from sgjax.lang.backends import Backend, EngineBackend, OpenAI, RuntimeEndpoint
from sgjax.lang.primitives import (
    assistant,
    assistant_begin,
    assistant_end,
    gen,
    image,
    select,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
)
from sgjax.lang.program import SglFunction, function, get_default_backend, set_default_backend
from sgjax.lang.state import ForkGroup, ProgramState

__all__ = ["Backend", "EngineBackend", "ForkGroup", "OpenAI", "ProgramState", "RuntimeEndpoint", "SglFunction",
           "assistant", "assistant_begin", "assistant_end", "function", "gen", "get_default_backend", "image",
           "select", "set_default_backend", "system", "system_begin", "system_end", "user", "user_begin",
           "user_end"]
