"""`tunesmith data inspect` on every shipped example, with the real bundled model and data."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import main

# PPO configs (`tunesmith ppo`, tests/test_align_ppo_run.py) have no data: section.
EXAMPLES = sorted(p for p in (Path(__file__).parent.parent / "examples").glob("*.yaml")
                  if not p.read_text().startswith("# tunesmith ppo "))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_data_inspect_works_for_every_shipped_example(example, capsys):
    assert main(["data", "inspect", str(example)]) == 0
    assert "rows kept: train" in capsys.readouterr().out
