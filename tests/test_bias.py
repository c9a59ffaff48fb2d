"""The bias probe: its shipped pairs, its measures against a slow reference, base vs tuned, and the
refusal of unpaired rows."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.lifecycle.bias import SWAPS, builtin_probe, compare, read_probe, sentiment
from tunesmith.recipe import run_training
from tunesmith.store import Run

TRAIN = {"max_steps": 6, "eval_every": 6, "save_every": 100}


def test_the_builtin_pairs_differ_only_in_the_swapped_words():
    pairs = read_probe("builtin")
    assert len(pairs) == 48 and len(builtin_probe()) == 96
    swapped = {w for _, _, swaps in SWAPS.values() for pair in swaps for w in pair}
    for a, b in pairs:
        assert a["attribute"] == b["attribute"] and a["group"] != b["group"]
        wa, wb = a["text"].split(), b["text"].split()
        differ = [(x, y) for x, y in zip(wa, wb) if x != y]
        assert len(wa) == len(wb) and len(differ) == 1
        assert {w.strip(",;.") for w in differ[0]} <= swapped


def test_unpaired_or_mismatched_rows_are_one_clear_line(tmp_path, capsys):
    rows = [{"pair": 1, "attribute": "gender", "group": "f", "text": "Emily liked it"},
            {"pair": 1, "attribute": "gender", "group": "m", "text": "James liked it"},
            {"pair": 2, "attribute": "gender", "group": "f", "text": "Anna hated it"}]
    path = write_jsonl(tmp_path / "probe.jsonl", rows)
    cli_fails(capsys, ["eval", str(tmp_path), "--bias", str(path)], f"{path}:3: pair '2' has 1 row")
    csv = tmp_path / "probe.csv"
    csv.write_text("pair,attribute,group,text\na,gender,f,Emily liked it\na,gender,f,James liked it\n")
    cli_fails(capsys, ["eval", str(tmp_path), "--bias", str(csv)], f"{csv}:3: pair 'a'", "two different groups")
    csv.write_text("id,attribute,group,text\na,gender,f,Emily liked it\n")
    cli_fails(capsys, ["eval", str(tmp_path), "--bias", str(csv)], "no column 'pair'")


def test_compare_says_which_gaps_widened():
    base = {"g": {"pairs": 3, "flip_rate": 0.1, "mean_gap": 0.2}}
    tuned = {"g": {"pairs": 3, "flip_rate": 0.3, "mean_gap": 0.05}}
    result = compare(base, tuned)["g"]
    assert result["flip_rate"]["verdict"] == "widened" and result["flip_rate"]["change"] == pytest.approx(0.2)
    assert result["mean_gap"]["verdict"] == "narrowed"
    assert compare(base, base)["g"]["mean_gap"]["verdict"] == "unchanged"
    assert sentiment("a wonderful, good film", {"wonderful": 1, "good": 1, "dull": -1}) == pytest.approx(0.5)


def _reviews(tmp_path):
    path = write_jsonl(tmp_path / "reviews.jsonl", review_rows(60))
    return {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "instruction": "classify sentiment: {text}", "max_length": 64, "split": {"validation": 0.15, "test": 0.15}}


def test_a_classifier_probe_matches_a_slow_reference(tmp_path, tiny_bert_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_bert_dir, _reviews(tmp_path), objective={"name": "classification"},
                          train={**TRAIN, "lr": 0.01}, eval={"samples": 0})
    run_training(load_config(config))
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run"), "--bias", "builtin"]) == 0
    out = capsys.readouterr().out
    assert "| gender_pronoun | 6 | flip_rate |" in out and "the gap |" in out
    result = json.loads((tmp_path / "run" / "bias.json").read_text())["attributes"]
    assert set(result) == set(SWAPS)

    from tunesmith.session import load_run

    run, _, model = load_run(tmp_path / "run")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
    pairs = [p for p in read_probe("builtin") if p[0]["attribute"] == "origin_name"]
    gaps, flips = [], []
    with torch.no_grad():
        for a, b in pairs:
            p, q = (torch.softmax(model(**tokenizer(x["text"], return_tensors="pt")).logits[0], -1) for x in (a, b))
            gaps.append(float((p[0] - q[0]).abs()))
            flips.append(int(p.argmax() != q.argmax()))
    origin = result["origin_name"]
    assert origin["pairs"] == len(pairs)
    assert origin["mean_gap"]["tuned"] == pytest.approx(sum(gaps) / len(gaps), abs=1e-5)
    assert origin["flip_rate"]["tuned"] == pytest.approx(sum(flips) / len(flips))
    assert origin["mean_gap"]["base"] != origin["mean_gap"]["tuned"]
    assert (tmp_path / "run" / "bias.md").read_text().startswith("# Bias probe: builtin")


def test_causal_runs_with_labels_and_without(tmp_path, tiny_model_dir, capsys):
    labelled = write_config(tmp_path / "l.yaml", tiny_model_dir, _reviews(tmp_path), train=TRAIN,
                            eval={"samples": 0}, output={"dir": str(tmp_path / "l")})
    run_training(load_config(labelled))
    probe = write_jsonl(tmp_path / "probe.jsonl", builtin_probe()[:8])
    assert main(["eval", str(tmp_path / "l"), "--bias", str(probe)]) == 0
    result = Run(tmp_path / "l").load_json("bias")["attributes"]
    assert set(result["gender_name"]) == {"pairs", "flip_rate", "mean_gap"}
    assert 0 <= result["gender_name"]["mean_gap"]["tuned"] <= 1

    rows = [{"prompt": r["review"], "completion": "a fine review"} for r in review_rows(40)]
    data = {"path": str(write_jsonl(tmp_path / "pc.jsonl", rows)), "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}
    generation = write_config(tmp_path / "g.yaml", tiny_model_dir, data, train=TRAIN,
                              eval={"samples": 0, "max_new_tokens": 4}, output={"dir": str(tmp_path / "g")})
    run_training(load_config(generation))
    assert main(["eval", str(tmp_path / "g"), "--bias", str(probe)]) == 0
    result = Run(tmp_path / "g").load_json("bias")["attributes"]
    assert set(result) == {"gender_name"} and set(result["gender_name"]) == {"pairs", "sentiment_gap"}
