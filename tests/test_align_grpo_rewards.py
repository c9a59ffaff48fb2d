"""GRPO's rewards (align/grpo_rewards.py): a Python function named in the config, each built-in
(exact match, regex, JSON schema) against answers worked out by hand, a run's score as PPO reads it,
and their weighted sum."""

from __future__ import annotations

import pytest
from conftest import write_config

from tunesmith.align.grpo_rewards import Rewards, answer_json, fits
from tunesmith.align.options import GRPOOptions, load_grpo_config
from tunesmith.errors import TunesmithError

ROW = {"text": "a moving film", "category": "fresh", "answer": "42"}


def rewards(*specs: dict) -> Rewards:
    """The rewards of a ``grpo.rewards`` list, validated as the config validates them."""
    options = GRPOOptions(prompts="unused.jsonl", rewards=list(specs))
    return Rewards(options.rewards, "cpu")


def scores(spec: dict, answers: list[str], row: dict = ROW) -> list[float]:
    _, by_name = rewards(spec)(["prompt"] * len(answers), answers, [row] * len(answers))
    return by_name[spec["name"]]


def answer_length(prompt: str, answer: str, row: dict) -> float:
    """A reward function for the config: the answer's length, plus 100 when it names the row's category."""
    return len(answer) + 100.0 * (row["category"] in answer)


def test_a_function_named_module_colon_function_is_called_with_prompt_answer_and_row():
    assert scores({"name": "function", "function": "test_align_grpo_rewards:answer_length"},
                  ["abc", "so fresh"]) == [3.0, 108.0]


def test_a_function_in_a_python_file_is_found_beside_the_config(tmp_path):
    (tmp_path / "my_rewards.py").write_text("def shout(prompt, answer, row):\n    return answer.count('!')\n")
    config = load_grpo_config(tmp_path / "grpo.yaml", raw={
        "train": {"max_steps": 1},
        "grpo": {"prompts": "p.jsonl", "rewards": [{"name": "function", "function": "my_rewards.py:shout"}]}})
    assert config.grpo.rewards[0].function == f"{tmp_path / 'my_rewards.py'}:shout"
    _, by_name = Rewards(config.grpo.rewards, "cpu")(["p", "p"], ["hi!!", "hi"], [ROW, ROW])
    assert by_name["function"] == [2.0, 0.0]


@pytest.mark.parametrize("section", ["grpo", "ppo"])
def test_bf16_autocast_asked_of_grpo_or_ppo_is_refused_not_ignored(tmp_path, section):
    """Both train in float32; ``train.mixed_precision: bf16`` is refused with one line naming the field
    (``auto``, the default, is accepted and means float32 for them, as docs/alignment.md says)."""
    from tunesmith.align.options import load_ppo_config

    load = {"grpo": load_grpo_config, "ppo": load_ppo_config}[section]
    rewards = {"grpo": {"rewards": [{"name": "regex", "pattern": "x"}]}, "ppo": {"reward": "runs/r"}}[section]
    raw = {"train": {"max_steps": 1, "mixed_precision": "bf16"}, section: {"prompts": "p.jsonl", **rewards}}
    with pytest.raises(TunesmithError, match=f"train.mixed_precision: bf16 autocast is not implemented for "
                                             f"{section.upper()}"):
        load(tmp_path / f"{section}.yaml", raw=raw)
    raw["train"]["mixed_precision"] = "auto"
    assert load(tmp_path / f"{section}.yaml", raw=raw).train.mixed_precision == "auto"


def test_a_function_that_returns_no_number_is_one_line_naming_it():
    with pytest.raises(TunesmithError, match="reward function test_align_grpo_rewards:not_a_number returned 'x'"):
        scores({"name": "function", "function": "test_align_grpo_rewards:not_a_number"}, ["a"])


def not_a_number(prompt: str, answer: str, row: dict) -> str:
    return "x"


def test_exact_match_against_a_column_of_the_answer_or_of_one_json_field():
    exact = {"name": "exact", "column": "answer"}
    assert scores(exact, ["42", " 42\n", "42.", "The answer is 42"]) == [1.0, 1.0, 0.0, 0.0]
    labelled = {"name": "exact", "column": "category", "json_field": "sentiment",
                "label_map": {"fresh": "positive", "rotten": "negative"}}
    answers = ['{"sentiment": "positive", "reason": "moving"}', '{"sentiment": "negative"}', "positive",
               '```json\n{"sentiment": "positive"}\n```', '{"sentiment": "Positive"}', '["positive"]',
               '{"sentiment": ["positive"]}']
    assert scores(labelled, answers) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert scores({**labelled, "ignore_case": True}, answers)[4] == 1.0
    assert scores(labelled, ['{"sentiment": "negative"}'], {"category": "rotten"}) == [1.0]


