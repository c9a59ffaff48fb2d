"""What a run was asked, from the store's request log, and simple statistics of texts."""

from __future__ import annotations

import sqlite3
import statistics
from collections import Counter
from datetime import UTC, datetime

from tunesmith.errors import TunesmithError


def parse_since(text: str | None) -> float | None:
    """An ISO 8601 time as a Unix time; one without a zone is read as UTC."""
    if text is None:
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TunesmithError(f"--since {text!r}: not an ISO 8601 time (e.g. 2026-11-01 or 2026-11-01T12:00:00Z)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def served(db: sqlite3.Connection, adapter: str, since: float | None = None) -> list[sqlite3.Row]:
    """The answers the server gave under ``adapter``, oldest first."""
    return db.execute(
        "SELECT id, created_at, prompt, answer FROM answers WHERE source = 'served' AND run = ?"
        " AND created_at >= ? ORDER BY created_at", (adapter, since if since is not None else float("-inf"))
    ).fetchall()


def text_stats(tokenizer, texts: list[str]) -> dict:
    """Count, token lengths, and the share of tokens the tokenizer did not know (its unknown token)."""
    lengths, unknown = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        lengths.append(len(ids))
        if tokenizer.unk_token_id is not None:
            unknown += sum(i == tokenizer.unk_token_id for i in ids)
    return {"count": len(texts), "mean_tokens": statistics.fmean(lengths) if lengths else 0.0,
            "median_tokens": statistics.median(lengths) if lengths else 0,
            "unknown_share": unknown / max(sum(lengths), 1), "lengths": lengths}


def label_shares(values: list[str], labels: list[str]) -> dict[str, float]:
    """The share of each label among ``values``; anything else counts as ``(other)``."""
    counts = Counter(v.strip() if v.strip() in labels else "(other)" for v in values)
    return {label: counts[label] / max(len(values), 1) for label in [*labels, "(other)"]}
