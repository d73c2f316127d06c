"""Attention backends. Each exposes `attention(q, k, v, k_pages, v_pages, meta, *, scale,
sliding_window, softcap) -> (out, k_pages, v_pages)`: it writes this step's K/V and attends."""

from __future__ import annotations

from typing import Callable

from sgjax.kernels.metadata import AttentionMetadata

BACKENDS = ("reference",)


def get_attention_backend(name: str) -> Callable:
    """The attention function of backend `name`."""
    if name == "reference":
        from sgjax.kernels import reference

        return reference.attention
    raise ValueError(f"unknown attention backend {name!r}; choose from {BACKENDS}")


__all__ = ["AttentionMetadata", "BACKENDS", "get_attention_backend"]
