"""Writing files so that no reader ever sees half of one.

The bottom layer, beside ``errors``: the run store, the alias file, the data cache and the feedback
export all write through it.
"""

import os
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write beside and rename: a reader never sees half a file. The temporary name holds the
    process id, so that two writers of one file (a search's workers) do not share it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no stray file behind
