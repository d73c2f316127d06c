"""Scheduler bookkeeping on its own (no model): pages and queues after preemption and finishing."""

import numpy as np

from sgjax.cache.page_allocator import PageAllocator
from sgjax.cache.radix_cache import RadixCache
from sgjax.engine.request import Request, Status
from sgjax.engine.sampling_params import SamplingParams
from sgjax.engine.scheduler import Scheduler


def make(num_pages=9, page_size=4, **kw):
    alloc = PageAllocator(num_pages, page_size)
    radix = RadixCache(alloc)
    return alloc, radix, Scheduler(alloc, radix, max_running_requests=4, chunked_prefill_size=64,
                                   context_length=256, **kw)


def request(rid, n, seed=0, max_new_tokens=4):
    ids = np.random.default_rng(seed).integers(0, 100, n).tolist()
    return Request(rid=rid, prompt_ids=ids, params=SamplingParams(max_new_tokens=max_new_tokens), seed=0)


def pages_accounted(alloc, radix, sched):
    held = [p for r in sched.running for p in r.pages[r.num_tree_pages:]]
    everything = radix.all_pages() + held + alloc.free_pages()
    return sorted(everything) == list(range(1, alloc.num_pages))


def run_step(sched, batch):
    """Every chunk of the step computed and every sampled token appended, as the engine does; a request
    with all its tokens finishes."""
    for r, n in batch:
        r.num_computed += n
        if r.num_pending == 0:
            r.output_ids.append(1)
            if len(r.output_ids) == r.params.max_new_tokens:
                sched.finish(r)


def test_preempted_request_that_finishes_leaves_the_queue():
    alloc, radix, sched = make()
    a, b = request("a", 10, 1), request("b", 10, 2)
    sched.add(a)
    sched.add(b)
    batch = sched.schedule()
    assert [r.rid for r, _ in batch] == ["a", "b"]
    for r, n in batch:
        r.num_computed += n
        r.num_unknown = 1  # its first token is still on the device
    sched.preempt(b)
    assert b.status is Status.WAITING and list(sched.waiting) == [b]
    sched.finish(b)  # that token was an end-of-sequence
    assert b.status is Status.FINISHED and not sched.waiting
    sched.finish(a)
    assert not sched.running and pages_accounted(alloc, radix, sched)


def test_running_out_of_pages_preempts_the_youngest_and_keeps_its_prefix():
    alloc, radix, sched = make(num_pages=9)  # 8 usable pages of 4 tokens
    a, b = request("a", 12, 1), request("b", 16, 2)
    sched.add(a)
    sched.add(b)
    for r, n in sched.schedule():
        r.num_computed += n
        sched.cache_prefill(r)
    assert alloc.num_free == 1
    a.output_ids, b.output_ids = [1], [2]  # each sampled a token: a needs a 4th page, b a 5th
    batch = sched.schedule()
    assert [r.rid for r, _ in batch] == ["a"] and b.status is Status.WAITING
    assert sched.num_preemptions == 1
    # b's prompt pages stayed in the radix tree for its re-admission
    assert radix.match_prefix(b.prompt_ids, record=False).num_tokens == 16
    assert pages_accounted(alloc, radix, sched)


def test_long_queues_fall_back_to_fcfs():
    alloc, radix, sched = make(num_pages=400)
    first = request("first", 8, 1)
    sched.add(first)
    for r, n in sched.schedule():
        r.num_computed += n
    sched.finish(first)  # "first" is cached now
    sched.add(request("new", 8, 2))
    sched.add(request("again", 8, 1))  # same prompt as "first": longest prefix match
    assert [r.rid for r in sched._waiting_in_policy_order()] == ["again", "new"]
    for i in range(200):
        sched.add(request(f"q{i}", 8, 3 + i))
    assert sched._waiting_in_policy_order()[0].rid == "new"


def test_prefill_budget_fills_the_padded_bucket():
    # Steps are padded to multiples of 32 here: a budget of 64 with 3 decodes would pad 67 -> 96,
    # so the waiting prompt gets 93 tokens instead of 64 (and no more than the bucket holds).
    alloc, radix, sched = make(num_pages=200, round_up=lambda n: -(-n // 32) * 32)
    decoding = [request(f"d{i}", 5, i) for i in range(3)]
    for r in decoding:
        sched.add(r)
    for r, n in sched.schedule():
        r.num_computed += n
        r.num_unknown = 1  # each has a token in flight: a decode next
    sched.add(request("long", 200, 9))
    batch = sched.schedule()
    assert [(r.rid, n) for r, n in batch] == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 93)]
    # Without the rounding the same queue gets the plain budget
    alloc, radix, plain = make(num_pages=200)
    plain.add(request("long", 200, 9))
    assert [n for _, n in plain.schedule()] == [64]


def test_page_array_follows_appends_and_replacements():
    """The int32 copy of a request's pages that steps are built from stays equal to the list as the
    scheduler changes it (appending in place, replacing it)."""
    req = request("r", 8)
    assert req.page_array().tolist() == []
    req.pages = [5, 6]
    first = req.page_array()
    assert first.tolist() == [5, 6] and first.dtype == np.int32
    assert req.page_array() is first  # kept while the list is unchanged
    req.pages += [7, 8]
    assert req.page_array().tolist() == [5, 6, 7, 8]
    req.pages = [9] + req.pages[1:]  # as _insert adopts the tree's pages
    assert req.page_array().tolist() == [9, 6, 7, 8]
    req.pages = []
    assert req.page_array().tolist() == []


