"""``tunesmith retrain``: training rows from rated traffic, the promotion rule, and the whole loop
on a tiny run (a child trained, both scored, the decision logged, the alias moved only on promotion)."""

from __future__ import annotations

import json

import pytest

from conftest import cli_fails, review_rows, write_config, write_jsonl
from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.retrain.data import hold_out, rated_pairs, rated_rows, replay, unseen, user_text
from tunesmith.retrain.gate import decide
from tunesmith.store import db
from tunesmith.store.db import served_ratings
from tunesmith.store.consensus import Consensus

LABELS = ["negative", "positive"]


def _answer(store, prompt, answer, run="r"):
    return db.add_answer(store, source="served", run=run, prompt=prompt, answer=answer)


def test_rated_rows_take_each_answers_latest_rating(tmp_path):
    store = db.connect(tmp_path / "s.sqlite")
    a = _answer(store, "great film", "negative")
    db.add_rating(store, a, rater="k", score=0.0)
    db.add_rating(store, a, rater="k", label="positive")  # a person corrected it: this one counts
    b = _answer(store, "dull film", "negative")
    db.add_rating(store, b, rater="k", score=1.0)  # thumbs up: the model's answer was right
    c = _answer(store, "fine film", "positive")
    db.add_rating(store, c, rater="k", score=0.0)  # thumbs down, no right label given
    d = _answer(store, "odd film", "positive")
    db.add_rating(store, d, rater="k", label="neutral")  # not a label the run knows
    e = _answer(store, "bad film", "meh")
    db.add_rating(store, e, rater="k", score=1.0)  # approved, but not a label
    _answer(store, "never rated", "positive")
    f = _answer(store, "other adapter", "positive", run="other")
    db.add_rating(store, f, rater="k", label="positive")
    g, h = _answer(store, "pair", "positive"), _answer(store, "pair", "negative")
    db.add_rating(store, g, rater="k", other_id=h, choice="first")  # a preference, not a rating of one answer

    rows, skipped = rated_rows(served_ratings(store, "r"), LABELS)
    assert rows == [{"text": "great film", "label": "positive"}, {"text": "dull film", "label": "negative"}]
    assert skipped == {"no_right_label": 2, "label_not_a_run_label": 1}

    rows, skipped = rated_rows(served_ratings(store, "r"), [])  # a generative run keeps approved answers
    assert [r["messages"][0]["content"] for r in rows] == ["dull film", "bad film"]
    assert rows[1]["messages"][1] == {"role": "assistant", "content": "meh"}
    assert skipped == {"score_below_min": 3}


@pytest.mark.parametrize("instruction, prompt, text", [
    ("Review: {text}\nSentiment:", "Review: a {good} film\nSentiment:", "a {good} film"),
    ("{{\"review\": \"{text}\"}}", '{"review": "fine"}', "fine"),  # braces written {{ }} in the template
    ("Say {text}, then {text} again", "Say hi, then hi again", "hi"),
    ("Say {text}, then {text} again", "Say hi, then ho again", "Say hi, then ho again"),  # two texts: not it
    ("Review: {text}\nSentiment:", "plain words", "plain words"),  # sent without the template
    ("{text}", "Review: x", "Review: x"),
])
def test_user_text_takes_the_text_out_of_the_runs_template(instruction, prompt, text):
    assert user_text(prompt, instruction) == text


def test_label_rows_from_templated_prompts_hold_the_users_text(tmp_path):
    """A client asks a templated run with the template filled in; the child's row holds the text alone,
    so its own data template is not applied twice, and a test review is recognised as one."""
    store = db.connect(tmp_path / "s.sqlite")
    instruction = "Is this review positive or negative?\n{text}\nAnswer:"
    a = _answer(store, instruction.format(text="great film"), "negative")
    db.add_rating(store, a, rater="k", label="positive")
    b = _answer(store, instruction.format(text="test review"), "negative")
    db.add_rating(store, b, rater="k", score=1.0)
    rows, _ = rated_rows(served_ratings(store, "r"), LABELS, instruction=instruction)
    assert rows == [{"text": "great film", "label": "positive"}, {"text": "test review", "label": "negative"}]
    kept, dropped = unseen(rows, [{"text": "test review", "label": "negative"}])
    assert kept == rows[:1] and dropped == 1


