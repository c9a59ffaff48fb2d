"""The Rate page's API (``ui/rate.py``): items issued by the server from logged completions, choices
and scores on them in the feedback store, progress, agreement between raters (checked against
hand-worked values), and the export, which is ``feedback export``'s."""

from __future__ import annotations

import json

import pytest
from conftest import cli_fails
from pydantic import ValidationError

from tunesmith import feedback
from tunesmith.store import db as store
from tunesmith.serve.errors import ApiError
from tunesmith.store.consensus import Consensus
from tunesmith.ui import rate
from tunesmith.ui.rate import ChoiceBody, ScoreBody


@pytest.fixture
def db(tmp_path):
    connection = store.connect(tmp_path / "store.sqlite")
    yield connection
    connection.close()


def served(db, model, prompt, key):
    """A completion the server logged as answered to ``key``; its id (chatcmpl-N, the store's Nth answer)."""
    n = db.execute("SELECT COUNT(*) FROM answers").fetchone()[0]
    return store.add_answer(db, source="served", id=f"chatcmpl-{n}", run=model, prompt=prompt,
                            answer=f"{model} on {prompt}", meta={"key_id": key})


def issue(db, prompt, models, key):
    return rate.issue(db, key, prompt, [(m, served(db, m, prompt, key)) for m in models])["item"]


def choose(db, prompt, a, b, choice, rater="ann", comment="", key=None):
    """``rater`` was issued model ``a``'s answer as A and ``b``'s as B, and chose."""
    item = issue(db, prompt, [a, b], key or rater)
    return rate.record_choice(db, ChoiceBody(item=item, choice=choice, comment=comment), key or rater, rater)[0]


def score(db, prompt, model, value, rater="ann"):
    item = issue(db, prompt, [model], rater)
    return rate.record_score(db, ScoreBody(item=item, score=value), rater, rater)[0]


def test_a_choice_is_two_rated_answers_and_one_rating(db):
    choose(db, "p1", "lora", "base", "second", comment="B is on topic")
    answers = db.execute("SELECT id, source, run, prompt, answer, meta FROM answers WHERE source = 'rated' "
                         "ORDER BY rowid").fetchall()
    assert [(a["run"], a["answer"]) for a in answers] == [("lora", "lora on p1"), ("base", "base on p1")]
    assert json.loads(answers[0]["meta"]) == {"completion_id": "chatcmpl-0", "shown_as": "A", "served_run": "lora"}
    (rating,) = db.execute("SELECT * FROM ratings").fetchall()
    assert (rating["answer_id"], rating["other_id"]) == (answers[0]["id"], answers[1]["id"])
    assert (rating["choice"], rating["rater"], rating["comment"]) == ("second", "ann", "B is on topic")


def test_the_answers_rated_are_the_logged_completions_never_the_clients_text(db):
    with pytest.raises(ValidationError, match="Extra inputs"):  # no field takes answer text
        ChoiceBody(item="x", choice="first", first={"model": "lora", "answer": "EVIL"})
    mine, theirs = served(db, "lora", "p1", "ann"), served(db, "base", "p1", "bob")
    with pytest.raises(ApiError, match="no completion 'chatcmpl-1' served to key 'ann'") as err:
        rate.issue(db, "ann", "p1", [("lora", mine), ("base", theirs)])  # bob's answer, not shown to ann
    assert err.value.status == 404
    assert db.execute("SELECT COUNT(*) FROM issued").fetchone()[0] == 0
    issued = rate.issue(db, "ann", "p1", [("lora", mine), ("base", served(db, "base", "p1", "ann"))])
    assert issued["answers"] == ["lora on p1", "base on p1"]
    rating, models = rate.record_choice(db, ChoiceBody(item=issued["item"], choice="first"), "ann", "ann")
    assert models == {"A": "lora", "B": "base"}
    (pair,) = store.preference_pairs(db)
    assert (pair["chosen"], pair["rejected"]) == ("lora on p1", "base on p1")


