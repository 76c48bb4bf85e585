"""The HTTP layer: routes that parse a request (protocol.py), queue it (batcher.py) and shape the answer.

Two ASGI wrappers sit in front of the routes: one writes a single access line per request (id, status, tokens in
and out, latency; the prompt only with --log-prompts), the other checks the API key on every `/v1` path with
`secrets.compare_digest` and caps the body size. Every error leaves in OpenAI's shape, and a streamed answer sends
its errors before the 200 whenever they can be known then.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jinja2
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.serve.batcher import Event, Failed, Finished, Job, QueueFull, Sampling
from tunesmith.serve.protocol import (
    APIError,
    ChatCompletionRequest,
    GenerationFields,
    parse_chat_request,
    parse_completion_request,
)
from tunesmith.serve.tools import ParsedCall, parse_tool_calls

log = logging.getLogger("tunesmith.serve")


@dataclass(frozen=True)
class ServeSettings:
    model_name: str
    context_length: int
    default_sampling: Sampling  # from the inference config's generation keys; a request's fields win
    api_key: str | None = None
    max_body_bytes: int = 1 << 20
    request_timeout_s: float = 300.0
    log_prompts: bool = False


@dataclass
class Engine:
    """What the routes need from the model: a prompt renderer (messages, tools), a tokenizer, the batcher (or
    another backend with the same `submit`/`alive`), and the chat template's tool style (None: it shows no tools)."""

    render: Callable[[list[dict[str, Any]], list[dict[str, Any]] | None], str]
    tokenizer: Any
    batcher: Any
    tool_style: str | None = None


