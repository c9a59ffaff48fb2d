"""Split records into train, validation and test, reproducibly and optionally stratified by label."""

import json
import math
import random

from tunesmith.data.io import location
from tunesmith.errors import TunesmithError


def split_records(
    records: list[dict], validation: float, test: float, seed: int, stratify_key: str | None,
    group_key: str | None = None,
) -> dict[str, list[dict]]:
    """Split ``records`` into ``{"train", "validation", "test"}`` lists, each in a seeded shuffled order.

    Sizes are the fractions of ``len(records)`` rounded half up. A fraction above 0 gives at least
    one record once there are 3 or more records, and train always keeps at least one, so a tiny data
    set still gets every split it asked for. With ``stratify_key``, each label keeps (as closely as
    whole records allow) the same share of every split, and at least one record in train, where a
    model can learn it; the split sizes are those without it, unless so many labels have a single
    record that validation and test must shrink. The same records in the same order with the same
    seed always give the same splits.

    Without ``stratify_key``, records that share a ``group_key`` value (an input asked more than once:
    several answers to one prompt, as served thumbs are) go to one split together, so the leakage
    audit, which drops a held-out record whose input is in train, does not empty validation and test;
    the sizes are then met as closely as whole groups allow. Where no value repeats, the split is the
    same as without ``group_key``.

    Raises:
        TunesmithError: a fraction is negative, the fractions leave nothing for training, or a
            record lacks ``stratify_key``.
    """
    _check_fractions(validation, test)
    rng = random.Random(seed)
    n_validation, n_test = _split_sizes(len(records), validation, test)

    if stratify_key is None and group_key is not None:
        grouped = _group_by(records, group_key)
        if len(grouped) < len(records):
            return _split_groups(grouped, n_validation, n_test, rng)
    if stratify_key is None:
        shuffled = list(records)
        rng.shuffle(shuffled)
        return {
            "train": shuffled[n_validation + n_test :],
            "validation": shuffled[:n_validation],
            "test": shuffled[n_validation : n_validation + n_test],
        }

    groups = _group_by(records, stratify_key)
    sizes = [len(group) for group in groups]
    validation_counts = _apportion(n_validation, sizes, caps=[size - 1 for size in sizes])
    test_counts = _apportion(n_test, sizes, caps=[size - 1 - v for size, v in zip(sizes, validation_counts)])

    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for group, n_v, n_t in zip(groups, validation_counts, test_counts):
        group = list(group)
        rng.shuffle(group)
        splits["validation"] += group[:n_v]
        splits["test"] += group[n_v : n_v + n_t]
        splits["train"] += group[n_v + n_t :]
    # Otherwise each split would come ordered label by label, and so would the training batches.
    for split in splits.values():
        rng.shuffle(split)
    return splits


def _split_groups(groups: list[list[dict]], n_validation: int, n_test: int,
                  rng: random.Random) -> dict[str, list[dict]]:
    """Whole groups, in a seeded order: each to validation while it fits in ``n_validation`` records,
    else to test while it fits in ``n_test``, else to train. A held-out split asked for and left empty
    (every group too big for it) takes train's smallest group, while train keeps one."""
    order = list(groups)
    rng.shuffle(order)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    train: list[list[dict]] = []
    for group in order:
        if len(splits["validation"]) + len(group) <= n_validation:
            splits["validation"] += group
        elif len(splits["test"]) + len(group) <= n_test:
            splits["test"] += group
        else:
            train.append(group)
    for name, size in (("validation", n_validation), ("test", n_test)):
        if size and not splits[name] and len(train) > 1:
            smallest = min(train, key=len)
            train.remove(smallest)
            splits[name] += smallest
    splits["train"] = [record for group in train for record in group]
    for split in splits.values():
        rng.shuffle(split)
    return splits


def _check_fractions(validation: float, test: float) -> None:
    problems = [
        f"{name} fraction must be a number >= 0, got {value!r}"
        for name, value in (("validation", validation), ("test", test))
        if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0
    ]
    if not problems and validation + test >= 1:
        problems.append(
            f"validation + test fractions must sum to less than 1 to leave records for training, "
            f"got {validation} + {test} = {validation + test:g}"
        )
    if problems:
        raise TunesmithError(*problems)


def _split_sizes(n: int, validation: float, test: float) -> tuple[int, int]:
    sizes = []
    for fraction in (validation, test):
        # Half up, not Python's round-half-to-even, so that 10 records at 0.25 give 3, not 2.
        size = math.floor(n * fraction + 0.5)
        if fraction > 0 and size == 0 and n >= 3:
            size = 1
        sizes.append(size)
    n_validation, n_test = sizes
    while n > 0 and n_validation + n_test > n - 1:
        if n_test >= n_validation:
            n_test -= 1
        else:
            n_validation -= 1
    return n_validation, n_test


def _group_by(records: list[dict], key: str) -> list[list[dict]]:
    missing = [record for record in records if key not in record]
    if missing:
        raise TunesmithError(
            f"cannot stratify by '{key}': {len(missing)} of {len(records)} records lack it "
            f"(first: {location(None, missing[0])})"
        )
    groups: dict[str, list[dict]] = {}
    for record in records:
        # JSON text makes any label hashable (lists for multi-label) while keeping 1 and "1" apart.
        label = json.dumps(record[key], sort_keys=True, default=str)
        groups.setdefault(label, []).append(record)
    return list(groups.values())


def _apportion(total: int, sizes: list[int], caps: list[int]) -> list[int]:
    """Share ``total`` (or all the caps allow) among groups in proportion to ``sizes``, within caps.

    Largest remainder method: every group first gets its exact share rounded down, then the records
    left over go one by one to the groups whose share was rounded down the most.
    """
    total = min(total, sum(caps))
    n = sum(sizes)
    shares = [total * size / n for size in sizes]
    counts = [min(math.floor(share), cap) for share, cap in zip(shares, caps)]
    by_remainder = sorted(range(len(sizes)), key=lambda i: shares[i] - counts[i], reverse=True)
    left = total - sum(counts)
    while left > 0:
        for i in by_remainder:
            if left > 0 and counts[i] < caps[i]:
                counts[i] += 1
                left -= 1
    return counts