def test_a_key_rates_only_the_items_issued_to_it(db):
    item = issue(db, "p1", ["lora", "base"], "ann")
    for key, made_up in (("bob", item), ("ann", "made-up")):  # another key's item, an item never issued
        body = ChoiceBody(item=made_up, choice="first")
        with pytest.raises(ApiError, match="was issued to key") as err:
            rate.record_choice(db, body, key, key)
        assert (err.value.status, err.value.param) == (404, "item")
    with pytest.raises(ApiError, match="a score needs an item of one answer"):
        rate.record_score(db, ScoreBody(item=item, score=3), "ann", "ann")
    assert db.execute("SELECT COUNT(*) FROM ratings").fetchone()[0] == 0
    # Open (no keys): every caller is `local`, and the name typed on the page is the rater.
    local = issue(db, "p2", ["lora", "base"], "local")
    rate.record_choice(db, ChoiceBody(item=local, choice="tie"), "local", rate.rater_name("local", "cy"))
    assert db.execute("SELECT rater FROM ratings").fetchone()[0] == "cy"


def test_export_is_feedback_exports_file_and_matches_the_choices(db, tmp_path):
    choose(db, "p1", "lora", "base", "first")
    choose(db, "p2", "base", "lora", "first")
    choose(db, "p3", "lora", "base", "tie")
    left_out = {}
    assert rate.export_jsonl(db, Consensus(min_raters=2), left_out) == ("", 0)
    assert left_out == {"too_few_raters": 3}
    text, n = rate.export_jsonl(db)
    assert n == 2
    out = tmp_path / "cli.jsonl"
    feedback.export(db, out)
    assert text == out.read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    assert [(r["prompt"], r["chosen_run"], r["rejected_run"], r["chosen"]) for r in rows] == [
        ("p1", "lora", "base", "lora on p1"), ("p2", "base", "lora", "base on p2")]  # the tie is not a pair


def test_a_score_is_one_answer_rated_one_to_five(db):
    score(db, "p1", "lora", 4)
    (rating,) = db.execute("SELECT score, other_id, choice FROM ratings").fetchall()
    assert tuple(rating) == (4.0, None, None)
    for bad in (0, 6):
        with pytest.raises(ValidationError):
            ScoreBody(item="x", score=bad)
    with pytest.raises(ValidationError):
        ChoiceBody(item="x", choice="both")
    with pytest.raises(ValidationError, match="at most 4000 characters"):
        ChoiceBody(item="x", choice="first", comment="c" * 4001)


def test_verdicts_name_the_winning_model_whatever_the_order_and_keep_a_raters_latest(db):
    choose(db, "p1", "lora", "base", "first")
    choose(db, "p1", "base", "lora", "first")  # ann changed her mind, with the sides the other way round
    choose(db, "p1", "lora", "base", "tie", rater="bob")
    choose(db, "p2", "lora", "base", "second", rater="bob")
    assert rate.verdicts(db, "pair") == {("p1", ("base", "lora")): {"ann": "base", "bob": "tie"},
                                         ("p2", ("base", "lora")): {"bob": "base"}}
    score(db, "p1", "lora", 2)
    score(db, "p1", "lora", 5)
    assert rate.verdicts(db, "score") == {("p1", ("lora",)): {"ann": 5.0}}


def test_scores_of_served_answers_are_not_session_verdicts(db):
    answer = served(db, "lora", "p1", "api")
    store.add_rating(db, answer, rater="api", score=1.0)  # thumbs up through /v1/feedback
    assert rate.verdicts(db, "score") == {}


def test_progress_and_next_prompt_per_rater(db):
    prompts = ["p1", "p2", "p3"]
    models = ["lora", "base"]
    choose(db, "p2", "base", "lora", "tie", rater="ann")
    choose(db, "p1", "lora", "base", "first", rater="bob")
    choose(db, "p1", "lora", "other", "first", rater="ann")  # other models: another item
    found = rate.verdicts(db, "pair")
    assert rate.progress(prompts, models, "ann", found) == {
        "total": 3, "rater": "ann", "rated_by_rater": 1, "rated_by_anyone": 2, "raters": 2}
    assert rate.next_prompt(prompts, models, "ann", found) == 0
    assert rate.next_prompt(prompts, models, "ann", found, after=0) == 2
    assert rate.next_prompt(prompts, models, "ann", found, after=2) == 0  # wraps round
    assert rate.next_prompt(prompts, models, "bob", found, after=0) == 1
    choose(db, "p1", "base", "lora", "first", rater="ann")
    choose(db, "p3", "base", "lora", "first", rater="ann")
    assert rate.next_prompt(prompts, models, "ann", rate.verdicts(db, "pair")) is None


