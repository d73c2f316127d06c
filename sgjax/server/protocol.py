"""The request bodies of every route as typed models: one place that says what a body may hold, turns what
does not fit into a 400 naming the field, and gives the OpenAPI schema served at /openapi.json.

The models check shapes and types (strictly: `true` is not an integer, `1e12` is not a token count).
Ranges and what depends on the model (vocabulary, context length) stay with SamplingParams and the
RequestBuilder, which the Python Engine API shares. Fields a model does not name are kept (`extra="allow"`):
the OpenAI API's optional fields and SGLang's extensions are the handlers' to honour or reject by name.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from aiohttp import web
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    TypeAdapter,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic.json_schema import models_json_schema

from sgjax.engine.sampling_params import SamplingParams
from sgjax.executor.sampler import TOP_LOGPROBS
from sgjax.server.errors import ApiError, read_json

ROLES = ("system", "developer", "user", "assistant", "tool", "function")
RESPONSE_FORMATS = ("text", "json_object", "json_schema")

TokenIds = Annotated[list[int], Field(min_length=1)]
NonEmpty = Field(min_length=1)


class Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


# ---- the OpenAI API ------------------------------------------------------------------------

class StreamOptions(Body):
    include_usage: bool = False


class ResponseFormat(Body):
    type: str = Field(json_schema_extra={"enum": list(RESPONSE_FORMATS)})
    json_schema: dict[str, Any] | None = Field(None, description="{name, schema}: the JSON schema the reply follows")

    @field_validator("type")
    @classmethod
    def known_type(cls, kind: str) -> str:
        if kind not in RESPONSE_FORMATS:
            raise ValueError(f"response_format type {kind!r} is not supported; use text, json_object or json_schema")
        return kind

    @model_validator(mode="after")
    def has_schema(self) -> ResponseFormat:
        spec = self.json_schema
        if self.type == "json_schema" and not (isinstance(spec, dict) and isinstance(spec.get("schema", {}),
                                                                                      (dict, bool))):
            raise ValueError("response_format.json_schema must be an object with a schema")
        return self


class OpenAIRequest(Body):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: str = Field(description="the served model's name (GET /v1/models)")
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: str | list[str] | None = Field(None, description="a string or a list of strings")
    seed: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = Field(None, description="an object of token id: bias")
    stream: bool | None = None
    stream_options: StreamOptions | None = Field(None, description="an object such as {include_usage: true}")
    response_format: ResponseFormat | None = Field(None, description="{type: text | json_object | json_schema}")
    # SGLang's extensions
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None
    stop_token_ids: list[int] | None = None
    regex: str | None = None
    ebnf: str | None = None


class CompletionRequest(OpenAIRequest):
    prompt: str | Annotated[list[str], NonEmpty] | TokenIds | Annotated[list[TokenIds], NonEmpty] = Field(
            description="a string, a list of strings, a list of token ids, or a list of those")
    logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = None


class TextPart(Body):
    type: Literal["text"]
    text: str = ""


class ImageURL(Body):
    url: str = Field(description="a data: URL (base64), or a path or file:// URL on the server's disk")
    detail: str | None = None


class ImagePart(Body):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(Body):
    role: Literal[ROLES]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def has_content(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":  # an assistant turn may be only tool calls
            raise ValueError(f"a {self.role} message needs content")
        return self


class FunctionSpec(Body):
    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(Body):
    type: Literal["function"]
    function: FunctionSpec


class FunctionName(Body):
    name: str


class NamedToolChoice(Body):
    type: Literal["function"] = "function"
    function: FunctionName


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1, description="a non-empty list of {role, content} messages")
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=TOP_LOGPROBS)
    tools: list[Tool] | None = Field(None, description="a list of {type: function, function: {name, ...}}")
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description='"none", "auto", "required" or {"type": "function", "function": {"name": ...}}')


# ---- SGLang's native API --------------------------------------------------------------------

def one_or_each(kind):
    """SGLang takes a per-request option as one value or as a list of one per prompt."""
    return kind | list[kind] | None


class GenerateRequest(Body):
    text: str | Annotated[list[str], NonEmpty] | None = Field(None, description="a string or a list of strings")
    input_ids: list[int] | list[list[int]] | None = Field(
        None, description="a list of token ids or a list of such lists")
    # Validated by SamplingParams itself (its messages name each parameter); the schema shows its fields
    sampling_params: Annotated[dict[str, Any] | None, WithJsonSchema({"anyOf": [
        {**TypeAdapter(SamplingParams).json_schema(), "additionalProperties": False}, {"type": "null"}]})] = Field(
        None, description="an object of sampling parameters (SGLang's names: max_new_tokens, temperature, ...)")
    rid: str | list[str] | None = None
    image_data: str | list[str | list[str] | None] | None = Field(
        None, description="vision-language models: an image (data: URL, base64, path) or images, or one entry per prompt")
    stream: bool | None = None
    return_logprob: one_or_each(bool) = None
    logprob_start_len: one_or_each(int) = None
    top_logprobs_num: one_or_each(int) = None
    return_text_in_logprobs: one_or_each(bool) = None

    @model_validator(mode="after")
    def one_prompt_kind(self) -> GenerateRequest:
        if (self.text is None) == (self.input_ids is None):
            raise ValueError("give exactly one of text and input_ids")
        return self


class TokenizeRequest(Body):
    prompt: str | list[str] = Field(description="a string or a list of strings")
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    tokens: list[int] | list[list[int]] = Field(description="a list of token ids or a list of such lists")
    skip_special_tokens: bool = True


class AbortRequest(Body):
    rid: str = ""
    abort_all: bool = False

    @model_validator(mode="after")
    def something_to_abort(self) -> AbortRequest:
        if not self.rid and not self.abort_all:
            raise ValueError("rid must be a non-empty string (or abort_all true)")
        return self


# ---- parsing -------------------------------------------------------------------------------

M = TypeVar("M", bound=Body)


def is_union_tag(part) -> bool:
    """Whether a part of an error's location names a union's member ("str", "list[int]", "ChatMessage"), which
    pydantic puts there, rather than a field (snake_case) or an index."""
    return isinstance(part, str) and (bool(set(part) & set("[](),'-")) or part in ("str", "int", "float", "bool")
                                      or part[:1].isupper())


def api_error(error: ValidationError, model: type[Body]) -> ApiError:
    """The first problem as a 400: our own validators' messages as they are, else the field, what it must be
    and what it got."""
    errors = error.errors(include_url=False)
    first = max(errors, key=lambda e: len(e["loc"]))  # of a union's members, the one that got furthest
    loc = [part for part in first["loc"] if not is_union_tag(part)]
    name = str(loc[0]) if loc else None
    if first["type"] == "value_error":
        return ApiError(str(first["ctx"]["error"]), param=name)
    where = ".".join(map(str, loc)) or "request body"
    detail = f"{where}: {first['msg']}"
    if first["type"] != "missing":
        detail += f"; got {first['input']!r:.100}"
    field = model.model_fields.get(name) if name else None
    if field is not None and field.description:
        return ApiError(f"{name} must be {field.description} ({detail})", param=name)
    return ApiError(detail, param=name)


def validate(model: type[M], body: dict) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise api_error(e, model) from None


async def parse(request: web.Request, model: type[M]) -> M:
    """The request's JSON body as `model` (400 naming the field that does not fit)."""
    return validate(model, await read_json(request))


