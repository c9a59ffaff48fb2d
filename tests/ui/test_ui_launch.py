"""The launch page: a short run launched from the form runs to the end; an invalid field shows the
CLI's own message and starts nothing; a rater key cannot launch."""

from __future__ import annotations

import httpx

from tunesmith.cli import main

ADMIN, RATER = "admin-secret", "rater-secret"


def choose_example(page, url: str) -> None:
    page.goto(url + "/ui/launch")
    page.wait_for_selector("#source option[value='tiny_lora.yaml']", state="attached")
    page.select_option("#source", "tiny_lora.yaml")
    page.wait_for_function("document.getElementById('source-text').textContent.includes('max_steps')")


def test_launch_a_short_run_and_watch_it_finish(ui_server, page, shot):
    choose_example(page, ui_server.url)
    page.fill("#name", "launched")
    page.fill(".edit-path", "train.max_steps")
    page.fill(".edit-value", "3")
    shot(page, "launch")
    page.click("#launch")
    page.click("#launched a")
    page.wait_for_selector("#status .status-complete", timeout=240_000)
    assert int(page.locator("#curve path.series[data-name='training loss']").get_attribute("data-points")) == 3
    log = (ui_server.runs_dir / "launched" / "launch.log").read_text()
    assert log.startswith("$ tunesmith train ") and "report:" in log
    assert ui_server.ctx.processes["launched"].wait(30) == 0


def test_an_invalid_field_shows_the_cli_message_and_starts_nothing(ui_server, page, capsys):
    choose_example(page, ui_server.url)
    page.fill("#name", "never")
    page.fill(".edit-path", "train.lr")
    page.fill(".edit-value", "-1")
    page.click("#launch")
    error = page.locator(".edit .field-error")
    error.wait_for(state="visible")
    example = ui_server.ctx.examples_dir / "tiny_lora.yaml"
    assert main(["train", str(example), "--set", "train.lr=-1",
                 "--set", f"output.dir={ui_server.runs_dir / 'never'}"]) == 2
    cli = capsys.readouterr().err.strip().removeprefix("error: ")
    assert error.inner_text() == cli
    assert "train.lr" in cli
    assert not (ui_server.runs_dir / "never").exists()
    assert "never" not in ui_server.ctx.processes


def test_a_rater_key_cannot_launch(ui_server, page):
    body = {"source": "tiny_lora.yaml", "name": "by-rater", "edits": []}
    with ui_server.keys(admin={ADMIN: "boss"}, rater={RATER: "rater-1"}):
        launch = ui_server.url + "/ui/api/launch"
        refused = httpx.post(launch, json=body, headers={"Authorization": f"Bearer {RATER}"})
        assert refused.status_code == 403
        assert "rater key" in refused.json()["error"]["message"]
        assert httpx.post(launch, json=body).status_code == 401
        stop = httpx.post(launch + "/stop", json={"name": "alpha"}, headers={"Authorization": f"Bearer {RATER}"})
        assert stop.status_code == 403
        # The rater may still read runs.
        listed = httpx.get(ui_server.url + "/ui/api/runs", headers={"Authorization": f"Bearer {RATER}"})
        assert listed.status_code == 200
        page.goto(ui_server.url + "/ui/launch")
        page.evaluate(f"localStorage.setItem('tunesmith-key', '{RATER}')")
        page.reload()
        page.wait_for_selector("#role-note:not([hidden])")
        assert "rater key" in page.locator("#role-note").inner_text()
        assert page.locator("#launch").is_disabled()
    assert not (ui_server.runs_dir / "by-rater").exists()