def test_cohen_kappa_against_a_worked_example():
    # 50 items: both yes 20, both no 15, yes/no 5, no/yes 10. Observed 0.7; chance 0.5*0.6 + 0.5*0.4 = 0.5.
    pairs = [("y", "y")] * 20 + [("n", "n")] * 15 + [("y", "n")] * 5 + [("n", "y")] * 10
    assert rate.cohen_kappa(pairs) == pytest.approx(0.4)
    assert rate.cohen_kappa([("y", "y"), ("n", "n")]) == pytest.approx(1.0)
    assert rate.cohen_kappa([("y", "y"), ("y", "y")]) is None  # chance agreement 1: undefined


def test_agreement_per_rater_pair_pooled_and_lights_kappa():
    found = {("p1", ("a", "b")): {"ann": "a", "bob": "a", "cy": "b"},
             ("p2", ("a", "b")): {"ann": "b", "bob": "a"},
             ("p3", ("a", "b")): {"ann": "tie"},  # one rater: nothing to agree on
             ("p4", ("a", "a")): {"ann": "a", "bob": "a"}}  # two samples of one model: left out
    result = rate.agreement(found)
    assert result["items"] == 2
    by_pair = {tuple(p["raters"]): p for p in result["pairs"]}
    assert {k: (p["items"], p["agreement"]) for k, p in by_pair.items()} == {
        ("ann", "bob"): (2, 0.5), ("ann", "cy"): (1, 0.0), ("bob", "cy"): (1, 0.0)}
    # ann & bob: observed 0.5, chance (1*2 for 'a') / 4 = 0.5, kappa 0; the others: chance 0, kappa 0.
    assert by_pair[("ann", "bob")]["kappa"] == pytest.approx(0.0)
    assert result["agreement"] == pytest.approx(1 / 4)
    assert result["kappa"] == pytest.approx(0.0)
    assert rate.agreement({}) == {"items": 0, "pairs": [], "agreement": None, "kappa": None}


def test_session_prompts_from_the_file_else_earlier_sessions_never_the_served_traffic(db):
    assert rate.session_prompts(db, ["q1", "q2"]) == (["q1", "q2"], "prompts file")
    assert rate.session_prompts(db, None) == ([], "earlier rating sessions")
    for prompt in ("a client's question, with their email ann@example.com", "another client's"):
        served(db, "base", prompt, "user-1")
    assert rate.session_prompts(db, []) == ([], "earlier rating sessions")
    for prompt, source in (("rated before", "rated"), ("collected", "collected"), ("rated before", "rated")):
        store.add_answer(db, source=source, run="base", prompt=prompt, answer="x")
    assert rate.session_prompts(db, []) == (["rated before", "collected"], "earlier rating sessions")


def test_the_rater_is_the_key_id_and_a_typed_name_only_when_open():
    assert rate.rater_name("local", " ann ") == "ann"
    assert rate.rater_name("local", "") == "local"
    assert rate.rater_name("rater-1", "ann") == "rater-1"


def test_a_mode_takes_its_number_of_models():
    rate.check_models("pair", ["a", "b"])
    rate.check_models("score", ["a"])
    with pytest.raises(rate.TunesmithError, match="mode pair takes 2"):
        rate.check_models("pair", ["a"])


def test_ui_prompts_file_errors_name_the_file_before_any_model_loads(tmp_path, capsys):
    (tmp_path / "prompts.jsonl").write_text('{"question": "q"}\n')
    cli_fails(capsys, ["ui", "--dir", str(tmp_path), "--prompts", str(tmp_path / "none.jsonl")],
              "none.jsonl", "not found")
    cli_fails(capsys, ["ui", "--dir", str(tmp_path), "--prompts", str(tmp_path / "prompts.jsonl")],
              "prompts.jsonl: no column 'prompt'", "question")
