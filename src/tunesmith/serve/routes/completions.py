"""Inference: ``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events in the
chunk format of the OpenAI API, or whole), ``/v1/models`` and ``/health``.

With an alias file, requests and ``/v1/models`` first pick up its changes.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunesmith.serve.access import KeyId
from tunesmith.serve.context import Ctx, ServeContext
from tunesmith.serve.engine import BASE, Event, Job, Sampling
from tunesmith.serve.errors import ApiError, error_body
from tunesmith.serve.schemas import ChatRequest, CompletionRequest, SamplingRequest

router = APIRouter()


@router.get("/health")
async def health(ctx: Ctx):
    return {"status": "ok", "model": ctx.pool.base_name, "adapters": len(ctx.pool.adapters)}


@router.get("/v1/models")
async def models(ctx: Ctx):
    await ctx.follow_alias_file()
    return {"object": "list", "data": ctx.pool.models()}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, ctx: Ctx, key_id: KeyId):
    tokenizer = ctx.pool.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {ctx.pool.base_name!r} has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    user = [m["content"] for m in messages if m["role"] == "user"]
    meta = {"messages": messages} if len(messages) > 1 else {}
    limit = body.max_completion_tokens or body.max_tokens
    return await complete(ctx, body, "chat", ids, user[-1] if user else text, meta, limit, key_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, ctx: Ctx, key_id: KeyId):
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise ApiError(400, "prompt: one prompt per request", "prompt")
        prompt = prompt[0]
    ids = ctx.pool.tokenizer(prompt).input_ids
    return await complete(ctx, body, "completions", ids, prompt, {}, body.max_tokens, key_id)


async def complete(ctx: ServeContext, body: SamplingRequest, route: str, ids: list[int], prompt: str, meta: dict,
                   max_tokens: int | None, key_id: str):
    """Queue one request for the scheduler and answer it, whole or streamed; log the answer."""
    pool, options = ctx.pool, ctx.options
    await ctx.follow_alias_file()
    adapter = pool.resolve(body.model)
    if adapter is None:
        raise ApiError(404, f"the model {body.model!r} does not exist (see /v1/models)", "model")
    sampling = _sampling(ctx, body, max_tokens, len(ids))
    if ctx.inflight >= options.max_concurrent:
        raise ApiError(429, f"over {options.max_concurrent} requests in flight; retry later",
                       headers={"Retry-After": str(options.retry_after_s)})
    # Claimed until decoded: a promotion that moves an alias meanwhile does not unload it.
    adapter = pool.claim(body.model)
    if adapter is None:  # an alias taken away since
        raise ApiError(404, f"the model {body.model!r} does not exist (see /v1/models)", "model")
    ctx.inflight += 1
    started = time.perf_counter()
    events: asyncio.Queue[Event] = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        if not loop.is_closed():  # a server shutting down has no one left to tell
            loop.call_soon_threadsafe(events.put_nowait, event)

    job = Job(adapter, ids, sampling, emit=emit)
    ctx.scheduler.submit(job)
    completion_id = ("chatcmpl-" if route == "chat" else "cmpl-") + uuid.uuid4().hex
    created = int(time.time())
    meta = {"key_id": key_id, "route": route, "model": body.model, "temperature": sampling.temperature,
            "top_p": sampling.top_p, "max_tokens": sampling.max_tokens, "seed": sampling.seed, **meta}

    async def finished(answer: str, done: Event):
        request_log = ctx.request_log
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
                ctx.inflight -= 1

        return StreamingResponse(release_after(), media_type="text/event-stream")
    try:
        pieces = []
        while (event := await events.get()).kind == "text":
            pieces.append(event.text)
    finally:
        ctx.inflight -= 1
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


def _sampling(ctx: ServeContext, body: SamplingRequest, max_tokens: int | None, prompt_tokens: int) -> Sampling:
    options = ctx.options
    max_positions = getattr(ctx.pool.model.config, "max_position_embeddings", None)
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


async def _stream(events: asyncio.Queue, job: Job, route: str, completion_id: str, created: int,
                  body: SamplingRequest, finished, usage) -> AsyncIterator[str]:
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
