"""The server survives anything a client sends: hostile and malformed bodies get OpenAI-style 4xx errors, one
request's failure stays that request's, a dead engine is noticed and restarted, disconnects are noticed."""

import asyncio
import gzip
import json
import logging
import re
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest

from sgjax.config import EngineArgs
from sgjax.engine import Engine
from tests.e2e.test_server import (
    API_KEY,
    MODEL,
    LiveServer,
    get,
    post,
    scrape,
    wait_until,
)

ENGINE_OPTIONS = dict(dtype="float32", page_size=4, max_running_requests=8, chunked_prefill_size=64, num_pages=400)
LIMITS = dict(max_prompts_per_request=4, max_n=4, max_sequences_per_request=8, max_stop_strings=3,
              max_constraint_bytes=200, max_body_bytes=50_000, body_timeout_s=1.0, keepalive_timeout_s=2.0)
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
    from sgjax.server.keys import SERVING

    return server.app[SERVING].engine


def idle(engine) -> bool:
    stats = engine.load_stats()
    return stats["num_running_requests"] == 0 and stats["num_queued_requests"] == 0


def pages_accounted(engine, running=()) -> bool:
    """The ownership invariant: every usable KV page is free, held by the radix cache, or a running request's
    own (at idle, with no running requests: free or cached)."""
    tree = engine.radix.all_pages() if engine.radix else []
    own = [p for r in running for p in r.pages[r.num_tree_pages:]]
    return sorted(tree + engine.allocator.free_pages() + own) == list(range(1, engine.allocator.num_pages))


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
    stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=400, stream=True,
                                       extra_body={"ignore_eos": True})
    with pytest.raises(openai.APIError) as caught:
        for _ in stream:
            assert post(server.url + "/abort_request", {"abort_all": True})[0] == 200
    assert type(caught.value) is openai.APIError and "aborted" in caught.value.message
    wait_until(lambda: idle(engine_of(server)), timeout=30)


# ---- 2. one request's failure is that request's error ----------------------------------------------------

@pytest.mark.parametrize("field,value", [("top_k", 2**31), ("max_tokens", True), ("seed", 2**70),
                                         ("stop_token_ids", [2**40])])
def test_out_of_range_integers_get_400(server, field, value):
    status, body = post(server.url + "/v1/completions", {"model": MODEL, "prompt": [5, 6], field: value})
    assert_openai_error(status, body, 400, field)


def test_a_request_that_breaks_step_building_fails_alone(server, monkeypatch):
    """A request validation let through (top_k beyond int32) fails with its error; the requests it would have
    shared steps with finish normally, at intake and when it gets as far as a step."""
    engine = engine_of(server)
    launcher = engine.core.launcher
    real_check, skipped = launcher.check, []

    def check_except_first_bad(req):  # let the bad request past intake once, into a step
        if req.params.top_k > 2**31 and not skipped:
            skipped.append(req.rid)
            return
        real_check(req)

    monkeypatch.setattr(launcher, "check", check_except_first_bad)

    async def run():
        good = engine.make_requests(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 6, "temperature": 0,
                                                                          "ignore_eos": True})
        bad = [engine.make_requests(input_ids=[8, 9], sampling_params={"max_new_tokens": 6})[0] for _ in range(2)]
        for b in bad:
            b.params.top_k = 2**40
        await asyncio.gather(*(engine.run_to_end(r) for r in [good, bad[:1], bad[1:]]))
        return good[0], bad

    good, bad = asyncio.run(run())
    assert skipped and good.finish_reason["type"] == "length" and len(good.output_ids) == 6
    for b in bad:
        assert b.finish_reason["type"] == "abort" and "cannot run" in b.finish_reason["message"], b.finish_reason
    wait_until(lambda: idle(engine), timeout=30)


def test_a_stop_regex_that_backtracks_without_end_fails_alone(server):
    """A stop_regex whose search backtracks exponentially in the output's length (nested alternatives that
    match the same characters) would hold the engine thread for minutes: it ends its own request with an
    error naming it, and the request beside it finishes."""
    engine = engine_of(server)
    greedy = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}

    async def run():
        good = engine.make_requests(input_ids=[5, 6, 7], sampling_params=greedy)
        bad = engine.make_requests(input_ids=[5, 6, 8], sampling_params={**greedy,
                                                                         "stop_regex": r"(?:[\s\S]|.)*\d{9}"})
        await asyncio.wait_for(asyncio.gather(engine.run_to_end(good), engine.run_to_end(bad)), 60)
        return good[0], bad[0]

    good, bad = asyncio.run(run())
    assert good.finish_reason["type"] == "length" and len(good.output_ids) == 24, good.finish_reason
    assert bad.finish_reason["type"] == "abort" and "stop_regex" in bad.finish_reason["message"], bad.finish_reason
    wait_until(lambda: idle(engine), timeout=30)


