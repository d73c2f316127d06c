"""What callers of an engine use, apart from where the engine runs: tokenizing and validating prompts into
Requests, and following them to the end (blocking, streamed, or as async iterators).

`Engine` runs the model in this process (a background thread); `engine_process.EngineClient` runs it in a
child process and mirrors each request's progress here. Both provide what this class leaves open:
`_submit` (queue a request with a callback, run on an event loop if given, else on any thread), `abort`,
and the attributes `args`, `config` (the model's), `tokenizer` (None with dummy weights), `grammar` (None
without a tokenizer), `context_length`, `num_usable_pages` and `_seeds`.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator

import numpy as np

from sgjax.cache.page_allocator import pages_for
from sgjax.constrained import GrammarCompiler
from sgjax.engine.detokenizer import IncrementalDetokenizer
from sgjax.engine.request import Request
from sgjax.engine.sampling_params import SamplingParams
from sgjax.models.loader import load_tokenizer

Prompt = str | list[dict]  # text, or chat messages
Callback = Callable[[Request, str, bool], None]  # (request, new text, finished)


def load_text_side(model_path: str, load_format: str,
                   vocab_size: int) -> tuple[object | None, set[int], GrammarCompiler | None]:
    """The checkpoint's tokenizer, its end-of-sequence ids and a GrammarCompiler over them.

    The engine and a client of an engine process each need all three (the client to tokenize and to
    reject a bad constraint before it is sent). With dummy weights and no tokenizer files, requests are
    token ids only: the tokenizer and the grammar compiler are None.
    """
    try:
        tokenizer = load_tokenizer(model_path)
    except FileNotFoundError:
        if load_format != "dummy":
            raise
        tokenizer = None
    eos_token_ids = set()
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        eos_token_ids.add(tokenizer.eos_token_id)
    try:
        from transformers import GenerationConfig

        eos = GenerationConfig.from_pretrained(model_path).eos_token_id
        eos_token_ids.update([eos] if isinstance(eos, int) else (eos or []))
    except OSError:
        pass
    grammar = GrammarCompiler(tokenizer, vocab_size, eos_token_ids) if tokenizer is not None else None
    return tokenizer, eos_token_ids, grammar


class RequestFrontend:
    """The caller-facing half of an engine (see the module docstring)."""

    def result(self, req: Request) -> dict:
        """A finished request as SGLang's native API returns it."""
        meta = {"id": req.rid, "prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                "cached_tokens": req.cached_tokens, "finish_reason": req.finish_reason}
        if req.params.logprobs:
            meta["output_token_logprobs"] = list(zip(req.output_logprobs, req.output_ids))
        if req.params.top_logprobs_num:
            meta["output_top_logprobs"] = req.output_top_logprobs
        start = req.params.logprob_start_len
        if start >= 0:
            positions = range(start, len(req.prompt_ids))
            meta["input_token_logprobs"] = [(req.input_logprobs[q][0] if q in req.input_logprobs else None,
                                             req.prompt_ids[q]) for q in positions]
            if req.params.top_logprobs_num:
                meta["input_top_logprobs"] = [req.input_logprobs[q][1] if q in req.input_logprobs else None
                                              for q in positions]
        return {"text": req.text, "output_ids": list(req.output_ids), "meta_info": meta}

    def generate(self, prompt: Prompt | list[Prompt] | None = None, sampling_params: dict | None = None,
                 input_ids: list[int] | list[list[int]] | None = None) -> dict | list[dict]:
        """Blocking generation for one prompt (returns a dict) or a batch (returns a list, n per prompt)."""
        prompts, single = self._prompts(prompt, input_ids)
        params = SamplingParams.from_dict(sampling_params)
        done = threading.Event()
        pending = [None] * (len(prompts) * params.n)
        remaining = [len(pending)]
        lock = threading.Lock()

        def on_output(req: Request, _delta: str, finished: bool, slot: int):
            if finished:
                pending[slot] = self.result(req)
                with lock:
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

        requests = self._make_requests(prompts, params)
        for slot, req in enumerate(requests):
            self._submit(req, lambda r, d, f, slot=slot: on_output(r, d, f, slot))
        done.wait()
        return pending[0] if single and params.n == 1 else pending

    async def async_generate(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
                             input_ids: list[int] | None = None) -> dict:
        """One request, awaited."""
        async for _, req, finished in self.stream_events(prompt, sampling_params, input_ids):
            if finished:
                return self.result(req)

    async def async_stream(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
                           input_ids: list[int] | None = None) -> AsyncIterator[str]:
        """One request's text as it is generated, delta by delta."""
        async for delta, _, _ in self.stream_events(prompt, sampling_params, input_ids):
            if delta:
                yield delta

    def stream(self, prompt: Prompt | None = None, sampling_params: dict | None = None,
               input_ids: list[int] | None = None) -> Iterator[tuple[str, Request]]:
        """Blocking streaming of one request: (text delta, request) pairs, the last one finished."""
        requests = self.make_requests(prompt, sampling_params, input_ids)
        if len(requests) != 1:
            raise ValueError("stream takes one prompt with n=1")
        updates: queue.Queue = queue.Queue()
        self._submit(requests[0], lambda r, delta, finished: updates.put((delta, finished)))
        try:
            while True:
                delta, finished = updates.get()
                yield delta, requests[0]
                if finished:
                    return
        finally:
            if not requests[0].finished:
                self.abort(requests[0].rid)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """Token ids of the chat (and tool definitions) as the model's template renders them."""
        extra = {"tools": tools} if tools else {}
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **extra)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _prompts(self, prompt, input_ids) -> tuple[list[list[int]], bool]:
        if (prompt is None) == (input_ids is None):
            raise ValueError("give exactly one of prompt and input_ids")
        if input_ids is not None:
            single = not input_ids or isinstance(input_ids[0], (int, np.integer))
            return ([list(input_ids)] if single else [list(x) for x in input_ids]), single
        single = isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], dict))
        items = [prompt] if single else list(prompt)
        return [self._tokenize(p) for p in items], single

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a text prompt, with the BOS token unless the text already starts with it
        (text rendered by a chat template)."""
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (dummy weights); pass input_ids")
        bos = self.tokenizer.bos_token
        return self.tokenizer.encode(text, add_special_tokens=not (bos and text.startswith(bos)))

    def _tokenize(self, prompt: Prompt) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this engine has no tokenizer (dummy weights); pass input_ids")
        if isinstance(prompt, str):
            return self.tokenize(prompt)
        if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
            return self.apply_chat_template(prompt)
        raise ValueError(f"a prompt must be a string or a list of chat messages; got {type(prompt).__name__}")

    def _make_requests(self, prompts: list[list[int]], params: SamplingParams,
                       rid: str | None = None) -> list[Request]:
        requests = []
        constraint = params.constraint
        if constraint is not None and self.grammar is None:
            raise ValueError("constrained decoding needs the model's tokenizer (this engine has dummy weights)")
        for ids in prompts:
            self._validate_prompt(ids, params)
            base_seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
            group = uuid.uuid4().hex if params.n > 1 else None
            for i in range(params.n):
                name = rid if rid and len(prompts) * params.n == 1 else \
                    f"{rid}-{len(requests)}" if rid else uuid.uuid4().hex
                requests.append(Request(
                    rid=name, prompt_ids=list(map(int, ids)), params=params, seed=base_seed + i,
                    detokenizer=self._detokenizer(params), group=group,
                    matcher=self._matcher(constraint) if constraint is not None else None))
        return requests

    def _validate_prompt(self, ids: list[int], params: SamplingParams) -> None:
        vocab = self.config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(f"logit_bias token ids must be in [0, {vocab}); got {max(params.logit_bias)}")
        if len(ids) >= self.context_length:
            raise ValueError(f"prompt has {len(ids)} tokens; context length is {self.context_length}")
        if params.logprob_start_len >= 0 and not self.args.enable_prompt_logprobs:
            raise ValueError("prompt logprobs (logprob_start_len >= 0) need an engine started with "
                             "enable_prompt_logprobs=True")
        longest = min(len(ids) + params.max_new_tokens, self.context_length)
        pages = pages_for(longest, self.args.page_size)
        if pages > self.num_usable_pages:
            raise ValueError(f"a request of {longest} tokens needs {pages} KV pages; the pool has "
                             f"{self.num_usable_pages}")

    def _detokenizer(self, params: SamplingParams) -> IncrementalDetokenizer | None:
        """The request's incremental detokenizer, where this side detokenizes (None: it does not)."""
        return IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer else None

    def _matcher(self, constraint):
        """The request's grammar matcher (raises ValueError for a constraint that does not compile)."""
        return self.grammar.matcher(constraint)

    def make_requests(self, prompt: Prompt | list[Prompt] | None = None,
                      sampling_params: SamplingParams | dict | None = None,
                      input_ids: list[int] | list[list[int]] | None = None, rid: str | None = None) -> list[Request]:
        """Tokenize and validate: one Request per prompt and sample (n). Raises ValueError naming the problem."""
        prompts, _ = self._prompts(prompt, input_ids)
        params = sampling_params if isinstance(sampling_params, SamplingParams) else \
            SamplingParams.from_dict(sampling_params)
        params.validate()
        return self._make_requests(prompts, params, rid)

    async def run_requests(self, requests: list[Request]) -> AsyncIterator[tuple[int, str, Request, bool]]:
        """Submit requests; yield (index, text delta, request, finished) as they progress. Leaving the loop
        early aborts the unfinished ones.

        Updates that queued up while the caller was busy (a server behind on its streams) come merged, one
        per request, so a loaded server sends fewer, larger events instead of falling further behind.
        `finished` is the update's own flag: read `request.finished` instead and an earlier update could
        already look final, because the engine thread may finish the request while the caller handles it."""
        loop = asyncio.get_running_loop()
        pending: list[tuple[int, str, bool]] = []  # filled by the callbacks, which run on this loop
        waiter: asyncio.Future | None = None  # what this generator awaits while nothing is pending

        def arrived(i: int, delta: str, finished: bool) -> None:
            pending.append((i, delta, finished))
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

        for i, req in enumerate(requests):
            self._submit(req, lambda r, delta, finished, i=i: arrived(i, delta, finished), loop)
        remaining = len(requests)
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
                    yield i, delta, requests[i], finished
                    remaining -= finished
        finally:
            for req in requests:
                if not req.finished:
                    self.abort(req.rid)  # the caller stopped listening

    async def run_to_end(self, requests: list[Request]) -> list[Request]:
        """Submit requests and wait until all have finished."""
        async for _ in self.run_requests(requests):
            pass
        return requests

    async def stream_events(self, prompt: Prompt | None = None,
                            sampling_params: SamplingParams | dict | None = None,
                            input_ids: list[int] | None = None,
                            rid: str | None = None) -> AsyncIterator[tuple[str, Request, bool]]:
        """One request's (text delta, request, finished) updates, as `run_requests` yields them."""
        requests = self.make_requests(prompt, sampling_params, input_ids, rid)
        if len(requests) != 1:
            raise ValueError("stream_events takes one prompt with n=1")
        async for _, delta, req, finished in self.run_requests(requests):
            yield delta, req, finished
