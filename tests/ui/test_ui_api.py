"""The UI's JSON API without a browser: keys and roles, and the launch checks of search, retrain, stop
and resume (each answered with the CLI's own message)."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from tunesmith.cli import main
from tunesmith.errors import TunesmithError
from tunesmith.serve.access import ADMIN, RATER, USER, load_access


def test_keys_roles_and_the_open_server(tmp_path):
    raters = tmp_path / "raters.txt"
    raters.write_text("# raters\nann:ann-key\n")
    access = load_access(None, raters, environ={"TUNESMITH_API_KEYS": "boss:boss-key",
                                                "TUNESMITH_RATER_KEYS": "bob:bob-key",
                                                "TUNESMITH_USER_KEYS": "cli:cli-key"})
    assert access.identify("Bearer boss-key") == (ADMIN, "boss")
    assert access.identify("Bearer ann-key") == (RATER, "ann")
    assert access.identify("Bearer bob-key") == (RATER, "bob")
    assert access.identify("Bearer cli-key") == (USER, "cli")
    assert access.identify("Bearer nope") is None and access.identify(None) is None
    assert set(access.keys()) == {"boss-key", "ann-key", "bob-key", "cli-key"}
    open_access = load_access(None, None, environ={})
    assert open_access.open and open_access.identify(None) == (ADMIN, "local")
    with pytest.raises(TunesmithError, match="rater keys need admin keys"):
        load_access(None, raters, environ={})
    with pytest.raises(TunesmithError, match="user keys need admin keys"):
        load_access(environ={"TUNESMITH_USER_KEYS": "u"})
    with pytest.raises(TunesmithError, match="--rater-key-file"):
        load_access(None, tmp_path / "missing.txt", environ={"TUNESMITH_API_KEYS": "k"})
    with pytest.raises(TunesmithError, match="--user-key-file"):
        load_access(user_key_file=tmp_path / "missing.txt", environ={"TUNESMITH_API_KEYS": "k"})
    with pytest.raises(TunesmithError, match="two roles"):
        load_access(environ={"TUNESMITH_API_KEYS": "boss:same", "TUNESMITH_RATER_KEYS": "ann:same"})


def test_ui_refuses_to_serve_beyond_localhost_without_keys(capsys, tmp_path, monkeypatch):
    monkeypatch.delenv("TUNESMITH_API_KEYS", raising=False)
    monkeypatch.delenv("TUNESMITH_RATER_KEYS", raising=False)
    assert main(["ui", "--dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    assert "binding beyond localhost needs API keys" in capsys.readouterr().err


def launch(ui_server, **body):
    return httpx.post(ui_server.url + "/ui/api/launch", json=body)


def test_search_and_retrain_launches_are_checked_as_the_cli_checks_them(ui_server):
    # The tiny example has no search section: the search command's own loader says so.
    refused = launch(ui_server, command="search", source="tiny_lora.yaml", name="no-search")
    assert refused.status_code == 400
    assert "search" in refused.json()["error"]["message"]
    refused = launch(ui_server, command="retrain", source="run:alpha", name="alpha-child",
                     edits=["train.batch_tokens = 0"])
    problems = refused.json()["error"]["problems"]
    assert problems[0]["field"] == 0 and "train.batch_tokens" in problems[0]["message"]
    refused = launch(ui_server, source="tiny_lora.yaml", name="alpha")  # an existing run is never overwritten
    assert refused.json()["error"]["problems"][0]["field"] == "name"
    assert "already holds a run" in refused.json()["error"]["message"]
    refused = launch(ui_server, source="tiny_lora.yaml", name="../outside")
    assert refused.json()["error"]["problems"][0]["field"] == "name"
    assert not (ui_server.runs_dir / "no-search").exists() and not (ui_server.runs_dir / "alpha-child").exists()


def test_resume_says_what_the_cli_says(ui_server, capsys):
    refused = httpx.post(ui_server.url + "/ui/api/launch/resume", json={"name": "alpha"})
    assert refused.status_code == 400
    assert main(["train", str(ui_server.runs_dir / "alpha" / "config.yaml"), "--resume"]) == 2
    assert refused.json()["error"]["message"] == capsys.readouterr().err.strip().removeprefix("error: ")


def test_stop_sends_sigterm_to_the_launched_process(ui_server):
    refused = httpx.post(ui_server.url + "/ui/api/launch/stop", json={"name": "alpha"})
    assert refused.status_code == 400 and "not running (status: complete)" in refused.json()["error"]["message"]
    # A stand-in for a launched run: a process that waits to be told to stop.
    waiting = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    ui_server.ctx.processes["stand-in"] = waiting
    try:
        stopped = httpx.post(ui_server.url + "/ui/api/launch/stop", json={"name": "stand-in"})
        assert stopped.json()["signal"] == "SIGTERM"
        assert waiting.wait(30) == -15
    finally:
        waiting.kill()
        del ui_server.ctx.processes["stand-in"]


def test_the_commands_and_screenshots_in_docs_ui_exist():
    import re
    import shlex
    from pathlib import Path

    from tunesmith.cli import build_parser

    docs = Path(__file__).parents[2] / "docs"
    doc = (docs / "ui.md").read_text()
    lines = [line.split("#")[0].strip() for block in re.findall(r"```bash\n(.*?)```", doc, re.DOTALL)
             for line in block.splitlines()]
    commands = [shlex.split(line)[1:] for line in lines if line.startswith("tunesmith ")]
    assert len(commands) == 2
    for argv in commands:
        assert build_parser().parse_args(argv).command == "ui"
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", doc)
    assert {f"ui/{page}-{width}.png" for page in ("runs", "run", "launch", "compare")
            for width in ("laptop", "phone")} <= set(images)
    assert [image for image in images if not (docs / image).is_file()] == []
