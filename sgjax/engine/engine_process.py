"""The engine in a child process, and its client in the caller's: the server's Python (its event loop, JSON,
server-sent events) then no longer shares the engine thread's GIL.

With the server and the Engine in one process, a loaded server's event loop and the engine thread take
turns on one GIL: on an H200, /v1/completions ran at 91% and /generate at 87% of the offline throughput
(BENCHMARKS.md session 27). SGLang runs its HTTP and tokenizer side apart from its scheduler for this reason.

`EngineClient(args)` starts a process (spawn) running `serve(args, conn)`: an Engine, fed over one
multiprocessing Pipe. The client tokenizes and validates requests itself (its own tokenizer and grammar
compiler, and the engine's limits, sent once at start-up) and keeps a Request per request as its mirror. The
engine sends each step's updates in one message: per request, its text delta and what it gained since the
last one (output ids, logprobs, and at the end its finish reason and prompt logprobs). The client applies them
on the caller's event loop before calling back, as Engine does. If the child dies, every request in flight
finishes with an abort naming it, and `alive` turns False (/health then answers 503).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import multiprocessing
import queue
import threading
import traceback

import numpy as np

from sgjax.config import EngineArgs
from sgjax.engine.frontend import Callback, RequestFrontend, load_text_side
from sgjax.engine.request import Request, Status
from sgjax.models.config import ModelConfig

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 3600.0  # loading and compiling a large model's steps takes minutes


# One request's progress in a step, as sent: (wire id, text delta, finished, new output ids, their logprobs, their
# top logprobs, first token time, cached prompt tokens, finish reason, prompt logprobs (at the end, if any)).
Update = tuple


def _abort_update(wire_id: int, message: str) -> Update:
    """The update that ends a request as aborted, with nothing gained."""
    return (wire_id, "", True, [], [], [], None, 0, {"type": "abort", "message": message}, None)


class EngineClient(RequestFrontend):
    """An Engine's caller-facing API (frontend.RequestFrontend) over an Engine in a child process."""

    def __init__(self, args: EngineArgs):
        self.args = args
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited JAX state
        self._conn, child_conn = context.Pipe()
        self._send_lock = threading.Lock()
        self._process = context.Process(target=serve, args=(args, child_conn), name="sgjax-engine", daemon=True)
        self._process.start()
        child_conn.close()  # the child's end lives in the child only: its exit reads as EOF here
        # The text side loads here while the child loads and compiles the model (minutes), not after it
        try:
            vocab_size = ModelConfig.from_pretrained(args.model_path, args.dtype).vocab_size
            self.tokenizer, _, self.grammar = load_text_side(args.model_path, args.load_format, vocab_size)
            text_side_error = None
        except Exception as e:  # the child most likely fails the same way: its error, with its traceback, wins
            text_side_error = e
        kind, payload = self._receive_start()
        if kind != "ready":
            self._process.join(30)
            raise RuntimeError(f"the engine process failed to start:\n{payload}")
        if text_side_error is not None:
            self.shutdown()
            raise text_side_error
        self.config = payload["config"]
        self.context_length = payload["context_length"]
        self.num_usable_pages = payload["num_usable_pages"]
        self._seeds = np.random.default_rng(args.random_seed)
        self.finish_hooks: list = []  # called on the caller's event loop (or the reader thread) as requests end
        self._stats = payload["stats"]
        self._ids = itertools.count()
        self._live: dict[int, tuple[Request, Callback, asyncio.AbstractEventLoop | None]] = {}
        self._replies: dict[int, tuple[threading.Event, list]] = {}
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="sgjax-engine-client", daemon=True)
        self._reader.start()

    def _receive_start(self) -> tuple[str, object]:
        waited = 0.0
        while not self._conn.poll(1.0):
            waited += 1.0
            if not self._process.is_alive() or waited > START_TIMEOUT_S:
                return "failed", f"exit code {self._process.exitcode}" if not self._process.is_alive() else "timed out"
        try:
            return self._conn.recv()
        except EOFError:  # it closed its end while exiting: wait for the exit, so its code is known
            self._process.join(30)
            return "failed", f"exit code {self._process.exitcode}"

    # ---- what RequestFrontend needs ------------------------------------------------------------
    def _detokenizer(self, params):
        return None  # the engine process detokenizes; its text deltas arrive with the updates

    def _matcher(self, constraint):
        self.grammar.matcher(constraint)  # compiles it: a bad constraint fails here, as a ValueError
        return None  # the engine process keeps the matcher it advances

    def _submit(self, req: Request, callback: Callback, loop: asyncio.AbstractEventLoop | None = None) -> None:
        wire_id = next(self._ids)
        self._live[wire_id] = (req, callback, loop)
        if not self._send(("add", [(wire_id, req.rid, req.prompt_ids, req.params, req.seed, req.group)])):
            self._fail_all("the engine process is not running")

    def abort(self, rid: str) -> None:
        self._send(("abort", rid))

    # ---- the rest of Engine's API the server uses ------------------------------------------------
    def load_stats(self) -> dict:
        """The engine's load as of its last step's updates."""
        return dict(self._stats)

    def flush_cache(self, timeout: float = 30.0) -> bool:
        result = self._ask("flush", timeout)
        return bool(result and result[0])

    def timings(self, timeout: float = 30.0) -> dict | None:
        """The engine thread's counters (Engine.timings), or None if the engine process did not answer."""
        result = self._ask("timings", timeout)
        return result[0] if result else None

    def _ask(self, kind: str, timeout: float) -> list:
        """Send a request the engine process answers with a reply: [its answer], or [] without one in time."""
        token = next(self._ids)
        done, result = threading.Event(), []
        self._replies[token] = (done, result)
        if self._send((kind, token)):
            done.wait(timeout)
        self._replies.pop(token, None)
        return result

    def shutdown(self) -> None:
        self._send(("stop",))
        self._process.join(60)
        if self._process.is_alive():
            self._process.terminate()
            self._process.join(10)
        self._conn.close()

    # ---- the pipe ------------------------------------------------------------------------------
    def _send(self, message) -> bool:
        try:
            with self._send_lock:
                self._conn.send(message)
            return True
        except (OSError, ValueError):  # broken pipe, closed connection
            return False

    def _read(self) -> None:
        """The reader thread: hands each step's updates to the callers' event loops."""
        while True:
            try:
                kind, *payload = self._conn.recv()
            except (EOFError, OSError):
                break
            if kind == "updates":
                updates, self._stats = payload
                self._dispatch(updates)
            elif kind in ("flushed", "timings"):
                token, result, self._stats = payload
                waiter = self._replies.get(token)
                if waiter is not None:
                    waiter[1].append(result)
                    waiter[0].set()
        self.alive = False
        exitcode = self._process.exitcode
        if self._live:
            logger.error("the engine process exited (code %s) with %d requests in flight", exitcode, len(self._live))
        self._fail_all(f"the engine process exited (code {exitcode})")

    def _fail_all(self, message: str) -> None:
        self._dispatch([_abort_update(wire_id, message) for wire_id in list(self._live)])

    def _dispatch(self, updates: list[Update]) -> None:
        by_loop: dict = {}
        for update in updates:
            entry = self._live.pop(update[0], None) if update[2] else self._live.get(update[0])
            if entry is not None:
                by_loop.setdefault(entry[2], []).append((entry, update))
        for loop, items in by_loop.items():
            if loop is None:
                self._apply(items)
                continue
            try:
                loop.call_soon_threadsafe(self._apply, items)
            except RuntimeError:  # the caller's loop is closed: nobody is listening
                for (req, _, _), _ in items:
                    self.abort(req.rid)

    def _apply(self, items: list) -> None:
        """Bring each mirrored Request up to date, then call its caller back (on the caller's loop)."""
        for (req, callback, _), (_, delta, finished, ids, logprobs, tops, first, cached, reason, prompt) in items:
            req.output_ids.extend(ids)
            req.output_logprobs.extend(logprobs)
            req.output_top_logprobs.extend(tops)
            req.text += delta
            req.cached_tokens = cached
            if first is not None:
                req.first_token_time = first
            if finished:
                req.status, req.finish_reason = Status.FINISHED, reason
                if prompt:
                    req.input_logprobs = prompt
                for hook in self.finish_hooks:
                    hook(req)
            try:
                callback(req, delta, finished)
            except Exception:
                logger.exception("request %s: its callback failed; aborting it", req.rid)
                if not finished:
                    self.abort(req.rid)


