"""A classifier run served: ``/v1/score`` answers each label's probability and the label the run's
decision rule chooses, the same label ``tunesmith predict`` gives for the same text."""

from __future__ import annotations

import csv
import json
import math

import httpx
import pytest
from conftest import review_rows, write_config, write_jsonl

from tunesmith.cli import main
from tunesmith.eval.decision import Decision
from tunesmith.serve.access import Access
from tunesmith.serve.server import build_server

KEY = "score-me"


def _predict(run, data, out) -> list[dict]:
    assert main(["predict", str(run), "--data", str(data), "--out", str(out)]) == 0
    return list(csv.DictReader(out.open()))


def test_a_served_classifier_answers_the_label_its_decision_rule_chooses_as_predict_does(tmp_path, tiny_model_dir):
    data = {"path": str(write_jsonl(tmp_path / "reviews.jsonl", review_rows(120))), "format": "classification",
            "columns": {"text": "review", "label": "sentiment"}, "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "classification"},
                          train={"max_steps": 6, "eval_every": 6}, eval={"decision": "threshold"})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    labels = json.loads((run / "labels.json").read_text())
    texts = [r["review"] for r in review_rows(24, seed=7)]
    new = write_jsonl(tmp_path / "new.jsonl", [{"review": t} for t in texts])
    # The recorded rule moves the threshold so that it answers otherwise than argmax on some of these
    # rows: between the two highest probabilities of the second label when argmax answers it twice
    # or more, else between the two lowest.
    first = _predict(run, new, tmp_path / "first.csv")
    p = sorted(float(r[f"p_{labels[1]}"]) for r in first)
    cut = (p[-1] + p[-2]) / 2 if p[-2] > 0.5 else (p[0] + p[1]) / 2
    rule = Decision("threshold", "macro_f1", {labels[0]: 0.0, labels[1]: math.log((1 - cut) / cut)},
                    {"argmax": 0.0, "threshold": 0.0}, cut)
    (run / "decision.json").write_text(json.dumps(rule.to_json()))
    predicted = _predict(run, new, tmp_path / "predicted.csv")

    server = build_server({"clf": run}, access=Access({KEY: "user-1"}), log_requests=False)
    with server.in_thread() as url:
        headers = {"Authorization": f"Bearer {KEY}"}
        models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
        scores = f"P({labels[0]})"  # neither label is named positive: the first is scored
        assert next(m for m in models if m["id"] == "clf")["scores"] == scores
        answer = httpx.post(url + "/v1/score", headers=headers, json={"model": "clf", "input": texts}, timeout=60)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scores"] == scores and body["decision"] == "threshold"
    served = body["data"]
    assert [d["index"] for d in served] == list(range(len(texts)))
    assert [d["label"] for d in served] == [r["prediction"] for r in predicted]
    for d, row in zip(served, predicted):
        assert d["probabilities"] == pytest.approx({label: float(row[f"p_{label}"]) for label in labels}, abs=1e-6)
        assert d["score"] == d["probabilities"][labels[0]]
    by_argmax = [max(labels, key=d["probabilities"].get) for d in served]
    assert by_argmax != [d["label"] for d in served]  # the rule, not argmax, chose some labels
