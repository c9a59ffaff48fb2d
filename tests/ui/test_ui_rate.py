"""The rate page: three pairs rated with clicks and keys, then exported, and the exported preference
rows are the choices made (the tie is not one, as with ``tunesmith feedback export``); a score on the
1-5 scale; a rater key rates under its key id; the rate API's access and errors over HTTP, and the
abuse cases of issue 24 (a forged answer text, a choice on another key's item, prompts from the
served traffic)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect

from tunesmith.store import db as store

PROMPTS = ["Write a short review of a quiet film.", "Describe the plot of a heist movie.",
           "What makes an ending satisfying?", "Recommend a film for a rainy day."]


@pytest.fixture(scope="module")
def rating(ui_server):
    """The server, with the rate page's prompts set as ``tunesmith ui --prompts`` would."""
    ui_server.ctx.prompts = list(PROMPTS)
    yield ui_server
    ui_server.ctx.prompts = []


def query(path, sql: str, args=()) -> list:
    db = store.connect(path)
    try:
        return [dict(row) for row in db.execute(sql, args)]
    finally:
        db.close()


def start(page, url: str, a: str, b: str | None = None, mode: str = "pair", name: str | None = None):
    page.goto(url + "/ui/rate")
    expect(page.locator(f"#model-a option[value='{a}']")).to_have_count(1)
    page.select_option("#mode", mode)
    page.select_option("#model-a", a)
    if b is not None:
        page.select_option("#model-b", b)
    if name is not None:
        page.fill("#rater", name)
    page.click("#start")


def shown(page, mode: str = "pair") -> dict:
    """The prompt and answers on the page, once the answers are in and the verdict buttons are on."""
    expect(page.locator("#choose-a" if mode == "pair" else "[data-score='1']")).to_be_enabled()
    return {"prompt": page.locator("#prompt").inner_text(), "A": page.locator("#answer-a").text_content(),
            "B": page.locator("#answer-b").text_content()}


def revealed(page, side: str) -> str:
    """The model the page names for ``side`` ('a' or 'b') once the verdict is recorded."""
    name = page.locator(f"#name-{side}")
    expect(name).to_have_text(re.compile(r"^\(.+\)$"))
    return name.inner_text()[1:-1]


def test_rate_three_pairs_and_export_them(rating, page):
    base = rating.server.pool.base_name
    start(page, rating.url, "alpha", base, name="ann")
    made = []
    for verdict, how in (("A", "click"), ("B", "key"), ("tie", "key")):
        item = shown(page)
        if verdict == "A":
            page.fill("#comment", "A stays on the film")
            page.click("#choose-a")
        else:
            page.keyboard.press({"B": "2", "tie": "t"}[verdict])
        expect(page.locator("#status")).to_contain_text("recorded")
        item.update(verdict=verdict, models={"A": revealed(page, "a"), "B": revealed(page, "b")})
        assert sorted(item["models"].values()) == sorted(["alpha", base])
        made.append(item)
        page.keyboard.press("n")
    assert [m["prompt"] for m in made] == PROMPTS[:3]  # in order, each once
    expect(page.locator("#progress")).to_contain_text("ann: 3 of 4")
    assert shown(page)["prompt"] == PROMPTS[3]

    with page.expect_download() as download:
        page.click("#export")
    assert download.value.suggested_filename == "preference_pairs.jsonl"
    rows = [json.loads(line) for line in Path(download.value.path()).read_text().splitlines()]
    mine = [r for r in rows if r["prompt"] in PROMPTS and r["rater"] == "ann"]
    expected = []
    for item in made:
        if item["verdict"] == "tie":
            continue  # a tie is in the store, not in the preference data
        loser = "B" if item["verdict"] == "A" else "A"
        expected.append({"prompt": item["prompt"], "chosen": item[item["verdict"]], "rejected": item[loser],
                         "chosen_run": item["models"][item["verdict"]], "rejected_run": item["models"][loser]})
    assert [{k: r[k] for k in expected[0]} for r in mine] == expected
    expect(page.locator("#export-status")).to_contain_text(f"{len(rows)} preference pairs")

    ratings = query(rating.store_path, "SELECT r.choice, r.comment, a.source FROM ratings r "
                    "JOIN answers a ON a.id = r.answer_id WHERE r.rater = 'ann' ORDER BY r.id")
    assert [(r["choice"], r["source"]) for r in ratings] == [("first", "rated"), ("second", "rated"), ("tie", "rated")]
    assert ratings[0]["comment"] == "A stays on the film"


