"""Stock clients against an sgjax server started with default flags, on a tiny model: SGLang's own frontend
language (PyPI `sglang`, `sgl.RuntimeEndpoint`), SGLang's native API field by field, and the official openai
client. Oracles: sgjax's own frontend on the same server (the same programs must give the same greedy text),
transformers (prompt logprobs), the tokenizer (stop positions, /tokenize), and what each parameter means."""

import asyncio
import json
import re
import threading

import aiohttp
import numpy as np
import openai
import pytest
import torch

import sgjax as sgjax_lang
from sgjax.engine import Engine
from sgjax.lang.backends.base import Backend
from sgjax.lang.primitives import Gen
from sgjax.server.keys import SERVER_ARGS
from sgjax.testing.sglang_frontend import import_sglang
from tests.e2e.test_server import LiveServer, get, post
from tests.lang_programs import agent_programs, programs

sgl = import_sglang()
from sglang.lang.chat_template import ChatTemplate, register_chat_template  # noqa: E402

MODEL = "tiny"
GREEDY = {"temperature": 0, "max_new_tokens": 8, "ignore_eos": True}
# The tiny model's chat template (tiny_models.CHAT_TEMPLATE) as SGLang's frontend describes one
register_chat_template(ChatTemplate(name="sgjax-tiny", default_system_prompt=None, role_prefix_and_suffix={
    "system": ("<|system|>", "<|end|>"), "user": ("<|user|>", "<|end|>"), "assistant": ("<|assistant|>", "<|end|>")}))


@pytest.fixture(scope="module")
def setup(tiny_models):
    path, hf_model = tiny_models("llama")
    # Default flags: prompt logprobs (select, echo) must work without enable_prompt_logprobs
    engine = Engine(path, dtype="float32", page_size=4, max_running_requests=8, chunked_prefill_size=64,
                    num_pages=600)
    assert not engine.args.enable_prompt_logprobs
    server = LiveServer(engine, served_model_name=MODEL)
    backends = {"sglang": sgl.RuntimeEndpoint(server.url, chat_template_name="sgjax-tiny"),
                "sgjax": sgjax_lang.RuntimeEndpoint(server.url)}
    yield engine, server, hf_model, backends
    server.stop()
    engine.shutdown()


def generate(server, body) -> tuple[int, dict]:
    return post(server.url + "/generate", body, key=None)


def greedy_ids(server, prompt: str, n: int = 12) -> list[int]:
    status, body = generate(server, {"text": prompt, "sampling_params": {**GREEDY, "max_new_tokens": n}})
    assert status == 200
    return body["output_ids"]


# ---- SGLang's frontend and sgjax's give the same text ----------------------------------------------------

SGLANG, SGJAX = programs(sgl), programs(sgjax_lang)


def test_gen_with_stop_regex_and_max_tokens_matches_sgjax_frontend(setup):
    _, _, _, backends = setup
    theirs = SGLANG[0].run(topic="radix trees", backend=backends["sglang"])
    ours = SGJAX[0].run(topic="radix trees", backend=backends["sgjax"])
    assert theirs.text() == ours.text()
    assert re.fullmatch(r"[0-9]{3}", theirs["c"]) and "e" not in theirs["b"] and "\n" not in theirs["b"]
    assert theirs.get_meta_info("a")["completion_tokens"] == 6


def test_select_against_a_default_server_matches_sgjax_frontend(setup):
    _, _, _, backends = setup
    theirs = SGLANG[1].run(backend=backends["sglang"])
    ours = SGJAX[1].run(backend=backends["sgjax"])
    assert theirs["thing"] == ours["thing"]
    # SGLang's client drops the token it re-scores for token healing; sgjax's scores the choice's tokens: the
    # same choice wins, the scores are of different spans.
    assert len(theirs.get_meta_info("thing")["normalized_prompt_logprobs"]) == 3


def test_fork_run_batch_and_chat_roles_match_sgjax_frontend(setup):
    _, _, _, backends = setup
    assert SGLANG[2].run(backend=backends["sglang"]).ret_value == SGJAX[2].run(backend=backends["sgjax"]).ret_value
    questions = [{"question": f"question {i}?"} for i in range(6)]
    theirs = SGLANG[3].run_batch(questions, backend=backends["sglang"], num_threads=3)
    ours = SGJAX[3].run_batch(questions, backend=backends["sgjax"], num_threads=3)
    assert [s.text() for s in theirs] == [s.text() for s in ours]
    assert theirs[0].text().startswith("<|user|>question 0?<|end|><|assistant|>")


