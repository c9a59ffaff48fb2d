"""The OpenAI-compatible server's FastAPI app, assembled from its routers (``serve/routes/``).

``/v1/chat/completions``, ``/v1/completions``, ``/v1/models`` and ``/health``; vLLM's
``/v1/load_lora_adapter`` and ``/v1/unload_lora_adapter``; ``/v1/aliases`` to point a name at an
adapter live; ``/v1/feedback`` to rate a logged answer; ``/v1/score`` to score texts by a served
reward model or classifier; ``/v1/stats``, the engine's counters (admin). Every route, those the UI adds included,
passes ``access.authorize`` first: the caller's role against the route's row of ``access.ROUTES``.
Before any route, ``middleware.py`` caps the body and refuses what a web page in the user's browser
could send unasked (CSRF, DNS rebinding). Errors have the OpenAI shape (``serve/errors.py``), so the
``openai`` client raises its own exception for each status.
"""

from __future__ import annotations

from fastapi import Depends, FastAPI

from tunesmith.serve.access import Access, authorize
from tunesmith.serve.adapters import AdapterPool
from tunesmith.serve.aliases import AliasFile
from tunesmith.serve.context import ServeContext
from tunesmith.serve.engine import Scheduler
from tunesmith.serve.errors import add_error_handlers
from tunesmith.serve.middleware import BodyLimit, BrowserGuard
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.requestlog import RequestLog
from tunesmith.serve.routes import adapters, aliases, completions, feedback, scores, stats
from tunesmith.serve.scorers import ScorerPool


def build_app(pool: AdapterPool, scheduler: Scheduler, options: ServeOptions, access: Access,
              request_log: RequestLog | None, alias_file: AliasFile | None = None,
              scorers: ScorerPool | None = None) -> FastAPI:
    """The server's app on ``pool``, its routes behind the access table and the middleware; the
    caller starts and stops ``scheduler``.

    ``access`` is held, not copied: a key added to or removed from it applies to the next request.
    """
    app = FastAPI(title="tunesmith", docs_url=None, redoc_url=None, openapi_url=None,
                  dependencies=[Depends(authorize)])  # on every route, those added later included
    app.state.serve = ServeContext(pool, scheduler, options, access, request_log, alias_file,
                                   scorers or ScorerPool())
    add_error_handlers(app)
    app.add_middleware(BrowserGuard, access=access)
    app.add_middleware(BodyLimit, limit=options.max_body_bytes)  # added last: the outermost
    for group in (completions, adapters, aliases, feedback, scores, stats):
        app.include_router(group.router)
    return app
