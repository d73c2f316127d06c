"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (streaming and not)."""

from __future__ import annotations

import time

from aiohttp import web

from sgjax.server.errors import ApiError, require
from sgjax.server.keys import ENGINE_REQUESTS, OFFLOAD, REQUEST_ID, SERVER_ARGS, SERVING, STARTED
from sgjax.server.limits import check_limits, check_max_tokens
from sgjax.server.openai_fields import CHAT, COMPLETIONS, SAMPLING_EXTENSIONS, check_fields
from sgjax.server.protocol import ChatCompletionRequest, CompletionRequest, parse_dict
from sgjax.server.streaming import end_event_stream, open_event_stream, run, run_to_end, send_event
from sgjax.server.tool_parser import format_for, parse_tool_calls, tool_call_grammar

FINISH_REASONS = {"stop": "stop", "length": "length"}


def model_name(request: web.Request) -> str:
    return request.app[SERVER_ARGS].served_model_name


async def list_models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [
        {"id": model_name(request), "object": "model", "created": request.app[STARTED], "owned_by": "sgjax"}]})


def check_model(request: web.Request, body: dict) -> None:
    name = body["model"]
    if name != model_name(request):
        raise ApiError(f"model {name!r} does not exist; this server serves {model_name(request)!r}", param="model")


def common_sampling(body: dict, max_tokens_default: int | None) -> dict:
    """The OpenAI fields every endpoint shares, in SamplingParams' terms (validated there)."""
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens", max_tokens_default))
    params = {
        "max_new_tokens": max_tokens,
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "n": body.get("n", 1),
        "stop": body.get("stop"),
        "seed": body.get("seed"),
        "frequency_penalty": body.get("frequency_penalty", 0.0),
        "presence_penalty": body.get("presence_penalty", 0.0),
        "logit_bias": body.get("logit_bias"),  # {"token id": bias}; SamplingParams checks and converts it
    }
    # SGLang's and vLLM's extensions to the OpenAI body, in SGLang's sampling parameters' meaning
    for name in SAMPLING_EXTENSIONS:
        if name in body:
            params["min_new_tokens" if name == "min_tokens" else name] = body[name]
    params.update(response_format_constraint(body.get("response_format")))
    if params["max_new_tokens"] is None:
        del params["max_new_tokens"]
    return {k: v for k, v in params.items() if v is not None or k == "stop"}


def response_format_constraint(fmt) -> dict:
    """OpenAI's response_format as a SamplingParams constraint."""
    kind = (fmt or {}).get("type", "text")
    if kind == "json_object":
        return {"json_schema": {"type": "object"}}
    if kind == "json_schema":
        return {"json_schema": fmt["json_schema"].get("schema", {"type": "object"})}
    return {}


def usage(requests, n: int) -> dict:
    prompt = sum(len(r.prompt_ids) for r in requests[::n])  # each prompt counted once, not once per sample
    completion = sum(len(r.output_ids) for r in requests)
    cached = sum(r.cached_tokens for r in requests[::n])
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def finish_reason(req) -> str:
    reason = (req.finish_reason or {}).get("type")
    if reason == "abort":
        raise ApiError(f"request aborted: {req.finish_reason.get('message', 'aborted')}", status=500,
                       type_="server_error")
    return FINISH_REASONS[reason]


async def make_requests(request: web.Request, prompt, params: dict, input_ids=None, max_tokens_given: bool = False,
                        image_data: list | None = None):
    """Tokenize and validate (images decoded and preprocessed too), on a tokenizer thread."""
    engine = request.app[SERVING].engine
    check_limits(request.app[SERVER_ARGS], len(prompt if prompt is not None else input_ids), params)
    try:
        requests = await request.app[OFFLOAD].run(engine.make_requests, prompt, params, input_ids,
                                                  rid=request[REQUEST_ID], image_data=image_data)
    except ValueError as e:
        raise ApiError(str(e)) from None
    request[ENGINE_REQUESTS] = requests  # from here on, the middleware aborts what does not finish
    if max_tokens_given:  # as OpenAI: a max_tokens that cannot fit is an error, not silently cut short
        check_max_tokens(requests, params["max_new_tokens"], engine.context_length, "max_tokens")
    return requests


def stream_options(body: dict) -> bool:
    """Whether a stream ends with a usage event (stream_options.include_usage)."""
    return (body.get("stream_options") or {}).get("include_usage", False)


def max_tokens_given(body: dict) -> bool:
    return body.get("max_completion_tokens", body.get("max_tokens")) is not None


# ---- /v1/completions -----------------------------------------------------------------------

