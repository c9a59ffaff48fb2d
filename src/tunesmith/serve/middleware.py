"""ASGI middleware around the whole app, the UI's routes and files included: checks made on the
request's headers before any route runs. ``build_app`` adds them."""

from __future__ import annotations

import json

from tunesmith.serve.access import Access
from tunesmith.serve.errors import error_body
from tunesmith.serve.keys import is_loopback

BODY_METHODS = {"POST", "PUT", "PATCH", "DELETE"}


async def send_error(send, status: int, message: str) -> None:
    """Answer with an OpenAI-shaped error, before (or instead of) the app."""
    body = json.dumps(error_body(status, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """413 for a request body over ``limit`` bytes, by its Content-Length or as it arrives."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen, refused = 0, False

        async def counted():
            nonlocal seen, refused
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit and not refused:
                # Answer now, and tell the app the client has gone, so it stops reading and its reply is dropped.
                refused = True
                await self._refuse(send)
            return {"type": "http.disconnect"} if refused else message

        async def muted(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, muted)

    async def _refuse(self, send):
        await send_error(send, 413, f"request body over {self.limit} bytes")


def host_name(host: str) -> str:
    """The name of a Host header, without its port: ``[::1]:8000`` -> ``::1``, ``localhost:8000`` -> ``localhost``."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:host.find("]")] if "]" in host else ""
    return host.rsplit(":", 1)[0]


def browser_problem(scope, open_server: bool) -> tuple[int, str] | None:
    """Why a web page in the user's browser must not make this request, or None.

    A body must be declared JSON, with keys or without: a page can send a form, ``text/plain`` or a
    body with no type to any address without asking first (no CORS preflight), but not ``application/json``. An open
    server (no keys, on this machine) has no key to stop a page, so it also checks that the request
    names this machine (Host: DNS rebinding points an attacker's name at 127.0.0.1, and the page then
    reads the answers as its own origin's) and comes from no other site (Origin, which browsers set
    on cross-site requests and a page cannot forge). With keys, a page has no key to send, and a
    proxy in front may give the server any Host.
    """
    headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
    method, path = scope["method"], scope["path"]
    if open_server:
        host = headers.get("host", "")
        name = host_name(host)
        bound = (scope.get("server") or ("",))[0]
        # localhost or a loopback address: a name no web page can re-point at another machine.
        if not (is_loopback(name) or name == bound):
            return 403, (f"Host {host!r} is not this server: a server without keys answers only requests to "
                         "localhost, 127.0.0.1, [::1] or the address it is bound to (so a web page cannot reach "
                         "it through a DNS name pointed at this machine)")
        origin = headers.get("origin")
        own = f"{scope.get('scheme', 'http')}://{host}"
        if origin is not None and origin.lower() != own.lower():
            return 403, (f"Origin {origin!r} is not this server's own ({own}): a server without keys refuses "
                         "requests from other sites' pages")
    if method in BODY_METHODS:
        kind = headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            return 415, (f"{method} {path}: the body must be JSON, sent with Content-Type: application/json "
                         f"(got {kind or 'no Content-Type'})")
    return None


class BrowserGuard:
    """Refuses what ``browser_problem`` finds (403 or 415), for every route of the app."""

    def __init__(self, app, access: Access):
        self.app, self.access = app, access

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            problem = browser_problem(scope, self.access.open)
            if problem is not None:
                return await send_error(send, *problem)
        await self.app(scope, receive, send)
