"""The HTTP server on loopback with a tiny model: the official openai client, raw HTTP for SGLang's
native API, concurrency, disconnects and errors. Token-level oracle: transformers' greedy tokens."""

import argparse
import asyncio
import json
import os
import pathlib
import re
import socket
import sys
import threading
import time
import urllib.error
import urllib.request

import jsonschema
import numpy as np
import openai
import pytest

from sgjax.config import EngineArgs, ServerArgs
from sgjax.engine import Engine
from sgjax.server.app import make_app
from sgjax.server.connections import start
from sgjax.server.keys import SERVER_ARGS
from sgjax.testing import workloads
from tests.hf_oracle import hf_greedy

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "scripts"))
import bench_serving  # noqa: E402

API_KEY = "test-key"
MODEL = "tiny"


class LiveServer:
    """The app in its own event loop thread, on a free loopback port."""

    def __init__(self, engine: Engine, **server_args):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = make_app(engine, ServerArgs(port=self.port, **server_args))
        self.loop = asyncio.new_event_loop()
        started = threading.Event()

        def serve():
            asyncio.set_event_loop(self.loop)
            self.runner = self.loop.run_until_complete(start(self.app, self.app[SERVER_ARGS]))
            started.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert started.wait(30)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def post(url: str, body, key: str | None = API_KEY, raw: bytes | None = None):
    """(status, parsed JSON body) of a POST."""
    data = raw if raw is not None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            payload = r.read()
            return r.status, json.loads(payload) if payload else None
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def get(url: str, key: str | None = API_KEY) -> tuple[int, str]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def wait_until(condition, timeout=60.0, interval=0.01):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


ENGINE_OPTIONS = dict(dtype="float32", page_size=4, max_running_requests=16, chunked_prefill_size=64, num_pages=1200,
                      enable_prompt_logprobs=True)


@pytest.fixture(scope="module", params=["in-process", "engine-process"])
def setup(tiny_models, request):
    """The server over an Engine in this process, and over one in a child process (--engine-process): every
    test below runs against both."""
    path, hf_model = tiny_models("llama")
    if request.param == "in-process":
        engine = Engine(path, **ENGINE_OPTIONS)
    else:
        engine = Engine(args=EngineArgs(model_path=path, **ENGINE_OPTIONS), engine_process=True)
    server = LiveServer(engine, api_key=API_KEY, served_model_name=MODEL, enable_metrics=True)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 512, int(rng.integers(2, 40))).tolist() for _ in range(16)]
    expected = [hf_greedy(hf_model, p, 8) for p in prompts]
    yield engine, server, prompts, expected
    server.stop()
    engine.shutdown()


def idle(engine) -> bool:
    stats = engine.load_stats()
    return stats["num_running_requests"] == 0 and stats["num_queued_requests"] == 0


def decode(engine, ids) -> str:
    return engine.tokenizer.decode(ids, skip_special_tokens=True)


def client(server, cls=openai.OpenAI):
    return cls(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0)


def test_openai_completions_sync_and_streaming(setup):
    engine, server, prompts, expected = setup
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=prompts[0], max_tokens=8, temperature=0)
    assert r.choices[0].text == decode(engine, expected[0])
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompts[0]), 8)
    chunks = list(c.completions.create(model=MODEL, prompt=prompts[1], max_tokens=8, temperature=0, stream=True,
                                       stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == decode(engine, expected[1])
    assert chunks[-1].usage.completion_tokens == 8


def test_openai_completions_batch_n_echo_logprobs(setup):
    engine, server, prompts, expected = setup
    c = client(server)
    r = c.completions.create(model=MODEL, prompt=[prompts[2], prompts[3]], max_tokens=8, temperature=0, n=2)
    assert [ch.text for ch in r.choices] == [decode(engine, expected[i]) for i in (2, 2, 3, 3)]
    assert r.usage.prompt_tokens == len(prompts[2]) + len(prompts[3])
    text = decode(engine, prompts[4])
    r = c.completions.create(model=MODEL, prompt=prompts[4], max_tokens=8, temperature=0, echo=True, logprobs=2)
    assert r.choices[0].text == text + decode(engine, expected[4])
    lp = r.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompts[4]) + 8 and lp.token_logprobs[0] is None
    assert all(1 <= len(top) <= 2 for top in lp.top_logprobs[1:])  # keyed by text: byte pieces may collide


def test_openai_logit_bias_bans_and_favours_tokens(setup):
    engine, server, prompts, expected = setup
    c = client(server)
    banned = expected[5][0]
    r = c.completions.create(model=MODEL, prompt=prompts[5], max_tokens=8, temperature=0,
                             logit_bias={str(banned): -100})
    ours = engine.generate(input_ids=prompts[5], sampling_params={"temperature": 0, "max_new_tokens": 8,
                                                                  "logit_bias": {banned: -100}})
    assert r.choices[0].text == ours["text"] != decode(engine, expected[5])
    assert banned not in ours["output_ids"]
    forced = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                       temperature=0.8, logit_bias={"65": 100})
    assert forced.choices[0].message.content == decode(engine, [65] * 3)


