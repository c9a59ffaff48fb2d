"""Training data from served traffic that people rated, plus replay of the original training data.

A served answer counts once, by its latest rating:
- a run with labels (a classifier, or label answers on a causal model): the rating's ``label`` when
  it is one of the run's labels (a person said what the right class was); else the model's own
  answer when the score says it was right (``score >= min_score``; thumbs up is 1.0);
- a generative run: the prompt and the model's answer, when ``score >= min_score``.
Everything else is counted by reason and left out. Replay mixes in original training examples
(``replay`` of them per new one) so that the child does not forget what the parent knew.

Rows are written in one canonical schema, whatever the user's columns were: ``{"text", "label"}``
for label data, ``{"messages"}`` otherwise.
"""

from __future__ import annotations

import json
import random
import sqlite3
from collections import Counter
from pathlib import Path

from tunesmith.errors import TunesmithError


def latest_ratings(db: sqlite3.Connection, adapter: str, since: float | None = None) -> list[sqlite3.Row]:
    """Each served answer of ``adapter`` that has a rating, with its latest rating (not pairwise choices)."""
    return db.execute("""
        SELECT a.id, a.prompt, a.answer, r.score, r.label
        FROM answers a JOIN ratings r ON r.answer_id = a.id
        WHERE a.source = 'served' AND a.run = ? AND a.created_at >= ? AND r.other_id IS NULL
          AND r.id = (SELECT MAX(id) FROM ratings WHERE answer_id = a.id AND other_id IS NULL)
        ORDER BY a.created_at""", (adapter, since if since is not None else float("-inf"))).fetchall()


def rated_rows(ratings, labels: list[str], min_score: float = 1.0) -> tuple[list[dict], Counter]:
    """Canonical training rows from rated answers, and the count of those left out, by reason."""
    rows, skipped = [], Counter()
    for r in ratings:
        good = r["score"] is not None and r["score"] >= min_score
        if labels:
            if r["label"] is not None and r["label"] in labels:
                rows.append({"text": r["prompt"], "label": r["label"]})
            elif r["label"] is not None:
                skipped["label_not_a_run_label"] += 1
            elif good and r["answer"].strip() in labels:
                rows.append({"text": r["prompt"], "label": r["answer"].strip()})
            else:
                skipped["no_right_label"] += 1
        elif good:
            rows.append({"messages": [{"role": "user", "content": r["prompt"]},
                                      {"role": "assistant", "content": r["answer"]}]})
        else:
            skipped["score_below_min"] += 1
    return rows, skipped


def input_of(row: dict) -> str:
    """What the model reads of a canonical row: its text, or its non-assistant messages."""
    if "text" in row:
        return row["text"]
    return "\n".join(m["content"] for m in row["messages"] if m["role"] != "assistant")


def unseen(rows: list[dict], known: list[dict]) -> tuple[list[dict], int]:
    """``rows`` without repeated inputs, and without inputs of ``known`` (the original test set,
    which the gate scores on: training on its rows would flatter the child). Returns the number dropped."""
    seen = {input_of(r) for r in known}
    kept = []
    for row in rows:
        if input_of(row) not in seen:
            seen.add(input_of(row))
            kept.append(row)
    return kept, len(rows) - len(kept)


def canonical(example: dict) -> dict:
    """A prepared example (``data.format.to_examples``) as a canonical row."""
    if "label" in example:
        return {"text": example["_input"], "label": example["label"]}
    if "messages" in example:
        return {"messages": example["messages"]}
    raise TunesmithError("retrain: the run trained on plain text (continued pre-training); there is no "
                         "prompt to rate, so there is nothing to re-train on")


def hold_out(rows: list[dict], fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """A seeded split of the new rows: (to train on, held out for the gate)."""
    shuffled = rows[:]
    random.Random(seed).shuffle(shuffled)
    held = max(1, round(len(rows) * fraction))
    return shuffled[held:], shuffled[:held]


def replay(original: list[dict], new_count: int, ratio: float, seed: int) -> list[dict]:
    """``ratio`` original rows per new row (all of them when there are fewer), a seeded sample."""
    n = min(len(original), round(new_count * ratio))
    return random.Random(seed).sample(original, n)


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
