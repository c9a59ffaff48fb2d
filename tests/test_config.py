"""Configuration: YAML + --set overrides, every invalid field reported at once, shipped examples valid."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from tunesmith.cli import build_parser
from tunesmith.config import apply_overrides, load_config, save_config, validate_config
from tunesmith.errors import TunesmithError

# Every run config (train, search, ppo, grpo); examples/accelerate/ holds accelerate's own configs, which
# tests/test_accelerate_configs.py checks.
EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


def test_overrides_parse_types_and_nest():
    raw = apply_overrides({"data": {"path": "x.csv"}}, ["train.lr=1e-4", "train.max_steps=3", "output.merge=true",
                                                        "data.columns.text=review"])
    config = validate_config(raw)
    assert config.train.lr == 1e-4 and config.train.max_steps == 3 and config.output.merge is True
    assert config.data.columns.text == "review"


@pytest.mark.parametrize(("given", "expected"), [("no", "no"), ("off", "no"), ("auto", "auto"), ("bf16", "bf16")])
def test_mixed_precision_reads_yaml_booleans_as_words(given, expected):
    # YAML reads a bare `no` as False: `--set train.mixed_precision=no` must still mean "no".
    raw = apply_overrides({"data": {"path": "x.csv"}}, [f"train.mixed_precision={given}"])
    assert validate_config(raw).train.mixed_precision == expected


def test_every_invalid_field_is_reported_at_once_with_its_path(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "x.csv"}, "train": {"lr": -1, "batch_tokens": 0, "epochs": 0},
                                    "method": {"rank": 8}}))
    with pytest.raises(TunesmithError) as err:
        load_config(path)
    text = str(err.value)
    for fragment in ("train.lr", "train.batch_tokens", "train.epochs", "method.rank: unknown field"):
        assert fragment in text
    assert len(err.value.problems) == 4
    assert all(p.startswith(f"{path}: ") for p in err.value.problems)


def test_bad_override_syntax_and_missing_config(tmp_path):
    with pytest.raises(TunesmithError, match="expected key.sub=value"):
        apply_overrides({}, ["novalue"])
    with pytest.raises(TunesmithError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  path: a.csv\n train: [\n")
    with pytest.raises(TunesmithError, match=r"c.yaml:\d+: invalid YAML"):
        load_config(path)


def test_split_fractions_must_leave_training_rows():
    with pytest.raises(TunesmithError, match="data.split"):
        validate_config({"data": {"path": "a.csv", "split": {"validation": 0.5, "test": 0.5}}})


def test_data_paths_resolve_relative_to_the_config_and_round_trip(tmp_path):
    (tmp_path / "d.csv").write_text("text\nhello\n")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"data": {"path": "d.csv"}}))
    config = load_config(path)
    assert config.data.path == str(tmp_path / "d.csv")
    save_config(config, tmp_path / "saved.yaml")
    assert load_config(tmp_path / "saved.yaml") == config


def _loaders() -> dict:
    """Each command that runs a config, and the loader it reads the config with (no training)."""
    from tunesmith.align.options import load_grpo_config, load_ppo_config
    from tunesmith.search.study import load_plan

    return {"train": load_config, "search": lambda path: load_plan(str(path), []), "ppo": load_ppo_config,
            "grpo": load_grpo_config}


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_shipped_examples_load_and_open_with_their_command(example):
    first = example.read_text().splitlines()[0]
    assert first.startswith("# tunesmith "), first
    args = build_parser().parse_args(shlex.split(first.removeprefix("# tunesmith ")))
    assert args.config == f"examples/{example.name}"
    loaders = _loaders()
    assert args.command in loaders, f"{first}: no loader known for tunesmith {args.command}"
    loaders[args.command](example)


def test_there_are_examples():
    assert EXAMPLES


def test_an_option_the_method_does_not_take_is_an_error_naming_what_it_takes():
    with pytest.raises(TunesmithError) as err:
        validate_config({"data": {"path": "x.csv"}, "method": {"name": "prefix", "r": 8, "num_virtual_tokens": 0}})
    assert sorted(err.value.problems) == [
        "config: method.num_virtual_tokens: Input should be greater than or equal to 1",
        "config: method.r: unknown field; method prefix takes num_virtual_tokens",
    ]
    with pytest.raises(TunesmithError, match="method.name: unknown method 'nope'; known: full, lora"):
        validate_config({"data": {"path": "x.csv"}, "method": {"name": "nope"}})
    assert validate_config({"data": {"path": "x.csv"}, "method": {"r": 4}}).method.name == "lora"


def test_objective_section_and_the_model_task_alias():
    config = validate_config({"data": {"path": "x.csv"}})
    assert config.objective.name == "causal"
    assert validate_config({"data": {"path": "x.csv"}, "model": {"task": "seq2seq"}}).objective.name == "seq2seq"
    with pytest.raises(TunesmithError, match="disagree"):
        validate_config({"data": {"path": "x.csv"}, "model": {"task": "seq2seq"}, "objective": {"name": "causal"}})
    with pytest.raises(TunesmithError, match="objective.name: unknown objective 'nope'"):
        validate_config({"data": {"path": "x.csv"}, "objective": {"name": "nope"}})
    # An objective that cannot use the method says so at load time, with the other problems.
    with pytest.raises(TunesmithError) as err:
        validate_config({"data": {"path": "x.csv"}, "objective": {"name": "classification"},
                         "method": {"name": "prompt"}, "train": {"lr": 0}})
    assert len(err.value.problems) == 2
    assert "method.name: prompt serves causal LMs only, not objective classification" in str(err.value)
