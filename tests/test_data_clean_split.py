"""normalize_text, clean_records (every drop reason) and split_records (sizes, seeds, strata)."""

from collections import Counter

import pytest

from tunesmith.data.clean import clean_records, normalize_text
from tunesmith.data.split import split_records
from tunesmith.errors import TunesmithError


@pytest.mark.parametrize("raw, expected", [
    ("cafe\u0301", "caf\u00e9"),  # NFC composes e + combining accent
    ("\ufb01ne \uff21", "\ufb01ne \uff21"),  # NFC, not NFKC: ligatures and full-width letters stay
    ("a\u00a0b\u202fc\u3000d", "a b c d"),  # Unicode spaces become plain spaces
    ("zero\u200bwidth\ufeff", "zerowidth"),
    ("\U0001F469\u200d\U0001F4BB", "\U0001F469\u200d\U0001F4BB"),  # ZWJ in an emoji sequence stays
    ("a \t  b\t\tc", "a b c"),
    ("  line one  \n\t line two\t", "line one\nline two"),
    ("one\r\ntwo\rthree", "one\ntwo\nthree"),
    ("para\n\n\n\n  \nnext\n\nlast", "para\n\nnext\n\nlast"),
    ("\n\n  padded  \n\n", "padded"),
])
def test_normalize_text(raw, expected):
    assert normalize_text(raw) == expected


def reasons(records, **kwargs) -> tuple[list, Counter]:
    return clean_records(records, ["prompt", "answer"], **kwargs)


def test_clean_normalises_and_keeps_order_and_other_fields():
    records = [
        {"prompt": " Hi\u00a0 there ", "answer": "Hello", "label": "x", "_line": 2},
        {"prompt": "Second", "answer": 7, "_line": 3},
    ]
    kept, dropped = reasons(records)
    assert kept == [
        {"prompt": "Hi there", "answer": "Hello", "label": "x", "_line": 2},
        {"prompt": "Second", "answer": "7", "_line": 3},
    ]
    assert dropped == Counter()
    assert records[0]["prompt"] == " Hi\u00a0 there "  # the input is not changed


def test_clean_drop_reasons():
    records = [
        {"prompt": "kept one", "answer": "fine", "_line": 1},
        {"prompt": "no answer", "_line": 2},
        {"prompt": " \u200b\t ", "answer": "blank prompt", "_line": 3},
        {"prompt": None, "answer": "null prompt", "_line": 4},
        {"prompt": "a", "answer": "b", "_line": 5},
        {"prompt": "far too long " * 5, "answer": "x", "_line": 6},
        {"prompt": "kept  one", "answer": "fine ", "_line": 7},  # same as line 1 once normalised
        {"prompt": "kept one", "answer": "fine", "label": "other", "_line": 8},  # a label makes it differ
        {"prompt": "kept one", "answer": "fine", "label": "other", "_line": 9},
    ]
    kept, dropped = reasons(records, min_chars=5, max_chars=40)
    assert [r["_line"] for r in kept] == [1, 8]
    assert dropped == Counter(empty=3, too_short=1, too_long=1, duplicate=2)


def test_clean_length_limits_count_all_text_fields():
    records = [{"prompt": "abc", "answer": "de"}]  # 5 characters in all
    assert reasons(records, min_chars=5, max_chars=5)[1] == Counter()
    assert reasons(records, min_chars=6)[1] == Counter(too_short=1)
    assert reasons(records, max_chars=4)[1] == Counter(too_long=1)


def test_clean_chat_messages():
    def chat(question, answer):
        return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]

    records = [
        {"messages": chat("  Hi\t there ", "Hello\n\n\n\nyou")},
        {"messages": chat("Hi there", "Hello\n\nyou")},
        {"messages": chat("q", " ")},
        {"messages": chat("q", None)},
        {"messages": []},
    ]
    kept, dropped = clean_records(records, ["messages"])
    assert kept == [{"messages": chat("Hi there", "Hello\n\nyou")}]
    assert dropped == Counter(empty=3, duplicate=1)


