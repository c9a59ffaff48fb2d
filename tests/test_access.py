"""Roles on every route (``serve/access.py``): the table of who may call what, checked route by route
against the apps of ``tunesmith serve`` and ``tunesmith ui`` and against docs/security.md, and the
abuse case that started it (a rater key unloading the production adapter).
"""

from __future__ import annotations

import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_serve import make_run

from tunesmith.serve.access import ADMIN, ANYONE, RATER, ROLES, ROUTES, USER, Access
from tunesmith.serve.options import ServeOptions

DOC = Path(__file__).parent.parent / "docs" / "security.md"
KEYS = {ADMIN: "admin-secret", USER: "user-secret", RATER: "rater-secret"}
CALLERS = [*ROLES, "no key", "wrong key"]


def headers_of(caller: str) -> dict[str, str]:
    key = KEYS.get(caller, "not-a-key" if caller == "wrong key" else None)
    return {} if key is None else {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def runs_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("access-runs")
    make_run(root, tiny_model_dir, "alpha", seed=1)
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("command", ["ui", "serve"])
def test_only_an_admin_key_unloads_the_production_adapter(command, runs_dir, tmp_path):
    """Issue 24's first finding: with ``tunesmith ui --api-key-file admin.keys --rater-key-file rater.keys``
    a rater key unloaded ``alpha`` (200) and moved aliases. Now rater and user keys get 403, the
    adapter stays, and the admin key still may."""
    for role, key in KEYS.items():
        (tmp_path / f"{role}.keys").write_text(f"{role}-1:{key}\n")
    port = free_port()
    where = ["--dir", str(runs_dir), "--examples", str(tmp_path)] if command == "ui" else [
        f"alpha={runs_dir / 'alpha'}", "--adapter-dir", str(runs_dir)]
    argv = [command, *where, "--port", str(port), "--store", str(tmp_path / "store.sqlite"),
            "--alias-file", str(tmp_path / "aliases.json"), "--api-key-file", str(tmp_path / "admin.keys"),
            "--rater-key-file", str(tmp_path / "rater.keys"), "--user-key-file", str(tmp_path / "user.keys")]
    server = subprocess.Popen([sys.executable, "-c", "import sys; from tunesmith.cli import main; "
                               "sys.exit(main(sys.argv[1:]))", *argv], stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.2)

        def post(route: str, body: dict, role: str) -> httpx.Response:
            return httpx.post(url + route, json=body, headers=headers_of(role), timeout=30)

        def listed() -> list[str]:
            return [m["id"] for m in httpx.get(url + "/v1/models", headers=headers_of(RATER)).json()["data"]]

        for role in (RATER, USER):
            refused = post("/v1/unload_lora_adapter", {"lora_name": "alpha"}, role)
            assert refused.status_code == 403, refused.text
            assert f"is a {role} key" in refused.json()["error"]["message"]
            assert "needs an admin key" in refused.json()["error"]["message"]
            assert post("/v1/aliases", {"alias": "prod", "model": "alpha"}, role).status_code == 403
            assert post("/v1/load_lora_adapter", {"lora_name": "again", "lora_path": str(runs_dir / "alpha")},
                        role).status_code == 403
            assert "alpha" in listed()
        assert post("/v1/unload_lora_adapter", {"lora_name": "alpha"}, ADMIN).status_code == 200
        assert "alpha" not in listed()
    finally:
        server.terminate()
        server.wait(30)


@pytest.fixture(scope="module")
def ui_app(runs_dir, tmp_path_factory):
    """The UI's server (the serve app with the UI added) with a key of each role, its scheduler running."""
    from tunesmith.ui.app import UiContext, build_ui_server

    root = tmp_path_factory.mktemp("access-ui")
    (root / "examples").mkdir()
    ctx = UiContext(runs_dir=runs_dir, store_path=root / "store.sqlite", examples_dir=root / "examples")
    access = Access({KEYS[ADMIN]: "admin-1"}, {KEYS[USER]: "user-1"}, {KEYS[RATER]: "rater-1"})
    server = build_ui_server(ctx, {"alpha": runs_dir / "alpha"}, options=ServeOptions(max_tokens=8),
                             access=access, alias_file=root / "aliases.json")
    server.scheduler.start()
    yield server.asgi()
    server.close()


def app_routes(app) -> list[tuple[str, str]]:
    """``(method, path template)`` of every route of ``app``, read from the app itself, mounts included."""
    from fastapi.routing import iter_route_contexts  # included routers' routes too, with their prefixes

    found = []
    for route in iter_route_contexts(app.routes):
        methods = getattr(route, "methods", None) or {"GET"}  # a mount (static files) answers GET
        found += [(method, route.path) for method in sorted(methods - {"HEAD"})]
    return found


def example_path(path: str) -> str:
    """A concrete path for a route's template: ``/ui/{page}`` as ``/ui/chat``; a mount's, one of its files."""
    if path == "/ui/static":
        return "/ui/static/style.css"
    return re.sub(r"\{[^}]+\}", "chat", path)


def test_every_route_of_the_app_has_a_row_and_every_row_a_route(ui_app):
    routes = app_routes(ui_app)
    missing = [r for r in routes if r not in ROUTES]
    assert not missing, f"routes with no row in serve/access.py ROUTES (so no one may call them): {missing}"
    assert set(ROUTES) == set(routes), f"rows of ROUTES for no route: {set(ROUTES) - set(routes)}"


def _route_ids():
    return [f"{m} {p}" for m, p in ROUTES]


@pytest.mark.parametrize("route", list(ROUTES), ids=_route_ids())
def test_every_route_with_every_role(ui_app, route):
    """Each route, called by each role and with no key or a wrong one: allowed callers get past the
    check (their empty request may still be a 400), others get 403, or 401 without a known key."""
    from fastapi.testclient import TestClient

    method, path = route
    rule = ROUTES[route]
    with TestClient(ui_app, follow_redirects=False) as client:
        for caller in CALLERS:
            answer = client.request(method, example_path(path), headers=headers_of(caller),
                                    json={} if method == "POST" else None)
            said = f"{caller} on {method} {path}: {answer.status_code} {answer.text[:200]}"
            if ANYONE in rule.roles or caller in rule.roles:
                assert answer.status_code not in (401, 403), said
            elif caller in ROLES:
                assert answer.status_code == 403, said
                needed = " or ".join(r for r in ROLES if r in rule.roles)
                assert f"is a {caller} key" in answer.text and f"{needed} key" in answer.text, said
            else:
                assert answer.status_code == 401, said


def test_a_user_rates_only_its_own_answers(ui_app):
    from fastapi.testclient import TestClient

    second_user = "user-two-secret"
    ui_app.state.serve.access.user_keys[second_user] = "user-2"
    try:
        with TestClient(ui_app) as client:
            asked = client.post("/v1/completions", headers=headers_of(USER),
                                json={"model": "alpha", "prompt": "the film is", "max_tokens": 2, "temperature": 0})
            assert asked.status_code == 200, asked.text
            answer_id = asked.json()["id"]
            rate = {"id": answer_id, "thumbs": "up"}
            other = client.post("/v1/feedback", json=rate, headers={"Authorization": f"Bearer {second_user}"})
            assert other.status_code == 403 and "only its own answers" in other.json()["error"]["message"]
            assert client.post("/v1/feedback", json=rate, headers=headers_of(USER)).status_code == 200
            assert client.post("/v1/feedback", json=rate, headers=headers_of(ADMIN)).status_code == 200
    finally:
        del ui_app.state.serve.access.user_keys[second_user]


def route_table() -> str:
    """docs/security.md's table of routes and roles, as ``ROUTES`` gives it."""
    columns = [ANYONE, *ROLES]
    names = ["no key", *ROLES]
    lines = ["| route | what | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(columns)]
    for (method, path), rule in ROUTES.items():
        marks = ["yes" if role in rule.roles or ANYONE in rule.roles else "" for role in columns]
        lines.append(f"| `{method} {path}` | {rule.what} | " + " | ".join(marks) + " |")
    return "\n".join(lines)


def test_the_table_in_docs_security_is_the_table_in_code():
    expected = route_table()
    assert expected in DOC.read_text(), f"docs/security.md's route table should read:\n{expected}"
