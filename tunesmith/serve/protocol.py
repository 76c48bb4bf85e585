"""The OpenAI API's request shapes, checked at the door, and its one error shape.

Every request is parsed here before it reaches the batcher: a field we do not implement is refused by name (never
silently ignored), an unknown field is refused, and every size has a bound, so a hostile request cannot make the
server allocate or generate without limit. Every failure becomes an `APIError`, which the HTTP layer sends as
`{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_CHOICES = 8  # n
MAX_MESSAGES = 256
MAX_CONTENT_CHARS = 200_000  # one message; the token count is checked against the context afterwards
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
MAX_TOOLS = 64
MAX_TOOL_CALLS = 16  # in one assistant message of the history

# Fields of OpenAI's chat request that we do not implement, and the values that mean "not used" (accepted).
UNSUPPORTED_FIELDS: dict[str, tuple[Any, ...]] = {
    "logit_bias": (None, {}),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "reasoning_effort": (None,),
    "web_search_options": (None,),
    "service_tier": (None, "auto", "default"),
    "store": (None, False),
    "metadata": (None, {}),
}


ERROR_TYPES: dict[int, str] = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
    504: "timeout_error",
}


class APIError(Exception):
    """An answer other than success: the HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = ERROR_TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


class Strict(BaseModel):
    # strict: "1" is not an int and true is not a number; extra: an unknown field is an error naming it.
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_CONTENT_CHARS)


class FunctionCall(Strict):
    name: str = Field(max_length=256)
    arguments: str = Field(max_length=MAX_CONTENT_CHARS, description="the arguments as a JSON text, as OpenAI sends")


class ToolCall(Strict):
    """A call an assistant message of the history made; the template writes it in its tool style."""

    id: str | None = Field(None, max_length=256)
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # None only for an assistant message that made tool calls (checked below)
    content: (
        Annotated[str, Field(max_length=MAX_CONTENT_CHARS)] | Annotated[list[TextPart], Field(max_length=64)] | None
    )
    tool_call_id: str | None = Field(None, max_length=256)
    tool_calls: list[ToolCall] | None = Field(None, max_length=MAX_TOOL_CALLS)

    @model_validator(mode="after")
    def _check_roles(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only an assistant message may have `tool_calls`")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` may be null only in an assistant message with `tool_calls`")
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The message as chat templates take it: text content, and OpenAI's `developer` role as `system`."""
        parts = self.content if isinstance(self.content, list) else [TextPart(type="text", text=self.content or "")]
        text = "".join(part.text for part in parts)
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump(exclude_none=True) for call in self.tool_calls]
        return message


class PropertySchema(BaseModel):
    """One parameter's JSON schema: the keys the templates' tool styles read are checked (so that a template
    cannot fail on their shape); other schema keywords pass through."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str | list[str] | None = None
    description: str | None = None
    enum: list[str | int | float | bool | None] | None = Field(None, max_length=256)
    items: dict[str, Any] | None = None


class FunctionParameters(BaseModel):
    """A function's JSON schema, checked as PropertySchema is."""

    model_config = ConfigDict(extra="allow", strict=True)
    type: str | None = None
    properties: dict[str, PropertySchema] | None = Field(None, max_length=256)
    required: list[str] | None = None


class FunctionDefinition(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    description: str | None = Field(None, max_length=MAX_CONTENT_CHARS)
    parameters: FunctionParameters | None = None
    strict: bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition

    def as_template_tool(self) -> dict[str, Any]:
        return {"type": "function", "function": self.function.model_dump(exclude_none=True, exclude={"strict"})}


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: dict[str, str]


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class StreamOptions(Strict):
    include_usage: bool = False


class GenerationFields(Strict):
    """The fields chat and text completions share."""

    model: str = Field(max_length=256)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="an end-user id; written to the access log")
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def token_limit(self) -> tuple[int | None, str]:
        """The requested limit on generated tokens, and the field that set it."""
        return self.max_tokens, "max_tokens"


