"""Templating and label masks: loss only on answers, and always on the end-of-turn token."""

from __future__ import annotations

import pytest

from tunesmith.data.format import IGNORE, Encoder, EncodeStats, Schema, detect_schema, to_examples
from tunesmith.errors import TunesmithError


def _trained(tokenizer, item):
    return tokenizer.decode([t for t, label in zip(item["input_ids"], item["labels"]) if label != IGNORE])


def _prompt_completion(prompt, completion):
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
            "_where": "mem:1"}


@pytest.mark.parametrize("template", ["chat", "plain"])
def test_only_the_answer_and_end_of_turn_are_trained(tiny_tokenizer, template):
    encoder = Encoder(tiny_tokenizer, template, None, 128)
    item = encoder.encode(_prompt_completion("is this film great", "positive"))
    assert _trained(tiny_tokenizer, item) == "positive<|im_end|>"
    assert item["labels"][0] == IGNORE


def test_every_assistant_turn_of_a_chat_is_trained(tiny_tokenizer):
    chat = {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
                         {"role": "assistant", "content": "hello"}, {"role": "user", "content": "film"},
                         {"role": "assistant", "content": "great"}], "_where": "mem:1"}
    item = Encoder(tiny_tokenizer, "chat", None, 128).encode(chat)
    assert _trained(tiny_tokenizer, item) == "hello<|im_end|>great<|im_end|>"


def test_system_prompt_is_added_and_never_trained(tiny_tokenizer):
    encoder = Encoder(tiny_tokenizer, "chat", "be brief", 128)
    item = encoder.encode(_prompt_completion("film", "great"))
    assert "be brief" in tiny_tokenizer.decode(item["input_ids"])
    assert _trained(tiny_tokenizer, item) == "great<|im_end|>"


def test_truncation_is_counted_and_fully_truncated_examples_dropped(tiny_tokenizer):
    stats = EncodeStats()
    encoder = Encoder(tiny_tokenizer, "chat", None, 12)
    assert encoder.encode(_prompt_completion("great " * 20, "positive"), stats) is None
    assert stats.truncated == 1 and stats.dropped_no_trained_token == 1 and stats.completion_tokens_lost > 0


def test_an_example_without_trained_tokens_is_an_error(tiny_tokenizer):
    with pytest.raises(TunesmithError, match="mem:1: example has no trained token"):
        Encoder(tiny_tokenizer, "chat", None, 64).encode(
            {"messages": [{"role": "user", "content": "no answer"}], "_where": "mem:1"})


def test_long_text_becomes_blocks_with_every_token_trained(tiny_tokenizer):
    stats = EncodeStats()
    blocks = Encoder(tiny_tokenizer, "chat", None, 16).encode_text({"text": "great film " * 30}, stats)
    assert len(blocks) > 2 and all(len(b["input_ids"]) <= 16 for b in blocks)
    assert all(b["labels"] == b["input_ids"] for b in blocks)
    assert stats.split_into_blocks == 1


def test_schema_guessed_from_column_names_or_named():
    assert detect_schema([{"prompt": "a", "completion": "b"}], "f", "auto", {}).kind == "prompt_completion"
    assert detect_schema([{"text": "a", "label": "b"}], "f", "auto", {}).kind == "classification"
    assert detect_schema([{"body": "a"}], "f", "text", {"text": "body"}).columns == {"text": "body"}
    with pytest.raises(TunesmithError, match="columns found: body, x"):
        detect_schema([{"body": "a", "x": 1}], "f.csv", "auto", {})


def test_classification_rows_become_instruction_examples():
    schema = Schema("classification", {"text": "t", "label": "l"})
    (ex,) = to_examples([{"t": "nice", "l": "pos", "_line": 2}], schema, "Sentiment? {text}", "f.csv")
    assert ex["messages"][0]["content"] == "Sentiment? nice" and ex["messages"][1]["content"] == "pos"
    assert ex["label"] == "pos" and ex["_input"] == "nice" and ex["_where"] == "f.csv:2"