AGENTS = {"sglang": agent_programs(sgl), "sgjax": agent_programs(sgjax_lang)}


@pytest.mark.parametrize("name", sorted(AGENTS["sgjax"]))
def test_few_shot_tool_use_react_and_multi_turn_match_sglang_frontend(setup, name):
    _, _, _, backends = setup
    runs = {}
    for lang in ("sglang", "sgjax"):
        program, kwargs = AGENTS[lang][name]
        state = program.run(**kwargs, backend=backends[lang])
        assert state.error() is None
        runs[lang] = (state.text(), state.ret_value)
    assert runs["sgjax"] == runs["sglang"]


def test_dtype_gens_and_run_sampling_defaults_match_sglang_frontend(setup):
    engine, _, _, backends = setup
    defaults = {"temperature": 0, "max_new_tokens": 5}
    theirs = SGLANG[4].run(name="Ann", backend=backends["sglang"], **defaults)
    ours = SGJAX[4].run(name="Ann", backend=backends["sgjax"], **defaults)
    assert ours.text() == theirs.text()
    assert re.fullmatch(r"[-+]?[0-9]+\s*", ours["age"]) and re.fullmatch(r"[-+]?[0-9]+\s*", ours["count"])
    assert re.fullmatch(r"[-+]?[0-9]*\.?[0-9]+\s*", ours["height"]) and ours["tall"] in ("True", "False")
    assert ours["city"].startswith('"') and isinstance(json.loads(ours["record"])["id"], int)
    assert ours.get_meta_info("height")["completion_tokens"] <= 5  # run()'s max_new_tokens
    # run_batch's defaults reach every gen: the engine's own greedy text is the oracle
    batch = [("Bo",), ("Cy",)]
    states = SGJAX[6].run_batch([{"topic": "bees"}, {"topic": "ants"}], backend=backends["sgjax"],
                                **defaults, num_threads=2, progress_bar=True)
    expected = engine.generate(["Tell me about bees:", "Tell me about ants:"], {**defaults})
    assert [s["story"] for s in states] == [e["text"] for e in expected]
    theirs = SGLANG[4].run_batch(batch, backend=backends["sglang"], **defaults)
    assert [s.text() for s in SGJAX[4].run_batch(batch, backend=backends["sgjax"], **defaults)] == \
        [s.text() for s in theirs]


def test_state_methods_scopes_greedy_select_and_join_match_sglang_frontend(setup):
    _, _, _, backends = setup
    theirs = SGLANG[5].run(question="Is it?", backend=backends["sglang"], temperature=0)
    ours = SGJAX[5].run(question="Is it?", backend=backends["sgjax"], temperature=0)
    assert ours.text() == theirs.text() and ours["pick"] == theirs["pick"]
    assert ours["turn"] == theirs["turn"] == f"<|user|>Is it?<|end|><|assistant|>{ours['answer']}<|end|>"
    assert ours["option"] == theirs["option"] and len(ours["option"]) == 2  # gathered from both branches
    assert ours.get_meta_info("pick")["greedy_logprob_matrix"] and ours.messages() == theirs.messages()


def test_streaming_with_meta_data_sync_and_async_matches_sglang_frontend(setup):
    engine, _, _, backends = setup

    async def read(state):
        return [piece async for piece in state.text_async_iter("story", return_meta_data=True)]

    runs = {}
    for lang, program in (("sglang", SGLANG[6]), ("sgjax", SGJAX[6])):
        state = program.run(topic="owls", backend=backends[lang], stream=True, temperature=0, max_new_tokens=6,
                            ignore_eos=True)
        runs[lang] = (state, asyncio.run(read(state)))
    for state, pieces in runs.values():  # SGLang's client merges the chunks that arrive while it waits
        assert "".join(text for text, _ in pieces) == state["story"]
    assert runs["sglang"][0]["story"] == runs["sgjax"][0]["story"]
    # SGLang's client adds up logprob lists it takes for increments; the sgjax server streams them whole
    counts = [len(meta["output_token_logprobs"]) for _, meta in runs["sgjax"][1]]  # each chunk's: the tokens so far
    assert len(counts) > 1 and counts == sorted(counts) and counts[0] >= 1 and counts[-1] <= 6
    ours = SGJAX[6].run(topic="owls", backend=backends["sgjax"], stream=True, temperature=0, max_new_tokens=6,
                        ignore_eos=True)
    synced = list(ours.text_iter("story", return_meta_data=True))
    assert [t for t, _ in synced] == [t for t, _ in runs["sgjax"][1]] and ours.error() is None
    final = ours.get_meta_info("story")["output_token_logprobs"]
    assert len(final) == 6 and all(text == engine.tokenizer.decode([tok]) for _, tok, text in final)


