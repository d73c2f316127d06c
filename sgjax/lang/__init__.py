"""The frontend language: programs of generation calls, SGLang's frontend API (`import sgjax as sgl`).

    @sgl.function
    def qa(s, question):
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("answer", max_tokens=64))

    sgl.set_default_backend(sgl.RuntimeEndpoint("http://localhost:30000"))
    print(qa.run(question="What is JAX?", temperature=0)["answer"])

Defaults and error handling are SGLang's: run() samples at temperature 1 unless told otherwise, and an error
while executing the program is kept in the state (state.error()) rather than raised. Differences: a gen's n
must be 1 (fork instead); video input raises until a video model is served.
"""

from sgjax.lang.api import (Engine, Runtime, flush_cache, get_default_backend, get_server_info,
                            set_default_backend)
from sgjax.lang.backends import Backend, EngineBackend, OpenAI, RuntimeEndpoint
from sgjax.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized
from sgjax.lang.global_config import global_config
from sgjax.lang.primitives import (assistant, assistant_begin, assistant_end, gen, gen_int, gen_string, image,
                                   select, separate_reasoning, system, system_begin, system_end, user, user_begin,
                                   user_end, video)
from sgjax.lang.program import SglFunction, function
from sgjax.lang.state import ForkGroup, ProgramState

__all__ = ["Backend", "Engine", "EngineBackend", "ForkGroup", "OpenAI", "ProgramState", "Runtime", "RuntimeEndpoint",
           "SglFunction", "assistant", "assistant_begin", "assistant_end", "flush_cache", "function", "gen",
           "gen_int", "gen_string", "get_default_backend", "get_server_info", "global_config",
           "greedy_token_selection", "image", "select", "separate_reasoning", "set_default_backend", "system",
           "system_begin", "system_end", "token_length_normalized", "unconditional_likelihood_normalized", "user",
           "user_begin", "user_end", "video"]