def test_lof_admits_the_longest_remaining_outputs_first():
    """`lof` orders the queue by output tokens still to come (max_new_tokens less those already made, as
    a preempted request has), arrival order among equals: the oracle is Python's stable sort."""
    alloc, radix, sched = make(num_pages=200, policy="lof")
    wants = {"a": 5, "b": 50, "c": 20, "d": 50, "e": 30}
    for i, (rid, out) in enumerate(wants.items()):
        sched.add(request(rid, 6, i, max_new_tokens=out))
    sched.waiting[2].output_ids = [7] * 15  # "c" was preempted after 15 tokens: 5 to go
    remaining = {rid: out - (15 if rid == "c" else 0) for rid, out in wants.items()}
    oracle = sorted(wants, key=lambda rid: -remaining[rid])
    assert [r.rid for r in sched._waiting_in_policy_order()] == oracle == ["b", "d", "e", "a", "c"]
    # max_running_requests is 4: the four longest are admitted, the shortest waits
    assert [r.rid for r, _ in sched.schedule()] == oracle[:4] and [r.rid for r in sched.waiting] == ["c"]


def test_step_token_target_fills_decode_steps_with_prompt_chunks():
    """With a target of 16 tokens a step of 3 decodes takes 13 prompt tokens (not the 64 of
    chunked_prefill_size); padded to buckets of 32 it fills its bucket (29); with as many decodes as the
    target it admits nothing."""
    for round_up, chunk in ((None, 13), (lambda n: -(-n // 32) * 32, 29)):
        alloc, radix, sched = make(num_pages=200, step_token_target=16, round_up=round_up)
        for i in range(3):
            sched.add(request(f"d{i}", 5, i))
        for r, n in sched.schedule():
            r.num_computed += n
            r.num_unknown = 1  # a token in flight: a decode next
        sched.add(request("long", 200, 9))
        assert [(r.rid, n) for r, n in sched.schedule()][-1] == ("long", chunk)
    alloc, radix, sched = make(num_pages=200, step_token_target=3)
    for i in range(3):
        sched.add(request(f"d{i}", 1, i))  # one-token prompts: a budget of 3 admits all three
    for r, n in sched.schedule():
        r.num_computed += n
        r.num_unknown = 1
    sched.add(request("late", 8, 9))
    assert [r.rid for r, _ in sched.schedule()] == ["d0", "d1", "d2"] and [r.rid for r in sched.waiting] == ["late"]


def test_lof_with_a_step_token_target_serves_a_whole_batch():
    """A batch of random prompt and output lengths run to the end (every chunk computed, every sampled
    token appended, as the engine does): each request gets exactly its max_new_tokens, no step has more
    tokens than the target or its decodes, and every page returns to the pool or the radix tree."""
    rng = np.random.default_rng(0)
    alloc, radix, sched = make(num_pages=400, policy="lof", step_token_target=24)
    reqs = [request(f"r{i}", int(rng.integers(2, 40)), i, max_new_tokens=int(rng.integers(1, 30)))
            for i in range(40)]
    for r in reqs:
        sched.add(r)
    steps = 0
    while sched.has_work():
        batch = sched.schedule()
        assert batch, "no progress with requests left"
        decodes = sum(n == 1 for _, n in batch)
        assert sum(n for _, n in batch) <= max(24, decodes)
        run_step(sched, batch)
        steps += 1
    assert all(len(r.output_ids) == r.params.max_new_tokens and r.finished for r in reqs)
    assert steps >= max(r.params.max_new_tokens for r in reqs)
    assert pages_accounted(alloc, radix, sched)


def test_lof_order_kept_between_steps_matches_a_fresh_sort():
    """The lof order is sorted again only when the queue grows (arrivals, preemptions): at every step of a
    run with both, it equals a fresh stable sort of the queue (the oracle), and the run completes."""
    rng = np.random.default_rng(1)
    alloc, radix, sched = make(num_pages=40, policy="lof", step_token_target=24)
    reqs = [request(f"r{i}", int(rng.integers(2, 40)), i, max_new_tokens=int(rng.integers(1, 40)))
            for i in range(30)]
    arrivals = iter(reqs)
    while not all(r.finished for r in reqs):
        for _ in range(int(rng.integers(0, 3))):  # a few arrivals before each step
            r = next(arrivals, None)
            if r is not None:
                sched.add(r)
        oracle = sorted(sched.waiting, key=lambda r: len(r.output_ids) - r.params.max_new_tokens)
        assert sched._waiting_in_policy_order() == oracle
        batch = sched.schedule()
        run_step(sched, batch)
        if not sched.has_work():
            for r in arrivals:
                sched.add(r)
    assert sched.num_preemptions > 0  # the small pool made the run preempt
    assert all(len(r.output_ids) == r.params.max_new_tokens and r.finished for r in reqs)
    assert pages_accounted(alloc, radix, sched)
