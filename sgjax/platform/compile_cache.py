"""JAX's persistent compilation cache, where every entry point turns it on: a restart then loads the compiled
programs instead of compiling them again."""

from __future__ import annotations

import jax


def enable_compile_cache(directory: str) -> None:
    """Cache every compiled program in `directory` ('' leaves the cache off)."""
    if not directory:
        return
    jax.config.update("jax_compilation_cache_dir", directory)
    # Every program, not only those that took JAX's default second to compile: on a CPU the sampling
    # variants compile in less, and would otherwise be compiled again at every start.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
