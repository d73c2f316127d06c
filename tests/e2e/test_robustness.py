"""The server survives anything a client sends: hostile and malformed bodies get OpenAI-style 4xx errors, one
request's failure stays that request's, a dead engine is noticed and restarted, disconnects are noticed."""

import asyncio
import gzip
import json
import socket
import time
import urllib.error
import urllib.request

import aiohttp
import openai
import pytest

from sgjax.config import EngineArgs
from sgjax.engine import Engine
from tests.e2e.test_server import API_KEY, MODEL, LiveServer, get, post, wait_until

ENGINE_OPTIONS = dict(dtype="float32", page_size=4, max_running_requests=8, chunked_prefill_size=64, num_pages=400)
LIMITS = dict(max_prompts_per_request=4, max_n=4, max_sequences_per_request=8, max_stop_strings=3,
              max_constraint_bytes=200, max_body_bytes=50_000, body_timeout_s=1.0)
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture(scope="module")
def server(tiny_models):
    path, _ = tiny_models("llama")
    engine = Engine(path, **ENGINE_OPTIONS)
    live = LiveServer(engine, api_key=API_KEY, served_model_name=MODEL, enable_metrics=True, **LIMITS)
    yield live
    live.stop()
    engine.shutdown()


def engine_of(server) -> Engine:
    from sgjax.server.keys import ENGINE

    return server.app[ENGINE]


def idle(engine) -> bool:
    stats = engine.load_stats()
    return stats["num_running_requests"] == 0 and stats["num_queued_requests"] == 0


def raw_post(server, path: str, data: bytes, headers: dict) -> tuple[int, dict]:
    """(status, JSON body) of a POST of raw bytes; the body must be JSON whatever the status."""
    req = urllib.request.Request(server.url + path, data=data, headers={**AUTH, **headers}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def assert_openai_error(status: int, body: dict, expected_status: int, needle: str = "") -> None:
    assert status == expected_status, body
    error = body["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["code"] == expected_status, body
    assert needle.lower() in error["message"].lower(), body


# ---- 1. an error after a stream began is the stream's last event, not a second HTTP response -------------

def test_stream_aborted_mid_way_ends_with_an_error_event(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)
    stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=10_000, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            assert post(server.url + "/abort_request", {"abort_all": True})[0] == 200
    assert type(caught.value) is openai.APIError and "aborted" in caught.value.message
    wait_until(lambda: idle(engine_of(server)), timeout=30)
