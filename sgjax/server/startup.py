"""The server's engine, which may still be starting: the HTTP port opens first and the Engine is built on a
thread, so that load balancers and readiness probes get an answer from the start. Until the engine is ready,
/health and /health_generate answer 503 with {"status": "starting", "progress": ...} and every other route
503 with Retry-After (app.py)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from aiohttp import web

from sgjax.engine.messages import STARTUP_PHASES, StartupPhase
from sgjax.server.errors import ApiError

logger = logging.getLogger("sgjax.server")
RETRY_AFTER_S = 5  # a start takes seconds (CPU) to minutes (GPU): a client need not ask more often


class Serving:
    """What the app serves: the Engine, or, until it is ready, the progress of its start-up."""

    def __init__(self, model_name: str, engine=None):
        self.model_name, self.engine = model_name, engine
        self.started = time.monotonic()
        self.phase = StartupPhase("starting the engine", 0, len(STARTUP_PHASES))  # until the engine reports
        self.phase_started = self.started
        self._on_ready: list[Callable] = []

    @classmethod
    def of(cls, engine) -> Serving:
        """A Serving of an engine already running."""
        return cls(engine.model_name, engine)

    def report(self, phase: StartupPhase) -> None:
        """The start-up entered `phase` (any thread)."""
        self.phase, self.phase_started = phase, time.monotonic()

    def progress(self) -> dict:
        """The start-up's progress as /health shows it."""
        phase, now = self.phase, time.monotonic()
        return {"phase": phase.name, "step": phase.step, "steps": phase.steps,
                "phase_elapsed_s": round(now - self.phase_started, 1), "elapsed_s": round(now - self.started, 1)}

    def starting_response(self) -> web.Response:
        """What /health and /health_generate answer while the engine starts."""
        return web.json_response({"status": "starting", "progress": self.progress()}, status=503,
                                 headers={"Retry-After": str(RETRY_AFTER_S)})

    def starting_error(self) -> ApiError:
        """What a route that needs the engine answers while it starts."""
        return ApiError(f"the server is starting ({self.phase.name}, {time.monotonic() - self.started:.0f} s so "
                        f"far); retry in a few seconds", status=503, type_="server_error",
                        headers={"Retry-After": str(RETRY_AFTER_S)})

    def when_ready(self, hook: Callable) -> None:
        """Call hook(engine) once the engine is ready (now, if it is)."""
        if self.engine is not None:
            hook(self.engine)
        else:
            self._on_ready.append(hook)

    def ready(self, engine) -> None:
        """The engine started: its hooks run, then the routes see it (on the event loop)."""
        for hook in self._on_ready:
            hook(engine)
        self.engine = engine
        logger.info("the engine is ready, %.1f s after the start; serving requests", time.monotonic() - self.started)

    async def start(self, build: Callable[[Callable[[StartupPhase], None]], object]) -> None:
        """Run build(report) on a thread of its own and serve the Engine it returns; its exception, if it fails.

        A daemon thread, not the loop's executor: a server stopped while its engine starts exits at once
        instead of waiting for the build to end."""
        loop = asyncio.get_running_loop()
        built: asyncio.Future = loop.create_future()

        def settle(engine, error: BaseException | None) -> None:  # on the loop
            if built.done():  # the server stopped waiting
                return
            if error is not None:
                built.set_exception(error)
            else:
                built.set_result(engine)

        def run() -> None:
            engine, error = None, None
            try:
                engine = build(self.report)
            except BaseException as e:
                error = e
            try:
                loop.call_soon_threadsafe(settle, engine, error)
            except RuntimeError:  # the server stopped while the engine started: no one will serve it
                if engine is not None:
                    engine.shutdown()

        threading.Thread(target=run, name="sgjax-engine-start", daemon=True).start()
        self.ready(await built)

    def shutdown(self) -> None:
        """Stop the engine, if it started."""
        if self.engine is not None:
            self.engine.shutdown()
