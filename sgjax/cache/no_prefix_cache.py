"""NoPrefixCache: the radix cache's interface with nothing cached (--disable-radix-cache), so the scheduler
has one code path whether prefixes are shared or not."""

from __future__ import annotations

from collections.abc import Collection, Hashable, Sequence

import numpy as np

from sgjax.cache.radix_cache import MatchResult

_NO_PAGES = np.zeros(0, np.int32)


class NoPrefixCache:
    shares_prefixes = False  # the scheduler skips prefix ordering and sibling waits
    evictable_tokens = 0
    hit_rate = 0.0

    def match_prefix(self, tokens: Sequence[int] | np.ndarray, extra_key: Hashable = None,
                     record: bool = True) -> MatchResult:
        return MatchResult(_NO_PAGES, 0, None)

    def insert(self, tokens: Sequence[int] | np.ndarray, pages: Sequence[int] | np.ndarray,
               extra_key: Hashable = None) -> np.ndarray:
        """Takes no pages: the caller keeps (and frees) them all."""
        return _NO_PAGES

    def lock(self, node) -> None:
        pass

    def unlock(self, node) -> None:
        pass

    def evict(self, num_tokens: int) -> int:
        return 0

    def reset(self) -> None:
        pass

    def discard(self, pages: Collection[int]) -> None:
        pass

    def reset_stats(self) -> None:
        pass

    def all_pages(self) -> list[int]:
        return []
