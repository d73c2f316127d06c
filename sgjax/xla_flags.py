"""Opt-in XLA flags, set before JAX starts its GPU backend (each only if the user's XLA_FLAGS lack it).

`--xla_gpu_command_buffer_update_mode=SKIP_TEMP`: XLA runs each compiled step as CUDA graphs
("command buffers") and, by default, rewrites every graph node whose buffer addresses moved since the
last run; a step's temporaries move every run, so the host spent ~5 ms enqueueing each step. With
SKIP_TEMP the temporaries keep fixed virtual addresses (XLA switches to its VMM allocator): enqueueing
took ~2.3 ms and constrained decoding, whose masks wait on the host, ran 1.5x faster (BENCHMARKS.md,
session 5). Only for CUDA builds of jaxlib: a CPU build does not know the option.

Opt-in (SGJAX_XLA_SKIP_TEMP=1) because the VMM allocator reports no memory limit, so the KV pool
cannot be sized from free memory: give the engine `num_pages` (the engine says so otherwise), and
leave room for sampling's temporaries (8.6 GB at 1024 running requests).
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


def configure() -> None:
    """Apply the defaults to this process's XLA_FLAGS (before JAX's first use of the GPU)."""
    if os.environ.get("SGJAX_XLA_SKIP_TEMP") != "1":
        return
    flags = with_defaults(os.environ.get("XLA_FLAGS", ""), has_cuda_jaxlib())
    if flags:
        os.environ["XLA_FLAGS"] = flags
