"""SGLang's own frontend language (PyPI `sglang`), imported without its server's heavy dependencies, to drive an
sgjax server as SGLang users do (tests/e2e/test_sglang_client.py).

`sglang` is installed with `pip install --no-deps sglang==0.5.23` plus the light packages its import needs
(the `test` extra). Importing it also imports torch, which the tests have, and Triton, which a CPU build of
torch does not bring: the frontend never runs a kernel, so Triton is replaced by the stub SGLang itself uses
where Triton does not exist (`sglang/_platform_stubs.py`, for macOS), loaded from the installed package's file.
"""

from __future__ import annotations

import importlib.util
import sys

INSTALL = "pip install --no-deps sglang==0.5.23"


def import_sglang():
    """The `sglang` module, with a Triton stub if Triton is missing."""
    if "sglang" in sys.modules:
        return sys.modules["sglang"]
    spec = importlib.util.find_spec("sglang")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"sglang is not installed: {INSTALL} (README's test command does)")
    if importlib.util.find_spec("triton") is None:
        path = f"{next(iter(spec.submodule_search_locations))}/_platform_stubs.py"
        stub_spec = importlib.util.spec_from_file_location("sglang_platform_stubs", path)
        stubs = importlib.util.module_from_spec(stub_spec)
        sys.modules[stub_spec.name] = stubs  # its dataclasses look their module up there
        stub_spec.loader.exec_module(stubs)
        sys.meta_path.insert(0, stubs._TritonFinder())
        triton = stubs._make_mock("triton")
        triton.__version__, triton.cdiv, triton.next_power_of_2, triton.Config = (
            "3.0.0", stubs._cdiv, stubs._next_power_of_2, stubs._Config)
    import sglang

    return sglang
