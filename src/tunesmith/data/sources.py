"""Multi-task mixing (``data.sources``): several files, each read, cleaned and split on its own, then
one training split that holds each source in its share of the mix.

A source's share is its weight over the sum of weights, or, with ``data.temperature`` T, its size
to the power 1/T over the sum of those (T=1 mixes by size; a larger T moves towards uniform, so
that a small task is not drowned). The training split keeps its total size; a source above its
share is subsampled and one below it is repeated (every row once, then a seeded sample). The
objective's batches then shuffle and pack this split as usual, so every batch mixes the sources
in their shares, on average. Validation and test keep every source's own rows, each tagged with
``_source``, so that the report scores each source on its own.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable

from tunesmith.data.format import Schema
from tunesmith.data.options import DataConfig, SourceConfig

MIXED = "mixed"  # the Schema kind of mixed data; its columns name each source's kind


def shares(sizes: list[int], weights: list[float], temperature: float | None) -> list[float]:
    """Each source's fraction of the training mix."""
    raw = [n ** (1 / temperature) for n in sizes] if temperature else list(weights)
    total = sum(raw)
    return [r / total for r in raw]


def mix(train: list[list[dict]], fractions: list[float], seed: int) -> list[dict]:
    """One training split of ``sum(len(t) for t in train)`` rows, source i taking ``fractions[i]`` of it."""
    rng = random.Random(seed)
    total = sum(len(t) for t in train)
    mixed = []
    for rows, fraction in zip(train, fractions):
        want = round(total * fraction)
        repeats, rest = divmod(want, len(rows))
        mixed += rows * repeats + rng.sample(rows, rest)
    rng.shuffle(mixed)
    return mixed


def source_config(cfg: DataConfig, source: SourceConfig) -> DataConfig:
    """The data section as it reads one source: the source's own file, format, columns and instruction."""
    return cfg.model_copy(update={
        "path": source.path, "train": None, "validation": None, "test": None, "format": source.format,
        "header": source.header, "columns": source.columns, "label_map": source.label_map,
        "instruction": source.instruction, "max_rows": cfg.max_rows if source.max_rows is None else source.max_rows,
        "sources": None, "temperature": None})


def load_sources(cfg: DataConfig, load_one: Callable) -> tuple[dict[str, list[dict]], Schema, dict]:
    """Read and split every source with ``load_one`` (``pipeline.load_splits``), then mix the training splits."""
    loaded = []
    for source in cfg.sources:
        splits, schema, stats = load_one(source_config(cfg, source))
        for rows in splits.values():
            for row in rows:
                row["_source"] = source.label
        loaded.append((source, splits, schema, stats))
    sizes = [len(splits["train"]) for _, splits, _, _ in loaded]
    fractions = shares(sizes, [s.weight for s in cfg.sources], cfg.temperature)
    mixed = {"train": mix([splits["train"] for _, splits, _, _ in loaded], fractions, cfg.seed),
             "validation": [r for _, splits, _, _ in loaded for r in splits["validation"]],
             "test": [r for _, splits, _, _ in loaded for r in splits["test"]]}
    schema = Schema(MIXED, {source.label: schema.kind for source, _, schema, _ in loaded})
    return mixed, schema, _stats(loaded, fractions, mixed)


def _stats(loaded, fractions: list[float], mixed: dict[str, list[dict]]) -> dict:
    dropped: Counter = Counter()
    leakage = {"validation": {"exact": 0, "near": 0}, "test": {"exact": 0, "near": 0}, "examples": []}
    per_source = {}
    for (source, splits, schema, stats), fraction in zip(loaded, fractions):
        dropped.update(stats["rows_dropped"])
        for split in ("validation", "test"):
            for kind in ("exact", "near"):
                leakage[split][kind] += stats["leakage"][split][kind]
        leakage["examples"] += stats["leakage"].get("examples", [])
        per_source[source.label] = {
            "format": schema.kind, "rows": stats["rows"], "share": fraction,
            "train_rows_mixed": sum(r["_source"] == source.label for r in mixed["train"]),
            "labels": sorted({r["label"] for r in splits["train"] if "label" in r}),
        }
    return {
        "format": MIXED,
        "columns": {source.label: schema.kind for source, _, schema, _ in loaded},
        "rows_read": sum(stats["rows_read"] for _, _, _, stats in loaded),
        "rows_dropped": dict(dropped),
        "rows": {name: len(rows) for name, rows in mixed.items()},
        "leakage": leakage,
        "sources": per_source,
    }


def format_sources(stats: dict) -> list[str]:
    """One line per source: its format, rows per split and share of the training mix."""
    return [f"source {name} ({s['format']}): rows " + ", ".join(f"{k} {v}" for k, v in s["rows"].items())
            + f"; {100 * s['share']:.0f}% of the training mix ({s['train_rows_mixed']} rows)"
            for name, s in stats.get("sources", {}).items()]
