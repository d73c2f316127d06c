"""Engine: the public API of an engine (generate, async_generate, async_stream, stream, abort, shutdown).

A request's way: tokenize (chat template for message lists) and validate -> a GenerateRequest for the core ->
the core's scheduler loop (core.py) on its engine thread, in this process or in a child process
(engine_process.py) -> each step's TokenDeltas back -> the caller's RequestOutput and callback (an Event for
blocking calls, an asyncio queue for async ones, run on the caller's event loop).
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator

from sgjax.config import EngineArgs
from sgjax.engine.image_inputs import ImagePreprocessor
from sgjax.engine.messages import Finished, GenerateRequest, StartupPhase, TokenDelta
from sgjax.engine.outputs import RequestOutput
from sgjax.engine.request_builder import ImageData, Prompt, RequestBuilder
from sgjax.engine.sampling_params import SamplingParams
from sgjax.models.default_model import default_model_path, model_name

logger = logging.getLogger(__name__)
Callback = Callable[[RequestOutput, str, bool], None]  # (request, new text, finished)


class Engine:
    def __init__(self, model_path: str | None = None, *, args: EngineArgs | None = None, engine_process: bool = False,
                 restart_engine: bool = False, kernel_options: dict | None = None,
                 on_phase: Callable[[StartupPhase], None] | None = None, **kwargs):
        """The model runs on a thread of this process, or with `engine_process` in a child process (the server's
        default: its Python then does not share the engine thread's GIL); `restart_engine`: a child process that
        dies is started again (the requests it had fail; later ones are served once it is back).
        `kernel_options`: keywords for sgjax.kernels.select, to turn single kernels off in comparisons (in this
        process only); `on_phase`: called as each phase of the start-up begins (the server's /health shows it)."""
        self._restart, self._stopping = restart_engine and engine_process, False
        self.num_restarts = 0
        self.args = args or EngineArgs(model_path=model_path, **kwargs)
        if self.args.model_path is None:  # the bundled default model
            self.args = dataclasses.replace(self.args, model_path=default_model_path())
        self.model_name = model_name(self.args.model_path)
        if engine_process:
            from sgjax.engine.engine_process import EngineProcess

            self.core = EngineProcess(self.args, on_phase=on_phase)
            self.core.on_exit = self._core_exited
        else:
            from sgjax.engine.core import EngineCore

            self.core = EngineCore(self.args, kernel_options, on_phase)
        self.in_process = not engine_process
        self.tokenizer, self.grammar = self.core.tokenizer, self.core.grammar
        self.config, self.context_length = self.core.config, self.core.context_length
        self.num_usable_pages = self.core.num_usable_pages
        self.requests = RequestBuilder(self.args, self.tokenizer, self.grammar, self.config.vocab_size,
                                       self.context_length, self.num_usable_pages,
                                       ImagePreprocessor.for_model(self.args, self.config))
        self.finish_hooks: list[Callable[[RequestOutput], None]] = []  # run where callbacks run (metrics)
        self._token_texts: dict[int, str] = {}
        self._ids = itertools.count()
        self._live: dict[int, tuple[RequestOutput, Callback, asyncio.AbstractEventLoop | None]] = {}
        # The caller's request ids and their unfinished requests, made or submitted: an id names one running
        # request at a time, and aborting it aborts all its samples and prompts.
        self._by_rid: dict[str, list[RequestOutput]] = {}
        self._rid_lock = threading.Lock()
        self.core.on_updates = self._route

    # ---- the engine's state -----------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        """Whether the engine still runs (False after shutdown, or once its process died)."""
        return self.core.alive

    def load_stats(self) -> dict:
        """The engine's load (/get_server_info, /metrics): pages, running and queued requests, cache hit rate."""
        return self.core.load_stats()

    def timings(self) -> dict | None:
        """The engine thread's counters (EngineStats.timings); None if an engine process did not answer."""
        return self.core.timings()

    def flush_cache(self) -> bool:
        """Empty the prefix cache; False if requests are still running."""
        return self.core.flush_cache()

    def abort(self, rid: str) -> None:
        """Abort the request of this id (all its samples and prompts); requests made but not yet submitted
        end as aborted here."""
        with self._rid_lock:
            outputs = list(self._by_rid.get(rid, ()))
        if not outputs:
            self.core.abort(rid)  # an id of one sample ("rid-1"), or a request already gone
        self.abort_requests(outputs)

    def abort_all(self) -> None:
        """Abort every unfinished request."""
        with self._rid_lock:
            outputs = [o for group in self._by_rid.values() for o in group]
        self.abort_requests(outputs + [entry[0] for entry in list(self._live.values())])

    def abort_requests(self, outputs: list[RequestOutput]) -> None:
        """Abort these requests (from make_requests), submitted or not."""
        for output in outputs:
            if output.submitted:
                self.core.abort(output.rid)
            elif not output.finished:
                output.apply(Finished.aborted(-1, "aborted before it started"))
                self._release(output)

    def shutdown(self) -> None:
        self._stopping = True
        self.core.shutdown()

    # The in-process engine's parts, for tests and benchmarks
    scheduler = property(lambda self: self.core.scheduler)
    runner = property(lambda self: self.core.runner)
    radix = property(lambda self: self.core.radix)
    allocator = property(lambda self: self.core.allocator)
    loaded = property(lambda self: self.core.loaded)
    kernels = property(lambda self: self.core.kernels)
    stats = property(lambda self: self.core.stats)

    # ---- blocking and async generation -----------------------------------------------------------
    @staticmethod
    def result(output: RequestOutput) -> dict:
        """A finished request as SGLang's native API returns it."""
        return output.result()

    def generate(self, prompt: Prompt | list[Prompt] | None = None, sampling_params: dict | None = None,
                 input_ids: list[int] | list[list[int]] | None = None,
                 image_data: ImageData | None = None) -> dict | list[dict]:
        """Blocking generation for one prompt (returns a dict) or a batch (returns a list, n per prompt).
        `image_data` (vision-language models): one prompt's image or images, or one entry per prompt; each image
        goes where the prompt has an image placeholder token (RequestBuilder.images_per_prompt)."""
        prompts, single = self.requests.prompts(prompt, input_ids)
        params = SamplingParams.from_dict(sampling_params)
        outputs = self.requests.build(prompts, params,
                                      images=self.requests.images_per_prompt(image_data, len(prompts), single))
        done, remaining, lock = threading.Event(), [len(outputs)], threading.Lock()

        def on_output(_out: RequestOutput, _delta: str, finished: bool):
            if finished:
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        for output in outputs:
            self._submit(output, on_output)
        done.wait()
        results = [output.result() for output in outputs]
        return results[0] if single and params.n == 1 else results

    async def async_generate(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
                             input_ids: list[int] | None = None, image_data: ImageData | None = None) -> dict:
        """One request, awaited."""
        async for _, output, finished in self.stream_events(prompt, sampling_params, input_ids,
                                                            image_data=image_data):
            if finished:
                return output.result()

    async def async_stream(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
                           input_ids: list[int] | None = None) -> AsyncIterator[str]:
        """One request's text as it is generated, delta by delta."""
        async for delta, _, _ in self.stream_events(prompt, sampling_params, input_ids):
            if delta:
                yield delta

    def stream(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
               input_ids: list[int] | None = None,
               image_data: ImageData | None = None) -> Iterator[tuple[str, RequestOutput]]:
        """Blocking streaming of one request: (text delta, request) pairs, the last one finished."""
        outputs = self.make_requests(prompt, sampling_params, input_ids, image_data=image_data)
        if len(outputs) != 1:
            raise ValueError("stream takes one prompt with n=1")
        updates: queue.Queue = queue.Queue()
        self._submit(outputs[0], lambda _out, delta, finished: updates.put((delta, finished)))
        try:
            while True:
                delta, finished = updates.get()
                yield delta, outputs[0]
                if finished:
                    return
        finally:
            if not outputs[0].finished:
                self.abort_requests(outputs[:1])

    async def run_requests(self, outputs: list[RequestOutput]) -> AsyncIterator[tuple[int, str, RequestOutput, bool]]:
        """Submit requests; yield (index, text delta, request, finished) as they progress. Leaving the loop
        early aborts the unfinished ones.

        Updates that queued up while the caller was busy (a server behind on its streams) come merged, one
        per request, so a loaded server sends fewer, larger events instead of falling further behind.
        `finished` is the update's own flag: the request may be further along than the update."""
        loop = asyncio.get_running_loop()
        pending: list[tuple[int, str, bool]] = []  # filled by the callbacks, which run on this loop
        waiter: asyncio.Future | None = None  # what this generator awaits while nothing is pending

        def arrived(i: int, delta: str, finished: bool) -> None:
            pending.append((i, delta, finished))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        for i, output in enumerate(outputs):
            self._submit(output, lambda _out, delta, finished, i=i: arrived(i, delta, finished), loop)
        remaining = len(outputs)
        try:
            while remaining:
                if not pending:
                    waiter = loop.create_future()
                    await waiter
                batch = pending[:]
                pending.clear()
                if len(batch) > 1:
                    merged: dict[int, tuple[str, bool]] = {}
                    for i, delta, finished in batch:
                        text, done = merged.get(i, ("", False))
                        merged[i] = (text + delta, done or finished)
                    batch = [(i, delta, finished) for i, (delta, finished) in merged.items()]
                for i, delta, finished in batch:
                    yield i, delta, outputs[i], finished
                    remaining -= finished
        finally:
            for output in outputs:
                if not output.finished:
                    self.abort_requests([output])  # the caller stopped listening

    async def run_to_end(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        """Submit requests and wait until all have finished."""
        async for _ in self.run_requests(outputs):
            pass
        return outputs

    async def stream_events(self, prompt: Prompt | None = None, sampling_params: SamplingParams | dict | None = None,
                            input_ids: list[int] | None = None,
                            rid: str | None = None,
                            image_data: ImageData | None = None) -> AsyncIterator[tuple[str, RequestOutput, bool]]:
        """One request's (text delta, request, finished) updates, as `run_requests` yields them."""
        outputs = self.make_requests(prompt, sampling_params, input_ids, rid, image_data)
        if len(outputs) != 1:
            raise ValueError("stream_events takes one prompt with n=1")
        async for _, delta, output, finished in self.run_requests(outputs):
            yield delta, output, finished

    # ---- requests -----------------------------------------------------------------------------------
    def make_requests(self, prompt: Prompt | list[Prompt] | None = None,
                      sampling_params: SamplingParams | dict | None = None,
                      input_ids: list[int] | list[list[int]] | None = None,
                      rid: str | list[str] | None = None, image_data: ImageData | None = None) -> list[RequestOutput]:
        """Tokenize and validate: one request per prompt and sample (n). Raises ValueError naming the problem
        (images: an ImageInputError or ImageError, both ValueErrors). `image_data`: as for `generate`."""
        prompts, single = self.requests.prompts(prompt, input_ids)
        params = sampling_params if isinstance(sampling_params, SamplingParams) else \
            SamplingParams.from_dict(sampling_params)
        params.validate()
        outputs = self.requests.build(prompts, params, rid,
                                      self.requests.images_per_prompt(image_data, len(prompts), single))
        self._register(outputs)
        return outputs

    def _register(self, outputs: list[RequestOutput]) -> None:
        """Claim the outputs' request ids; ValueError if one names a request still running."""
        with self._rid_lock:
            names = {o.user_rid for o in outputs if o.user_rid is not None}
            taken = sorted(names & self._by_rid.keys())
            if taken:
                raise ValueError(f"request id {taken[0]!r} is already running; give each running request its own rid")
            for output in outputs:
                if output.user_rid is not None:
                    self._by_rid.setdefault(output.user_rid, []).append(output)

    def _release(self, output: RequestOutput) -> None:
        """A finished request's id is free again once all requests under it have finished."""
        if output.user_rid is None:
            return
        with self._rid_lock:
            group = self._by_rid.get(output.user_rid)
            if group is not None and output in group:
                group.remove(output)
                if not group:
                    del self._by_rid[output.user_rid]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt (RequestBuilder.tokenize)."""
        return self.requests.tokenize(text)

    def token_text(self, token: int) -> str:
        """One token's text, as logprob entries show it ("" without a tokenizer). Decoded once per id: a
        response's logprobs name up to 21 tokens per position, and the server builds it on its event loop."""
        text = self._token_texts.get(token)
        if text is None:
            text = self._token_texts[token] = self.tokenizer.decode([token]) if self.tokenizer else ""
        return text

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            template_kwargs: dict | None = None) -> list[int]:
        """Token ids of the chat (and tool definitions) as the model's template renders them."""
        return self.requests.apply_chat_template(messages, tools, template_kwargs)

    @property
    def image_placeholder(self) -> str | None:
        """The text that stands for one image in a chat prompt (None: a text-only model; RequestBuilder's)."""
        return self.requests.image_placeholder


    # ---- to the core and back ------------------------------------------------------------------------
    def _submit(self, output: RequestOutput, callback: Callback,
                loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Send a request to the core; `callback` runs on `loop` if given, else on the thread that delivers."""
        wire_id = next(self._ids)
        self._live[wire_id] = (output, callback, loop)
        output.submitted = True
        message = GenerateRequest(wire_id, output.rid, output.prompt_ids, output.params, output.seed, output.group,
                                  output.images)
        if not self.core.submit(message):
            self._route([Finished.aborted(wire_id, "the engine process is not running")])

    def _route(self, deltas: list[TokenDelta]) -> None:
        """A step's deltas (on the engine's or the pipe reader's thread) to their callers' event loops."""
        by_loop: dict = {}
        for delta in deltas:
            entry = self._live.pop(delta.wire_id, None) if delta.finished else self._live.get(delta.wire_id)
            if entry is not None:
                by_loop.setdefault(entry[2], []).append((entry, delta))
                if delta.finished:
                    self._release(entry[0])
        for loop, items in by_loop.items():
            if loop is None:
                self._apply(items)
                continue
            try:
                loop.call_soon_threadsafe(self._apply, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for (output, _, _), delta in items:
                    output.apply(delta)  # the request still records how it ended
                    if not delta.finished:
                        logger.warning("request %s: its caller is gone; aborting it", output.rid)
                        self.abort_requests([output])

    def _apply(self, items: list) -> None:
        """Bring each RequestOutput up to date, then call its caller back (on the caller's loop)."""
        for (output, callback, _), delta in items:
            output.apply(delta)
            if delta.finished:
                for hook in self.finish_hooks:
                    hook(output)
            try:
                callback(output, delta.text, delta.finished)
            except Exception:
                logger.exception("request %s: its callback failed; aborting it", output.rid)
                if not delta.finished:
                    self.abort_requests([output])

    def _core_exited(self, message: str) -> None:
        """The engine process died (on its reader thread): fail what it had, and start another if asked to."""
        self._fail_all(message)
        if self._restart and not self._stopping:
            threading.Thread(target=self._restart_core, name="sgjax-engine-watchdog", daemon=True).start()

    def _restart_core(self) -> None:
        """Start engine processes until one runs (waiting longer after each failure) or the engine shuts down."""
        from sgjax.engine.engine_process import EngineProcess

        wait = 1.0
        while not self._stopping:
            logger.warning("restarting the engine process")
            try:
                core = EngineProcess(self.args, text_side=(self.tokenizer, self.grammar))
            except Exception:
                logger.exception("the engine process failed to restart; trying again in %.0f s", wait)
                time.sleep(wait)  # a watchdog's back-off between attempts, not a test's wait
                wait = min(wait * 2, 60.0)
                continue
            core.on_updates, core.on_exit = self._route, self._core_exited
            self.core = core
            self.num_restarts += 1
            logger.warning("the engine process is running again (restart %d)", self.num_restarts)
            if self._stopping:  # shut down while it started
                core.shutdown()
            return

    def _fail_all(self, message: str) -> None:
        """End every request in flight as aborted (the engine process died)."""
        if self._live:
            logger.error("%s with %d requests in flight", message, len(self._live))
        self._route([Finished.aborted(wire_id, message) for wire_id in list(self._live)])
