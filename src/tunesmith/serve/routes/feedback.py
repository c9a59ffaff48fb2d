"""``/v1/feedback``: a rating (score, thumbs or label) of an answer in the request log.

A user key rates only the answers served to it: a rating becomes training data (``retrain``), so a
client must not be able to rate what others were answered. Admin keys may rate any answer."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool

from tunesmith.serve.access import ADMIN, Caller
from tunesmith.serve.context import Ctx
from tunesmith.serve.errors import ApiError
from tunesmith.serve.schemas import Feedback

router = APIRouter(prefix="/v1")


@router.post("/feedback")
async def feedback(body: Feedback, ctx: Ctx, caller: Caller):
    request_log = ctx.request_log
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
    if caller.role != ADMIN and await run_in_threadpool(request_log.served_to, body.id) != caller.key_id:
        raise ApiError(403, f"completion {body.id!r} was not served to key {caller.key_id!r}; a {caller.role} "
                       "key rates only its own answers, an admin key any answer", "id")
    rating = await run_in_threadpool(lambda: request_log.rate(
        body.id, rater=caller.key_id, score=score, label=body.label, comment=body.comment))
    return {"id": rating, "answer_id": body.id, "score": score, "label": body.label}
