"""Multi-task mixing (data.sources): shares by weight or temperature, the mix itself, per-source
held-out rows and metrics, and one clear line for bad weights."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest
from conftest import NOUNS, POSITIVE, cli_fails, review_rows, write_config, write_jsonl


def test_shares_follow_weights_or_temperature():
    from tunesmith.data.sources import shares

    assert shares([100, 10], [3, 1], None) == [0.75, 0.25]
    assert shares([100, 10], [1, 1], 1.0) == pytest.approx([100 / 110, 10 / 110])  # T=1: by size
    hot = shares([100, 10], [1, 1], 1000.0)  # large T: nearly uniform
    assert hot[0] == pytest.approx(0.5, abs=0.01)


def test_mix_keeps_the_total_and_gives_each_source_its_share():
    from tunesmith.data.sources import mix

    big = [{"s": "big", "i": i} for i in range(90)]
    small = [{"s": "small", "i": i} for i in range(10)]
    mixed = mix([big, small], [0.5, 0.5], seed=0)
    counts = Counter(r["s"] for r in mixed)
    assert len(mixed) == 100 and counts == {"big": 50, "small": 50}
    # The small source is repeated whole (5 times each row), the big one subsampled without repeats.
    assert set(Counter(r["i"] for r in mixed if r["s"] == "small").values()) == {5}
    assert len({r["i"] for r in mixed if r["s"] == "big"}) == 50
    assert mix([big, small], [0.5, 0.5], seed=0) == mixed  # seeded


def story_rows(n: int, seed: int = 1) -> list[dict]:
    rng = random.Random(seed)
    return [{"text": f"the {rng.choice(NOUNS)} of part {i} is {rng.choice(POSITIVE)} and the "
                     f"{rng.choice(NOUNS)} is {rng.choice(POSITIVE)} too"} for i in range(n)]


def sources_data(tmp_path, **extra) -> dict:
    reviews = write_jsonl(tmp_path / "reviews.jsonl", review_rows(80))
    stories = write_jsonl(tmp_path / "stories.jsonl", story_rows(40))
    return {"sources": [
        {"path": str(reviews), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
         "instruction": "classify sentiment: {text}", "weight": 3},
        {"path": str(stories), "name": "stories", "format": "text", "weight": 1},
    ], "max_length": 64, "split": {"validation": 0.15, "test": 0.15}, **extra}


def test_two_sources_train_one_adapter_with_metrics_per_source(tmp_path, tiny_model_dir, capsys):
    from safetensors.torch import load_file

    from tunesmith.cli import main

    # Fewer test rows than the first source holds: the samples still come from both sources.
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, sources_data(tmp_path),
                          train={"max_steps": 30, "eval_every": 10, "save_every": 30},
                          eval={"max_examples": 4, "samples": 2, "max_new_tokens": 2})
    assert main(["train", str(config)]) == 0
    run = tmp_path / "run"
    stats = json.loads((run / "data_stats.json").read_text())
    mixed = stats["sources"]
    assert mixed["reviews"]["share"] == 0.75 and mixed["stories"]["format"] == "text"
    train = stats["rows"]["train"]
    assert mixed["reviews"]["train_rows_mixed"] == round(0.75 * train)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"reviews/accuracy", "reviews/loss", "stories/perplexity"} <= set(metrics["tuned"])
    assert metrics["tuned"]["stories/perplexity"] < metrics["base"]["stories/perplexity"]
    report = (run / "report.md").read_text()
    assert "| reviews: accuracy |" in report and "| stories: perplexity |" in report
    assert "source stories (text)" in report
    prompts = [sample["prompt"] for sample in json.loads((run / "base_eval.json").read_text())["samples"]]
    assert len(prompts) == 2 and prompts[0].startswith("classify sentiment") and "classify" not in prompts[1]
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert sum(losses[-5:]) < sum(losses[:5])
    lora_b = [t for name, t in load_file(run / "adapter" / "adapter_model.safetensors").items() if "lora_B" in name]
    assert lora_b and all(t.abs().sum() > 0 for t in lora_b)  # B starts at zero: every one trained


@pytest.mark.parametrize(("change", "fragment"), [
    ({"weights": [0, 0]}, "data.sources: the weights sum to 0; give at least one source a positive weight"),
    ({"weights": [-1, 1]}, "data.sources.0.weight: Input should be greater than or equal to 0"),
    ({"temperature": 2.0}, "give weights or data.temperature, not both"),
    ({"path": "x.csv"}, "give either data.sources or data.path"),
])
def test_bad_sources_are_one_clear_line(tmp_path, tiny_model_dir, capsys, change, fragment):
    data = sources_data(tmp_path)
    for source, weight in zip(data["sources"], change.pop("weights", [])):
        source["weight"] = weight
    data.update(change)
    config = write_config(tmp_path / "c.yaml", tiny_model_dir, data)
    err = cli_fails(capsys, ["train", str(config)], fragment)
    assert len(err.strip().splitlines()) == 1


def test_sources_need_an_objective_that_mixes_them(tmp_path, tiny_bert_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_bert_dir, sources_data(tmp_path),
                          objective={"name": "classification"}, method={"name": "full"})
    cli_fails(capsys, ["train", str(config)], "data.sources: objective classification lacks the ability "
              "mixes_sources", "(objectives that have it: causal)")


def test_data_max_rows_caps_each_source_that_sets_none_of_its_own():
    from tunesmith.data.options import DataConfig
    from tunesmith.data.sources import source_config

    data = DataConfig.model_validate({"sources": [{"path": "a.jsonl"}, {"path": "b.jsonl", "max_rows": 5}],
                                      "max_rows": 20})
    assert [source_config(data, s).max_rows for s in data.sources] == [20, 5]
