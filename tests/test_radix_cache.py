"""RadixCache and PageAllocator against a naive model: a dict of every cached whole-page prefix."""

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from sgjax.cache.page_allocator import OutOfPages, PageAllocator
from sgjax.cache.radix_cache import RadixCache


def tree_prefixes(cache: RadixCache) -> dict:
    """(extra_key, whole-page prefix) -> page holding that prefix's last page, read off the tree."""
    out = {}
    for extra, root in cache._roots.items():
        stack = [(child, ()) for child in root.children.values()]
        while stack:
            node, prefix = stack.pop()
            key = tuple(int(t) for t in node.key)
            for i, page in enumerate(node.pages):
                out[(extra, prefix + key[: (i + 1) * cache.page_size])] = page
            stack.extend((c, prefix + key) for c in node.children.values())
    return out


class RadixMachine(RuleBasedStateMachine):
    """Random requests start (match, lock, allocate, insert), finish (insert, unlock), get evicted."""

    @initialize(page_size=st.sampled_from([1, 2, 4]), num_pages=st.integers(8, 48))
    def setup(self, page_size, num_pages):
        self.ps = page_size
        self.alloc = PageAllocator(num_pages, page_size)
        self.cache = RadixCache(self.alloc)
        self.ref: dict = {}  # (extra_key, prefix tuple) -> page of its last page
        self.running: dict = {}  # rid -> (extra_key, tokens, pages, locked node, tree-owned page count)
        self.next_rid = 0

    def ref_match(self, tokens, extra):
        pages, k = [], self.ps
        while k <= len(tokens) and (extra, tuple(tokens[:k])) in self.ref:
            pages.append(self.ref[(extra, tuple(tokens[:k]))])
            k += self.ps
        return pages

    def record_insert(self, tokens, extra, tree_pages):
        for i, page in enumerate(tree_pages):
            prefix = (extra, tuple(tokens[: (i + 1) * self.ps]))
            assert self.ref.setdefault(prefix, page) == page, "insert returned a page other than the cached one"

    # Sequences drawn from a small alphabet share prefixes often, forcing splits and duplicates.
    tokens = st.lists(st.integers(0, 3), min_size=0, max_size=24)

    @rule(tokens=tokens, extra=st.sampled_from([None, None, "lora-a"]))
    def match(self, tokens, extra):
        result = self.cache.match_prefix(tokens, extra)
        assert result.pages.tolist() == self.ref_match(tokens, extra)
        assert result.num_tokens == len(result.pages) * self.ps

    @rule(tokens=tokens, extra=st.sampled_from([None, "lora-a"]))
    def start_request(self, tokens, extra):
        m = self.cache.match_prefix(tokens, extra)
        self.cache.lock(m.last_node)
        need = self.alloc.pages_for(len(tokens)) - len(m.pages)
        if need > self.alloc.num_free:
            self.evict_and_check((need - self.alloc.num_free) * self.ps)
        try:
            new = self.alloc.alloc(need)
        except OutOfPages:
            self.cache.unlock(m.last_node)
            return
        pages = m.pages.tolist() + new.tolist()
        # Insert the prefill right away (as for a running request) and move the lock to the new node.
        tree_pages = self.cache.insert(tokens, pages, extra).tolist()
        self.record_insert(tokens, extra, tree_pages)
        pages = tree_pages + pages[len(tree_pages):]
        m2 = self.cache.match_prefix(tokens, extra, record=False)
        assert m2.pages.tolist() == tree_pages
        self.cache.lock(m2.last_node)
        self.cache.unlock(m.last_node)
        self.running[self.next_rid] = (extra, tokens, pages, m2.last_node, len(tree_pages))
        self.next_rid += 1

    @precondition(lambda self: self.running)
    @rule(data=st.data(), more=st.lists(st.integers(0, 3), max_size=8))
    def finish_request(self, data, more):
        rid = data.draw(st.sampled_from(sorted(self.running)))
        extra, tokens, pages, node, _ = self.running.pop(rid)
        # It may have decoded more tokens into fresh pages if any are free.
        tokens = tokens + more
        need = self.alloc.pages_for(len(tokens)) - len(pages)
        if need > 0:
            if need <= self.alloc.num_free:
                pages = pages + self.alloc.alloc(need).tolist()
            else:
                tokens = tokens[: len(pages) * self.ps]
        tree_pages = self.cache.insert(tokens, pages, extra).tolist()
        self.record_insert(tokens, extra, tree_pages)
        self.alloc.free(pages[len(tree_pages):])  # the partial last page is not cached
        self.cache.unlock(node)

    @rule(n=st.integers(0, 40))
    def evict(self, n):
        self.evict_and_check(n)

    def evict_and_check(self, n):
        before_free, evictable = self.alloc.num_free, self.cache.evictable_tokens
        locked = {k for rid, (extra, toks, pages, node, owned) in self.running.items()
                  for k in [(extra, tuple(toks[: (i + 1) * self.ps])) for i in range(owned)]}
        freed = self.cache.evict(n)
        assert freed % self.ps == 0
        assert self.alloc.num_free - before_free == freed // self.ps, "evict freed other than it says"
        assert freed >= min(n, evictable), "evict stopped while evictable pages remained"
        remaining = tree_prefixes(self.cache)
        for key, page in remaining.items():
            assert self.ref[key] == page
        for key in set(self.ref) - set(remaining):
            assert key not in locked, "a locked prefix was evicted"
            assert self.alloc.ref_counts[self.ref[key]] == 0
        self.ref = remaining

    @precondition(lambda self: not self.running)
    @rule()
    def reset(self):
        self.cache.reset()
        self.ref = {}
        assert self.alloc.num_free == self.alloc.num_usable

    @invariant()
    def pages_are_owned_exactly_once(self):
        if not hasattr(self, "cache"):
            return
        tree = self.cache.all_pages()
        held = [p for (_, _, pages, _, owned) in self.running.values() for p in pages[owned:]]
        free = self.alloc.free_pages()
        everything = tree + held + free
        assert len(everything) == len(set(everything)), "a page is owned twice (or free and owned)"
        assert sorted(everything) == list(range(1, self.alloc.num_pages)), "a page was lost"
        assert (self.alloc.ref_counts[tree + held] == 1).all()
        assert self.cache.cached_tokens == len(tree) * self.ps
        assert tree_prefixes(self.cache) == self.ref


