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


def pages_for(num_tokens: int, page_size: int) -> int:
    """Pages that hold num_tokens tokens."""
    return -(-num_tokens // page_size)


class PageAllocator:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"need at least 2 pages (page {NULL_PAGE} is reserved); got {num_pages}")
        if not 1 <= page_size <= 128:
            raise ValueError(f"page size must be between 1 and 128 tokens; got {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self.ref_counts = np.zeros(num_pages, np.int32)
        self.ref_counts[NULL_PAGE] = 1  # permanently held
        # A stack of free pages in a numpy array (no Python int per page: pools hold millions).
        # Popped from the end, so low page ids come out first.
        self._free = np.arange(num_pages - 1, NULL_PAGE, -1, dtype=np.int32)
        self._num_free = num_pages - 1

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_usable(self) -> int:
        return self.num_pages - 1

    def pages_for(self, num_tokens: int) -> int:
        return pages_for(num_tokens, self.page_size)

    def alloc(self, n: int) -> np.ndarray:
        """n fresh pages (int32) with count 1; raises OutOfPages (allocating nothing) if fewer are free."""
        if n > self._num_free:
            raise OutOfPages(f"asked for {n} KV pages; {self._num_free} free")
        self._num_free -= n
        pages = self._free[self._num_free:self._num_free + n][::-1].copy()
        self.ref_counts[pages] = 1
        return pages

    def incref(self, pages: Iterable[int] | np.ndarray) -> None:
        pages = np.asarray(pages, np.int32)
        if (self.ref_counts[pages] <= 0).any():
            raise ValueError(f"pages {pages[self.ref_counts[pages] <= 0].tolist()} are free; cannot share them")
        np.add.at(self.ref_counts, pages, 1)

    def free(self, pages: Iterable[int] | np.ndarray) -> None:
        """Drop one reference to each page; pages reaching 0 go back to the free list."""
        pages = np.asarray(pages, np.int32)
        if pages.size == 0:
            return
        unique, counts = np.unique(pages, return_counts=True)
        bad = (unique == NULL_PAGE) | (self.ref_counts[unique] < counts)
        if bad.any():
            raise ValueError(f"pages {unique[bad].tolist()} freed more often than they were allocated")
        self.ref_counts[unique] -= counts.astype(np.int32)
        released = unique[self.ref_counts[unique] == 0]
        self._free[self._num_free:self._num_free + len(released)] = released
        self._num_free += len(released)

    def free_pages(self) -> list[int]:
        return self._free[:self._num_free].tolist()