class ChatCompletionRequest(GenerationFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name of max_tokens")
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    response_format: ResponseFormat | None = None

    @property
    def calls_tools(self) -> bool:
        """Tools are shown to the model and its calls parsed: tools given, and tool_choice not `none`."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def json_object(self) -> bool:
        return self.response_format is not None and self.response_format.type == "json_object"

    def template_tools(self) -> list[dict[str, Any]] | None:
        return [tool.as_template_tool() for tool in self.tools or []] if self.calls_tools else None

    def token_limit(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionRequest(GenerationFields):
    prompt: str = Field(max_length=MAX_CONTENT_CHARS, description="one prompt; a list of prompts is refused")


# Text completions' own fields that we do not implement, on top of the chat ones that apply to both.
UNSUPPORTED_COMPLETION_FIELDS: dict[str, tuple[Any, ...]] = {
    "logit_bias": UNSUPPORTED_FIELDS["logit_bias"],
    "logprobs": (None,),
    "echo": (None, False),
    "suffix": (None,),
    "best_of": (None, 1),
}


def parse_json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise APIError(400, f"the request body is not valid UTF-8 ({error.reason} at byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise APIError(400, f"the request body is not valid JSON: {error.msg} at position {error.pos}") from None
    except RecursionError:  # the JSON parser recurses once per nesting level
        raise APIError(400, "the request body's JSON is nested too deeply") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(data).__name__}")
    return data


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    request = parse_request(body, ChatCompletionRequest, UNSUPPORTED_FIELDS)
    if request.tool_choice == "required" or isinstance(request.tool_choice, NamedToolChoice):
        raise APIError(
            400,
            "`tool_choice` may be `auto` or `none` here: the model decides whether to call a tool "
            "(`required` and a named function are not supported)",
            param="tool_choice",
        )
    if request.tool_choice is not None and not request.tools:
        raise APIError(400, "`tool_choice` is given without `tools`", param="tool_choice")
    for number, tool in enumerate(request.tools or []):
        if tool.function.strict:
            raise APIError(
                400,
                "`strict: true` is not supported: a call's arguments are parsed from the answer, not constrained to "
                "the schema",
                param=f"tools.{number}.function.strict",
            )
    if request.response_format is not None:
        if request.response_format.type == "json_schema":
            raise APIError(
                400,
                '`response_format` `json_schema` is not supported; use `{"type": "json_object"}` (any JSON '
                "object) and check the schema yourself",
                param="response_format.type",
            )
        if request.response_format.json_schema is not None:
            raise APIError(400, "`json_schema` belongs to type `json_schema` only", "response_format.json_schema")
        if request.json_object and request.calls_tools:
            raise APIError(400, "`response_format` json_object cannot be combined with `tools`", "response_format")
    return request


def parse_completion_request(body: bytes) -> CompletionRequest:
    return parse_request(body, CompletionRequest, UNSUPPORTED_COMPLETION_FIELDS)


Parsed = TypeVar("Parsed", bound="GenerationFields")


def parse_request(body: bytes, model: type[Parsed], unsupported: dict[str, tuple[Any, ...]]) -> Parsed:
    data = parse_json_body(body)
    refuse_media(data)
    for name, unused_values in unsupported.items():
        if name in data:
            value = data.pop(name)
            if not any(value == unused and type(value) is type(unused) for unused in unused_values):
                raise APIError(400, f"`{name}` is not supported by this server; remove it", param=name)
    try:
        request = model.model_validate(data)
    except ValidationError as error:
        raise validation_error(error) from None
    for stop in request.stop_strings():
        if not 1 <= len(stop) <= MAX_STOP_CHARS:
            raise APIError(400, f"each stop string must have 1 to {MAX_STOP_CHARS} characters", param="stop")
    if request.stream_options is not None and not request.stream:
        raise APIError(400, "`stream_options` is only allowed with `stream: true`", param="stream_options")
    return request


MEDIA_PARTS = ("image_url", "input_image", "input_audio", "audio_url", "video_url", "file")


def refuse_media(data: dict[str, Any]) -> None:
    """Images, audio and files are refused by name: the served models are text-only, and nothing in a request may
    make the server fetch a URL or read a local file."""
    messages = data.get("messages")
    for number, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for part_number, part in enumerate(content if isinstance(content, list) else []):
            if isinstance(part, dict) and part.get("type") in MEDIA_PARTS:
                raise APIError(
                    400,
                    f"content parts of type `{part['type']}` are not supported: this server serves a text-only model "
                    "and never fetches URLs or reads files named in a request",
                    param=f"messages.{number}.content.{part_number}.type",
                )


def validation_error(error: ValidationError) -> APIError:
    """The first problem pydantic found, naming the field as a dotted path (`messages.0.role`)."""
    first = error.errors(include_url=False)[0]
    # A union reports each branch in the location (`stop.str`); the field path is what a client can act on.
    path = [str(part) for part in first["loc"] if not (isinstance(part, str) and part in BRANCH_NAMES)]
    param = ".".join(path) or None
    if first["type"] == "extra_forbidden":
        return APIError(400, f"unknown field `{param}`; this server does not accept it", param=param)
    value = first.get("input")
    shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
    return APIError(400, f"`{param}`: {first['msg']} (got {shown})", param=param)


BRANCH_NAMES = {"str", "int", "float", "bool", "list[str]", "list[TextPart]", "TextPart", "StreamOptions"}
BRANCH_NAMES |= {"literal['none','auto','required']", "NamedToolChoice", "ResponseFormat", "FunctionParameters"}
BRANCH_NAMES |= {"list[str]", "list[union[str,int,float,bool,none]]"}
