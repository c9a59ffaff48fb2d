"""The launch API: example configs to start from, and (admin only) starting, stopping and resuming
runs as ``tunesmith`` subprocesses."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from tunesmith.ui.access import require_admin

router = APIRouter(prefix="/ui/api/launch")


@router.get("/examples")
def examples(request: Request, key_id: str = Depends(require_admin)):
    """The example configs the launch page offers."""
    ctx = request.app.state.ui
    found = sorted(ctx.examples_dir.glob("*.yaml")) if ctx.examples_dir.is_dir() else []
    return {"examples": [{"name": p.name, "path": str(p)} for p in found]}