def test_clean_rejects_a_field_that_is_not_text():
    records = [{"text": "ok", "_line": 2}, {"text": {"nested": 1}, "_line": 3}, {"text": [1, 2], "_line": 4}]
    with pytest.raises(TunesmithError) as error:
        clean_records(records, ["text"], source="data/train.jsonl")
    assert error.value.problems == [
        "data/train.jsonl:3: field 'text' holds dict, expected text or a list of chat messages",
        "data/train.jsonl:4: field 'text' holds list, expected text or a list of chat messages",
    ]


def labelled(n_pos: int, n_neg: int) -> list[dict]:
    return [{"id": i, "label": "pos" if i < n_pos else "neg"} for i in range(n_pos + n_neg)]


def ids(splits) -> dict[str, list[int]]:
    return {name: [r["id"] for r in rows] for name, rows in splits.items()}


def test_split_sizes_disjoint_and_complete():
    records = labelled(60, 40)
    splits = split_records(records, 0.1, 0.25, seed=0, stratify_key=None)
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 65, "validation": 10, "test": 25}
    assert sorted(sum(ids(splits).values(), [])) == list(range(100))


def test_split_is_reproducible_and_depends_on_the_seed():
    records = labelled(30, 20)
    for stratify in (None, "label"):
        first = ids(split_records(records, 0.2, 0.2, seed=3, stratify_key=stratify))
        assert ids(split_records(records, 0.2, 0.2, seed=3, stratify_key=stratify)) == first
        assert ids(split_records(records, 0.2, 0.2, seed=4, stratify_key=stratify)) != first


def test_stratified_split_keeps_label_shares():
    records = labelled(70, 30)
    splits = split_records(records, 0.1, 0.2, seed=1, stratify_key="label")
    counts = {name: Counter(r["label"] for r in rows) for name, rows in splits.items()}
    assert counts == {
        "train": Counter(pos=49, neg=21), "validation": Counter(pos=7, neg=3), "test": Counter(pos=14, neg=6),
    }
    # Shuffled after the per-label split, so a split is not ordered label by label.
    assert [r["label"] for r in splits["train"]] != sorted(r["label"] for r in splits["train"])


def test_stratified_rounding_matches_the_overall_sizes():
    records = labelled(5, 4) + [{"id": 100 + i, "label": "rare"} for i in range(2)]  # 11 records
    splits = split_records(records, 0.2, 0.2, seed=0, stratify_key="label")
    assert [len(splits[name]) for name in ("train", "validation", "test")] == [7, 2, 2]
    assert len(sum(ids(splits).values(), [])) == 11


def test_stratified_split_keeps_every_label_in_train():
    rare = ["once", "twice", "twice"]
    records = labelled(10, 10) + [{"id": 50 + i, "label": label} for i, label in enumerate(rare)]
    for seed in range(20):
        splits = split_records(records, 0.3, 0.3, seed=seed, stratify_key="label")
        assert {r["label"] for r in splits["train"]} == {"pos", "neg", "once", "twice"}
        assert len(splits["validation"]) == len(splits["test"]) == 7


def test_stratified_split_with_only_single_record_labels():
    records = [{"id": i, "label": str(i)} for i in range(10)]
    splits = split_records(records, 0.2, 0.2, seed=0, stratify_key="label")
    assert len(splits["train"]) == 10 and splits["validation"] == splits["test"] == []


def test_stratify_by_unhashable_labels():
    records = [{"id": i, "label": ["a", "b"] if i % 2 else ["c"]} for i in range(10)]
    splits = split_records(records, 0.2, 0.2, seed=0, stratify_key="label")
    for name in ("validation", "test"):
        assert sorted(r["label"] for r in splits[name]) == [["a", "b"], ["c"]]


