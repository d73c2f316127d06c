"""Tool calls in generated text, per model family's format, turned into OpenAI `tool_calls`.

- hermes (Qwen2/2.5/3, and the fallback): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number.
- llama3_json (Llama 3.1+): the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), or several separated by `;`.
- mistral: `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`.
Text that does not parse as the format's JSON stays plain content.

`tool_call_grammar` is the other direction: a grammar (Lark with llguidance's %json) that only lets the
model write a call in its format, for tool_choice "required" or a named function.
"""

from __future__ import annotations

import json
import re
import uuid

HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


def format_for(architecture: str) -> str:
    if architecture.startswith("Llama"):
        return "llama3_json"
    if architecture.startswith("Mistral"):
        return "mistral"
    return "hermes"


def _call(obj) -> dict | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": obj["name"], "arguments": args if isinstance(args, str) else json.dumps(args)}}


def _json(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return None


def parse_tool_calls(text: str, fmt: str) -> tuple[str | None, list[dict]]:
    """(remaining content or None, tool calls) of a finished reply."""
    if fmt == "hermes":
        calls = [_call(_json(m)) for m in HERMES_CALL.findall(text)]
        if not calls or None in calls:
            return text, []
        content = HERMES_CALL.sub("", text).strip()
        return content or None, calls
    if fmt == "llama3_json":
        body = text.strip().removeprefix("<|python_tag|>").strip()
        calls = [_call(_json(part)) for part in body.split(";") if part.strip()] if body.startswith("{") else []
        return (None, calls) if calls and None not in calls else (text, [])
    if fmt == "mistral":
        head, sep, tail = text.partition("[TOOL_CALLS]")
        items = _json(tail.strip()) if sep else None
        calls = [_call(item) for item in items] if isinstance(items, list) and items else []
        return (head.strip() or None, calls) if calls and None not in calls else (text, [])
    raise ValueError(f"unknown tool-call format {fmt!r}")


def tool_call_grammar(tools: list[dict], fmt: str, name: str | None = None) -> str:
    """A grammar for exactly one call of `name` (or of any of the tools) in the format's syntax."""
    chosen = [t["function"] for t in tools if name is None or t["function"]["name"] == name]
    if not chosen:
        raise ValueError(f"tool_choice names function {name!r}, which is not among the tools")
    args_key = "parameters" if fmt == "llama3_json" else "arguments"
    calls = [{"type": "object", "properties": {
        "name": {"const": f["name"]},
        args_key: f.get("parameters") or {"type": "object"}}, "required": ["name", args_key],
        "additionalProperties": False} for f in chosen]
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    # Compact JSON, as for json_schema constraints: free whitespace lets a weak model ramble.
    schema = json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})
    if fmt == "hermes":
        return f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: %json {schema}\n'
    if fmt == "llama3_json":
        return f"start: call\ncall: %json {schema}\n"
    if fmt == "mistral":
        return f'start: "[TOOL_CALLS] [" call "]"\ncall: %json {schema}\n'
    raise ValueError(f"unknown tool-call format {fmt!r}")
