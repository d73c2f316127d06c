"""Engine: the offline API (generate, async_generate, async_stream) over a background engine thread.

A request's path: tokenize (chat template for message lists) -> Request -> the engine thread's inbox
-> Scheduler.schedule -> ModelRunner.launch (forward) and .sample (on-device sampling; the next step
is scheduled while it runs) -> ModelRunner.collect -> append the token, advance its grammar,
detokenize incrementally, check stop conditions -> the caller's callback (an Event for sync calls, an
asyncio queue for async ones).

Constrained requests (a regex, JSON schema, grammar or choices) carry an llguidance matcher. A step
that samples for one launches its forward pass, then processes the previous step (whose tokens the
masks depend on), fills the grammar bitmask while the forward pass runs, and only then launches its
sampling. Text the grammar forces is appended at once (jump-forward) and runs as one chunk.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from sgjax.executor.batch import SeqChunk
from sgjax.cache.kv_pool import KVPool, KVPoolConfig
from sgjax.cache.page_allocator import PageAllocator, pages_for
from sgjax.cache.radix_cache import RadixCache
from sgjax.config import KV_CACHE_DTYPES, EngineArgs
from sgjax.constrained.bitmask import allow_all, fill_rows, force_token
from sgjax.platform.device_memory import cuda_memory_info, xla_memory_limit
from sgjax.engine.frontend import Callback, RequestFrontend, load_text_side
from sgjax.executor.model_runner import ModelRunner, StepHandle
from sgjax.engine.request import Request, Status
from sgjax.executor.sampler import SamplerFeatures, SamplingBatch, logit_bias_arrays
from sgjax.engine.scheduler import Scheduler
from sgjax.kernels import reads_shared_prefixes, resolve_backend, triton_kernel_mode
from sgjax.platform.mesh import make_mesh
from sgjax.models.loader import load_model
from sgjax.executor.shared_prefix import MIN_SHARED_TOKENS, order_by_first_page

logger = logging.getLogger(__name__)
HOST_BOUND_WAIT_S = 0.5e-3  # a step whose results came this soon after the engine thread asked was host-bound


@dataclasses.dataclass(slots=True)
class StepRecord:
    """One launched step, for benchmarks' timelines and floors (Engine.step_log)."""

    launched: float  # perf_counter at launch
    decodes: int  # rows decoding one token
    prefill_tokens: int  # tokens of prompt chunks
    kv_tokens: int  # tokens of K/V its attention must read (a shared prefix once)
    waited: float = 0.0  # seconds the engine thread then waited for its results (0: the host was slower)


