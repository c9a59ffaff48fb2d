"""The classification report's figures against scikit-learn's on small fixed examples, calibration
against a hand computation, and the two baselines on tiny splits."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from tunesmith.eval.baselines import baselines, format_baselines, majority, tfidf_logistic
from tunesmith.eval.classification import (
    average_precision,
    calibration,
    classification_report,
    format_report,
    plot_confusion,
    plot_reliability,
    roc_auc,
)

LABELS = ["bird", "cat", "dog"]
GOLD = np.array([0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 2])
PROBS = np.array([
    [0.7, 0.2, 0.1], [0.4, 0.4, 0.2], [0.2, 0.5, 0.3], [0.1, 0.8, 0.1], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5],
    [0.5, 0.4, 0.1], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.3, 0.4, 0.3], [0.1, 0.3, 0.6], [0.4, 0.2, 0.4],
])
# Not the most probable label everywhere: a decision rule may choose otherwise.
PRED = np.array([0, 1, 1, 1, 1, 2, 0, 2, 2, 1, 2, 0])


def test_per_class_figures_and_confusion_matrix_match_scikit_learn():
    report = classification_report(GOLD, PROBS, PRED, LABELS)
    p, r, f, s = skm.precision_recall_fscore_support(GOLD, PRED, labels=[0, 1, 2], zero_division=0)
    for i, label in enumerate(LABELS):
        got = report["per_class"][label]
        assert got["precision"] == pytest.approx(p[i]) and got["recall"] == pytest.approx(r[i])
        assert got["f1"] == pytest.approx(f[i]) and got["support"] == s[i]
    assert report["macro_f1"] == pytest.approx(skm.f1_score(GOLD, PRED, average="macro"))
    assert report["weighted_f1"] == pytest.approx(skm.f1_score(GOLD, PRED, average="weighted"))
    assert report["accuracy"] == pytest.approx(skm.accuracy_score(GOLD, PRED))
    assert report["confusion"] == skm.confusion_matrix(GOLD, PRED).tolist()


def test_a_label_never_predicted_has_precision_zero_not_an_error():
    pred = np.zeros_like(GOLD)
    report = classification_report(GOLD, PROBS, pred, LABELS)
    assert report["per_class"]["dog"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 5}
    assert report["macro_f1"] == pytest.approx(skm.f1_score(GOLD, pred, average="macro", zero_division=0))


def test_aucs_one_vs_rest_macro_match_scikit_learn():
    report = classification_report(GOLD, PROBS, PRED, LABELS)
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(GOLD, PROBS, multi_class="ovr", average="macro"))
    onehot = np.eye(3)[GOLD]
    assert report["pr_auc"] == pytest.approx(skm.average_precision_score(onehot, PROBS, average="macro"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_aucs_with_ties_match_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    positive = rng.random(40) < 0.3
    scores = np.round(rng.random(40) * 0.5 + 0.4 * positive, 1)  # rounded: many ties
    assert roc_auc(positive, scores) == pytest.approx(skm.roc_auc_score(positive, scores))
    assert average_precision(positive, scores) == pytest.approx(skm.average_precision_score(positive, scores))


def test_binary_report_scores_the_rarer_label():
    gold = np.array([0, 0, 0, 0, 0, 1, 1, 0])
    p1 = np.array([0.1, 0.2, 0.6, 0.3, 0.1, 0.9, 0.4, 0.2])
    probs = np.stack([1 - p1, p1], axis=1)
    report = classification_report(gold, probs, (p1 > 0.5).astype(int), ["ham", "spam"])
    assert report["auc_of"] == "spam"
    assert report["roc_auc"] == pytest.approx(skm.roc_auc_score(gold, p1))
    assert report["pr_auc"] == pytest.approx(skm.average_precision_score(gold, p1))
    # With the rarer label first, the report scores that one, not the second.
    flipped = classification_report(1 - gold, probs[:, ::-1], (p1 <= 0.5).astype(int), ["spam", "ham"])
    assert flipped["auc_of"] == "spam" and flipped["pr_auc"] == pytest.approx(report["pr_auc"])


def test_auc_is_none_when_a_class_is_missing():
    assert roc_auc(np.array([True, True]), np.array([0.2, 0.3])) is None
    assert average_precision(np.array([False, False]), np.array([0.2, 0.3])) is None


def test_expected_calibration_error_by_hand():
    # Four examples; confidences 0.95, 0.9 (bin [0.9, 1.0]), 0.65 (bin [0.6, 0.7)), 0.55 (bin [0.5, 0.6)).
    gold = np.array([0, 1, 0, 1])
    probs = np.array([[0.95, 0.05], [0.9, 0.1], [0.35, 0.65], [0.45, 0.55]])
    ece, table = calibration(gold, probs, bins=10)
    # Bin 9: confidence 0.925, accuracy 0.5 (one of the two right); bin 6: 0.65, wrong; bin 5: 0.55, right.
    hand = 2 / 4 * abs(0.5 - 0.925) + 1 / 4 * abs(0 - 0.65) + 1 / 4 * abs(1 - 0.55)
    assert ece == pytest.approx(hand)
    assert [r["count"] for r in table] == [0, 0, 0, 0, 0, 1, 1, 0, 0, 2]
    assert table[9]["confidence"] == pytest.approx(0.925) and table[9]["accuracy"] == 0.5


def test_report_renders_and_plots(tmp_path):
    report = classification_report(GOLD, PROBS, PRED, LABELS)
    text = "\n".join(format_report(report))
    assert "| cat |" in text and "Confusion matrix" in text and "expected calibration error" in text
    plot_confusion(report, tmp_path / "confusion.png")
    plot_reliability(report, tmp_path / "reliability.png")
    for name in ("confusion.png", "reliability.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def _rows(texts_labels):
    return [{"_input": t, "label": label} for t, label in texts_labels]


def test_baselines_learn_words_and_count_the_majority():
    words = {"spam": ["prize", "winner", "cash", "claim"], "ham": ["lunch", "meeting", "tonight", "mum"]}
    rng = np.random.default_rng(0)

    def rows(n, spam_share):
        out = []
        for i in range(n):
            label = "spam" if rng.random() < spam_share else "ham"
            out.append((f"{' '.join(rng.choice(words[label], 2))} note {i}", label))
        return _rows(out)

    train, validation, test = rows(80, 0.2), rows(30, 0.2), rows(40, 0.2)
    train.append({"_input": "a canary row", "_canary": True})  # no label: left out
    labels = ["ham", "spam"]
    found = baselines({"train": train, "validation": validation, "test": test}, test, labels)
    gold = [e["label"] for e in test]
    most = max(set(gold), key=[e["label"] for e in train if "label" in e].count)
    assert found["majority"]["label"] == "ham" == most
    assert found["majority"]["accuracy"] == pytest.approx(gold.count("ham") / len(gold))
    assert found["tfidf_logistic"]["macro_f1"] == 1.0 and found["tfidf_logistic"]["C"] in (0.1, 1.0, 10.0, 100.0)
    text = "\n".join(format_baselines(found, {"accuracy": 0.9, "macro_f1": 0.7}))
    assert "TF-IDF + logistic regression scores accuracy 1.000, macro-F1 1.000 on this test split" in text
    assert "0.30 macro-F1 below it" in text


def test_without_a_test_split_c_is_not_chosen_on_the_rows_scored():
    rows = _rows([(f"good {i}", "pos") for i in range(6)] + [(f"bad {i}", "neg") for i in range(6)])
    found = baselines({"train": rows, "validation": rows[:4], "test": []}, rows[:4], ["neg", "pos"])
    assert found["tfidf_logistic"]["C"] == 1.0 and found["tfidf_logistic"]["validation_macro_f1"] is None
    chosen = baselines({"train": rows, "validation": rows[:4], "test": rows[4:8]}, rows[4:8], ["neg", "pos"])
    assert chosen["tfidf_logistic"]["validation_macro_f1"] is not None


def test_tfidf_baseline_with_one_training_label_answers_it():
    train = _rows([("a b", "x"), ("c d", "x")])  # nothing to fit: the one label is the answer
    found = tfidf_logistic(train, [], _rows([("a", "x"), ("e", "y")]), ["x", "y"])
    assert found["accuracy"] == 0.5 and majority(train, _rows([("a", "x")]), ["x", "y"])["accuracy"] == 1.0
