"""The demo path on the real bundled SmolLM2 and Rotten Tomatoes data, for a few steps (make test-slow)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.cli import main

DEMO = Path(__file__).parent.parent / "examples" / "rotten_tomatoes_lora.yaml"


@pytest.mark.slow
def test_demo_config_runs_a_few_steps_on_smollm2(tmp_path, capsys):
    code = main(["train", str(DEMO), "--set", f"output.dir={tmp_path / 'run'}", "--set", "train.max_steps=3",
                 "--set", "train.eval_every=3", "--set", "train.eval_max_examples=20",
                 "--set", "eval.max_examples=30", "--set", "eval.samples=1"])
    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {tmp_path / 'run' / 'report.md'}"
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["tuned"]["loss"] < metrics["base"]["loss"]
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()
