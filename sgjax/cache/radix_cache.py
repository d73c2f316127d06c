"""RadixCache: a radix tree over token ids whose edges own KV pages (SGLang's RadixAttention, host side).

- `match_prefix` finds the longest cached prefix (whole pages only) and its pages, splitting an edge
  where the match ends inside it so the returned node covers exactly the match.
- `insert` adds a sequence's full pages; where the tree already has a prefix, the caller's duplicate
  pages are freed and the tree's are returned, so the caller switches to the shared copy.
- `lock`/`unlock` count the running requests on a node and its ancestors; locked nodes are never evicted.
- `evict` frees least-recently-used unlocked leaves first (a lazy heap keyed by a logical clock).
- `extra_key` (a LoRA id, an image hash) gives each key its own tree, so such requests never share.

Keys are int32 numpy arrays: comparing an edge is one vectorised compare, so matching an 8k-token
prompt walks a handful of nodes rather than 8k Python steps.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
from collections.abc import Collection, Hashable, Sequence

import numpy as np

from sgjax.cache.page_allocator import PageAllocator


class TreeNode:
    __slots__ = ("key", "pages", "children", "parent", "lock_ref", "last_access", "alive")

    def __init__(self, key: np.ndarray, pages: np.ndarray, parent: "TreeNode | None"):
        self.key = key  # int32 token ids on the edge from parent to this node (whole pages)
        self.pages = pages  # int32, one KV page per page_size tokens of key
        self.children: dict[Hashable, TreeNode] = {}
        self.parent = parent
        self.lock_ref = 0
        self.last_access = 0
        self.alive = True

    @property
    def is_leaf(self) -> bool:
        return not self.children


@dataclasses.dataclass
class MatchResult:
    pages: np.ndarray  # int32 pages of the matched prefix, in order
    num_tokens: int  # matched tokens (a multiple of page_size)
    last_node: TreeNode | None  # lock this while the prefix is in use (None: nothing cached)


class RadixCache:
    shares_prefixes = True
    def __init__(self, allocator: PageAllocator):
        self.allocator = allocator
        self.page_size = allocator.page_size
        self._clock = itertools.count(1)
        self._heap: list[tuple[int, int, TreeNode]] = []  # (last_access, tie-break, leaf), lazily pruned
        self._tiebreak = itertools.count()
        self.reset_stats()
        self._roots: dict[Hashable, TreeNode] = {}
        self.cached_tokens = 0  # tokens held by the tree
        self.locked_tokens = 0  # of those, on nodes with lock_ref > 0

    # ---- lookup -------------------------------------------------------------------------------
    def match_prefix(self, tokens: Sequence[int] | np.ndarray, extra_key: Hashable = None,
                     record: bool = True) -> MatchResult:
        """Longest cached whole-page prefix of `tokens`. `record` counts it in the hit/miss stats."""
        key = self._as_key(tokens)
        usable = len(key) - len(key) % self.page_size
        node = self._root(extra_key)
        pages: list[np.ndarray] = []
        pos, now = 0, next(self._clock)
        node.last_access = now
        while pos < usable:
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                break
            n = self._common_length(child.key, key[pos:usable])
            if n < len(child.key):
                child = self._split(child, n)
            child.last_access = now
            pages.append(child.pages)
            pos += n
            node = child
        if node.is_leaf:
            self._push_leaf(node)
        if record:
            self.hit_tokens += pos
            self.miss_tokens += len(key) - pos
        return MatchResult(_concat(pages), pos, node)

    # ---- insertion ----------------------------------------------------------------------------
    def insert(self, tokens: Sequence[int] | np.ndarray, pages: Sequence[int] | np.ndarray,
               extra_key: Hashable = None) -> np.ndarray:
        """Cache the whole pages of `tokens` (held in `pages`); return the tree's pages for that prefix.

        Ownership of `pages[:k]` (k = whole pages) passes to the tree. Where the tree already held a
        prefix under other pages, the caller's copies are freed and the tree's are returned instead.
        """
        key = self._as_key(tokens)
        n_pages = len(key) // self.page_size
        if len(pages) < n_pages:
            raise ValueError(f"{len(key)} tokens need {n_pages} pages of {self.page_size}; got {len(pages)}")
        key, pages = key[: n_pages * self.page_size], np.asarray(pages, np.int32)
        node, pos, now = self._root(extra_key), 0, next(self._clock)
        node.last_access = now
        result: list[np.ndarray] = []
        while pos < len(key):
            child = node.children.get(self._child_key(key, pos))
            if child is None:
                child = TreeNode(key[pos:].copy(), pages[pos // self.page_size: n_pages].copy(), node)
                node.children[self._child_key(key, pos)] = child
                self.cached_tokens += len(child.key)
                result.append(child.pages)
                node.last_access = now  # parent is no longer a leaf; its heap entries go stale
                node = child
                break
            n = self._common_length(child.key, key[pos:])
            if n < len(child.key):
                child = self._split(child, n)
            given = pages[pos // self.page_size: (pos + n) // self.page_size]
            self.allocator.free(given[given != child.pages])
            result.append(child.pages)
            child.last_access = now
            pos += n
            node = child
        node.last_access = now
        if node.is_leaf:
            self._push_leaf(node)
        return _concat(result)

    # ---- locking ------------------------------------------------------------------------------
    def lock(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (one running request)."""
        while node.parent is not None:
            if node.lock_ref == 0:
                self.locked_tokens += len(node.key)
            node.lock_ref += 1
            node = node.parent

    def unlock(self, node: TreeNode) -> None:
        leaf = node
        while node.parent is not None:
            if node.lock_ref <= 0:
                raise ValueError("unlock of a node that is not locked")
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.locked_tokens -= len(node.key)
            node = node.parent
        if leaf.parent is not None and leaf.is_leaf and leaf.lock_ref == 0:
            self._push_leaf(leaf)

    @property
    def evictable_tokens(self) -> int:
        return self.cached_tokens - self.locked_tokens

    # ---- eviction -----------------------------------------------------------------------------
    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` tokens' pages, LRU unlocked leaves first; return tokens freed.

        Frees fewer only when nothing evictable is left.
        """
        freed = 0
        while freed < num_tokens and self._heap:
            stamp, _, node = heapq.heappop(self._heap)
            if not self._evictable(node) or stamp != node.last_access:
                continue  # stale entry: node changed since it was pushed
            self.allocator.free(node.pages)
            freed += len(node.key)
            self.cached_tokens -= len(node.key)
            parent = node.parent
            del parent.children[self._child_key(node.key, 0)]
            node.alive = False
            if parent.parent is not None and parent.is_leaf and parent.lock_ref == 0:
                self._push_leaf(parent)
        if len(self._heap) > 4 * max(self.cached_tokens // self.page_size, 256):
            self._heap = [e for e in self._heap if self._evictable(e[2]) and e[0] == e[2].last_access]
            heapq.heapify(self._heap)
        return freed

    def reset(self) -> None:
        """Drop every cached prefix, returning its pages to the allocator. No request may hold a lock."""
        if self.locked_tokens:
            raise RuntimeError(f"cannot reset the radix cache: {self.locked_tokens} tokens are locked by requests")
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                self.allocator.free(node.pages)
                node.alive = False
                stack.extend(node.children.values())
        self._roots.clear()
        self._heap.clear()
        self.cached_tokens = 0

    def discard(self, pages: Collection[int]) -> None:
        """Drop the cached K/V from each of `pages` on, with the longer prefixes under it (computed from it),
        returning their pages to the allocator: for K/V that may never have been written. Keeps the part of a
        prefix before such a page. None of what is dropped may be locked."""
        doomed = set(pages)
        if not doomed:
            return
        stack = [child for root in self._roots.values() for child in root.children.values()]
        while stack:
            node = stack.pop()
            hit = [i for i, page in enumerate(node.pages.tolist()) if page in doomed]
            if not hit:
                stack.extend(node.children.values())
                continue
            if hit[0]:  # the pages before the first doomed one stay
                node = next(iter(self._split(node, hit[0] * self.page_size).children.values()))
            self._drop_subtree(node)

    def _drop_subtree(self, top: TreeNode) -> None:
        nodes, stack = [], [top]
        while stack:
            nodes.append(stack.pop())
            stack.extend(nodes[-1].children.values())
        if any(node.lock_ref for node in nodes):
            raise RuntimeError("cannot drop cached pages that a running request holds")
        parent = top.parent
        del parent.children[self._child_key(top.key, 0)]
        for node in nodes:
            self.allocator.free(node.pages)
            self.cached_tokens -= len(node.key)
            node.alive = False
        if parent.parent is not None and parent.is_leaf and parent.lock_ref == 0:
            self._push_leaf(parent)

    # ---- statistics ---------------------------------------------------------------------------
    def reset_stats(self) -> None:
        self.hit_tokens = 0
        self.miss_tokens = 0

    @property
    def hit_rate(self) -> float:
        total = self.hit_tokens + self.miss_tokens
        return self.hit_tokens / total if total else 0.0

    def all_pages(self) -> list[int]:
        """Every page the tree owns (for invariant checks)."""
        out: list[int] = []
        for root in self._roots.values():
            stack = list(root.children.values())
            while stack:
                node = stack.pop()
                out.extend(node.pages.tolist())
                stack.extend(node.children.values())
        return out

    # ---- internals ----------------------------------------------------------------------------
    def _root(self, extra_key: Hashable) -> TreeNode:
        root = self._roots.get(extra_key)
        if root is None:
            root = self._roots[extra_key] = TreeNode(np.zeros(0, np.int32), np.zeros(0, np.int32), None)
        return root

    @staticmethod
    def _as_key(tokens) -> np.ndarray:
        return np.asarray(tokens, dtype=np.int32)

    def _child_key(self, key: np.ndarray, pos: int) -> Hashable:
        if self.page_size == 1:
            return int(key[pos])
        return key[pos: pos + self.page_size].tobytes()

    def _common_length(self, edge: np.ndarray, key: np.ndarray) -> int:
        """Length of the common prefix of edge and key, rounded down to whole pages."""
        m = min(len(edge), len(key))
        differ = edge[:m] != key[:m]
        n = int(differ.argmax()) if differ.any() else m
        return n - n % self.page_size

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Cut child's edge after n tokens; return the new upper node (which covers key[:n])."""
        parent = child.parent
        upper = TreeNode(child.key[:n], child.pages[: n // self.page_size], parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        parent.children[self._child_key(child.key, 0)] = upper
        child.key, child.pages, child.parent = child.key[n:], child.pages[n // self.page_size:], upper
        upper.children[self._child_key(child.key, 0)] = child
        return upper

    def _evictable(self, node: TreeNode) -> bool:
        return node.alive and node.parent is not None and node.is_leaf and node.lock_ref == 0

    def _push_leaf(self, node: TreeNode) -> None:
        if self._evictable(node):
            heapq.heappush(self._heap, (node.last_access, next(self._tiebreak), node))


def _concat(parts: list[np.ndarray]) -> np.ndarray:
    return np.concatenate(parts) if parts else np.zeros(0, np.int32)