@pytest.mark.parametrize("where", ["outputs.append_token", "scheduler.add"])
def test_a_request_that_fails_in_the_engine_fails_alone(server, monkeypatch, where):
    """An exception while taking a request in or processing its token fails that request; the request running
    beside it finishes."""
    engine = engine_of(server)
    owner = getattr(engine.core, where.split(".")[0])
    real = getattr(owner, where.split(".")[1])

    def failing_for_one(req, *args):
        if req.rid == "breaks":
            raise RuntimeError("injected fault")
        return real(req, *args)

    monkeypatch.setattr(owner, where.split(".")[1], failing_for_one)
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}

    async def run():
        good = engine.make_requests(input_ids=[5, 6, 7], sampling_params=greedy)
        bad = engine.make_requests(input_ids=[5, 6, 8], sampling_params=greedy, rid="breaks")
        # a request the engine loses would never finish
        await asyncio.wait_for(asyncio.gather(engine.run_to_end(good), engine.run_to_end(bad)), 60)
        return good[0], bad[0]

    good, bad = asyncio.run(run())
    assert good.finish_reason["type"] == "length" and len(good.output_ids) == 6, good.finish_reason
    assert bad.finish_reason["type"] == "abort" and "injected fault" in bad.finish_reason["message"]
    wait_until(lambda: idle(engine) and pages_accounted(engine), timeout=30)


def test_a_failed_step_fails_its_requests_and_the_engine_serves_the_rest(server, monkeypatch):
    """A fault no request can be blamed for (collecting a step) fails that step's requests with a clean error;
    a request that was waiting for a slot meanwhile, and later ones, are served, and none of them reuses the
    failed requests' cached prompts (their KV may never have been written)."""
    engine = engine_of(server)
    slots = ENGINE_OPTIONS["max_running_requests"]
    launcher = engine.core.launcher
    real, faults = launcher.collect, []

    def collect_failing_once(step):
        if not faults:
            faults.append(len(step.batch))
            raise RuntimeError("injected fault")
        return real(step)

    monkeypatch.setattr(launcher, "collect", collect_failing_once)
    greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}

    async def run():
        prompts = [[20 * i + j + 1 for j in range(9)] for i in range(slots + 1)]  # two cacheable pages each
        requests = engine.make_requests(input_ids=prompts, sampling_params=greedy)
        await engine.run_to_end(requests)
        return requests

    requests = asyncio.run(run())
    failed = [r for r in requests if r.finish_reason["type"] == "abort"]
    served = [r for r in requests if r.finish_reason["type"] == "length" and len(r.output_ids) == 8]
    assert faults and failed and all("injected fault" in r.finish_reason["message"] for r in failed)
    assert len(failed) <= slots and len(served) == len(requests) - len(failed), [r.finish_reason for r in requests]
    later = asyncio.run(engine.run_to_end(engine.make_requests(input_ids=failed[0].prompt_ids,
                                                               sampling_params=greedy)))[0]
    assert later.finish_reason["type"] == "length" and len(later.output_ids) == 8
    assert later.cached_tokens == 0
    wait_until(lambda: idle(engine) and pages_accounted(engine), timeout=30)


