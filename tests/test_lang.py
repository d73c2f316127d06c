"""The frontend language on the in-process Engine and over HTTP (RuntimeEndpoint, and the OpenAI
backend through the official client), with a tiny model. Oracles: transformers (greedy tokens,
select's logprobs), the tokenizer's own chat template, and a scripted backend for the interpreter."""

import json
import re

import numpy as np
import pytest
import torch

import sgjax as sgl
from sgjax.engine import Engine
from sgjax.lang.backends.base import Backend, choice_start
from sgjax.lang.primitives import Gen
from tests.e2e.test_server import LiveServer
from tests.hf_oracle import hf_greedy
from tests.lang_programs import agent_programs, programs


@pytest.fixture(scope="module")
def setup(tiny_models):
    path, hf_model = tiny_models("llama")
    engine = Engine(path, dtype="float32", page_size=4, max_running_requests=16, chunked_prefill_size=64,
                    num_pages=2000, enable_prompt_logprobs=True, attention_backend="reference")
    server = LiveServer(engine, served_model_name="tiny")
    backends = {"engine": sgl.EngineBackend(engine), "http": sgl.RuntimeEndpoint(server.url)}
    yield engine, server, hf_model, backends
    server.stop()
    engine.shutdown()


@pytest.fixture(params=["engine", "http"])
def backend(request, setup):
    return setup[3][request.param]


def hf_continuation(engine, hf_model, text: str, n: int) -> str:
    ids = engine.tokenize(text)
    return engine.tokenizer.decode(hf_greedy(hf_model, ids, n), skip_special_tokens=True)


@sgl.function
def qa(s, question, length=6):  # not `n`: run(n=...) is a sampling argument, as in SGLang
    s += "Q: " + question + "\nA:"
    s += sgl.gen("answer", max_tokens=length, ignore_eos=True)


def test_gen_matches_transformers(setup, backend):
    engine, _, hf_model, _ = setup
    state = qa.run(question="What is JAX?", temperature=0, backend=backend)
    assert state["answer"] == hf_continuation(engine, hf_model, "Q: What is JAX?\nA:", 6)
    assert state.text() == "Q: What is JAX?\nA:" + state["answer"]
    assert state.get_meta_info("answer")["completion_tokens"] == 6


def test_roles_render_the_models_chat_template(setup, backend):
    engine, _, hf_model, _ = setup

    @sgl.function
    def chat(s):
        s += sgl.system("You are terse.")
        s += sgl.user("Hello there")
        s += sgl.assistant(sgl.gen("reply", max_tokens=5, ignore_eos=True))

    state = chat.run(temperature=0, backend=backend)
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hello there"},
                {"role": "assistant", "content": state["reply"]}]
    assert state.messages() == messages
    assert state.text() == engine.tokenizer.apply_chat_template(messages, tokenize=False)
    prompt = engine.tokenizer.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    assert state["reply"] == hf_continuation(engine, hf_model, prompt, 5)


def hf_choice_scores(engine, hf_model, prefix: str, choices: list[str]) -> list[float]:
    """Mean logprob of each choice's tokens (after the tokens it shares with the prefix alone)."""
    prefix_ids = engine.tokenize(prefix)
    scores = []
    for c in choices:
        ids = engine.tokenize(prefix + c)
        start = next((i for i, (a, b) in enumerate(zip(prefix_ids, ids)) if a != b), min(len(prefix_ids), len(ids)))
        start = max(1, min(start, len(ids) - 1))
        with torch.no_grad():
            logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
        scores.append(float(np.mean([logprobs[q - 1, ids[q]] for q in range(start, len(ids))])))
    return scores


def test_select_picks_transformers_most_likely_choice(setup, backend):
    engine, _, hf_model, _ = setup
    choices = ["red", "green apple", "blue", "an orange cat", "7"]

    @sgl.function
    def pick(s):
        s += "My favourite thing is"
        s += " " + sgl.select("thing", choices)

    state = pick.run(backend=backend)
    expected = hf_choice_scores(engine, hf_model, "My favourite thing is ", choices)
    assert state["thing"] == choices[int(np.argmax(expected))]
    np.testing.assert_allclose(state.get_meta_info("thing")["normalized_prompt_logprobs"], expected, atol=1e-4)
    assert state.text() == "My favourite thing is " + state["thing"]


