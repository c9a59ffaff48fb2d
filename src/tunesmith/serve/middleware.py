"""ASGI middleware around the whole app, the UI's routes and files included: checks made on the
request's headers before any route runs. ``build_app`` adds them."""

from __future__ import annotations

import json

from tunesmith.serve.errors import error_body


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
