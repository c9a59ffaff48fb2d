"""The commands a user runs, end to end on the tiny model: train, eval, generate, data inspect."""

from __future__ import annotations

import json

import pytest

from conftest import review_rows, write_config, write_jsonl
from tunesmith.cli import main


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("cli")
    data = write_jsonl(tmp / "reviews.jsonl", review_rows(120))
    section = {"path": str(data), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
               "instruction": "classify sentiment: {text}", "max_length": 64}
    config = write_config(tmp / "c.yaml", tiny_model_dir, section, train={"max_steps": 10},
                          output={"dir": str(tmp / "run"), "merge": True})
    assert main(["train", str(config)]) == 0
    return tmp


def test_train_prints_the_report_path_last(trained_run, capsys):
    # The fixture's output went to an earlier capture; the run directory tells the story instead.
    run = trained_run / "run"
    assert (run / "report.md").is_file()
    report = (run / "report.md").read_text()
    assert "| accuracy |" in report and "| loss |" in report and "loss.png" in report
    assert (run / "merged" / "config.json").is_file()


def test_train_cli_last_line_is_report(tmp_path, tiny_model_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"max_steps": 2})
    assert main(["train", str(config)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == f"report: {tmp_path / 'run' / 'report.md'}"


def test_eval_reports_base_and_tuned(trained_run, capsys):
    assert main(["eval", str(trained_run / "run")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    result = json.loads(out[-1])
    saved = json.loads((trained_run / "run" / "metrics.json").read_text())
    for key in ("loss", "accuracy", "macro_f1", "perplexity"):
        assert result["tuned"][key] == pytest.approx(saved["tuned"][key], rel=1e-4)
        assert result["base"][key] == pytest.approx(saved["base"][key], rel=1e-4)


def test_eval_on_another_file(trained_run, tmp_path, capsys):
    other = write_jsonl(tmp_path / "more.jsonl", review_rows(10, seed=9))
    assert main(["eval", str(trained_run / "run"), "--data", str(other)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(result) == {"base", "tuned", "classification"} and "accuracy" in result["tuned"]
    # Every row of the file scored, its figures from the same predictions as the accuracy.
    classes = result["classification"]
    assert sum(map(sum, classes["confusion"])) == 10 and classes["accuracy"] == result["tuned"]["accuracy"]


def test_generate_streams_text(trained_run, capsys):
    assert main(["generate", str(trained_run / "run"), "a great film", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip()


def test_data_inspect_prints_statistics_without_training(trained_run, capsys):
    assert main(["data", "inspect", str(trained_run / "c.yaml")]) == 0
    out = capsys.readouterr().out
    for fragment in ("rows read: 120", "labels train:", "leakage removed:", "tokens train: p50"):
        assert fragment in out