class Engine(RequestFrontend):
    """The model and its scheduler on a background thread of this process (the caller-facing API:
    frontend.RequestFrontend)."""

    def __init__(self, model_path: str | None = None, *, args: EngineArgs | None = None, **kwargs):
        args = args or EngineArgs(model_path=model_path, **kwargs)
        self.args = args
        if args.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", args.compilation_cache_dir)
        self.attention_backend = resolve_backend(args.attention_backend, args.page_size)
        # The fused residual add + norm made the ShareGPT-like run 0.5% faster with a bf16 pool but 3.5% slower
        # with an fp8 one (four A/B pairs on one H100, BENCHMARKS.md session 19; the cause is not known):
        # fp8 pools keep the plain add and norm.
        self.loaded = load_model(args.model_path, make_mesh(args.mesh), dtype=args.dtype,
                                 load_format=args.load_format, attention_backend=self.attention_backend,
                                 fused_norm=not args.kv_cache_dtype.startswith("fp8"))
        cfg = self.loaded.config
        self.tokenizer, self.eos_token_ids, self.grammar = load_text_side(args.model_path, args.load_format,
                                                                          cfg.vocab_size)
        self.context_length = args.context_length or cfg.max_position_embeddings
        ps = args.page_size
        max_pages_per_seq = pages_for(self.context_length, ps)
        kv_dtype = KV_CACHE_DTYPES[args.kv_cache_dtype]
        pool_cfg = KVPoolConfig.for_model(cfg, args.num_pages or 2, ps, kv_dtype)
        num_pages = args.num_pages or self._pages_from_memory(pool_cfg, max_pages_per_seq)
        pool = KVPool(KVPoolConfig.for_model(cfg, num_pages, ps, kv_dtype), self.loaded.mesh)
        self.allocator = PageAllocator(num_pages, ps)
        self.radix = None if args.disable_radix_cache else RadixCache(self.allocator)
        prefill_budget = args.chunked_prefill_size or self.context_length
        self.runner = ModelRunner(self.loaded, pool, max_seqs=args.max_running_requests,
                                  max_pages_per_seq=max_pages_per_seq,
                                  max_tokens=prefill_budget + args.max_running_requests,
                                  min_bucket=args.min_token_bucket,
                                  enable_prompt_logprobs=args.enable_prompt_logprobs,
                                  max_prefix_groups=args.shared_prefix_groups
                                  if reads_shared_prefixes(self.attention_backend) else 0,
                                  triton_kernels=triton_kernel_mode(self.attention_backend))
        self.scheduler = Scheduler(self.allocator, self.radix, max_running_requests=args.max_running_requests,
                                   chunked_prefill_size=prefill_budget, context_length=self.context_length,
                                   policy=args.schedule_policy, step_token_target=args.step_token_target,
                                   round_up=self.runner.bucket_for)
        self._seeds = np.random.default_rng(args.random_seed)
        self._callbacks: dict[int, tuple[Callback, asyncio.AbstractEventLoop | None]] = {}
        # Updates for callers on event loops, sent once per step and loop (one wake-up, not one per token)
        self._outbox: dict[asyncio.AbstractEventLoop, list] = {}
        self.finish_hooks: list[Callable[[Request], None]] = []  # called on the engine thread (metrics)
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = False
        self._next_step: _Step | None = None  # launched, not yet processed; its sampling may wait for masks
        self.num_steps = 0
        self.device_wait_s = 0.0  # engine thread blocked on step results: the device was the bottleneck
        self.num_host_bound_steps = 0  # steps whose results were ready (nearly) as soon as the thread asked
        self.step_tokens = self.step_tokens_sq = 0  # the steps' token counts (not padded), summed and squared
        self.busy_s = 0.0  # seconds from a first launch to the end of the last step of the run it began
        self._busy_since: float | None = None  # when the current run of steps began (None: idle)
        # Engine-thread seconds by phase (schedule, enqueue, process, masks): where the host's time goes
        # (every phase present from the start: timings() copies it from another thread, and a key added meanwhile
        # would break that copy)
        self.host_s: collections.Counter[str] = collections.Counter(schedule=0.0, enqueue=0.0, process=0.0, masks=0.0)
        # Set to a list to record a StepRecord per step (benchmarks' timelines and floors)
        self.step_log: list[StepRecord] | None = None
        self._thread = threading.Thread(target=self._loop, name="sgjax-engine", daemon=True)
        self._thread.start()

    @property
    def config(self):
        """The model's ModelConfig."""
        return self.loaded.config

    @property
    def alive(self) -> bool:
        """Whether the engine thread still runs (False after shutdown)."""
        return self._thread.is_alive()

    @property
    def num_usable_pages(self) -> int:
        return self.allocator.num_usable

    def load_stats(self) -> dict:
        """What the server reports of the engine's load (/get_server_info, /metrics)."""
        return dict(num_pages=self.allocator.num_usable, free_pages=self.allocator.num_free,
                    num_running_requests=len(self.scheduler.running),
                    num_queued_requests=len(self.scheduler.waiting),
                    prefix_cache_hit_rate=self.radix.hit_rate if self.radix else None)

    def timings(self) -> dict:
        """The engine thread's counters so far (benchmarks take differences): steps, host-bound steps, seconds
        busy (with steps to run: a served run's stepping span), the steps' tokens summed and squared (how even
        they were), seconds waited on the device, host seconds by phase."""
        busy, since = self.busy_s, self._busy_since  # in this order: a run ending meanwhile is not counted twice
        busy += time.perf_counter() - since if since is not None else 0.0
        return dict(steps=self.num_steps, host_bound_steps=self.num_host_bound_steps, busy_s=busy,
                    step_tokens=self.step_tokens, step_tokens_sq=self.step_tokens_sq,
                    device_wait_s=self.device_wait_s, host_s=dict(self.host_s))

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)

    def _submit(self, req: Request, callback: Callback, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Queue a request for the engine thread; `callback` runs there, or on `loop` if given."""
        self._inbox.put(("add", req, (callback, loop)))

    def flush_cache(self, timeout: float = 30.0) -> bool:
        """Empty the radix cache (on the engine thread); False if requests are still running."""
        done, result = threading.Event(), []
        self._inbox.put(("flush", (done, result)))
        done.wait(timeout)
        return bool(result and result[0])

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        """Launch step N+1, then process step N's results while the device runs N+1."""
        in_flight = None
        while not self._stopped:
            try:
                self._drain_inbox(block=in_flight is None and not self.scheduler.has_work())
                if self._stopped:
                    break
                self._next_step = self._launch(in_flight) if self.scheduler.has_work() else None
                if in_flight is not None:
                    self._sample(in_flight)  # if _launch did not
                    self._process(in_flight)
                    self._flush_outbox()
                in_flight, self._next_step = self._next_step, None
                if in_flight is not None and in_flight.constrained:
                    started = time.perf_counter()
                    in_flight.bitmask = self._grammar_masks(in_flight)  # they needed step N's tokens
                    self.host_s["masks"] += time.perf_counter() - started
                if self.args.disable_overlap_schedule and in_flight is not None:
                    self._sample(in_flight)
                    self._process(in_flight)
                    in_flight = None
            except Exception as e:  # keep serving: fail what was in flight, name the error
                logger.exception("engine step failed")
                in_flight = self._next_step = None
                for req in list(self.scheduler.running) + list(self.scheduler.waiting):
                    self.scheduler.abort(req.rid)
                    req.num_unknown = 0
                    self._finish(req, {"type": "abort", "message": f"engine error: {e}"})
            self._flush_outbox()
            if in_flight is None and self._busy_since is not None:  # the run of steps ended
                self.busy_s += time.perf_counter() - self._busy_since
                self._busy_since = None

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                _, req, callback = item
                self._callbacks[id(req)] = callback  # (function, event loop or None)
                if req.params.max_new_tokens == 0 and req.params.logprob_start_len < 0:
                    self._finish(req, {"type": "length", "length": 0})
                else:
                    if req.matcher is not None and not self.args.disable_jump_forward:
                        self._jump_forward(req)  # text the grammar forces from the start
                    if not req.finished:
                        self.scheduler.add(req)
            elif item[0] == "flush":
                done, result = item[1]
                idle = not self.scheduler.has_work()
                if idle and self.radix is not None:
                    self.radix.reset()
                result.append(idle)
                done.set()
            elif item[0] == "abort":
                req = self.scheduler.abort(item[1])
                if req is not None:
                    self._finish(req, {"type": "abort"})
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _launch(self, previous: "_Step | None") -> "_Step | None":
        """Schedule and enqueue one step, and its sampling unless it waits for grammar masks.

        The previous step's sampling, if it waited for masks, is enqueued just before this step's
        forward pass, after the host work of scheduling, so the device goes from one to the other.
        """
        started = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch:
            return None
        batch, prefix_groups = self._group_shared_prefixes(batch)
        reqs = [r for r, _ in batch]
        params = [r.params for r in reqs]
        chunks = [SeqChunk(req.chunk_tokens(n), req.num_computed, req.page_array()) for req, n in batch]
        sampling = SamplingBatch.build(
            params, [r.seed for r in reqs], [len(r.output_ids) + r.num_unknown for r in reqs],
            [r.slot for r in reqs], [len(r.prompt_ids) for r in reqs], self.args.max_running_requests,
            self.runner.spare_slot)
        targets = None
        if any(self._wants_prompt_logprobs(r, n) for r, n in batch):
            targets = [self._prompt_targets(r, n) for r, n in batch]
        starts = [r.num_computed for r in reqs]
        prepared = self.runner.prepare(chunks, sampling, SamplerFeatures.of(params), targets, prefix_groups)
        enqueued = time.perf_counter()
        if previous is not None:
            self._sample(previous)
        # A penalised request starts from zero counts (they are recounted after a preemption: it caches no
        # prefix, so its first chunk is its prompt's start).
        fresh = [r.slot for r in reqs if r.num_computed == 0 and r.params.uses_penalties]
        if fresh:
            self.runner.clear_penalty_slots(fresh)
        handle = self.runner.launch(prepared)
        launched = time.perf_counter()
        if self._busy_since is None:
            self._busy_since = started
        self.host_s["enqueue"] += launched - enqueued
        self.num_steps += 1
        tokens = sum(n for _, n in batch)
        self.step_tokens += tokens
        self.step_tokens_sq += tokens * tokens
        record = None
        if self.step_log is not None:
            decodes = sum(n == 1 for _, n in batch)
            record = StepRecord(time.perf_counter(), decodes, tokens - decodes, prepared.kv_tokens)
            self.step_log.append(record)
        sampling_rows = []
        for i, (req, n) in enumerate(batch):
            pending = req.num_pending
            req.num_computed += n
            if pending > 1:  # a prompt chunk
                self.scheduler.cache_prefill(req)
            if pending == n:  # the chunk reached the end: its last logits give a new token
                req.num_unknown += 1
                req.unknown_row = i
                sampling_rows.append(i)
        step = _Step(batch, starts, targets, sampling_rows, handle,
                     constrained=any(batch[i][0].matcher is not None for i in sampling_rows), record=record)
        if any(batch[i][0].params.logit_bias for i in sampling_rows):
            rows = set(sampling_rows)  # a chunk that does not end its prompt samples nothing
            step.bias = logit_bias_arrays([req.params.logit_bias if i in rows else None
                                           for i, (req, _) in enumerate(batch)], self.args.max_running_requests)
        now = time.perf_counter()
        self.host_s["schedule"] += (enqueued - started) + (now - launched)
        if not step.constrained:
            self._sample(step)
            self.host_s["enqueue"] += time.perf_counter() - now
        return step

    def _group_shared_prefixes(self, batch: list[tuple[Request, int]]) -> tuple[list[tuple[Request, int]], list[int]]:
        """The batch reordered so requests whose cached pages begin alike are contiguous, and the sizes of
        those leading groups (sgjax/executor/shared_prefix.py), where the step can carry them."""
        max_groups = self.runner.prefix_groups_for(sum(n for _, n in batch))
        if not max_groups or len(batch) < 2:
            return batch, []
        keys = [req.pages[0] if req.num_tree_pages and req.num_computed >= MIN_SHARED_TOKENS else None
                for req, _ in batch]
        order, sizes = order_by_first_page(keys, max_groups)
        return [batch[i] for i in order] if sizes else batch, sizes

    def _sample(self, step: "_Step") -> None:
        """Enqueue a step's sampling, once (a constrained step's once its masks are computed)."""
        if not step.handle.device_outputs and (not step.constrained or step.bitmask is not None):
            self.runner.sample(step.handle, step.bitmask, step.bias)

    def _grammar_masks(self, step: "_Step") -> np.ndarray:
        """Each constrained row of the step limited to what its grammar allows next."""
        bitmask = allow_all(self.args.max_running_requests, self.loaded.config.vocab_size)
        rows = []
        for i in step.sampling_rows:
            req = step.batch[i][0]
            if req.matcher is None or req.finished:
                continue
            if self.args.disable_jump_forward:
                # The tokens jump-forward would append after the last sampled one, one per step: the
                # grammar is asked once per run of forced text, as jump-forward asks it.
                if req.forced_queue is None:
                    req.forced_queue = collections.deque(req.matcher.compute_ff_tokens())
                if req.forced_queue:
                    force_token(bitmask, i, req.forced_queue.popleft())
                    continue
                req.forced_queue = None  # this step samples freely; the next asks the grammar again
            rows.append((req.matcher, i))
        fill_rows(self.grammar.executor, rows, bitmask)
        return bitmask

    def _process(self, step: "_Step") -> None:
        """Bring a step's samples to the host: append tokens, detokenize, check stops, notify callers."""
        batch, targets = step.batch, step.targets
        waited = time.perf_counter()
        out = self.runner.collect(step.handle)
        started = time.perf_counter()
        self.device_wait_s += started - waited
        self.num_host_bound_steps += started - waited < HOST_BOUND_WAIT_S
        if step.record is not None:
            step.record.waited = started - waited
        if targets is not None:
            self._record_prompt_logprobs(batch, step.starts, targets, out)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        for i in step.sampling_rows:
            req = batch[i][0]
            req.num_unknown -= 1
            if req.finished:
                continue  # it finished (or was aborted) while this step ran: the token is surplus
            k = req.params.top_logprobs_num
            top = list(zip(out.top_logprobs[i, :k].tolist(), out.top_ids[i, :k].tolist())) if k else []
            self._append_token(req, tokens[i], logprobs[i], top)
            if req.matcher is not None and not req.finished and not self.args.disable_jump_forward:
                self._jump_forward(req)
        self.host_s["process"] += time.perf_counter() - started

    def _jump_forward(self, req: Request) -> None:
        """Append the tokens the grammar forces next, so they run as one chunk instead of a step each.

        If the request is also in the step launched after this one, that step's sample for it would be
        the first forced token: the row is dropped from the step and the forced tokens run next.
        """
        forced = req.matcher.compute_ff_tokens()
        if not forced:
            return
        if req.num_unknown:
            nxt = self._next_step
            assert nxt is not None and any(nxt.batch[i][0] is req for i in nxt.sampling_rows)
            nxt.sampling_rows = [i for i in nxt.sampling_rows if nxt.batch[i][0] is not req]
            req.num_unknown -= 1
        for token in forced:
            # Certain under the constraint: logprob 0 (the step never computed the model's own)
            self._append_token(req, token, 0.0, [])
            if req.finished:
                break

    @staticmethod
    def _wants_prompt_logprobs(req: Request, n: int) -> bool:
        start = req.params.logprob_start_len
        return start >= 0 and req.num_computed < len(req.prompt_ids) - 1 and req.num_computed + n >= max(start, 1)

    def _prompt_targets(self, req: Request, n: int) -> list[int]:
        """For each token of this chunk, the prompt token after it if its logprob is wanted, else -1."""
        start, prompt = max(req.params.logprob_start_len, 1), req.prompt_ids
        if req.params.logprob_start_len < 0:
            return [-1] * n
        return [prompt[q + 1] if start <= q + 1 < len(prompt) else -1
                for q in range(req.num_computed, req.num_computed + n)]

    def _record_prompt_logprobs(self, batch, starts, targets, out) -> None:
        offset = 0
        for (req, n), start, per_chunk in zip(batch, starts, targets):
            k = req.params.top_logprobs_num
            for i, target in enumerate(per_chunk):
                if target >= 0:
                    row = offset + i
                    top = list(zip(out.prompt_top_logprobs[row, :k].tolist(), out.prompt_top_ids[row, :k].tolist()))
                    # the chunk's i-th token predicts the prompt token at position start + i + 1
                    req.input_logprobs[start + i + 1] = (float(out.prompt_logprobs[row]), top)
            offset += n

    def _append_token(self, req: Request, token: int, logprob: float, top: list[tuple[float, int]]) -> None:
        p = req.params
        if p.max_new_tokens == 0:  # it ran only for its prompt logprobs
            self.scheduler.finish(req)
            return self._finish(req, {"type": "length", "length": 0})
        if req.first_token_time is None:
            req.first_token_time = time.monotonic()
        req.output_ids.append(token)
        req.output_logprobs.append(logprob)
        if p.top_logprobs_num:
            req.output_top_logprobs.append(top)
        finish = None
        if token in (p.stop_token_ids or ()) or (not p.ignore_eos and token in self.eos_token_ids):
            finish = {"type": "stop", "matched": token}  # the stop token's text is not part of the output
        elif req.detokenizer is not None:
            req.detokenizer.add(token)
        if req.matcher is not None and finish is None:
            finish = self._advance_grammar(req, token)
        num_out = len(req.output_ids)
        if finish is None and (num_out >= p.max_new_tokens or len(req.prompt_ids) + num_out >= self.context_length):
            finish = {"type": "length", "length": len(req.output_ids)}
        if finish is not None and req.detokenizer is not None:
            req.detokenizer.flush()
        text = req.detokenizer.text if req.detokenizer is not None else ""
        for stop in p.stop_strings:
            # Only the newly decoded tail can complete a stop string.
            at = text.find(stop, max(0, len(req.text) - len(stop)))
            if at != -1:
                text, finish = text[:at], {"type": "stop", "matched": stop}
                break
        if finish is None:
            # Hold back what could still turn out to be the start of a stop string.
            hold = max((len(s) - 1 for s in p.stop_strings), default=0)
            text = text[: max(len(req.text), len(text) - hold)]
        delta, req.text = text[len(req.text):], text
        if finish is not None:
            self.scheduler.finish(req)
            self._finish(req, finish, delta)
        else:
            self._notify(req, delta)

    @staticmethod
    def _advance_grammar(req: Request, token: int) -> dict | None:
        """Feed the token to the request's matcher; the finish reason if the grammar is complete."""
        if not req.matcher.consume_token(token):
            return {"type": "abort", "message": f"token {token} broke the constraint: {req.matcher.get_error()}"}
        if req.matcher.is_stopped():  # nothing may follow but EOS: the output is complete
            return {"type": "stop", "matched": None}
        return None

    def _finish(self, req: Request, reason: dict, delta: str = "") -> None:
        req.status, req.finish_reason = Status.FINISHED, reason
        for hook in self.finish_hooks:
            hook(req)
        self._notify(req, delta)
        self._callbacks.pop(id(req), None)

    def _notify(self, req: Request, delta: str) -> None:
        """Tell the caller (at once, or with the step's other updates for its event loop)."""
        callback, loop = self._callbacks[id(req)]
        if loop is not None:
            self._outbox.setdefault(loop, []).append((callback, req, delta, req.finished))
            return
        try:
            callback(req, delta, req.finished)
        except Exception:
            self._caller_gone(req)

    def _flush_outbox(self) -> None:
        """Send each event loop its updates of this step in one call."""
        outbox, self._outbox = self._outbox, {}
        for loop, updates in outbox.items():
            try:
                loop.call_soon_threadsafe(_deliver, updates)
            except Exception:  # the loop is closed
                for _, req, _, _ in updates:
                    self._caller_gone(req)

    def _caller_gone(self, req: Request) -> None:
        """A caller that is gone (closed event loop) gets its request aborted."""
        logger.warning("request %s: its caller is gone; aborting it", req.rid, exc_info=True)
        self._callbacks.pop(id(req), None)
        if not req.finished:
            self._inbox.put(("abort", req.rid))

    # ---- set-up helpers ------------------------------------------------------------------------
    def _pages_from_memory(self, pool_cfg: KVPoolConfig, max_pages_per_seq: int) -> int:
        """Pages that fit in mem_fraction_static of device memory after the weights."""
        device = jax.devices()[0]
        stats = device.memory_stats() or {}
        if "bytes_limit" not in stats and device.platform == "gpu":
            # XLA's VMM allocator (SKIP_TEMP command buffers) reports no limit: ask the driver
            info = cuda_memory_info(device.local_hardware_id)
            if info is not None:
                free, total = info
                stats = {"bytes_limit": xla_memory_limit(total), "bytes_in_use": total - free}
        if "bytes_limit" not in stats:
            if device.platform != "cpu":
                raise ValueError(f"{device.device_kind} reports no memory limit: give num_pages (--num-pages)")
            return 1 + self.args.max_running_requests * max_pages_per_seq  # every request at full context
        tensor = self.loaded.mesh.shape["tensor"]
        per_device = pool_cfg.bytes_per_page // (tensor if pool_cfg.num_kv_heads % tensor == 0 else 1)
        free = stats["bytes_limit"] * self.args.mem_fraction_static - stats["bytes_in_use"]
        pages = int(free // per_device)
        if pages < 2:
            raise ValueError(f"no device memory left for the KV pool ({free / 2**30:.1f} GiB free after weights); "
                             "raise mem_fraction_static or use a larger mesh")
        return pages


def _deliver(updates: list) -> None:
    for callback, req, delta, finished in updates:
        callback(req, delta, finished)


@dataclasses.dataclass
class _Step:
    """A launched step, as _process needs it."""
    batch: list[tuple[Request, int]]
    starts: list[int]  # each request's num_computed before the step
    targets: list[list[int]] | None  # prompt-logprob targets per chunk
    sampling_rows: list[int]  # rows whose sample is the request's next token
    handle: StepHandle
    constrained: bool  # sampling waits for grammar masks
    bitmask: np.ndarray | None = None
    bias: tuple[np.ndarray, np.ndarray] | None = None  # its rows' logit biases (sampler.logit_bias_arrays)
    record: StepRecord | None = None  # its entry in Engine.step_log, if one is kept
