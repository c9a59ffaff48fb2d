"""A tiny classification run's report: the classification figures, both baselines and the training
length, in metrics.json, report.md and on the console, and the figures of `tunesmith eval`."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import review_section, write_config
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.pipeline import load_splits
from tunesmith.eval.baselines import baselines
from tunesmith.recipe import run_training
from tunesmith.session import load_run


@pytest.fixture(scope="module")
def label_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("classes")
    # No train.eval_every: the default validates about ten times a run.
    config = write_config(tmp / "c.yaml", tiny_model_dir, review_section(tmp / "reviews.jsonl"),
                          train={"max_steps": 20, "save_every": 100, "mixed_precision": "no"})
    raw = yaml.safe_load(config.read_text())
    del raw["train"]["eval_every"]
    config.write_text(yaml.safe_dump(raw))
    assert load_config(config).train.eval_every is None
    return config, tmp / "run"


def test_a_label_run_reports_classes_baselines_and_training_length(label_run, capsys):
    config, run = label_run
    run_training(load_config(config))
    out = capsys.readouterr().out
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert sum(losses[-3:]) < sum(losses[:3])
    assert [r["step"] for r in log if "val_loss" in r] == [2, 4, 6, 8, 10, 12, 14, 16, 18, 20]

    metrics = json.loads((run / "metrics.json").read_text())
    classes = metrics["classification"]
    assert classes["labels"] == ["fresh", "rotten"] and set(classes["per_class"]) == {"fresh", "rotten"}
    assert classes["macro_f1"] == pytest.approx(metrics["tuned"]["macro_f1"])
    assert classes["accuracy"] == pytest.approx(metrics["tuned"]["accuracy"])
    assert sum(map(sum, classes["confusion"])) == metrics["test_examples"] == classes["examples"]
    assert 0 <= classes["roc_auc"] <= 1 and 0 <= classes["pr_auc"] <= 1 and classes["ece_bins"] == 10
    # The baselines read the run's own splits: scored again from load_splits, they agree.
    cfg = load_config(config)
    splits, _, _ = load_splits(cfg.data)
    again = baselines(splits, splits["test"][: cfg.eval.max_examples], ["fresh", "rotten"])
    assert metrics["baselines"] == again
    assert metrics["baselines"]["tfidf_logistic"]["macro_f1"] > 0.9  # the adjective gives the label away

    report = (run / "report.md").read_text()
    for heading in ("## Classification report (tuned model, test split)", "## Against two baselines on the same splits",
                    "Confusion matrix (rows: true label, columns: predicted)", "expected calibration error"):
        assert heading in report
    assert "TF-IDF + logistic regression scores accuracy" in report and "majority class scores accuracy" in report
    assert (run / "confusion.png").read_bytes()[:4] == (run / "reliability.png").read_bytes()[:4] == b"\x89PNG"
    assert "baselines on the same test rows:" in out and "ROC-AUC" in out
    assert "planned 20 steps cover" in out and "epochs of the training split" in out
    if "training_length" in metrics:
        assert metrics["training_length"]["line"] in report and metrics["training_length"]["line"] in out


def test_the_run_trained_its_parameters(label_run):
    _, run = label_run
    _, _, model = load_run(run)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]  # they start at zero
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_eval_prints_the_classification_figures(label_run, capsys):
    _, run = label_run
    assert main(["eval", str(run)]) == 0
    out = capsys.readouterr().out
    assert "precision" in out and "ROC-AUC" in out and "ECE" in out
    assert "baselines on the same test rows: majority class accuracy" in out
    printed = json.loads(out.strip().splitlines()[-1])
    metrics = json.loads((run / "metrics.json").read_text())
    assert printed["classification"]["confusion"] == metrics["classification"]["confusion"]


def test_data_inspect_says_how_many_epochs_the_planned_steps_cover(label_run, capsys):
    config, _ = label_run
    assert main(["data", "inspect", str(config)]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("planned "))
    # 20 steps of 256-token micro-batches over 84 training examples of ~60 tokens (~4 a row).
    per_epoch = int(line.split("(")[1].split()[0])
    assert line == f"planned 20 steps cover {20 / per_epoch:.2f} epochs of the training split ({per_epoch} steps " \
                   "per epoch) (one process)" and 10 <= per_epoch <= 30
