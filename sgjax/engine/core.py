"""EngineCore: the model, its KV cache and the scheduler loop on a background thread.

It takes GenerateRequests and reports each step's progress as TokenDeltas, in one call of `on_updates` per
step (on the engine thread). The Engine API sits in front of it in this process; in a child process
(engine_process.py) the same core sends its deltas over a pipe.

The loop: Scheduler.schedule -> ModelRunner.launch (forward) and .sample (on-device sampling; the next step
is scheduled while it runs) -> ModelRunner.collect -> OutputProcessor (append the token, advance its grammar,
detokenize, check stops). Constrained requests (regex, JSON schema, grammar, choices) carry an llguidance
matcher. A step that samples for one launches its forward pass, then processes the previous step (whose
tokens the masks depend on), fills the grammar bitmask while the forward pass runs, and only then launches
its sampling. Text the grammar forces is appended at once (jump-forward) and runs as one chunk.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from collections.abc import Callable

import jax
import numpy as np

from sgjax.cache.no_prefix_cache import NoPrefixCache
from sgjax.cache.page_allocator import PageAllocator
from sgjax.cache.radix_cache import RadixCache
from sgjax.config import EngineArgs, resolve_context_length
from sgjax.constrained.bitmask import allow_all, fill_rows, force_token
from sgjax.engine import model_setup
from sgjax.engine.detokenizer import IncrementalDetokenizer
from sgjax.engine.launch import LaunchedStep, StepBuildError, StepLauncher, StepWrites
from sgjax.engine.messages import STARTUP_PHASES, Finished, GenerateRequest, StartupPhase, TokenDelta
from sgjax.engine.output_processor import OutputProcessor, delta_of
from sgjax.engine.request import Request, Status
from sgjax.engine.scheduler import Scheduler
from sgjax.engine.stats import EngineStats
from sgjax.engine.step_channel import StepSender
from sgjax.engine.text_side import load_text_side

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, args: EngineArgs, kernel_options: dict | None = None,
                 on_phase: Callable[[StartupPhase], None] | None = None):
        """`kernel_options`: keywords for sgjax.kernels.select, to turn single kernels off in comparisons;
        `on_phase`: called as each start-up phase begins (STARTUP_PHASES), on this thread.

        Under jax.distributed with several processes this is host 0's engine: every device call of its runner
        goes to the other hosts first (follower.py runs them there), so all hosts run the same programs."""
        self.args = args
        phase = _phase_reporter(on_phase)
        phase("loading weights")
        self.loaded = model_setup.load(args, kernel_options)
        self.kernels = self.loaded.kernels
        cfg = self.loaded.config
        phase("loading the tokenizer")
        self.tokenizer, self.eos_token_ids, self.grammar = load_text_side(args.model_path, args.load_format,
                                                                          cfg.vocab_size)
        self.context_length = resolve_context_length(args.context_length, cfg.max_position_embeddings)
        phase("allocating the KV pool")
        num_pages = model_setup.pool_pages(args, self.loaded, self.context_length)
        # The other hosts' runners are built from this host's pool size (their memory may differ)
        self.followers = StepSender.open(args, num_pages) if jax.process_count() > 1 else None
        self.runner = model_setup.make_runner(args, self.loaded, num_pages, self.context_length,
                                              on_compiling=lambda: phase("compiling the first step programs"))
        if self.followers is not None:
            self.runner.mirror = self.followers
        self.allocator = PageAllocator(num_pages, args.page_size)
        self.radix = NoPrefixCache() if args.disable_radix_cache else RadixCache(self.allocator)
        self.scheduler = Scheduler(self.allocator, self.radix, max_running_requests=args.max_running_requests,
                                   chunked_prefill_size=model_setup.prefill_budget(args, self.context_length),
                                   context_length=self.context_length, policy=args.schedule_policy,
                                   step_token_target=args.step_token_target, round_up=self.runner.bucket_for)
        self.stats = EngineStats()
        self.outputs = OutputProcessor(self.eos_token_ids, self.context_length, self._finish_running, self._progress)
        self.launcher = StepLauncher(self.runner, self.scheduler, self.stats, args.max_running_requests,
                                     self.eos_token_ids)
        # Called on the engine thread with each step's deltas (the Engine API routes them to its callers)
        self.on_updates: Callable[[list[TokenDelta]], None] = lambda deltas: None
        self._outbox: list[TokenDelta] = []
        self._inbox: queue.Queue = queue.Queue()
        self._stopped = False
        self._next_step: LaunchedStep | None = None  # launched, not yet processed; its sampling may wait for masks
        self._thread = threading.Thread(target=self._loop, name="sgjax-engine", daemon=True)
        self._thread.start()

    # ---- what callers use (any thread) -----------------------------------------------------------
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

    def submit(self, message: GenerateRequest) -> bool:
        """Queue a request for the engine thread."""
        self._inbox.put(("add", message))
        return True

    def abort(self, rid: str) -> None:
        self._inbox.put(("abort", rid))

    def flush_cache(self, timeout: float = 30.0) -> bool:
        """Empty the radix cache (on the engine thread); False if requests are still running."""
        done, result = threading.Event(), []
        self._inbox.put(("flush", (done, result)))
        done.wait(timeout)
        return bool(result and result[0])

    def load_stats(self) -> dict:
        """What the server reports of the engine's load (/get_server_info, /metrics)."""
        return dict(num_pages=self.allocator.num_usable, free_pages=self.allocator.num_free,
                    # pages only the radix cache holds: evicted on demand, so as good as free for new work
                    evictable_pages=self.radix.evictable_tokens // self.args.page_size,
                    num_preemptions=self.scheduler.num_preemptions,
                    num_running_requests=len(self.scheduler.running),
                    num_queued_requests=len(self.scheduler.waiting),
                    prefix_cache_hit_rate=self.radix.hit_rate if self.radix.shares_prefixes else None)

    def timings(self) -> dict:
        """The engine thread's counters so far (EngineStats.timings)."""
        return self.stats.timings()

    def shutdown(self) -> None:
        self._stopped = True
        self._inbox.put(("wake", None))
        self._thread.join(timeout=30)
        if self.followers is not None:  # after the last step: the other hosts stop behind it
            self.followers.close()
        if self.runner.queue is not None:
            self.runner.queue.close()

    # ---- the engine thread ---------------------------------------------------------------------
    def _loop(self) -> None:
        """Launch step N+1, then process step N's results while the device runs N+1."""
        in_flight = None
        while not self._stopped:
            try:
                self._drain_inbox(block=in_flight is None and not self.scheduler.has_work())
                if self._stopped:
                    break
                try:
                    self._next_step = self.launcher.launch(in_flight) if self.scheduler.has_work() else None
                except StepBuildError as e:
                    self._fail_unbuildable(e)
                if in_flight is not None:
                    self.launcher.sample(in_flight)  # if launch did not
                    self._process(in_flight)
                in_flight, self._next_step = self._next_step, None
                if in_flight is not None and in_flight.constrained:
                    started = time.perf_counter()
                    in_flight.bitmask = self._grammar_masks(in_flight)  # they needed step N's tokens
                    self.stats.host_s["masks"] += time.perf_counter() - started
                if self.args.disable_overlap_schedule and in_flight is not None:
                    self.launcher.sample(in_flight)
                    self._process(in_flight)
                    in_flight = None
            except Exception as e:  # keep serving: fail the requests of the steps it broke, name the error
                self._fail_steps([s for s in (in_flight, self._next_step, self.launcher.launching) if s is not None],
                                 f"engine error: {type(e).__name__}: {e}")
                in_flight = self._next_step = None  # their results are not collected: nothing is unknown
                self.launcher.launching = None
            self._flush_outbox()
            if in_flight is None:
                self.stats.idle()

    def _fail_steps(self, steps: list[StepWrites], message: str) -> None:
        """Fail the requests of steps that broke (called while handling the error), and take the K/V those steps
        wrote out of the radix cache: it may never have been written. The prompts went into the cache as the
        steps launched, and requests that reuse part of them can still be running; a running request whose
        cached prefix holds such K/V fails too."""
        failed = {id(req): req for step in steps for req, _ in step.batch}
        logger.exception("engine step failed; failing its %d requests", len(failed))
        for req in failed.values():
            req.num_unknown = 0
            if not req.finished:
                self._fail(req, message)
        unwritten = set().union(*(step.pages_written(self.args.page_size) for step in steps))
        for req in list(self.scheduler.running):
            if unwritten.intersection(req.pages[:req.num_tree_pages]):
                self._fail(req, f"{message} (its cached prefix came from a step that failed)")
        self.radix.discard(unwritten)

    def _fail_unbuildable(self, error: StepBuildError) -> None:
        """A step could not be built: fail the requests that cannot be built alone (all of the step's if none
        can be singled out); the others run in the next step."""
        culprits = []
        for req in error.requests:
            try:
                self.launcher.check(req)
            except Exception as e:
                culprits.append((req, e))
        if not culprits:
            culprits = [(req, error) for req in error.requests]
        logger.error("a step could not be built (%s); failing %d of its %d requests", error, len(culprits),
                     len(error.requests))
        for req, e in culprits:
            self.scheduler.abort(req.rid)
            self._end(req, {"type": "abort", "message": f"the request cannot run: {e}"})

    def _drain_inbox(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if item[0] == "add":
                try:
                    self._add(item[1])
                except Exception as e:  # this request alone: nothing of it is in a step yet
                    logger.exception("request %s could not be added", item[1].rid)
                    self._outbox.append(Finished.aborted(item[1].wire_id, f"the request cannot run: {e}"))
            elif item[0] == "flush":
                done, result = item[1]
                idle = not self.scheduler.has_work()
                if idle:
                    self.radix.reset()
                result.append(idle)
                done.set()
            elif item[0] == "abort":
                req = self.scheduler.abort(item[1])
                if req is not None:
                    self._end(req, {"type": "abort"})
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, message: GenerateRequest) -> None:
        params = message.params
        req = Request(rid=message.rid, prompt_ids=message.prompt_ids, params=params, seed=message.seed,
                      group=message.group, wire_id=message.wire_id, images=message.images,
                      detokenizer=IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens,
                                                         params.spaces_between_special_tokens)
                      if self.tokenizer is not None else None)
        if params.constraint is not None:
            try:
                req.matcher = self.grammar.matcher(params.constraint)
            except Exception as e:  # the caller compiled it already; should this one still fail, say so
                self._outbox.append(Finished.aborted(message.wire_id, f"constraint: {e}"))
                return
        try:
            self.launcher.check(req)
        except Exception as e:  # what validation let through fails this request, not the step it would join
            logger.warning("request %s cannot run: %s", req.rid, e)
            self._outbox.append(Finished.aborted(message.wire_id, f"the request cannot run: {e}"))
            return
        if params.max_new_tokens == 0 and params.logprob_start_len < 0:
            self._end(req, {"type": "length", "length": 0})
            return
        if req.matcher is not None and not self.args.disable_jump_forward:
            self._jump_forward(req)  # text the grammar forces from the start
        if not req.finished:
            self.scheduler.add(req)

    def _grammar_masks(self, step: LaunchedStep) -> np.ndarray:
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

    def _process(self, step: LaunchedStep) -> None:
        """Bring a step's samples to the host and hand each token to the output processor."""
        out, started = self.launcher.collect(step)
        if step.targets is not None:
            self.outputs.record_prompt_logprobs(step.batch, step.starts, step.targets, out)
        tokens, logprobs = out.tokens.tolist(), out.logprobs.tolist()
        for i in step.sampling_rows:
            req = step.batch[i][0]
            req.num_unknown -= 1
            if req.finished:
                continue  # it finished (or was aborted) while this step ran: the token is surplus
            k, ids = req.params.top_logprobs_num, req.params.token_ids_logprob
            top = list(zip(out.top_logprobs[i, :k].tolist(), out.top_ids[i, :k].tolist())) if k else []
            try:
                given = list(zip(out.ids_logprobs[i, :len(ids)].tolist(), ids)) if ids else []
                self.outputs.append_token(req, tokens[i], logprobs[i], top, given)
                if req.matcher is not None and not req.finished and not self.args.disable_jump_forward:
                    self._jump_forward(req)
            except Exception as e:  # this request's output failed (detokenizing, its grammar): it alone fails
                logger.exception("request %s failed processing its token", req.rid)
                self._fail(req, f"engine error: {type(e).__name__}: {e}")
        self.stats.host_s["process"] += time.perf_counter() - started

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
            self.outputs.append_token(req, token, 0.0, [])
            if req.finished:
                break

    # ---- a request's progress, reported once per step ---------------------------------------------
    def _finish_running(self, req: Request, reason: dict, text: str) -> None:
        self.scheduler.finish(req)
        self._end(req, reason, text)

    def _fail(self, req: Request, message: str) -> None:
        """End a running or waiting request as aborted, its pages released."""
        self.scheduler.abort(req.rid)
        self._end(req, {"type": "abort", "message": message})

    def _end(self, req: Request, reason: dict, text: str = "") -> None:
        req.status, req.finish_reason = Status.FINISHED, reason
        self._outbox.append(delta_of(req, text))

    def _progress(self, req: Request, text: str) -> None:
        self._outbox.append(delta_of(req, text))

    def _flush_outbox(self) -> None:
        if self._outbox:
            deltas, self._outbox = self._outbox, []
            try:
                self.on_updates(deltas)
            except Exception:
                logger.exception("delivering a step's updates failed")


def _phase_reporter(on_phase: Callable[[StartupPhase], None] | None) -> Callable[[str], None]:
    """phase(name) for one of STARTUP_PHASES: `on_phase` called with it, numbered."""
    def phase(name: str) -> None:
        if on_phase is not None:
            on_phase(StartupPhase(name, STARTUP_PHASES.index(name) + 1, len(STARTUP_PHASES)))

    return phase
