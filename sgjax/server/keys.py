"""Typed keys of what the aiohttp app and each request carry."""

from aiohttp import web

SERVING = web.AppKey("serving", object)  # startup.Serving: the engine, or its start-up's progress
SERVER_ARGS = web.AppKey("server_args", object)
STARTED = web.AppKey("started", int)
METRICS = web.AppKey("metrics", object)
OFFLOAD = web.AppKey("offload", object)  # limits.Offload: the threads that tokenize
REQUEST_ID = web.RequestKey("request_id", str)
ENGINE_REQUESTS = web.RequestKey("engine_requests", list)
EVENT_STREAM = web.RequestKey("event_stream", object)  # the open server-sent-events response, once prepared