def test_an_inputs_raters_must_agree_when_asked(tmp_path):
    store = db.connect(tmp_path / "s.sqlite")
    # Three clients asked "great film" (the model said negative each time); two corrected it to positive.
    for key, rating in (("k1", {"label": "positive"}), ("k2", {"label": "positive"}), ("k3", {"score": 1.0})):
        db.add_rating(store, _answer(store, "great film", "negative"), rater=key, **rating)
    # Two clients asked "dull film": one approved the answer, the other changed their mind to a correction.
    dull = [_answer(store, "dull film", "negative") for _ in range(2)]
    db.add_rating(store, dull[0], rater="k1", score=1.0)
    db.add_rating(store, dull[1], rater="k2", score=1.0)
    db.add_rating(store, dull[1], rater="k2", label="positive")  # k2's latest: this one counts
    db.add_rating(store, _answer(store, "odd film", "positive"), rater="k1", score=1.0)  # one rater only
    ratings = served_ratings(store, "r")

    rows, skipped = rated_rows(ratings, LABELS)  # by default: the most common verdict, ties to the latest
    assert rows == [{"text": "great film", "label": "positive"}, {"text": "dull film", "label": "positive"},
                    {"text": "odd film", "label": "positive"}]
    assert not skipped
    rows, skipped = rated_rows(ratings, LABELS, consensus=Consensus(min_raters=2))
    assert [r["text"] for r in rows] == ["great film", "dull film"] and skipped == {"too_few_raters": 1}
    rows, skipped = rated_rows(ratings, LABELS, consensus=Consensus(min_raters=2, agreement=0.66))
    assert rows == [{"text": "great film", "label": "positive"}]  # 2 of 3 agree; dull film is 1 of 2
    assert skipped == {"raters_disagree": 1, "too_few_raters": 1}
    rows, _ = rated_rows(ratings, LABELS, consensus=Consensus(agreement=0.7))
    assert [r["text"] for r in rows] == ["odd film"]  # one rater agrees with itself


def test_consensus_options_are_checked_together():
    with pytest.raises(TunesmithError) as err:
        Consensus(min_raters=0, agreement=1.5)
    assert err.value.problems == ["--min-raters 0: expected 1 or more",
                                  "--agreement 1.5: expected a share between 0 and 1 (0.66: two in three)"]


def test_unseen_drops_repeats_and_the_original_test_inputs():
    rows = [{"text": "a", "label": "positive"}, {"text": "b", "label": "negative"}, {"text": "a", "label": "negative"},
            {"messages": [{"role": "user", "content": "c"}, {"role": "assistant", "content": "x"}]}]
    kept, dropped = unseen(rows, [{"text": "b", "label": "positive"}, {"text": "c", "label": "positive"}])
    assert kept == [rows[0]] and dropped == 3


def test_hold_out_and_replay_are_seeded_and_sized():
    rows = [{"text": str(i), "label": "positive"} for i in range(50)]
    train, held = hold_out(rows, 0.2, seed=3)
    assert len(held) == 10 and len(train) == 40 and sorted(train + held, key=lambda r: int(r["text"])) == rows
    assert hold_out(rows, 0.2, seed=3) == (train, held)
    assert len(replay(rows, 20, 1.5, seed=0)) == 30 and len(replay(rows, 40, 2.0, seed=0)) == 50


