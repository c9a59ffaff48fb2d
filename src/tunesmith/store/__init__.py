"""The run store: a run directory's layout and life. See ``store.run``."""

from tunesmith.store.run import Run, load_run

__all__ = ["Run", "load_run"]