def test_streaming_with_logprobs_through_sglang_frontend(setup):
    engine, _, _, backends = setup

    @sgl.function
    def stream_me(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=10, temperature=0, ignore_eos=True,
                                          return_logprob=True, return_text_in_logprobs=True)

    state = stream_me.run(backend=backends["sglang"], stream=True)
    pieces = list(state.text_iter("story"))
    state.sync()
    meta = state.get_meta_info("story")
    assert "".join(pieces) == state["story"] and len(pieces) > 1
    ids = [t for _, t, _ in meta["output_token_logprobs"]]
    assert len(ids) == 10 and engine.tokenizer.decode(ids) == state["story"]
    assert all(lp <= 0 and text == engine.tokenizer.decode([t]) for lp, t, text in meta["output_token_logprobs"])
    assert meta["finish_reason"]["type"] == "length" and meta["e2e_latency"] > 0

    @sgl.function
    def with_prompt(s):
        s += "Once upon a time" + sgl.gen("story", max_tokens=4, temperature=0, ignore_eos=True,
                                          return_logprob=True, logprob_start_len=1, top_logprobs_num=2)

    async def read(state):
        return [piece async for piece in state.text_async_iter("story", return_meta_data=True)]

    state = with_prompt.run(backend=backends["sglang"], stream=True)
    pieces = asyncio.run(read(state))
    final = state.get_meta_info("story")  # the last event's: every list whole
    assert len(final["output_token_logprobs"]) == len(final["output_top_logprobs"]) == 4
    prompt = engine.tokenize("Once upon a time")
    assert [t for _, t, _ in final["input_token_logprobs"]] == prompt[1:]
    # the prompt's logprobs come with the first chunk, as from SGLang's server
    assert pieces[0][1]["input_token_logprobs"] == final["input_token_logprobs"]
    assert pieces[0][1]["input_top_logprobs"] == final["input_top_logprobs"]


# ---- defaults and errors as SGLang's frontend has them: both frontends on scripted backends ------------

class FailingBackend(Backend):
    """sgjax's frontend on a script: replies "x" to each gen, and fails on the gen whose prompt ends with
    `fail_after`."""

    def __init__(self, fail_after: str):
        self.fail_after, self.calls = fail_after, []
        self.role_markers = {"system": ("", ""), "user": ("", ""), "assistant": ("", "")}

    def generate(self, prompt, gen: Gen):
        self.calls.append(gen)
        if prompt.text.endswith(self.fail_after):
            raise RuntimeError("backend down")
        return "x", {}


def sglang_failing_backend(fail_after: str, wait_for_end: bool = True):
    """SGLang's frontend on the same script. Its programs run their expressions in a worker thread; the worker
    waits for the program to end (end_program) so every expression is queued before the failure, as in a real
    program whose gens are slower than its Python code (not for a program that waits on its own gen)."""
    from sglang.lang.backend.base_backend import BaseBackend

    class Failing(BaseBackend):
        def __init__(self):
            super().__init__()
            # reentrant: a garbage-collected program's __del__ calls end_program, and the collection can run
            # inside _ended (it deadlocked a run once, the collection triggered by making the Event)
            self.calls, self.ended, self.lock = [], {}, threading.RLock()

        def _ended(self, s):
            with self.lock:
                return self.ended.setdefault(id(s), threading.Event())

        def end_program(self, s):
            self._ended(s).set()

        def generate(self, s, sampling_params):
            self.calls.append(sampling_params)
            if wait_for_end:
                self._ended(s).wait(30)
            if s.text_.endswith(fail_after):
                raise RuntimeError("backend down")
            return "x", {}

    return Failing()


