"""train.keep_best on two sharded CPU processes (FSDP2; DeepSpeed ZeRO-3 when installed): the best
validated step's weights, saved whole, are loaded on every process, and the run ends with what one
process that trains on both shares of every step ends with."""

from __future__ import annotations

import json

import pytest
from test_sharded import STEPS, assert_same_as_one_process, launch_env, two_processes

from conftest import review_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.recipe import run_training


@pytest.mark.parametrize("accelerate_config", ["fsdp.yaml", "deepspeed_zero3.yaml"])
def test_a_sharded_run_keeps_its_best_step_as_one_process_does(tmp_path, tiny_model_dir, review_data, monkeypatch,
                                                               accelerate_config):
    if accelerate_config.startswith("deepspeed"):
        pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra: pip install 'tunesmith[deepspeed]'")
    # Validation labels are the opposite of training labels: a classifier's validation loss rises as
    # it learns, so its best validated step comes before the last.
    flip = {"fresh": "rotten", "rotten": "fresh"}
    train = write_jsonl(tmp_path / "train.jsonl", review_rows(80))
    val = write_jsonl(tmp_path / "val.jsonl", [{**r, "sentiment": flip[r["sentiment"]]} for r in review_rows(20, 3)])
    test = write_jsonl(tmp_path / "test.jsonl", review_rows(20, 4))
    data = {**review_data, "path": None, "train": str(train), "validation": str(val), "test": str(test)}
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data, objective={"name": "classification"},
                          train={"max_steps": STEPS, "batch_tokens": 64, "eval_every": 1, "save_every": 2,
                                 "threads": 1, "mixed_precision": "no", "lr": 0.05})
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    done = two_processes(config, launch_env(monkeypatch, accelerate_config), "--set", f"output.dir={sharded}")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_training(load_config(config, [f"output.dir={one}", "train.grad_accum=2"]))
    metrics = json.loads((sharded / "metrics.json").read_text())
    assert metrics["best_step"] < metrics["steps"] == STEPS
    assert f"kept step {metrics['best_step']}'s weights, the best validated" in done.stdout
    assert_same_as_one_process(sharded, one)
