"""Writing files so that no reader ever sees half of one, and a power loss never leaves an empty one.

The bottom layer, beside ``errors``: the run store, the alias file, the data cache, the feedback
export write through it, and the training checkpoints fsync through it.
"""

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file, or a directory's names, to the disk. A file that a library wrote (safetensors,
    ``torch.save``) is only durable once fsynced; a rename or a new file is only durable once its
    directory is, and without that a power loss can undo the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str) -> None:
    """Write beside and rename: a reader never sees half a file. The temporary name holds the
    process id, so that two writers of one file (a search's workers) do not share it.

    The file is fsynced before the rename and its directory after: otherwise the file system may
    commit the rename before the data, and a power loss leaves an empty status.json or config.yaml
    where the old one was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        fsync_path(path.parent)
    finally:
        tmp.unlink(missing_ok=True)  # a failed write (disk full) leaves no stray file behind
