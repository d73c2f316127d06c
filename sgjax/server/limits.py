"""What one request may ask for (ServerArgs' max_* flags), checked before any work is done for it; and the
threads that do a request's blocking work (tokenizing, chat templates, compiling constraints) off the event
loop, with a bounded queue."""

from __future__ import annotations

import asyncio
import functools
import json
from concurrent.futures import ThreadPoolExecutor

from sgjax.config import ServerArgs
from sgjax.server.errors import ApiError

CONSTRAINTS = ("regex", "ebnf", "json_schema", "choices")


def check_limits(args: ServerArgs, num_prompts: int, params: dict) -> None:
    """400 naming the flag when the request (its prompts and SamplingParams-style params) asks for more than
    the server allows."""
    def limit(value: int, most: int, what: str, flag: str, param: str | None = None) -> None:
        if value > most:
            raise ApiError(f"{what} is {value}; this server allows at most {most} (--{flag.replace('_', '-')})",
                           param=param)

    limit(num_prompts, args.max_prompts_per_request, "the number of prompts", "max_prompts_per_request", "prompt")
    n = params.get("n", 1)
    if isinstance(n, int):  # its type is SamplingParams' to check
        limit(n, args.max_n, "n", "max_n", "n")
        limit(num_prompts * n, args.max_sequences_per_request, "the number of sequences (prompts times n)",
              "max_sequences_per_request", "n")
    stops = sum(len(v) if isinstance(v, list) else 1 for v in (params.get("stop"), params.get("stop_regex"))
                if v is not None)
    limit(stops, args.max_stop_strings, "the number of stop strings", "max_stop_strings", "stop")
    for name in CONSTRAINTS:
        value = params.get(name)
        if value is not None:
            size = len(value.encode(errors="replace")) if isinstance(value, str) else len(json.dumps(value))
            limit(size, args.max_constraint_bytes, f"the size of {name} in bytes", "max_constraint_bytes", name)


def check_max_tokens(requests: list, max_new_tokens: int, context_length: int, param: str) -> None:
    """400 when a token limit the client gave cannot fit after the longest prompt: an error, not an output
    silently cut short at the context length (as OpenAI answers)."""
    prompt = max(len(r.prompt_ids) for r in requests)
    if prompt + max_new_tokens > context_length:
        raise ApiError(f"{param} is too large: the prompt ({prompt} tokens) plus {param} ({max_new_tokens}) is more "
                       f"than the context length ({context_length})", param=param)


class Offload:
    """Runs a request's blocking work on a few threads; 503 with Retry-After once too many requests wait."""

    def __init__(self, threads: int, max_pending: int):
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="sgjax-tokenizer")
        self.max_pending, self.pending = max_pending, 0  # touched on the event loop only

    async def run(self, fn, *args, **kwargs):
        if self.pending >= self.max_pending:
            raise ApiError(f"the server is busy: {self.pending} requests wait to be tokenized; retry shortly",
                           status=503, type_="server_error", headers={"Retry-After": "1"})
        self.pending += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args, **kwargs))
        finally:
            self.pending -= 1

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
