"""Attention backends. Each exposes `attention(q, k, v, k_pages, v_pages, meta, *, scale,
sliding_window, softcap) -> (out, k_pages, v_pages)`: it writes this step's K/V and attends.
Steps whose metadata groups sequences behind shared prefixes (`meta.shared`) are only planned for
backends that read such a prefix once (`reads_shared_prefixes`: the GPU kernels); the others ignore it.

- "pallas": the Pallas kernels for the platform (GPU: kernels/gpu, where Hopper GPUs serve long prefill
  chunks with a Mosaic GPU kernel and the rest with a Triton one; TPU: kernels/tpu); where there is none
  (CPU) `resolve_backend` falls back to "reference" with a warning.
- "reference": kernels/reference.py, pure jnp; the definition the kernels are tested against.
- "pallas_interpret" / "pallas_tpu_interpret": the GPU (Triton) / TPU kernel in Pallas' interpreters, so
  CPU tests can run them inside the engine (the Mosaic GPU interpreter is too slow for whole engine runs:
  that kernel and the split between the two are tested on their own).
"""

from __future__ import annotations

import functools
import logging
from typing import Callable

import jax

from sgjax.kernels.metadata import AttentionMetadata

BACKENDS = ("pallas", "reference", "pallas_interpret", "pallas_tpu_interpret")
KERNEL_PLATFORMS = ("gpu", "tpu")
logger = logging.getLogger(__name__)


def resolve_backend(name: str, page_size: int | None = None) -> str:
    """The backend that will really run for `name` on this platform (warns when it differs)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "pallas":
        platform = jax.default_backend()
        if platform not in KERNEL_PLATFORMS:
            logger.warning("no Pallas attention kernel for platform %r yet; using the reference attention", platform)
            return "reference"
        if page_size is not None and page_size & (page_size - 1):
            logger.warning("the Pallas attention kernel needs a power-of-two page size (got %d); using the "
                           "reference attention", page_size)
            return "reference"
        if platform == "tpu" and page_size is not None and page_size % 8:
            logger.warning("the TPU attention kernel needs a page size that is a multiple of 8 (got %d); using the "
                           "reference attention", page_size)
            return "reference"
    return name


def reads_shared_prefixes(name: str) -> bool:
    """Whether backend `name` (as resolved) reads shared prefixes once per group (`meta.shared`): the GPU
    kernels. The others attend over each sequence's whole page table and ignore the grouping."""
    return name == "pallas_interpret" or (name == "pallas" and jax.default_backend() == "gpu")


def triton_kernel_mode(name: str) -> str | None:
    """How the Triton kernels outside attention (the fused residual add + norm, the greedy LM head, the
    top-k / top-p cut) run with backend `name` (as resolved): "gpu" on a lone GPU with the Pallas kernels,
    "interpret" with "pallas_interpret" (CPU tests), else None (plain jnp). Meshes of several devices get
    None: those kernels have no sharding rule."""
    if name == "pallas_interpret":
        return "interpret"
    if name == "pallas" and jax.default_backend() == "gpu" and jax.device_count() == 1:
        return "gpu"
    return None


def get_attention_backend(name: str) -> Callable:
    """The attention function of backend `name`."""
    from sgjax.kernels import reference

    if name == "reference":
        return reference.attention
    if name == "pallas":
        return functools.partial(_paged_kernel_attention, platform=jax.default_backend(), interpret=False)
    if name == "pallas_interpret":
        return functools.partial(_paged_kernel_attention, platform="gpu", interpret=True)
    if name == "pallas_tpu_interpret":
        return functools.partial(_paged_kernel_attention, platform="tpu", interpret=True)
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")


def _paged_kernel_attention(q, k, v, k_pages, v_pages, meta: AttentionMetadata, *, platform: str, interpret: bool,
                            **kwargs):
    from sgjax.kernels.reference import write_kv

    if platform == "tpu":
        from sgjax.kernels.tpu.ragged_paged_attention import ragged_paged_attention
    else:
        from sgjax.kernels.gpu.attention import paged_attention as ragged_paged_attention

    # The write is a scatter into the donated pool beside the kernel: XLA does it in place.
    k_pages, v_pages = write_kv(k_pages, v_pages, k, v, meta.slot_mapping)
    return ragged_paged_attention(q, k_pages, v_pages, meta, interpret=interpret, **kwargs), k_pages, v_pages


__all__ = ["AttentionMetadata", "BACKENDS", "get_attention_backend", "reads_shared_prefixes", "resolve_backend"]
