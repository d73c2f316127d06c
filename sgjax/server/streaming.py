"""Running a handler's engine requests, and server-sent events (`data: <json>` lines, then `data: [DONE]`)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from aiohttp import web

from sgjax.server.keys import ENGINE, ENGINE_REQUESTS


def run(request: web.Request, requests: list) -> AsyncIterator:
    """The requests' (index, delta, request) updates. They are registered on the HTTP request, so the
    app's middleware aborts whatever is unfinished when the handler ends (a client that disconnected)."""
    request[ENGINE_REQUESTS] = requests
    return request.app[ENGINE].run_requests(requests)


async def open_event_stream(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    return response


async def send_event(response: web.StreamResponse, payload) -> None:
    """Raises ConnectionResetError when the client has gone."""
    data = payload if isinstance(payload, str) else json.dumps(payload)
    await response.write(f"data: {data}\n\n".encode())