def completion_prompts(body: dict) -> tuple[list | None, list | None]:
    """(texts, token id lists): exactly one is set."""
    prompt = body["prompt"]  # its shape checked by CompletionRequest
    if isinstance(prompt, str):
        return [prompt], None
    if isinstance(prompt[0], str):
        return prompt, None
    if isinstance(prompt[0], int):
        return None, [prompt]
    return None, prompt


def completion_logprobs(engine, req, echo: bool) -> dict:
    """The legacy completions logprobs object: tokens, token_logprobs, top_logprobs, text_offset."""
    meta = engine.result(req)["meta_info"]
    decode = engine.token_text
    pairs = list(meta.get("input_token_logprobs", [])) if echo else []
    tops = list(meta.get("input_top_logprobs", [])) if echo else []
    pairs += meta.get("output_token_logprobs", [])
    tops += meta.get("output_top_logprobs", [None] * len(meta.get("output_token_logprobs", [])))
    tokens = [decode(t) for _, t in pairs]
    offsets, at = [], 0
    for text in tokens:
        offsets.append(at)
        at += len(text)
    return {"tokens": tokens, "token_logprobs": [lp for lp, _ in pairs],
            "top_logprobs": [{decode(t): lp for lp, t in top} if top else None for top in tops],
            "text_offset": offsets}