@pytest.mark.parametrize("n, validation, test, expected", [
    (3, 0.05, 0.05, (1, 1, 1)),  # each fraction above 0 gets a record from 3 records on
    (5, 0.05, 0.05, (3, 1, 1)),
    (2, 0.05, 0.05, (2, 0, 0)),
    (2, 0.5, 0.45, (1, 1, 0)),  # train keeps a record; validation goes before test
    (1, 0.3, 0.3, (1, 0, 0)),
])
def test_tiny_data_sets(n, validation, test, expected):
    splits = split_records(labelled(n, 0), validation, test, seed=0, stratify_key=None)
    assert tuple(len(splits[name]) for name in ("train", "validation", "test")) == expected


def test_zero_fractions_give_empty_splits():
    splits = split_records(labelled(10, 10), 0.0, 0.0, seed=0, stratify_key="label")
    assert len(splits["train"]) == 20 and splits["validation"] == [] and splits["test"] == []


@pytest.mark.parametrize("validation, test, expected", [
    (-0.1, 0.1, ["validation fraction must be a number >= 0, got -0.1"]),
    (-0.1, float("nan"), ["validation fraction must be a number >= 0, got -0.1",
                          "test fraction must be a number >= 0, got nan"]),
    (0.5, 0.5, ["validation + test fractions must sum to less than 1 to leave records for training, "
                "got 0.5 + 0.5 = 1"]),
])
def test_bad_fractions(validation, test, expected):
    with pytest.raises(TunesmithError) as error:
        split_records(labelled(5, 5), validation, test, seed=0, stratify_key=None)
    assert error.value.problems == expected


def test_stratify_key_missing():
    records = labelled(3, 3) + [{"id": 9, "_line": 12}]
    with pytest.raises(TunesmithError) as error:
        split_records(records, 0.2, 0.2, seed=0, stratify_key="label")
    assert error.value.problems == ["cannot stratify by 'label': 1 of 7 records lack it (first: line 12)"]


def test_records_sharing_an_input_stay_in_one_split_and_unique_inputs_split_as_before():
    """Several answers to one prompt (served thumbs) go to one split together, so the leakage audit
    leaves the held-out splits their rows; where no input repeats, the split is the one without
    grouping, so no existing data set's split changed."""
    records = [{"id": f"{p}-{k}", "_input": f"prompt {p}"} for p in range(40) for k in range(3)]
    splits = split_records(records, 0.1, 0.1, seed=0, stratify_key=None, group_key="_input")
    inputs = {name: {r["_input"] for r in rows} for name, rows in splits.items()}
    assert not inputs["train"] & inputs["validation"] and not inputs["train"] & inputs["test"]
    assert not inputs["validation"] & inputs["test"]
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [96, 12, 12]
    assert sorted(r["id"] for rows in splits.values() for r in rows) == sorted(r["id"] for r in records)
    again = split_records(records, 0.1, 0.1, seed=0, stratify_key=None, group_key="_input")
    assert {n: [r["id"] for r in rows] for n, rows in again.items()} == {
        n: [r["id"] for r in rows] for n, rows in splits.items()}

    unique = [{"id": i, "_input": f"prompt {i}"} for i in range(50)]
    grouped = split_records(unique, 0.2, 0.1, seed=4, stratify_key=None, group_key="_input")
    assert grouped == split_records(unique, 0.2, 0.1, seed=4, stratify_key=None)

    # A group bigger than a held-out split stays in train, and never makes a split bigger than asked.
    lopsided = [{"id": k, "_input": "one prompt"} for k in range(30)] + [
        {"id": 100 + i, "_input": f"prompt {i}"} for i in range(20)]
    split = split_records(lopsided, 0.1, 0.1, seed=1, stratify_key=None, group_key="_input")
    assert [len(split[n]) for n in ("train", "validation", "test")] == [40, 5, 5]
    assert all(r["_input"] == "one prompt" for r in split["train"] if r["id"] < 100)
    few = [{"id": k, "_input": "one prompt"} for k in range(5)] + [{"id": 9, "_input": "another"}]
    tiny = split_records(few, 0.2, 0.0, seed=0, stratify_key=None, group_key="_input")
    assert [len(tiny[n]) for n in ("train", "validation", "test")] == [5, 1, 0]  # train keeps a group