def test_a_failed_steps_pages_leave_the_cache_while_a_live_request_shares_their_prefix(server, monkeypatch):
    """A request that shares a cached prompt prefix with a failed step's request, but was not in that step (a
    prefill the step had no budget for), keeps running and is served; of the failed request's prompt, the pages
    the step wrote leave the radix cache (their KV may never have been written) while the shared prefix stays,
    and every page is accounted for afterwards."""
    engine = engine_of(server)
    scheduler, launcher = engine.core.scheduler, engine.core.launcher
    shared = list(range(300, 308))  # two pages
    live_prompt, failing_prompt = shared + list(range(400, 440)), shared + list(range(500, 512))
    real_schedule, real_collect, faults, accounted = scheduler.schedule, launcher.collect, [], []

    def schedule_starving_the_live_one():  # while the failing request is in the engine
        if faults and not accounted and any(r.rid == "live" for r in scheduler.running):
            accounted.append(pages_accounted(engine, running=scheduler.running))  # on the engine thread
        batch = real_schedule()
        if any(r.rid == "fails" for r in [*scheduler.waiting, *scheduler.running]):
            batch = [(r, n) for r, n in batch if r.rid != "live"]
        return batch

    def collect_failing_once(step):
        if not faults and any(r.rid == "fails" for r, _ in step.batch):
            faults.append([r.rid for r, _ in step.batch])
            raise RuntimeError("injected fault")
        return real_collect(step)

    monkeypatch.setattr(scheduler, "schedule", schedule_starving_the_live_one)
    monkeypatch.setattr(launcher, "collect", collect_failing_once)
    greedy = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}

    async def run():
        live = engine.make_requests(input_ids=live_prompt, sampling_params=greedy, rid="live")[0]
        running = asyncio.ensure_future(engine.run_to_end([live]))
        deadline = time.monotonic() + 30
        while not live.output_ids:  # decoding: its prompt, the shared prefix with it, is in the radix cache
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        failing = engine.make_requests(input_ids=failing_prompt, sampling_params=greedy, rid="fails")[0]
        await asyncio.wait_for(asyncio.gather(running, engine.run_to_end([failing])), 60)
        return live, failing

    live, failing = asyncio.run(run())
    monkeypatch.undo()
    assert faults == [["fails"]] and accounted == [True], (faults, accounted)
    assert failing.finish_reason["type"] == "abort" and "injected fault" in failing.finish_reason["message"]
    assert live.finish_reason["type"] == "length" and len(live.output_ids) == 12, live.finish_reason
    wait_until(lambda: idle(engine) and pages_accounted(engine), timeout=30)
    later = asyncio.run(engine.run_to_end(engine.make_requests(input_ids=failing_prompt, sampling_params=greedy)))[0]
    assert later.cached_tokens == len(shared)  # the live request's prefix, not the failed request's pages
    assert engine.flush_cache()
    quiet = [asyncio.run(engine.run_to_end(engine.make_requests(input_ids=p, sampling_params=greedy)))[0].output_ids
             for p in (live_prompt, failing_prompt)]
    assert [live.output_ids, later.output_ids] == quiet
    wait_until(lambda: idle(engine) and pages_accounted(engine), timeout=30)


# ---- 3. a dead engine process: its requests fail cleanly, health says so, a watchdog restarts it -----------

def test_dead_engine_process_fails_its_streams_and_is_restarted(tiny_models):
    """The stream in flight ends with an error event naming the exit, /health and /health_generate say 503 and
    requests are refused while the engine is down, and once the watchdog restarted it requests are served."""
    path, _ = tiny_models("llama")
    engine = Engine(args=EngineArgs(model_path=path, **ENGINE_OPTIONS), engine_process=True, restart_engine=True)
    gate, restart = threading.Event(), engine._restart_core
    engine._restart_core = lambda: gate.wait(60) and restart()  # held back so the dead state can be seen
    live = LiveServer(engine, api_key=API_KEY, served_model_name=MODEL)
    try:
        assert get(live.url + "/health_generate")[0] == 200
        client = openai.OpenAI(base_url=live.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        stream = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        with pytest.raises(openai.APIError) as caught:
            for _ in stream:
                engine.core._process.kill()
        assert type(caught.value) is openai.APIError and "engine process exited" in caught.value.message
        for path in ("/health", "/health_generate"):
            status, text = get(live.url + path)
            assert_openai_error(status, json.loads(text), 503, "not running")
        status, body = post(live.url + "/generate", {"input_ids": [1, 2], "sampling_params": {"max_new_tokens": 2}})
        assert status == 200 and "engine process is not running" in body["meta_info"]["finish_reason"]["message"]
        gate.set()
        wait_until(lambda: get(live.url + "/health_generate")[0] == 200, timeout=120)
        assert engine.num_restarts == 1
        reply = client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=3, extra_body={"ignore_eos": True})
        assert reply.usage.completion_tokens == 3
    finally:
        gate.set()
        live.stop()
        engine.shutdown()


# ---- 4. a non-streaming client that hangs up aborts its generation --------------------------------------