async def completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[SERVING].engine
    body = await parse_dict(request, CompletionRequest)
    check_fields(body, COMPLETIONS, "/v1/completions")
    check_model(request, body)
    texts, id_lists = completion_prompts(body)
    params = common_sampling(body, 16)
    logprobs = body.get("logprobs")
    echo = bool(body.get("echo"))
    if logprobs is not None:
        params.update(logprobs=True, top_logprobs_num=logprobs)
        if echo:
            params["logprob_start_len"] = 0
    include_usage = stream_options(body)
    requests = await make_requests(request, texts, params, id_lists, max_tokens_given(body))
    n = params.get("n", 1)
    prompt_texts = texts
    if echo and texts is None:  # token id prompts echoed as text, decoded on the tokenizer thread
        prompt_texts = await request.app[OFFLOAD].run(
            lambda: [engine.tokenizer.decode(ids) if engine.tokenizer else "" for ids in id_lists])
    head = {"id": f"cmpl-{request[REQUEST_ID]}", "object": "text_completion", "created": int(time.time()),
            "model": model_name(request)}

    if body.get("stream"):
        response = await open_event_stream(request)
        sent_echo = set()
        async for i, delta, req, finished in run(request, requests):
            if echo and i not in sent_echo:
                sent_echo.add(i)
                delta = prompt_texts[i // n] + delta
            choice = {"index": i, "text": delta, "logprobs": None, "finish_reason": None}
            if finished:
                choice["finish_reason"] = finish_reason(req)
                if logprobs is not None:
                    choice["logprobs"] = completion_logprobs(engine, req, echo)
            if delta or finished:
                await send_event(response, {**head, "choices": [choice]})
        final = {**head, "choices": [], "usage": usage(requests, n)}
        await end_event_stream(response, final if include_usage else None)
        return response

    await run_to_end(request, requests)
    choices = []
    for i, req in enumerate(requests):
        choices.append({"index": i, "text": (prompt_texts[i // n] if echo else "") + req.text,
                        "logprobs": completion_logprobs(engine, req, echo) if logprobs is not None else None,
                        "finish_reason": finish_reason(req)})
    return web.json_response({**head, "choices": choices, "usage": usage(requests, n)})


# ---- /v1/chat/completions ------------------------------------------------------------------

def chat_messages(body: dict, image_placeholder: str | None, model_name: str) -> tuple[list[dict], list[str]]:
    """The messages with their content parts joined into text, each image part replaced by the model's
    placeholder text (the tokens the chat template writes for an image), and the images' URLs in order."""
    out, images = [], []
    for m in body["messages"]:  # their roles and content parts checked by ChatCompletionRequest
        content = m.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if part["type"] == "image_url":
                    require(image_placeholder is not None,
                            f"messages: this model ({model_name}) takes no images; it is a text-only model", "messages")
                    texts.append(image_placeholder)
                    images.append(part["image_url"]["url"])
                else:
                    texts.append(part.get("text", ""))
            content = "".join(texts)
        # tool_calls of assistant turns and tool_call_id of tool results pass through to the template
        out.append({**m, "content": content or ""})
    return out, images


def chat_tools(body: dict, fmt: str) -> tuple[list[dict] | None, str | None]:
    """The tools to show the model, and for tool_choice "required" or a named function the grammar
    its reply must follow."""
    tools = body.get("tools")
    choice = body.get("tool_choice") or "auto"
    if not tools:
        require(choice in ("none", "auto"), "tool_choice other than none or auto needs tools", "tool_choice")
        return None, None
    if choice == "none":
        return None, None
    if choice == "auto":
        return tools, None
    if choice == "required":
        return tools, tool_call_grammar(tools, fmt)
    try:
        return tools, tool_call_grammar(tools, fmt, choice["function"]["name"])
    except ValueError as e:
        raise ApiError(str(e), param="tool_choice") from None


def chat_message(req, tool_format: str | None) -> tuple[dict, str]:
    """The assistant message of a finished request, and its finish reason."""
    if tool_format:
        content, calls = parse_tool_calls(req.text, tool_format)
        if calls:
            return {"role": "assistant", "content": content, "tool_calls": calls}, "tool_calls"
    return {"role": "assistant", "content": req.text}, finish_reason(req)


def chat_logprobs(engine, req) -> dict:
    meta = engine.result(req)["meta_info"]
    decode = engine.token_text
    entry = lambda lp, t: {"token": decode(t), "logprob": lp, "bytes": list(decode(t).encode())}  # noqa: E731
    tops = meta.get("output_top_logprobs") or [[] for _ in meta["output_token_logprobs"]]
    return {"content": [{**entry(lp, t), "top_logprobs": [entry(a, b) for a, b in top]}
                        for (lp, t), top in zip(meta["output_token_logprobs"], tops)]}


async def chat_completions(request: web.Request) -> web.StreamResponse:
    engine = request.app[SERVING].engine
    body = await parse_dict(request, ChatCompletionRequest)
    check_fields(body, CHAT, "/v1/chat/completions")
    check_model(request, body)
    messages, images = chat_messages(body, engine.image_placeholder, model_name(request))
    params = common_sampling(body, None)
    want_logprobs = bool(body.get("logprobs"))
    top = body.get("top_logprobs")
    require(top is None or want_logprobs, "top_logprobs needs logprobs=true", "top_logprobs")
    if want_logprobs:
        params.update(logprobs=True, top_logprobs_num=top or 0)
    if engine.tokenizer is None:
        raise ApiError("this server has no tokenizer, so it cannot apply a chat template")
    tool_format = format_for(engine.config.architecture)
    tools, call_grammar = chat_tools(body, tool_format)
    if call_grammar is not None:
        require(not any(k in params for k in ("json_schema", "regex", "ebnf")),
                "tool_choice required or named cannot be combined with response_format, regex or ebnf",
                "tool_choice")
        params["ebnf"] = call_grammar
    tool_format = tool_format if tools else None
    try:
        prompt_ids = await request.app[OFFLOAD].run(engine.apply_chat_template, messages, tools,
                                                    body.get("chat_template_kwargs"))
    except ApiError:
        raise
    except Exception as e:  # the template rejected the conversation (roles out of order, ...)
        raise ApiError(f"chat template failed: {e}", param="messages") from None
    if "max_new_tokens" not in params:  # until the context is full (images expand the prompt: the engine counts)
        params["max_new_tokens"] = None if images else max(1, engine.context_length - len(prompt_ids))
    include_usage = stream_options(body)
    requests = await make_requests(request, None, params, [prompt_ids], max_tokens_given(body),
                                   image_data=[images] if images else None)
    n = params.get("n", 1)
    head = {"id": f"chatcmpl-{request[REQUEST_ID]}", "created": int(time.time()), "model": model_name(request)}

    if body.get("stream"):
        response = await open_event_stream(request)
        chunk = {**head, "object": "chat.completion.chunk"}
        for i in range(len(requests)):
            await send_event(response, {**chunk, "choices": [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}]})
        async for i, delta, req, finished in run(request, requests):
            if delta and not tool_format:  # with tools, the reply is sent whole once it can be parsed
                await send_event(response, {**chunk, "choices": [
                    {"index": i, "delta": {"content": delta}, "logprobs": None, "finish_reason": None}]})
            if finished:
                message, reason = chat_message(req, tool_format)
                last = {k: v for k, v in message.items() if k != "role"} if tool_format else {}
                await send_event(response, {**chunk, "choices": [
                    {"index": i, "delta": last, "finish_reason": reason,
                     "logprobs": chat_logprobs(engine, req) if want_logprobs else None}]})
        final = {**chunk, "choices": [], "usage": usage(requests, n)}
        await end_event_stream(response, final if include_usage else None)
        return response

    await run_to_end(request, requests)
    choices = []
    for i, req in enumerate(requests):
        message, reason = chat_message(req, tool_format)
        choices.append({"index": i, "message": message, "finish_reason": reason,
                        "logprobs": chat_logprobs(engine, req) if want_logprobs else None})
    return web.json_response({**head, "object": "chat.completion", "choices": choices, "usage": usage(requests, n)})