def test_a_rater_key_rates_under_its_key_id(rating, page, phone_page, shot):
    base = rating.server.pool.base_name
    with rating.keys(admin={"admin-secret": "admin"}, rater={"rater-secret": "rater-1"}):
        page.goto(rating.url + "/ui/rate")
        expect(page.locator("#rate-error")).to_contain_text("API key")
        page.fill("#api-key", "rater-secret")
        page.press("#api-key", "Enter")
        expect(page.locator("#who")).to_contain_text("rater-1")
        expect(page.locator("#model-a option[value='beta']")).to_have_count(1)
        assert page.locator("#rater-label").is_hidden()  # the key says who rates
        page.select_option("#model-a", "alpha")
        page.select_option("#model-b", base)
        page.click("#start")
        item = shown(page)
        page.keyboard.press("1")
        expect(page.locator("#status")).to_contain_text("recorded: A better")
        winner = revealed(page, "a")
        shot(page, "rate")
        if item["prompt"] == PROMPTS[0]:  # ann rated it too (when the test above ran): agreement shows
            expect(page.locator("#agreement")).to_contain_text("ann & rater-1")
            page.locator("#export").scroll_into_view_if_needed()
            shot(page, "rate-agreement")
    row = query(rating.store_path, "SELECT r.rater, a.run, a.prompt FROM ratings r JOIN answers a "
                "ON a.id = r.answer_id WHERE r.rater = 'rater-1'")
    assert row == [{"rater": "rater-1", "run": winner, "prompt": item["prompt"]}]

    start(phone_page, rating.url, "alpha", base, name="ann")
    shown(phone_page)
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    shot(phone_page, "rate")


def test_one_answer_on_a_scale_of_one_to_five(rating, page):
    start(page, rating.url, "beta", mode="score", name="cy")
    expect(page.locator("#model-b-label")).to_be_hidden()
    item = shown(page, "score")
    page.keyboard.press("4")
    expect(page.locator("#status")).to_contain_text("recorded: 4 of 5")
    rows = query(rating.store_path, "SELECT r.score, r.other_id, a.run, a.prompt, a.answer FROM ratings r "
                 "JOIN answers a ON a.id = r.answer_id WHERE r.rater = 'cy'")
    assert rows == [{"score": 4.0, "other_id": None, "run": "beta", "prompt": item["prompt"], "answer": item["A"]}]