def test_a_regex_is_searched_for_anywhere_unless_anchored():
    assert scores({"name": "regex", "pattern": r"\d+"}, ["it is 42", "none"]) == [1.0, 0.0]
    assert scores({"name": "regex", "pattern": r"^\d+$"}, ["42", "it is 42"]) == [1.0, 0.0]


SCHEMA = {"type": "object", "required": ["sentiment", "reason"], "additionalProperties": False,
          "properties": {"sentiment": {"enum": ["positive", "negative"]},
                         "reason": {"type": "string", "minLength": 1, "maxLength": 20},
                         "stars": {"type": "integer", "minimum": 1, "maximum": 5},
                         "tags": {"type": "array", "items": {"type": "string", "pattern": "^[a-z]+$"},
                                  "maxItems": 2}}}
# (answer, fits SCHEMA), each worked out by reading the schema.
CASES = [
    ('{"sentiment": "positive", "reason": "moving"}', True),
    ('```json\n{"sentiment": "negative", "reason": "dull"}\n```', True),  # a fenced block is read
    ('Here it is: {"sentiment": "positive", "reason": "moving"}', False),  # text around JSON is not JSON
    ('{"sentiment": "positive"}', False),  # reason is required
    ('{"sentiment": "neutral", "reason": "meh"}', False),  # not in the enum
    ('{"sentiment": "positive", "reason": ""}', False),  # minLength
    ('{"sentiment": "positive", "reason": "an overlong reason text"}', False),  # maxLength
    ('{"sentiment": "positive", "reason": "ok", "extra": 1}', False),  # additionalProperties: false
    ('{"sentiment": "positive", "reason": "ok", "stars": 5}', True),
    ('{"sentiment": "positive", "reason": "ok", "stars": 5.0}', True),  # 5.0 is an integer in JSON Schema
    ('{"sentiment": "positive", "reason": "ok", "stars": 6}', False),  # maximum
    ('{"sentiment": "positive", "reason": "ok", "stars": true}', False),  # a boolean is not a number
    ('{"sentiment": "positive", "reason": "ok", "tags": ["fun", "sad"]}', True),
    ('{"sentiment": "positive", "reason": "ok", "tags": ["Fun"]}', False),  # pattern
    ('{"sentiment": "positive", "reason": "ok", "tags": ["a", "b", "c"]}', False),  # maxItems
    ('["positive", "ok"]', False),  # not an object
    ("not json at all", False),
]


@pytest.mark.parametrize(("answer", "expected"), CASES, ids=[str(i) for i in range(len(CASES))])
def test_json_schema_validity_as_worked_out_by_hand(answer, expected):
    assert scores({"name": "json_schema", "schema": SCHEMA}, [answer]) == [float(expected)]


def test_json_values_keep_their_json_types():
    assert fits(None, {"type": "null"}) and not fits(0, {"type": "null"}) and fits(1, {"type": "number"})
    assert not fits(True, {"enum": [1]}) and fits(1.0, {"const": 1}) and fits(True, {"type": "boolean"})
    assert answer_json("```\n[1, 2]\n```") == [1, 2]


def test_rewards_are_summed_with_their_weights_and_kept_by_name():
    r = rewards({"name": "regex", "pattern": "a", "weight": 0.5}, {"name": "regex", "pattern": "b"},
                {"name": "exact", "column": "answer", "weight": -2.0})
    total, by_name = r(["p"] * 3, ["ab", "b", "42"], [ROW] * 3)
    assert r.names == ["regex_1", "regex_2", "exact"]
    assert by_name == {"regex_1": [1.0, 0.0, 0.0], "regex_2": [1.0, 1.0, 0.0], "exact": [0.0, 0.0, 1.0]}
    assert total.tolist() == [1.5, 1.0, -2.0]


def test_a_run_reward_is_the_runs_score_as_ppo_reads_it(tmp_path, tiny_model_dir, review_data):
    from tunesmith.align.rewards import load_reward
    from tunesmith.config import load_config
    from tunesmith.recipe import run_training

    config = write_config(tmp_path / "classifier.yaml", tiny_model_dir, review_data,
                          train={"max_steps": 2, "eval_every": 2}, output={"dir": str(tmp_path / "classifier")},
                          objective={"name": "classification"})
    run_training(load_config(config))
    answers = ["the film is great", "the plot is dull and boring"]
    spec = {"name": "run", "run": str(tmp_path / "classifier"), "label": "negative"}
    assert scores(spec, answers) == pytest.approx(load_reward(tmp_path / "classifier", "negative")(["p"] * 2, answers))
    with pytest.raises(TunesmithError, match=r"grpo.rewards.0.label: 'glowing' is not a label"):
        rewards({**spec, "label": "glowing"})
