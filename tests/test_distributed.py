"""Real multi-process training: two CPU processes over gloo, launched by torchrun as a user would,
give the weights of one process that trains on both shares of every step."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, review_rows, write_config, write_jsonl
from score_in_shares import scored_model
from test_sources import sources_data
from tunesmith.config import load_config
from tunesmith.eval.general import score_general
from tunesmith.judge import CHUNK
from tunesmith.recipe import run_training
from tunesmith.session import Session

STEPS = 4


def _adapter(run) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


@pytest.fixture
def config_file(tmp_path, tiny_model_dir, review_data):
    # Small micro-batches, so that every step has several; no dropout, so both runs draw nothing random.
    return write_config(tmp_path / "c.yaml", tiny_model_dir, review_data,
                        train={"max_steps": STEPS, "batch_tokens": 64, "eval_every": 2, "save_every": 2,
                               "threads": 1, "mixed_precision": "no", "lr": 0.05},
                        eval={"samples": 2, "max_new_tokens": 4})


def test_two_processes_match_one_process_with_both_shares(tmp_path, config_file):
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "tunesmith.cli", "train", str(config_file),
              "--set", f"output.dir={two}"]
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # One process, two micro-batches a step: the two shares the processes took.
    one = tmp_path / "one"
    run_training(load_config(config_file, [f"output.dir={one}", "train.grad_accum=2"]))

    log_two = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    log_one = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    # Only the main process wrote: one line per step and per validation, as for one process.
    assert [sorted(r) for r in log_two] == [sorted(r) for r in log_one]
    assert [r["step"] for r in log_two if "loss" in r] == list(range(1, STEPS + 1))
    for a, b in zip(log_two, log_one):
        for key in ("loss", "val_loss", "trained_tokens", "grad_norm"):  # Adam hides a gradient scale: not the norm
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-4), key
    assert json.loads((two / "status.json").read_text())["status"] == "complete"

    trained, reference = _adapter(two), _adapter(one)
    assert trained.keys() == reference.keys()
    for name, weight in reference.items():
        torch.testing.assert_close(trained[name], weight, rtol=1e-4, atol=1e-5, msg=name)
    # LoRA's B matrices start at zero: non-zero, they trained.
    assert all(w.abs().sum() > 0 for name, w in trained.items() if "lora_B" in name)

    # Evaluation on every process: each scored its share of the held-out rows and wrote its share of
    # the samples; gathered, the figures, the classification report and the samples of one process.
    assert "held-out data (2 processes, a share of the rows each)" in done.stdout
    metrics_two, metrics_one = (json.loads((run / "metrics.json").read_text()) for run in (two, one))
    for key in ("base", "tuned"):
        assert metrics_two[key] == pytest.approx(metrics_one[key], rel=1e-5), key
    assert metrics_two["test_examples"] == metrics_one["test_examples"] > 2
    report_two, report_one = metrics_two["classification"], metrics_one["classification"]
    assert report_two["confusion"] == report_one["confusion"]
    samples_two, samples_one = (json.loads((run / "base_eval.json").read_text())["samples"] for run in (two, one))
    assert samples_two == samples_one and len(samples_one) == 2


def _no_labels(tmp_path, review_data) -> dict:
    rows = [{"prompt": r["review"], "completion": r["sentiment"]} for r in review_rows(60)]
    return {"path": str(write_jsonl(tmp_path / "pc.jsonl", rows)), "format": "prompt_completion",
            "max_length": 64, "split": review_data["split"]}


# case: (the model's fixture, the data, the config's other sections)
SPLIT_CASES = {
    "causal_no_labels": ("tiny_model_dir", lambda tmp, fixtures: _no_labels(tmp, fixtures["review_data"]), {}),
    "causal_labels": ("tiny_model_dir", lambda tmp, fixtures: fixtures["review_data"], {}),
    "classification_head": ("tiny_bert_dir", lambda tmp, fixtures: fixtures["review_data"],
                            {"model": {"task": "classification"}}),
    "seq2seq_labels": ("tiny_t5_dir", lambda tmp, fixtures: fixtures["review_data"], {"objective": {"name": "seq2seq"}}),
    "mixed_sources": ("tiny_model_dir", lambda tmp, fixtures: sources_data(tmp), {}),
    **{name: ("tiny_model_dir", lambda tmp, fixtures, data=data: fixtures[data], {"objective": {"name": name}})
       for name, data in (("dpo", "preference_data"), ("reward", "preference_data"), ("kto", "unpaired_data"))},
}


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_scores_samples_and_probes_split_over_two_processes_match_one_process(request, tmp_path, review_data,
                                                                              preference_data, unpaired_data, case):
    fixture, data, sections = SPLIT_CASES[case]
    model_dir = request.getfixturevalue(fixture)
    data = data(tmp_path, {"review_data": review_data, "preference_data": preference_data,
                           "unpaired_data": unpaired_data})
    probes = {"general": {"text_chars": 800, "window": 16, "word_topics": 9}} if case == "causal_no_labels" else {}
    config = write_config(tmp_path / "c.yaml", model_dir, data, eval={"samples": 3, "max_new_tokens": 4, **probes},
                          train={"mixed_precision": "no", "batch_tokens": 64}, **sections)
    out = tmp_path / "scored.json"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), str(Path(__file__).parent / "score_in_shares.py"), str(config),
              str(out)]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    two = json.loads(out.read_text())
    assert two["processes"] == 2  # each process scored a share of the rows

    session = Session(load_config(config))
    session.prepare()
    model = scored_model(session)
    one = session.score(model)
    assert two["metrics"] == pytest.approx(one, rel=1e-5, abs=1e-6)
    if case in ("dpo", "reward", "kto"):  # figures that a model which is its own reference would not have
        assert one["reward_margin"] != 0.0
    report = session.score_report(model)[1]
    assert (two["report"] is None) == (report is None) == (case not in ("causal_labels", "classification_head"))
    if report:
        assert two["report"]["confusion"] == report["confusion"]
    assert two["samples"] == session.samples(model) and len(two["samples"]) == 3
    if probes:
        assert two["general"] == pytest.approx(score_general(model, session.tokenizer, session.config.eval.general),
                                               rel=1e-6)


def test_a_judged_run_on_two_processes_matches_one_process(tmp_path, tiny_model_dir, review_data, preference_data):
    # The judge: a classifier run, trained briefly on one process.
    judge = tmp_path / "judge"
    run_training(load_config(write_config(tmp_path / "judge.yaml", tiny_model_dir, review_data,
                                          objective={"name": "classification"}, output={"dir": str(judge)},
                                          train={"max_steps": 2, "eval_every": 2, "mixed_precision": "no"})))
    config_file = write_config(tmp_path / "dpo.yaml", tiny_model_dir, preference_data, objective={"name": "dpo"},
                               eval={"judge": str(judge)},
                               train={"max_steps": 2, "batch_tokens": 128, "eval_every": 2, "save_every": 2,
                                      "threads": 1, "mixed_precision": "no"})
    two = tmp_path / "two"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
              "--master_port", str(free_port()), "-m", "tunesmith.cli", "train", str(config_file),
              "--set", f"output.dir={two}"]
    done = subprocess.run(launch, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = tmp_path / "one"
    run_training(load_config(config_file, [f"output.dir={one}", "train.grad_accum=2"]))

    # Each process answered a share of the chunks of prompts, every answer from its own seed: the
    # answers and figures of one process. More test prompts than one chunk, so both processes had some.
    judged_two, judged_one = (json.loads((run / "judged.json").read_text()) for run in (two, one))
    assert judged_one["prompts"] > CHUNK
    for side in ("base", "tuned"):
        assert judged_two[side]["answers"] == judged_one[side]["answers"], side
        assert judged_two[side]["rewards"] == pytest.approx(judged_one[side]["rewards"], rel=1e-4, abs=1e-5), side
    figures_two, figures_one = (json.loads((run / "metrics.json").read_text())["judged"] for run in (two, one))
    for side in ("base", "tuned"):
        assert figures_two.pop(side) == pytest.approx(figures_one.pop(side), rel=1e-4, abs=1e-5), side
    assert figures_two == figures_one  # the win-rate, wins, ties and losses, and how they were drawn
    assert judged_one["tuned"]["kl"] > 1e-3  # DPO moved the model: the tuned answers are not the base's
    assert (two / "judged.png").is_file() and "## Judged by judge" in (two / "report.md").read_text()
