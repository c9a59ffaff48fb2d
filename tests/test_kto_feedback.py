"""KTO from served thumbs: the rated answers of the request log as unpaired rows (each prompt and
answer once, by its raters' consensus), `feedback export --as kto` read back and trained on, and
`retrain --objective kto` tuning a causal run on its thumbs, up and down."""

from __future__ import annotations

import json

import pytest

from conftest import cli_fails, unpaired_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import load_splits
from tunesmith.recipe import run_training
from tunesmith.store import db
from tunesmith.store.consensus import Consensus


def _served(store, prompt, answer, run="r"):
    return db.add_answer(store, source="served", run=run, prompt=prompt, answer=answer)


def _thumbs(store, rows, run="r", rater="k"):
    """Each row served once to ``rater`` and rated thumbs up when it is good, down when it is bad."""
    for row in rows:
        db.add_rating(store, _served(store, row["prompt"], row["completion"], run), rater=rater,
                      score=1.0 if row["label"] else 0.0)


def test_served_thumbs_become_answers_marked_good_or_bad(tmp_path):
    store = db.connect(tmp_path / "s.sqlite")
    db.add_rating(store, _served(store, "great film", "a delight"), rater="k1", score=1.0)
    db.add_rating(store, _served(store, "dull film", "a delight"), rater="k1", score=0.0)
    db.add_rating(store, _served(store, "odd film", "a puzzle"), rater="k1", label="positive")  # no thumbs
    db.add_rating(store, _served(store, "other adapter", "yes", run="other"), rater="k1", score=1.0)
    pair = [_served(store, "pair", "one"), _served(store, "pair", "two")]
    db.add_rating(store, pair[0], rater="k1", other_id=pair[1], choice="first")  # a choice, not thumbs
    collected = db.add_answer(store, source="collected", run="r", prompt="terminal", answer="x")
    db.add_rating(store, collected, rater="k1", score=5.0)  # feedback collect --scale: not served traffic
    # Three clients were served the same answer to one prompt: two thumbs up, one down, changed to up.
    for key, score in (("k1", 1.0), ("k2", 1.0), ("k3", 0.0)):
        db.add_rating(store, _served(store, "same", "same answer"), rater=key, score=score)

    left_out = {}
    rows = db.rated_answers(db.served_ratings(store, "r"), left_out=left_out)
    assert [(r["prompt"], r["completion"], r["label"]) for r in rows] == [
        ("great film", "a delight", True), ("dull film", "a delight", False), ("same", "same answer", True)]
    assert rows[2]["raters"] == 3 and rows[2]["agreement"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows[0]["run"] == "r" and left_out == {"no_score": 1}
    assert len(db.rated_answers(db.served_ratings(store))) == 4  # every adapter's

    left_out = {}
    strict = db.rated_answers(db.served_ratings(store, "r"), Consensus(min_raters=2, agreement=0.8), left_out=left_out)
    assert strict == [] and left_out == {"too_few_raters": 3, "raters_disagree": 1}
    # A score counts as thumbs up from --min-score on.
    assert [r["label"] for r in db.rated_answers(db.served_ratings(store, "r"), min_score=0.0)] == [True] * 3


def test_exported_thumbs_are_kto_data_that_trains(tmp_path, tiny_model_dir, capsys):
    store = db.connect(tmp_path / "s.sqlite")
    _thumbs(store, unpaired_rows(80))
    db.add_rating(store, _served(store, "not thumbs", "x"), rater="k", label="positive")
    _thumbs(store, unpaired_rows(3, seed=9), run="other")
    store.close()
    out = tmp_path / "thumbs.jsonl"
    assert main(["feedback", "export", "--as", "kto", "--adapter", "r", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == (f"wrote 80 answers marked good or bad to {out} "
                                               "(items left out: 1 no_score)")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert set(rows[0]) == {"prompt", "completion", "label", "run", "raters", "agreement"}
    splits, schema, stats = load_splits(DataConfig(path=str(out), split={"validation": 0.0, "test": 0.0}))
    assert schema.kind == "unpaired_preference" and stats["answers"]["train"] == {"good": 40, "bad": 40}

    data = {"path": str(out), "max_length": 96, "split": {"validation": 0.15, "test": 0.15}}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "kto"},
                          method={"name": "lora", "r": 8, "alpha": 16},
                          train={"max_steps": 12, "lr": 0.02, "eval_every": 6, "mixed_precision": "no"})
    run_training(load_config(config))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["objective"] == "kto" and metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert metrics["tuned"]["reward_margin"] > 0
    # The tuned run can be served, and rated again: a KTO run tunes the same causal LM.
    from tunesmith.serve.adapters import read_run

    assert read_run(tmp_path / "run").weights.is_dir()


@pytest.fixture(scope="module")
def causal_parent(tmp_path_factory, tiny_model_dir):
    """A causal LoRA run on the good answers: what a served model was fine-tuned on."""
    tmp = tmp_path_factory.mktemp("kto-retrain")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in unpaired_rows(60, seed=1) if r["label"]]
    data = {"path": str(write_jsonl(tmp / "sft.jsonl", rows)), "max_length": 96,
            "split": {"validation": 0.1, "test": 0.2}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, data, train={"max_steps": 3, "eval_every": 100},
                          output={"dir": str(tmp / "answers")})
    assert main(["train", str(config)]) == 0
    return tmp / "answers"