# SGLang warns of the failure from its worker thread, after run() returned: no pytest.warns can wait for it
@pytest.mark.filterwarnings("ignore:.*(program failed|Error in stream_executor):UserWarning")
def test_run_defaults_and_a_failed_gen_behave_as_in_sglangs_frontend():
    results = {}
    for name, lang in (("sglang", sgl), ("sgjax", sgjax_lang)):
        @lang.function
        def steps(s, k):
            s += "A:" + lang.gen("a", max_tokens=3)
            s += "B:" + lang.gen("b")
            s += "C:" + lang.gen("c", temperature=0)

        @lang.function
        def reads(s):
            s += "B:" + lang.gen("b")
            s += s["b"]  # the program's own code reads what the failure left unset

        backend = FailingBackend("B:") if name == "sgjax" else sglang_failing_backend("B:")
        state = steps.run(k=1, backend=backend)
        state.error()  # SGLang's state is done only once it is waited for
        first = backend.calls[0]
        results[name] = {
            "text": state.text(), "error": repr(state.error()), "calls": len(backend.calls),
            "params": [getattr(first, f) for f in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                                                   "presence_penalty", "ignore_eos", "n")]
                      + [list(first.stop or []), list(first.stop_token_ids or []), first.return_logprob],
            "max_tokens": [getattr(c, "max_new_tokens", None) or c.max_tokens for c in backend.calls]}
        batch = steps.run_batch([{"k": 1}, {"k": 2}], backend=backend, num_threads=2)
        results[name]["batch"] = [(s.text(), repr(s.error())) for s in batch]
        with pytest.raises(KeyError):
            reads.run(backend=FailingBackend("B:") if name == "sgjax" else sglang_failing_backend("B:", False))

        @lang.function
        def broken(s, k):
            s += "A:" + lang.gen("a", max_tokens=2)
            if k == 2:
                raise ValueError("bad argument")

        with pytest.raises(ValueError, match="bad argument"):
            broken.run_batch([{"k": 1}, {"k": 2}], backend=backend, num_threads=2)
    assert results["sgjax"] == results["sglang"]
    assert results["sgjax"]["text"] == "A:xB:" and results["sgjax"]["calls"] == 2  # C's gen never ran
    assert results["sgjax"]["params"][0] == 1.0  # SGLang samples by default


# ---- each sampling parameter means what it means in SGLang ------------------------------------------

def test_min_new_tokens_delays_eos_that_logit_bias_forces(setup):
    engine, server, _, _ = setup
    eos = engine.tokenizer.eos_token_id
    forced = {"temperature": 0, "max_new_tokens": 20, "logit_bias": {str(eos): 100}}
    _, body = generate(server, {"text": "Hello", "sampling_params": forced})
    assert body["output_ids"] == [eos] and body["meta_info"]["finish_reason"] == {"type": "stop", "matched": eos}
    _, body = generate(server, {"text": "Hello", "sampling_params": {**forced, "min_new_tokens": 5}})
    assert len(body["output_ids"]) == 6 and eos not in body["output_ids"][:5] and body["output_ids"][5] == eos
    # a stop token is held back the same way
    token = greedy_ids(server, "Hello", 1)[0]
    stop = {"temperature": 0, "max_new_tokens": 20, "logit_bias": {str(token): 100}, "stop_token_ids": [token]}
    _, body = generate(server, {"text": "Hello", "sampling_params": {**stop, "min_new_tokens": 3}})
    assert body["output_ids"][3:] == [token] and token not in body["output_ids"][:3]


