"""vLLM's routes to load a run's adapter into the pool while serving, and to unload it."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import PlainTextResponse

from tunesmith.serve.context import Caller, Ctx
from tunesmith.serve.schemas import LoadAdapter, UnloadAdapter

router = APIRouter(prefix="/v1")


@router.post("/load_lora_adapter")
async def load_adapter(body: LoadAdapter, ctx: Ctx, key_id: Caller):
    await run_in_threadpool(ctx.pool.load, body.lora_name, body.lora_path)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/unload_lora_adapter")
async def unload_adapter(body: UnloadAdapter, ctx: Ctx, key_id: Caller):
    await run_in_threadpool(ctx.pool.unload, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
