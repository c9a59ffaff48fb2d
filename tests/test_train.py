"""Training on a tiny model: the loss falls, only the method's parameters change, resume is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import review_rows, write_config, write_jsonl
from tunesmith.config import load_config
from tunesmith.recipe import base_eval_key, run_training


def _weights(model_dir):
    return load_file(model_dir / "model.safetensors")


def test_lora_run_learns_changes_only_adapter_and_writes_a_finished_run(tmp_path, tiny_model_dir, review_data):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, review_data))
    report = run_training(config)
    run = tmp_path / "run"
    assert report == run / "report.md" and report.is_file()
    log = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 20
    assert sum(losses[-5:]) / 5 < 0.7 * sum(losses[:5]) / 5

    metrics = json.loads((run / "metrics.json").read_text())
    for key in ("loss", "perplexity", "accuracy", "macro_f1"):
        assert key in metrics["base"] and key in metrics["tuned"]
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert json.loads((run / "status.json").read_text())["status"] == "complete"
    assert (run / "loss.png").is_file() and (run / "config.yaml").is_file()

    # The adapter is standard PEFT; its weights moved away from LoRA's zero init; the base did not move.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tuned = PeftModel.from_pretrained(base, run / "adapter")
    lora_b = [p for n, p in tuned.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    original = _weights(tiny_model_dir)
    for name, value in tuned.get_base_model().state_dict().items():
        key = name.replace(".base_layer", "")
        if "lora_" not in name and key in original:
            torch.testing.assert_close(value, original[key], msg=name)


def test_full_finetuning_changes_every_weight(tmp_path, tiny_model_dir, review_data):
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, review_data,
                                      method={"name": "full"}, train={"max_steps": 5, "lr": 0.003}))
    run_training(config)
    tuned = load_file(tmp_path / "run" / "model" / "model.safetensors")
    original = _weights(tiny_model_dir)
    for name, value in original.items():
        assert not torch.equal(tuned[name], value), f"{name} did not change"


def test_interrupted_then_resumed_equals_straight_through(tmp_path, tiny_model_dir, review_data):
    def run(dirname, interrupt_at=None):
        path = write_config(tmp_path / f"{dirname}.yaml", tiny_model_dir, review_data,
                            output={"dir": str(tmp_path / dirname)},
                            method={"dropout": 0.1}, train={"max_steps": 8, "save_every": 100, "grad_accum": 2})
        config = load_config(path)

        def stop(state):
            if state.step == interrupt_at:
                raise KeyboardInterrupt

        if interrupt_at:
            with pytest.raises(KeyboardInterrupt):
                run_training(config, on_step=stop)
            status = json.loads((tmp_path / dirname / "status.json").read_text())["status"]
            assert status == "interrupted"
            assert not (tmp_path / dirname / "metrics.json").exists()
            run_training(config, resume=True)
        else:
            run_training(config)
        return load_file(tmp_path / dirname / "adapter" / "adapter_model.safetensors")

    straight = run("straight")
    resumed = run("resumed", interrupt_at=3)
    assert straight.keys() == resumed.keys()
    for name in straight:
        torch.testing.assert_close(resumed[name], straight[name], rtol=0, atol=0, msg=name)


def _over_fitting_run(tmp_path, tiny_model_dir, review_data, interrupt_at=None, objective=None, **train):
    # Validation labels are the opposite of training labels: the better the model learns, the worse
    # validation gets, so the best validated step comes early (a causal run's validation loss falls
    # at first, while it learns the labels' tokens; a classifier's rises from the start).
    flip = {"fresh": "rotten", "rotten": "fresh"}
    train_rows = write_jsonl(tmp_path / "train.jsonl", review_rows(80))
    val = write_jsonl(tmp_path / "val.jsonl", [{**r, "sentiment": flip[r["sentiment"]]} for r in review_rows(20, 3)])
    test = write_jsonl(tmp_path / "test.jsonl", review_rows(20, 4))
    data = {**review_data, "path": None, "train": str(train_rows), "validation": str(val), "test": str(test)}
    sections = {"objective": {"name": objective}} if objective else {}
    config = load_config(write_config(tmp_path / "c.yaml", tiny_model_dir, data, train=train, **sections))
    if interrupt_at:
        def stop(state):
            if state.step == interrupt_at:
                raise KeyboardInterrupt

        with pytest.raises(KeyboardInterrupt):
            run_training(config, on_step=stop)
        run_training(config, resume=True)
    else:
        run_training(config)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    vals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in r]
    return config, metrics, vals


def _loss_of_saved_weights(config, run_dir) -> float:
    from tunesmith.session import load_run
    from tunesmith.train.precision import autocast

    _, session, model = load_run(run_dir)
    validation = session.prepare().encoded["validation"]
    with autocast(config.train.mixed_precision, torch.device("cpu")):  # as validation ran in training
        return session.objective.batches(validation).mean_loss(model, validation)


def test_early_stopping_restores_the_best_checkpoint(tmp_path, tiny_model_dir, review_data):
    config, metrics, vals = _over_fitting_run(tmp_path, tiny_model_dir, review_data,
                                              max_steps=40, eval_every=2, patience=2)
    assert metrics["stopped_early"] and metrics["steps"] < 40
    best = min(vals, key=lambda r: r["val_loss"])
    assert metrics["best_step"] == best["step"] < metrics["steps"]
    # The restored weights are the best step's: evaluating them gives the best validation loss.
    assert _loss_of_saved_weights(config, tmp_path / "run") == pytest.approx(best["val_loss"], rel=1e-4)


@pytest.mark.parametrize("keep_best", [True, False])
def test_an_over_fitted_run_keeps_its_best_step_unless_told_not_to(tmp_path, tiny_model_dir, review_data, capsys,
                                                                   keep_best):
    config, metrics, vals = _over_fitting_run(tmp_path, tiny_model_dir, review_data,
                                              objective="classification", max_steps=40, eval_every=4,
                                              keep_best=keep_best)
    out = capsys.readouterr().out
    best = min(vals, key=lambda r: r["val_loss"])
    assert not metrics["stopped_early"] and metrics["steps"] == 40 and metrics["best_step"] == best["step"] < 40
    kept = best if keep_best else vals[-1]
    assert vals[-1]["step"] == 40 and vals[-1]["val_loss"] > best["val_loss"]
    assert _loss_of_saved_weights(config, tmp_path / "run") == pytest.approx(kept["val_loss"], rel=1e-4)
    length = metrics["training_length"]
    assert length["verdict"] == "over-fitted" and length["best_step"] == best["step"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert length["line"] in report and length["line"] in out
    if keep_best:
        assert f"kept step {best['step']}'s weights, the best validated" in out
        assert length["line"].endswith(f"step {best['step']}'s weights are kept, not the last step's")
    else:
        assert "kept the last step's weights (step 40, train.keep_best false)" in out
        assert length["line"].endswith(f"the last step's weights are kept, not step {best['step']}'s (train.keep_best)")


def test_a_resumed_run_keeps_the_best_step_validated_before_it_was_interrupted(tmp_path, tiny_model_dir, review_data,
                                                                               capsys):
    # best.safetensors and the best step and loss (in the checkpoint's loop state) survive the resume.
    config, metrics, vals = _over_fitting_run(tmp_path, tiny_model_dir, review_data, interrupt_at=32,
                                              objective="classification", max_steps=40, eval_every=4)
    best = min(vals, key=lambda r: r["val_loss"])
    assert metrics["best_step"] == best["step"] < 32 and metrics["steps"] == 40
    assert f"kept step {best['step']}'s weights, the best validated" in capsys.readouterr().out
    assert _loss_of_saved_weights(config, tmp_path / "run") == pytest.approx(best["val_loss"], rel=1e-4)


def test_the_base_evaluation_key_ignores_what_a_search_varies_and_not_the_data(tmp_path, tiny_model_dir, review_data):
    path = write_config(tmp_path / "c.yaml", tiny_model_dir, review_data, train={"max_steps": 2})
    key = base_eval_key(load_config(path))
    assert base_eval_key(load_config(path, ["train.lr=0.05", "method.r=2", "output.dir=elsewhere"])) == key
    for other in ("data.max_length=40", "eval.max_examples=3", "train.batch_tokens=512"):
        assert base_eval_key(load_config(path, [other])) != key, other
