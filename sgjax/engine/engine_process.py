"""The engine core in a child process, and the caller's end of its pipe: the server's Python (its event loop,
JSON, server-sent events) then no longer shares the engine thread's GIL.

With the server and the engine in one process, a loaded server's event loop and the engine thread take
turns on one GIL: on an H200, /v1/completions ran at 91% and /generate at 87% of the offline throughput.
SGLang runs its HTTP and tokenizer side apart from its scheduler for this reason.

`EngineProcess(args)` starts a process (spawn) running `serve(args, conn)`: an EngineCore fed over one
multiprocessing Pipe with the typed messages of messages.py. The caller side (Engine) tokenizes and
validates requests itself, with its own tokenizer and grammar compiler (loaded here while the child loads
the model) and the engine's limits, sent once at start-up. Before Ready the core sends a StartupPhase as
each phase of its start begins (the server's /health shows them); then each step's TokenDeltas in one
message. If the child dies, `on_exit` is called (the Engine aborts every request in flight, naming it, and
may start a new engine process) and `alive` turns False (/health then answers 503).
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
import traceback
from collections.abc import Callable

from sgjax.config import EngineArgs
from sgjax.engine.messages import Abort, Error, GenerateRequest, StartupPhase, TokenDelta
from sgjax.engine.text_side import load_text_side
from sgjax.models.config import ModelConfig

logger = logging.getLogger(__name__)
START_TIMEOUT_S = 3600.0  # loading and compiling a large model's steps takes minutes


@dataclasses.dataclass
class Ready:
    """The engine process started: what the caller side needs of it."""

    config: ModelConfig
    context_length: int
    num_usable_pages: int
    stats: dict


@dataclasses.dataclass
class StepUpdates:
    """One step's deltas, and the engine's load after it."""

    deltas: list[TokenDelta]
    stats: dict


@dataclasses.dataclass
class Query:
    """A question the engine process answers with a Reply: "flush" (the prefix cache) or "timings"."""

    kind: str
    token: int


@dataclasses.dataclass
class Reply:
    token: int
    result: object
    stats: dict


class EngineProcess:
    """The caller's end of an engine process; what Engine needs of a core."""

    def __init__(self, args: EngineArgs, text_side: tuple | None = None,
                 on_phase: Callable[[StartupPhase], None] | None = None):
        """`text_side`: (tokenizer, grammar) already loaded (a restart), else loaded here; `on_phase`: called
        with each start-up phase the engine process reports (on this thread)."""
        self.args = args
        self.on_updates: Callable[[list[TokenDelta]], None] = lambda deltas: None  # on the reader thread
        self.on_exit: Callable[[str], None] = lambda message: None
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no inherited JAX state
        self._conn, child_conn = context.Pipe()
        self._send_lock = threading.Lock()
        self._process = context.Process(target=serve, args=(args, child_conn), name="sgjax-engine", daemon=True)
        self._process.start()
        child_conn.close()  # the child's end lives in the child only: its exit reads as EOF here
        # The text side loads here while the child loads and compiles the model (minutes), not after it
        try:
            if text_side is not None:
                self.tokenizer, self.grammar = text_side
            else:
                vocab_size = ModelConfig.from_pretrained(args.model_path, args.dtype).vocab_size
                self.tokenizer, _, self.grammar = load_text_side(args.model_path, args.load_format, vocab_size)
            text_side_error = None
        except Exception as e:  # the child most likely fails the same way: its error, with its traceback, wins
            text_side_error = e
        ready = self._receive_start(on_phase or (lambda phase: None))
        if isinstance(ready, Error):
            self._process.join(30)
            raise RuntimeError(f"the engine process failed to start:\n{ready.message}")
        if text_side_error is not None:
            self.shutdown()
            raise text_side_error
        self.config, self.context_length = ready.config, ready.context_length
        self.num_usable_pages, self._stats = ready.num_usable_pages, ready.stats
        self._tokens = itertools.count()
        self._replies: dict[int, tuple[threading.Event, list]] = {}
        self.alive = True
        self._reader = threading.Thread(target=self._read, name="sgjax-engine-client", daemon=True)
        self._reader.start()

    def _receive_start(self, on_phase: Callable[[StartupPhase], None]) -> Ready | Error:
        """The engine process's Ready or Error, its StartupPhases before it handed to `on_phase`."""
        waited = 0.0
        while True:
            while not self._conn.poll(1.0):
                waited += 1.0
                if not self._process.is_alive() or waited > START_TIMEOUT_S:
                    return Error(f"exit code {self._process.exitcode}" if not self._process.is_alive()
                                 else "timed out")
            try:
                message = self._conn.recv()
            except EOFError:  # it closed its end while exiting: wait for the exit, so its code is known
                self._process.join(30)
                return Error(f"exit code {self._process.exitcode}")
            if not isinstance(message, StartupPhase):
                return message
            on_phase(message)

    # ---- what Engine calls -----------------------------------------------------------------------
    def submit(self, message: GenerateRequest) -> bool:
        return self._send(message)

    def abort(self, rid: str) -> None:
        self._send(Abort(rid))

    def load_stats(self) -> dict:
        """The engine's load as of its last step's updates."""
        return dict(self._stats)

    def flush_cache(self, timeout: float = 30.0) -> bool:
        result = self._ask("flush", timeout)
        return bool(result and result[0])

    def timings(self, timeout: float = 30.0) -> dict | None:
        """The engine thread's counters (EngineStats.timings), or None if the engine process did not answer."""
        result = self._ask("timings", timeout)
        return result[0] if result else None

    def _ask(self, kind: str, timeout: float) -> list:
        """Send a Query: [its answer], or [] without one in time."""
        token = next(self._tokens)
        done, result = threading.Event(), []
        self._replies[token] = (done, result)
        if self._send(Query(kind, token)):
            done.wait(timeout)
        self._replies.pop(token, None)
        return result

    def shutdown(self) -> None:
        self._send(None)
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
        """The reader thread: hands each step's updates on, and answers waiting queries."""
        while True:
            try:
                message = self._conn.recv()
            except (EOFError, OSError):
                break
            self._stats = message.stats
            if isinstance(message, StepUpdates):
                self.on_updates(message.deltas)
            elif isinstance(message, Reply):
                waiter = self._replies.get(message.token)
                if waiter is not None:
                    waiter[1].append(message.result)
                    waiter[0].set()
        self.alive = False
        exitcode = self._process.exitcode
        self.on_exit(f"the engine process exited (code {exitcode})")


