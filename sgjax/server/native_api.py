"""SGLang's native API: POST /generate, /tokenize and /detokenize, with the same request and response shapes as
SGLang's server, so its clients (its frontend language's RuntimeEndpoint among them) work unchanged."""

from __future__ import annotations

import json

from aiohttp import web

from sgjax.server.errors import ApiError, read_json, require
from sgjax.server.keys import ENGINE_REQUESTS, OFFLOAD, REQUEST_ID, SERVER_ARGS, SERVING
from sgjax.server.limits import check_limits, check_max_tokens
from sgjax.server.protocol import DetokenizeRequest, GenerateRequest, TokenizeRequest, parse, validate
from sgjax.server.streaming import end_event_stream, open_event_stream, run, run_to_end, send_event

# /generate's fields that sgjax reads
FIELDS = {"text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
          "top_logprobs_num", "token_ids_logprob", "return_text_in_logprobs"}
# SGLang's fields with nothing to do here: logging and routing hints of its own deployment
IGNORED = {"log_metrics", "data_parallel_rank", "priority", "modalities", "background", "routing_key"}
# SGLang's fields that sgjax cannot honour: a request that sets one gets a 400 saying why
MODALITIES = {"image_data": "images", "video_data": "videos", "audio_data": "audio"}
NOT_SUPPORTED = {
    "input_embeds": "input_embeds is not supported; send text or input_ids",
    "return_hidden_states": "return_hidden_states is not supported",
    "lora_path": "LoRA adapters are not supported",
    "lora_id": "LoRA adapters are not supported",
    "session_params": "sessions are not supported",
    "custom_logit_processor": "custom logit processors are not supported",
    "bootstrap_host": "prefill/decode disaggregation is not supported",
    "bootstrap_port": "prefill/decode disaggregation is not supported",
    "bootstrap_room": "prefill/decode disaggregation is not supported",
}
# meta_info's output-side lists, sent as increments by --incremental-streaming-output (as SGLang does)
INCREMENTAL_KEYS = ("output_token_logprobs", "output_top_logprobs", "output_token_ids_logprobs")


def check_fields(body: dict, model_name: str, takes_images: bool) -> None:
    """400 for fields sgjax cannot honour (named, with why) and for fields SGLang does not have."""
    for name, what in MODALITIES.items():
        if name == "image_data" and takes_images:
            continue
        if body.get(name) not in (None, [], ""):
            raise ApiError(f"{name}: this model ({model_name}) takes no {what}; it is a text-only model", param=name)
    for name, reason in NOT_SUPPORTED.items():
        if body.get(name) not in (None, False, [], ""):
            raise ApiError(reason, param=name)
    unknown = set(body) - FIELDS - IGNORED - set(MODALITIES) - set(NOT_SUPPORTED)
    require(not unknown, f"unknown fields: {sorted(unknown)}")


def one_value(body: dict, name: str, default, kind):
    """A per-request option that SGLang also takes as a list (one per prompt): sgjax needs one value for all."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, list):
        require(len(set(map(json.dumps, value))) <= 1, f"{name} must be the same for every prompt of a batch", name)
        value = value[0] if value else default
    require(isinstance(value, kind) and (kind is bool or not isinstance(value, bool)),
            f"{name} must be {'true or false' if kind is bool else 'an integer'}", name)
    return value


def sampling_dict(body: dict) -> dict:
    """sampling_params plus the top-level logprob options, in SamplingParams' terms."""
    params = dict(body.get("sampling_params") or {})  # regex / json_schema / ebnf / choices pass through to SamplingParams
    if one_value(body, "return_logprob", False, bool):
        params["logprobs"] = True
        params["top_logprobs_num"] = one_value(body, "top_logprobs_num", 0, int)
        params["logprob_start_len"] = one_value(body, "logprob_start_len", -1, int)
        params["token_ids_logprob"] = token_ids(body.get("token_ids_logprob"))
    return params


def token_ids(value) -> list[int] | None:
    """token_ids_logprob: a list of ids, or for a batch one such list per prompt (then all the same)."""
    if value and all(isinstance(x, list) for x in value):
        require(len(set(map(json.dumps, value))) <= 1,
                "token_ids_logprob must be the same for every prompt of a batch", "token_ids_logprob")
        value = value[0]
    return value or None  # SamplingParams validates the ids


def request_ids(body: dict, request: web.Request, num_prompts: int, batched: bool) -> str | list[str]:
    """The rid as given (a string, or one per prompt of a batch), else this HTTP request's id."""
    rid = body.get("rid")
    if rid is None:
        return request[REQUEST_ID]
    if isinstance(rid, list):
        require(batched and len(rid) == num_prompts and all(isinstance(r, str) and r for r in rid)
                and len(set(rid)) == len(rid), "rid must be a string, or for a batch one distinct string per prompt",
                "rid")
        return rid
    require(isinstance(rid, str) and rid, "rid must be a non-empty string", "rid")
    return rid


def logprob_entries(engine, pairs, with_text: bool) -> list:
    """[(logprob, id)] -> SGLang's [[logprob, id, text or None]]."""
    return [[lp, tok, engine.token_text(tok) if with_text and engine.tokenizer else None] for lp, tok in pairs]


