"""The UI on the server's own FastAPI app: ``add_ui`` adds the JSON API (``/ui/api/...``), the static
files (``/ui/static/<file>``) and the pages (``/ui/`` is the runs table, ``/ui/<page>`` is
``static/<page>.html``), so the chat and rate pages call the same ``/v1`` routes, behind the same keys,
as any client of ``tunesmith serve``. Who may call each route is in ``serve.access.ROUTES``, one table
for the server's routes and the UI's.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from tunesmith.errors import TunesmithError
from tunesmith.serve.errors import ApiError
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.server import build_server

STATIC = Path(__file__).parent / "static"


@dataclass
class UiContext:
    runs_dir: Path  # the runs the UI lists, and where it launches new ones
    store_path: Path  # the SQLite store of answers and ratings
    examples_dir: Path  # example configs offered by the launch page
    prompts: list[str] = field(default_factory=list)  # the rate page's (--prompts); none: the store's
    # Processes started from the launch page, by run name: their exit status is read from here.
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)


def add_ui(app: FastAPI, ctx: UiContext) -> None:
    """Add the UI's routes and pages to ``app`` (the app of ``serve.app.build_app``)."""
    from tunesmith.ui import launch, rate, runs

    app.state.ui = ctx
    app.include_router(runs.router)
    app.include_router(launch.router)
    app.include_router(rate.router)
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/", include_in_schema=False)
    @app.get("/ui", include_in_schema=False)
    async def home():
        return RedirectResponse("/ui/")

    @app.get("/ui/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    @app.get("/ui/{page}", include_in_schema=False)
    async def page(page: str):
        path = STATIC / f"{page}.html"
        if not page.isidentifier() or not path.is_file():
            raise ApiError(404, f"no page {page!r}")
        return FileResponse(path)


def servable_runs(runs_dir: Path, limit: int) -> dict[str, Path]:
    """Up to ``limit`` complete LoRA runs under ``runs_dir`` on the first such run's base model, by
    name (their path under ``runs_dir``): what ``tunesmith ui`` serves when given no runs."""
    from tunesmith.serve.adapters import read_run
    from tunesmith.ui.runs import find_runs

    found, base = {}, None
    for path in find_runs(runs_dir):
        try:
            adapter = read_run(path)
        except TunesmithError:  # not a LoRA causal run, or not finished: listed, not served
            continue
        if adapter.run.status() != "complete" or base not in (None, adapter.source):
            continue
        base = adapter.source
        found[str(path.relative_to(runs_dir))] = path
        if len(found) == limit:
            break
    return found


def build_ui_server(ctx: UiContext, runs: dict[str, Path], base: str | None = None,
                    options: ServeOptions | None = None, **serve):
    """``tunesmith serve``'s server on ``runs`` (default: the servable runs under the runs directory),
    with the UI added to its app and the runs directory open to ``/v1/load_lora_adapter``; ``serve``
    holds ``build_server``'s other arguments (``access``: the keys of each role)."""
    options = options or ServeOptions()
    runs = runs or servable_runs(ctx.runs_dir, options.max_adapters)
    if not runs and base is None:
        raise TunesmithError(f"ui: no finished LoRA run in {ctx.runs_dir} to take the base model from; "
                             "give the base model with --base")
    server = build_server(runs, base=base, adapter_dirs=[ctx.runs_dir], options=options,
                          store=ctx.store_path, **serve)
    server.extensions.append(lambda app: add_ui(app, ctx))
    return server
