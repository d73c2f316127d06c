"""Running a handler's engine requests, and server-sent events (`data: <json>` lines, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

from aiohttp import web

from sgjax.server.keys import ENGINE_REQUESTS, EVENT_STREAM, SERVING

DISCONNECT_POLL_S = 0.1  # how soon a non-streaming request notices that its client hung up


def run(request: web.Request, requests: list) -> AsyncIterator:
    """The requests' (index, delta, request, finished) updates (see Engine.run_requests). They are
    registered on the HTTP request, so the app's middleware aborts whatever is unfinished when the handler
    ends (a client that disconnected)."""
    request[ENGINE_REQUESTS] = requests
    return request.app[SERVING].engine.run_requests(requests)


async def run_to_end(request: web.Request, requests: list) -> list:
    """Like `run`, for handlers that answer only once every request has finished. A client that hangs up
    meanwhile aborts them: nothing else would notice before the answer is written."""
    request[ENGINE_REQUESTS] = requests
    engine = request.app[SERVING].engine
    watcher = asyncio.create_task(abort_on_disconnect(request, engine, requests))
    try:
        return await engine.run_to_end(requests)
    finally:
        watcher.cancel()


async def abort_on_disconnect(request: web.Request, engine, requests: list) -> None:
    # aiohttp (without handler_cancellation) only drops the transport of a closed connection: it is polled
    while True:
        await asyncio.sleep(DISCONNECT_POLL_S)
        if request.transport is None or request.transport.is_closing():
            engine.abort_requests([r for r in requests if not r.finished])
            return


async def end_event_stream(response: web.StreamResponse, usage_event: dict | None = None) -> None:
    """The optional usage event, then `data: [DONE]`."""
    if usage_event is not None:
        await send_event(response, usage_event)
    await send_event(response, "[DONE]")


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    request[EVENT_STREAM] = response  # from here on an error can only be an event of this stream
    return response


async def end_with_error(response: web.StreamResponse, error: dict) -> None:
    """An error after the stream began: an `error` event (the openai client raises it), then `data: [DONE]`.
    A second HTTP response would land inside the chunked body and corrupt it."""
    try:
        await send_event(response, error)
        await send_event(response, "[DONE]")
        await response.write_eof()
    except (ConnectionError, RuntimeError):  # the client has gone, or the stream was already closed
        pass


async def send_event(response: web.StreamResponse, payload) -> None:
    """Raises ConnectionResetError when the client has gone."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await response.write(f"data: {data}\n\n".encode())
