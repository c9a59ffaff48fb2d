"""``tunesmith serve``: the pool, the scheduler, the request log and the routes, put together and
run by uvicorn, in the foreground (the command) or on a thread (tests, the benchmark)."""

from __future__ import annotations

import contextlib
import functools
import logging
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.serve.access import Access
from tunesmith.serve.adapters import AdapterPool
from tunesmith.serve.aliases import AliasFile
from tunesmith.serve.app import build_app
from tunesmith.serve.engine import Caches, Scheduler
from tunesmith.serve.keys import check_binding
from tunesmith.serve.openmp import apart
from tunesmith.serve.options import ServeOptions
from tunesmith.serve.requestlog import RequestLog
from tunesmith.serve.scorers import ScorerPool, split_runs
from tunesmith.store import Run

log = logging.getLogger(__name__)


@dataclass
class Server:
    pool: AdapterPool
    scheduler: Scheduler
    request_log: RequestLog | None
    options: ServeOptions
    access: Access = field(default_factory=Access)  # no keys: open, on this machine only
    alias_file: AliasFile | None = None
    scorers: ScorerPool = field(default_factory=ScorerPool)
    # Called with the app before it serves: how ``tunesmith ui`` adds its pages to the same app.
    extensions: list[Callable] = field(default_factory=list)

    def asgi(self):
        """The ASGI application: ``build_app``'s, with the extensions' routes added."""
        app = build_app(self.pool, self.scheduler, self.options, self.access, self.request_log, self.alias_file,
                        self.scorers)
        for extend in self.extensions:
            extend(app)
        return app

    def run(self, host: str, port: int) -> None:
        """Serve in the foreground until interrupted."""
        import uvicorn

        check_binding(host, self.access.keys())
        self.scheduler.start()
        try:
            uvicorn.run(self.asgi(), host=host, port=port, log_level="warning", server_header=False)
        finally:
            self.close()

    @contextlib.contextmanager
    def in_thread(self, host: str = "127.0.0.1", port: int = 0):
        """Serve on a thread; yields the base URL (``http://host:port``)."""
        import uvicorn

        check_binding(host, self.access.keys())
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        server = uvicorn.Server(uvicorn.Config(self.asgi(), log_level="warning", server_header=False))
        self.scheduler.start()
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            while not server.started:
                if not thread.is_alive():
                    raise TunesmithError("serve: the server thread stopped before it started")
                thread.join(0.01)
            yield f"http://{host}:{sock.getsockname()[1]}"
        finally:
            server.should_exit = True
            thread.join(10)
            sock.close()
            self.close()

    def close(self) -> None:
        self.scheduler.stop()
        if self.request_log is not None:
            self.request_log.close()


def parse_runs(items: list[str]) -> dict[str, Path]:
    """``[NAME=]RUN_DIR`` arguments as {served name: run directory}; the name defaults to the directory's."""
    runs: dict[str, Path] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).resolve().name, item
        if name in runs:
            raise TunesmithError(f"serve: two runs are served as {name!r}; name them with NAME=RUN_DIR")
        runs[name] = Path(path)
    return runs


def parse_aliases(items: list[str]) -> dict[str, str]:
    aliases = {}
    for item in items:
        alias, sep, name = item.partition("=")
        if not sep or not alias or not name:
            raise TunesmithError(f"--alias {item!r}: expected ALIAS=ADAPTER")
        aliases[alias] = name
    return aliases


def build_server(runs: dict[str, Path], base: str | None = None, adapter_dirs: list[Path] = (),
                 aliases: dict[str, str] | None = None, options: ServeOptions | None = None,
                 access: Access | None = None, store: Path | None = None,
                 redact_pii: bool = False, log_requests: bool = True, alias_file: Path | None = None) -> Server:
    """A server on the runs' shared base model; nothing listens until ``run`` or ``in_thread``. Runs that
score texts rather than write answers (``scorers.split_runs``) are served as scorers, each on its own
model; with no other run, the base is a scorer's own base model.

    ``alias_file`` (``store.aliases``: ``{alias: run directory}``) is applied now, after ``aliases``,
    and followed while the server runs.
    """
    from tunesmith.store.db import default_path

    options = options or ServeOptions()
    for directory in adapter_dirs:
        if not Path(directory).is_dir():
            raise TunesmithError(f"--adapter-dir {directory}: no such directory")
    runs, scoring = split_runs(runs)
    if base is None and not runs and scoring:
        base = Run(next(iter(scoring.values())), writer=False).load_config().model.name
    # Loaded in threads that end with the loading (serve/openmp.py: a thread left with an OpenMP pool
    # slowed the engine's decoding 2.5x).
    pool = apart(AdapterPool.from_runs, runs, base=base, max_adapters=options.max_adapters, adapter_dirs=adapter_dirs,
                 device=options.torch_device(), weights_dtype=options.weights_dtype())
    scorers = apart(ScorerPool.from_runs, scoring, device=options.torch_device())
    for alias, name in (aliases or {}).items():
        pool.set_alias(alias, name)
    watch = AliasFile(pool, alias_file) if alias_file is not None else None
    if watch is not None:
        apart(watch.refresh)
    caches = Caches(prefix_bytes=options.prefix_cache_mb * 2**20)
    scheduler = Scheduler(functools.partial(pool.run, max_rows=options.max_batch, prefill_tokens=options.prefill_tokens,
                                            caches=caches),
                          window_s=options.batch_window_ms / 1000, max_batch=options.max_batch, caches=caches)
    request_log = RequestLog(store or default_path(), redact_pii) if log_requests else None
    return Server(pool, scheduler, request_log, options, access or Access(), watch, scorers)
