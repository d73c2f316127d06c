"""The aiohttp application: routes, API-key check, errors as OpenAI-style JSON, request ids in logs."""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.metadata
import logging
import time
import uuid

from aiohttp import web

from sgjax.config import ServerArgs
from sgjax.engine.chat_template import role_markers
from sgjax.server import native_api, openai_api
from sgjax.server.errors import ApiError, read_body
from sgjax.server.keys import (
    ENGINE_REQUESTS,
    EVENT_STREAM,
    METRICS,
    OFFLOAD,
    REQUEST_ID,
    SERVER_ARGS,
    SERVING,
    STARTED,
)
from sgjax.server.limits import Offload
from sgjax.server.metrics import Metrics
from sgjax.server.protocol import AbortRequest, openapi, parse
from sgjax.server.startup import Serving
from sgjax.server.streaming import end_with_error

logger = logging.getLogger("sgjax.server")
OPEN_PATHS = {"/health", "/openapi.json"}  # reachable without the API key
# What answers while the engine starts (the health routes with the start-up's progress); the rest get 503
ANSWERED_WHILE_STARTING = {"/health", "/health_generate", "/openapi.json", "/metrics"}
HEALTH_GENERATE_TIMEOUT_S = 60.0  # a token behind a full queue of requests may take this long


@web.middleware
async def handle_request(request: web.Request, handler):
    request[REQUEST_ID] = uuid.uuid4().hex
    started = time.monotonic()
    status, error_type = 500, "server_error"
    try:
        key = request.app[SERVER_ARGS].api_key
        if key and request.path not in OPEN_PATHS and request.headers.get("Authorization") != f"Bearer {key}":
            raise ApiError("missing or wrong API key", status=401, type_="authentication_error")
        if request.app[SERVING].engine is None and request.path not in ANSWERED_WHILE_STARTING:
            raise request.app[SERVING].starting_error()
        if request.app[SERVER_ARGS].log_requests and request.can_read_body:
            logger.info("request %s body: %.2000s", request[REQUEST_ID], await read_body(request))
        response = await handler(request)
        status = response.status
        return response
    except ApiError as e:
        status, error_type = e.status, e.type
        return await error_response(request, e)
    except web.HTTPException as e:
        status = e.status
        if e.status < 400:
            raise
        # aiohttp's own 404 / 405 / 413 ..., in the same JSON shape as every other error
        error = ApiError(e.reason if not e.text or e.text.startswith(f"{e.status}:") else e.text, status=e.status,
                         type_="invalid_request_error" if e.status < 500 else "server_error")
        error_type = error.type
        return await error_response(request, error)
    except ConnectionError:
        # The client went away mid-stream: there is no one to answer, and aiohttp would log a traceback for
        # each of these (a flood under many disconnects); the request line below is the record.
        status, error_type = 499, "client_disconnected"
        return request.get(EVENT_STREAM) or web.Response(status=499)
    except Exception as e:
        logger.exception("request %s failed", request[REQUEST_ID])
        return await error_response(request, ApiError(f"internal error: {e}", status=500, type_="server_error"))
    finally:
        unfinished = [r for r in request.get(ENGINE_REQUESTS, ()) if not r.finished]
        if unfinished:
            request.app[SERVING].engine.abort_requests(unfinished)
        if status >= 400 and METRICS in request.app:
            request.app[METRICS].errors.labels(str(status), error_type).inc()
        logger.info("request %s %s %s -> %s in %.1f ms", request[REQUEST_ID], request.method, request.path,
                    status, (time.monotonic() - started) * 1e3)


async def error_response(request: web.Request, error: ApiError) -> web.StreamResponse:
    """The error as a JSON response, or, once an event stream has begun, as its last event."""
    stream = request.get(EVENT_STREAM)
    if stream is None:
        return error.response()
    await end_with_error(stream, error.body())
    return stream


async def health(request: web.Request) -> web.Response:
    """200 while the engine runs; 503 with the start-up's progress while it starts, 503 once it died."""
    serving = request.app[SERVING]
    if serving.engine is None:
        return serving.starting_response()
    if not serving.engine.alive:
        raise ApiError("the engine is not running", status=503, type_="server_error")
    return web.Response(text="")


async def health_generate(request: web.Request) -> web.Response:
    """200 only once the engine generated a token: a dead, restarting or stuck engine gets 503."""
    engine = request.app[SERVING].engine
    if engine is None:
        return request.app[SERVING].starting_response()
    if not engine.alive:
        raise ApiError("the engine is not running", status=503, type_="server_error")
    requests = engine.make_requests(input_ids=[0], sampling_params={"max_new_tokens": 1, "temperature": 0})
    request[ENGINE_REQUESTS] = requests  # aborted by the middleware if they do not finish in time
    try:
        await asyncio.wait_for(engine.run_to_end(requests), HEALTH_GENERATE_TIMEOUT_S)
    except TimeoutError:
        raise ApiError(f"the engine generated no token in {HEALTH_GENERATE_TIMEOUT_S:.0f} s", status=503,
                       type_="server_error") from None
    reason = requests[0].finish_reason or {}
    if reason.get("type") == "abort" or len(requests[0].output_ids) != 1:
        raise ApiError(f"the engine failed to generate: {reason.get('message', reason)}", status=503,
                       type_="server_error")
    return web.Response(text="")


