"""From a saved run to an exported model: merge the method into the base, then write one format.

The output is written beside its final path and renamed into place, so an interrupted export never
looks like a finished one, and an existing file or directory is never overwritten.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from tunesmith.errors import TunesmithError
from tunesmith.export.gguf_file import write_gguf
from tunesmith.model import unwrap
from tunesmith.session import load_run

FORMATS = ("hf", "gguf")


def check_output(out: Path) -> None:
    if out.exists() or out.is_symlink():
        raise TunesmithError(f"--out {out}: already exists; choose a path that does not exist "
                             "(tunesmith never overwrites an export)")


def merged_model(run_dir: Path):
    """The run's tuned model as a plain transformers model (the method folded into the base
    weights), with its tokenizer."""
    _, session, model = load_run(run_dir)
    merge = session.method.merge
    if merge is None:
        raise TunesmithError(f"{run_dir}: method {session.method.name} cannot be merged into the base "
                             "weights, so it has no export; lora, ia3 and full can")
    return unwrap(merge(model)), session.tokenizer


def export_run(run_dir: str | Path, fmt: str, out: str | Path, dtype: str = "float32") -> Path:
    """Write the run's merged model to ``out`` as ``fmt`` (``hf``: a directory, ``gguf``: a file)."""
    out = Path(out)
    if fmt not in FORMATS:
        raise TunesmithError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    check_output(out)
    model, tokenizer = merged_model(Path(run_dir))
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.unlink(missing_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "hf":
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        else:
            write_gguf(model, tokenizer, tmp, dtype)
        check_output(out)  # someone may have written it while we merged
        tmp.rename(out)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    return out
