"""Pages of the KV pool: a free list plus reference counts.

A page is free exactly when its count is 0. A running request holds its pages with count 1; pages it
shares (n samples of one prompt) get one count per holder. The radix tree takes over a request's
counts when the request's tokens are inserted. Page 0 is the pool's null page and never handed out.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from sgjax.cache.kv_pool import NULL_PAGE


class OutOfPages(RuntimeError):
    """Raised when more pages are asked for than are free; the scheduler evicts or preempts first."""


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page {NULL_PAGE} is reserved); got {num_pages}")
        if not 1 <= page_size <= 128:
            raise ValueError(f"page size must be between 1 and 128 tokens; got {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.ref_counts = np.zeros(num_pages, np.int32)
        self.ref_counts[NULL_PAGE] = 1  # permanently held
        # Hand out low page ids first (a stack popped from the end), which keeps tests readable.
        self._free = list(range(num_pages - 1, NULL_PAGE, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.page_size)

    def alloc(self, n: int) -> list[int]:
        """n fresh pages with count 1; raises OutOfPages (allocating nothing) if fewer are free."""
        if n > len(self._free):
            raise OutOfPages(f"asked for {n} KV pages; {len(self._free)} free")
        pages = [self._free.pop() for _ in range(n)]
        self.ref_counts[pages] = 1
        return pages

    def incref(self, pages: Iterable[int]) -> None:
        for p in pages:
            if self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} is free; cannot share it")
            self.ref_counts[p] += 1

    def free(self, pages: Iterable[int]) -> None:
        """Drop one reference to each page; pages reaching 0 go back to the free list."""
        for p in pages:
            if p == NULL_PAGE or self.ref_counts[p] <= 0:
                raise ValueError(f"page {p} freed more often than it was allocated")
            self.ref_counts[p] -= 1
            if self.ref_counts[p] == 0:
                self._free.append(p)

    def free_pages(self) -> list[int]:
        return list(self._free)
