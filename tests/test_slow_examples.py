"""`tunesmith data inspect` on every shipped run config as shipped: all of its data, and the bundled
model's tokenizer (tests/test_examples.py inspects every example, accelerate's configs included, on
capped data with the tiny test tokenizer)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunesmith.cli import main

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_data_inspect_works_for_every_shipped_example(example, capsys):
    assert main(["data", "inspect", str(example)]) == 0
    # A PPO or GRPO config's data is the prompts it samples from.
    text = example.read_text()
    kept = "prompts kept: train " if "\nppo:" in text or "\ngrpo:" in text else "rows kept: train "
    assert kept in capsys.readouterr().out
