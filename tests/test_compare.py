"""`tunesmith compare` trains each method on the same splits and writes one table."""

from __future__ import annotations

import csv

from conftest import write_config
from tunesmith.cli import main


def test_compare_writes_markdown_and_csv(tmp_path, tiny_model_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"max_steps": 3})
    out = tmp_path / "cmp"
    assert main(["compare", str(config), "--methods", "full,lora", "--out", str(out),
                 "--set", "full:train.lr=5e-5", "--set", "train.weight_decay=0.1"]) == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert [r["method"] for r in rows] == ["full", "lora"]
    # METHOD:KEY=VALUE reaches that method's run only; plain overrides reach every run.
    assert [r["lr"] for r in rows] == ["5e-05", "0.05"]
    assert all("weight_decay: 0.1" in (out / m / "config.yaml").read_text() for m in ("full", "lora"))
    full, lora = rows
    assert int(lora["trainable_params"]) < int(full["trainable_params"])
    assert float(lora["stored_mb"]) < float(full["stored_mb"])
    assert all(float(r["peak_memory_mb"]) > 0 and r["test_metric"].startswith("accuracy") for r in rows)
    # Label data: each method's classification figures, and the baselines of their shared splits, once.
    assert all(0 <= float(r["macro_f1"]) <= 1 and 0 <= float(r["roc_auc"]) <= 1 and r["ece"] for r in rows)
    table = (out / "compare.md").read_text()
    assert "| method |" in table and "| macro-F1 | ROC-AUC | PR-AUC | ECE |" in table
    assert table.count("Baselines on the same splits: majority class accuracy") == 1
    assert "TF-IDF + logistic regression accuracy" in table


def test_compare_rejects_unknown_methods_before_training(tmp_path, tiny_model_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data)
    assert main(["compare", str(config), "--methods", "lora,nope", "--out", str(tmp_path / "cmp")]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()


def test_compare_rejects_overrides_for_methods_not_compared(tmp_path, tiny_model_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data)
    assert main(["compare", str(config), "--methods", "lora", "--out", str(tmp_path / "cmp"),
                 "--set", "prompt:train.lr=0.03"]) == 2
    assert "'prompt' is not one of --methods" in capsys.readouterr().err
