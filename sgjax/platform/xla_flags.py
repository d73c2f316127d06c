"""sgjax's XLA flags, set before JAX starts its GPU backend (each only if the user's XLA_FLAGS lack it).

`--xla_gpu_command_buffer_update_mode=SKIP_TEMP`: XLA runs each compiled step as CUDA graphs
("command buffers") and, by default, rewrites every graph node whose buffer addresses moved since the
last run; a step's temporaries move every run, so the host spent ~5-6 ms enqueueing each step. With
SKIP_TEMP the temporaries keep fixed virtual addresses (XLA switches to its VMM allocator): enqueueing
takes ~2-4 ms. Only for CUDA builds of jaxlib: a CPU build does not
know the option.

On by default; SGJAX_XLA_SKIP_TEMP=0 turns it off. The VMM allocator reports no memory limit, so the
engine sizes its KV pool from the CUDA driver's figures instead (sgjax/platform/device_memory.py).
"""

from __future__ import annotations

import importlib.metadata
import os

GPU_FLAGS = {"xla_gpu_command_buffer_update_mode": "SKIP_TEMP"}


def with_defaults(xla_flags: str, cuda: bool) -> str:
    """XLA_FLAGS with sgjax's defaults appended for flags it does not set already."""
    if not cuda:
        return xla_flags
    extra = [f"--{name}={value}" for name, value in GPU_FLAGS.items() if f"--{name}=" not in xla_flags]
    return " ".join([xla_flags.strip(), *extra]).strip()


def has_cuda_jaxlib() -> bool:
    """Whether a CUDA plugin of jaxlib is installed (jax-cuda12-plugin, jax-cuda13-pjrt, ...)."""
    return any((dist.metadata["Name"] or "").lower().replace("_", "-").startswith("jax-cuda")
               for dist in importlib.metadata.distributions())


def configure(environ=os.environ, cuda: bool | None = None) -> None:
    """Apply the defaults to this process's XLA_FLAGS (before JAX's first use of the GPU)."""
    if environ.get("SGJAX_XLA_SKIP_TEMP", "1") == "0":
        return
    flags = with_defaults(environ.get("XLA_FLAGS", ""), has_cuda_jaxlib() if cuda is None else cuda)
    if flags:
        environ["XLA_FLAGS"] = flags
