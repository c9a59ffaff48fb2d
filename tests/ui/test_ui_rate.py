"""The rate page: three pairs rated with clicks and keys, then exported, and the exported preference
rows are the choices made (the tie is not one, as with ``tunesmith feedback export``); a score on the
1-5 scale; a rater key rates under its key id; the rate API's access and errors over HTTP."""

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
    choice = {"prompt": "p", "first": {"model": "alpha", "answer": "x"}, "second": {"model": "beta", "answer": "y"},
              "choice": "first", "rater": "typed name"}
    with rating.keys(admin={"admin-secret": "admin"}, rater={"rater-secret": "rater-2"}):
        assert httpx.post(api + "/choice", json=choice).status_code == 401
        as_rater = {"Authorization": "Bearer rater-secret"}
        answer = httpx.post(api + "/choice", json=choice, headers=as_rater)
        assert answer.status_code == 200 and answer.json()["rater"] == "rater-2"  # not the typed name
        refused = httpx.get(api + "/export", headers=as_rater)  # every rater's choices: admins only
        assert refused.status_code == 403 and "exporting" in refused.json()["error"]["message"]
        assert httpx.get(api + "/export", headers={"Authorization": "Bearer admin-secret"}).status_code == 200
        bad = httpx.post(api + "/score", headers=as_rater,
                         json={"prompt": "p", "answer": {"model": "alpha", "answer": "x"}, "score": 7})
        assert bad.status_code == 400 and "score" in bad.json()["error"]["message"]
        one = httpx.get(api + "/next", params={"models": ["alpha"], "mode": "pair"}, headers=as_rater)
        assert one.status_code == 400 and "mode pair takes 2 model(s), got 1" in one.json()["error"]["message"]
