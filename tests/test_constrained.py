"""Constrained decoding: outputs obey their regex / JSON schema / grammar / choices for many seeds and
temperatures with a tiny random model (whose free output never would), jump-forward changes the number
of steps but not the tokens, and constrained requests leave the others in the batch untouched."""

import asyncio
import json
import re

import jax.numpy as jnp
import jsonschema
import numpy as np
import pytest

from sgjax.constrained import Constraint
from sgjax.constrained.bitmask import allow_all, allowed_tokens, apply_bitmask, force_token
from tests.hf_oracle import hf_greedy
from tests.test_engine import check_pages_accounted, make_engine

PRODUCT = {  # the seed example: a product record
    "type": "object",
    "properties": {
        "brand": {"type": "string", "maxLength": 12},
        "model": {"type": "string", "maxLength": 12},
        "price": {"type": "integer", "minimum": 0, "maximum": 100000},
        "warranty": {"type": "boolean"},
    },
    "required": ["brand", "model", "price", "warranty"],
    "additionalProperties": False,
}
MEDICAL_REPORT = {  # the seed example: a report with an array
    "type": "object",
    "properties": {
        "patient_name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "diagnoses": {"type": "array", "items": {"type": "string", "enum": ["flu", "asthma", "diabetes", "none"]},
                      "minItems": 1, "maxItems": 3},
        "medications": {"type": "array", "maxItems": 2, "items": {
            "type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                             "dose_mg": {"type": "integer", "minimum": 1, "maximum": 999}},
            "required": ["name", "dose_mg"], "additionalProperties": False}},
    },
    "required": ["patient_name", "age", "diagnoses", "medications"],
    "additionalProperties": False,
}
LONG_KEYS = {  # long fixed keys: most of the output is forced text
    "type": "object",
    "properties": {f"the_{name}_of_the_customer_record": {"type": "integer", "minimum": 0, "maximum": 99}
                   for name in ("first_field", "second_field", "third_field")},
    "required": [f"the_{name}_of_the_customer_record" for name in ("first_field", "second_field", "third_field")],
    "additionalProperties": False,
}
SAMPLING_GRID = [{"temperature": t, "seed": seed} for t in (0.0, 0.7, 1.0, 1.5) for seed in range(4)]


@pytest.fixture(scope="module")
def path(tiny_models):
    return tiny_models("llama")[0]


@pytest.fixture(scope="module")
def engine(path):
    e = make_engine(path, max_running_requests=16)
    yield e
    e.shutdown()


def run_grid(engine, constraint: dict, max_new_tokens: int = 120) -> list[dict]:
    """Every prompt at every (temperature, seed) of the grid, all submitted together."""
    prompts = ["Give me the record:", "x", "Once upon a time there was a"]

    async def main():
        return await asyncio.gather(*[
            engine.async_generate(prompt, {**grid, "max_new_tokens": max_new_tokens, **constraint})
            for prompt in prompts for grid in SAMPLING_GRID])

    return asyncio.run(main())


def test_regex_outputs_always_match(engine):
    pattern = r"([0-9]{3})-([a-z]{2,5})\.(com|org|net)"  # (\\d would be any Unicode digit)
    outs = run_grid(engine, {"regex": pattern}, max_new_tokens=40)
    for out in outs:
        assert re.fullmatch(pattern, out["text"]), out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop"
    assert len({o["text"] for o in outs}) > 5  # sampling still varies within the constraint
    free = engine.generate("x", {"max_new_tokens": 20, "temperature": 1.0, "seed": 0})
    assert not re.fullmatch(pattern, free["text"])  # the model alone would not produce it
    check_pages_accounted(engine)


@pytest.mark.parametrize("schema", [PRODUCT, MEDICAL_REPORT], ids=["product", "medical_report"])
def test_json_schema_outputs_validate(engine, schema):
    outs = run_grid(engine, {"json_schema": json.dumps(schema)}, max_new_tokens=250)
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        jsonschema.validate(json.loads(out["text"]), schema)
    check_pages_accounted(engine)


def test_json_schema_as_object_and_any_json(engine):
    out = engine.generate("data:", {"json_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                                                    "required": ["ok"], "additionalProperties": False},
                                    "temperature": 0, "max_new_tokens": 30})
    assert json.loads(out["text"]) in ({"ok": True}, {"ok": False})


def test_ebnf_grammar_outputs_parse(engine):
    grammar = 'start: expr\nexpr: term (("+" | "-") term){0,3}\nterm: NUM | "(" expr ")"\nNUM: /[1-9][0-9]{0,2}/\n'
    outs = run_grid(engine, {"ebnf": grammar}, max_new_tokens=80)
    for out in outs:
        text = out["text"]
        assert out["meta_info"]["finish_reason"]["type"] == "stop", out
        assert re.fullmatch(r"[0-9+\-()]+", text), text
        assert isinstance(eval(text), int)  # balanced parentheses and operators between terms


def test_choices_output_one_of_them(engine):
    choices = ["red apple", "green pear", "blue berry"]
    outs = run_grid(engine, {"choices": choices}, max_new_tokens=10)
    assert all(out["text"] in choices for out in outs)