async def model_info(request: web.Request) -> web.Response:
    engine, args = request.app[SERVING].engine, request.app[SERVER_ARGS]
    return web.json_response({"model_path": engine.args.model_path, "tokenizer_path": engine.args.model_path,
                              "is_generation": True, "served_model_name": args.served_model_name,
                              "architecture": engine.config.architecture,
                              "architectures": [engine.config.architecture],
                              "context_length": engine.context_length,
                              "has_image_understanding": engine.image_placeholder is not None,
                              "has_audio_understanding": False,
                              # for sgjax.lang: the text standing for one image in a prompt (None: text-only)
                              "image_placeholder": engine.image_placeholder,
                              # for sgjax.lang.RuntimeEndpoint: the text around each role's messages
                              "role_markers": role_markers(engine.tokenizer)})


async def server_info(request: web.Request) -> web.Response:
    engine = request.app[SERVING].engine
    info = {**dataclasses.asdict(engine.args), **dataclasses.asdict(request.app[SERVER_ARGS])}
    info.pop("api_key", None)
    info.update(engine.load_stats())
    # SGLang's names: how many tokens the KV pool holds, and the server's version (sgjax's)
    info["max_total_num_tokens"] = engine.num_usable_pages * engine.args.page_size
    info["version"] = importlib.metadata.version("sgjax")
    return web.json_response(info)


async def flush_cache(request: web.Request) -> web.Response:
    if not await asyncio.get_running_loop().run_in_executor(None, request.app[SERVING].engine.flush_cache):
        raise ApiError("cannot flush the cache while requests are running")
    return web.Response(text="cache flushed")


async def abort_request(request: web.Request) -> web.Response:
    """SGLang's /abort_request: {rid} aborts that request (all its samples), {abort_all: true} every one."""
    body = await parse(request, AbortRequest)
    if body.abort_all:
        request.app[SERVING].engine.abort_all()
    else:
        request.app[SERVING].engine.abort(body.rid)
    return web.Response(text="")


async def openapi_schema(request: web.Request) -> web.Response:
    """The OpenAPI document of this server's routes, their bodies from sgjax/server/protocol.py."""
    routes = [(r.method, r.resource.canonical) for r in request.app.router.routes() if r.resource is not None]
    return web.json_response(openapi(sorted({p for m, p in routes if m == "GET"}),
                                     sorted({p for m, p in routes if m == "POST"}),
                                     request.app[SERVER_ARGS].served_model_name, importlib.metadata.version("sgjax")))


async def metrics(request: web.Request) -> web.Response:
    return web.Response(body=request.app[METRICS].render(), content_type="text/plain", charset="utf-8")


def make_app(engine, server_args: ServerArgs) -> web.Application:
    """The HTTP application over a running Engine, or over a Serving whose engine is still starting."""
    serving = engine if isinstance(engine, Serving) else Serving.of(engine)
    if server_args.served_model_name is None:
        server_args.served_model_name = serving.model_name
    if server_args.chat_template:
        with open(server_args.chat_template) as f:
            template = f.read()
        serving.when_ready(lambda engine: setattr(engine.tokenizer, "chat_template", template))
    app = web.Application(middlewares=[handle_request], client_max_size=server_args.max_body_bytes)
    app[SERVING], app[SERVER_ARGS], app[STARTED] = serving, server_args, int(time.time())
    app[OFFLOAD] = Offload(server_args.tokenizer_threads, server_args.max_pending_requests)

    async def stop_offload(app: web.Application) -> None:
        app[OFFLOAD].shutdown()

    app.on_cleanup.append(stop_offload)
    app.router.add_get("/health", health)
    app.router.add_get("/openapi.json", openapi_schema)
    app.router.add_get("/health_generate", health_generate)
    for path in ("/get_model_info", "/model_info"):  # SGLang's old and new names
        app.router.add_get(path, model_info)
    for path in ("/get_server_info", "/server_info"):
        app.router.add_get(path, server_info)
    app.router.add_get("/flush_cache", flush_cache)
    app.router.add_post("/flush_cache", flush_cache)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/generate", native_api.generate)
    for prefix in ("", "/v1"):
        app.router.add_post(prefix + "/tokenize", native_api.tokenize)
        app.router.add_post(prefix + "/detokenize", native_api.detokenize)
    app.router.add_get("/v1/models", openai_api.list_models)
    app.router.add_post("/v1/completions", openai_api.completions)
    app.router.add_post("/v1/chat/completions", openai_api.chat_completions)
    if server_args.enable_metrics:
        app[METRICS] = Metrics()
        serving.when_ready(app[METRICS].attach)

        async def stop_observing(app: web.Application) -> None:  # the engine may outlive this app
            if serving.engine is not None:
                serving.engine.finish_hooks.remove(app[METRICS].observe)

        app.on_cleanup.append(stop_observing)
        app.router.add_get("/metrics", metrics)
    return app
