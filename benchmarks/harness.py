"""What the benchmarks share: each measurement runs in a child process of its own, so that its peak
resident memory (ru_maxrss, read with wait4) belongs to that measurement alone.

A benchmark script calls ``measure(__file__, "name", payload)`` in the parent, and starts with
``if serve_child(CHILDREN): return`` in its main, where CHILDREN maps names to functions taking
the payload and returning a JSON-able dict.
"""

from __future__ import annotations

import argparse
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

    from tunesmith.model import cpu_field

    model = cpu_field("model name") or "unknown CPU"
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


def same_initial_adapter(model, seed: int):
    """``model`` with its LoRA weights drawn again from ``seed`` as PEFT draws them (A: Kaiming-uniform,
    B: zeros), in the order of their names: both sides start from the same adapter, whatever each
    drew from the random stream while building its model."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if "lora_A" in name:
                bound = 1 / math.sqrt(param.shape[1])  # kaiming_uniform_(a=sqrt(5)) on a [r, in] weight
                param.copy_(torch.rand(param.shape, generator=generator) * 2 * bound - bound)
            elif "lora_B" in name:
                param.zero_()
    return model


class Clock:
    """Training seconds with the held-out evaluations left out, and the curve they draw: for time to a
    quality, each side calls ``evaluate(model, step)`` every few steps; ``held_out(model)`` returns a
    dict of figures, ``shown`` names the one printed."""

    def __init__(self, held_out, shown: str):
        self.held_out, self.shown = held_out, shown
        self.curve, self.spent, self.since = [], 0.0, time.perf_counter()

    def evaluate(self, model, step: int) -> None:
        self.spent += time.perf_counter() - self.since
        figures = self.held_out(model)
        self.curve.append({"step": step, "seconds": self.spent, **figures})
        print(f"  step {step}: {self.spent:.0f} s, held-out {self.shown} {figures[self.shown]:.4f}", flush=True)
        self.since = time.perf_counter()

    def seconds(self) -> float:
        """Training seconds so far."""
        return self.spent + time.perf_counter() - self.since

    def finish(self, model, step: int) -> None:
        """Evaluate the last step, unless it was just evaluated."""
        if not self.curve or self.curve[-1]["step"] != step:
            self.evaluate(model, step)


def time_to(curve: list[dict], key: str, target: float, higher: bool) -> float | None:
    """Training seconds at the curve's first point whose ``key`` reaches ``target``; None if none does."""
    return next((p["seconds"] for p in curve if (p[key] >= target if higher else p[key] <= target)), None)


def fastest(runs: dict[str, dict], key: str, target: float | None, higher: bool) -> str:
    """The name of the run (a dict with a ``curve``) that reaches ``target`` in the fewest training
    seconds; where none does (or there is no target), the one with the best ``key`` anywhere on its curve."""
    def best(run: dict) -> float:
        values = [p[key] for p in run["curve"]]
        return -max(values) if higher else min(values)

    def rank(name: str) -> tuple:
        seconds = time_to(runs[name]["curve"], key, target, higher) if target is not None else None
        return (seconds is None, seconds or 0.0, best(runs[name]))

    return min(runs, key=rank)


def time_to_quality(curves: dict[str, list[dict]], key: str, target: float, higher: bool) -> str:
    """Print when each side's curve first reaches ``target``; return the ratio of TRL's training
    seconds to tunesmith's (``curves`` names the sides "tunesmith" and "trl"), or why there is none."""
    reach = {side: time_to(curve, key, target, higher) for side, curve in curves.items()}
    for side, seconds in reach.items():
        print(f"{side:<10} reaches held-out {key} {target:.4f} "
              + (f"after {seconds:.0f} s of training" if seconds is not None else "not within the run"))
    if reach["trl"] is None or reach["tunesmith"] is None:
        return "not reached by " + " and ".join(side for side, s in reach.items() if s is None)
    if any(curve[0]["step"] == 0 and time_to(curve[:1], key, target, higher) is not None for curve in curves.values()):
        return "n/a (the untrained model already reaches the target)"
    return f"{reach['trl'] / reach['tunesmith']:.2f}x"


def both_sides(script: str, spec: dict, key: str, line) -> dict[str, dict]:
    """Measure tunesmith, then TRL, each in a child process of its own (``measure``); print each side's
    ``line(result)``, its peak memory and its held-out curve of ``key``. Returns the two results."""
    results = {}
    for side in ("tunesmith", "trl"):
        r = results[side] = measure(script, side, spec)
        curve = "  ".join(f"{p['step']}:{p['seconds']:.0f}s/{p[key]:.4f}" for p in r["curve"])
        print(f"{side:<10} {line(r)}  peak RSS {r['peak_rss_mb']:6.0f} MB  held-out {key} (step:seconds/{key}) {curve}",
              flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return results


def best_after_start(curve: list[dict], key: str, higher: bool) -> float:
    """The best ``key`` of a curve once training began (the untrained model's point left out)."""
    values = [p[key] for p in curve if p["step"] > 0]
    return max(values) if higher else min(values)


def plot_curves(path: Path, curves: dict[str, list[dict]], key: str, target: float | None, title: str,
                log: bool = False) -> None:
    """Held-out ``key`` against training seconds (evaluations left out), one line per run, and the
    target as a dashed line; written as a PNG to ``path``. ``log``: a log scale for ``key``, where the
    untrained model's figure would squash the region near the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, curve in curves.items():
        ax.plot([p["seconds"] for p in curve], [p[key] for p in curve], marker="o", markersize=3,
                label=label, linewidth=2 if label.startswith("tunesmith") else 1.2)
    if target is not None:
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.4f}")
    ax.set_xlabel("training seconds (evaluations left out)")
    ax.set_ylabel(f"held-out {key}" + (" (log scale)" if log else ""))
    if log:
        from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=130)
    plt.close(fig)
    print(f"curves plotted to {path}")


def trl_evaluations(clock: Clock, every: int):
    """A transformers ``TrainerCallback`` that has ``clock`` evaluate the model every ``every`` optimizer
    steps (TRL's side of a time-to-quality run; tunesmith's calls ``clock.evaluate`` from ``fit``'s step hook)."""
    from transformers import TrainerCallback

    class Evaluate(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % every == 0:
                clock.evaluate(model, state.global_step)

    return Evaluate()


def quality_options(p: argparse.ArgumentParser, every: int, grid: str) -> None:
    """Add a time-to-quality benchmark's options to ``p``: how often to evaluate, the target, the job's
    overrides for both sides, tunesmith's own settings, its grid (``grid`` says what is in it) and the plot."""
    p.add_argument("--eval-every", type=int, default=every, help="held-out evaluation every N optimizer steps")
    p.add_argument("--target", type=float, default=None, help="held-out loss to reach (default: TRL's lowest)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override the example config for both sides (e.g. train.lr=5e-4); repeatable")
    p.add_argument("--tunesmith-set", dest="settings", action="append", default=[], metavar="KEY=VALUE",
                   help="tunesmith's own settings on top (e.g. train.epochs=2, train.batch_tokens=1024, "
                        "train.lr=2e-3); repeatable")
    p.add_argument("--grid", action="store_true",
                   help=f"run tunesmith with each setting of its grid ({grid}), each with --tunesmith-set on top, "
                        "and keep the one that reaches the target first on the validation split")
    p.add_argument("--plot", type=Path, default=None, metavar="PATH",
                   help="write the held-out loss curves (against training seconds) to this PNG")
