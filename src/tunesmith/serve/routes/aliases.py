"""``/v1/aliases``: point an alias at a loaded adapter, live, so clients of the alias move with it."""

from __future__ import annotations

from fastapi import APIRouter

from tunesmith.serve.context import Caller, Ctx
from tunesmith.serve.schemas import SetAlias

router = APIRouter(prefix="/v1")


@router.post("/aliases")
async def set_alias(body: SetAlias, ctx: Ctx, key_id: Caller):
    ctx.pool.set_alias(body.alias, body.model)
    return {"alias": body.alias, "model": body.model}