def native_result(engine, req, body: dict) -> dict:
    out = engine.result(req)
    meta = out["meta_info"]
    with_text = bool(one_value(body, "return_text_in_logprobs", False, bool))
    for key in ("output_token_logprobs", "input_token_logprobs"):
        if key in meta:
            meta[key] = logprob_entries(engine, meta[key], with_text)
    for key in ("output_top_logprobs", "input_top_logprobs", "output_token_ids_logprobs", "input_token_ids_logprobs"):
        if key in meta:
            meta[key] = [logprob_entries(engine, top, with_text) if top else None for top in meta[key]]
    return out


async def generate(request: web.Request) -> web.StreamResponse:
    engine = request.app[SERVING].engine
    body = await read_json(request)
    check_fields(body, request.app[SERVER_ARGS].served_model_name, engine.image_placeholder is not None)
    validate(GenerateRequest, body)  # the fields' shapes; the handler reads the body as sent
    text, input_ids = body.get("text"), body.get("input_ids")
    batched = isinstance(text, list) or bool(input_ids and isinstance(input_ids[0], list))
    num_prompts = len(text if text is not None else input_ids) if batched else 1
    rid = request_ids(body, request, num_prompts, batched)
    params = sampling_dict(body)
    check_limits(request.app[SERVER_ARGS], num_prompts, params)
    try:
        requests = await request.app[OFFLOAD].run(engine.make_requests, text, params, input_ids, rid=rid,
                                                  image_data=body.get("image_data"))
    except ValueError as e:
        raise ApiError(str(e)) from None
    request[ENGINE_REQUESTS] = requests  # from here on, the middleware aborts what does not finish
    if params.get("max_new_tokens") is not None:  # given: an error if it cannot fit, not silently capped
        check_max_tokens(requests, params["max_new_tokens"], engine.context_length, "max_new_tokens")
    if body.get("stream"):
        response = await open_event_stream(request)
        incremental = request.app[SERVER_ARGS].incremental_streaming_output
        text_so_far, ids_sent = [""] * len(requests), [0] * len(requests)
        async for i, delta, req, finished in run(request, requests):
            text_so_far[i] += delta
            chunk = native_result(engine, req, body)
            meta = chunk["meta_info"]
            if not finished:  # the engine thread may have finished it since this update
                meta["finish_reason"] = None
                meta.pop("e2e_latency", None)
            if incremental:
                chunk["text"], ids = delta, chunk["output_ids"]
                chunk["output_ids"] = ids[ids_sent[i]:]
                for key in INCREMENTAL_KEYS:
                    if key in meta:
                        meta[key] = meta[key][ids_sent[i]:]
                ids_sent[i] = len(ids)
            else:
                chunk["text"] = text_so_far[i]  # SGLang streams the text so far
            chunk["index"] = i
            await send_event(response, chunk)
        await end_event_stream(response)
        return response
    await run_to_end(request, requests)
    results = [native_result(engine, r, body) for r in requests]
    return web.json_response(results if batched or len(results) > 1 else results[0], dumps=json.dumps)


async def tokenize(request: web.Request) -> web.Response:
    """SGLang's /tokenize: {prompt: text or texts, add_special_tokens} -> {tokens, count, max_model_len}."""
    engine = request.app[SERVING].engine
    body = await parse(request, TokenizeRequest)
    prompt, special = body.prompt, body.add_special_tokens
    single = isinstance(prompt, str)
    require(engine.tokenizer is not None, "this server has no tokenizer (dummy weights)")
    prompts = [prompt] if single else prompt
    check_limits(request.app[SERVER_ARGS], len(prompts), {})

    def encode() -> list[list[int]]:
        for p in prompts:  # as for generation: a text that cannot fit the context is not tokenized
            engine.requests.check_length(p)
        return [engine.tokenizer.encode(p, add_special_tokens=special) for p in prompts]

    try:
        tokens = await request.app[OFFLOAD].run(encode)
    except ValueError as e:
        raise ApiError(str(e), param="prompt") from None
    counts = [len(t) for t in tokens]
    return web.json_response({"tokens": tokens[0] if single else tokens, "count": counts[0] if single else counts,
                              "max_model_len": engine.context_length})


async def detokenize(request: web.Request) -> web.Response:
    """SGLang's /detokenize: {tokens: ids or lists of ids, skip_special_tokens} -> {text}."""
    engine = request.app[SERVING].engine
    body = await parse(request, DetokenizeRequest)
    tokens, skip = body.tokens, body.skip_special_tokens
    single = all(isinstance(t, int) for t in tokens)  # an empty list is one empty sequence
    require(engine.tokenizer is not None, "this server has no tokenizer (dummy weights)")
    vocab, context = engine.config.vocab_size, engine.context_length
    lists = [tokens] if single else tokens
    longest = max(map(len, lists), default=0)
    require(longest <= context, f"tokens has a sequence of {longest} ids; at most the context length ({context})",
            "tokens")
    check_limits(request.app[SERVER_ARGS], len(lists), {})

    def decode() -> list[str]:
        if not all(0 <= t < vocab for ids in lists for t in ids):
            raise ValueError(f"token ids must be in [0, {vocab})")
        return [engine.tokenizer.decode(ids, skip_special_tokens=skip) for ids in lists]

    try:
        texts = await request.app[OFFLOAD].run(decode)
    except ValueError as e:
        raise ApiError(str(e), param="tokens") from None
    return web.json_response({"text": texts[0] if single else texts})
