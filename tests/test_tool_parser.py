"""Tool-call parsing of each family's format against hand-written expectations."""

import json

import pytest

from sgjax.server.tool_parser import format_for, parse_tool_calls


def calls(parsed):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]]


def test_hermes_calls_and_surrounding_text():
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"tz": "CET"}}</tool_call>')
    parsed = parse_tool_calls(text, "hermes")
    assert parsed[0] == "Let me check."
    assert calls(parsed) == [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "CET"})]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed[1])


def test_llama3_json_calls():
    parsed = parse_tool_calls('<|python_tag|>{"name": "search", "parameters": {"q": "jax"}}', "llama3_json")
    assert parsed[0] is None and calls(parsed) == [("search", {"q": "jax"})]
    two = parse_tool_calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"x": 1}}', "llama3_json")
    assert calls(two) == [("a", {}), ("b", {"x": 1})]


def test_mistral_calls():
    parsed = parse_tool_calls('[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1, "b": 2}}]', "mistral")
    assert parsed[0] is None and calls(parsed) == [("add", {"a": 1, "b": 2})]


@pytest.mark.parametrize("text,fmt", [
    ("The weather is nice.", "hermes"),
    ("<tool_call>{not json}</tool_call>", "hermes"),
    ('{"city": "Paris"}', "llama3_json"),  # JSON, but not a call
    ("[TOOL_CALLS] nope", "mistral"),
])
def test_plain_or_malformed_text_stays_content(text, fmt):
    assert parse_tool_calls(text, fmt) == (text, [])


def test_format_by_architecture():
    assert format_for("LlamaForCausalLM") == "llama3_json"
    assert format_for("MistralForCausalLM") == "mistral"
    assert format_for("Qwen2ForCausalLM") == format_for("Qwen3ForCausalLM") == "hermes"
