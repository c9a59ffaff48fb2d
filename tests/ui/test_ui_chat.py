"""The chat page: an adapter's answer streams in (what the page assembled from the server-sent events
is what the server logged), with its token usage; two models side by side."""

from __future__ import annotations

import re

from playwright.sync_api import expect

from tunesmith.store import db as store


def served(store_path, prompt: str) -> dict[str, str]:
    """{model: answer} of what the server logged for ``prompt``."""
    db = store.connect(store_path)
    try:
        rows = db.execute("SELECT run, answer FROM answers WHERE source = 'served' AND prompt = ?", (prompt,))
        return {row["run"]: row["answer"] for row in rows}
    finally:
        db.close()


def send(page, message: str) -> None:
    page.fill("#message", message)
    page.press("#message", "Enter")


def test_chat_with_an_adapter_streams_its_answer(ui_server, page, shot):
    page.goto(ui_server.url + "/ui/chat")
    expect(page.locator("#model-a option[value='alpha']")).to_have_count(1)
    page.select_option("#model-a", "alpha")
    send(page, "tell me about the film")
    answer = page.locator("[data-testid=log-0] .msg.assistant")
    expect(answer.locator(".usage")).to_contain_text("completion")  # the usage chunk: the stream ended
    usage = answer.locator(".usage").inner_text()
    assert int(re.search(r"(\d+) completion", usage).group(1)) >= 1
    assert answer.locator(".text").text_content() == served(ui_server.store_path, "tell me about the film")["alpha"]
    expect(page.locator("[data-testid=log-0] .msg.user")).to_have_text("tell me about the film")
    shot(page, "chat")


def test_two_models_side_by_side(ui_server, page, phone_page, shot):
    base = ui_server.server.pool.base_name
    for p in (page, phone_page):
        p.goto(ui_server.url + "/ui/chat")
        expect(p.locator("#model-a option[value='beta']")).to_have_count(1)
        p.select_option("#model-a", "beta")
        p.check("#two")
        p.select_option("#model-b", base)
    prompt = "which cast was the best"
    send(page, prompt)
    for pane in ("log-0", "log-1"):
        expect(page.locator(f"[data-testid={pane}] .msg.assistant .usage")).to_have_count(1)
    logged = served(ui_server.store_path, prompt)
    assert page.locator("[data-testid=log-0] .text").last.text_content() == logged["beta"]
    assert page.locator("[data-testid=log-1] .text").last.text_content() == logged[base]
    send(phone_page, "and the plot")
    expect(phone_page.locator("[data-testid=log-1] .msg.assistant .usage")).to_have_count(1)
    assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390  # no sideways scrolling
    shot(phone_page, "chat")
