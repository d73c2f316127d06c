"""Cascade attention's host half: which sequences of a step begin with the same KV pages.

Requests whose prompts begin alike hold the same radix-tree pages for that beginning (every page has
one owner, and a tree page one place in the tree, so two sequences with the same first page share a
path from the root). A step groups them in two passes:
1. `order_by_first_page` (per request, before the batch is built): sequences are grouped by their first
   page, largest groups first and contiguous, so each group's new tokens are one range of the batch;
2. `shared_prefix_metadata` (on the built page table, vectorised): each group's common prefix, the
   pages all members have alike before their first new token, checked page by page.
Backends that read a group's prefix once (kernels/gpu/shared_prefix.py) use the result; the others
ignore it. The common prefix is checked page by page, so grouping by first page alone can only cost
time (a shorter common prefix), never change a result.
"""

from __future__ import annotations

import collections
from typing import Hashable, Sequence

import numpy as np

from sgjax.kernels.metadata import SharedPrefixes

MIN_SHARED_TOKENS = 64  # a shorter common prefix is not worth a group: one key block of the GPU kernel


def order_by_first_page(keys: Sequence[Hashable | None], max_groups: int) -> tuple[list[int], list[int]]:
    """Sequences with equal keys (their first page; None: nothing cached to share) grouped together.

    Returns (order, group sizes): the batch order puts the up to `max_groups` largest groups of two or
    more first, each contiguous, in their members' original order; the other sequences follow in theirs."""
    counts = collections.Counter(k for k in keys if k is not None)
    chosen = [k for k, n in counts.most_common(max_groups) if n > 1]
    if not chosen:
        return list(range(len(keys))), []
    rank = {k: g for g, k in enumerate(chosen)}
    members: list[list[int]] = [[] for _ in chosen]
    rest = []
    for i, k in enumerate(keys):
        g = rank.get(k)
        (rest if g is None else members[g]).append(i)
    return [i for group in members for i in group] + rest, [len(group) for group in members]


def shared_prefix_metadata(page_table: np.ndarray, num_cached: np.ndarray, group_sizes: Sequence[int],
                           page_size: int, max_groups: int) -> SharedPrefixes:
    """The groups' common prefixes: for the first sum(group_sizes) rows of `page_table` ([B, max_pages],
    grouped as `order_by_first_page` left them; num_cached: tokens each has in the cache before this
    step), the leading pages every member of its group has alike, all before its first new token.
    Groups whose common prefix is under MIN_SHARED_TOKENS get none."""
    num_seqs = page_table.shape[0]
    bounds = np.zeros(len(group_sizes) + 1, np.int64)
    np.cumsum(group_sizes, out=bounds[1:])
    starts = np.full(max_groups + 1, bounds[-1], np.int32)
    starts[: len(bounds)] = bounds
    shared = np.zeros(num_seqs, np.int32)
    grouped = int(bounds[-1])
    if grouped:
        group_of = np.repeat(np.arange(len(group_sizes)), group_sizes)
        full_pages = np.asarray(num_cached[:grouped]) // page_size  # pages wholly before the first new token
        width = int(full_pages.max())
        if width == 0:
            return SharedPrefixes(group_starts=starts, shared_pages=shared)
        rows = page_table[:grouped, :width]
        differs = (rows != rows[bounds[group_of]]) | (np.arange(width)[None, :] >= full_pages[:, None])
        common = np.where(differs.any(axis=1), differs.argmax(axis=1), width)
        per_group = np.minimum.reduceat(common, bounds[:-1])
        per_group[per_group * page_size < MIN_SHARED_TOKENS] = 0
        shared[:grouped] = per_group[group_of]
    return SharedPrefixes(group_starts=starts, shared_pages=shared)
