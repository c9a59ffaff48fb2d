"""Where a run's checkpoints are and which of them is complete: names and files, no tensors, so that
reading a run (``store.Run.has_checkpoint``) loads no model stack. ``train.checkpoint`` writes and
reads the checkpoints themselves.

A run's ``checkpoints/`` holds ``last/``; a save goes through ``last.tmp/`` and ``last.old/``. A
checkpoint is complete once its ``state.json`` exists (written last, removed first).
"""

from __future__ import annotations

from pathlib import Path

LAST, TMP, OLD = "last", "last.tmp", "last.old"
# Newest first. A complete last.tmp is newer than last and last.old: a save removes last.tmp before
# writing it and its rename consumes it, so only a crash before that rename leaves it complete.
_NEWEST_FIRST = (TMP, LAST, OLD)


def is_complete(path: Path) -> bool:
    return (path / "state.json").is_file()


def latest_checkpoint(checkpoints: Path) -> Path | None:
    """The newest complete checkpoint in a run's ``checkpoints/`` directory, or None if it has none."""
    return next((checkpoints / name for name in _NEWEST_FIRST if is_complete(checkpoints / name)), None)