TestRadixMachine = RadixMachine.TestCase
TestRadixMachine.settings = settings(max_examples=200, stateful_step_count=60, deadline=None,
                                     suppress_health_check=[HealthCheck.too_slow])


# ---- focused behaviour ----------------------------------------------------------------------

def make(num_pages=64, page_size=1):
    alloc = PageAllocator(num_pages, page_size)
    return alloc, RadixCache(alloc)


def test_divergent_insert_splits_the_edge():
    alloc, cache = make()
    a = alloc.alloc(6).tolist()
    cache.insert([1, 2, 3, 4, 5, 6], a)
    b = alloc.alloc(6).tolist()
    shared = cache.insert([1, 2, 3, 9, 9, 9], b)
    assert shared.tolist() == a[:3] + b[3:]
    assert alloc.ref_counts[b[:3]].tolist() == [0, 0, 0], "duplicate prefix pages go back to the free list"
    root = cache._roots[None]
    (upper,) = root.children.values()
    assert upper.key.tolist() == [1, 2, 3] and sorted(c.key.tolist() for c in upper.children.values()) == [
        [4, 5, 6], [9, 9, 9]]
    assert cache.match_prefix([1, 2, 3, 4, 7]).pages.tolist() == a[:4]


def test_page_aligned_matching_with_page_size_16():
    alloc, cache = make(page_size=16)
    tokens = list(range(100))
    pages = alloc.alloc(7).tolist()  # 100 tokens: 6 whole pages + a partial one
    assert cache.insert(tokens, pages).tolist() == pages[:6]
    m = cache.match_prefix(tokens[:50])
    assert (m.num_tokens, m.pages.tolist()) == (48, pages[:3])
    # A divergence inside the 4th page matches only the first 3 pages.
    m = cache.match_prefix(tokens[:60] + [999] + tokens[61:])
    assert (m.num_tokens, m.pages.tolist()) == (48, pages[:3])
    assert cache.match_prefix(tokens[:15]).num_tokens == 0


def test_eviction_takes_least_recently_used_leaf_first():
    alloc, cache = make()
    for first in (10, 20, 30):
        cache.insert([first, 1, 2], alloc.alloc(3))
    cache.match_prefix([10, 1, 2])  # now 20.. is the oldest, then 30.., then 10..
    assert cache.evict(1) == 3
    assert cache.match_prefix([20, 1, 2]).num_tokens == 0
    assert cache.match_prefix([30, 1, 2]).num_tokens == 3  # touches 30: 10.. is now oldest
    assert cache.evict(3) == 3
    assert cache.match_prefix([10, 1, 2]).num_tokens == 0
    assert cache.match_prefix([30, 1, 2]).num_tokens == 3


