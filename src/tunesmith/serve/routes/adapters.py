"""vLLM's routes to load a run's adapter into the pool while serving, and to unload it (admin keys:
both change what every client is answered by). Each is logged with the key id that asked."""

from __future__ import annotations

import logging

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from tunesmith.serve.access import KeyId
from tunesmith.serve.context import Ctx
from tunesmith.serve.openmp import awaited
from tunesmith.serve.schemas import LoadAdapter, UnloadAdapter

router = APIRouter(prefix="/v1")
log = logging.getLogger(__name__)


@router.post("/load_lora_adapter")
async def load_adapter(body: LoadAdapter, ctx: Ctx, key_id: KeyId):
    await awaited(ctx.pool.load, body.lora_name, body.lora_path)  # serve/openmp.py
    log.info("adapter %s loaded from %s (key %s)", body.lora_name, body.lora_path, key_id)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapter, ctx: Ctx, key_id: KeyId):
    await run_in_threadpool(ctx.pool.unload, body.lora_name)
    log.info("adapter %s unloaded (key %s)", body.lora_name, key_id)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
