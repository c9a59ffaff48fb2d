"""``builtin:rotten_tomatoes_rotten_minority``: the Rotten Tomatoes reviews with the negative ones made
a minority, for imbalanced-label examples and tests.

The shipped corpus is nearly balanced (7,403 fresh reviews, 5,405 rotten). Keeping every fresh review
and one rotten review in ``KEEP_EVERY`` (in file order, so the set is the same on every machine) makes
rotten about 9% of the rows: the case where a classifier that answers the majority class looks
accurate and the minority is what the user cares about. Film synopses ("plot" rows) are left out.
"""

from __future__ import annotations

KEEP_EVERY = 7


def rotten_minority(records: list[dict]) -> list[dict]:
    kept, rotten = [], 0
    for record in records:
        if record.get("category") == "fresh":
            kept.append(record)
        elif record.get("category") == "rotten":
            if rotten % KEEP_EVERY == 0:
                kept.append(record)
            rotten += 1
    return kept
