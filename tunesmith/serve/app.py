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

from tunesmith.serve.batcher import Batcher, Event, Failed, Finished, Job, QueueFull, Sampling
from tunesmith.serve.protocol import APIError, ChatCompletionRequest, parse_chat_request

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
    retry_after_s: int = 1


@dataclass
class Engine:
    """What the routes need from the model: a prompt renderer, a tokenizer and the batcher."""

    render: Callable[[list[dict[str, str]]], str]
    tokenizer: Any
    batcher: Batcher


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
        if chat.model != settings.model_name:
            raise APIError(404, f"model `{chat.model}` is not served here; use `{settings.model_name}`", "model")
        prompt_ids = encode_prompt(engine, chat)
        if settings.log_prompts:
            log.info("%s prompt: %r", request.state.request_id, engine.tokenizer.decode(prompt_ids))
        sampling = choose_sampling(chat, settings, len(prompt_ids))
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        job = Job(
            prompt_ids,
            sampling,
            chat.n,
            deliver=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            deadline=time.monotonic() + settings.request_timeout_s,
        )
        try:
            engine.batcher.submit(job)
        except QueueFull:
            raise APIError(
                429, "the server is busy: too many requests are queued; retry shortly", code="queue_full"
            ) from None
        request.state.tokens = [len(prompt_ids), 0]
        if chat.user is not None:
            request.state.user = chat.user
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            # The first event decides the status: a failure before any text is an error response, not a 200.
            first = await next_event(events, job, request, settings)
            if isinstance(first, Failed):
                raise APIError(first.status, first.message)
            stream = stream_chunks(first, events, job, chat, settings, completion_id, request)
            return StreamingResponse(stream, media_type="text/event-stream")
        return await whole_answer(events, job, chat, settings, completion_id, request)

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


def encode_prompt(engine: Engine, chat: ChatCompletionRequest) -> list[int]:
    messages = [message.as_template_message() for message in chat.messages]
    try:
        text = engine.render(messages)
    except jinja2.TemplateError as error:  # the chat template refused these messages (e.g. roles out of order)
        raise APIError(400, f"the model's chat template cannot render these messages: {error}", "messages") from None
    # The rendered text already holds any BOS the template wants; adding special tokens would double it.
    return engine.tokenizer(text, add_special_tokens=False)["input_ids"]


def choose_sampling(chat: ChatCompletionRequest, settings: ServeSettings, prompt_tokens: int) -> Sampling:
    room = settings.context_length - prompt_tokens
    if room < 1:
        raise APIError(
            400,
            f"the prompt has {prompt_tokens} tokens; this model's context is {settings.context_length} tokens",
            "messages",
            "context_length_exceeded",
        )
    requested = chat.token_limit()
    param = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
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
        temperature=chat.temperature if chat.temperature is not None else default.temperature,
        top_p=chat.top_p if chat.top_p is not None else default.top_p,
        top_k=default.top_k,
        repetition_penalty=default.repetition_penalty,
        seed=chat.seed,
        stop=tuple(chat.stop_strings()),
    )


async def next_event(events: asyncio.Queue[Event], job: Job, request: Request, settings: ServeSettings) -> Event:
    """The job's next event; cancels the job if the client disconnects while waiting."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                raise APIError(400, "the client disconnected") from None
            if time.monotonic() > job.deadline + 5:  # the worker is stuck behind a long batch
                job.cancelled.set()
                raise APIError(504, "the request timed out waiting for the generation worker") from None


async def whole_answer(
    events: asyncio.Queue[Event],
    job: Job,
    chat: ChatCompletionRequest,
    settings: ServeSettings,
    completion_id: str,
    request: Request,
) -> JSONResponse:
    texts, finished = [""] * chat.n, {}
    while len(finished) < chat.n:
        event = await next_event(events, job, request, settings)
        if isinstance(event, Failed):
            raise APIError(event.status, event.message)
        texts[event.index] += event.text
        if isinstance(event, Finished):
            finished[event.index] = event
    completion_tokens = sum(event.completion_tokens for event in finished.values())
    request.state.tokens[1] = completion_tokens
    prompt_tokens = len(job.prompt_ids)
    return JSONResponse(
        {
            "id": completion_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": settings.model_name,
            "choices": [
                {
                    "index": index,
                    "message": {"role": "assistant", "content": texts[index]},
                    "finish_reason": finished[index].reason,
                    "logprobs": None,
                }
                for index in range(chat.n)
            ],
            "usage": usage(prompt_tokens, completion_tokens),
        }
    )


async def stream_chunks(
    first: Event,
    events: asyncio.Queue[Event],
    job: Job,
    chat: ChatCompletionRequest,
    settings: ServeSettings,
    completion_id: str,
    request: Request,
) -> AsyncIterator[str]:
    created = int(time.time())

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": settings.model_name,
            "choices": choices,
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    def choice(index: int, delta: dict[str, str], reason: str | None = None) -> dict[str, Any]:
        return {"index": index, "delta": delta, "finish_reason": reason, "logprobs": None}

    try:
        for index in range(chat.n):
            yield chunk([choice(index, {"role": "assistant", "content": ""})])
        finished: dict[int, Finished] = {}
        event = first
        while True:
            if isinstance(event, Failed):  # after the 200: the openai client raises on an `error` chunk
                yield f"data: {json.dumps(APIError(event.status, event.message).body())}\n\n"
                return
            if event.text:
                yield chunk([choice(event.index, {"content": event.text})])
            if isinstance(event, Finished):
                finished[event.index] = event
                yield chunk([choice(event.index, {}, event.reason)])
                if len(finished) == chat.n:
                    break
            event = await next_event(events, job, request, settings)
        completion_tokens = sum(event.completion_tokens for event in finished.values())
        request.state.tokens[1] = completion_tokens
        if chat.stream_options is not None and chat.stream_options.include_usage:
            yield chunk([], usage=usage(len(job.prompt_ids), completion_tokens))
        yield "data: [DONE]\n\n"
    except APIError as error:  # raised while waiting: the client has gone or the worker timed out
        yield f"data: {json.dumps(error.body())}\n\n"
    finally:
        job.cancelled.set()  # a client that went away stops its rows at the next decoding step


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


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
