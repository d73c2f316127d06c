"""The scheduler: which requests run in the next step, with how many tokens, in which KV pages.

Policy, in order, each step:
1. Running requests, oldest first: a decode takes 1 token, an unfinished prompt its next chunk (the
   prefill budget, `chunked_prefill_size`, is shared by all chunks of the step). When pages run out,
   unlocked radix-cache leaves are evicted; then the youngest running request is preempted: its
   computed tokens go into the radix cache (so its re-admission finds them) and it returns to the
   front of the queue.
   With `round_up` (the runner's token buckets) the budget grows so the step fills the bucket it is
   padded to anyway: prompt tokens instead of padding, at no extra cost when prompts are waiting.
   With `step_token_target` the budget is what the step's decodes leave of that many tokens (at
   least 0): prompts fill decode steps up to about the size where reading the weights and doing the
   matmuls take as long, instead of running in a few large prefill steps that advance each decode by
   one token as slowly as they run.
2. Waiting requests, longest cached prefix first (`lpm`), in arrival order (`fcfs`), or longest
   remaining output (max_new_tokens) first (`lof`: the requests that need the most steps start first,
   so a batch's last steps are not a few long outputs decoding alone), while there is budget, a free
   slot (`max_running_requests`) and pages. New requests never preempt running ones.
   Of the n samples of one prompt, one is admitted first; the others wait until its prompt is in
   the radix cache and then share those pages.

Page ownership: every page is in exactly one of the allocator's free list, the radix tree, or a
running request's own pages (`Request.pages[num_tree_pages:]`).
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable

from sgjax.cache.no_prefix_cache import NoPrefixCache
from sgjax.cache.page_allocator import PageAllocator
from sgjax.cache.radix_cache import RadixCache
from sgjax.engine.request import Request, Status

LPM_MAX_QUEUE = 128


class Scheduler:
    def __init__(self, allocator: PageAllocator, radix: RadixCache | NoPrefixCache | None, *, max_running_requests: int,
                 chunked_prefill_size: int, context_length: int, policy: str = "lpm",
                 round_up: Callable[[int], int] | None = None, step_token_target: int = 0):
        self.allocator = allocator
        self.radix = radix if radix is not None else NoPrefixCache()
        self.page_size = allocator.page_size
        self.max_running = max_running_requests
        self.prefill_budget = chunked_prefill_size
        self.round_up = round_up  # tokens -> the token count a step of that many is padded to
        self.policy = policy
        self.step_token_target = step_token_target  # 0: chunked_prefill_size alone sets the budget
        self.context_length = context_length
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(max_running_requests - 1, -1, -1))  # rows of the penalty state
        self.num_preemptions = 0
        self._lof_order: list[Request] | None = None  # `waiting` sorted for lof; None once a request joined it

    def add(self, req: Request) -> None:
        self.waiting.append(req)
        self._lof_order = None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> list[tuple[Request, int]]:
        """The next step's (request, number of tokens to run) pairs."""
        budget = self.prefill_budget
        decodes = sum(r.num_pending == 1 for r in self.running)
        if self.step_token_target:
            budget = min(budget, max(self.step_token_target - decodes, 0))
        if self.round_up is not None:
            budget = self.round_up(decodes + budget) - decodes
        batch: list[tuple[Request, int]] = []
        for req in list(self.running):
            if req.status is not Status.RUNNING or req.surely_finishes(self.context_length):
                continue  # preempted while making room for an older request, or done once its token lands
            pending = req.num_pending
            n = 1 if pending == 1 else min(pending, budget)
            if n <= 0 or not self._reserve(req, n):
                continue
            batch.append((req, n))
            if pending > 1:
                budget -= n
        if not self.waiting or len(self.running) >= self.max_running or budget <= 0:
            return batch
        for req in self._waiting_in_policy_order():
            if len(self.running) >= self.max_running or budget <= 0:
                break
            if self._sibling_prefilling(req):
                continue  # admit it once the prompt is cached, to share its pages
            n = self._admit(req, budget)
            if n is None:
                break  # out of pages: later requests would not fit either
            batch.append((req, n))
            budget -= n
        return batch

    def _waiting_in_policy_order(self) -> list[Request]:
        # Matching every waiting prompt each step costs too much for long queues: FCFS there, as SGLang does.
        if self.policy == "lof":  # stable: FCFS among equals
            # Sorted again only after a request joined the queue (sorting up to 1000 requests at every step
            # was ~8% of the engine thread's scheduling time under cProfile); the ones that left it since
            # are skipped.
            if self._lof_order is None:
                self._lof_order = sorted(self.waiting, key=lambda r: len(r.output_ids) - r.params.max_new_tokens)
            return [r for r in self._lof_order if r.status is Status.WAITING]
        if self.policy == "fcfs" or not self.radix.shares_prefixes or len(self.waiting) > LPM_MAX_QUEUE:
            return list(self.waiting)
        match_len = {id(r): self.radix.match_prefix(r.key, r.extra_key, record=False).num_tokens
                     for r in self.waiting}
        return sorted(self.waiting, key=lambda r: -match_len[id(r)])  # stable: FCFS among equals

    def _sibling_prefilling(self, req: Request) -> bool:
        return (self.radix.shares_prefixes and req.group is not None
                and any(r.group == req.group and r.num_computed < len(r.prompt_ids) - 1 for r in self.running))

    def _admit(self, req: Request, budget: int) -> int | None:
        """Move a waiting request to running with its cached prefix and pages for its first chunk."""
        fill = req.key
        m = self.radix.match_prefix(fill, req.extra_key, record=not req.admitted)
        # At least the last token must run, to produce the logits of the next one. Penalised
        # requests run every token, because the step counts tokens for the penalties.
        cached = min(m.num_tokens, (len(fill) - 1) // self.page_size * self.page_size)
        if req.params.uses_penalties:
            cached = 0
        if req.params.logprob_start_len >= 0:  # the step before each wanted prompt token must run
            cached = min(cached, max(req.params.logprob_start_len - 1, 0) // self.page_size * self.page_size)
        node, pages = m.last_node, m.pages[: cached // self.page_size].tolist()
        self.radix.lock(node)
        n = min(len(fill) - cached, budget)
        need = self.allocator.pages_for(cached + n) - len(pages)
        if need > self.allocator.num_free:
            self.radix.evict((need - self.allocator.num_free) * self.page_size)
        if need > self.allocator.num_free:
            self.radix.unlock(node)
            return None
        self.waiting.remove(req)
        req.pages = pages + self.allocator.alloc(need).tolist()
        req.num_tree_pages, req.tree_node, req.num_computed = len(pages), node, cached
        req.slot = self.free_slots.pop()
        if not req.admitted:
            req.cached_tokens, req.admitted, req.admit_time = cached, True, time.monotonic()
        req.status = Status.RUNNING
        self.running.append(req)
        return n

    def _reserve(self, req: Request, n: int) -> bool:
        """Pages for n more tokens of a running request: evict, then preempt the youngest, if needed."""
        need = self.allocator.pages_for(req.num_computed + n) - len(req.pages)
        while need > self.allocator.num_free:
            short = (need - self.allocator.num_free) * self.page_size
            if self.radix.evictable_tokens and self.radix.evict(short):
                continue
            victim = self.running[-1]
            self.preempt(victim)
            if victim is req:
                return False
        if need > 0:
            req.pages += self.allocator.alloc(need).tolist()
        return True

    # ---- after a step --------------------------------------------------------------------------
    def cache_prefill(self, req: Request) -> None:
        """Share a running request's computed prompt with the radix tree right away, so requests
        with the same prefix that arrive meanwhile reuse its pages."""
        if not self.radix.shares_prefixes:
            return
        old = req.tree_node
        self._insert(req)
        req.tree_node = self.radix.match_prefix(req.key[: req.num_computed], req.extra_key, record=False).last_node
        self.radix.lock(req.tree_node)
        self.radix.unlock(old)

    def finish(self, req: Request) -> None:
        """Release a request's KV: computed tokens go into the radix tree, the rest is freed."""
        if req.status is Status.WAITING and req in self.waiting:
            self.waiting.remove(req)  # preempted, and its last token in flight turned out to end it
        self._release(req)
        req.status = Status.FINISHED

    def preempt(self, req: Request) -> None:
        self._release(req)
        req.status = Status.WAITING
        self.waiting.appendleft(req)
        self._lof_order = None
        self.num_preemptions += 1

    def abort(self, rid: str) -> Request | None:
        for req in list(self.waiting):
            if req.rid == rid:
                self.waiting.remove(req)
                req.status = Status.FINISHED
                return req
        for req in self.running:
            if req.rid == rid:
                self.finish(req)
                return req
        return None

    def _release(self, req: Request) -> None:
        if req.status is Status.RUNNING:
            self.running.remove(req)
            self.free_slots.append(req.slot)
            req.slot = -1
        if req.tree_node is not None:
            self._insert(req)
            self.radix.unlock(req.tree_node)
        own = req.pages[req.num_tree_pages:]
        if own:
            self.allocator.free(own)
        req.pages, req.num_tree_pages, req.tree_node, req.num_computed = [], 0, None, 0

    def _insert(self, req: Request) -> None:
        """Hand the request's whole computed pages to the tree; adopt the tree's copies."""
        tree_pages = self.radix.insert(req.key[: req.num_computed], req.pages, req.extra_key).tolist()
        req.pages = tree_pages + req.pages[len(tree_pages):]  # a new list: see Request.pages
        req.num_tree_pages = len(tree_pages)