class _UpdateSender:
    """The child's end of the updates: stands in for the callers' event loop in Engine._submit, so that the
    engine thread hands over each step's updates in one call (Engine._flush_outbox). It snapshots what each
    request gained since its last update there, on the engine thread, and a thread of its own sends them."""

    def __init__(self, engine, conn):
        self.engine, self.conn = engine, conn
        self.lock = threading.Lock()
        self.sent: dict[int, int] = {}  # wire id -> output tokens sent so far
        self.outgoing: queue.Queue = queue.Queue()
        threading.Thread(target=self._run, name="sgjax-engine-sender", daemon=True).start()

    def call_soon_threadsafe(self, _deliver, updates: list) -> None:
        """On the engine thread: `updates` are (wire id, request, text delta, finished) of one step."""
        batch = []
        for wire_id, req, delta, finished in updates:
            start, end = self.sent.get(wire_id, 0), len(req.output_ids)
            tops = req.output_top_logprobs[start:end] if req.params.top_logprobs_num else []
            prompt = dict(req.input_logprobs) if finished and req.input_logprobs else None
            batch.append((wire_id, delta, finished, req.output_ids[start:end], req.output_logprobs[start:end], tops,
                          req.first_token_time, req.cached_tokens, req.finish_reason if finished else None, prompt))
            if finished:
                self.sent.pop(wire_id, None)
            else:
                self.sent[wire_id] = end
        self.outgoing.put(("updates", batch, self.engine.load_stats()))

    def send(self, message) -> None:
        with self.lock:
            self.conn.send(message)

    def _run(self) -> None:
        while True:
            message = self.outgoing.get()
            if message is None:
                return
            try:
                self.send(message)
            except (OSError, ValueError):
                return  # the client is gone; the main loop sees EOF and stops the engine


