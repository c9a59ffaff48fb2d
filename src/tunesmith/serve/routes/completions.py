"""Inference: ``/v1/chat/completions`` and ``/v1/completions`` (streamed as server-sent events in the
chunk format of the OpenAI API, or whole), ``/v1/models`` and ``/health``.

With an alias file, requests and ``/v1/models`` first pick up its changes. A request is checked
whole before it is queued (``schemas``, ``unsupported``); its ``n`` choices are one job for the
engine, which prefills the prompt once. A client that leaves before its answer cancels the job,
streamed or not, and the engine drops its rows.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from tunesmith.serve import structured
from tunesmith.serve.access import KeyId
from tunesmith.serve.context import Ctx, ServeContext
from tunesmith.serve.engine import BASE, Event, Job, Sampling, eos_ids
from tunesmith.serve.errors import ApiError, error_body
from tunesmith.serve.responses import Answer, Choices, chunk_choice
from tunesmith.serve.schemas import ChatRequest, CompletionRequest, SamplingRequest
from tunesmith.serve.unsupported import refused

router = APIRouter()


@router.get("/health")
async def health(ctx: Ctx):
    return {"status": "ok", "model": ctx.pool.base_name, "adapters": len(ctx.pool.adapters)}


@router.get("/v1/models")
async def models(ctx: Ctx):
    await ctx.follow_alias_file()
    return {"object": "list", "data": ctx.pool.models() + ctx.scorers.models()}


@router.post("/v1/chat/completions")
async def chat(body: ChatRequest, request: Request, ctx: Ctx, key_id: KeyId):
    _refuse_unsupported(body)
    tokenizer = ctx.pool.tokenizer
    messages = [{"role": m.role, "content": m.text()} for m in body.messages]
    if not getattr(tokenizer, "chat_template", None):
        raise ApiError(400, f"model {ctx.pool.base_name!r} has no chat template; use /v1/completions")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    user = [m["content"] for m in messages if m["role"] == "user"]
    meta = {"messages": messages} if len(messages) > 1 else {}
    limit = body.max_completion_tokens or body.max_tokens
    return await complete(ctx, request, body, "chat", ids, user[-1] if user else text, meta, limit, key_id)


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request, ctx: Ctx, key_id: KeyId):
    _refuse_unsupported(body)
    ids = ctx.pool.tokenizer(body.prompt).input_ids
    return await complete(ctx, request, body, "completions", ids, body.prompt, {}, body.max_tokens, key_id)


def _refuse_unsupported(body: SamplingRequest) -> None:
    problem = refused(body.model_extra)
    if problem is not None:
        raise ApiError(400, problem[1], problem[0])


async def complete(ctx: ServeContext, request: Request, body: SamplingRequest, route: str, ids: list[int],
                   prompt: str, meta: dict, max_tokens: int | None, key_id: str):
    """Queue one request for the scheduler and answer it, whole or streamed; log the answer."""
    pool, options = ctx.pool, ctx.options
    await ctx.follow_alias_file()
    adapter = pool.resolve(body.model)
    if adapter is None:
        raise ApiError(404, f"the model {body.model!r} does not exist (see /v1/models)", "model")
    sampling = _sampling(ctx, body, max_tokens, len(ids), await _grammar(ctx, body))
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
    answer = Answer(route, completion_id, created, body.model, sampling, len(ids), ctx.pool.tokenizer)

    async def finished(choices: Choices):
        """Log each choice: the first under the completion's id, choice i under ``ID-i``."""
        request_log = ctx.request_log
        if request_log is None:
            return
        latency_ms = (time.perf_counter() - started) * 1000
        for i, tokens in enumerate(choices.completion_tokens):
            await run_in_threadpool(lambda i=i, tokens=tokens: request_log.answer(
                id=completion_id if i == 0 else f"{completion_id}-{i}",
                run=pool.base_name if adapter == BASE else adapter, prompt=prompt, answer=choices.answer(i),
                prompt_tokens=len(ids), completion_tokens=tokens, latency_ms=latency_ms,
                meta={**meta, "choice": i} if sampling.n > 1 else meta))

    if body.stream:
        chunks = _stream(events, answer, finished, bool(body.stream_options and body.stream_options.include_usage))

        async def release_after():
            try:
                async for chunk in chunks:
                    yield chunk
            finally:
                job.cancelled.set()  # a client that hung up frees its rows
                ctx.inflight -= 1

        return StreamingResponse(release_after(), media_type="text/event-stream")
    watch = asyncio.create_task(_cancel_when_gone(request, job))
    try:
        choices = Choices(sampling.n)
        while not choices.done:
            event = await events.get()
            if event.kind == "error":
                raise ApiError(500, event.text)
            choices.add(event)
    finally:
        watch.cancel()
        job.cancelled.set()  # after an error, the other choices stop; after the answer, nothing is left
        ctx.inflight -= 1
    if choices.cancelled:  # no one to answer; an in-process caller (the rate page) must not use it either
        raise ApiError(499, "the client disconnected; the request was cancelled")
    await finished(choices)
    return answer.whole(choices)


