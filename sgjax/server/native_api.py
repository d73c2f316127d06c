"""SGLang's native API: POST /generate, with the same request and response shapes as SGLang's server."""

from __future__ import annotations

import json

from aiohttp import web

from sgjax.server.errors import ApiError, read_json, require
from sgjax.server.keys import ENGINE, REQUEST_ID, SERVER_ARGS
from sgjax.server.streaming import end_event_stream, open_event_stream, run, run_to_end, send_event


def sampling_dict(body: dict) -> dict:
    """sampling_params plus the top-level logprob options, in SamplingParams' terms."""
    params = body.get("sampling_params") or {}
    require(isinstance(params, dict), "sampling_params must be an object", "sampling_params")
    params = dict(params)  # regex / json_schema / ebnf / choices pass through to SamplingParams
    if body.get("return_logprob"):
        params["logprobs"] = True
        params["top_logprobs_num"] = body.get("top_logprobs_num", 0)
        start = body.get("logprob_start_len", -1)
        require(isinstance(start, int), "logprob_start_len must be an integer", "logprob_start_len")
        params["logprob_start_len"] = start
    return params


def logprob_entries(tokenizer, pairs, with_text: bool) -> list:
    """[(logprob, id)] -> SGLang's [[logprob, id, text or None]]."""
    return [[lp, tok, tokenizer.decode([tok]) if with_text and tokenizer else None] for lp, tok in pairs]


def native_result(engine, req, body: dict) -> dict:
    out = engine.result(req)
    meta = out["meta_info"]
    with_text = bool(body.get("return_text_in_logprobs"))
    for key in ("output_token_logprobs", "input_token_logprobs"):
        if key in meta:
            meta[key] = logprob_entries(engine.tokenizer, meta[key], with_text)
    for key in ("output_top_logprobs", "input_top_logprobs"):
        if key in meta:
            meta[key] = [logprob_entries(engine.tokenizer, top, with_text) if top else None for top in meta[key]]
    return out


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    body = await read_json(request)
    text, input_ids = body.get("text"), body.get("input_ids")
    require((text is None) != (input_ids is None), "give exactly one of text and input_ids")
    if text is not None:
        require(isinstance(text, str) or (isinstance(text, list) and all(isinstance(t, str) for t in text)),
                "text must be a string or a list of strings", "text")
    else:
        ok = isinstance(input_ids, list) and (all(isinstance(t, int) for t in input_ids) or all(
            isinstance(x, list) and all(isinstance(t, int) for t in x) for x in input_ids))
        require(ok, "input_ids must be a list of integers or a list of such lists", "input_ids")
    batched = isinstance(text, list) or (input_ids and isinstance(input_ids[0], list))
    rid = body.get("rid", request[REQUEST_ID])
    require(isinstance(rid, str) and rid, "rid must be a non-empty string", "rid")
    try:
        requests = engine.make_requests(text, sampling_dict(body), input_ids, rid=rid)
    except ValueError as e:
        raise ApiError(str(e)) from None
    if body.get("stream"):
        response = await open_event_stream(request)
        incremental = request.app[SERVER_ARGS].incremental_streaming_output
        text_so_far, ids_sent = [""] * len(requests), [0] * len(requests)
        async for i, delta, req, finished in run(request, requests):
            text_so_far[i] += delta
            chunk = native_result(engine, req, body)
            if not finished:  # the engine thread may have finished it since this update
                chunk["meta_info"]["finish_reason"] = None
            if incremental:
                chunk["text"], ids = delta, chunk["output_ids"]
                chunk["output_ids"], ids_sent[i] = ids[ids_sent[i]:], len(ids)
            else:
                chunk["text"] = text_so_far[i]  # SGLang streams the text so far
            chunk["index"] = i
            await send_event(response, chunk)
        await end_event_stream(response)
        return response
    await run_to_end(request, requests)
    results = [native_result(engine, r, body) for r in requests]
    return web.json_response(results if batched or len(results) > 1 else results[0], dumps=json.dumps)
