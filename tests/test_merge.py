"""tunesmith merge: PEFT's weighted adapters as a new run, the merged full model, and refusals."""

from __future__ import annotations

import shutil

import pytest
import torch
import yaml

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.recipe import run_training
from tunesmith.session import load_run
from tunesmith.store import Run


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("merge")
    runs = []
    for name, seed, instruction in (("a", 0, "classify sentiment: {text}"), ("b", 1, "is this review positive? {text}")):
        data = {"path": str(write_jsonl(tmp / f"{name}.jsonl", review_rows(60, seed=seed))), "format": "classification",
                "columns": {"text": "review", "label": "sentiment"}, "instruction": instruction, "max_length": 64,
                "split": {"validation": 0.15, "test": 0.15}}
        config = write_config(tmp / f"{name}.yaml", tiny_model_dir, data, output={"dir": str(tmp / name)},
                              train={"max_steps": 6, "eval_every": 6, "save_every": 100}, eval={"samples": 0})
        run_training(load_config(config))
        runs.append(tmp / name)
    return runs


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_linear_merge_weighted_1_0_is_the_first_adapter(tmp_path, two_runs, capsys):
    out = tmp_path / "merged"
    assert main(["merge", *map(str, two_runs), "--how", "linear", "--weights", "1", "0", "--out", str(out),
                 "--into-base"]) == 0
    _, _, first = load_run(two_runs[0])
    _, _, second = load_run(two_runs[1])
    _, _, merged = load_run(out)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    assert torch.allclose(_logits(merged, ids), _logits(first, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(second, ids), atol=1e-3)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "merged")  # no tunesmith, no PEFT
    assert torch.allclose(_logits(plain, ids), _logits(first, ids), atol=1e-5)
    assert list((out / "merged").glob("*.safetensors"))

    run = Run(out)
    assert run.status() == "complete" and len(run.record()["merged_from"]) == 2
    tests = run.load_json("metrics")["tests"]
    assert len(tests) == 2
    first_scores = tests[str(two_runs[0].resolve())]
    assert first_scores["merged"]["loss"] == pytest.approx(first_scores["alone"]["loss"], abs=1e-5)
    report = run.report.read_text()
    assert report.count("## On the test set of") == 2 and "a alone" in report and "b alone" in report


def test_ties_and_svd_merges_write_runs_that_differ_from_either_parent(tmp_path, two_runs):
    from tunesmith.lifecycle.merge import merge_runs

    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    _, _, first = load_run(two_runs[0])
    for how in ("ties", "svd"):
        merge_runs(two_runs, how, [0.5, 0.5], tmp_path / how)
        _, _, merged = load_run(tmp_path / how)
        assert not torch.allclose(_logits(merged, ids), _logits(first, ids), atol=1e-4)


def test_merging_what_cannot_merge_is_one_clear_line(tmp_path, two_runs, capsys):
    other = tmp_path / "r8"
    shutil.copytree(two_runs[1], other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["method"]["r"] = 8
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    runs = [str(two_runs[0]), str(other)]
    cli_fails(capsys, ["merge", *runs, "--how", "ties", "--out", str(tmp_path / "x")],
              "--how ties: needs adapters of one rank", "a r=4, r8 r=8", "--how svd")
    cli_fails(capsys, ["merge", *runs, "--weights", "1", "--out", str(tmp_path / "x")], "1 weights for 2 runs")
    cli_fails(capsys, ["merge", runs[0], "--out", str(tmp_path / "x")], "at least two runs")
    Run(other).set_status("interrupted")
    cli_fails(capsys, ["merge", *runs, "--how", "svd", "--out", str(tmp_path / "x")], "not complete (status: interrupted)")
    assert not (tmp_path / "x").exists()


def test_ia3_runs_merge_and_fold_into_the_base_with_the_adapters_logits(tmp_path, tiny_model_dir, two_runs, capsys):
    runs = []
    for name, seed in (("i", 0), ("j", 1)):
        data = {"path": str(write_jsonl(tmp_path / f"{name}.jsonl", review_rows(40, seed=seed))),
                "format": "classification", "columns": {"text": "review", "label": "sentiment"}, "max_length": 64,
                "split": {"validation": 0.15, "test": 0.15}}
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, data, method={"name": "ia3"},
                              output={"dir": str(tmp_path / name)}, eval={"samples": 0},
                              train={"max_steps": 6, "eval_every": 6, "save_every": 100, "lr": 0.05,
                                     "mixed_precision": "no"})
        run_training(load_config(config))
        runs.append(str(tmp_path / name))
    out = tmp_path / "merged"
    assert main(["merge", *runs, "--weights", "1", "0", "--out", str(out), "--into-base"]) == 0
    ids = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64]])
    _, _, first = load_run(runs[0])
    _, _, second = load_run(runs[1])
    _, _, merged = load_run(out)
    with first.disable_adapter():
        base = _logits(first, ids)
    assert not torch.allclose(_logits(first, ids), base, atol=1e-4), "the (IA)³ vectors must have trained"
    assert torch.allclose(_logits(merged, ids), _logits(first, ids), atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(second, ids), atol=1e-4)

    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(out / "merged", torch_dtype=torch.float32)  # no PEFT
    assert torch.allclose(_logits(plain, ids), _logits(first, ids), atol=1e-5)
    run = Run(out)
    assert run.load_config().method.name == "ia3" and run.load_json("metrics")["method"] == "ia3"
    assert "2 ia3 adapters" in run.report.read_text()

    cli_fails(capsys, ["merge", *runs, "--how", "ties", "--out", str(tmp_path / "x")],
              "merge --how ties: ia3 adapters merge by linear only")
    cli_fails(capsys, ["merge", runs[0], str(two_runs[0]), "--out", str(tmp_path / "x")],
              "adapters merge only with adapters of their method")
    assert not (tmp_path / "x").exists()


def test_a_method_that_cannot_merge_is_refused_naming_the_ability(tmp_path, two_runs, capsys):
    other = tmp_path / "dora"
    shutil.copytree(two_runs[1], other)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["method"]["use_dora"] = True
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    cli_fails(capsys, ["merge", str(two_runs[0]), str(other), "--out", str(tmp_path / "x")],
              f"merge: {other}: method lora, with its options, lacks the ability merges",
              "(methods that merge: lora, ia3; a LoRA adapter with DoRA does not)")
    assert not (tmp_path / "x").exists()


def test_dpo_adapters_merge_like_causal_ones(tmp_path, tiny_model_dir, capsys):
    # A DPO run tunes the same causal LM with a LoRA adapter: what served feedback aligns can merge.
    from conftest import preference_rows

    runs = []
    for name, seed in (("p", 0), ("q", 1)):
        data = {"path": str(write_jsonl(tmp_path / f"{name}.jsonl", preference_rows(24, seed=seed))), "max_length": 96,
                "split": {"validation": 0.2, "test": 0.2}}
        config = write_config(tmp_path / f"{name}.yaml", tiny_model_dir, data, objective={"name": "dpo"},
                              output={"dir": str(tmp_path / name)},
                              train={"max_steps": 4, "eval_every": 4, "save_every": 100}, eval={"samples": 0})
        run_training(load_config(config))
        runs.append(str(tmp_path / name))
    assert main(["merge", *runs, "--out", str(tmp_path / "merged")]) == 0
    merged = Run(tmp_path / "merged")
    assert merged.status() == "complete" and merged.load_config().objective.name == "dpo"
    tests = merged.load_json("metrics")["tests"]
    assert set(tests) == set(runs) and all("accuracy" in figures["merged"] for figures in tests.values())
