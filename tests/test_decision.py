"""The decision rule chosen on validation (eval.decision): it must find the minority class that argmax
misses, on held-out rows it never saw, and be the same rule after a round trip through JSON."""

from __future__ import annotations

import numpy as np
import pytest

from tunesmith.eval.decision import Decision, fit_decision
from tunesmith.eval.metrics import macro_f1


def imbalanced(n: int, seed: int, labels: list[str], shares: list[float]) -> tuple[np.ndarray, list[str]]:
    """Probabilities of a model that has learnt the classes apart but leans on the majority: each row's
    true class gets +2 on its logit, and the majority class (the first) a further +2.5 everywhere."""
    rng = np.random.default_rng(seed)
    gold = rng.choice(len(labels), size=n, p=shares)
    logits = rng.normal(0, 1, (n, len(labels)))
    logits[np.arange(n), gold] += 2.0
    logits[:, 0] += 2.5
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    return p / p.sum(axis=1, keepdims=True), [labels[i] for i in gold]


def held_out_f1(decision: Decision | None, p: np.ndarray, gold: list[str], labels: list[str]) -> float:
    chosen = p.argmax(axis=1) if decision is None else decision.choose(p, labels)
    return macro_f1(gold, [labels[i] for i in chosen], labels)


@pytest.mark.parametrize("rule, labels, shares", [
    ("threshold", ["ham", "spam"], [0.9, 0.1]),
    ("prior", ["ham", "spam"], [0.9, 0.1]),
    ("threshold", ["none", "mild", "severe"], [0.8, 0.12, 0.08]),
    ("prior", ["none", "mild", "severe"], [0.8, 0.12, 0.08]),
])
def test_a_rule_chosen_on_validation_raises_held_out_macro_f1(rule, labels, shares):
    val_p, val_gold = imbalanced(600, 1, labels, shares)
    test_p, test_gold = imbalanced(3000, 2, labels, shares)
    prior = {label: val_gold.count(label) for label in labels}
    decision = fit_decision(rule, "macro_f1", val_p, val_gold, labels, prior)
    assert decision.validation[rule] > decision.validation["argmax"]
    before, after = held_out_f1(None, test_p, test_gold, labels), held_out_f1(decision, test_p, test_gold, labels)
    assert after > before + 0.05, (before, after)


def test_argmax_and_a_balanced_problem_keep_argmax():
    labels = ["a", "b"]
    rng = np.random.default_rng(0)
    gold = rng.integers(0, 2, 400)
    p = np.full((400, 2), 0.2)
    p[np.arange(400), gold] = 0.8  # every row right with argmax: nothing to gain
    decision = fit_decision("threshold", "macro_f1", p, [labels[i] for i in gold], labels, {"a": 1, "b": 1})
    assert decision.choose(p, labels).tolist() == gold.tolist()
    assert fit_decision("argmax", "macro_f1", p, [labels[i] for i in gold], labels, {}).offsets == {"a": 0.0, "b": 0.0}


def test_threshold_of_two_labels_is_a_cut_on_the_second_probability():
    labels = ["ham", "spam"]
    p_spam = np.array([0.05, 0.2, 0.3, 0.45, 0.6, 0.9])
    gold = ["ham", "ham", "spam", "spam", "spam", "spam"]
    decision = fit_decision("threshold", "accuracy", np.stack([1 - p_spam, p_spam], axis=1), gold, labels, {})
    assert 0.2 < decision.parameter < 0.3
    assert decision.validation == {"argmax": 4 / 6, "threshold": 1.0}
    again = Decision.from_json(decision.to_json())
    p = np.stack([1 - p_spam, p_spam], axis=1)
    assert again.choose(p, labels).tolist() == decision.choose(p, labels).tolist() == [0, 0, 1, 1, 1, 1]
    assert "threshold 0.2" in again.describe() and "accuracy 0.6667 with argmax, 1.0000 with it" in again.describe()


def test_a_run_records_its_rule_and_eval_and_predict_apply_it_after_reloading(tmp_path, tiny_model_dir, capsys):
    import csv
    import json

    from conftest import write_config, write_jsonl
    from test_balance import imbalanced_data, imbalanced_reviews

    from tunesmith.cli import main

    config = write_config(tmp_path / "c.yaml", tiny_model_dir, imbalanced_data(tmp_path),
                          train={"max_steps": 6, "eval_every": 6}, eval={"decision": "threshold"})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    recorded = json.loads((run / "decision.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert recorded["rule"] == "threshold" and recorded["metric"] == "macro_f1" == metrics["decision"]["metric"]
    assert recorded["validation"]["threshold"] >= recorded["validation"]["argmax"]
    assert "## Decision rule" in (run / "report.md").read_text()
    capsys.readouterr()

    assert main(["eval", str(run)]) == 0
    printed = capsys.readouterr().out
    assert "tuned labels by the decision rule threshold" in printed
    tuned = json.loads(printed.strip().splitlines()[-1])["tuned"]
    assert tuned["macro_f1"] == pytest.approx(metrics["tuned"]["macro_f1"], abs=1e-9)
    assert tuned["accuracy"] == pytest.approx(metrics["tuned"]["accuracy"], abs=1e-9)

    write_jsonl(tmp_path / "new.jsonl", [{"review": r["review"]} for r in imbalanced_reviews(40)])
    assert main(["predict", str(run), "--data", str(tmp_path / "new.jsonl"), "--out", str(tmp_path / "p.csv")]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    labels = json.loads((run / "labels.json").read_text())
    p = np.array([[float(r[f"p_{label}"]) for label in labels] for r in rows])
    chosen = Decision.from_json(recorded).choose(p, labels)
    assert [r["prediction"] for r in rows] == [labels[i] for i in chosen]


def test_a_rule_needs_label_data_and_a_validation_split(tmp_path, tiny_model_dir, capsys):
    from conftest import cli_fails, write_config, write_jsonl
    from test_balance import imbalanced_data

    texts = write_jsonl(tmp_path / "texts.jsonl", [{"text": f"plain text number {i}"} for i in range(40)])
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(texts)}, eval={"decision": "prior"})
    cli_fails(capsys, ["train", str(config)], "eval.decision: prior chooses among labels")
    data = {**imbalanced_data(tmp_path), "split": {"validation": 0.0, "test": 0.3}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, eval={"decision": "threshold"})
    cli_fails(capsys, ["train", str(config)], "eval.decision: threshold is chosen on the validation split")
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, eval={"decision_metric": "f2"})
    cli_fails(capsys, ["train", str(config)], "eval.decision_metric")
    assert not (tmp_path / "run").exists()
