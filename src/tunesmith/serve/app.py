"""The OpenAI-compatible routes, on FastAPI.

``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events in the chunk format
of the OpenAI API, or whole), ``/v1/models``, ``/health``; vLLM's ``/v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``; ``/v1/aliases`` to point a name at an adapter live; ``/v1/feedback`` to
rate a logged answer. With an alias file, requests and ``/v1/models`` first pick up its changes. Errors have the OpenAI shape, ``{"error": {"message", "type", "param",
"code"}}``, so the ``openai`` client raises its own exception for each status.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Literal

from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from tunesmith.errors import TunesmithError
from tunesmith.serve.adapters import AdapterPool
from tunesmith.serve.aliases import AliasFile
from tunesmith.serve.engine import BASE, Event, Job, Sampling, Scheduler
from tunesmith.serve.keys import check_key
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.requestlog import RequestLog

KINDS = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
         413: "invalid_request_error", 429: "rate_limit_error", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": KINDS.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


# Requests. Unknown OpenAI fields are ignored; fields that would change the answer and that the
# server does not do (n > 1) are refused.
class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: dict | None = None
    n: int = Field(1, ge=1, le=1)


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):  # content parts: only text ones mean anything here
            return "".join(part.get("text", "") for part in self.content if part.get("type") == "text")
        return self.content or ""


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Request):
    prompt: str | list[str]


class LoadAdapter(BaseModel):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")  # vLLM's lora_int_id
    lora_name: str = Field(min_length=1)


class SetAlias(BaseModel):
    alias: str = Field(min_length=1)
    model: str = Field(min_length=1)


class Feedback(BaseModel):
    id: str
    score: float | None = None
    thumbs: Literal["up", "down"] | bool | None = None
    label: str | None = None
    comment: str = ""


class BodyLimit:
    """413 for a request body over ``limit`` bytes, by its Content-Length or as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:
                # Answer now, and tell the app the client has gone, so it stops reading and its reply is dropped.
                refused = True
                await self._refuse(send)
            return {"type": "http.disconnect"} if refused else message

        async def muted(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, muted)

    async def _refuse(self, send):
        body = json.dumps(error_body(413, f"request body over {self.limit} bytes")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def build_app(pool: AdapterPool, scheduler: Scheduler, options: ServeOptions, keys: dict[str, str],
              request_log: RequestLog | None, alias_file: AliasFile | None = None) -> FastAPI:
    """The server's routes on ``pool``; the caller starts and stops ``scheduler``."""
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.inflight = 0
    tokenizer = pool.tokenizer
    max_positions = getattr(pool.model.config, "max_position_embeddings", None)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(error_body(err.status, err.message, err.param), err.status, headers=err.headers)

    @app.exception_handler(TunesmithError)
    async def user_error(request, err: TunesmithError):
        return JSONResponse(error_body(400, "; ".join(err.problems)), 400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(error_body(400, f"{where}: {first['msg']}", where), 400)

    def caller(request: Request) -> str:
        if not keys:
            return "local"
        key_id = check_key(keys, request.headers.get("authorization"))
        if key_id is None:
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer KEY)",
                           headers={"WWW-Authenticate": "Bearer"})
        return key_id

    async def follow_alias_file() -> None:
        # Checked before a model name is read, so the request after a promotion sees it (within
        # alias_file.every_s); a changed file may load an adapter, which is no work for the event loop.
        if alias_file is not None and alias_file.due():
            await run_in_threadpool(alias_file.refresh)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": pool.base_name, "adapters": len(pool.adapters)}

    @app.get("/v1/models")
    async def models(key_id: str = Depends(caller)):
        await follow_alias_file()
        return {"object": "list", "data": pool.models()}

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapter, key_id: str = Depends(caller)):
        await run_in_threadpool(pool.load, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapter, key_id: str = Depends(caller)):
        await run_in_threadpool(pool.unload, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/aliases")
    async def set_alias(body: SetAlias, key_id: str = Depends(caller)):
        pool.set_alias(body.alias, body.model)
        return {"alias": body.alias, "model": body.model}

    @app.post("/v1/feedback")
    async def feedback(body: Feedback, key_id: str = Depends(caller)):
        if request_log is None:
            raise ApiError(400, "this server keeps no request log")
        if body.thumbs is not None and body.score is not None:
            raise ApiError(400, "give a score or thumbs, not both", "thumbs")
        score = body.score
        if body.thumbs is not None:
            score = 1.0 if body.thumbs in ("up", True) else 0.0
        if score is None and body.label is None:
            raise ApiError(400, "a rating needs a score, thumbs or a label")
        if not await run_in_threadpool(request_log.has_answer, body.id):
            raise ApiError(404, f"no logged completion with id {body.id!r}", "id")
        rating = await run_in_threadpool(lambda: request_log.rate(
            body.id, rater=key_id, score=score, label=body.label, comment=body.comment))
        return {"id": rating, "answer_id": body.id, "score": score, "label": body.label}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, key_id: str = Depends(caller)):
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"model {pool.base_name!r} has no chat template; use /v1/completions")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        user = [m["content"] for m in messages if m["role"] == "user"]
        meta = {"messages": messages} if len(messages) > 1 else {}
        limit = body.max_completion_tokens or body.max_tokens
        return await complete(body, "chat", ids, user[-1] if user else text, meta, limit, key_id)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, key_id: str = Depends(caller)):
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt: one prompt per request", "prompt")
            prompt = prompt[0]
        ids = tokenizer(prompt).input_ids
        return await complete(body, "completions", ids, prompt, {}, body.max_tokens, key_id)

    async def complete(body: _Request, route: str, ids: list[int], prompt: str, meta: dict,
                       max_tokens: int | None, key_id: str):
        await follow_alias_file()
        adapter = pool.resolve(body.model)
        if adapter is None:
            raise ApiError(404, f"the model {body.model!r} does not exist (see /v1/models)", "model")
        sampling = _sampling(body, max_tokens, len(ids))
        if app.state.inflight >= options.max_concurrent:
            raise ApiError(429, f"over {options.max_concurrent} requests in flight; retry later",
                           headers={"Retry-After": str(options.retry_after_s)})
        # Claimed until decoded: a promotion that moves an alias meanwhile does not unload it.
        adapter = pool.claim(body.model)
        if adapter is None:  # an alias taken away since
            raise ApiError(404, f"the model {body.model!r} does not exist (see /v1/models)", "model")
        app.state.inflight += 1
        started = time.perf_counter()
        events: asyncio.Queue[Event] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        def emit(event: Event) -> None:
            if not loop.is_closed():  # a server shutting down has no one left to tell
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(adapter, ids, sampling, emit=emit)
        scheduler.submit(job)
        completion_id = ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex
        created = int(time.time())
        meta = {"key_id": key_id, "route": route, "model": body.model, "temperature": sampling.temperature,
                "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": sampling.seed, **meta}

        async def finished(answer: str, done: Event):
            if request_log is not None:
                await run_in_threadpool(lambda: request_log.answer(
                    id=completion_id, run=pool.base_name if adapter == BASE else adapter,
                    prompt=prompt, answer=answer, prompt_tokens=len(ids),
                    completion_tokens=done.completion_tokens,
                    latency_ms=(time.perf_counter() - started) * 1000, meta=meta))

        def usage(done: Event) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": done.completion_tokens,
                    "total_tokens": len(ids) + done.completion_tokens}

        if body.stream:
            chunks = _stream(events, job, route, completion_id, created, body, finished, usage)

            async def release_after():
                try:
                    async for chunk in chunks:
                        yield chunk
                finally:
                    job.cancelled.set()  # a client that hung up frees its row
                    app.state.inflight -= 1

            return StreamingResponse(release_after(), media_type="text/event-stream")
        try:
            pieces = []
            while (event := await events.get()).kind == "text":
                pieces.append(event.text)
        finally:
            app.state.inflight -= 1
        if event.kind == "error":
            raise ApiError(500, event.text)
        answer = "".join(pieces)
        await finished(answer, event)
        if route == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": answer},
                      "finish_reason": event.finish_reason, "logprobs": None}
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": answer, "finish_reason": event.finish_reason, "logprobs": None}
            kind = "text_completion"
        return {"id": completion_id, "object": kind, "created": created, "model": body.model,
                "choices": [choice], "usage": usage(event)}

    def _sampling(body: _Request, max_tokens: int | None, prompt_tokens: int) -> Sampling:
        if prompt_tokens == 0:
            raise ApiError(400, "the prompt is empty", "prompt")
        if prompt_tokens > options.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; this server takes at most "
                           f"{options.max_prompt_tokens}", "prompt")
        if max_tokens is not None and max_tokens > options.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's cap of {options.max_tokens}",
                           "max_tokens")
        max_tokens = max_tokens or options.default_max_tokens
        if max_positions is not None and prompt_tokens + max_tokens > max_positions:
            if max_tokens == options.default_max_tokens:
                max_tokens = max(max_positions - prompt_tokens, 1)
            else:
                raise ApiError(400, f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over "
                               f"the model's context of {max_positions}", "max_tokens")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                        stop=[s for s in stops if s], seed=body.seed)

    return app


async def _stream(events: asyncio.Queue, job: Job, route: str, completion_id: str, created: int,
                  body: _Request, finished, usage) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    kind = "chat.completion.chunk" if route == "chat" else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        payload = {"id": completion_id, "object": kind, "created": created, "model": body.model,
                   "choices": choices, **extra}
        return f"data: {json.dumps(payload)}\n\n"

    def choice(text: str | None, finish_reason: str | None = None) -> dict:
        if route == "chat":
            delta = {} if text is None else {"content": text}
            return {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        return {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}

    if route == "chat":
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None}])
    pieces = []
    while (event := await events.get()).kind == "text":
        pieces.append(event.text)
        yield chunk([choice(event.text)])
    if event.kind == "error":
        yield f"data: {json.dumps(error_body(500, event.text))}\n\n"
        return
    await finished("".join(pieces), event)
    yield chunk([choice(None, event.finish_reason)])
    if (body.stream_options or {}).get("include_usage"):
        yield chunk([], usage=usage(event))
    yield "data: [DONE]\n\n"
