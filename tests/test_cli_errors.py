"""Every bad input gets one clear line per problem and exit status 2, never a traceback."""

from __future__ import annotations

import json

import pytest

from conftest import cli_fails, review_rows, write_config, write_jsonl




def _config(tmp_path, model_dir, data, **sections):
    return str(write_config(tmp_path / "c.yaml", model_dir, data, **sections))


def test_missing_data_file(tmp_path, tiny_model_dir, review_data, capsys):
    review_data["path"] = str(tmp_path / "nowhere.jsonl")
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data)], "nowhere.jsonl", "not found")
    assert not (tmp_path / "run").exists()


def test_malformed_json_line_names_the_line(tmp_path, tiny_model_dir, review_data, capsys):
    path = tmp_path / "reviews.jsonl"
    lines = path.read_text().splitlines()
    lines[6] = '{"review": "broken", "sentiment": '
    path.write_text("\n".join(lines) + "\n")
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data)], "reviews.jsonl:7")


def test_misnamed_column_lists_the_columns_found(tmp_path, tiny_model_dir, review_data, capsys):
    review_data["columns"]["text"] = "revew"
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data)], "'revew'", "review, sentiment")


def test_no_rows_left_after_cleaning(tmp_path, tiny_model_dir, review_data, capsys):
    review_data["min_chars"] = 10_000
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data)], "no rows left after cleaning",
           "too_short")


def test_label_in_test_never_in_train(tmp_path, tiny_model_dir, review_data, capsys):
    train = write_jsonl(tmp_path / "train.jsonl", review_rows(40))
    test_rows = review_rows(6, seed=5)
    test_rows[0]["sentiment"] = "mixed"
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    data = {**review_data, "path": None, "train": str(train), "test": str(test),
            "label_map": {"fresh": "positive", "rotten": "negative", "mixed": "mixed"}}
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, data)], "label 'mixed'", "never in train")


def test_unknown_method_and_invalid_hyperparameter_together(tmp_path, tiny_model_dir, review_data, capsys):
    err = cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data), "--set", "method.name=magic",
                          "--set", "train.lr=-3"], "unknown method 'magic'", "train.lr")
    assert len(err.strip().splitlines()) == 2


def test_a_set_value_that_is_not_yaml_is_one_line_naming_it(tmp_path, tiny_model_dir, review_data, capsys):
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data), "--set", "output.dir=[unclosed"],
              "--set 'output.dir=[unclosed'", "not valid YAML")


def test_unknown_model(tmp_path, review_data, capsys):
    cli_fails(capsys, ["train", _config(tmp_path, tmp_path / "no-such-model", review_data)], "unknown model")


def test_existing_run_is_never_overwritten(tmp_path, tiny_model_dir, review_data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "status.json").write_text(json.dumps({"status": "complete"}))
    (run / "metrics.json").write_text("{}")
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data)], "already holds a run",
           "--resume")
    assert (run / "metrics.json").read_text() == "{}"


def test_resume_of_a_run_that_never_started(tmp_path, tiny_model_dir, review_data, capsys):
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, review_data), "--resume"], "no run there to resume")


def test_example_without_trained_token(tmp_path, tiny_model_dir, capsys):
    rows = [{"prompt": f"question {i}", "completion": "answer"} for i in range(20)]
    rows[3]["completion"] = " "
    # Cleaning drops the empty completion; a chat with no assistant turn has nothing to train.
    chat = [{"messages": [{"role": "user", "content": f"hello {i}"}, {"role": "assistant", "content": "hi"}]}
            for i in range(20)]
    chat[4]["messages"] = [{"role": "user", "content": "only a question"}]
    path = write_jsonl(tmp_path / "chat.jsonl", chat)
    data = {"path": str(path), "max_length": 64}
    cli_fails(capsys, ["train", _config(tmp_path, tiny_model_dir, data)], "chat.jsonl:5", "no trained token")


@pytest.mark.parametrize("command", [["eval"], ["generate"]])
def test_eval_and_generate_need_a_run_dir(tmp_path, capsys, command):
    argv = [*command, str(tmp_path)] + (["hello"] if command == ["generate"] else [])
    cli_fails(capsys, argv, "not a tunesmith run directory")
