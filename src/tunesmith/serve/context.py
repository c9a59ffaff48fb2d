"""What the server's routers share, and the FastAPI dependency that hands it to them.

``build_app`` puts one ``ServeContext`` on ``app.state.serve``; a route asks for it (``Ctx``) and for
its caller (``access.Caller`` or ``access.KeyId``) as parameters, so each router is a module of plain
functions that a test can call on any app carrying a context, and the key check is one dependency
(``access.authorize``), not a line in every route.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from tunesmith.serve.access import Access
from tunesmith.serve.adapters import AdapterPool
from tunesmith.serve.aliases import AliasFile
from tunesmith.serve.engine import Scheduler
from tunesmith.serve.openmp import awaited
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.requestlog import RequestLog
from tunesmith.serve.scorers import ScorerPool


@dataclass
class ServeContext:
    pool: AdapterPool
    scheduler: Scheduler
    options: ServeOptions
    access: Access  # the server's own, so a key added to it applies at once
    request_log: RequestLog | None
    alias_file: AliasFile | None = None
    scorers: ScorerPool = field(default_factory=ScorerPool)  # runs served to score texts (/v1/score)
    inflight: int = 0  # requests between their submission and their last token (429 past the cap)

    async def follow_alias_file(self) -> None:
        """Apply the alias file's changes, if it is due for a look.

        Called before a model name is read, so the request after a promotion sees it (within
        ``alias_file.every_s``); a changed file may load an adapter, which is no work for the event loop.
        """
        if self.alias_file is not None and self.alias_file.due():
            await awaited(self.alias_file.refresh)  # serve/openmp.py says why apart


def context(request: Request) -> ServeContext:
    return request.app.state.serve


Ctx = Annotated[ServeContext, Depends(context)]
