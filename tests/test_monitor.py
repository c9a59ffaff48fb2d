"""``tunesmith monitor``: embeddings from the run's model, and the command end to end on a tiny run
with traffic logged to a store (reviews like the training data: no drift; other text: drift)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.monitor.embed import embed, last_hidden
from tunesmith.session import load_run
from tunesmith.store import db

OTHER = ["to be or not to be that is the question", "the lady doth protest too much methinks",
         "something is rotten in the state of denmark", "there are more things in heaven and earth horatio",
         "brevity is the soul of wit", "get thee to a nunnery why wouldst thou be a breeder of sinners",
         "frailty thy name is woman", "the rest is silence", "alas poor yorick i knew him horatio"]


def other_text(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.sample(" ".join(OTHER).split(), 8)) for _ in range(n)]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("monitor")
    data = write_jsonl(tmp / "reviews.jsonl", review_rows(120))
    section = {"path": str(data), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
               "label_map": {"fresh": "positive", "rotten": "negative"},
               "instruction": "classify sentiment: {text}", "max_length": 64}
    config = write_config(tmp / "c.yaml", tiny_model_dir, section, train={"max_steps": 4, "eval_every": 100},
                          output={"dir": str(tmp / "reviews-lora")})
    assert main(["train", str(config)]) == 0
    return tmp / "reviews-lora"


def _store(path, prompts: list[str], run: str = "reviews-lora"):
    store = db.connect(path)
    for i, prompt in enumerate(prompts):
        db.add_answer(store, source="served", run=run, prompt=prompt, answer=["positive", "negative", "meh"][i % 3])
    store.close()
    return path


def test_embeddings_are_mean_pooled_over_real_tokens_only(run_dir):
    _, session, model = load_run(run_dir)
    texts = ["a dull movie", "honestly the film is great, unlike the plot of take 3", "fun"]
    batched = embed(model, session.tokenizer, texts, batch_size=3)
    for text, row in zip(texts, batched):
        ids = torch.tensor([session.tokenizer(text)["input_ids"]])
        with torch.no_grad():
            alone = last_hidden(model, ids, torch.ones_like(ids))[0].double().mean(0)
        torch.testing.assert_close(row, alone, atol=1e-5, rtol=1e-5)


def test_traffic_like_the_training_data_is_no_drift(run_dir, tmp_path, capsys):
    # The same generator with another seed: same words, same numbering ("take 0" to "take 119").
    store = _store(tmp_path / "s.sqlite", [r["review"] for r in review_rows(120, seed=1)])
    out = tmp_path / "report"
    assert main(["monitor", str(run_dir), "--store", str(store), "--out", str(out)]) == 0
    assert "no drift" in capsys.readouterr().out
    result = json.loads((out / "monitor.json").read_text())
    assert result["mmd_p_value"] >= 0.05 and result["domain_auc"] < 0.55 and result["permutations"] == 200
    assert result["traffic"]["count"] == 120
    # The answers' labels against the training labels, with anything else counted apart.
    assert result["labels"]["answers"] == pytest.approx({"negative": 1 / 3, "positive": 1 / 3, "(other)": 1 / 3})
    assert result["labels"]["training"]["(other)"] == 0
    for name in ("report.md", "embeddings.png", "lengths.png", "mmd_null.png"):
        assert (out / name).stat().st_size > 0


def test_other_text_is_drift_with_exit_status_1(run_dir, tmp_path, capsys):
    store = _store(tmp_path / "s.sqlite", other_text(60))
    out = tmp_path / "report"
    assert main(["monitor", str(run_dir), "--store", str(store), "--out", str(out)]) == 1
    result = json.loads((out / "monitor.json").read_text())
    assert result["drift"] and result["mmd_p_value"] < 0.05 and result["domain_auc"] > 0.9
    assert "DRIFT" in (out / "report.md").read_text()


def test_since_and_adapter_select_the_prompts(run_dir, tmp_path, capsys):
    path = _store(tmp_path / "s.sqlite", other_text(30))
    _store(path, [r["review"] for r in review_rows(30, seed=2)], run="served-as")
    store = db.connect(path)
    with db.transaction(store):  # the first ten answers were logged in 2020
        store.execute("UPDATE answers SET created_at = 1577836800 WHERE rowid IN "
                      "(SELECT rowid FROM answers ORDER BY rowid LIMIT 10)")
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(path), "--since", "2021-01-01",
                       "--min-prompts", "21"], "'reviews-lora': 20 logged prompts", "since 2021-01-01",
              "at least 21")
    assert main(["monitor", str(run_dir), "--store", str(path), "--adapter", "served-as",
                 "--out", str(tmp_path / "r")]) == 0


def test_user_errors_are_one_line(run_dir, tmp_path, capsys):
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(tmp_path / "none.sqlite")], "no store there")
    store = _store(tmp_path / "s.sqlite", other_text(5))
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(store)], "5 logged prompts", "at least 20")
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(store), "--since", "yesterday"], "not an ISO 8601 time")
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(store), "--permutations", "10", "--alpha", "5",
                       "--auc-threshold", "0.2"], "at least 100", "--alpha 5.0", "--auc-threshold 0.2")
    (tmp_path / "taken").mkdir()
    cli_fails(capsys, ["monitor", str(run_dir), "--store", str(store), "--out", str(tmp_path / "taken")],
              "already exists")


def test_the_demo_script_logs_answered_and_rated_traffic(run_dir, tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parent.parent / "benchmarks" / "drift_demo.py"
    spec = importlib.util.spec_from_file_location("drift_demo", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)

    assert demo.log_traffic(run_dir, tmp_path / "hamlet.sqlite", "hamlet", 25, rate=False) == 25
    assert main(["monitor", str(run_dir), "--store", str(tmp_path / "hamlet.sqlite"), "--out", str(tmp_path / "r")]) == 1

    count = demo.log_traffic(run_dir, tmp_path / "reviews.sqlite", "reviews", 200, rate=True)
    store = db.connect(tmp_path / "reviews.sqlite")
    rated = store.execute("SELECT a.answer, r.score, r.label FROM answers a JOIN ratings r ON r.answer_id = a.id"
                          " WHERE a.run = 'reviews-lora'").fetchall()
    assert count == len(rated) == 12  # the run's whole validation split, each answer rated once
    # Thumbs up exactly when the answer was a right label; a correction (a label) otherwise.
    assert all((r["score"] == 1.0) == (r["label"] is None) for r in rated)
    assert all(r["answer"].strip() in ("positive", "negative") for r in rated if r["score"] == 1.0)
