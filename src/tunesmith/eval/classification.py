"""A classifier's report from its label probabilities: per-class precision, recall and F1, the
confusion matrix, ROC-AUC and PR-AUC, and calibration.

Pure numpy, on three arrays: the gold label of each example, each label's probability, and the
predicted label. Predictions are passed in rather than taken as the most probable label, so that a
decision rule (a threshold, a prior correction) can choose them; calibration is about the
probabilities themselves, so it reads their most probable label.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tunesmith.eval.metrics import label_metrics

ECE_BINS = 10


@dataclass(frozen=True)
class LabelScores:
    """A label objective's scoring of held-out examples: the loss, and each label's probability."""

    loss: float
    probabilities: np.ndarray  # [examples, labels]
    # The run's decision rule (``eval.decision``: probabilities -> label indices); None: the most probable.
    decide: Callable[[np.ndarray], np.ndarray] | None = None
    weight: float = 1.0  # what the loss is a mean over (its tokens or examples), for ``joined``

    @classmethod
    def joined(cls, parts: list[LabelScores]) -> LabelScores:
        """The scores of consecutive shares of the examples (scored by several processes) as one."""
        weight = sum(p.weight for p in parts)
        return cls(sum(p.loss * p.weight for p in parts) / weight,
                   np.concatenate([p.probabilities for p in parts]), weight=weight)

    def predictions(self) -> np.ndarray:
        """The label each example is given: the most probable one, or the decision rule's."""
        return self.decide(self.probabilities) if self.decide else self.probabilities.argmax(axis=1)

    def metrics(self, examples: list[dict], labels: list[str]) -> dict[str, float]:
        """Loss, perplexity, accuracy and macro-F1 (``eval.metrics.label_metrics``)."""
        return label_metrics(self.loss, [e["label"] for e in examples],
                             [labels[i] for i in self.predictions()], labels)

    def report(self, examples: list[dict], labels: list[str]) -> dict:
        """The classification report (``classification_report``) of these predictions."""
        index = {label: i for i, label in enumerate(labels)}
        return classification_report([index[e["label"]] for e in examples], self.probabilities,
                                     self.predictions(), labels)


