"""StepLauncher: turns the scheduler's next batch into a launched step on the model runner, and collects it.

A step's sampling is enqueued at once unless it waits for grammar masks; the previous step's waiting
sampling is enqueued just before this step's forward pass, after the host work of scheduling, so the
device goes from one to the other.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from sgjax.cache.page_allocator import pages_for
from sgjax.engine.image_steps import ImageSteps
from sgjax.engine.output_processor import prompt_targets, wants_prompt_logprobs
from sgjax.engine.request import Request
from sgjax.engine.scheduler import Scheduler
from sgjax.engine.stats import EngineStats, StepRecord
from sgjax.executor.batch import SeqChunk
from sgjax.executor.model_runner import ModelRunner
from sgjax.executor.sampler import SamplerFeatures, SamplingBatch, logit_bias_arrays
from sgjax.executor.shared_prefix import MIN_SHARED_TOKENS, order_by_first_page
from sgjax.executor.step import StepHandle, StepOutput


@dataclasses.dataclass
class StepWrites:
    """A step's batch and where its tokens' K/V go: what a failure of the step must undo."""

    batch: list[tuple[Request, int]]
    starts: list[int]  # each request's num_computed before the step
    # Each request's page list at launch: Request.pages is only appended to or replaced, so it keeps the
    # pages this step writes even after the request's own list changed.
    pages: list[list[int]]

    @classmethod
    def of(cls, batch: list[tuple[Request, int]]) -> StepWrites:
        """The batch about to be launched."""
        return cls(batch, [r.num_computed for r, _ in batch], [r.pages for r, _ in batch])

    def pages_written(self, page_size: int) -> set[int]:
        """The pages holding K/V this step computes (the first of a request's may hold earlier tokens too)."""
        return {p for (_, n), start, pages in zip(self.batch, self.starts, self.pages)
                for p in pages[start // page_size: pages_for(start + n, page_size)]}


@dataclasses.dataclass
class LaunchedStep(StepWrites):
    """A launched step, as processing its results needs it."""

    targets: list[list[int]] | None  # prompt-logprob targets per chunk
    sampling_rows: list[int]  # rows whose sample is the request's next token
    handle: StepHandle
    constrained: bool  # sampling waits for grammar masks
    bitmask: np.ndarray | None = None
    bias: tuple[np.ndarray, np.ndarray] | None = None  # its rows' logit biases (sampler.logit_bias_arrays)
    record: StepRecord | None = None  # its entry in EngineStats.step_log, if one is kept


class StepBuildError(Exception):
    """Building a step's host inputs failed: one of `requests` cannot run (nothing was launched)."""

    def __init__(self, requests: list[Request], cause: Exception):
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.requests = requests


class StepLauncher:
    def __init__(self, runner: ModelRunner, scheduler: Scheduler, stats: EngineStats, max_rows: int,
                 eos_token_ids: set[int] = frozenset()):
        """`eos_token_ids`: what min_new_tokens bans until a request has that many tokens."""
        self.runner, self.scheduler, self.stats, self.max_rows = runner, scheduler, stats, max_rows
        self.eos_token_ids = eos_token_ids
        self.launching: StepWrites | None = None  # the step being launched: what a failure there fails
        self.images = ImageSteps(runner) if runner.images is not None else None

    def _chunk(self, req: Request, n: int) -> SeqChunk:
        """The next n tokens of `req` as the step takes them (with M-RoPE positions and image rows if it has images)."""
        chunk = SeqChunk(req.chunk_tokens(n), req.num_computed, req.page_array())
        if req.images is not None:
            chunk.positions = req.images.chunk_positions(req.num_computed, n)
            chunk.image_rows = self.images.chunk_rows(req, n)
        return chunk

    def launch(self, previous: LaunchedStep | None) -> LaunchedStep | None:
        """Schedule and enqueue one step, and its sampling unless it waits for grammar masks."""
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if self.images is not None and batch:
            try:
                batch = self.images.prepare(batch)
            except Exception as e:
                raise StepBuildError([r for r, _ in batch], e) from e
        if not batch:
            return None
        self.launching = StepWrites.of(batch)
        grouped, prefix_groups = self._group_shared_prefixes(batch)
        if grouped is not batch:  # the same requests in another order
            batch, self.launching = grouped, StepWrites.of(grouped)
        reqs, starts = [r for r, _ in batch], self.launching.starts
        params = [r.params for r in reqs]
        try:  # nothing has changed yet: a request that breaks the build can be failed alone, the rest rescheduled
            chunks = [self._chunk(req, n) for req, n in batch]
            sampling = SamplingBatch.build(
                params, [r.seed for r in reqs], [len(r.output_ids) + r.num_unknown for r in reqs],
                [r.slot for r in reqs], [len(r.prompt_ids) for r in reqs], self.max_rows, self.runner.spare_slot)
            targets = None
            if any(wants_prompt_logprobs(r, n) for r, n in batch):
                targets = [prompt_targets(r, n) for r, n in batch]
            prepared = self.runner.prepare(chunks, sampling, SamplerFeatures.of(params), targets, prefix_groups)
        except Exception as e:
            self.launching = None  # the caller fails the culprits; the rest are rescheduled
            raise StepBuildError(reqs, e) from e
        enqueued = time.perf_counter()
        if previous is not None:
            self.sample(previous)
        # A penalised request starts from zero counts (they are recounted after a preemption: it caches no
        # prefix, so its first chunk is its prompt's start).
        fresh = [r.slot for r in reqs if r.num_computed == 0 and r.params.uses_penalties]
        if fresh:
            self.runner.clear_penalty_slots(fresh)
        handle = self.runner.launch(prepared)
        launched = time.perf_counter()
        self.stats.host_s["enqueue"] += launched - enqueued
        tokens = sum(n for _, n in batch)
        record = self.stats.launched(started, tokens, sum(n == 1 for _, n in batch), prepared.kv_tokens)
        sampling_rows = []
        for i, (req, n) in enumerate(batch):
            pending = req.num_pending
            req.num_computed += n
            if self.images is not None:
                self.images.launched(req)
            if pending > 1:  # a prompt chunk
                self.scheduler.cache_prefill(req)
            if pending == n:  # the chunk reached the end: its last logits give a new token
                req.num_unknown += 1
                req.unknown_row = i
                sampling_rows.append(i)
        step = LaunchedStep(batch, starts, self.launching.pages, targets, sampling_rows, handle,
                            constrained=any(batch[i][0].matcher is not None for i in sampling_rows), record=record)
        if any(batch[i][0].params.logit_bias or batch[i][0].params.min_new_tokens for i in sampling_rows):
            rows = set(sampling_rows)  # a chunk that does not end its prompt samples nothing
            biases = [self._bias(req) if i in rows else None for i, (req, _) in enumerate(batch)]
            if any(biases):
                step.bias = logit_bias_arrays(biases, self.max_rows)
        now = time.perf_counter()
        self.stats.host_s["schedule"] += (enqueued - started) + (now - launched)
        if not step.constrained:
            self.sample(step)
            self.stats.host_s["enqueue"] += time.perf_counter() - now
        self.launching = None
        return step

    def check(self, req: Request) -> None:
        """Build a step's per-request host inputs for this request alone: what cannot be built raises here, so
        it fails this request, not a step it shares with others."""
        p = req.params
        SamplingBatch.build([p], [req.seed], [len(req.prompt_ids)], [self.runner.spare_slot], [len(req.prompt_ids)],
                            1, self.runner.spare_slot)
        SamplerFeatures.of([p])
        bias = self._bias(req)
        if bias:
            logit_bias_arrays([bias], 1)

    def _bias(self, req: Request) -> dict[int, float] | None:
        """The logit biases of the request's next token: its logit_bias, and while it has fewer than
        min_new_tokens tokens, EOS and its stop tokens banned (SGLang's min_new_tokens)."""
        p = req.params
        if len(req.output_ids) + req.num_unknown - 1 >= p.min_new_tokens:  # num_unknown counts this token
            return p.logit_bias
        banned = set(p.stop_token_ids or ()) | (set() if p.ignore_eos else set(self.eos_token_ids))
        return {**(p.logit_bias or {}), **dict.fromkeys(banned, float("-inf"))}

    def sample(self, step: LaunchedStep) -> None:
        """Enqueue a step's sampling, once (a constrained step's once its masks are computed)."""
        if not step.handle.device_outputs and (not step.constrained or step.bitmask is not None):
            self.runner.sample(step.handle, step.bitmask, step.bias)

    def collect(self, step: LaunchedStep) -> tuple[StepOutput, float]:
        """Wait for a step's results; they and the perf_counter when they arrived."""
        waited = time.perf_counter()
        out = self.runner.collect(step.handle)
        arrived = time.perf_counter()
        self.stats.collected(arrived - waited, step.record)
        return out, arrived

    def _group_shared_prefixes(self, batch: list[tuple[Request, int]]) -> tuple[list[tuple[Request, int]], list[int]]:
        """The batch reordered so requests whose cached pages begin alike are contiguous, and the sizes of
        those leading groups (executor/shared_prefix.py), where the step can carry them."""
        max_groups = self.runner.prefix_groups_for(sum(n for _, n in batch))
        if not max_groups or len(batch) < 2:
            return batch, []
        keys = [req.pages[0] if req.num_tree_pages and req.num_computed >= MIN_SHARED_TOKENS else None
                for req, _ in batch]
        order, sizes = order_by_first_page(keys, max_groups)
        return [batch[i] for i in order] if sizes else batch, sizes
