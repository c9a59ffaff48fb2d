"""The run store (a run directory's layout and life: ``store.run``) and the SQLite store of
answers and ratings (``store.db``)."""

from tunesmith.store.run import Run

__all__ = ["Run"]
