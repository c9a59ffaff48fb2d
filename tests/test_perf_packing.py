"""Batch planning: best-fit packing against a slow reference, and at scale.

How long planning takes is measured by `python benchmarks/limits.py --only size`, not here.
"""

from __future__ import annotations

import random

import pytest

from tunesmith.data.batching import plan_batches, plan_rows


def _reference_best_fit(lengths: list[int], row_len: int) -> list[int]:
    """Free space of each row after best-fit decreasing, by scanning every row for every example."""
    free: list[int] = []
    for n in sorted((min(x, row_len) for x in lengths), reverse=True):
        fits = [r for r, f in enumerate(free) if f >= n]
        if fits:
            free[min(fits, key=lambda r: free[r])] -= n
        else:
            free.append(row_len - n)
    return free


@pytest.mark.parametrize("seed,row_len", [(0, 16), (1, 64), (2, 128), (3, 100)])
def test_plan_rows_is_best_fit_decreasing(seed, row_len):
    rng = random.Random(seed)
    lengths = [rng.randint(1, row_len + 20) for _ in range(300)]
    rows = plan_rows(lengths, row_len)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    free = [row_len - sum(min(lengths[i], row_len) for i in row) for row in rows]
    assert min(free) >= 0
    # Rows with the same free space are interchangeable, so the free spaces match whatever the ties.
    assert sorted(free) == sorted(_reference_best_fit(lengths, row_len))


def test_planning_a_large_data_set_places_every_example_once_within_budget():
    rng = random.Random(0)
    examples = [{"input_ids": [0] * max(8, int(rng.gauss(62, 10)))} for _ in range(200_000)]
    batches = plan_batches(examples, 2048, 128, seed=0)
    assert sorted(i for rows in batches for row in rows for i in row) == list(range(len(examples)))
    assert all(sum(len(examples[i]["input_ids"]) for i in row) <= 128 for rows in batches for row in rows)
    assert all(len(rows) * 128 <= 2048 for rows in batches)
