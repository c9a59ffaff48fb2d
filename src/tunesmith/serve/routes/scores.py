"""``/v1/score``: texts scored by a served run that scores (a reward model's scalar, a classifier's
probability of a label, with each label's probability and the label its decision rule chooses;
``serve.scorers``), each field checked at the edge (``schemas.ScoreRequest``)."""

from __future__ import annotations

from fastapi import APIRouter

from tunesmith.serve.context import Ctx
from tunesmith.serve.errors import ApiError
from tunesmith.serve.openmp import awaited
from tunesmith.serve.schemas import ScoreRequest

router = APIRouter(prefix="/v1")


@router.post("/score")
async def score(body: ScoreRequest, ctx: Ctx):
    if body.model not in ctx.scorers.scorers:
        raise ApiError(404, f"the model {body.model!r} is not a served scorer (see /v1/models: those with "
                       "'scores')", "model")
    # In a thread that ends with it: a thread-pool thread would keep an OpenMP pool (serve/openmp.py).
    scored = await awaited(ctx.scorers.score, body.model, body.input, body.prompt)
    classifier = ctx.scorers.classifiers.get(body.model)
    return {"object": "list", "model": body.model, "scores": ctx.scorers.scorers[body.model].what,
            **({"decision": classifier.rule} if classifier else {}),
            "data": [{"object": "score", "index": i, **s} for i, s in enumerate(scored)]}
