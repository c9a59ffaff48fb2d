"""The alias file, followed live: ``tunesmith retrain`` promotes a child by rewriting it, and the
running server moves the alias on its next request, with no restart.

``AliasFile.refresh`` looks at the file's identity (inode, modification time, size) at most once
per ``every_s``, and reads it only when that changed. Each alias points at a run directory: a run
already loaded (as a named run or through an earlier alias) is reused; any other is loaded through
the pool's normal path, so ``--adapter-dir`` and ``--max-adapters`` hold as for
``/v1/load_lora_adapter``. An adapter the file loaded is unloaded when no alias points at it any
more, after the requests already queued for it (``AdapterPool.retire``). Nothing in the file can
stop the server: a malformed file, or an alias that cannot be set, is logged and the aliases stay
as they were.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.serve.adapters import AdapterPool
from tunesmith.store.aliases import read_aliases

log = logging.getLogger(__name__)


class AliasFile:
    def __init__(self, pool: AdapterPool, path: str | Path, every_s: float = 1.0):
        self.pool, self.path, self.every_s = pool, Path(path), every_s
        self._identity: tuple | None = None  # the file's identity when last read
        self._checked = float("-inf")
        self._lock = threading.Lock()
        self._set: dict[str, str] = {}  # alias -> adapter, as the file set them
        self._loaded: set[str] = set()  # adapters this file loaded: it unloads them when done with them

    def due(self) -> bool:
        """Whether ``refresh`` would look at the file now (cheap: no system call)."""
        return time.monotonic() - self._checked >= self.every_s

    def refresh(self) -> None:
        """Apply the file if it changed since it was last read; at most one look per ``every_s``."""
        with self._lock:
            if not self.due():
                return
            self._checked = time.monotonic()
            identity = _identity(self.path)
            if identity is None or identity == self._identity:
                return  # no file (yet, or any more): the aliases stay as they are
            self._identity = identity
            try:
                targets = read_aliases(self.path)
            except TunesmithError as err:
                log.warning("%s; the aliases stay as they were", "; ".join(err.problems))
                return
            self._apply(targets)

    def _apply(self, targets: dict[str, Path]) -> None:
        for alias in self._set.keys() - targets.keys():
            # An alias taken out of the file goes, unless it has been pointed elsewhere by hand since.
            if self.pool.aliases.get(alias) == self._set.pop(alias):
                self.pool.aliases.pop(alias, None)
        for alias, target in targets.items():
            try:
                name = self._adapter(target)
                if self.pool.aliases.get(alias) != name:
                    self.pool.set_alias(alias, name)
                    log.info("alias %s -> %s (%s, from %s)", alias, name, target, self.path)
                self._set[alias] = name
            except TunesmithError as err:
                log.warning("alias file %s: alias %r not moved: %s", self.path, alias, "; ".join(err.problems))
            except Exception:  # a broken adapter must not take the server down with it
                log.exception("alias file %s: alias %r not moved", self.path, alias)
        # What the file loaded and no alias points at any more (a promotion's old target) leaves memory
        # once its queued requests are answered; without this every promotion would hold one more
        # adapter until --max-adapters refused the next. Adapters named at startup or loaded by hand stay.
        for name in self._loaded - set(self.pool.aliases.values()):
            self._loaded.discard(name)
            self.pool.retire(name)
            log.info("adapter %s: no alias points at it any more; unloaded once its requests are answered", name)

    def _adapter(self, target: Path) -> str:
        """The loaded adapter of the run at ``target``, loaded now (as its directory's name) if need be."""
        resolved = target.expanduser().resolve()
        for adapter in list(self.pool.adapters.values()):
            if adapter.run.resolve() == resolved:
                if adapter.name in self.pool.retiring:  # pointed back at before it left: still ours
                    self._loaded.add(adapter.name)
                return adapter.name
        self.pool.load(resolved.name, str(resolved))
        self._loaded.add(resolved.name)
        return resolved.name


def _identity(path: Path) -> tuple | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size
