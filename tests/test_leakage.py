"""audit_leakage: exact and near duplicates found and removed, checked against brute force."""

import functools
import random

import pytest

from tunesmith.data.leakage import MAX_EXAMPLES, audit_leakage
from tunesmith.errors import TunesmithError

BASE = (
    "The committee reviewed the quarterly budget and decided to postpone the new library "
    "until the spring, citing rising construction costs."
)
EDITED = BASE.replace("postpone", "delay")  # a near duplicate: Jaccard about 0.9
OTHER = "Photosynthesis converts light energy into chemical energy stored in glucose molecules."


def text(record: dict) -> str:
    return record["text"]


def rows(*texts: str) -> list[dict]:
    return [{"text": t} for t in texts]


def test_exact_and_near_duplicates_are_removed():
    train = rows(BASE, "Something else entirely, about cooking pasta al dente.")
    splits = {
        "train": train,
        "validation": rows("  the COMMITTEE reviewed" + BASE[len("The committee reviewed"):], OTHER, EDITED),
        "test": rows(EDITED.upper(), "A completely unrelated sentence about mountain weather."),
        "extra": rows("passed through"),
    }
    result, report = audit_leakage(splits, text)

    assert result["train"] is train
    assert result["validation"] == rows(OTHER)
    assert result["test"] == rows("A completely unrelated sentence about mountain weather.")
    assert result["extra"] == rows("passed through")
    assert report["validation"] == {"exact": 1, "near": 1}
    assert report["test"] == {"exact": 0, "near": 1}
    assert [(e["split"], e["kind"], e["match_split"], e["match"]) for e in report["examples"]] == [
        ("validation", "exact", "train", BASE),
        ("validation", "near", "train", BASE),
        ("test", "near", "train", BASE),
    ]
    assert report["examples"][0]["similarity"] == 1.0
    assert 0.8 <= report["examples"][1]["similarity"] < 1


def test_test_records_duplicating_validation_are_removed():
    splits = {"train": rows(OTHER), "validation": rows(BASE), "test": rows(BASE.lower(), EDITED)}
    result, report = audit_leakage(splits, text)
    assert result["validation"] == rows(BASE)
    assert result["test"] == []
    assert report["test"] == {"exact": 1, "near": 1}
    assert {e["match_split"] for e in report["examples"]} == {"validation"}


def test_threshold_decides_near_duplicates():
    splits = {"train": rows(BASE), "validation": rows(EDITED), "test": []}
    assert audit_leakage(splits, text, threshold=0.8)[1]["validation"] == {"exact": 0, "near": 1}
    assert audit_leakage(splits, text, threshold=0.99)[1]["validation"] == {"exact": 0, "near": 0}


def test_short_and_empty_inputs():
    splits = {"train": rows("ok", "", "abcdef"), "validation": rows("OK", "", "abcdeg", "no"), "test": []}
    result, report = audit_leakage(splits, text)
    assert result["validation"] == rows("abcdeg", "no")
    assert report["validation"] == {"exact": 2, "near": 0}


def test_examples_are_capped_and_shortened():
    long_text = "word " * 100
    splits = {"train": rows(long_text), "validation": rows(*[long_text] * 8), "test": []}
    _, report = audit_leakage(splits, text)
    assert report["validation"]["exact"] == 8
    assert len(report["examples"]) == MAX_EXAMPLES
    assert len(report["examples"][0]["text"]) == 200 and report["examples"][0]["text"].endswith("\u2026")


def test_nothing_to_audit():
    splits = {"train": [], "validation": [], "test": []}
    assert audit_leakage(splits, text) == (splits, {
        "validation": {"exact": 0, "near": 0}, "test": {"exact": 0, "near": 0}, "examples": [],
    })


@pytest.mark.parametrize("threshold", [0, -0.5, 1.5])
def test_bad_threshold(threshold):
    with pytest.raises(TunesmithError, match="near-duplicate threshold must be above 0 and at most 1"):
        audit_leakage({"train": [], "validation": [], "test": []}, text, threshold)


@functools.cache
def shingles(s: str) -> frozenset[str]:
    s = " ".join(s.lower().split())
    return frozenset({s[i : i + 5] for i in range(len(s) - 4)} if len(s) >= 5 else {s} - {""})


def jaccard(a: str, b: str) -> float:
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb) if sa | sb else 0.0


def leaks(queries: list[str], corpus: list[str], threshold: float) -> list[bool]:
    """Slow reference: compare every query with every corpus text."""
    normal = {" ".join(c.lower().split()) for c in corpus}
    return [
        " ".join(q.lower().split()) in normal or any(jaccard(q, c) >= threshold for c in corpus)
        for q in queries
    ]


def variants(seed: int) -> tuple[list[str], list[str], list[str]]:
    """Train texts, and validation / test texts edited from them by a random number of word changes."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    vocab = ["".join(rng.choice(letters) for _ in range(rng.randint(2, 8))) for _ in range(300)]
    train = [" ".join(rng.choice(vocab) for _ in range(rng.randint(15, 40))) for _ in range(60)]

    def edit(s: str) -> str:
        words = s.split()
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3, 4, 6, 10, 40])):
            words[rng.randrange(len(words))] = rng.choice(vocab)
        return " ".join(words)

    validation = [edit(rng.choice(train)) for _ in range(80)]
    # Test texts are also edited from validation texts, to exercise the validation-test check.
    test = [edit(rng.choice(train + validation)) for _ in range(80)]
    return train, validation, test


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_matches_brute_force(threshold):
    train, validation, test = variants(seed=int(threshold * 10))
    splits = {"train": rows(*train), "validation": rows(*validation), "test": rows(*test)}
    result, report = audit_leakage(splits, text, threshold)

    expected_validation = [t for t, leak in zip(validation, leaks(validation, train, threshold)) if not leak]
    kept_test = leaks(test, train + expected_validation, threshold)
    expected_test = [t for t, leak in zip(test, kept_test) if not leak]
    assert [r["text"] for r in result["validation"]] == expected_validation
    assert [r["text"] for r in result["test"]] == expected_test
    # The data must exercise both outcomes, and near duplicates that are not exact.
    assert 0 < len(expected_validation) < len(validation) and 0 < len(expected_test) < len(test)
    assert report["validation"]["near"] > 0 and report["test"]["near"] > 0