def test_openai_chat_sync_async_and_streaming(setup):
    engine, server, _, _ = setup
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    want = engine.generate(messages, {"temperature": 0, "max_new_tokens": 10})["text"]
    r = client(server).chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                               logprobs=True, top_logprobs=3)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == want
    assert len(r.choices[0].logprobs.content) == 10
    assert all(len(t.top_logprobs) == 3 for t in r.choices[0].logprobs.content)

    async def streamed():
        c = client(server, openai.AsyncOpenAI)
        stream = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True})
        parts, usage = [], None
        async for chunk in stream:
            parts += [ch.delta.content or "" for ch in chunk.choices]
            usage = chunk.usage or usage
        plain = await c.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0)
        return "".join(parts), usage, plain.choices[0].message.content

    text, usage, plain = asyncio.run(streamed())
    assert text == plain == want
    assert usage.completion_tokens == 10


def test_native_generate(setup):
    engine, server, prompts, expected = setup
    status, body = post(server.url + "/generate", {"input_ids": prompts[5], "sampling_params": {
        "max_new_tokens": 8, "temperature": 0}, "return_logprob": True, "top_logprobs_num": 2,
        "return_text_in_logprobs": True})
    assert status == 200 and body["output_ids"] == expected[5]
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == len(prompts[5]) and meta["finish_reason"]["type"] == "length"
    assert [t for _, t, _ in meta["output_token_logprobs"]] == expected[5]
    assert all(isinstance(text, str) for _, _, text in meta["output_token_logprobs"])
    status, body = post(server.url + "/generate", {"input_ids": [prompts[6], prompts[7]],
                                                   "sampling_params": {"max_new_tokens": 8, "temperature": 0}})
    assert [b["output_ids"] for b in body] == [expected[6], expected[7]]
    status, body = post(server.url + "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
    assert status == 200 and body["meta_info"]["completion_tokens"] == 4


def test_native_rid_names_the_request_for_abort(setup):
    engine, server, prompts, _ = setup
    finished = []
    engine.finish_hooks.append(finished.append)

    async def stream_then_abort():
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async with session.post(server.url + "/generate", json={
                    "input_ids": prompts[11], "rid": "my-request", "stream": True,
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as r:
                async for _ in r.content:
                    async with session.post(server.url + "/abort_request", json={"rid": "my-request"}) as a:
                        assert a.status == 200
                    break
                return [line async for line in r.content if line.strip()]

    lines = asyncio.run(stream_then_abort())
    engine.finish_hooks.remove(finished.append)
    assert finished[0].rid == "my-request" and finished[0].finish_reason["type"] == "abort"
    assert lines[-1].strip() == b"data: [DONE]"
    last = json.loads(lines[-2].decode().removeprefix("data: "))
    assert last["meta_info"]["finish_reason"]["type"] == "abort" and last["meta_info"]["completion_tokens"] < 400


def test_native_streaming_ends_with_done(setup):
    engine, server, prompts, expected = setup
    req = urllib.request.Request(server.url + "/generate", data=json.dumps({
        "input_ids": prompts[8], "stream": True, "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).encode(),
        headers={"Authorization": f"Bearer {API_KEY}"})
    with urllib.request.urlopen(req, timeout=60) as r:
        lines = [line for line in r.read().decode().split("\n\n") if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert chunks[-1]["output_ids"] == expected[8]
    assert chunks[-1]["text"] == decode(engine, expected[8])  # cumulative, as SGLang streams


def test_native_incremental_streaming_sends_only_the_new_text_and_ids(setup):
    engine, server, prompts, expected = setup
    args = server.app[SERVER_ARGS]
    args.incremental_streaming_output = True  # --incremental-streaming-output
    try:
        req = urllib.request.Request(server.url + "/generate", data=json.dumps({
            "input_ids": prompts[9], "stream": True,
            "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).encode(),
            headers={"Authorization": f"Bearer {API_KEY}"})
        with urllib.request.urlopen(req, timeout=60) as r:
            lines = [line for line in r.read().decode().split("\n\n") if line]
    finally:
        args.incremental_streaming_output = False
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert len(chunks) > 1
    assert [t for c in chunks for t in c["output_ids"]] == expected[9]
    assert "".join(c["text"] for c in chunks) == decode(engine, expected[9])
    assert [c["meta_info"]["finish_reason"] is None for c in chunks] == [True] * (len(chunks) - 1) + [False]


def test_200_concurrent_requests_all_correct(setup):
    engine, server, prompts, expected = setup

    async def fire():
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async def one(i):
                async with session.post(server.url + "/generate", json={
                        "input_ids": prompts[i % 16], "sampling_params": {"max_new_tokens": 8, "temperature": 0}}) as r:
                    return i, r.status, await r.json()

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(fire())
    for i, status, body in results:
        assert status == 200 and body["output_ids"] == expected[i % 16], f"request {i}"
    wait_until(lambda: engine.load_stats()["num_running_requests"] == 0)
    assert engine.load_stats()["prefix_cache_hit_rate"] > 0  # the repeated prompts were served from the cache


def test_disconnect_mid_stream_aborts_and_frees_pages(setup):
    engine, server, prompts, _ = setup
    finished = []
    engine.finish_hooks.append(finished.append)

    async def start_and_drop():
        import aiohttp

        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async with session.post(server.url + "/v1/completions", json={
                    "model": MODEL, "prompt": prompts[9], "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
                async for _ in r.content:
                    break  # one chunk, then hang up

    asyncio.run(start_and_drop())
    wait_until(lambda: finished)
    engine.finish_hooks.remove(finished.append)
    assert finished[0].finish_reason["type"] == "abort" and len(finished[0].output_ids) < 400
    wait_until(lambda: idle(engine))
    # nothing leaked: with the radix tree emptied, every usable page is free
    assert engine.flush_cache()
    stats = engine.load_stats()
    assert stats["free_pages"] == stats["num_pages"]
    status, body = post(server.url + "/generate", {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200


@pytest.mark.parametrize("path,body,needle", [
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": -1}, "max_new_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "temperature": 1e9}, "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "top_p": "high"}, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [1] * 600}, "context length"),
    ("/v1/completions", {"model": "gpt-9", "prompt": "hi"}, "does not exist"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "n": 0}, "n must be"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
    ("/generate", {"text": "hi", "input_ids": [1]}, "exactly one"),
    ("/generate", {"input_ids": [1, 100000]}, "token ids"),
    ("/generate", {"text": "hi", "sampling_params": {"bogus": 1}}, "unknown sampling"),
    ("/generate", {"text": "hi", "sampling_params": {"stop": 5}}, "stop must be"),
    ("/generate", {"text": "hi", "sampling_params": "fast"}, "sampling_params must be"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"5": 300}}, "logit_bias values"),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "logit_bias": {"99999": 1}}, "logit_bias token ids"),
    ("/generate", {"text": "hi", "sampling_params": {"logit_bias": [1]}}, "logit_bias must be an object"),
])
def test_bad_input_gets_400_with_openai_error_body(setup, path, body, needle):
    _, server, _, _ = setup
    status, err = post(server.url + path, body)
    assert status == 400
    assert needle in err["error"]["message"] and err["error"]["type"] == "invalid_request_error"


def test_invalid_json_and_api_key(setup):
    _, server, _, _ = setup
    status, err = post(server.url + "/v1/completions", None, raw=b"{not json")
    assert status == 400 and "not valid JSON" in err["error"]["message"]
    assert post(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi"}, key=None)[0] == 401
    assert post(server.url + "/v1/completions", {"model": MODEL, "prompt": "hi"}, key="wrong")[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="wrong", max_retries=0).models.list()
    assert get(server.url + "/health", key=None)[0] == 200  # health needs no key
    assert [m.id for m in client(server).models.list().data] == [MODEL]


def test_info_and_health_endpoints(setup):
    engine, server, _, _ = setup
    status, text = get(server.url + "/get_model_info")
    assert status == 200 and json.loads(text)["architecture"] == "LlamaForCausalLM"
    status, text = get(server.url + "/get_server_info")
    info = json.loads(text)
    assert info["page_size"] == 4 and "api_key" not in info
    assert get(server.url + "/health_generate")[0] == 200
    status, _ = post(server.url + "/abort_request", {"rid": "no-such-request"})
    assert status == 200


def test_engine_timings_count_the_steps_a_request_takes(setup):
    """Engine.timings, in this process or asked of the engine process: a lone request of a short prompt and 8
    greedy tokens takes 8 steps (its prefill samples the first token), no more, no fewer."""
    engine, server, prompts, _ = setup
    wait_until(lambda: idle(engine))
    assert engine.flush_cache()  # the whole prompt is computed: one step of its tokens, then 7 of one token
    prompt = prompts[1][:8]
    before, start = engine.timings(), time.perf_counter()
    status, _ = post(server.url + "/generate", {"input_ids": prompt,
                                                "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                    "ignore_eos": True}})
    wait_until(lambda: idle(engine))
    after = engine.timings()
    span = time.perf_counter() - start
    assert status == 200
    assert 0 < after["busy_s"] - before["busy_s"] <= span  # counted once, between the two readings
    assert after["steps"] - before["steps"] == 8
    assert after["step_tokens"] - before["step_tokens"] == len(prompt) + 7
    assert after["step_tokens_sq"] - before["step_tokens_sq"] == len(prompt) ** 2 + 7
    assert 0 <= after["host_bound_steps"] - before["host_bound_steps"] <= 8
    assert after["device_wait_s"] >= before["device_wait_s"]
    assert after["host_s"]["process"] > before["host_s"]["process"]


def scrape(server: LiveServer) -> dict[str, float]:
    """The server's Prometheus metrics, name (with labels) -> value."""
    metrics = {}
    for line in get(server.url + "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    return metrics


def test_metrics_change_after_requests(setup):
    engine, server, prompts, _ = setup
    before = scrape(server)
    post(server.url + "/generate", {"input_ids": prompts[10], "sampling_params": {"max_new_tokens": 5}})
    after = scrape(server)
    assert after["sgjax_generation_tokens_total"] - before.get("sgjax_generation_tokens_total", 0) == 5
    assert after["sgjax_prompt_tokens_total"] - before.get("sgjax_prompt_tokens_total", 0) == len(prompts[10])
    key = 'sgjax_requests_total{status="length"}'
    assert after[key] - before.get(key, 0) == 1
    assert after["sgjax_e2e_request_latency_seconds_count"] > before.get("sgjax_e2e_request_latency_seconds_count", 0)
    assert after["sgjax_time_to_first_token_seconds_count"] >= 1
    # the radix tree holds the finished prompts' pages: cached (evictable), not used
    assert after['sgjax_kv_pages{state="cached"}'] > 0 and 0 <= after["sgjax_kv_cache_usage"] < 1
    assert after["sgjax_prefix_cache_hit_rate"] >= 0


WEATHER_ARGS = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                           "parameters": WEATHER_ARGS}}]


def test_chat_with_tools_renders_them_into_the_prompt(setup):
    engine, server, _, _ = setup
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    c = client(server)
    plain = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0)
    with_tools = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, tools=TOOLS)
    want = engine.apply_chat_template(messages, TOOLS)
    assert with_tools.usage.prompt_tokens == len(want) > plain.usage.prompt_tokens
    # The random model writes no tool call: the reply is plain content (llama3_json format).
    assert with_tools.choices[0].message.tool_calls is None
    assert with_tools.choices[0].message.content == decode(
        engine, engine.generate(input_ids=want, sampling_params={"temperature": 0, "max_new_tokens": 4})["output_ids"])
    streamed = c.chat.completions.create(model=MODEL, messages=messages, max_tokens=4, temperature=0, tools=TOOLS,
                                         stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in streamed if ch.choices) == \
        with_tools.choices[0].message.content


def test_tool_errors(setup):
    _, server, _, _ = setup
    messages = [{"role": "user", "content": "x"}]
    status, err = post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": [{}]})
    assert status == 400 and "tools must be" in err["error"]["message"]
    for choice, needle in (({"type": "function", "function": {"name": "nope"}}, "not among the tools"),
                           ("sometimes", "tool_choice must be")):
        status, err = post(server.url + "/v1/chat/completions", {"model": MODEL, "messages": messages, "tools": TOOLS,
                                                                  "tool_choice": choice})
        assert status == 400 and needle in err["error"]["message"] and err["error"]["param"] == "tool_choice"


PRODUCT = {"type": "object", "properties": {"brand": {"type": "string", "maxLength": 10},
                                            "price": {"type": "integer", "minimum": 0, "maximum": 9999}},
           "required": ["brand", "price"], "additionalProperties": False}
SHORT_TOOLS = [{"type": "function", "function": {"name": name, "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"],
    "additionalProperties": False}}} for name in ("get_weather", "get_time")]


def test_openai_response_format_json_schema_and_json_object(setup):
    _, server, _, _ = setup
    c = client(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "product", "schema": PRODUCT}}
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "a product"}], n=4,
                                  temperature=1.0, seed=3, max_tokens=120, response_format=fmt)
    for choice in r.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), PRODUCT)
    r = c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "any json"}], temperature=0,
                                  max_tokens=200, response_format={"type": "json_object"},
                                  extra_body={"regex": None})
    if r.choices[0].finish_reason == "stop":  # free-form JSON may not close within max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:
        assert r.choices[0].message.content.startswith("{")
    r = c.completions.create(model=MODEL, prompt="phone:", max_tokens=20, temperature=1.0,
                             extra_body={"regex": r"[0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", r.choices[0].text)


def test_native_generate_with_constraints(setup):
    _, server, _, _ = setup
    for params, check in (
            ({"regex": r"(yes|no), because [a-z]{1,6}"}, lambda t: re.fullmatch(r"(yes|no), because [a-z]{1,6}", t)),
            ({"json_schema": json.dumps(PRODUCT)}, lambda t: jsonschema.validate(json.loads(t), PRODUCT) is None),
            ({"ebnf": 'start: "(" NUM ("," NUM)* ")"\nNUM: /[0-9]{1,2}/'},
             lambda t: re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", t)),
    ):
        status, out = post(server.url + "/generate", {"text": ["q1", "q2"], "sampling_params": {
            "temperature": 1.0, "max_new_tokens": 120, **params}})
        assert status == 200
        for o in out:
            assert check(o["text"]), (params, o["text"])


def test_tool_choice_required_and_named_force_a_call(setup):
    _, server, _, _ = setup
    c = client(server)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    named = {"type": "function", "function": {"name": "get_time"}}
    for choice, names in (("required", {"get_weather", "get_time"}), (named, {"get_time"})):
        r = c.chat.completions.create(model=MODEL, messages=messages, tools=SHORT_TOOLS, tool_choice=choice,
                                      temperature=1.0, seed=1, max_tokens=80, n=3)
        for ch in r.choices:
            assert ch.finish_reason == "tool_calls"
            call, = ch.message.tool_calls
            assert call.function.name in names
            jsonschema.validate(json.loads(call.function.arguments), SHORT_TOOLS[0]["function"]["parameters"])


@pytest.mark.parametrize("path,body,needle", [
    ("/generate", {"text": "hi", "sampling_params": {"regex": "[abc"}}, "invalid regex"),
    ("/generate", {"text": "hi", "sampling_params": {"json_schema": "{oops"}}, "json_schema is not valid JSON"),
    ("/generate", {"text": "hi", "sampling_params": {"ebnf": "start: undefined_rule"}}, "invalid ebnf"),
    ("/generate", {"text": "hi", "sampling_params": {"regex": "a", "ebnf": "start: \"a\""}}, "at most one"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, "response_format type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 7}}}}}},
     "invalid json_schema"),
])
def test_bad_constraints_get_400(setup, path, body, needle):
    engine, server, _, _ = setup
    status, err = post(server.url + path, body)
    assert status == 400 and needle in err["error"]["message"], err
    assert idle(engine)


def test_request_ids_appear_in_the_logs(setup, caplog):
    _, server, prompts, _ = setup
    with caplog.at_level("INFO", logger="sgjax.server"):
        r = client(server).completions.create(model=MODEL, prompt=prompts[0], max_tokens=2)
    request_id = r.id.removeprefix("cmpl-")
    assert any(request_id in rec.getMessage() and "/v1/completions -> 200" in rec.getMessage()
               for rec in caplog.records)


@pytest.mark.parametrize("extra", [["--no-engine-process"], []], ids=["in-process", "engine-process"])
def test_server_command_line_starts_and_serves(tiny_models, extra):
    """python -m sgjax.server, as a user starts it."""
    import subprocess
    import sys

    path, _ = tiny_models("qwen2")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sgjax.server", "--model-path", path, "--port", str(port),
                             "--tp", "2", "--page-size", "8", "--max-running-requests", "4",
                             "--chunked-prefill-size", "32", "--context-length", "128", "--served-model-name", "q",
                             *extra],
                            env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
                                 "PATH": ""}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_healthy(proc, url, timeout=120)
        status, body = post(url + "/v1/completions", {"model": "q", "prompt": "Hello", "max_tokens": 3}, key=None)
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert json.loads(get(url + "/get_server_info", key=None)[1])["mesh"] == "1x2"
        children = child_pids(proc.pid)
        assert bool(children) == (extra == []), children  # the engine's process, only where it has one
        if children:  # a server killed outright leaves no engine process holding the accelerator
            proc.kill()
            proc.wait(30)
            wait_until(lambda: not any(running(pid) for pid in children), timeout=60)
    finally:
        proc.terminate()
        proc.wait(30)