def test_stop_regex_ends_where_the_text_first_matches(setup):
    engine, server, _, _ = setup
    ids = greedy_ids(server, "The quick brown")
    full = engine.tokenizer.decode(ids)
    pattern = re.escape(full[len(full) // 2:len(full) // 2 + 2])
    cut = next(k for k in range(1, len(ids) + 1) if re.search(pattern, engine.tokenizer.decode(ids[:k])))
    _, body = generate(server, {"text": "The quick brown", "sampling_params": {**GREEDY, "max_new_tokens": 12,
                                                                                "stop_regex": [pattern]}})
    assert body["output_ids"] == ids[:cut] and body["text"] == engine.tokenizer.decode(ids[:cut])
    assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": pattern}


def test_no_stop_trim_keeps_the_stop_string(setup):
    engine, server, _, _ = setup
    full = engine.tokenizer.decode(greedy_ids(server, "Hello, my name"))
    stop = full[3:5]
    at = full.index(stop)
    params = {**GREEDY, "max_new_tokens": 12, "stop": stop}
    _, trimmed = generate(server, {"text": "Hello, my name", "sampling_params": params})
    _, kept = generate(server, {"text": "Hello, my name", "sampling_params": {**params, "no_stop_trim": True}})
    assert trimmed["text"] == full[:at] and kept["text"] == full[:at + len(stop)]
    assert kept["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}


def test_sampling_seed_is_seed(setup):
    _, server, _, _ = setup
    sampled = {"temperature": 1.0, "max_new_tokens": 8, "ignore_eos": True}
    outs = [generate(server, {"text": "Hi", "sampling_params": {**sampled, **extra}})[1]["output_ids"]
            for extra in ({"sampling_seed": 7}, {"seed": 7}, {"sampling_seed": 8})]
    assert outs[0] == outs[1] != outs[2]


@pytest.mark.parametrize("params, needle", [
    ({"structural_tag": '{"structures": []}'}, "structural_tag"),
    ({"beam_width": 2}, "beam_width"),
    ({"custom_params": 3}, "custom_params"),
    ({"min_new_tokens": -1}, "min_new_tokens"),
    ({"stop_regex": "("}, "stop_regex"),
    ({"sampling_seed": 1, "seed": 2}, "sampling_seed"),
    ({"bogus": 1}, "unknown sampling parameters"),
])
def test_unsupported_or_bad_sampling_params_get_400_naming_them(setup, params, needle):
    _, server, _, _ = setup
    status, body = generate(server, {"text": "Hi", "sampling_params": params})
    assert status == 400 and needle in body["error"]["message"]


def test_null_params_take_sglang_defaults_and_custom_params_are_accepted(setup):
    _, server, _, _ = setup
    status, body = generate(server, {"text": "Hi", "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "top_k": None, "stop_regex": None, "structural_tag": None,
        "custom_params": {"note": 1}, "spaces_between_special_tokens": False, "stream_interval": 2}})
    assert status == 200 and body["meta_info"]["completion_tokens"] == 4


# ---- /generate's fields, meta_info, request ids -------------------------------------------------------

LOGPROB_BODY = {"text": "Hello", "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 2,
                "token_ids_logprob": [5, 77], "return_text_in_logprobs": True, "logprob_start_len": 0}
OUTPUT_LISTS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")
INPUT_LISTS = ("input_token_logprobs", "input_top_logprobs", "input_token_ids_logprobs")


def stream_events(server, body: dict) -> list[dict]:
    async def stream():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/generate", json={**body, "stream": True}) as r:
                return [json.loads(line[6:]) async for line in r.content if line.startswith(b"data: {")]

    return asyncio.run(stream())


def assert_logprob_lists_equal(got: list, want: list):
    """Nested lists of [logprob, id, text] (or None), equal but for the logprobs' float32 rounding."""
    def shape(x):
        return [shape(y) for y in x] if isinstance(x, list) else "lp" if isinstance(x, float) else x

    def floats(x):
        return [f for y in x for f in floats(y)] if isinstance(x, list) else [x] * isinstance(x, float)

    assert shape(got) == shape(want)
    assert floats(got) == pytest.approx(floats(want), abs=1e-5)


def test_meta_info_has_sglang_fields_streamed_and_not(setup):
    engine, server, _, _ = setup
    status, whole = generate(server, LOGPROB_BODY)
    meta = whole["meta_info"]
    assert status == 200 and {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens",
                              "e2e_latency", *INPUT_LISTS, *OUTPUT_LISTS} <= set(meta)
    assert [t for _, t, _ in meta["input_token_logprobs"]] == engine.tokenize("Hello")
    assert meta["input_token_logprobs"][0][0] is None  # the first prompt token has no logprob
    assert all(len(top) == 2 for top in meta["output_top_logprobs"])

    # As SGLang's server streams by default (what its client reads): text, ids and output logprob lists so far,
    # the prompt's logprobs from the first event on
    events = stream_events(server, LOGPROB_BODY)
    for event in events[:-1]:
        assert event["meta_info"]["finish_reason"] is None and "e2e_latency" not in event["meta_info"]
    for event in events:
        n = len(event["output_ids"])
        assert event["output_ids"] == whole["output_ids"][:n] and whole["text"].startswith(event["text"])
        for key in OUTPUT_LISTS:
            assert_logprob_lists_equal(event["meta_info"][key], meta[key][:n])
        for key in INPUT_LISTS:
            assert_logprob_lists_equal(event["meta_info"][key], meta[key])
    assert events[-1]["output_ids"] == whole["output_ids"] and events[-1]["text"] == whole["text"]


def test_incremental_streaming_output_sends_each_logprob_once(setup):
    """--incremental-streaming-output, as SGLang's: text, ids and the output-side logprob lists of each event
    are what is new; the prompt's logprobs come whole from the first event on."""
    _, server, _, _ = setup
    _, whole = generate(server, LOGPROB_BODY)
    args = server.app[SERVER_ARGS]
    args.incremental_streaming_output = True
    try:
        events = stream_events(server, LOGPROB_BODY)
    finally:
        args.incremental_streaming_output = False
    assert len(events) > 1 and "".join(e["text"] for e in events) == whole["text"]
    assert [t for e in events for t in e["output_ids"]] == whole["output_ids"]
    for event in events:
        assert all(len(event["meta_info"][key]) == len(event["output_ids"]) for key in OUTPUT_LISTS)
        for key in INPUT_LISTS:
            assert_logprob_lists_equal(event["meta_info"][key], whole["meta_info"][key])
    for key in OUTPUT_LISTS:
        assert_logprob_lists_equal([x for e in events for x in e["meta_info"][key]], whole["meta_info"][key])


def test_token_ids_logprob_are_transformers_log_softmax(setup):
    """SGLang's token_ids_logprob: the given ids' logprobs at each output position and, from
    logprob_start_len, each prompt position; for a batch too (the same ids for every prompt)."""
    engine, server, hf_model, _ = setup
    ids = [3, 250, 17]
    texts = ["The quick brown fox", "Hi"]
    status, results = generate(server, {"text": texts, "sampling_params": {**GREEDY, "max_new_tokens": 3},
                                        "return_logprob": True, "logprob_start_len": 2,
                                        "token_ids_logprob": [ids, ids]})
    assert status == 200
    for text, result in zip(texts, results):
        prompt, meta = engine.tokenize(text), result["meta_info"]
        with torch.no_grad():
            ref = torch.log_softmax(hf_model(torch.tensor([prompt + result["output_ids"]])).logits[0].double(), -1)
        want_out = [[[float(ref[len(prompt) - 1 + k, t]), t, None] for t in ids] for k in range(3)]
        assert_logprob_lists_equal(meta["output_token_ids_logprobs"], want_out)
        want_in = [[[float(ref[q - 1, t]), t, None] for t in ids] for q in range(2, len(prompt))]
        assert_logprob_lists_equal(meta["input_token_ids_logprobs"], want_in)


@pytest.mark.parametrize("field", ["image_data", "video_data", "audio_data"])
def test_multimodal_input_on_a_text_model_gets_400(setup, field):
    _, server, _, _ = setup
    status, body = generate(server, {"text": "What is in the picture?", field: "data:image/png;base64,AAAA"})
    assert status == 400 and "takes no" in body["error"]["message"] and body["error"]["param"] == field


@pytest.mark.parametrize("body, needle", [
    ({"text": "Hi", "return_logprob": True, "token_ids_logprob": [1, 10**9]}, "token_ids_logprob"),
    ({"text": ["a", "b"], "return_logprob": True, "token_ids_logprob": [[1], [2]]}, "token_ids_logprob"),
    ({"text": "Hi", "lora_path": "x"}, "LoRA"),
    ({"text": "Hi", "made_up": 1}, "unknown fields"),
    ({"text": ["a", "b"], "rid": ["same", "same"]}, "rid"),
    ({"text": "Hi", "return_logprob": [True, False]}, "return_logprob"),
])
def test_generate_fields_sgjax_cannot_honour_get_400(setup, body, needle):
    _, server, _, _ = setup
    status, reply = generate(server, body)
    assert status == 400 and needle in reply["error"]["message"]


def test_batch_with_a_rid_per_prompt(setup):
    _, server, _, _ = setup
    status, body = generate(server, {"text": ["a", "b"], "rid": ["first", "second"], "sampling_params": GREEDY})
    assert status == 200 and [b["meta_info"]["id"] for b in body] == ["first", "second"]


async def open_stream(session, server, rid, **extra):
    """A long streaming request, started: the response, once its first event is in."""
    r = await session.post(server.url + "/generate", json={
        "text": "Tell me everything", "rid": rid, "stream": True,
        "sampling_params": {"max_new_tokens": 300, "ignore_eos": True, **extra}})
    assert r.status == 200
    await r.content.readline()
    return r


async def last_events(r) -> list[dict]:
    """Each sample's last event of a stream."""
    last = {}
    async for line in r.content:
        if line.startswith(b"data: {"):
            event = json.loads(line[6:])
            last[event["index"]] = event
    return [last[i] for i in sorted(last)]


def test_running_rid_reused_gets_400_and_the_running_request_goes_on(setup):
    _, server, _, _ = setup

    async def scenario():
        async with aiohttp.ClientSession() as session:
            first = await open_stream(session, server, "dup")
            async with session.post(server.url + "/generate", json={"text": "x", "rid": "dup"}) as r:
                status, error = r.status, await r.json()
            line = await first.content.readline()
            while not line.startswith(b"data: {"):
                line = await first.content.readline()
            still_running = json.loads(line[6:])["meta_info"]["finish_reason"] is None
            await session.post(server.url + "/abort_request", json={"rid": "dup"})
            return status, error, still_running, await last_events(first)

    status, error, still_running, ends = asyncio.run(scenario())
    assert status == 400 and "already running" in error["error"]["message"]
    assert still_running and ends[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert generate(server, {"text": "x", "rid": "dup", "sampling_params": {"max_new_tokens": 1}})[0] == 200


def test_abort_by_rid_aborts_every_sample_and_abort_all_every_request(setup):
    _, server, _, _ = setup

    async def scenario():
        async with aiohttp.ClientSession() as session:
            many = await open_stream(session, server, "many", n=3, temperature=1.0)
            await session.post(server.url + "/abort_request", json={"rid": "many"})
            samples = await last_events(many)
            a, b = await open_stream(session, server, "a"), await open_stream(session, server, "b")
            await session.post(server.url + "/abort_request", json={"abort_all": True})
            return samples, await last_events(a) + await last_events(b)

    samples, others = asyncio.run(scenario())
    assert len(samples) == 3 and all(s["meta_info"]["finish_reason"]["type"] == "abort" for s in samples)
    assert all(e["meta_info"]["finish_reason"]["type"] == "abort" for e in others)
    assert all(e["meta_info"]["completion_tokens"] < 300 for e in samples + others)


# ---- native routes -------------------------------------------------------------------------------

def test_native_routes(setup):
    engine, server, _, _ = setup
    status, body = post(server.url + "/tokenize", {"prompt": "Hello world"}, key=None)
    assert status == 200 and body["tokens"] == engine.tokenizer.encode("Hello world")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == engine.context_length
    status, back = post(server.url + "/detokenize", {"tokens": body["tokens"]}, key=None)
    assert back["text"] == "Hello world"
    status, batch = post(server.url + "/v1/tokenize", {"prompt": ["a", "b"], "add_special_tokens": False}, key=None)
    assert batch["tokens"] == [engine.tokenizer.encode(t, add_special_tokens=False) for t in "ab"]
    for path in ("/get_server_info", "/server_info"):
        info = json.loads(get(server.url + path, key=None)[1])
        assert info["max_total_num_tokens"] == engine.num_usable_pages * engine.args.page_size
        assert info["version"] == "0.1.0"
    for path in ("/get_model_info", "/model_info"):
        info = json.loads(get(server.url + path, key=None)[1])
        assert info["model_path"] == engine.args.model_path and info["has_image_understanding"] is False
    assert get(server.url + "/flush_cache", key=None)[0] == 200
    assert get(server.url + "/health", key=None)[0] == 200 and get(server.url + "/health_generate", key=None)[0] == 200
    assert json.loads(get(server.url + "/v1/models", key=None)[1])["data"][0]["id"] == MODEL
    assert post(server.url + "/detokenize", {"tokens": [10**6]}, key=None)[0] == 400


# ---- the official openai client on a default server ------------------------------------------------

def test_openai_echo_logprobs_with_max_tokens_0_on_a_default_server(setup):
    engine, server, hf_model, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, echo=True, logprobs=1, max_tokens=0)
    ids = engine.tokenize(prompt)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1)
    got = r.choices[0].logprobs.token_logprobs
    assert r.choices[0].text == prompt and got[0] is None
    np.testing.assert_allclose(got[1:], [float(ref[q - 1, ids[q]]) for q in range(1, len(ids))], atol=1e-4)


def test_openai_chat_logprobs_and_n_with_seed(setup):
    _, server, _, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "Hi"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=5, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:  # greedy: the chosen token is the most likely one
        assert len(entry.top_logprobs) == 3 and entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
    runs = [client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, n=2, seed=11,
                                           temperature=1.0) for _ in range(2)]
    texts = [[c.message.content for c in run.choices] for run in runs]
    assert texts[0] == texts[1] and len(texts[0]) == 2