async def parse_dict(request: web.Request, model: type[Body]) -> dict:
    """The body validated by `model`, as a dict of the fields the client sent."""
    return (await parse(request, model)).model_dump(exclude_unset=True)


# ---- the OpenAPI schema ----------------------------------------------------------------------

POST_BODIES: dict[str, type[Body]] = {
    "/v1/completions": CompletionRequest,
    "/v1/chat/completions": ChatCompletionRequest,
    "/generate": GenerateRequest,
    "/tokenize": TokenizeRequest,
    "/v1/tokenize": TokenizeRequest,
    "/detokenize": DetokenizeRequest,
    "/v1/detokenize": DetokenizeRequest,
    "/abort_request": AbortRequest,
}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                   "param": {"type": ["string", "null"]}, "code": {"type": "integer"}}}}}


def openapi(get_paths: list[str], post_paths: list[str], model_name: str, version: str) -> dict:
    """The OpenAPI 3.1 document of these routes: POST bodies from the models above."""
    _, defs = models_json_schema([(m, "validation") for m in set(POST_BODIES.values())],
                                 ref_template="#/components/schemas/{model}")
    for body in (CompletionRequest, ChatCompletionRequest):
        defs["$defs"][body.__name__]["properties"]["model"]["enum"] = [model_name]  # the one this server serves
    errors = {str(code): {"description": what, "content": {"application/json": {"schema": {"$ref": "#/components/"
                                                                                         "schemas/Error"}}}}
              for code, what in ((400, "the request is invalid"), (401, "missing or wrong API key"),
                                 (413, "the body is too large"), (503, "the engine is not running or busy"))}
    ok = {"200": {"description": "OK"}}
    paths: dict[str, dict] = {}
    for path in get_paths:
        paths.setdefault(path, {})["get"] = {"responses": {**ok, **errors}}
    for path in post_paths:
        operation: dict = {"responses": {**ok, **errors}}
        if path in POST_BODIES:
            operation["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{POST_BODIES[path].__name__}"}}}}
        paths.setdefault(path, {})["post"] = operation
    return {"openapi": "3.1.0", "info": {"title": "sgjax", "version": version}, "paths": paths,
            "components": {"schemas": {**defs["$defs"], "Error": ERROR},
                           "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
            "security": [{"bearer": []}]}
