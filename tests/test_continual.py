"""Continual re-training (``tunesmith train --from``): it starts from the parent's weights exactly,
replays the asked share of the parent's data, records its lineage, and refuses what it cannot continue."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.config import load_config
from tunesmith.recipe import run_training
from tunesmith.session import Session, load_run
from tunesmith.store import Run
from tunesmith.train.precision import autocast

TRAIN = {"max_steps": 12, "eval_every": 6, "save_every": 100}


def _data(tmp_path, name: str, seed: int, n: int = 80) -> dict:
    path = write_jsonl(tmp_path / f"{name}.jsonl", review_rows(n, seed=seed))
    return {"path": str(path), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
            "instruction": "classify sentiment: {text}", "max_length": 64,
            "split": {"validation": 0.15, "test": 0.15}}


def _config(tmp_path, model_dir, name: str, seed: int, **sections):
    sections.setdefault("train", TRAIN)
    return write_config(tmp_path / f"{name}.yaml", model_dir, _data(tmp_path, name, seed),
                        output={"dir": str(tmp_path / name)}, **sections)


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("parent")
    run_training(load_config(_config(tmp, tiny_model_dir, "parent", seed=0)))
    return tmp / "parent"


def _first_batch_loss(model, config) -> float:
    session = Session(config)
    data = session.prepare()
    batches = session.objective.batches(data.encoded["train"])
    batch = batches.tensors(batches.epoch(0)[0])
    # Like with like: under the autocast the run trained with (bf16 where it is native, or forced).
    with torch.no_grad(), autocast(config.train.mixed_precision, torch.device("cpu")):
        return batches.loss(model.eval(), batch).item() / batches.trained_tokens(batch)


def test_from_starts_at_the_parents_weights_and_records_the_parent(tmp_path, tiny_model_dir, parent_run, capsys):
    child = _config(tmp_path, tiny_model_dir, "child", seed=1)
    assert main(["train", str(child), "--from", str(parent_run)]) == 0
    first = json.loads((tmp_path / "child" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1

    config = load_config(child)
    _, _, parent_model = load_run(parent_run)
    assert first["loss"] == pytest.approx(_first_batch_loss(parent_model, config), abs=1e-5)
    # The base's loss on that batch differs, so the equality above says something.
    from tunesmith.session import base_model

    with base_model(Session(config), parent_model, []) as base:
        assert abs(_first_batch_loss(base, config) - first["loss"]) > 1e-3

    run = Run(tmp_path / "child")
    assert run.status() == "complete" and run.parent == parent_run.resolve()
    metrics = run.load_json("metrics")
    assert set(metrics["parent"]["parent_test"]) == {"parent", "tuned"}
    assert metrics["parent"]["new_test"]["parent"]["loss"] != metrics["parent"]["new_test"]["tuned"]["loss"]
    assert "## Against the parent run" in run.report.read_text()

    capsys.readouterr()
    assert main(["runs", "show", str(tmp_path / "child")]) == 0
    shown = capsys.readouterr().out
    assert shown.index(str(parent_run)) < shown.index(str(tmp_path / "child"))
    assert main(["runs", "list", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "| child | complete | lora | causal |" in table and "| parent |" in table.splitlines()[2]


def test_the_lineage_survives_a_crashed_child(tmp_path, tiny_model_dir, parent_run, capsys):
    child = _config(tmp_path, tiny_model_dir, "crashed", seed=1)
    # The child's process dies mid-training, without a chance to write anything more.
    script = ("import os, sys; from tunesmith.config import load_config; from tunesmith.recipe import run_training; "
              "run_training(load_config(sys.argv[1]), parent=sys.argv[2], on_step=lambda s: os._exit(9))")
    done = subprocess.run([sys.executable, "-c", script, str(child), str(parent_run)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr
    run = Run(tmp_path / "crashed")
    assert run.status() == "crashed" and run.parent == parent_run.resolve()
    assert main(["runs", "show", str(run.path)]) == 0
    shown = capsys.readouterr().out
    assert str(parent_run) in shown and "[crashed]" in shown


def test_continuing_what_cannot_be_continued_is_one_clear_line(tmp_path, tiny_model_dir, parent_run, capsys):
    def fails(name, *fragments, parent=parent_run, **sections):
        config = _config(tmp_path, tiny_model_dir, name, seed=1, **sections)
        cli_fails(capsys, ["train", str(config), "--from", str(parent)], *fragments)
        assert not (tmp_path / name).exists()  # refused before anything was written

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((parent_run / "config.yaml").read_text())
    Run(unfinished).set_status("failed", error="boom")
    fails("a", "not complete (status: failed)", parent=unfinished)
    fails("b", "not a tunesmith run directory", parent=tmp_path)
    fails("c", "method lora, not full", "keeps its parent's method", method={"name": "full"})
    fails("d", "method.r is 8 here but 4", method={"r": 8})
    fails("e", "objective causal, not classification", objective={"name": "classification"})
    other = tmp_path / "other-model"
    other.mkdir()
    for f in tiny_model_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    config = write_config(tmp_path / "f.yaml", other, _data(tmp_path, "f", 1), output={"dir": str(tmp_path / "f")})
    cli_fails(capsys, ["train", str(config), "--from", str(parent_run)], "keeps its parent's base model")
    config = _config(tmp_path, tiny_model_dir, "g", seed=1, train={**TRAIN, "replay": 0.2})
    cli_fails(capsys, ["train", str(config)], "train.replay", "--from RUN")


def test_replay_draws_the_asked_share_from_the_parents_training_data(tmp_path, tiny_model_dir, parent_run):
    from tunesmith.lifecycle.continual import Continual, draw, replay_count

    assert replay_count(80, 0.2) == 20 and replay_count(80, 0.0) == 0 and replay_count(10, 0.5) == 10
    pool = [{"i": i} for i in range(5)]
    drawn = draw(pool, 12, seed=0)
    assert len(drawn) == 12 and {d["i"] for d in drawn[:5]} == set(range(5))  # each once before any twice

    config = load_config(_config(tmp_path, tiny_model_dir, "replay", seed=1, train={**TRAIN, "replay": 0.2}))
    session = Session(config)
    session.prepare()
    new = list(session.data.encoded["train"])
    continual = Continual.open(config, parent_run)
    k = continual.add_replay(session)
    items = session.data.encoded["train"]
    assert items[: len(new)] == new and len(items) == len(new) + k
    assert k / len(items) == pytest.approx(0.2, abs=0.5 / len(items))
    parent = Session(load_config(parent_run / "config.yaml"))
    parent_items = [json.dumps(e, sort_keys=True) for e in parent.prepare().encoded["train"]]
    replayed = [json.dumps(e, sort_keys=True) for e in items[len(new):]]
    assert all(r in parent_items for r in replayed) and len(set(replayed)) == k
    assert session.data.stats["replay"]["examples"] == k
    # The batches of an epoch draw on both: every example once, the replayed ones spread over the batches.
    batches = session.objective.batches(items)
    plan = batches.epoch(0)
    seen = [i for batch in plan for row in batch for i in row]
    assert sorted(seen) == list(range(len(items)))
    with_replay = [any(i >= len(new) for row in batch for i in row) for batch in plan]
    assert sum(with_replay) >= len(plan) // 2


def test_the_lifecycle_docs_commands_parse():
    import re
    import shlex
    from pathlib import Path

    from tunesmith.cli import build_parser

    text = (Path(__file__).parent.parent / "docs" / "lifecycle.md").read_text()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", text, re.S) for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("tunesmith ")]
    assert len(commands) >= 8
    for argv in commands:
        build_parser().parse_args(argv)


def test_runs_list_shows_a_run_whose_config_it_cannot_read(tmp_path, capsys):
    broken = Run(tmp_path / "broken")
    broken.set_status("failed", error="boom")
    (broken.path / "config.yaml").write_text("method: {name: nope}\n")
    assert main(["runs", "list", str(tmp_path)]) == 0
    assert "| broken | failed | ? | ? |" in capsys.readouterr().out
    cli_fails(capsys, ["runs", "list", str(tmp_path / "nowhere")], "no such directory")
