"""Errors a client caused, rendered as OpenAI-style JSON bodies."""

from __future__ import annotations

from aiohttp import web


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.status, self.param, self.type = message, status, param, type_

    def response(self) -> web.Response:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.status}}
        return web.json_response(body, status=self.status)


def require(condition: bool, message: str, param: str | None = None) -> None:
    if not condition:
        raise ApiError(message, param=param)


async def read_json(request: web.Request) -> dict:
    try:
        body = await request.json()
    except ValueError as e:
        raise ApiError(f"request body is not valid JSON: {e}") from None
    require(isinstance(body, dict), "request body must be a JSON object")
    return body
