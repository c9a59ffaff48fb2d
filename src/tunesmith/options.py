"""The base of every typed option group: a misspelt key is an error, not a silent no-op.

Each layer declares its own option groups beside the code that reads them (``data/options.py``,
``train/options.py``, each method and objective module); ``config.py`` assembles them into the
run's configuration. This module imports nothing of tunesmith, so any layer can build on it.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    # A misspelt key is a silent no-op in most YAML-driven tools; here it is an error.
    model_config = ConfigDict(extra="forbid")