def serve(args: EngineArgs, conn) -> None:
    """The engine process: an Engine fed by the client's messages ("add", "abort", "flush", "timings", "stop")."""
    from sgjax.engine.engine import Engine

    try:
        engine = Engine(args=args)
    except BaseException:
        conn.send(("failed", traceback.format_exc()))
        return
    sender = _UpdateSender(engine, conn)
    sender.send(("ready", dict(config=engine.config, context_length=engine.context_length,
                               num_usable_pages=engine.num_usable_pages, stats=engine.load_stats())))
    try:
        while True:
            kind, *payload = conn.recv()
            if kind == "add":
                for wire_id, rid, prompt_ids, params, seed, group in payload[0]:
                    _add(engine, sender, wire_id, Request(rid=rid, prompt_ids=prompt_ids, params=params, seed=seed,
                                                          group=group, detokenizer=engine._detokenizer(params)))
            elif kind == "abort":
                engine.abort(payload[0])
            elif kind == "flush":
                sender.send(("flushed", payload[0], engine.flush_cache(), engine.load_stats()))
            elif kind == "timings":
                sender.send(("timings", payload[0], engine.timings(), engine.load_stats()))
            elif kind == "stop":
                break
    except (EOFError, OSError):
        pass  # the client is gone
    finally:
        sender.outgoing.put(None)
        engine.shutdown()


def _add(engine, sender: _UpdateSender, wire_id: int, req: Request) -> None:
    constraint = req.params.constraint
    try:
        req.matcher = engine._matcher(constraint) if constraint is not None else None
    except Exception as e:  # the client compiled it already; should this one still fail, say so
        sender.outgoing.put(("updates", [_abort_update(wire_id, f"constraint: {e}")], engine.load_stats()))
        return
    engine._submit(req, wire_id, sender)