def serve(args: EngineArgs, conn) -> None:
    """The engine process: an EngineCore fed by the caller's messages (GenerateRequest, Abort, Query; None stops)."""
    from sgjax.engine.core import EngineCore

    try:
        core = EngineCore(args, on_phase=conn.send)
    except BaseException:
        conn.send(Error(traceback.format_exc()))
        return
    # A thread of its own sends the updates, so the engine thread only hands them over
    outgoing: queue.Queue = queue.Queue()
    send_lock = threading.Lock()

    def send(message) -> None:
        with send_lock:
            conn.send(message)

    def sender() -> None:
        while (message := outgoing.get()) is not None:
            try:
                send(message)
            except (OSError, ValueError):
                return  # the caller is gone; the main loop sees EOF and stops the engine

    threading.Thread(target=sender, name="sgjax-engine-sender", daemon=True).start()
    core.on_updates = lambda deltas: outgoing.put(StepUpdates(deltas, core.load_stats()))
    send(Ready(core.config, core.context_length, core.num_usable_pages, core.load_stats()))
    try:
        while (message := conn.recv()) is not None:
            if isinstance(message, GenerateRequest):
                core.submit(message)
            elif isinstance(message, Abort):
                core.abort(message.rid)
            elif isinstance(message, Query):
                result = core.flush_cache() if message.kind == "flush" else core.timings()
                send(Reply(message.token, result, core.load_stats()))
    except (EOFError, OSError):
        pass  # the caller is gone
    finally:
        outgoing.put(None)
        core.shutdown()