def wait_until_healthy(proc, url: str, timeout: float) -> None:
    """Wait for a server process's /health; fail with its output if it exits first."""
    def healthy():
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        try:
            return get(url + "/health", key=None)[0] == 200
        except OSError:
            return False

    # Each answer is a log line in the server's output pipe, which is read only at the end: polled more often,
    # a start-up's 503s could fill the pipe and block the server on its next log line
    wait_until(healthy, timeout=timeout, interval=0.2)


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is `parent` (Linux /proc)."""
    pids = []
    for stat in pathlib.Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited while we looked
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return pids


def command_line(pid: int) -> str:
    """The process's command line ('' once it has exited)."""
    try:
        return pathlib.Path(f"/proc/{pid}/cmdline").read_text()
    except OSError:
        return ""


def running(pid: int) -> bool:
    """Alive and not a zombie (an orphan's reaper may be slow or absent in a container)."""
    try:
        return pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("backend", ["openai", "sglang"])
def test_bench_serving_counts_what_the_server_sent(setup, backend):
    """scripts/bench_serving.py against the live server: its token counts and times agree with what the
    requests asked for (tests/test_bench_serving.py checks its concurrency)."""
    engine, server, _, _ = setup
    work = workloads.fixed(150, 512, input_len=12, output_len=6, seed=3)
    args = argparse.Namespace(backend=backend, base_url=server.url, model=MODEL, api_key=API_KEY,
                              max_concurrency=1000, request_rate=float("inf"))
    start = time.perf_counter()
    results = asyncio.run(bench_serving.run(args, work))
    summary = bench_serving.summarize(results, work, time.perf_counter() - start)
    assert summary["ok"] == 150 and summary["failed"] == 0 and summary["short"] == 0
    assert [r["out_tokens"] for r in results] == work.output_lens  # ignore_eos: every token asked for
    for r in results:
        assert r["start"] <= r["chunks"][0] and all(a <= b for a, b in zip(r["chunks"], r["chunks"][1:]))
        assert r["chunks"][-1] <= r["end"]
    assert summary["TTFT"][0] <= summary["E2E"][0] and summary["events"] >= 150


