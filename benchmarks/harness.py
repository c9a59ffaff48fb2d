"""What the benchmarks share: each measurement runs in a child process of its own, so that its peak
resident memory (ru_maxrss, read with wait4) belongs to that measurement alone.

A benchmark script calls ``measure(__file__, "name", payload)`` in the parent, and starts with
``if serve_child(CHILDREN): return`` in its main, where CHILDREN maps names to functions taking
the payload and returning a JSON-able dict.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "rotten_tomatoes_lora.yaml"


def measure(script: str, name: str, payload: dict) -> dict:
    """Run ``name`` of ``script`` in a child process; its result plus ``peak_rss_mb`` and ``process_s``."""
    with tempfile.TemporaryDirectory(prefix="tunesmith-bench-") as tmp:
        given, out = Path(tmp) / "payload.json", Path(tmp) / "result.json"
        given.write_text(json.dumps(payload))
        started = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(Path(script).resolve()), "--child", name, str(given), str(out)],
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0 or not out.is_file():
            raise SystemExit(f"{Path(script).name}: measurement {name} failed (status {status})")
        result = json.loads(out.read_text())
    result["peak_rss_mb"] = usage.ru_maxrss / 1024  # kilobytes on Linux
    result["process_s"] = time.perf_counter() - started
    return result


def steady_rate(marks: list[tuple[float, int]]) -> float:
    """Tokens/s from the first optimizer step's end to the last's; ``marks`` holds (time, tokens so far)
    after each step. The first step is left out: it allocates the process's memory, which on a VM can
    cost more than the step's compute."""
    (t0, n0), (t1, n1) = marks[0], marks[-1]
    return (n1 - n0) / (t1 - t0) if len(marks) > 1 else float("nan")


def serve_child(children: dict) -> bool:
    """In a child started by ``measure``: run the named measurement, write its result, return True."""
    if len(sys.argv) != 5 or sys.argv[1] != "--child":
        return False
    _, _, name, given, out = sys.argv
    result = children[name](json.loads(Path(given).read_text()))
    Path(out).write_text(json.dumps(result))
    return True


def machine() -> str:
    """CPU count and model, torch version and threads, and the load average right now."""
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown CPU")
    return (f"{os.cpu_count()} cpus ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads; "
            f"load average {os.getloadavg()[0]:.2f}")


def demo_encoded(config) -> dict[str, list[dict]]:
    """The demo data, encoded per split as ``tunesmith train`` encodes it."""
    from tunesmith.session import Session

    return Session(config).prepare().encoded


def packed_batches(examples: list[dict], batch_tokens: int, row_len: int, seed: int, pad_id: int,
                   packing: bool = True, shared_prefix: bool = False):
    """tunesmith's causal batches over ``examples``."""
    from tunesmith.objectives.base import Layout
    from tunesmith.objectives.causal import PackedBatches

    return PackedBatches(examples, Layout(batch_tokens, row_len, pad_id, seed, one_per_row=not packing,
                                          shared_prefix=shared_prefix))


def lora_model(source: str, dtype: str, method: dict, seed: int):
    """The base model with the adapter tunesmith's method adds, initialised from ``seed``."""
    import torch

    from tunesmith.methods import get_method
    from tunesmith.model import load_model

    model = load_model(source, dtype=dtype)
    torch.manual_seed(seed)
    chosen = get_method(method["name"])
    return chosen.apply(model, chosen.options(**method))
