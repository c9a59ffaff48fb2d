"""What a tuned classifier must beat to be worth it, on the very splits the run used: always answering
the training split's most frequent label, and TF-IDF (word 1-2 grams) + logistic regression with
balanced class weights, its C chosen on the validation split.

Texts and labels are each split's examples as ``data.pipeline.load_splits`` gave them to the run
(``_input`` and ``label``); canaries, which carry no label, are left out.
"""

from __future__ import annotations

from collections import Counter

from tunesmith.eval.metrics import macro_f1

C_GRID = (0.1, 1.0, 10.0, 100.0)


def _texts_labels(examples: list[dict]) -> tuple[list[str], list[str]]:
    kept = [e for e in examples if "label" in e]
    return [e["_input"] for e in kept], [e["label"] for e in kept]


def _scores(gold: list[str], pred: list[str], labels: list[str]) -> dict:
    return {"accuracy": sum(g == p for g, p in zip(gold, pred)) / max(len(gold), 1),
            "macro_f1": macro_f1(gold, pred, labels)}


def majority(train: list[dict], test: list[dict], labels: list[str]) -> dict:
    """Every test example answered with the training split's most frequent label."""
    _, train_labels = _texts_labels(train)
    _, gold = _texts_labels(test)
    label = Counter(train_labels).most_common(1)[0][0]
    return {"label": label, **_scores(gold, [label] * len(gold), labels)}


def tfidf_logistic(train: list[dict], validation: list[dict], test: list[dict], labels: list[str]) -> dict:
    """TF-IDF of word 1-2 grams + logistic regression (balanced class weights) fitted on train, C the
    best validation macro-F1 of ``C_GRID`` (the first on a tie; C 1 when there is no validation split)."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    texts, train_labels = _texts_labels(train)
    test_texts, gold = _texts_labels(test)
    if len(set(train_labels)) < 2:  # one label to learn: logistic regression refuses, and the answer is that label
        return {"C": None, "validation_macro_f1": None, **_scores(gold, [train_labels[0]] * len(gold), labels)}
    # Words of one letter count too (the default pattern drops them).
    vectorizer = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True, token_pattern=r"(?u)\b\w+\b")
    features = vectorizer.fit_transform(texts)

    def fit(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, class_weight="balanced", max_iter=2000).fit(features, train_labels)

    val_texts, val_labels = _texts_labels(validation)
    best_c, best = 1.0, None
    if val_texts:
        val_features = vectorizer.transform(val_texts)
        for c in C_GRID:
            score = macro_f1(val_labels, list(fit(c).predict(val_features)), labels)
            if best is None or score > best:
                best_c, best = c, score
    pred = list(fit(best_c).predict(vectorizer.transform(test_texts)))
    return {"C": best_c, "validation_macro_f1": best, **_scores(gold, pred, labels)}


def baselines(splits: dict[str, list[dict]], test: list[dict], labels: list[str]) -> dict:
    """Both baselines, scored on ``test`` (the held-out rows the tuned model was scored on). Where the
    run has no test split and ``test`` is its validation rows, C is not chosen on them (C 1)."""
    validation = splits["validation"] if splits["test"] else []
    return {"majority": majority(splits["train"], test, labels),
            "tfidf_logistic": tfidf_logistic(splits["train"], validation, test, labels)}


BASELINE_NAMES = {"majority": "majority class", "tfidf_logistic": "TF-IDF + logistic regression"}


def format_baselines(found: dict, tuned: dict) -> list[str]:
    """The comparison, a table and one plain sentence per baseline; ``tuned``: the tuned model's metrics."""
    lines = ["| model | accuracy | macro-F1 |", "|---|---:|---:|",
             f"| tuned model | {tuned['accuracy']:.4f} | {tuned['macro_f1']:.4f} |"]
    for key, name in BASELINE_NAMES.items():
        b = found[key]
        extra = f" (always `{b['label']}`)" if key == "majority" else f" (C {b['C']}, chosen on validation)"
        lines.append(f"| {name}{extra} | {b['accuracy']:.4f} | {b['macro_f1']:.4f} |")
    lines.append("")
    lines += [verdict(name, found[key], tuned) for key, name in BASELINE_NAMES.items()]
    return lines


def verdict(name: str, baseline: dict, tuned: dict) -> str:
    """One sentence: how the tuned model compares with a baseline on accuracy and macro-F1."""
    gap = tuned["macro_f1"] - baseline["macro_f1"]
    if abs(gap) < 0.005:
        how = "level with it"
    else:
        how = f"{abs(gap):.2f} macro-F1 {'above' if gap > 0 else 'below'} it"
    return (f"- {name} scores accuracy {baseline['accuracy']:.3f}, macro-F1 {baseline['macro_f1']:.3f} on this "
            f"test split; the tuned model {tuned['accuracy']:.3f} and {tuned['macro_f1']:.3f}: {how}.")


def summary_line(found: dict) -> str:
    """Both baselines' accuracy and macro-F1, in one line."""
    return "; ".join(f"{name} accuracy {found[key]['accuracy']:.4f}, macro-F1 {found[key]['macro_f1']:.4f}"
                     for key, name in BASELINE_NAMES.items())


def compare_line(found: dict, tuned: dict) -> str:
    """One line for the terminal."""
    return (f"baselines on the same test rows: {summary_line(found)}; tuned accuracy {tuned['accuracy']:.4f}, "
            f"macro-F1 {tuned['macro_f1']:.4f}")