def test_openai_fields_each_supported_ignored_or_rejected_as_the_table_says(setup):
    """openai_fields' table, through the official client: an ignored field changes nothing in the answer, a
    rejected one that asks for something gets a 400 naming it, a field OpenAI does not have too."""
    from sgjax.server.openai_fields import CHAT, COMPLETIONS, IGNORED

    _, server, _, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0)
    plain = client.chat.completions.create(**chat).choices[0].message.content
    hints = dict(user="u1", metadata={"k": "v"}, store=False, service_tier="auto", parallel_tool_calls=False,
                 prompt_cache_key="p", reasoning_effort="low", modalities=["text"])
    assert {CHAT[name].status for name in hints if name != "modalities"} == {IGNORED}
    assert client.chat.completions.create(**chat, **hints).choices[0].message.content == plain
    text = dict(model=MODEL, prompt="Hi", max_tokens=3, temperature=0)
    assert COMPLETIONS["user"].status == IGNORED
    assert (client.completions.create(**text, user="u1", best_of=1).choices[0].text
            == client.completions.create(**text).choices[0].text)
    for create, base, extra in [
            (client.chat.completions.create, chat, dict(audio={"voice": "alloy", "format": "wav"})),
            (client.chat.completions.create, chat, dict(modalities=["text", "audio"])),
            (client.chat.completions.create, chat, dict(functions=[{"name": "f", "parameters": {}}])),
            (client.chat.completions.create, chat, dict(web_search_options={})),
            (client.completions.create, text, dict(suffix="!")),
            (client.completions.create, text, dict(best_of=3)),
            (client.completions.create, text, dict(extra_body={"made_up": 1})),
            (client.chat.completions.create, chat, dict(extra_body={"echo": True})),  # a completions-only field
            (client.chat.completions.create, chat, dict(extra_body={"continue_final_message": True})),
            (client.completions.create, text, dict(extra_body={"lora_path": "adapter"})),
    ]:
        with pytest.raises(openai.BadRequestError) as e:
            create(**base, **extra)
        name = next(iter(extra.get("extra_body", extra)))
        assert e.value.body["param"] == name and name in e.value.body["message"]