def test_non_streaming_client_that_disconnects_aborts_its_request(server):
    engine = engine_of(server)
    finished = []
    engine.finish_hooks.append(finished.append)

    async def send_then_hang_up():
        _reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        body = json.dumps({"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 400, "ignore_eos": True}).encode()
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        deadline = time.monotonic() + 30
        while engine.load_stats()["num_running_requests"] == 0:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        writer.close()

    try:
        asyncio.run(send_then_hang_up())
        wait_until(lambda: finished, timeout=30)
    finally:
        engine.finish_hooks.remove(finished.append)
    assert finished[0].finish_reason["type"] == "abort" and len(finished[0].output_ids) < 400
    wait_until(lambda: idle(engine), timeout=30)


# ---- 7, 8. malformed and over-lenient bodies get OpenAI-style 4xx errors ---------------------------------

def body(**fields) -> bytes:
    return json.dumps({"model": MODEL, **fields}).encode()


JSON = {"Content-Type": "application/json"}
CHAT = "/v1/chat/completions"


@pytest.mark.parametrize("path,data,headers,status,needle", [
    ("/v1/completions", b'{"model": "tiny", "prompt": ' + b"[" * 20_000 + b"]" * 20_000 + b"}", JSON, 400,
     "nested"),
    ("/v1/completions", body(prompt="hi", stream=True, stream_options="yes"), JSON, 400, "stream_options"),
    (CHAT, body(messages=[{"role": "user", "content": [{"type": "text", "text": 5}]}]), JSON, 400, "string"),
    ("/v1/completions", b'{"model": "tiny", "prompt": "a\\ud800b"}', JSON, 400, "surrogate"),
    ("/generate", b'{"text": "hi"}', {"Content-Type": "application/json; charset=klingon"}, 400, "charset"),
    ("/generate", b'{"text": "hi"}', {**JSON, "Content-Encoding": "gzip"}, 400, "could not be read"),
    ("/generate", gzip.compress(b'{"text": "hi", "sampling_params": {"max_new_tokens": 1}}', mtime=0),
     {**JSON, "Content-Encoding": "gzip"}, 200, ""),
    ("/v1/completions", body(prompt="hi", max_tokens=1e12), JSON, 400, "max_tokens"),
    ("/v1/completions", body(prompt="hi", max_tokens=100_000), JSON, 400, "context length"),
    (CHAT, body(messages=[{"role": "wizard", "content": "hi"}]), JSON, 400, "wizard"),
    ("/v1/completions", body(prompt="x" * 60_000), JSON, 413, ""),
    ("/v1/completions", body(prompt="hi", echo="yes"), JSON, 400, "echo"),
    ("/generate", b'{"text": "hi", "stream": "no"}', JSON, 400, "stream"),
    ("/generate", b'{"text": []}', JSON, 400, "text"),
    (CHAT, body(messages=[{"role": "user"}]), JSON, 400, "a user message needs content"),
    (CHAT, body(messages=[{"role": "user", "content": "hi"}], tool_choice="required"), JSON, 400, "needs tools"),
])
def test_malformed_bodies_get_json_errors(server, path, data, headers, status, needle):
    got, reply = raw_post(server, path, data, headers)
    if status == 200:
        assert got == 200 and reply["meta_info"]["completion_tokens"] == 1
    else:
        assert_openai_error(got, reply, status, needle)


def raw_exchange(server, data: bytes) -> tuple[bytes, bytes]:
    """(head, body) of the response to raw bytes sent on a new connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(data)
        reply = b""
        while b"\r\n\r\n" not in reply or len(reply.partition(b"\r\n\r\n")[2]) < int(
                re.search(rb"(?i)content-length: *(\d+)", reply).group(1)):
            chunk = s.recv(65536)
            assert chunk, reply
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return head, payload


@pytest.mark.parametrize("data,needle", [
    (b"GET /health HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 10_000 + b"\r\n\r\n", "8190 bytes"),
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "content-length"),
    (b"POST /generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "chunk size"),
])
def test_malformed_http_gets_a_json_400_and_no_traceback(server, caplog, data, needle):
    with caplog.at_level(logging.WARNING):
        head, payload = raw_exchange(server, data)
    assert head.startswith(b"HTTP/1.0 400") and b"application/json" in head, head
    assert_openai_error(400, json.loads(payload), 400, needle)
    assert not caplog.records, caplog.text[:2000]


def test_body_declared_too_large_gets_413_without_waiting_for_it(server):
    head, payload = raw_exchange(server, b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Authorization: Bearer " + API_KEY.encode()
                                 + b"\r\nContent-Length: 1000000000\r\n\r\n{")
    assert head.startswith(b"HTTP/1.1 413"), head  # not 408: the body was not waited for
    assert_openai_error(413, json.loads(payload), 413, "--max-body-bytes")


@pytest.mark.parametrize("path,status", [("/no/such/path", 404), ("/v1/completions", 405)])
def test_unknown_paths_and_methods_get_json_errors(server, path, status):
    got, text = get(server.url + path)
    assert_openai_error(got, json.loads(text), status)


# ---- 5. limits, and tokenizing off the event loop -------------------------------------------------------

@pytest.mark.parametrize("path,fields,flag", [
    ("/v1/completions", dict(prompt="hi", n=5), "max-n"),
    ("/v1/completions", dict(prompt=["a", "b", "c", "d", "e"]), "max-prompts-per-request"),
    ("/v1/completions", dict(prompt=["a", "b", "c"], n=3), "max-sequences-per-request"),
    ("/v1/completions", dict(prompt="hi", stop=["a", "b", "c", "d"]), "max-stop-strings"),
    (CHAT, dict(messages=[{"role": "user", "content": "hi"}], regex="a" * 201), "max-constraint-bytes"),
    ("/generate", dict(text="hi", sampling_params={"json_schema": {"enum": ["x" * 300]}}), "max-constraint-bytes"),
    ("/tokenize", dict(prompt=["a"] * 5), "max-prompts-per-request"),
])
def test_requests_beyond_the_limits_get_400_naming_the_flag(server, path, fields, flag):
    data = json.dumps(fields).encode() if path in ("/generate", "/tokenize") else body(**fields)
    status, reply = raw_post(server, path, data, JSON)
    assert_openai_error(status, reply, 400, f"(--{flag})")


def test_prompts_are_tokenized_off_the_event_loop(server, monkeypatch):
    engine, threads = engine_of(server), []
    real = engine.make_requests
    monkeypatch.setattr(engine, "make_requests", lambda *a, **k: threads.append(threading.current_thread().name)
                        or real(*a, **k))
    status, _ = raw_post(server, "/v1/completions", body(prompt="hi", max_tokens=1), JSON)
    assert status == 200 and threads and threads[0].startswith("sgjax-tokenizer"), threads
    from sgjax.server.keys import OFFLOAD

    monkeypatch.setattr(server.app[OFFLOAD], "max_pending", 0)  # as if the tokenizer's queue were full
    req = urllib.request.Request(server.url + "/generate", data=b'{"text": "hi"}', headers={**AUTH, **JSON})
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(req, timeout=30)
    assert caught.value.headers["Retry-After"] == "1"
    assert_openai_error(503, json.loads(caught.value.read()), 503, "busy")


def test_echo_and_logprobs_decode_off_the_event_loop_or_once_per_token(server, monkeypatch):
    """An echoed token-id prompt is decoded on a tokenizer thread; the logprobs' token texts (up to 21 per
    position) are built on the event loop from one decode per distinct token."""
    engine = engine_of(server)
    tokenizer, calls = engine.tokenizer, []
    real = tokenizer.decode
    monkeypatch.setattr(tokenizer, "decode", lambda ids, **kw: calls.append(
        (list(ids), threading.current_thread().name)) or real(ids, **kw))
    monkeypatch.setattr(engine, "_token_texts", {})  # no token's text known yet
    prompt = [5, 6, 7, 8] * 10
    status, reply = raw_post(server, "/v1/completions", body(prompt=prompt, max_tokens=2, echo=True), JSON)
    assert status == 200 and next(t for ids, t in calls if ids == prompt).startswith("sgjax-tokenizer")
    status, reply = raw_post(server, "/v1/completions", body(prompt=prompt, max_tokens=12, logprobs=5,
                                                             ignore_eos=True), JSON)
    assert status == 200 and len(reply["choices"][0]["logprobs"]["top_logprobs"]) == 12
    on_loop = [ids for ids, thread in calls if thread == server.thread.name]
    assert on_loop and all(len(ids) == 1 for ids in on_loop) and len(on_loop) == len({ids[0] for ids in on_loop})


# ---- 6. a body that never arrives times out ---------------------------------------------------------------

def test_body_that_never_arrives_gets_408(server):
    async def send_half():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + API_KEY.encode() + b"\r\nContent-Length: 100\r\n\r\n{\"text\":")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        payload = await asyncio.wait_for(reader.readexactly(length), 30)
        writer.close()
        return head, payload

    head, payload = asyncio.run(send_half())
    assert head.startswith(b"HTTP/1.1 408"), head
    assert_openai_error(408, json.loads(payload), 408, "did not arrive")


def test_connection_that_never_sends_a_request_is_closed(server):
    async def connect_and_wait():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers that never finish
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the server, nothing sent
        writer.close()
        return time.monotonic() - started

    assert asyncio.run(connect_and_wait()) < 10


def test_connections_over_the_cap_get_503_at_once_and_one_log_line(server, caplog):
    """Idle connections up to --max-connections are held; each one more is answered 503 and closed at once
    (not held until the keep-alive timeout, as idle ones are), the refusals are logged once, not once each, and
    once connections close requests are served again."""
    capped = LiveServer(engine_of(server), api_key=API_KEY, served_model_name=MODEL, max_connections=4,
                        keepalive_timeout_s=60, enable_metrics=True)
    open_now = capped.runner.server.open
    held = []
    try:
        held += [socket.create_connection(("127.0.0.1", capped.port), timeout=10) for _ in range(4)]
        wait_until(lambda: len(open_now) == 4, timeout=10)
        with caplog.at_level(logging.WARNING):
            for _ in range(20):
                with socket.create_connection(("127.0.0.1", capped.port), timeout=10) as extra:
                    reply = b"".join(iter(lambda: extra.recv(65536), b""))  # to the server's close
                head, _, payload = reply.partition(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, reply
                assert_openai_error(503, json.loads(payload), 503, "--max-connections")
        assert [r.getMessage()[:40] for r in caplog.records] == ["refused 1 connection(s): 4 are open, as "]
        for s in held:
            s.close()
        wait_until(lambda: not open_now, timeout=10)
        metrics = scrape(capped)  # on a connection of its own
        assert metrics["sgjax_refused_connections_total"] == 20 and metrics["sgjax_open_connections"] == 1
        client = openai.OpenAI(base_url=capped.url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        assert client.completions.create(model=MODEL, prompt=[5, 6, 7], max_tokens=2).usage.completion_tokens == 2
    finally:
        for s in held:
            s.close()
        capped.stop()


@pytest.mark.parametrize("soft,hard,fitted,raised_to", [(1024, 4096, 4096 - 256, 4096), (1024, 100_000, 8192, 8448),
                                                         (20_000, 20_000, 8192, None)])
def test_the_connection_cap_fits_the_open_files_limit(monkeypatch, caplog, soft, hard, fitted, raised_to):
    """The soft limit is raised as far as the cap needs (up to the hard one); a cap the hard limit cannot hold
    is lowered, with a warning, so that connections never run the process out of descriptors."""
    from sgjax.server import connections

    raised = []
    monkeypatch.setattr(connections.resource, "getrlimit", lambda which: (soft, hard))
    monkeypatch.setattr(connections.resource, "setrlimit", lambda which, limits: raised.append(limits[0]))
    with caplog.at_level(logging.WARNING):
        assert connections.fit_descriptor_limit(8192) == fitted
    assert raised == ([raised_to] if raised_to else [])
    assert bool(caplog.records) == (fitted < 8192)


# ---- 5. a huge prompt is refused before it is tokenized; a token limit that cannot fit is an error --------

@pytest.mark.parametrize("path,fields", [
    ("/v1/completions", dict(prompt="x " * 20_000)),
    (CHAT, dict(messages=[{"role": "user", "content": "x " * 20_000}])),
    ("/tokenize", dict(prompt=["hi", "x " * 20_000])),
])
def test_huge_prompt_is_refused_before_it_is_tokenized(server, monkeypatch, path, fields):
    tokenizer, encoded = engine_of(server).tokenizer, []
    real = tokenizer.encode
    monkeypatch.setattr(tokenizer, "encode", lambda text, **kw: encoded.append(len(text)) or real(text, **kw))
    data = json.dumps(fields).encode() if path == "/tokenize" else body(**fields)
    status, reply = raw_post(server, path, data, JSON)
    assert_openai_error(status, reply, 400, "characters; at most")
    assert not any(n >= 40_000 for n in encoded), encoded


def test_detokenize_refuses_more_ids_than_the_context_holds(server):
    context = engine_of(server).context_length
    status, reply = raw_post(server, "/detokenize", json.dumps({"tokens": [[5], [5] * (context + 1)]}).encode(), JSON)
    assert_openai_error(status, reply, 400, f"at most the context length ({context})")
    status, reply = raw_post(server, "/detokenize", json.dumps({"tokens": [5] * context}).encode(), JSON)
    assert status == 200 and isinstance(reply["text"], str)


def test_generate_refuses_max_new_tokens_beyond_the_context(server):
    context = engine_of(server).context_length
    status, reply = raw_post(server, "/generate", json.dumps({"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": context}}).encode(), JSON)
    assert_openai_error(status, reply, 400, "max_new_tokens is too large")
    status, reply = raw_post(server, "/generate", json.dumps({"input_ids": [5, 6], "sampling_params": {
        "max_new_tokens": context - 2, "ignore_eos": True}}).encode(), JSON)  # exactly fits
    assert status == 200 and reply["meta_info"]["completion_tokens"] == context - 2


# ---- 9. metrics ----------------------------------------------------------------------------------------

def test_metrics_count_errors_by_type_and_aborts_by_cause(server, monkeypatch):
    engine = engine_of(server)
    before = scrape(server)
    assert raw_post(server, "/v1/completions", body(prompt="hi", n=0), JSON)[0] == 400
    assert get(server.url + "/no/such/path")[0] == 404

    async def abort_a_stream():  # by its client, through /abort_request
        import aiohttp

        async with aiohttp.ClientSession(headers=AUTH) as session:
            async with session.post(server.url + "/generate", json={
                    "input_ids": [5, 6], "rid": "to-abort", "stream": True,
                    "sampling_params": {"max_new_tokens": 400, "ignore_eos": True}}) as r:
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        await (await session.post(server.url + "/abort_request", json={"rid": "to-abort"})).read()
                        break
    asyncio.run(abort_a_stream())
    wait_until(lambda: scrape(server).get('sgjax_aborted_requests_total{cause="client"}', 0) > before.get(
        'sgjax_aborted_requests_total{cause="client"}', 0), timeout=30)  # before the fault below is injected
    monkeypatch.setattr(engine.core.outputs, "append_token", lambda *a: 1 / 0)  # an engine-side failure
    assert raw_post(server, "/generate", json.dumps({"input_ids": [5, 6]}).encode(), JSON)[0] == 200
    monkeypatch.undo()

    def grew(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    def counted() -> bool:  # the finish hooks run on the server's loop, just after the engine is idle
        nonlocal after
        after = scrape(server)
        return idle(engine) and grew('sgjax_aborted_requests_total{cause="client"}') >= 1 and grew(
            'sgjax_aborted_requests_total{cause="engine_error"}') >= 1

    after = {}
    wait_until(counted, timeout=30)
    assert grew('sgjax_http_errors_total{status="400",type="invalid_request_error"}') == 1
    assert grew('sgjax_http_errors_total{status="404",type="invalid_request_error"}') == 1
    assert grew('sgjax_aborted_requests_total{cause="client"}') == 1
    assert grew('sgjax_aborted_requests_total{cause="engine_error"}') == 1


def test_metrics_count_cached_pages_apart_and_queue_time_and_preemptions(server):
    engine = engine_of(server)
    status, _ = raw_post(server, "/generate", json.dumps({"input_ids": list(range(10, 30)),
                                                          "sampling_params": {"max_new_tokens": 2}}).encode(), JSON)
    assert status == 200
    wait_until(lambda: idle(engine), timeout=30)
    metrics = {}
    for line in get(server.url + "/metrics")[1].splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    assert metrics['sgjax_kv_pages{state="cached"}'] >= 4  # the prompt's pages stay in the radix cache
    assert metrics["sgjax_kv_cache_usage"] == 0  # ... and count as available, not used, at idle
    assert metrics['sgjax_kv_pages{state="used"}'] == 0
    assert metrics["sgjax_queue_time_seconds_count"] >= 1


def test_metrics_count_preemptions(server):
    """Concurrent requests that together need more KV pages than the pool has are served by preempting some of
    them; /metrics counts each preemption."""
    import aiohttp

    engine = engine_of(server)
    before = engine.load_stats()["num_preemptions"]
    assert scrape(server).get("sgjax_preemptions_total", 0) == before
    slots, pages = ENGINE_OPTIONS["max_running_requests"], ENGINE_OPTIONS["num_pages"]
    prompt_len, new_tokens = 160, 60
    assert slots * (prompt_len + new_tokens) > pages * ENGINE_OPTIONS["page_size"]  # they outgrow the pool

    async def generate_all():
        async with aiohttp.ClientSession(headers=AUTH) as session:
            async def one(i):
                body = {"input_ids": [i + 10] + [(7 * i + j) % 400 + 10 for j in range(prompt_len - 1)],
                        "sampling_params": {"max_new_tokens": new_tokens, "ignore_eos": True}}
                async with session.post(server.url + "/generate", json=body) as r:
                    return (await r.json())["meta_info"]["completion_tokens"]
            return await asyncio.gather(*(one(i) for i in range(slots)))

    assert asyncio.run(generate_all()) == [new_tokens] * slots
    preempted = engine.load_stats()["num_preemptions"] - before
    assert preempted > 0 and scrape(server)["sgjax_preemptions_total"] - before == preempted


# ---- a schema-driven fuzz of every route ------------------------------------------------------------------

def test_fuzzing_every_route_from_its_openapi_schema_gets_no_server_error(server):
    """Bodies schemathesis derives from /openapi.json (valid and not) get no 5xx on any route; the server is
    healthy afterwards and every KV page is free or in the radix cache."""
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    from sgjax.server.protocol import POST_BODIES

    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {"/v1/completions", "/v1/chat/completions", "/generate", "/tokenize", "/abort_request"} <= {
        op.path for op in operations}
    errors, calls = [], []

    def few_tokens(case):  # what is fuzzed is what a body may hold, not how long a generation takes
        body = case.body if isinstance(case.body, dict) else {}
        for holder, name in ((body, "max_tokens"), (body.get("sampling_params"), "max_new_tokens")):
            if isinstance(holder, dict) and (holder.get(name) is None or isinstance(holder[name], int)):
                holder[name] = min(holder.get(name) or 1, 1)
        return case

    for operation in operations:  # bodies are what there is to fuzz: a route without one is called once
        @settings(max_examples=15 if operation.path in POST_BODIES else 1, deadline=None, database=None, derandomize=True, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy().map(few_tokens))
        def fuzz(case):
            response = case.call(base_url=server.url, headers=AUTH, timeout=60)
            calls.append((operation.path, response.status_code))
            if response.status_code >= 500:
                errors.append((case.method, case.path, case.body, response.status_code, response.text[:300]))

        fuzz()
    assert not errors, errors
    assert len(calls) >= 10 * len(POST_BODIES)
    engine = engine_of(server)
    wait_until(lambda: idle(engine) and pages_accounted(engine), timeout=30)
    assert get(server.url + "/health_generate")[0] == 200


# ---- a soak of concurrent streams with random disconnects and aborts ---------------------------------------

SOAK_PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3], list(range(20, 41)), [100, 200, 300, 400, 11]]
SOAK_PARAMS = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def test_soak_of_streams_with_disconnects_and_aborts_keeps_outputs_and_pages(server, caplog):
    """Concurrent /generate streams, some hung up on and some aborted after a few events (hypothesis chooses):
    every request ends, the finished ones are the quiet run's greedy outputs, afterwards every KV page is
    free or in the radix cache, and nothing was logged as an error (disconnects are routine)."""
    import aiohttp
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    engine = engine_of(server)
    quiet = [raw_post(server, "/generate", json.dumps({"input_ids": p, "sampling_params": SOAK_PARAMS}).encode(),
                      JSON)[1]["output_ids"] for p in SOAK_PROMPTS]
    finished = []
    engine.finish_hooks.append(finished.append)

    async def one_stream(session, k: int, prompt: int, action: str, after: int) -> tuple[str, list | None]:
        rid = f"soak-{k}-{time.monotonic_ns()}"
        body = {"input_ids": SOAK_PROMPTS[prompt], "sampling_params": SOAK_PARAMS, "stream": True, "rid": rid}
        async with session.post(server.url + "/generate", json=body, headers=AUTH) as r:
            assert r.status == 200
            events, last = 0, None
            async for line in r.content:
                if not line.startswith(b"data: {"):
                    continue
                last, events = json.loads(line[6:]), events + 1
                if events == after and action == "disconnect":
                    r.close()
                    return action, None
                if events == after and action == "abort":
                    async with session.post(server.url + "/abort_request", json={"rid": rid}, headers=AUTH) as a:
                        assert a.status == 200
            return action, last

    async def soak(streams):
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(one_stream(session, k, *s) for k, s in enumerate(streams)))

    @settings(max_examples=3, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.integers(0, len(SOAK_PROMPTS) - 1), st.sampled_from(["finish", "disconnect", "abort"]),
                              st.integers(1, 4)), min_size=4, max_size=10))
    def run(streams):
        finished.clear()
        results = asyncio.run(soak(streams))
        for (prompt, action, _), (_, last) in zip(streams, results):
            if action == "disconnect":
                continue
            reason = last["meta_info"]["finish_reason"]
            if action == "finish" or reason["type"] == "length":  # an abort may come after the last token
                assert reason["type"] == "length" and last["output_ids"] == quiet[prompt], (last, quiet[prompt])
            else:
                assert reason["type"] == "abort" and last["output_ids"] == quiet[prompt][:len(last["output_ids"])]
        wait_until(lambda: idle(engine) and len(finished) == len(streams) and pages_accounted(engine), timeout=30)

    try:
        with caplog.at_level(logging.WARNING):
            run()
    finally:
        engine.finish_hooks.remove(finished.append)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text[:2000]