def test_retrain_with_kto_tunes_a_causal_run_on_its_thumbs_up_and_down(causal_parent, tmp_path):
    store = db.connect(tmp_path / "s.sqlite")
    _thumbs(store, unpaired_rows(40, seed=7, good_every=4), run="answers")  # 10 up, 30 down
    store.close()
    child = tmp_path / "child"
    code = main(["retrain", str(causal_parent), "--objective", "kto", "--store", str(tmp_path / "s.sqlite"),
                 "--out", str(child), "--set", "train.max_steps=3", "--tolerance", "0.05",
                 "--log", str(tmp_path / "decisions.jsonl")])
    record = json.loads((child / "retrain_decision.json").read_text())
    assert code == (0 if record["decision"]["promote"] else 1)
    assert record["objective"] == "kto" and record["rated_rows"] == 40
    assert record["held_out_rows"] == 8 and record["new_train_rows"] == 32
    config = load_config(child / "config.yaml")
    assert config.objective.name == "kto" and config.objective.balance == "auto"
    assert json.loads((child / "status.json").read_text())["parent"] == str(causal_parent.resolve())
    train_rows = [json.loads(line) for line in (tmp_path / "child.data" / "train.jsonl").read_text().splitlines()]
    assert set(train_rows[0]) == {"prompt", "completion", "label"}
    new = train_rows[:record["new_train_rows"]]
    replayed = train_rows[record["new_train_rows"]:]
    assert {r["label"] for r in new} == {True, False} and replayed and all(r["label"] for r in replayed)
    # Parent and child are both scored as KTO policies against the base model; the gate reads the loss.
    for who in ("parent", "child"):
        assert {"loss", "kl", "reward_margin"} <= set(record[f"{who}_metrics"]["new"])
        assert record[f"{who}_metrics"]["new"]["loss"] == record["decision"][f"{who}_new"]
    stats = json.loads((child / "data_stats.json").read_text())
    # Thumbs down outnumber the new thumbs up, the replayed answers are all good: the weights even it out.
    assert "(balanced, on" in stats["notes"][0] and "warning" not in stats["notes"][0]


def test_retrain_with_kto_refuses_a_run_with_labels(tmp_path, tiny_model_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"max_steps": 1, "eval_every": 100})
    assert main(["train", str(config)]) == 0
    db.connect(tmp_path / "s.sqlite").close()
    cli_fails(capsys, ["retrain", str(tmp_path / "run"), "--objective", "kto", "--store", str(tmp_path / "s.sqlite")],
              "--objective kto: objective kto trains on unpaired_preference data; re-training builds "
              "classification rows (the run has labels)")
