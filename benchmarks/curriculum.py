"""Curriculum against random order: the demo trained twice for the same number of steps, once with
``train.curriculum`` and once in the usual shuffled order, each run by ``tunesmith train`` in its
own process.

    python benchmarks/curriculum.py                       # the demo, by length (~2 x the demo's time)
    python benchmarks/curriculum.py --by base_loss --steps 60
    python benchmarks/curriculum.py --config my.yaml --set train.max_steps=20   # any config

Reported per order: the validation loss at each validation, the best one, and the test metrics of
the tuned model. The table is printed and written to OUT/curriculum.md.

A complete run already at OUT/random or OUT/curriculum with the config this benchmark would train
is read back, not trained again: put a finished ``make demo`` run at OUT/random to save its training
(its ``train s`` is then the demo's, marked "read back", and not a figure of this run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from harness import DEMO, machine


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(DEMO))
    p.add_argument("--by", choices=["length", "base_loss"], default="length")
    p.add_argument("--pacing", choices=["linear", "root"], default="linear")
    p.add_argument("--start", type=float, default=0.2)
    p.add_argument("--until", type=float, default=0.5)
    p.add_argument("--steps", type=int, help="train.max_steps for both runs (default: the config's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override for both runs")
    p.add_argument("--out", default="runs/bench_curriculum")
    return p.parse_args(argv)


def reusable(run: Path, config: str, overrides: list[str]) -> bool:
    """Whether ``run`` already holds this arm, complete and trained with the config it asks for."""
    from tunesmith.config import load_config
    from tunesmith.store import Run

    if not run.exists():
        return False
    def settings(c) -> dict:  # where a run was written is not how it was trained
        return c.model_dump(mode="json", exclude={"output"})

    found = Run(run)
    if found.status() != "complete" or settings(found.load_config()) != settings(load_config(config, overrides)):
        raise SystemExit(f"{run} holds another run, or an unfinished one; choose another --out")
    return True


def train(config: str, overrides: list[str]) -> None:
    argv = [sys.executable, "-m", "tunesmith.cli", "train", config, *(a for o in overrides for a in ("--set", o))]
    if subprocess.run(argv, check=False).returncode != 0:
        raise SystemExit(f"curriculum benchmark: training failed: {' '.join(argv)}")


def summary(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {"steps": metrics["steps"], "val_losses": [(r["step"], r["val_loss"]) for r in log if "val_loss" in r],
            "best_val_loss": metrics["best_val_loss"], "tuned": metrics["tuned"],
            "train_seconds": metrics["train_seconds"]}


def table(results: dict[str, dict]) -> str:
    metrics = list(next(iter(results.values()))["tuned"])
    lines = ["| order | steps | validation loss by step | best val loss | " + " | ".join(f"test {m}" for m in metrics)
             + " | train s |", "|---|---:|---|---:|" + "---:|" * len(metrics) + "---:|"]
    for name, r in results.items():
        curve = ", ".join(f"{s}: {v:.4f}" for s, v in r["val_losses"])
        lines.append(f"| {name} | {r['steps']} | {curve} | {r['best_val_loss']:.4f} | "
                     + " | ".join(f"{r['tuned'][m]:.4f}" for m in metrics)
                     + f" | {r['train_seconds']:.0f}{' (read back)' if r['read_back'] else ''} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    print(f"machine: {machine()}")
    shared = [*args.set, *([f"train.max_steps={args.steps}"] if args.steps else [])]
    curriculum = [f"train.curriculum.by={args.by}", f"train.curriculum.pacing={args.pacing}",
                  f"train.curriculum.start={args.start}", f"train.curriculum.until={args.until}"]
    results = {}
    for name, extra in (("random", []), (f"curriculum ({args.by}, {args.pacing} from {args.start})", curriculum)):
        run = out / ("random" if not extra else "curriculum")
        print(f"== {name} ==", flush=True)
        overrides = [*shared, f"output.dir={run.resolve()}", *extra]
        read_back = reusable(run, args.config, overrides)
        if read_back:
            print(f"{run}: complete, read back")
        else:
            train(args.config, overrides)
        results[name] = {**summary(run), "read_back": read_back}
    text = (f"python benchmarks/curriculum.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n"
            f"machine: {machine()}\n\n{table(results)}\n")
    (out / "curriculum.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