def confusion_matrix(gold: np.ndarray, pred: np.ndarray, n_labels: int) -> np.ndarray:
    """Counts [true label, predicted label]."""
    matrix = np.zeros((n_labels, n_labels), dtype=np.int64)
    np.add.at(matrix, (gold, pred), 1)
    return matrix


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Precision, recall, F1 and support of each label from a confusion matrix (0 where undefined,
    as scikit-learn's ``zero_division=0``)."""
    tp = np.diag(matrix).astype(float)
    predicted, support = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, support, out=np.zeros_like(tp), where=support > 0)
    total = precision + recall
    f1 = np.divide(2 * precision * recall, total, out=np.zeros_like(tp), where=total > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": support}


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2  # ranks from 1; ties share their mean
    return ranks


def roc_auc(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """The probability that a positive scores above a negative (ties count half): the area under the
    ROC curve. None when there are no positives or no negatives."""
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = _average_ranks(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float | None:
    """The area under the precision-recall curve as a step sum, sum over thresholds of (recall gained)
    x precision, scikit-learn's ``average_precision_score``. None when there are no positives."""
    if not positive.any():
        return None
    order = np.argsort(-scores, kind="mergesort")
    hits, ranked = positive[order], scores[order]
    last = np.r_[np.flatnonzero(ranked[1:] != ranked[:-1]), len(ranked) - 1]  # one threshold per distinct score
    tp = np.cumsum(hits)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def calibration(gold: np.ndarray, probabilities: np.ndarray, bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error of the most probable label, over ``bins`` equal-width bins of its
    probability ([lo, hi), the last one closed): the mean over examples of |accuracy - confidence| of
    their bin. Also each bin's count, mean confidence and accuracy (the reliability diagram)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == gold
    which = np.minimum((confidence * bins).astype(int), bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        inside = which == b
        n = int(inside.sum())
        row = {"from": b / bins, "to": (b + 1) / bins, "count": n, "confidence": None, "accuracy": None}
        if n:
            row["confidence"], row["accuracy"] = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += n / len(gold) * abs(row["accuracy"] - row["confidence"])
        table.append(row)
    return float(ece), table


def positive_label(gold: np.ndarray, n_labels: int) -> int:
    """With two labels, the one whose precision and recall matter most: the rarer one among the gold
    labels (the second on a tie)."""
    counts = np.bincount(gold, minlength=n_labels)
    return 0 if counts[0] < counts[1] else 1


def classification_report(gold, probabilities, predictions, labels: list[str], bins: int = ECE_BINS) -> dict:
    """Every figure of the report, JSON-ready. ``gold`` and ``predictions`` are indices into
    ``labels``; ``probabilities`` is [examples, labels].

    ROC-AUC and PR-AUC: with two labels, of the rarer one (``positive_label``); with more, one label
    against the rest, macro-averaged over the labels that have both positives and negatives here."""
    gold, predictions = np.asarray(gold, dtype=np.int64), np.asarray(predictions, dtype=np.int64)
    probabilities = np.asarray(probabilities, dtype=np.float64)
    n = len(labels)
    matrix = confusion_matrix(gold, predictions, n)
    classes = per_class(matrix)
    support = classes["support"]
    report = {
        "labels": list(labels),
        "examples": int(len(gold)),
        "accuracy": float(np.trace(matrix) / max(len(gold), 1)),
        "per_class": {label: {"precision": float(classes["precision"][i]), "recall": float(classes["recall"][i]),
                              "f1": float(classes["f1"][i]), "support": int(support[i])}
                      for i, label in enumerate(labels)},
        "macro_f1": float(classes["f1"].mean()),
        "weighted_f1": float((classes["f1"] * support).sum() / max(support.sum(), 1)),
        "confusion": matrix.tolist(),
    }
    if n == 2:
        pos = positive_label(gold, n)
        report["auc_of"] = labels[pos]
        report["roc_auc"] = roc_auc(gold == pos, probabilities[:, pos])
        report["pr_auc"] = average_precision(gold == pos, probabilities[:, pos])
    else:
        rocs = [roc_auc(gold == k, probabilities[:, k]) for k in range(n)]
        prs = [average_precision(gold == k, probabilities[:, k]) for k in range(n)]
        defined = [k for k in range(n) if rocs[k] is not None]
        report["auc_of"] = f"one-vs-rest, macro over {len(defined)} of {n} labels"
        report["roc_auc"] = float(np.mean([rocs[k] for k in defined])) if defined else None
        report["pr_auc"] = float(np.mean([prs[k] for k in defined])) if defined else None
    report["ece"], report["reliability"] = calibration(gold, probabilities, bins)
    report["ece_bins"] = bins
    return report


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def format_report(report: dict) -> list[str]:
    """The report's markdown: the per-class table, the averages, AUCs, calibration, the confusion matrix."""
    lines = ["| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    for label, c in report["per_class"].items():
        lines.append(f"| {label} | {c['precision']:.4f} | {c['recall']:.4f} | {c['f1']:.4f} | {c['support']} |")
    lines += [
        "",
        f"Accuracy {report['accuracy']:.4f}; macro-F1 {report['macro_f1']:.4f}; weighted F1 "
        f"{report['weighted_f1']:.4f}.",
        f"ROC-AUC {_figure(report['roc_auc'])}, PR-AUC (average precision) {_figure(report['pr_auc'])} "
        f"({_auc_of(report)}).",
        f"Calibration: expected calibration error {report['ece']:.4f} (the most probable label's probability "
        f"in {report['ece_bins']} equal-width bins).",
        "",
        "Confusion matrix (rows: true label, columns: predicted):",
        "",
        "| true \\ predicted | " + " | ".join(report["labels"]) + " |",
        "|---|" + "---:|" * len(report["labels"]),
    ]
    lines += [f"| {label} | " + " | ".join(str(v) for v in row) + " |"
              for label, row in zip(report["labels"], report["confusion"])]
    return lines


def _auc_of(report: dict) -> str:
    of = report["auc_of"]
    return f"label `{of}` against the other" if of in report["labels"] else of


def format_console(report: dict) -> str:
    """A few lines for the terminal (``tunesmith eval``, the end of training)."""
    width = max(len(label) for label in report["labels"])
    lines = [f"{'label':<{width}}  precision  recall  F1      support"]
    for label, c in report["per_class"].items():
        lines.append(f"{label:<{width}}  {c['precision']:.4f}     {c['recall']:.4f}  {c['f1']:.4f}  {c['support']}")
    lines.append(f"macro-F1 {report['macro_f1']:.4f}  weighted F1 {report['weighted_f1']:.4f}  "
                 f"ROC-AUC {_figure(report['roc_auc'])}  PR-AUC {_figure(report['pr_auc'])} ({_auc_of(report)})  "
                 f"ECE {report['ece']:.4f} ({report['ece_bins']} bins)")
    lines.append("confusion (rows true, columns predicted): "
                 + "; ".join(f"{label}: {row}" for label, row in zip(report["labels"], report["confusion"])))
    return "\n".join(lines)


def plot_confusion(report: dict, out: Path) -> None:
    """The confusion matrix as a PNG, each cell with its count."""
    plt = _pyplot()
    matrix = np.asarray(report["confusion"])
    labels = report["labels"]
    size = 2.5 + 0.6 * len(labels)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for (i, j), v in np.ndenumerate(matrix):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def plot_reliability(report: dict, out: Path) -> None:
    """The reliability diagram as a PNG: each bin's accuracy against its mean confidence, and the diagonal."""
    plt = _pyplot()
    rows = [r for r in report["reliability"] if r["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    width = 1 / report["ece_bins"]
    ax.bar([r["from"] for r in rows], [r["accuracy"] for r in rows], width=width, align="edge",
           edgecolor="black", alpha=0.7, label="accuracy in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfectly calibrated")
    ax.plot([r["confidence"] for r in rows], [r["accuracy"] for r in rows], "o", color="black",
            label="mean confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("probability of the most probable label")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ECE {report['ece']:.3f} ({report['ece_bins']} bins)")
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
