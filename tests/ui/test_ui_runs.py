"""The runs table and a run's page, in the browser and through the JSON API."""

from __future__ import annotations

import httpx


def test_runs_page_lists_the_runs(ui_server, page, shot):
    page.goto(ui_server.url + "/ui/")
    page.wait_for_selector("tr[data-run='beta']")
    rows = page.locator("#runs-body tr")
    assert rows.count() == 2
    beta = page.locator("tr[data-run='beta']")
    assert "complete" in beta.inner_text()
    assert "alpha" in beta.inner_text()  # its parent
    shot(page, "runs")


def test_runs_api(ui_server):
    data = httpx.get(ui_server.url + "/ui/api/runs").json()
    assert {r["name"]: r["status"] for r in data["runs"]} == {"alpha": "complete", "beta": "complete"}
