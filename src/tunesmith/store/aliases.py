"""The alias file: ``{alias: run directory}`` as JSON, by default ``runs/aliases.json``.

``tunesmith retrain`` writes it when it promotes a child (``write_alias``); ``tunesmith serve``
reads it at start and again whenever it changes (``read_aliases``), so a promotion moves live
traffic without a restart. Both take their default from ``DEFAULT_PATH``.
"""

from __future__ import annotations

import json
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic

DEFAULT_PATH = Path("runs") / "aliases.json"


def read_aliases(path: Path) -> dict[str, Path]:
    """The aliases in the file at ``path``: {alias: run directory}; one line naming the file when
    it is not a JSON object of non-empty strings."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise TunesmithError(f"alias file {path}: cannot read it ({err})") from None
    except json.JSONDecodeError as err:
        raise TunesmithError(f"alias file {path}: line {err.lineno}: not JSON ({err.msg})") from None
    if not isinstance(raw, dict):
        raise TunesmithError(f"alias file {path}: expected a JSON object {{alias: run directory}}")
    bad = [alias for alias, target in raw.items() if not alias or not isinstance(target, str) or not target]
    if bad:
        raise TunesmithError(f"alias file {path}: alias {bad[0]!r}: expected a non-empty run directory")
    return {alias: Path(target) for alias, target in raw.items()}


def write_alias(path: Path, alias: str, target: Path) -> None:
    """Point ``alias`` at ``target`` in the alias file, atomically: a server reading it never sees
    half a file (and the replace gives the file a new inode, which the server's watch notices)."""
    aliases = json.loads(path.read_text()) if path.is_file() else {}
    aliases[alias] = str(target.resolve())
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(aliases, indent=1))
