"""The listening side of the HTTP server: aiohttp's runner with a cap on open connections (--max-connections),
so that idle or slow clients cannot use up the process's file descriptors. A connection over the cap is
answered 503 and closed at once; refusals are logged once a minute, not once each. What aiohttp refuses before
routing (malformed HTTP) is answered with the same JSON errors as the routes' own."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from sgjax.config import ServerArgs
from sgjax.server.errors import ApiError
from sgjax.server.keys import METRICS
from sgjax.server.metrics import Metrics

logger = logging.getLogger("sgjax.server")
REFUSAL_LOG_INTERVAL_S = 60.0
# Descriptors kept beyond the connections: the engine process's pipes, model and tokenizer files, threads
FD_RESERVE = 256


def refusal(max_connections: int) -> bytes:
    """The whole HTTP response a connection over the cap gets (no request of it is read)."""
    body = json.dumps(ApiError(f"the server has {max_connections} connections open, as many as it allows "
                               "(--max-connections); retry shortly", status=503, type_="server_error").body())
    return (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
            f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()


class Refusal(asyncio.Protocol):
    """A connection over the cap: the 503 written, the connection closed, whatever the client sends unread."""

    def __init__(self, response: bytes):
        self.response = response

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(self.response)
        transport.close()  # once the write is flushed


class ApiRequestHandler(RequestHandler):
    """aiohttp's connection handler, answering what it refuses before any route sees it (a malformed request
    line, headers or chunking) as every other error: OpenAI-style JSON, logged in one line, not a traceback."""

    __slots__ = ()

    def handle_error(self, request: web.BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> web.StreamResponse:
        if status == 500:  # a handler's own failure escaped the middleware: a bug, with its traceback
            return super().handle_error(request, status, exc, message)
        logger.info("request from %s refused before routing (%d): %s", request.remote, status,
                    message.splitlines()[0] if message else exc)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was sent already; the error cannot be")
        metrics = getattr(self._manager, "metrics", None)
        if metrics is not None:
            metrics.errors.labels(str(status), "invalid_request_error").inc()
        response = ApiError(message or HTTPStatus(status).phrase, status=status).response()
        response.force_close()
        return response


class CappedServer(web.Server):
    """aiohttp's protocol factory and connection registry: an ApiRequestHandler for each connection, a Refusal
    for each one beyond `max_connections`.

    A connection counts from its protocol's creation: the event loop may accept a burst of connections, each
    protocol created, before any of them is told it is connected, and the cap holds in a burst too."""

    def __init__(self, *args, max_connections: int, metrics: Metrics | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_connections, self.metrics = max_connections, metrics
        self.open: set[RequestHandler] = set()
        self._refused_unlogged, self._logged_at = 0, -float("inf")
        self._refusal = refusal(max_connections)
        if metrics is not None:
            metrics.connections.set_function(lambda: len(self.open))

    def __call__(self) -> asyncio.BaseProtocol:
        if len(self.open) >= self.max_connections:
            self._count_refusal()
            return Refusal(self._refusal)
        handler = ApiRequestHandler(self, loop=self._loop, **self._kwargs)  # as web.Server.__call__ makes its own
        self.open.add(handler)
        return handler

    def connection_lost(self, handler: RequestHandler, exc: BaseException | None = None) -> None:
        self.open.discard(handler)
        super().connection_lost(handler, exc)

    def _count_refusal(self) -> None:
        if self.metrics is not None:
            self.metrics.refused_connections.inc()
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= REFUSAL_LOG_INTERVAL_S:
            logger.warning("refused %d connection(s): %d are open, as many as --max-connections allows; those "
                           "over it get 503 (this is logged at most once a minute)", self._refused_unlogged,
                           self.max_connections)
            self._refused_unlogged, self._logged_at = 0, now


class CappedRunner(web.AppRunner):
    """web.AppRunner whose server is a CappedServer."""

    def __init__(self, app: web.Application, *, max_connections: int, **kwargs):
        super().__init__(app, **kwargs)
        self.max_connections = max_connections

    async def _make_server(self) -> web.Server:
        # The app's own Server (the app started and frozen, its handler and request factory bound), rebuilt
        # as a CappedServer with the same arguments.
        server = await super()._make_server()
        return CappedServer(server.request_handler, request_factory=server.request_factory,
                            handler_cancellation=server.handler_cancellation, loop=asyncio.get_running_loop(),
                            max_connections=self.max_connections, metrics=self.app.get(METRICS), **server._kwargs)


def fit_descriptor_limit(max_connections: int) -> int:
    """The connection cap the process's file-descriptor limit allows: its soft limit raised (up to the hard
    one) to hold `max_connections` plus FD_RESERVE, else the cap lowered to fit, with a warning."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        soft = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(soft - FD_RESERVE, 1)
        logger.warning("--max-connections %d lowered to %d: the process may open at most %d files (ulimit -n), "
                       "%d of them kept for the engine", max_connections, fitted, soft, FD_RESERVE)
        return fitted
    return max_connections


async def start(app: web.Application, args: ServerArgs, handle_signals: bool = False) -> CappedRunner:
    """Serve `app` on args.host:args.port; the runner to clean up when done."""
    runner = CappedRunner(app, max_connections=fit_descriptor_limit(args.max_connections),
                          handle_signals=handle_signals, access_log=None,  # the middleware logs each request
                          # a connection idle this long (before its first request too, or with headers that never
                          # finish) is closed
                          keepalive_timeout=args.keepalive_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    return runner


def serve(app: web.Application, args: ServerArgs, starting: Callable[[], Awaitable[None]] | None = None) -> None:
    """Serve `app` until SIGINT or SIGTERM; `starting`, awaited once the port is open, ends the server with its
    exception if it raises (an engine that failed to start)."""
    async def until_stopped() -> None:
        runner = await start(app, args, handle_signals=True)
        logger.info("serving on http://%s:%d", args.host, args.port)
        try:
            if starting is not None:
                await starting()
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()

    try:
        asyncio.run(until_stopped())
    except (web.GracefulExit, KeyboardInterrupt):
        pass