def test_sglang_and_vllm_openai_extensions_keep_their_meaning(setup):
    """The extras SGLang's and vLLM's OpenAI servers take: min_tokens delays an EOS that logit_bias forces
    (min_new_tokens), stop_regex ends the text after its match, chat_template_kwargs reach the template (a
    variable the tiny template does not read leaves the prompt as it was)."""
    engine, server, _, _ = setup
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    eos = engine.tokenizer.eos_token_id
    forced = dict(model=MODEL, prompt="Hi", max_tokens=8, temperature=0, logit_bias={str(eos): 100})
    assert client.completions.create(**forced).usage.completion_tokens == 1
    delayed = client.completions.create(**forced, extra_body={"min_tokens": 4})
    assert delayed.usage.completion_tokens == 5 and delayed.choices[0].finish_reason == "stop"
    free = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0,
                                      extra_body={"ignore_eos": True}).choices[0].text
    cut = client.completions.create(model=MODEL, prompt="Hi", max_tokens=8, temperature=0,
                                    extra_body={"ignore_eos": True, "stop_regex": re.escape(free[2:4])})
    assert cut.choices[0].text == free[:free.index(free[2:4]) + 2]  # up to the match's end, as on /generate
    chat = dict(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=1, temperature=0)
    tokenizer = engine.requests.tokenizer
    template = tokenizer.chat_template
    tokenizer.chat_template = "{% if shout %}HEY {% endif %}{{ messages[0]['content'] }}"
    try:
        plain = client.chat.completions.create(**chat).usage.prompt_tokens
        shouted = client.chat.completions.create(**chat, extra_body={"chat_template_kwargs": {"shout": True}})
    finally:
        tokenizer.chat_template = template
    assert shouted.usage.prompt_tokens == len(engine.tokenize("HEY Hi")) > plain == len(engine.tokenize("Hi"))
