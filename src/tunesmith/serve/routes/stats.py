"""``GET /v1/stats``: what the engine has done, for an operator (admin keys only).

Prefix-cache hits and misses say which prompts share a head; over many clients they also say which
clients' prompts began alike, which is why no user or rater may read them (docs/serving.md, the
prefix cache's side channel). The figures are counters since the server started, read without a lock:
each is a plain integer that only the scheduler's thread writes.
"""

from __future__ import annotations

from fastapi import APIRouter

from tunesmith.serve.context import Ctx

router = APIRouter(prefix="/v1")


@router.get("/stats")
async def stats(ctx: Ctx):
    scheduler = ctx.scheduler
    return {"object": "tunesmith.stats", "in_flight": ctx.inflight, "queued": scheduler.queue.qsize(),
            "max_batch": scheduler.max_batch, **scheduler.stats()}
