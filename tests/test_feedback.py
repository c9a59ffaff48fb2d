"""Feedback: the terminal loop fed through stdin records choices and ratings in the store, and an
export reads back as preference data."""

from __future__ import annotations

import io
import json

import pytest

from conftest import cli_fails, preference_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import load_splits
from tunesmith.recipe import run_training
from tunesmith.store import db as store


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("dpo")
    data = {"path": str(write_jsonl(tmp / "pairs.jsonl", preference_rows(30))), "max_length": 96}
    run_training(load_config(write_config(tmp / "c.yaml", tiny_model_dir, data, objective={"name": "dpo"},
                                          train={"max_steps": 2, "eval_every": 2, "save_every": 2})))
    return tmp / "run"


def test_collect_records_choices_from_stdin(dpo_run, tmp_path, monkeypatch, capsys):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"review the film {w}"} for w in
                                                       ("one", "two", "three", "four", "five", "six")])
    # 1 for the first prompt, a tie, a typo then 2, a skip, then quit at the fifth.
    monkeypatch.setattr("sys.stdin", io.StringIO("1\nt\nx\n2\ns\nq\n"))
    path = tmp_path / "store.sqlite"
    assert main(["feedback", "collect", str(dpo_run), "--prompts", str(prompts), "--store", str(path),
                 "--rater", "ann", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "please answer one of" in out and "rated 2, tie 1, skipped 1" in out
    db = store.connect(path)
    answers = db.execute("SELECT run, prompt, source FROM answers").fetchall()
    assert len(answers) == 10 and {a["source"] for a in answers} == {"collected"}
    assert {a["run"] for a in answers} == {str(dpo_run), f"{dpo_run}#base"}
    ratings = db.execute("SELECT rater, choice FROM ratings ORDER BY id").fetchall()
    assert [(r["rater"], r["choice"]) for r in ratings] == [("ann", "first"), ("ann", "tie"), ("ann", "second")]


def test_collect_on_a_scale_of_one_to_five(dpo_run, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("review a film\n\nreview another film\n")
    monkeypatch.setattr("sys.stdin", io.StringIO("9\n4\n"))  # then the input ends: the loop stops
    path = tmp_path / "store.sqlite"
    assert main(["feedback", "collect", str(dpo_run), "--prompts", str(prompts), "--store", str(path),
                 "--scale", "--max-new-tokens", "3"]) == 0
    assert "rated 1" in capsys.readouterr().out
    ratings = store.connect(path).execute("SELECT score, other_id FROM ratings").fetchall()
    assert [(r["score"], r["other_id"]) for r in ratings] == [(4.0, None)]


def test_export_round_trips_to_preference_data(tmp_path, capsys):
    path = tmp_path / "store.sqlite"
    db = store.connect(path)
    for i, choice in enumerate(["first", "second", "tie"]):
        a = store.add_answer(db, source="collected", run="r1", prompt=f"prompt {i}", answer=f"answer a{i}")
        b = store.add_answer(db, source="collected", run="r2", prompt=f"prompt {i}", answer=f"answer b{i}")
        store.add_rating(db, a, rater="ann", other_id=b, choice=choice)
    out = tmp_path / "pairs.jsonl"
    assert main(["feedback", "export", "--store", str(path), "--out", str(out)]) == 0
    assert "wrote 2 preference pairs" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("answer a0", "answer b0"), ("answer b1", "answer a1")]
    splits, schema, _ = load_splits(DataConfig(path=str(out), split={"validation": 0.0, "test": 0.0}))
    assert schema.kind == "preference"
    assert sorted((e["messages"][0]["content"], e["chosen"], e["rejected"]) for e in splits["train"]) == [
        ("prompt 0", "answer a0", "answer b0"), ("prompt 1", "answer b1", "answer a1")]
    cli_fails(capsys, ["feedback", "export", "--store", str(path), "--out", str(out)], "already exists")
    # Each item has one rater: asking for two leaves every one out, and says why.
    assert main(["feedback", "export", "--store", str(path), "--out", str(tmp_path / "two.jsonl"),
                 "--min-raters", "2", "--agreement", "0.66"]) == 0
    assert f"wrote 0 preference pairs to {tmp_path / 'two.jsonl'} (items left out: 3 too_few_raters)" in \
        capsys.readouterr().out
    cli_fails(capsys, ["feedback", "export", "--store", str(path), "--out", str(tmp_path / "bad.jsonl"),
                       "--agreement", "2"], "--agreement 2.0: expected a share between 0 and 1")
    cli_fails(capsys, ["feedback", "export", "--store", str(tmp_path / "none.sqlite"), "--out", "x.jsonl"],
              "no feedback store")