def test_rated_pairs_prefer_each_good_answer_to_each_bad_one_of_its_prompt():
    marked = [{"prompt": "p", "completion": "a", "label": True}, {"prompt": "p", "completion": "b", "label": False},
              {"prompt": "p", "completion": "c", "label": False}, {"prompt": "q", "completion": "d", "label": True},
              {"prompt": "r", "completion": "e", "label": False}]
    pairs, skipped = rated_pairs(marked)
    assert pairs == [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "c"}]
    assert skipped == {"one_sided": 2}  # q has only a good answer, r only a bad one


def test_hold_out_keeps_the_rows_of_one_prompt_on_one_side():
    rows = [{"prompt": f"p{i // 3}", "chosen": str(i), "rejected": "x"} for i in range(30)]
    train, held = hold_out(rows, 0.2, seed=1)
    assert len(held) == 6 and len(train) == 24  # 2 of the 10 prompts, with their 3 pairs each
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in held}


@pytest.mark.parametrize("child_original,child_new,promote,reason", [
    (0.80, 0.70, True, "better on new data"),
    (0.795, 0.70, True, "better on new data"),  # 0.005 worse: within the tolerance of 0.01
    (0.78, 0.70, False, "worse on the original test set"),
    (0.90, 0.60, False, "not better on new data"),  # equal on new data is not better
])
def test_the_gate(child_original, child_new, promote, reason):
    parent = {"original": {"accuracy": 0.80}, "new": {"accuracy": 0.60}}
    child = {"original": {"accuracy": child_original}, "new": {"accuracy": child_new}}
    decision = decide(parent, child, "accuracy", tolerance=0.01)
    assert decision.promote is promote and reason in decision.reason
    assert decision.record()["child_new"] == child_new


def test_the_gate_on_a_loss_wants_it_lower():
    parent = {"original": {"loss": 1.0}, "new": {"loss": 2.0}}
    assert decide(parent, {"original": {"loss": 1.005}, "new": {"loss": 1.5}}, "loss", 0.01).promote
    assert not decide(parent, {"original": {"loss": 1.1}, "new": {"loss": 1.5}}, "loss", 0.01).promote
    assert not decide(parent, {"original": {"loss": 0.9}, "new": {"loss": 2.5}}, "loss", 0.01).promote