def test_jump_forward_same_tokens_in_fewer_steps(path):
    """The forced text is the same tokens whether it runs as one chunk or a decode step per token."""
    runs = {}
    for jump in (True, False):
        engine = make_engine(path, disable_jump_forward=not jump, max_running_requests=16)
        try:
            steps = engine.stats.num_steps
            params = [{"json_schema": json.dumps(schema), "temperature": t, "seed": 3, "max_new_tokens": 250}
                      for schema in (LONG_KEYS, PRODUCT, MEDICAL_REPORT) for t in (0.0, 0.0, 1.0)]
            outs = [engine.generate(f"prompt {i}", p) for i, p in enumerate(params)]
            runs[jump] = ([o["output_ids"] for o in outs], engine.stats.num_steps - steps)
            check_pages_accounted(engine)
        finally:
            engine.shutdown()
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] < 0.6 * runs[False][1], runs


def test_concurrent_constrained_and_free_requests(path, tiny_models, engine):
    """Many constrained requests in flight together (overlap scheduling, jump-forward mid-flight) beside
    free ones: the free ones still equal transformers' greedy output, the constrained ones validate."""
    hf_model = tiny_models("llama")[1]
    free_prompts = [[5 + i, 77, 300, 12 + i] for i in range(4)]
    expected = [hf_greedy(hf_model, p, 16) for p in free_prompts]

    async def main():
        jobs = [engine.async_generate(input_ids=p, sampling_params={"temperature": 0, "max_new_tokens": 16,
                                                                    "ignore_eos": True}) for p in free_prompts]
        jobs += [engine.async_generate(f"item {i}", {"json_schema": PRODUCT, "temperature": 1.0, "seed": i,
                                                     "max_new_tokens": 250}) for i in range(12)]
        return await asyncio.gather(*jobs)

    outs = asyncio.run(main())
    assert [o["output_ids"] for o in outs[:4]] == expected
    for out in outs[4:]:
        jsonschema.validate(json.loads(out["text"]), PRODUCT)
    check_pages_accounted(engine)


def test_constrained_without_overlap_schedule(path):
    engine = make_engine(path, disable_overlap_schedule=True, mesh="1x2")  # also sharded over two devices
    try:
        outs = [engine.generate("q", {"json_schema": PRODUCT, "temperature": 1.0, "seed": s, "max_new_tokens": 250})
                for s in range(4)]
        for out in outs:
            jsonschema.validate(json.loads(out["text"]), PRODUCT)
        # Biases without a grammar (the masked sampling variant with its allow-all mask kept on the
        # devices), then a grammar without biases (its zero biases kept there): +100 forces the token.
        forced = engine.generate("q", {"logit_bias": {"7": 100}, "temperature": 1.0, "max_new_tokens": 3})
        assert forced["output_ids"] == [7, 7, 7]
        jsonschema.validate(json.loads(engine.generate("q", {"json_schema": PRODUCT, "max_new_tokens": 250})["text"]),
                            PRODUCT)
    finally:
        engine.shutdown()


def test_n_samples_and_max_tokens_with_constraint(engine):
    outs = engine.generate("x", {"regex": r"[ab]{30}", "n": 3, "temperature": 1.0, "seed": 1, "max_new_tokens": 5})
    for out in outs:
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert re.fullmatch(r"[ab]*", out["text"]) and len(out["output_ids"]) == 5
    check_pages_accounted(engine)


@pytest.mark.parametrize("params, message", [
    ({"regex": "[abc"}, "invalid regex"),
    ({"json_schema": "{not json"}, "json_schema is not valid JSON"),
    ({"json_schema": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "invalid json_schema"),
    ({"ebnf": "start: foo"}, "invalid ebnf"),
    ({"choices": []}, "choices must be a non-empty list"),
    ({"regex": "a", "json_schema": {"type": "string"}}, "at most one of"),
    ({"regex": 5}, "regex must be a non-empty string"),
])
def test_bad_constraints_are_named(engine, params, message):
    with pytest.raises(ValueError, match=message):
        engine.generate("x", {"max_new_tokens": 4, **params})


def test_constraint_compiled_once(engine):
    constraint = Constraint.from_params(regex=r"[xyz]{3}")
    first = engine.grammar.matcher(constraint)
    assert constraint in engine.grammar._compiled
    second = engine.grammar.matcher(constraint)
    assert first is not second  # each request gets its own copy of the compiled template


def test_bitmask_matches_naive_unpacking():
    rng = np.random.default_rng(0)
    vocab = 77
    bitmask = rng.integers(-2**31, 2**31, size=(3, 3), dtype=np.int64).astype(np.int32)
    force_token(bitmask, 2, 70)
    naive = np.array([[(int(bitmask[r, v // 32]) >> (v % 32)) & 1 for v in range(vocab)] for r in range(3)], bool)
    assert (np.asarray(allowed_tokens(jnp.asarray(bitmask), vocab)) == naive).all()
    assert naive[2].sum() == 1 and naive[2, 70]
    logits = jnp.asarray(rng.normal(size=(3, vocab)), jnp.float32)
    masked = np.asarray(apply_bitmask(logits, jnp.asarray(bitmask)))
    assert (np.isneginf(masked) == ~naive).all()
    assert allow_all(2, vocab).shape == (2, 3) and (allow_all(2, vocab) == -1).all()