def test_engine_process_that_cannot_start_says_why(tmp_path):
    """An engine process that fails while starting raises in the caller, with the child's error in it."""
    with pytest.raises(RuntimeError, match="the engine process failed to start:(.|\n)*config.json"):
        Engine(args=EngineArgs(model_path=str(tmp_path), **ENGINE_OPTIONS), engine_process=True)


def test_engine_client_whose_text_side_fails_stops_its_engine(tiny_models, monkeypatch):
    """The client loads its tokenizer while the child starts; should that fail where the child's succeeded, the
    client raises that error and leaves no engine process behind."""
    from sgjax.engine import engine_process

    def broken(*_):
        raise ValueError("tokenizer files unreadable")

    path, _ = tiny_models("llama")
    monkeypatch.setattr(engine_process, "load_text_side", broken)
    before = set(child_pids(os.getpid()))
    with pytest.raises(ValueError, match="tokenizer files unreadable"):
        Engine(args=EngineArgs(model_path=path, **ENGINE_OPTIONS), engine_process=True)
    engines = [pid for pid in set(child_pids(os.getpid())) - before if "spawn_main" in command_line(pid)]
    assert not [pid for pid in engines if running(pid)]


def exchange(url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    """(status, headers, JSON body) of a GET, or of a POST of `body`."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            payload = r.read()
            return r.status, dict(r.headers), json.loads(payload) if payload else {}
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), json.loads(e.read())


def test_health_reports_the_start_up_until_the_engine_is_ready(tiny_models, tmp_path):
    """python -m sgjax.server opens its port before it builds the engine: /health answers 503 with the
    start-up's phase from its first answer on, a completion sent meanwhile gets 503 JSON with Retry-After,
    and /health turns 200 once the engine is ready. (In-process: an engine process starts the same way,
    a second interpreter later; its phases over the pipe are the next test's.)"""
    import subprocess

    path, _ = tiny_models("llama")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:  # a file, not a pipe: the server's log lines never wait for a reader
        proc = subprocess.Popen([sys.executable, "-m", "sgjax.server", "--model-path", path, "--port", str(port),
                                 "--dtype", "float32", "--page-size", "4", "--max-running-requests", "2",
                                 "--chunked-prefill-size", "16", "--context-length", "64",
                                 "--served-model-name", "m", "--no-engine-process"],
                                env={"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                                     "PATH": "", "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
                                stdout=log, stderr=subprocess.STDOUT)
    url, answers = f"http://127.0.0.1:{port}", []

    def health_answered(status: int | None = None) -> bool:
        """Ask /health once (its answer kept); whether it answered (with `status`, if given)."""
        assert proc.poll() is None, log_path.read_text()[-3000:]
        try:
            answers.append(exchange(url + "/health"))
        except OSError:  # the port is not open yet
            return False
        return status is None or answers[-1][0] == status

    try:
        # 5 times a second: more often, the polls and their log lines slow the start on a small machine
        wait_until(health_answered, timeout=120, interval=0.2)
        status, headers, body = exchange(url + "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 1})
        assert status == 503 and headers["Retry-After"] == "5", body
        assert body["error"]["code"] == 503 and "the server is starting" in body["error"]["message"], body
        # (that it then serves is test_server_command_line_starts_and_serves's)
        wait_until(lambda: health_answered(200), timeout=120, interval=0.2)
    finally:
        proc.terminate()
        proc.wait(30)
        output = log_path.read_text()
        print(output[-5000:])  # shown if the test fails
    starting = [body for status, _, body in answers if status == 503]
    assert answers[0][0] == 503 and answers[-1][0] == 200 and len(starting) == len(answers) - 1, answers
    assert all(body["status"] == "starting" for body in starting), starting
    steps = [body["progress"]["step"] for body in starting]
    assert steps == sorted(steps) and steps[-1] >= 1, starting  # the phases, in order
    assert set(starting[-1]["progress"]) == {"phase", "step", "steps", "phase_elapsed_s", "elapsed_s"}
    assert output.index("serving on http") < output.index("the engine is ready"), output[-3000:]


def test_engine_process_start_hands_each_phase_on_before_ready():
    """The caller's end of an engine process: the StartupPhases its child sends before Ready reach on_phase,
    in order, and Ready ends the start."""
    import multiprocessing

    from sgjax.engine.engine_process import EngineProcess, Ready
    from sgjax.engine.messages import StartupPhase

    caller, child = multiprocessing.Pipe()
    client = EngineProcess.__new__(EngineProcess)  # its pipe alone, without a child process
    client._conn, client._process = caller, multiprocessing.current_process()
    phases = [StartupPhase("loading weights", 1, 4), StartupPhase("compiling the first step programs", 4, 4)]
    ready = Ready(config=None, context_length=64, num_usable_pages=9, stats={})
    for message in (*phases, ready):
        child.send(message)
    seen = []
    assert client._receive_start(seen.append) == ready
    assert seen == phases


def test_an_engine_that_fails_to_start_ends_the_start_with_its_error():
    """Serving.start raises the build's own exception (python -m sgjax.server then exits 1 with its traceback),
    after the phases it reported, and serves nothing."""
    from sgjax.engine.messages import StartupPhase
    from sgjax.server.startup import Serving

    def build(report):
        report(StartupPhase("loading weights", 1, 4))
        raise FileNotFoundError("no config.json in model folder 'x'")

    serving = Serving("m")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        asyncio.run(serving.start(build))
    assert serving.engine is None and serving.progress()["phase"] == "loading weights"