@pytest.fixture(scope="module")
def parent_run(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("retrain")
    data = write_jsonl(tmp / "reviews.jsonl", review_rows(80))
    section = {"path": str(data), "format": "classification", "columns": {"text": "review", "label": "sentiment"},
               "label_map": {"fresh": "positive", "rotten": "negative"},
               "instruction": "classify sentiment: {text}", "max_length": 64, "split": {"validation": 0.1, "test": 0.2}}
    config = write_config(tmp / "c.yaml", tiny_model_dir, section, train={"max_steps": 3, "eval_every": 100},
                          output={"dir": str(tmp / "reviews")})
    assert main(["train", str(config)]) == 0
    return tmp / "reviews"


def test_retrain_trains_scores_decides_and_logs(parent_run, tmp_path, capsys):
    store = db.connect(tmp_path / "s.sqlite")
    for i, row in enumerate(review_rows(40, seed=5)):
        label = "positive" if row["sentiment"] == "fresh" else "negative"
        answer = _answer(store, row["review"], "positive", run="reviews")
        db.add_rating(store, answer, rater="k", **({"score": 1.0} if label == "positive" else {"label": label}))
    store.close()
    child, log, aliases = tmp_path / "child", tmp_path / "decisions.jsonl", tmp_path / "aliases.json"
    argv = ["retrain", str(parent_run), "--store", str(tmp_path / "s.sqlite"), "--out", str(child),
            "--alias", "reviews-live", "--alias-file", str(aliases), "--log", str(log),
            "--set", "train.max_steps=3", "--tolerance", "0.05"]
    code = main(argv)
    record = json.loads((child / "retrain_decision.json").read_text())
    assert json.loads(log.read_text().splitlines()[-1]) == record
    assert record["rated_rows"] == 40 and record["held_out_rows"] == 8 and record["new_train_rows"] == 32
    assert record["replay_rows"] == 32 and record["original_test_rows"] == 16
    decision = record["decision"]
    for who in ("parent", "child"):
        assert set(record[f"{who}_metrics"]) == {"original", "new"}
        assert record[f"{who}_metrics"]["original"]["accuracy"] == decision[f"{who}_original"]
    # Scoring a canonical file of the parent's test split gives what the parent's own run measured.
    tuned = json.loads((parent_run / "metrics.json").read_text())["tuned"]
    assert record["parent_metrics"]["original"] == pytest.approx(tuned)
    expected = (decision["child_new"] > decision["parent_new"]
                and decision["child_original"] >= decision["parent_original"] - 0.05)
    assert decision["promote"] is expected and code == (0 if expected else 1)
    assert (json.loads(aliases.read_text()) == {"reviews-live": str(child.resolve())}) if expected else not aliases.exists()
    assert json.loads((child / "status.json").read_text())["status"] == "complete"
    # The child's own config names its data: replay and new rows in the canonical columns.
    train_rows = [json.loads(line) for line in (tmp_path / "child.data" / "train.jsonl").read_text().splitlines()]
    assert len(train_rows) == 64 and set(train_rows[0]) == {"text", "label"}

    cli_fails(capsys, argv, "already holds")  # never overwrites a child


def test_too_few_rated_answers_is_one_line(parent_run, tmp_path, capsys):
    store = db.connect(tmp_path / "s.sqlite")
    db.add_rating(store, _answer(store, "great", "positive", run="reviews"), rater="k", score=0.0)
    store.close()
    cli_fails(capsys, ["retrain", str(parent_run), "--store", str(tmp_path / "s.sqlite")],
              "0 usable rated answers", "1 no_right_label", "at least 20")


def test_bad_options_are_reported_together(parent_run, tmp_path, capsys):
    cli_fails(capsys, ["retrain", str(parent_run), "--holdout", "1.5", "--replay", "-1", "--tolerance", "-0.1"],
              "--holdout 1.5", "--replay -1.0", "--tolerance -0.1")
    cli_fails(capsys, ["retrain", str(parent_run), "--min-raters", "0"], "--min-raters 0: expected 1 or more")


def test_a_set_cannot_move_the_child_out_of_its_out_directory(parent_run, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    for moved in (f"output.dir={elsewhere}", f"output={{dir: {elsewhere}}}"):
        cli_fails(capsys, ["retrain", str(parent_run), "--out", str(tmp_path / "child"), "--set", moved,
                           "--store", str(tmp_path / "none.sqlite")], "the child's directory is --out")
    assert not elsewhere.exists() and not (tmp_path / "child").exists()


def test_dpo_rows_are_thumbs_pairs_and_the_rate_pages_choices_of_the_adapter(tmp_path):
    from tunesmith.retrain.loop import new_rows

    store = db.connect(tmp_path / "s.sqlite")
    up, down = _answer(store, "a film", "warm and funny"), _answer(store, "a film", "dull")
    db.add_rating(store, up, rater="k", score=1.0)
    db.add_rating(store, down, rater="k", score=0.0)
    # A choice on the rate page between the adapter's answer and another run's: a pair of its own.
    mine, theirs = _answer(store, "another film", "moving"), _answer(store, "another film", "boring", run="base")
    db.add_rating(store, theirs, rater="ann", other_id=mine, choice="second")
    # A choice between two other runs' answers is not this adapter's.
    x, y = _answer(store, "third film", "x", run="a"), _answer(store, "third film", "y", run="b")
    db.add_rating(store, x, rater="ann", other_id=y, choice="first")
    rows, skipped = new_rows("preference", store, served_ratings(store, "r"), "r", [], 1.0, Consensus())
    assert rows == [{"prompt": "a film", "chosen": "warm and funny", "rejected": "dull"},
                    {"prompt": "another film", "chosen": "moving", "rejected": "boring"}]
    assert not skipped
