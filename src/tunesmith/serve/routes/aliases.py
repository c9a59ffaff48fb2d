"""``/v1/aliases``: point an alias at a loaded adapter, live, so clients of the alias move with it
(admin keys; logged with the key id that asked)."""

from __future__ import annotations

import logging

from fastapi import APIRouter

from tunesmith.serve.access import KeyId
from tunesmith.serve.context import Ctx
from tunesmith.serve.schemas import SetAlias

router = APIRouter(prefix="/v1")
log = logging.getLogger(__name__)


@router.post("/aliases")
async def set_alias(body: SetAlias, ctx: Ctx, key_id: KeyId):
    ctx.pool.set_alias(body.alias, body.model)
    log.info("alias %s -> %s (key %s)", body.alias, body.model, key_id)
    return {"alias": body.alias, "model": body.model}