def create_app(engine: Engine, settings: ServeSettings) -> FastAPI:
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.exception_handler(Exception)
    async def server_bug(request: Request, error: Exception) -> JSONResponse:
        # A bug in tunesmith, not the client's mistake: the traceback goes to the log, the client gets OpenAI's shape.
        log.error("%s internal error", request.state.request_id, exc_info=error)
        return error_response(APIError(500, "internal server error; the server log has the details"))

    @app.get("/health")
    async def health() -> JSONResponse:
        if not engine.batcher.alive:
            return error_response(APIError(503, "the generation worker has stopped"))
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        model = {"id": settings.model_name, "object": "model", "created": created, "owned_by": "tunesmith"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat_request(await read_body(request, settings.max_body_bytes))
        check_model(chat, settings)
        return await answer(request, chat, encode_chat(engine, chat), CHAT, engine, settings)

    @app.post("/v1/completions")
    async def completions(request: Request):
        completion = parse_completion_request(await read_body(request, settings.max_body_bytes))
        check_model(completion, settings)
        prompt_ids = engine.tokenizer(completion.prompt)["input_ids"]  # raw text: the tokenizer adds its BOS, if any
        return await answer(request, completion, prompt_ids, TEXT, engine, settings)

    return app


async def read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body is larger than {limit} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


@dataclass(frozen=True)
class Shape:
    """How chat and text completions differ in their answers' JSON."""

    id_prefix: str
    whole_object: str
    chunk_object: str
    chat: bool

    def whole_choice(self, index: int, text: str | None, reason: str, calls: list[ParsedCall]) -> dict[str, Any]:
        if not self.chat:
            return {"index": index, "text": text, "finish_reason": reason, "logprobs": None}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [call.as_openai() for call in calls]
        return {"index": index, "message": message, "finish_reason": reason, "logprobs": None}

    def chunk_choice(self, index: int, text: str, reason: str | None = None) -> dict[str, Any]:
        body = {"delta": {"content": text} if text else {}} if self.chat else {"text": text}
        return {"index": index, **body, "finish_reason": reason, "logprobs": None}


CHAT = Shape("chatcmpl-", "chat.completion", "chat.completion.chunk", chat=True)
TEXT = Shape("cmpl-", "text_completion", "text_completion", chat=False)


def check_model(parsed: GenerationFields, settings: ServeSettings) -> None:
    if parsed.model != settings.model_name:
        raise APIError(404, f"model `{parsed.model}` is not served here; use `{settings.model_name}`", "model")


async def answer(
    request: Request,
    parsed: GenerationFields,
    prompt_ids: list[int],
    shape: Shape,
    engine: Engine,
    settings: ServeSettings,
):
    """Queue the generation and answer with the whole result or a stream of chunks."""
    if settings.log_prompts:
        log.info("%s prompt: %r", request.state.request_id, engine.tokenizer.decode(prompt_ids))
    sampling = choose_sampling(parsed, settings, len(prompt_ids))
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    job = Job(
        prompt_ids,
        sampling,
        parsed.n,
        deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
        deadline=time.monotonic() + settings.request_timeout_s,
        label=request.state.request_id,
    )
    try:
        engine.batcher.submit(job)
    except QueueFull:
        busy = "the server is busy: too many requests are queued; retry shortly"
        raise APIError(429, busy, code="queue_full") from None
    request.state.tokens = [len(prompt_ids), 0]
    if parsed.user is not None:
        request.state.user = parsed.user
    tools = ToolCalls.for_request(parsed, engine.tool_style)
    reply = Reply(f"{shape.id_prefix}{uuid.uuid4().hex}", shape, parsed, job, events, request, settings, tools)
    if not parsed.stream:
        return await reply.whole()
    # The first event decides the status: a failure before any text is an error response, not a 200.
    first = await reply.next_event()
    if isinstance(first, Failed):
        raise APIError(first.status, first.message)
    return StreamingResponse(reply.chunks(first), media_type="text/event-stream")


JSON_INSTRUCTION = "Answer with one JSON object."


def encode_chat(engine: Engine, chat: ChatCompletionRequest) -> list[int]:
    messages = [message.as_template_message() for message in chat.messages]
    if chat.calls_tools and engine.tool_style is None:
        raise APIError(
            400,
            "`tools` cannot be used with this model's chat template: it has no tool format; serve it with a "
            "template that has one (--template qwen, llama3, mistral, glm4, chatml, ...)",
            "tools",
        )
    if chat.json_object and not any("json" in message["content"].lower() for message in messages):
        # OpenAI asks the client to mention JSON; we tell the model ourselves (the output is constrained anyway), in
        # the last user message: a system message would displace the default system and not every template has one.
        users = [index for index, message in enumerate(messages) if message["role"] == "user"]
        last = users[-1] if users else len(messages) - 1
        messages[last] = {**messages[last], "content": f"{messages[last]['content']}\n\n{JSON_INSTRUCTION}".strip()}
    try:
        text = engine.render(messages, chat.template_tools())
    except jinja2.TemplateError as error:  # the chat template refused these messages (e.g. roles out of order)
        param = "tools" if chat.calls_tools else "messages"
        raise APIError(400, f"the model's chat template cannot render these {param}: {error}", param) from None
    # The rendered text already holds any BOS the template wants; adding special tokens would double it.
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def choose_sampling(parsed: GenerationFields, settings: ServeSettings, prompt_tokens: int) -> Sampling:
    room = settings.context_length - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens; this model's context is {settings.context_length} tokens",
            "messages",
            "context_length_exceeded",
        )
    requested, param = parsed.token_limit()
    if requested is not None and requested > room:
        raise APIError(
            400,
            f"`{param}` is {requested}, but the prompt has {prompt_tokens} tokens and this model's context is "
            f"{settings.context_length}: at most {room} tokens can be generated",
            param,
            "context_length_exceeded",
        )
    default = settings.default_sampling
    return Sampling(
        max_new_tokens=requested if requested is not None else min(default.max_new_tokens, room),
        temperature=parsed.temperature if parsed.temperature is not None else default.temperature,
        top_p=parsed.top_p if parsed.top_p is not None else default.top_p,
        top_k=default.top_k,
        repetition_penalty=default.repetition_penalty,
        seed=parsed.seed,
        stop=tuple(parsed.stop_strings()),
        presence_penalty=parsed.presence_penalty,
        frequency_penalty=parsed.frequency_penalty,
        json_object=isinstance(parsed, ChatCompletionRequest) and parsed.json_object,
    )


@dataclass(frozen=True)
class ToolCalls:
    """How a request's answers are read for function calls: the template's tool style and the tools' names."""

    style: str
    names: set[str]
    parallel: bool

    @staticmethod
    def for_request(parsed: GenerationFields, style: str | None) -> ToolCalls | None:
        if not isinstance(parsed, ChatCompletionRequest) or not parsed.calls_tools or style is None:
            return None
        names = {tool.function.name for tool in parsed.tools or []}
        return ToolCalls(style, names, parsed.parallel_tool_calls)

    def read(self, text: str, reason: str) -> tuple[str | None, list[ParsedCall], str]:
        """(content, calls, finish_reason): `tool_calls` when the answer is calls; an answer cut by the token
        limit is text (its last call may be incomplete)."""
        if reason != "stop":
            return text, [], reason
        content, calls = parse_tool_calls(self.style, text, self.names)
        if not calls:
            return text, [], reason
        return content, calls if self.parallel else calls[:1], "tool_calls"


