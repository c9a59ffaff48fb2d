"""Preference pairs: the three shapes of row read alike, identical and empty pairs dropped and
counted, a missing column named in one line, and the builtin Rotten Tomatoes pairs."""

from __future__ import annotations

import json

import pytest

from conftest import cli_fails, write_config, write_jsonl
from tunesmith.data.options import DataConfig
from tunesmith.data.pipeline import load_splits, resolve_data_path

PAIRS = [{"prompt": f"review film {i}", "chosen": f"a great film {i}", "rejected": f"a dull film {i}"}
         for i in range(20)]


def _load(tmp_path, rows, **data):
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    return load_splits(DataConfig(path=str(path), split={"validation": 0.0, "test": 0.0}, **data))


def _pairs(splits):
    return sorted((e["messages"][-1]["content"], e["chosen"], e["rejected"]) for e in splits["train"])


def test_plain_and_chat_forms_give_the_same_pairs(tmp_path):
    plain, schema, _ = _load(tmp_path, PAIRS)
    assert schema.kind == "preference"
    with_prompt = [{"prompt": [{"role": "user", "content": r["prompt"]}],
                    "chosen": [{"role": "assistant", "content": r["chosen"]}],
                    "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    conversations = [{"chosen": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["chosen"]}],
                      "rejected": [{"role": "user", "content": r["prompt"]}, {"role": "assistant", "content": r["rejected"]}]}
                     for r in PAIRS]
    assert _pairs(_load(tmp_path, with_prompt)[0]) == _pairs(plain)
    assert _pairs(_load(tmp_path, conversations)[0]) == _pairs(plain)
    assert len(plain["train"]) == 20 and plain["train"][0]["_input"].startswith("review film")


def test_identical_and_empty_pairs_are_dropped_and_counted(tmp_path):
    rows = PAIRS + [{"prompt": "p1", "chosen": "same answer", "rejected": "same  answer"},  # equal once cleaned
                    {"prompt": "p2", "chosen": "", "rejected": "an answer"},
                    {"prompt": "p3", "chosen": "an answer", "rejected": "   "}]
    splits, _, stats = _load(tmp_path, rows)
    assert len(splits["train"]) == 20
    assert stats["rows_dropped"] == {"identical_pair": 1, "empty": 2}


def test_a_margin_column_is_read_as_a_number(tmp_path):
    splits, schema, _ = _load(tmp_path, [{**r, "margin": i % 3} for i, r in enumerate(PAIRS)])
    assert schema.columns["margin"] == "margin"
    assert sorted({e["margin"] for e in splits["train"]}) == [0.0, 1.0, 2.0]


def test_chat_pairs_must_share_their_prompt(tmp_path):
    from tunesmith.errors import TunesmithError

    rows = [{"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
             "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}]
    with pytest.raises(TunesmithError, match=r"pairs.jsonl:1: the chosen and rejected conversations"):
        _load(tmp_path, rows)


def test_a_missing_column_is_one_line_naming_file_and_column(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in PAIRS])
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(path)})
    err = cli_fails(capsys, ["data", "inspect", str(config)], "pairs.jsonl: no column 'rejected'")
    assert len(err.strip().splitlines()) == 1


def test_builtin_rotten_tomatoes_pairs_are_deterministic(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    first = (tmp_path / "cache" / "data" / "rotten_tomatoes_pairs.v1.jsonl")
    assert resolve_data_path("builtin:rotten_tomatoes_pairs") == str(first)
    rows = [json.loads(line) for line in first.read_text().splitlines()]
    first.unlink()
    resolve_data_path("builtin:rotten_tomatoes_pairs")
    assert [json.loads(line) for line in first.read_text().splitlines()] == rows
    assert len(rows) > 100 and len({r["film"] for r in rows}) == len(rows)
    assert all(r["prompt"].startswith("Write a positive review of this film: ") and r["chosen"] != r["rejected"]
               for r in rows)


def test_causal_training_on_pairs_points_to_dpo(tmp_path, tiny_model_dir, capsys):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, {"path": str(path)})
    cli_fails(capsys, ["data", "inspect", str(config)], "use objective.name: dpo")
