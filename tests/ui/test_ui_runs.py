"""The runs table, a run's page and the compare page: in the browser, and through the JSON API."""

from __future__ import annotations

import json

import httpx


def test_runs_table_lists_and_filters_the_runs(ui_server, page, shot):
    page.goto(ui_server.url + "/ui/")
    page.wait_for_selector("tr[data-run='beta']")
    assert page.locator("#runs-body tr").count() >= 2
    assert page.locator("#runs-head th").all_inner_texts() == [
        "", "run", "status", "method", "objective", "loss", "accuracy", "macro_f1", "parent", "updated"]
    beta = page.locator("tr[data-run='beta']")
    assert "complete" in beta.inner_text()
    assert "alpha" in beta.locator("td").nth(-2).inner_text()  # its parent
    shot(page, "runs")
    page.fill("#filter", "beta")
    page.wait_for_function("document.querySelectorAll('#runs-body tr').length === 1")
    assert page.locator("#runs-body tr").get_attribute("data-run") == "beta"


def test_a_run_page_shows_its_curve_report_and_config(ui_server, ui_env, page, shot):
    page.goto(ui_server.url + "/ui/run?name=alpha")
    page.wait_for_selector("#curve path.series[data-name='training loss']")
    path = page.locator("#curve path.series[data-name='training loss']")
    steps = sum(1 for line in (ui_env.runs["alpha"] / "metrics.jsonl").read_text().splitlines() if '"loss"' in line)
    assert int(path.get_attribute("data-points")) == steps > 1
    assert path.get_attribute("d").count("L") == steps - 1
    assert page.locator("#curve path.series[data-name='validation loss']").count() == 1
    page.wait_for_selector("#report h2")
    assert "Test metrics" in page.locator("#report").inner_text()
    assert "lora" in page.locator("#config").inner_text()
    assert page.locator("#data-stats table").count() >= 1
    assert page.locator("#metrics td").count() > 0
    # Label data: the classifier's report and the baselines, from metrics.json.
    metrics = json.loads((ui_env.runs["alpha"] / "metrics.json").read_text())
    page.wait_for_selector("#classes #per-class")
    assert page.locator("#per-class tr").count() == 1 + len(metrics["classification"]["labels"])
    cells = page.locator("#confusion td.num").all_inner_texts()
    assert sum(int(c) for c in cells) == metrics["test_examples"]
    assert "ROC-AUC" in page.locator("#class-figures").inner_text()
    assert "TF-IDF + logistic regression" in page.locator("#baselines").inner_text()
    shot(page, "run")


def test_compare_puts_runs_side_by_side(ui_server, page, shot):
    page.goto(ui_server.url + "/ui/compare?runs=alpha,beta")
    page.wait_for_selector("#compare-table")
    header = page.locator("#compare-table tr").first.inner_text()
    assert "alpha" in header and "beta" in header
    assert "tuned accuracy" in page.locator("#compare-table").inner_text()
    assert page.locator("#val-chart path.series").count() == 2
    shot(page, "compare")


def test_pages_at_phone_width(ui_server, phone_page, shot):
    for name, path, ready in (("runs", "/ui/", "tr[data-run='alpha']"),
                              ("run", "/ui/run?name=beta", "#curve path.series"),
                              ("launch", "/ui/launch", "#source option"),
                              ("compare", "/ui/compare?runs=alpha,beta", "#compare-table")):
        phone_page.goto(ui_server.url + path)
        phone_page.wait_for_selector(ready, state="attached")
        # Nothing wider than the phone: the page scrolls down, not sideways.
        assert phone_page.evaluate("document.documentElement.scrollWidth") <= 390
        shot(phone_page, name)


def test_runs_api_reads_status_lineage_and_metrics(ui_server):
    runs = {r["name"]: r for r in httpx.get(ui_server.url + "/ui/api/runs").json()["runs"]}
    assert runs["alpha"]["status"] == runs["beta"]["status"] == "complete"
    assert runs["beta"]["parent_name"] == "alpha"
    assert set(runs["alpha"]["tuned"]) >= {"loss", "accuracy"}
    first = httpx.get(ui_server.url + "/ui/api/run/metrics", params={"name": "alpha"}).json()
    again = httpx.get(ui_server.url + "/ui/api/run/metrics", params={"name": "alpha", "after": first["next"]}).json()
    assert first["records"] and again["records"] == [] and again["next"] == first["next"]


def test_a_crashed_run_reads_as_crashed(ui_server):
    import json
    import socket

    run = ui_server.runs_dir / "crashed-one"
    run.mkdir()
    # A status left by a process that is gone (pid 2**22 + 1 is beyond Linux's pid range).
    (run / "status.json").write_text(json.dumps({"status": "running", "pid": 2**22 + 1,
                                                 "host": socket.gethostname()}))
    try:
        runs = {r["name"]: r for r in httpx.get(ui_server.url + "/ui/api/runs").json()["runs"]}
        assert runs["crashed-one"]["status"] == "crashed"
    finally:
        (run / "status.json").unlink()
        run.rmdir()


def test_paths_outside_the_runs_directory_are_refused(ui_server):
    for name in ("../ui0", "/etc", ""):
        response = httpx.get(ui_server.url + "/ui/api/run", params={"name": name})
        assert response.status_code == 404, name
        assert "no run" in response.json()["error"]["message"]


def test_compare_takes_a_bounded_number_of_runs(ui_server):
    many = httpx.get(ui_server.url + "/ui/api/compare", params={"names": ",".join(["alpha", "beta"] * 9 + [
        f"run-{i}" for i in range(17)])})
    assert many.status_code == 400 and many.json()["error"]["param"] == "names"
    assert "at most 16 runs side by side, got 19" in many.json()["error"]["message"]
    again = httpx.get(ui_server.url + "/ui/api/compare", params={"names": ",".join(["alpha", "beta"] * 9)})
    assert again.status_code == 200 and [r["name"] for r in again.json()["runs"]] == ["alpha", "beta"]