@dataclass
class Reply:
    """One request's answer being assembled from the batcher's events."""

    id: str
    shape: Shape
    parsed: GenerationFields
    job: Job
    events: asyncio.Queue[Event]
    request: Request
    settings: ServeSettings
    tools: ToolCalls | None = None

    async def next_event(self) -> Event:
        """The job's next event; cancels the job if the client disconnects while waiting."""
        while True:
            try:
                return await asyncio.wait_for(self.events.get(), timeout=0.5)
            except TimeoutError:
                if await self.request.is_disconnected():
                    self.job.cancelled.set()
                    raise APIError(400, "the client disconnected") from None
                if time.monotonic() > self.job.deadline + 5:  # the worker is stuck behind a long batch
                    self.job.cancelled.set()
                    raise APIError(504, "the request timed out waiting for the generation worker") from None

    def body(self, choices: list[dict[str, Any]], chunk: bool, **extra: Any) -> dict[str, Any]:
        kind = self.shape.chunk_object if chunk else self.shape.whole_object
        created = int(time.time())
        model = self.settings.model_name
        return {"id": self.id, "object": kind, "created": created, "model": model, "choices": choices, **extra}

    def usage(self, finished: dict[int, Finished]) -> dict[str, int]:
        completion_tokens = sum(event.completion_tokens for event in finished.values())
        self.request.state.tokens[1] = completion_tokens
        prompt_tokens = len(self.job.prompt_ids)
        return {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        }

    async def whole(self) -> JSONResponse:
        n = self.parsed.n
        texts, finished = [""] * n, {}
        while len(finished) < n:
            event = await self.next_event()
            if isinstance(event, Failed):
                raise APIError(event.status, event.message)
            texts[event.index] += event.text
            if isinstance(event, Finished):
                finished[event.index] = event
        choices = []
        for index in range(n):
            text, calls, reason = texts[index], [], finished[index].reason
            if self.tools is not None:
                text, calls, reason = self.tools.read(text, reason)
            choices.append(self.shape.whole_choice(index, text, reason, calls))
        return JSONResponse(self.body(choices, chunk=False, usage=self.usage(finished)))

    async def chunks(self, first: Event) -> AsyncIterator[str]:
        def sse(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        try:
            if self.shape.chat:  # chat streams start with the role, once per choice
                for index in range(self.parsed.n):
                    role = {"index": index, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                    yield sse(self.body([{**role, "logprobs": None}], chunk=True))
            finished: dict[int, Finished] = {}
            held = [""] * self.parsed.n  # with tools, each answer is held until it is known to be calls or text
            event = first
            while True:
                if isinstance(event, Failed):  # after the 200: the openai client raises on an `error` chunk
                    yield sse(APIError(event.status, event.message).body())
                    return
                if self.tools is not None:
                    held[event.index] += event.text
                elif event.text:
                    yield sse(self.body([self.shape.chunk_choice(event.index, event.text)], chunk=True))
                if isinstance(event, Finished):
                    finished[event.index] = event
                    reason = event.reason
                    if self.tools is not None:
                        text, calls, reason = self.tools.read(held[event.index], reason)
                        delta: dict[str, Any] = {"content": text} if text else {}
                        if calls:
                            delta["tool_calls"] = [call.as_openai(number) for number, call in enumerate(calls)]
                        if delta:
                            choice = {"index": event.index, "delta": delta, "finish_reason": None, "logprobs": None}
                            yield sse(self.body([choice], chunk=True))
                    yield sse(self.body([self.shape.chunk_choice(event.index, "", reason)], chunk=True))
                    if len(finished) == self.parsed.n:
                        break
                event = await self.next_event()
            usage = self.usage(finished)
            if self.parsed.stream_options is not None and self.parsed.stream_options.include_usage:
                yield sse(self.body([], chunk=True, usage=usage))
            yield "data: [DONE]\n\n"
        except APIError as error:  # raised while waiting: the client has gone or the worker timed out
            yield sse(error.body())
        finally:
            self.job.cancelled.set()  # a client that went away stops its rows at the next decoding step


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": "1"} if error.status == 429 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class CheckKeyAndLog:
    """ASGI wrapper: an id and one access line per request; the API key on every `/v1` path."""

    def __init__(self, app: Any, api_key: str | None, logger: logging.Logger = log):
        self.app, self.logger = app, logger
        self.expected = f"Bearer {api_key}".encode() if api_key else None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        state["request_id"] = uuid.uuid4().hex[:12]
        state["tokens"] = [0, 0]
        started, status = time.perf_counter(), [0]

        async def record_status(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and scope["path"].startswith("/v1") and not self._authorized(scope):
                error = APIError(401, "a valid API key is required: send `Authorization: Bearer <key>`")
                await error_response(error)(scope, receive, record_status)
            else:
                await self.app(scope, receive, record_status)
        finally:
            tokens_in, tokens_out = state["tokens"]
            user = f" user={state['user']}" if "user" in state else ""
            self.logger.info(
                "%s %s %s %d in=%d out=%d %.0fms%s",
                state["request_id"],
                scope["method"],
                scope["path"],
                status[0],
                tokens_in,
                tokens_out,
                1000 * (time.perf_counter() - started),
                user,
            )

    def _authorized(self, scope: dict[str, Any]) -> bool:
        given = dict(scope["headers"]).get(b"authorization", b"")
        return secrets.compare_digest(given, self.expected)
