"""Errors a client caused, rendered as OpenAI-style JSON bodies."""

from __future__ import annotations

import asyncio
import codecs
import json
import re

from aiohttp import web

from sgjax.server.keys import SERVER_ARGS

# A JSON escape that may decode to half of a surrogate pair: only then can the text hold a lone one
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.param, self.type = message, status, param, type_
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}

    def response(self) -> web.Response:
        response = web.json_response(self.body(), status=self.status, headers=self.headers)
        if self.status in (408, 413):  # the body's unread rest would be read as the next request
            response.force_close()
        return response


def require(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise ApiError(message, param=param)


async def read_body(request: web.Request) -> str:
    """The body as text: 408 if it does not arrive in time, 413 past --max-body-bytes (the app's
    client_max_size), 400 for a body that cannot be decoded (bad compression, unknown charset)."""
    args = request.app[SERVER_ARGS]
    if (request.content_length or 0) > args.max_body_bytes:  # said up front: not waited for
        raise ApiError(f"the request body is {request.content_length} bytes; this server accepts at most "
                       f"{args.max_body_bytes} (--max-body-bytes)", status=413)
    try:
        raw = await asyncio.wait_for(request.read(), args.body_timeout_s)
    except TimeoutError:
        raise ApiError("the request body did not arrive in time", status=408) from None
    except web.HTTPException:
        raise
    except Exception as e:  # aiohttp's decompression and payload errors
        raise ApiError(f"the request body could not be read: {e}") from None
    charset = request.charset or "utf-8"
    try:
        codecs.lookup(charset)
    except LookupError:
        raise ApiError(f"unknown charset {charset!r}; send UTF-8") from None
    try:
        return raw.decode(charset)
    except UnicodeDecodeError as e:
        raise ApiError(f"the request body is not valid {charset}: {e}") from None


async def read_json(request: web.Request) -> dict:
    text = await read_body(request)
    try:
        body = json.loads(text)
    except ValueError as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError("request body is nested too deeply") from None
    require(isinstance(body, dict), "request body must be a JSON object")
    if SURROGATE_ESCAPE.search(text):
        try:
            json.dumps(body, ensure_ascii=False).encode()
        except UnicodeEncodeError:
            raise ApiError("request body has a lone surrogate (\\ud800-\\udfff) in a string; strings must be "
                           "valid Unicode") from None
    return body