def test_locked_prefix_survives_eviction_and_parent_becomes_leaf():
    alloc, cache = make()
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    cache.insert([1, 2, 7, 8], alloc.alloc(4))
    node = cache.match_prefix([1, 2, 3, 4]).last_node
    cache.lock(node)
    assert cache.evictable_tokens == 2  # [7, 8]
    assert cache.evict(100) == 2
    assert cache.match_prefix([1, 2, 3, 4]).num_tokens == 4
    cache.unlock(node)
    assert cache.evict(100) == 4  # [3, 4] then the shared [1, 2] once it is a leaf
    assert alloc.num_free == alloc.num_usable


def test_extra_key_separates_trees():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3), extra_key="lora-a")
    assert cache.match_prefix([1, 2, 3]).num_tokens == 0
    assert cache.match_prefix([1, 2, 3], extra_key="lora-b").num_tokens == 0
    assert cache.match_prefix([1, 2, 3], extra_key="lora-a").num_tokens == 3


def test_hit_and_miss_counters():
    alloc, cache = make()
    cache.insert([1, 2, 3, 4], alloc.alloc(4))
    cache.match_prefix([1, 2, 3, 4, 5, 6])
    cache.match_prefix([9, 9], record=False)
    assert (cache.hit_tokens, cache.miss_tokens) == (4, 2)
    assert cache.hit_rate == pytest.approx(4 / 6)


def test_reset_refuses_while_locked_then_frees_everything():
    alloc, cache = make()
    cache.insert([1, 2, 3], alloc.alloc(3))
    node = cache.match_prefix([1, 2, 3]).last_node
    cache.lock(node)
    with pytest.raises(RuntimeError, match="locked"):
        cache.reset()
    cache.unlock(node)
    cache.reset()
    assert alloc.num_free == alloc.num_usable and cache.match_prefix([1, 2, 3]).num_tokens == 0


def test_discard_drops_from_a_page_on_with_the_prefixes_under_it():
    """K/V that may never have been written leaves the tree with every longer prefix (computed from it); the
    pages before it stay, as do other branches; what a running request holds is refused."""
    alloc, cache = make(num_pages=16, page_size=2)
    a, b, c = (alloc.alloc(n).tolist() for n in (4, 4, 3))
    cache.insert([1, 2, 3, 4, 5, 6, 7, 8], a)
    cache.insert([1, 2, 3, 4, 5, 6, 9, 9], b)  # shares a[:3]
    cache.insert([1, 2, 8, 8, 8, 8], c)  # shares a[0]
    held = cache.match_prefix([1, 2, 8, 8, 8, 8]).last_node
    cache.lock(held)
    cache.discard({a[1]})
    assert tree_prefixes(cache) == {(None, (1, 2)): a[0], (None, (1, 2, 8, 8)): c[1], (None, (1, 2, 8, 8, 8, 8)): c[2]}
    assert alloc.ref_counts[[a[1], a[2], a[3], b[3]]].tolist() == [0, 0, 0, 0]
    with pytest.raises(RuntimeError, match="running request"):
        cache.discard({c[2]})
    cache.unlock(held)
    cache.discard({c[2], 99})
    assert cache.match_prefix([1, 2, 8, 8, 8, 8]).pages.tolist() == [a[0], c[1]]
    assert sorted(cache.all_pages() + alloc.free_pages()) == list(range(1, 16))
    assert cache.cached_tokens == 4 and cache.evict(100) == 4


def test_allocator_errors_name_the_problem():
    alloc = PageAllocator(4, 16)
    with pytest.raises(OutOfPages, match="asked for 4 KV pages; 3 free"):
        alloc.alloc(4)
    pages = alloc.alloc(2)
    alloc.incref(pages[:1])
    alloc.free(pages)
    assert alloc.num_free == 2  # the shared page is still held once
    alloc.free(pages[:1])
    with pytest.raises(ValueError, match="freed more often"):
        alloc.free(pages[:1])
    with pytest.raises(ValueError, match="page size"):
        PageAllocator(4, 256)


def test_insert_of_numpy_and_list_keys_agree():
    alloc, cache = make(page_size=4)
    tokens = np.arange(12, dtype=np.int64)
    pages = alloc.alloc(3)
    cache.insert(tokens, pages)
    assert cache.match_prefix(list(range(12))).pages.tolist() == pages.tolist()
