"""eval.general: the general-ability probes against a slow reference, and the forgetting they show
for a continued run (base, parent, tuned) in metrics.json, the report and its bar chart."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.eval.general import GeneralConfig, TOPICS, probe_text, question, score_general, word_topic_questions
from tunesmith.store import Run


def _model(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(model_dir)


def test_probes_match_a_slow_reference(tiny_model_dir):
    model, tokenizer = _model(tiny_model_dir)
    cfg = GeneralConfig(text_chars=100, window=128, word_topics=8)
    scores = score_general(model, tokenizer, cfg)

    ids = tokenizer(probe_text(cfg), add_special_tokens=False, return_tensors="pt").input_ids
    assert ids.shape[1] <= 128  # one window: the reference is the model's own loss over the text
    with torch.no_grad():
        assert scores["perplexity"] == pytest.approx(math.exp(model(input_ids=ids, labels=ids).loss.item()), rel=1e-5)

    right = 0
    questions = word_topic_questions(8)
    assert sorted(t for _, t in questions) == [0, 0, 1, 1, 2, 2, 3, 3]
    for word, gold in questions:
        logps = []
        for topic in TOPICS.values():
            prompt = tokenizer(question(word), add_special_tokens=False).input_ids
            answer = tokenizer(" " + topic, add_special_tokens=False).input_ids
            full = torch.tensor([prompt + answer])
            labels = torch.tensor([[-100] * len(prompt) + answer])
            with torch.no_grad():
                logps.append(-model(input_ids=full, labels=labels).loss.item() * len(answer))
        right += int(max(range(4), key=logps.__getitem__) == gold)
    assert scores["word_topics_accuracy"] == pytest.approx(right / 8)


def _data(tmp_path, name, seed):
    path = write_jsonl(tmp_path / f"{name}.jsonl", review_rows(60, seed=seed))
    return {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "instruction": "classify sentiment: {text}", "max_length": 64, "split": {"validation": 0.15, "test": 0.15}}


def test_a_continued_run_reports_forgetting_of_base_parent_and_tuned(tmp_path, tiny_model_dir):
    from tunesmith.cli import main

    general = {"general": {"text_chars": 300, "word_topics": 4}, "samples": 0}
    train = {"max_steps": 6, "eval_every": 6, "save_every": 100}
    parent = write_config(tmp_path / "p.yaml", tiny_model_dir, _data(tmp_path, "p", 0), train=train,
                          output={"dir": str(tmp_path / "p")})
    assert main(["train", str(parent)]) == 0
    child = write_config(tmp_path / "c.yaml", tiny_model_dir, _data(tmp_path, "c", 1), eval=general,
                         train={**train, "replay": 0.2}, output={"dir": str(tmp_path / "c")})
    assert main(["train", str(child), "--from", str(tmp_path / "p")]) == 0
    run = Run(tmp_path / "c")
    points = run.load_json("metrics")["general"]
    assert list(points) == ["base", "parent", "tuned"]
    assert set(points["tuned"]) == {"perplexity", "word_topics_accuracy"}
    assert points["base"]["perplexity"] != points["parent"]["perplexity"] != points["tuned"]["perplexity"]
    report = run.report.read_text()
    assert "## Forgetting: general ability" in report and "| perplexity |" in report and "tuned - parent" in report
    assert (run.path / "forgetting.png").stat().st_size > 1000
    assert run.load_json("metrics")["parent"]["replayed_examples"] > 0


def test_general_probes_need_a_language_model_head(tmp_path, tiny_bert_dir, review_data, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_bert_dir, review_data, objective={"name": "classification"},
                          eval={"general": {}})
    cli_fails(capsys, ["train", str(config)], "eval.general: objective classification lacks the ability causal_answers")
    assert not (tmp_path / "run").exists()
