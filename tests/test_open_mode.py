"""An open server (no keys, on 127.0.0.1) against a web page in the user's browser
(``serve/middleware.py``'s ``BrowserGuard``): a page on another site must not unload adapters, move
aliases or launch runs through it (CSRF), nor read it through a DNS name rebound to 127.0.0.1.

The server runs for real on 127.0.0.1, so the Host and the bound address are what a browser would see.
"""

from __future__ import annotations

import httpx
import pytest
from test_serve import make_run

from tunesmith.serve.options import ServeOptions

EVIL = "http://evil.example"


@pytest.fixture(scope="module")
def open_ui(tiny_model_dir, tmp_path_factory):
    """``tunesmith ui`` with no keys: the serve routes and the UI's, alpha served, the runs directory
    open to load from. Yields ``(server, url)``."""
    from tunesmith.ui.app import UiContext, build_ui_server

    root = tmp_path_factory.mktemp("open-mode")
    runs = root / "runs"
    make_run(runs, tiny_model_dir, "alpha", seed=1)
    (root / "examples").mkdir()
    ctx = UiContext(runs_dir=runs, store_path=root / "store.sqlite", examples_dir=root / "examples")
    server = build_ui_server(ctx, {"alpha": runs / "alpha"}, options=ServeOptions(max_tokens=8),
                             alias_file=root / "aliases.json")
    with server.in_thread() as url:
        yield server, url


def served(url: str) -> list[str]:
    return [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]


def error(answer: httpx.Response) -> str:
    return answer.json()["error"]["message"]


@pytest.mark.parametrize("route, body", [
    ("/v1/unload_lora_adapter", {"lora_name": "alpha"}),
    ("/v1/aliases", {"alias": "prod", "model": "alpha"}),
    ("/ui/api/launch", {"source": "tiny.yaml", "name": "by-a-web-page"}),
])
def test_a_post_from_another_sites_page_is_refused(open_ui, route, body):
    server, url = open_ui
    refused = httpx.post(url + route, json=body, headers={"Origin": EVIL})
    assert refused.status_code == 403, refused.text
    assert "Origin 'http://evil.example'" in error(refused) and "other sites" in error(refused)
    assert "alpha" in served(url) and "prod" not in served(url)


def test_a_post_from_the_servers_own_page_passes(open_ui):
    server, url = open_ui
    own = httpx.post(url + "/v1/aliases", json={"alias": "own", "model": "alpha"}, headers={"Origin": url})
    assert own.status_code == 200, own.text
    other_port = httpx.post(url + "/v1/aliases", json={"alias": "own", "model": "alpha"},
                            headers={"Origin": "http://127.0.0.1:1"})  # another local server's page
    assert other_port.status_code == 403


@pytest.mark.parametrize("route", ["/ui/api/rate/export", "/v1/models", "/ui/api/runs"])
def test_a_request_to_another_host_name_is_refused(open_ui, route):
    """DNS rebinding: evil.example re-pointed at 127.0.0.1 makes the page's requests same-origin to
    evil.example, so the browser lets it read the answers; the Host header still says evil.example."""
    server, url = open_ui
    port = url.rsplit(":", 1)[1]
    refused = httpx.get(url + route, headers={"Host": f"evil.example:{port}"})
    assert refused.status_code == 403, refused.text
    assert "Host 'evil.example:" in error(refused)
    for name in ("localhost", "127.0.0.1", "[::1]"):
        assert httpx.get(url + route, headers={"Host": f"{name}:{port}"}).status_code == 200


@pytest.mark.parametrize("content", [
    {"data": {"lora_name": "alpha"}},  # an HTML form's application/x-www-form-urlencoded
    {"content": b'{"lora_name": "alpha"}', "headers": {"Content-Type": "text/plain"}},  # a form's text/plain
    {"content": b'{"lora_name": "alpha"}'},  # fetch() with a Blob body: no Content-Type at all
])
def test_a_body_not_declared_json_is_refused(open_ui, content):
    """What a page may send anywhere without a CORS preflight: a form, text/plain, no type at all."""
    server, url = open_ui
    refused = httpx.post(url + "/v1/unload_lora_adapter", **content)
    assert refused.status_code == 415, refused.text
    assert "Content-Type: application/json" in error(refused)
    assert "alpha" in served(url)


def test_with_keys_the_host_is_free_and_the_content_type_still_checked(open_ui):
    """Behind a proxy the Host is the proxy's name; a page holds no key, so keys guard the rest."""
    server, url = open_ui
    server.access.admin_keys["admin-secret"] = "admin"
    try:
        admin = {"Authorization": "Bearer admin-secret"}
        port = url.rsplit(":", 1)[1]
        proxied = httpx.get(url + "/v1/models", headers={**admin, "Host": f"models.example.com:{port}"})
        assert proxied.status_code == 200
        form = httpx.post(url + "/v1/unload_lora_adapter", data={"lora_name": "alpha"}, headers=admin)
        assert form.status_code == 415
    finally:
        server.access.admin_keys.clear()
