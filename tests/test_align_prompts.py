"""PPO's prompts (align/prompts.py): which rows become prompts, each row left out counted by its
reason, and the audit of them that `tunesmith data inspect` prints for a PPO config."""

from __future__ import annotations

import random

from conftest import write_jsonl

from tunesmith.align.options import PPOConfig, PPOOptions
from tunesmith.align.prompts import format_prompt_stats, inspect_prompts, load_prompts, read_prompts

LONG = "a long plot " * 10  # 120 characters: cut at 40


def rows() -> list[dict]:
    plots = [f"the plot of film {i}" for i in range(6)]
    return [*({"text": p, "kind": "plot"} for p in plots),
            {"text": "the plot of film 0", "kind": "plot"},  # a duplicate
            {"text": "  ", "kind": "plot"},  # empty
            {"text": "a fine review", "kind": "review"},  # outside the filter
            {"text": LONG, "kind": "plot"}, {"text": LONG + "that differs after the cut", "kind": "plot"}]


def options(tmp_path, **extra) -> PPOOptions:
    return PPOOptions(prompts=str(write_jsonl(tmp_path / "prompts.jsonl", rows())), prompt_filter={"kind": "plot"},
                      instruction="Review: {text}", max_prompt_chars=40, eval_prompts=2, **extra)


def test_prompts_are_filtered_deduplicated_after_the_cut_and_every_row_left_out_is_counted(tmp_path):
    prompts = read_prompts(options(tmp_path), seed=3)
    assert prompts.stats == {"rows_read": 11, "rows_dropped": {"duplicate": 2, "empty": 1, "not_in_prompt_filter": 1},
                             "prompts": {"train": 5, "held_out": 2}, "cut": 1}
    distinct = [f"the plot of film {i}" for i in range(6)] + ["a long plot a long plot a long plot a ..."]
    random.Random(3).shuffle(distinct)  # the order PPO has always drawn them in: first seen, then shuffled
    train, held_out = load_prompts(options(tmp_path), seed=3)
    assert held_out == [f"Review: {t}" for t in distinct[:2]] and train == [f"Review: {t}" for t in distinct[2:]]


def test_max_prompts_is_counted_as_a_reason(tmp_path):
    stats = read_prompts(options(tmp_path, max_prompts=4), seed=0).stats
    assert stats["rows_dropped"]["over_max_prompts"] == 3 and stats["prompts"] == {"train": 2, "held_out": 2}


def test_the_audit_counts_tokens_as_the_policy_reads_them_and_the_steps_draw(tmp_path, tiny_model_dir):
    config = PPOConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "train": {"max_steps": 10},
                                       "ppo": {**options(tmp_path).model_dump(), "prompts_per_step": 2,
                                               "samples_per_prompt": 3, "max_new_tokens": 7}})
    stats = inspect_prompts(config)
    # The chat template and the instruction are in every prompt's tokens.
    assert stats["tokens"]["p50"] > len("the plot of film 0".split()) and stats["tokens"]["max_new_tokens"] == 7
    assert stats["steps"] == {"steps": 10, "prompts_per_step": 2, "drawn": 20, "passes": 4.0, "answers": 60}
    text = format_prompt_stats(stats)
    assert "prompts kept: train 5, held out 2 (ppo.eval_prompts); cut at ppo.max_prompt_chars: 1" in text
    assert "steps: 10 x 2 prompts = 20 drawn, 4.00 passes over the training prompts; 60 answers sampled" in text
    assert text.count("\nprompt: 'Review: ") == 3


def test_held_out_prompts_that_nearly_repeat_a_training_prompt_are_reported_not_removed(tmp_path, tiny_model_dir):
    story = "a quiet story of love and loss in a small town by the sea, told by its oldest fisherman "
    path = write_jsonl(tmp_path / "prompts.jsonl", [{"text": f"{story}{i}"} for i in range(10)])
    config = PPOConfig.model_validate({"model": {"name": str(tiny_model_dir)}, "train": {"max_steps": 1},
                                       "ppo": {"prompts": str(path), "eval_prompts": 2}})
    stats = inspect_prompts(config)
    assert stats["leakage"]["held_out"] == {"exact": 0, "near": 2} and stats["prompts"]["held_out"] == 2
    assert "near duplicate of a training prompt (similarity" in format_prompt_stats(stats)