def test_fork_branches_share_the_prefix(setup, backend):
    engine, _, hf_model, _ = setup
    system = "You are a helpful assistant who answers in detail. " * 6

    @sgl.function
    def branches(s):
        s += system + "Topic:" + sgl.gen("topic", max_tokens=4, ignore_eos=True)
        forks = s.fork(3)
        for i, f in enumerate(forks):
            f += f"\nIdea {i}:"
        forks += sgl.gen("idea", max_tokens=4, ignore_eos=True)
        return forks

    state = branches.run(temperature=0, backend=backend)
    forks = state.ret_value
    prefix_tokens = len(engine.tokenize(system + "Topic:"))
    for i, f in enumerate(forks):
        assert f.text().startswith(state.text())
        text = state.text() + f"\nIdea {i}:"
        assert f["idea"] == hf_continuation(engine, hf_model, text, 4)
        assert f.get_meta_info("idea")["cached_tokens"] >= prefix_tokens - engine.args.page_size
        assert f.error() is None
    assert "idea" not in state  # the parent is untouched


def test_run_batch_of_64_programs(setup, backend):
    engine, _, _, _ = setup
    questions = [f"question number {i}?" for i in range(64)]
    states = qa.run_batch([{"question": q, "length": 4} for q in questions], temperature=0, backend=backend,
                          num_threads=16)
    expected = engine.generate([f"Q: {q}\nA:" for q in questions],
                               {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
    assert [s["answer"] for s in states] == [e["text"] for e in expected]


def test_streaming_text_iter(setup, backend):
    state = qa.run(question="Stream it", length=8, temperature=0, backend=backend, stream=True)
    pieces = list(state.text_iter())
    assert "".join(pieces) == state.sync().text() and len(pieces) > 2
    again = qa.run(question="Stream it", length=8, temperature=0, backend=backend, stream=True)
    assert "".join(again.text_iter("answer")) == state["answer"]


def test_regex_and_json_extraction(setup, backend):
    @sgl.function
    def extract(s, doc):
        s += sgl.user("Extract the record from: " + doc)
        s += sgl.assistant_begin()
        s += "Phone: " + sgl.gen("phone", max_tokens=16, regex=r"[0-9]{3}-[0-9]{4}", temperature=1.0, seed=1)
        s += "\nJSON: " + sgl.gen("record", max_tokens=80, temperature=1.0, seed=2, json_schema={
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                             "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"], "additionalProperties": False})
        s += sgl.assistant_end()

    state = extract.run(doc="Ann, 31, phone 555-1234", backend=backend)
    assert re.fullmatch(r"[0-9]{3}-[0-9]{4}", state["phone"])
    record = json.loads(state["record"])
    assert set(record) == {"name", "age"}
    assert state.messages()[-1]["content"] == f"Phone: {state['phone']}\nJSON: {state['record']}"


def test_multi_turn_follow_ups(setup, backend):
    engine, _, hf_model, _ = setup
    conversation, _ = agent_programs(sgl)["multi_turn"]  # a system prompt, then a 4-token answer per question
    state = conversation.run(questions=["Hi?", "And then?", "Why?"], temperature=0, backend=backend)
    assert [m["role"] for m in state.messages()] == ["system"] + ["user", "assistant"] * 3
    history = [{"role": "system", "content": "Answer briefly."}]
    for q, a in zip(["Hi?", "And then?", "Why?"], state.ret_value):
        history.append({"role": "user", "content": q})
        prompt = engine.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        assert a == hf_continuation(engine, hf_model, prompt, 4)  # each turn sees the earlier ones
        history.append({"role": "assistant", "content": a})


def test_plan_calls_python_functions_then_generates(setup, backend):
    engine, _, hf_model, _ = setup
    calls = []

    def lookup_population(city: str) -> int:
        calls.append(("population", city))
        return {"Paris": 2_100_000, "Lyon": 520_000}[city]

    def ratio(a: int, b: int) -> float:
        calls.append(("ratio", a, b))
        return round(a / b, 2)

    @sgl.function
    def plan(s, first, second):
        s += f"Plan: compare {first} and {second}.\n"
        a, b = lookup_population(first), lookup_population(second)
        s += f"Tool lookup: {first}={a}, {second}={b}\n"
        s += f"Tool ratio: {ratio(a, b)}\nSummary:" + sgl.gen("summary", max_tokens=5, ignore_eos=True)

    state = plan.run(first="Paris", second="Lyon", temperature=0, backend=backend)
    assert calls == [("population", "Paris"), ("population", "Lyon"), ("ratio", 2_100_000, 520_000)]
    prompt = "Plan: compare Paris and Lyon.\nTool lookup: Paris=2100000, Lyon=520000\nTool ratio: 4.04\nSummary:"
    assert state.text().startswith(prompt)
    assert state["summary"] == hf_continuation(engine, hf_model, prompt, 5)


def test_errors_are_named(setup, tmp_path):
    engine, _, _, backends = setup
    with pytest.raises(ValueError, match="no backend"):
        sgl.set_default_backend(None)
        qa.run(question="x")

    @sgl.function
    def unbalanced(s):
        s += sgl.user_begin() + "hi" + sgl.assistant_end()

    with pytest.warns(UserWarning, match="the program failed"):
        state = unbalanced.run(backend=backends["engine"])
    assert "assistant_end without a matching" in str(state.error())

    from PIL import Image as PILImage

    PILImage.new("RGB", (4, 4), "red").save(tmp_path / "red.png")

    @sgl.function
    def look(s):
        s += sgl.user(sgl.image(str(tmp_path / "red.png")) + "What colour?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=3))

    for name in ("engine", "http"):
        with pytest.warns(UserWarning):
            assert "text-only model" in str(look.run(backend=backends[name]).error())
    with pytest.raises(ValueError, match="not a readable image"):
        sgl.image(b"not an image")


def test_default_backend_and_set_default(setup):
    backend = setup[3]["engine"]
    sgl.set_default_backend(backend)
    try:
        assert qa.run(question="default?", temperature=0)["answer"] == \
            qa.run(question="default?", temperature=0, backend=backend)["answer"]
    finally:
        sgl.set_default_backend(None)


# ---- the OpenAI-compatible backend, against this server through the official client ---------

@pytest.fixture(scope="module")
def openai_backend(setup):
    return sgl.OpenAI("tiny", base_url=setup[1].url + "/v1", api_key="unused")


def test_openai_backend_chat_and_completion_match_native(setup, openai_backend):
    native = setup[3]["http"]

    @sgl.function
    def chat(s):
        s += sgl.user("Tell me something")
        s += sgl.assistant(sgl.gen("reply", max_tokens=5, ignore_eos=True))

    assert chat.run(temperature=0, backend=openai_backend)["reply"] == chat.run(temperature=0, backend=native)["reply"]
    assert qa.run(question="plain?", temperature=0, backend=openai_backend)["answer"] == \
        qa.run(question="plain?", temperature=0, backend=native)["answer"]


def test_openai_backend_select_and_regex(setup, openai_backend):
    choices = ["red", "green apple", "blue"]

    @sgl.function
    def pick(s):
        s += "My favourite thing is " + sgl.select("thing", choices)
        s += "\nCode: " + sgl.gen("code", max_tokens=10, regex=r"[A-Z]{2}[0-9]{2}", temperature=1.0)

    via_openai = pick.run(backend=openai_backend)
    via_native = pick.run(backend=setup[3]["http"])
    assert via_openai["thing"] == via_native["thing"]
    np.testing.assert_allclose(via_openai.get_meta_info("thing")["normalized_prompt_logprobs"],
                               via_native.get_meta_info("thing")["normalized_prompt_logprobs"], atol=1e-4)
    assert re.fullmatch(r"[A-Z]{2}[0-9]{2}", via_openai["code"])


def test_openai_backend_sends_images_as_data_urls(tmp_path):
    from PIL import Image as PILImage

    from sgjax.lang.state import Prompt

    PILImage.new("RGB", (2, 2), "blue").save(tmp_path / "b.png")
    im = sgl.image(str(tmp_path / "b.png"))
    prompt = Prompt("", [{"role": "user", "content": "What?", "images": [im]},
                         {"role": "assistant", "content": "", "images": []}], "assistant")
    (message,) = sgl.OpenAI._chat_messages(prompt)
    assert message["content"][0] == {"type": "text", "text": "What?"}
    assert message["content"][1]["image_url"]["url"].startswith("data:image/png;base64,")


class ScriptedBackend(Backend):
    """Answers each generate call with the next scripted text; records the calls."""
    supports_speculation = True

    def __init__(self, replies):
        self.replies, self.calls = list(replies), []
        self.role_markers = {"system": ("", ""), "user": ("", ""), "assistant": ("", "")}

    def generate(self, prompt, gen: Gen):
        self.calls.append((prompt.text, gen.max_tokens, gen.stop))
        return self.replies.pop(0), {}


def test_api_speculative_execution_reuses_one_call():
    @sgl.function(num_api_spec_tokens=64)
    def profile(s):
        s += "Name:" + sgl.gen("name", stop="\n")
        s += "\nAge:" + sgl.gen("age", stop="\n")
        s += "\nJob:" + sgl.gen("job", stop="\n")

    backend = ScriptedBackend([" Ann\nAge: 31\nJob: pilot\nHobby: chess"])
    state = profile.run(backend=backend)
    assert (state["name"], state["age"], state["job"]) == (" Ann", " 31", " pilot")
    assert len(backend.calls) == 1 and backend.calls[0] == ("Name:", 128, None)
    assert state.text() == "Name: Ann\nAge: 31\nJob: pilot"

    # The model wandered off the program's text: the next gen calls the API again.
    backend = ScriptedBackend([" Bob\nWeight: 80\n", " 40\nJob: cook\n"])
    state = profile.run(backend=backend)
    assert (state["name"], state["age"], state["job"]) == (" Bob", " 40", " cook")
    assert [c[0] for c in backend.calls] == ["Name:", "Name: Bob\nAge:"]


# ---- SGLang's frontend API: run defaults, dtype, choices methods, streaming meta, errors --------------

def test_run_sampling_defaults_and_dtype_in_process(setup, backend):
    engine, _, hf_model, _ = setup

    @sgl.function
    def answer_then_count(s):
        s += "Q: why?\nA:" + sgl.gen("a") + "\nN: " + sgl.gen_int("k")

    state = answer_then_count.run(temperature=0, backend=backend, max_new_tokens=4, ignore_eos=True)
    assert state["a"] == hf_continuation(engine, hf_model, "Q: why?\nA:", 4)  # run()'s defaults reached the gen
    assert re.fullmatch(r"[-+]?[0-9]+\s*", state["k"]) and state.get_meta_info("k")["completion_tokens"] <= 4


def hf_token_logprobs(hf_model, ids: list[int], start: int) -> list[float]:
    with torch.no_grad():
        logprobs = torch.log_softmax(hf_model(torch.tensor([ids])).logits[0].double(), -1).numpy()
    return [float(logprobs[q - 1, ids[q]]) for q in range(max(start, 1), len(ids))]


def test_choices_methods_match_transformers(setup, backend):
    engine, _, hf_model, _ = setup
    prefix, choices = "The colour is ", ["red", "green apple", "blue sky"]
    cond, uncond = [], []
    for c in choices:
        ids = engine.tokenize(prefix + c)
        start = choice_start(engine.tokenize(prefix), ids)
        cond.append(hf_token_logprobs(hf_model, ids, start))
        uncond.append([0.0] + hf_token_logprobs(hf_model, ids[start:], 1))

    for method in (sgl.greedy_token_selection, sgl.unconditional_likelihood_normalized):
        @sgl.function
        def pick(s):
            s += prefix + sgl.select("c", choices, choices_method=method)

        state = pick.run(backend=backend)
        assert state["c"] == choices[method.pick(cond, uncond)[0]]
        flat = [e[0] for tokens in state.get_meta_info("c")["input_token_logprobs"] for e in tokens]
        np.testing.assert_allclose(flat, [v for lp in cond for v in lp], atol=1e-4)


def test_greedy_token_selection_decides_at_the_first_differing_token():
    # means: 0 -> -1.5, 1 -> -1.0; greedy looks at token 0 first (-1 > -2), then compares the rest
    index, meta = sgl.greedy_token_selection.pick([[-1.0, -2.0], [-2.0, 0.0], [-1.0, -3.0]])
    assert index == 0 and meta["greedy_logprob_matrix"][0] == [-1.0, -2.0]
    assert sgl.token_length_normalized.pick([[-1.0, -2.0], [-2.0, 0.0]])[0] == 1
    assert sgl.greedy_token_selection.pick([[-1.0], [-1.0, -0.5]])[0] == 1  # the short one continues at its mean


def test_streaming_meta_data_async_in_process(setup):
    engine, _, hf_model, backends = setup

    @sgl.function
    def story(s):
        s += "Once" + sgl.gen("story", max_tokens=6, ignore_eos=True, return_logprob=True)

    async def read(state):
        return [piece async for piece in state.text_async_iter("story", return_meta_data=True)]

    import asyncio

    state = story.run(temperature=0, backend=backends["engine"], stream=True)
    pieces = asyncio.run(read(state))
    counts = [len(meta["output_token_logprobs"]) for _, meta in pieces]
    assert "".join(t for t, _ in pieces) == state["story"] and counts == sorted(counts) and counts[-1] <= 6
    ids = [tok for _, tok, _ in state.get_meta_info("story")["output_token_logprobs"]]
    assert ids == hf_greedy(hf_model, engine.tokenize("Once"), 6)


def test_unsupported_requests_get_named_errors(setup, openai_backend):
    @sgl.function
    def cut(s):
        s += "Hi" + sgl.gen("x", max_tokens=2, stop_regex="[0-9]")

    with pytest.warns(UserWarning):
        assert re.search("stop_regex.*not supported by OpenAI", str(cut.run(backend=openai_backend).error()))
    with pytest.raises(NotImplementedError, match="video"):
        sgl.video("clip.mp4", 4)

    @sgl.function
    def many(s, k):
        s += "Hi" + sgl.gen("x", max_tokens=2, n=k)

    with pytest.warns(UserWarning):
        states = many.run_batch([(1,), (2,)], backend=setup[3]["engine"])
    assert states[0].error() is None and "fork" in str(states[1].error())


# ---- the program set (tests/lang_programs.py) on every backend ------------------------------------------

BASE, AGENTS = programs(sgl), agent_programs(sgl)
# program -> (its arguments, what it produced that the backends must agree on)
PROGRAM_SET = {
    "gens": (BASE[0], {"topic": "radix trees"}, lambda s: [s["a"], s["b"], s["c"]]),
    "select": (BASE[1], {}, lambda s: [s["thing"]]),
    "fork": (BASE[2], {}, lambda s: s.ret_value),
    "chat": (BASE[3], {"question": "Why?"}, lambda s: [s["answer"]]),
    "dtype_and_json": (BASE[4], {"name": "Ann", "max_new_tokens": 5},
                       lambda s: [s[v] for v in ("age", "height", "tall", "count", "city", "record")]),
    "chat_greedy_select": (BASE[5], {"question": "Is it?"}, lambda s: [s["answer"], s["pick"], s["option"]]),
    "logprobs": (BASE[6], {"topic": "owls", "max_new_tokens": 4},
                 lambda s: [s["story"], len(s.get_meta_info("story")["output_token_logprobs"])]),
    **{name: (program, kwargs, lambda s: s.ret_value) for name, (program, kwargs) in AGENTS.items()},
}
# what the OpenAI API cannot express, and the error that says so
OPENAI_UNSUPPORTED = {"chat_greedy_select": "choices_method needs /completions", "logprobs": "return_logprob"}


@pytest.fixture(scope="module")
def program_set_in_process(setup):
    return {name: values(program.run(**kwargs, temperature=0, backend=setup[3]["engine"]))
            for name, (program, kwargs, values) in PROGRAM_SET.items()}


def test_program_set_in_process_matches_transformers(setup, program_set_in_process):
    engine, _, hf_model, _ = setup
    (answer,) = program_set_in_process["few_shot"]
    prompt = ("Answer with one word.\nQ: Colour of grass?\nA: green\nQ: Colour of snow?\nA: white\n"
              "Q: Colour of the sky?\nA:")
    assert answer == hf_continuation(engine, hf_model, prompt, 6).split("\n")[0]
    assert program_set_in_process["logprobs"][1] == 4


@pytest.mark.filterwarnings("ignore:.*program failed:UserWarning")
@pytest.mark.parametrize("name", ["http", "openai"])
def test_program_set_gives_the_same_values_on_every_backend(setup, openai_backend, program_set_in_process, name):
    backend = openai_backend if name == "openai" else setup[3]["http"]
    for program_name, (program, kwargs, values) in PROGRAM_SET.items():
        state = program.run(**kwargs, temperature=0, backend=backend)
        if name == "openai" and program_name in OPENAI_UNSUPPORTED:
            assert OPENAI_UNSUPPORTED[program_name] in str(state.error())
            continue
        assert state.error() is None, program_name
        assert values(state) == program_set_in_process[program_name], program_name


def test_openai_backend_streams_token_chunks_sync_and_async(setup, openai_backend):
    @sgl.function
    def chat(s):
        s += sgl.user("Tell me a story")
        s += sgl.assistant(sgl.gen("reply", max_tokens=8, ignore_eos=True))

    async def read(state, var):
        return [piece async for piece in state.text_async_iter(var, return_meta_data=True)]

    import asyncio

    for program, var, kwargs in ((qa, "answer", {"question": "Stream?", "length": 8}), (chat, "reply", {})):
        whole = program.run(**kwargs, temperature=0, backend=setup[3]["http"])[var]
        state = program.run(**kwargs, temperature=0, backend=openai_backend, stream=True)
        pieces = list(state.text_iter(var))
        assert len(pieces) > 1 and "".join(pieces) == whole  # token chunks, not the whole text at once
        state = program.run(**kwargs, temperature=0, backend=openai_backend, stream=True)
        chunks = asyncio.run(read(state, var))
        assert "".join(t for t, _ in chunks) == whole and len(chunks) > 1
        assert state.get_meta_info(var)["completion_tokens"] == 8


def test_separate_reasoning_splits_the_think_block(setup, backend):
    think = r"<think>[a-z]{2,6}( [a-z]{2,6})?</think>[a-z]{2,6}"

    @sgl.function
    def thinks(s, split, model_type=None):
        s += "Q: why?\nA:"
        gen = sgl.gen("answer", max_tokens=24, regex=think if model_type is None else think[len("<think>"):])
        s += sgl.separate_reasoning(gen, model_type=model_type) if split else gen
        s += "\nEnd."

    for model_type, pattern in ((None, r"<think>(.*)</think>(.*)"), ("deepseek-r1", r"(.*)</think>(.*)")):
        raw = thinks.run(split=False, model_type=model_type, temperature=0, backend=backend)
        reasoning, answer = re.fullmatch(pattern, raw["answer"]).groups()
        state = thinks.run(split=True, model_type=model_type, temperature=0, backend=backend)
        assert (state["answer_reasoning_content"], state["answer"]) == (reasoning, answer)
        assert state.text() == "Q: why?\nA:" + answer + "\nEnd."
    assert sgl.separate_reasoning(sgl.gen("x"), "qwen3")[1].split("no think block") == ("", "no think block")
    assert sgl.separate_reasoning(sgl.gen("x"), "deepseek-r1")[1].split("cut off") == ("cut off", "")
    with pytest.raises(ValueError, match="unknown model_type"):
        sgl.separate_reasoning(sgl.gen("x"), "nonesuch")
