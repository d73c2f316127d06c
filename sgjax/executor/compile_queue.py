"""Step programs compiled on a pool of threads, in the order a server needs them, while it already serves.

XLA's compilers release the GIL, so programs compile side by side (an accelerator's host has the cores; a
31-program Llama-3-8B start compiled them one after another at 5-16 s each). The runner submits the programs
every step needs first and waits for those only; the rest finish in the background while steps run on the
nearest compiled program that can stand in (a larger token bucket, a sampling variant with more features).
JAX's persistent compilation cache serves a restart; `CacheCounter` says how much of a start came from it.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable

from jax import monitoring

logger = logging.getLogger(__name__)

MAX_WORKERS = 8  # beyond this, tracing (which holds the GIL) and host memory limit what more threads give


def default_workers() -> int:
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1))


class CompileQueue:
    """Compiles submitted programs on `workers` threads in submission order."""

    def __init__(self, workers: int):
        self._pool = concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="sgjax-compile")
        self._futures: dict[Hashable, concurrent.futures.Future] = {}
        self._lock = threading.Lock()
        self.started = time.perf_counter()

    def submit(self, key: Hashable, compile_fn: Callable[[], object]) -> concurrent.futures.Future:
        """Queue `compile_fn` under `key` (once: a key already queued keeps its place)."""
        with self._lock:
            if key not in self._futures:
                self._futures[key] = self._pool.submit(compile_fn)
            return self._futures[key]

    def wait(self, key: Hashable):
        return self._futures[key].result()

    def wait_all(self) -> None:
        for future in list(self._futures.values()):
            future.result()

    def __contains__(self, key: Hashable) -> bool:
        return key in self._futures

    def pending(self) -> int:
        return sum(not f.done() for f in list(self._futures.values()))

    def __len__(self) -> int:
        return len(self._futures)

    def add_done_callback(self, callback: Callable[[concurrent.futures.Future], None]) -> None:
        """Call `callback` as each queued program finishes (at once for those already done)."""
        for future in list(self._futures.values()):
            future.add_done_callback(callback)

    def close(self) -> None:
        """Drop what has not started; compiles under way finish on their threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)


class CacheCounter:
    """Counts JAX's persistent-cache hits and misses from its monitoring events while it is installed."""

    _HIT, _REQUEST = "/jax/compilation_cache/cache_hits", "/jax/compilation_cache/compile_requests_use_cache"

    def __init__(self):
        self.hits = self.requests = 0
        self._active = True
        self._lock = threading.Lock()
        monitoring.register_event_listener(self._on_event)

    def _on_event(self, event: str, **_) -> None:
        if not self._active:
            return
        if event == self._HIT:
            self.hits += 1
        elif event == self._REQUEST:
            self.requests += 1

    def stop(self) -> bool:
        """Stop counting; True only for the call that stopped it."""
        with self._lock:
            if not self._active:
                return False
            self._active = False
        monitoring.unregister_event_listener(self._on_event)
        return True

    def summary(self) -> str:
        if not self.requests:
            return "the persistent compilation cache is off"
        return f"{self.hits} of {self.requests} programs from the persistent compilation cache"