def test_rate_api_access_and_errors(rating):
    api = rating.url + "/ui/api/rate"
    base = rating.server.pool.base_name
    with rating.keys(admin={"admin-secret": "admin"}, rater={"rater-secret": "rater-2"}):
        as_rater = {"Authorization": "Bearer rater-secret"}
        ask = {"models": ["alpha", base], "mode": "pair", "rater": "typed name", "max_tokens": 4}
        assert httpx.post(api + "/item", json=ask).status_code == 401
        item = httpx.post(api + "/item", json=ask, headers=as_rater, timeout=60).json()
        assert item["prompt"] in PROMPTS and len(item["answers"]) == 2 and "models" not in item
        answer = httpx.post(api + "/choice", json={"item": item["item"], "choice": "first", "rater": "typed name"},
                            headers=as_rater)
        assert answer.status_code == 200 and answer.json()["rater"] == "rater-2"  # not the typed name
        assert sorted(answer.json()["models"].values()) == sorted(["alpha", base])
        refused = httpx.get(api + "/export", headers=as_rater)  # every rater's choices: admins only
        assert refused.status_code == 403 and "exporting" in refused.json()["error"]["message"]
        assert httpx.get(api + "/export", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        bad = httpx.post(api + "/score", headers=as_rater, json={"item": item["item"], "score": 7})
        assert bad.status_code == 400 and "score" in bad.json()["error"]["message"]
        one = httpx.post(api + "/item", json={**ask, "models": ["alpha"]}, headers=as_rater)
        assert one.status_code == 400 and "mode pair takes 2 model(s), got 1" in one.json()["error"]["message"]
        long = httpx.post(api + "/choice", headers=as_rater,
                          json={"item": item["item"], "choice": "tie", "comment": "c" * 4001})
        assert long.status_code == 400 and long.json()["error"]["param"] == "comment"


def test_a_forged_choice_never_reaches_the_export(rating):
    """Issue 24: a rater posted a choice with an answer text of its own ("EVIL") and the admin export
    listed {"chosen": "EVIL"}. Answers are now looked up by the server; a choice names an item issued
    to the caller's key, and nothing else."""
    api = rating.url + "/ui/api/rate"
    base = rating.server.pool.base_name
    with rating.keys(admin={"admin-secret": "admin"}, rater={"rater-secret": "rater-3", "other-secret": "rater-4"}):
        as_rater, as_other = {"Authorization": "Bearer rater-secret"}, {"Authorization": "Bearer other-secret"}
        forged = {"prompt": PROMPTS[0], "choice": "first", "first": {"model": "alpha", "answer": "EVIL"},
                  "second": {"model": base, "answer": "meh"}}
        refused = httpx.post(api + "/choice", json=forged, headers=as_rater)
        assert refused.status_code == 400
        # Another rater's item: refused as if it did not exist, and nothing recorded.
        theirs = httpx.post(api + "/item", headers=as_other, timeout=60,
                            json={"models": ["alpha", base], "mode": "pair", "max_tokens": 4}).json()
        stolen = httpx.post(api + "/choice", json={"item": theirs["item"], "choice": "first"}, headers=as_rater)
        assert stolen.status_code == 404 and stolen.json()["error"]["param"] == "item"
        made_up = httpx.post(api + "/choice", json={"item": "made-up", "choice": "first"}, headers=as_rater)
        assert made_up.status_code == 404
        export = httpx.get(api + "/export", headers={"Authorization": "Bearer admin-secret"}).text
    assert "EVIL" not in export
    assert query(rating.store_path, "SELECT * FROM ratings WHERE rater = 'rater-3'") == []
    # What was issued is what the models answered: the text of the logged completion, by its id.
    shown = query(rating.store_path, "SELECT a.answer, a.meta FROM issued i JOIN answers a ON a.id = i.first_id "
                  "WHERE i.id = ?", (theirs["item"],))[0]
    completion = json.loads(shown["meta"])["completion_id"]
    served = query(rating.store_path, "SELECT answer, meta FROM answers WHERE id = ?", (completion,))[0]
    assert shown["answer"] == served["answer"] == theirs["answers"][0]
    assert json.loads(served["meta"])["key_id"] == "rater-4"


def test_without_prompts_the_page_never_serves_other_clients_traffic(ui_server):
    """Issue 24: without --prompts the rate page drew its prompts from every logged source, the served
    traffic included. Now only from earlier rating sessions."""
    secret = "my card is 4111 1111 1111 1111, what's my balance?"
    base = ui_server.server.pool.base_name
    prompts, ui_server.ctx.prompts = ui_server.ctx.prompts, []  # as `tunesmith ui` without --prompts
    with ui_server.keys(admin={"admin-secret": "admin"}, user={"user-secret": "app"}, rater={"rater-secret": "r"}):
        asked = httpx.post(ui_server.url + "/v1/chat/completions", headers={"Authorization": "Bearer user-secret"},
                           json={"model": base, "messages": [{"role": "user", "content": secret}], "max_tokens": 2},
                           timeout=60)
        assert asked.status_code == 200
        as_rater = {"Authorization": "Bearer rater-secret"}
        session = httpx.get(ui_server.url + "/ui/api/rate/session", headers=as_rater).json()
        earlier = query(ui_server.store_path,
                        "SELECT DISTINCT prompt FROM answers WHERE source IN ('rated', 'collected')")
        assert (session["source"], session["prompts"]) == ("earlier rating sessions", len(earlier))
        found = httpx.post(ui_server.url + "/ui/api/rate/item", headers=as_rater, timeout=120,
                           json={"models": ["alpha", base], "max_tokens": 2})
        while found.json()["index"] is not None:  # every prompt on offer, until all are rated
            item = found.json()
            assert item["prompt"] != secret
            httpx.post(ui_server.url + "/ui/api/rate/choice", headers=as_rater,
                       json={"item": item["item"], "choice": "tie"})
            found = httpx.post(ui_server.url + "/ui/api/rate/item", headers=as_rater, timeout=120,
                               json={"models": ["alpha", base], "max_tokens": 2, "after": item["index"]})
    ui_server.ctx.prompts = prompts