async def _cancel_when_gone(request: Request, job: Job, every_s: float = 0.1) -> None:
    """Cancel ``job`` once the client of a non-streamed request has disconnected (a stream notices by itself)."""
    while not await request.is_disconnected():
        await asyncio.sleep(every_s)
    job.cancelled.set()


async def _grammar(ctx: ServeContext, body: SamplingRequest) -> str | None:
    """The request's ``response_format`` as a grammar, compiled off the event loop (a large schema can take
    a while); a schema that cannot be enforced is the client's 400, before anything is queued."""
    if structured.schema_of(body.response_format) is None:
        return None
    pool = ctx.pool
    try:
        return await run_in_threadpool(structured.grammar_for, body.response_format, pool.tokenizer,
                                       eos_ids(pool.model, pool.tokenizer))
    except ValueError as err:
        raise ApiError(400, f"response_format: {err}", "response_format") from None


def _sampling(ctx: ServeContext, body: SamplingRequest, max_tokens: int | None, prompt_tokens: int,
              grammar: str | None) -> Sampling:
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
    if body.n > options.max_batch:
        raise ApiError(400, f"n {body.n} is over this server's batch of {options.max_batch} rows", "n")
    max_tokens = max_tokens or options.default_max_tokens
    if max_positions is not None and prompt_tokens + max_tokens > max_positions:
        if max_tokens == options.default_max_tokens:
            max_tokens = max(max_positions - prompt_tokens, 1)
        else:
            raise ApiError(400, f"prompt ({prompt_tokens} tokens) plus max_tokens ({max_tokens}) is over "
                           f"the model's context of {max_positions}", "max_tokens")
    return Sampling(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, stop=body.stop,
                    seed=body.seed, logprobs=body.top_logprobs_wanted(), n=body.n, grammar=grammar)


async def _stream(events: asyncio.Queue, answer: Answer, finished, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in the OpenAI chunk format, ending with ``data: [DONE]``."""
    route, n = answer.route, answer.sampling.n
    if route == "chat":
        yield answer.chunk([chunk_choice(route, i, None, role=True) for i in range(n)])
    choices = Choices(n)
    while not choices.done:
        event = await events.get()
        if event.kind == "error":
            yield f"data: {json.dumps(error_body(500, event.text))}\n\n"
            return
        choices.add(event)
        logprobs = answer.logprobs(event.logprobs) if event.logprobs else None
        if event.kind == "text":
            yield answer.chunk([chunk_choice(route, event.index, event.text, logprobs=logprobs)])
        else:
            yield answer.chunk([chunk_choice(route, event.index, None, event.finish_reason, logprobs)])
    await finished(choices)
    if include_usage:
        yield answer.chunk([], usage=answer.usage(choices))
    yield "data: [DONE]\n\n"
