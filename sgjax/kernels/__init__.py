"""The kernels: `select(backend, page_size) -> Kernels`, called once at start-up, is the only place that
decides which kernel runs (models and the runner receive the record and never look at the platform).

Attention backends. Each exposes `attention(q, k, v, k_pages, v_pages, meta, *, scale,
sliding_window, softcap) -> (out, k_pages, v_pages)`: it writes this step's K/V and attends.
Steps whose metadata groups sequences behind shared prefixes (`meta.shared`) are only planned for
backends that read such a prefix once (`reads_shared_prefixes`: the GPU kernels); the others ignore it.

- "pallas": the kernels for the platform (GPU: kernels/gpu, where Hopper GPUs serve long prefill
  chunks with a Mosaic GPU kernel and the rest with a Triton one; TPU: kernels/tpu; CPU: "cpu"). With
  the GPU kernels on a lone GPU, the fused residual add + RMSNorm, the greedy LM head (head matmul, argmax
  and logsumexp in one kernel) and the top-k / top-p cut (no vocabulary sort) run as Triton kernels too.
- "cpu": kernels/cpu.py, jnp whose cost follows the step's longest sequence, not the context length.
- "reference": kernels/reference.py, pure jnp; the definition the kernels are tested against.
- "pallas_interpret" / "pallas_tpu_interpret": the GPU (Triton) / TPU kernel in Pallas' interpreters, so
  CPU tests can run them inside the engine (the Mosaic GPU interpreter is too slow for whole engine runs:
  that kernel and the split between the two are tested on their own).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from typing import Callable

import jax

from sgjax.kernels import cpu, reference
from sgjax.kernels.metadata import AttentionMetadata

BACKENDS = ("pallas", "cpu", "reference", "pallas_interpret", "pallas_tpu_interpret")
KERNEL_PLATFORMS = ("gpu", "tpu")
logger = logging.getLogger(__name__)


def resolve_backend(name: str, page_size: int | None = None) -> str:
    """The backend that will really run for `name` on this platform (warns when it differs)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")
    if name == "pallas":
        platform = jax.default_backend()
        if platform == "cpu":
            return "cpu"
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


def _reads_shared_prefixes(name: str) -> bool:
    """Whether backend `name` (as resolved) reads shared prefixes once per group (`meta.shared`): the GPU
    kernels. The others attend over each sequence's whole page table and ignore the grouping."""
    return name == "pallas_interpret" or (name == "pallas" and jax.default_backend() == "gpu")


def _triton_mode(name: str) -> str | None:
    """How the Triton kernels outside attention (the fused residual add + norm, the greedy LM head, the
    top-k / top-p cut) run with backend `name` (as resolved): "gpu" on a lone GPU with the Pallas kernels,
    "interpret" with "pallas_interpret" (CPU tests), else None (plain jnp). Meshes of several devices get
    None: those kernels have no sharding rule."""
    if name == "pallas_interpret":
        return "interpret"
    if name == "pallas" and jax.default_backend() == "gpu" and jax.device_count() == 1:
        return "gpu"
    return None


@dataclasses.dataclass(frozen=True)
class Kernels:
    """The kernels a model and its runner call, chosen once at start-up by `select`: nothing else looks at the
    platform. A None field means plain jnp (XLA's fusion) for that operation."""

    backend: str  # the attention backend that runs (BACKENDS), after falling back where it has no kernel
    # (q, k, v, k_pages, v_pages, meta, *, scale, sliding_window, softcap) -> (out, k_pages, v_pages)
    attention: Callable
    reads_shared_prefixes: bool = False  # whether `attention` reads a group's shared prefix once (meta.shared)
    # (x, h, weight, eps) -> (x + h, rmsnorm(x + h)) in one pass, or None where the kernel has no tiling
    add_rms_norm: Callable | None = None
    # (hidden [R, H], head [V, H], softcap) -> (argmax ids, their logprobs), or None where no tiling fits
    greedy_head: Callable | None = None
    # (scaled [B, V], top_k, top_p) -> [B, V] bool: tokens the top-k / top-p cut keeps, without sorting the vocabulary
    top_k_top_p_keep: Callable | None = None
    # Projections shaped for XLA's CPU dot (sgjax.models.layers.project): fused weights ([*out, in]) as one 2-D
    # matmul over the flattened weight, and 16-bit products accumulated in float32 over at least two rows.
    # Off elsewhere: a weight split over "tensor" along a later axis than its first could not stay split.
    cpu_matmuls: bool = False
    # A bfloat16 KV pool held as its raw bits (uint16), which `attention` reads and writes: XLA's CPU compiler
    # has no bfloat16 gather or scatter and converted the whole pool to float32 around each use.
    bf16_pool_as_bits: bool = False


def select(backend: str = "reference", page_size: int | None = None, *, fused_norm: bool = True,
           greedy_head: bool = True, filter_cut: bool = True) -> Kernels:
    """The kernels for attention backend `backend` on this platform (see the module docstring).

    `fused_norm`, `greedy_head`, `filter_cut` turn the Triton kernels outside attention off (plain jnp
    instead) for comparisons; the fused norm is also off with fp8 KV pools (Engine)."""
    name = resolve_backend(backend, page_size)
    mode = _triton_mode(name)
    interpret = mode == "interpret"
    return Kernels(
        backend=name,
        attention=get_attention_backend(name),
        reads_shared_prefixes=_reads_shared_prefixes(name),
        add_rms_norm=functools.partial(_fused_add_rms_norm, interpret=interpret) if mode and fused_norm else None,
        greedy_head=functools.partial(_greedy_head, interpret=interpret) if mode and greedy_head else None,
        top_k_top_p_keep=functools.partial(_top_k_top_p_keep, interpret=interpret) if mode and filter_cut else None,
        cpu_matmuls=name == "cpu",
        bf16_pool_as_bits=name == "cpu",
    )


REFERENCE = Kernels(backend="reference", attention=reference.attention)


def _fused_add_rms_norm(x, h, weight, eps, *, interpret: bool):
    from sgjax.kernels.gpu import add_rms_norm

    if not add_rms_norm.supports(x):
        return None
    return add_rms_norm.add_rms_norm(x, h, weight, eps=eps, interpret=interpret)


def _greedy_head(hidden, head, softcap, *, interpret: bool):
    from sgjax.kernels.gpu import greedy_head

    tiles = greedy_head.tiles_for(hidden.shape[0], *head.shape)
    if not tiles:
        return None
    return greedy_head.greedy_from_head(hidden, head, softcap, interpret=interpret, **tiles)


def _top_k_top_p_keep(scaled, top_k, top_p, *, interpret: bool):
    from sgjax.kernels.gpu import filter_cut

    cut = filter_cut.filter_cut(scaled, top_k, top_p, interpret=interpret)
    return filter_cut.ordered_key(scaled) >= cut[:, None]


def get_attention_backend(name: str) -> Callable:
    """The attention function of backend `name`."""
    if name == "reference":
        return reference.attention
    if name == "cpu":
        return cpu.attention
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


__all__ = ["AttentionMetadata", "BACKENDS", "REFERENCE", "Kernels", "get_attention_backend", "resolve_backend", "select"]
