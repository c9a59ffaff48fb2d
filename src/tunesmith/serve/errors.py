"""Errors in the OpenAI shape, ``{"error": {"message", "type", "param", "code"}}``, so the ``openai``
client raises its own exception for each status; every route of the server and the UI raises ``ApiError``."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tunesmith.errors import TunesmithError

KINDS = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
         404: "not_found_error", 413: "invalid_request_error", 415: "invalid_request_error",
         429: "rate_limit_error", 500: "server_error"}


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": KINDS.get(status, "invalid_request_error"),
                      "param": param, "code": status}}


def add_error_handlers(app: FastAPI) -> None:
    """``ApiError`` as itself; a ``TunesmithError`` (a bad adapter path, an unknown alias) and a body that
    fails its schema as 400, naming the first field at fault; FastAPI's and Starlette's own errors (an
    unknown path, a method a route does not take, a body that is not JSON or nests too deep to parse)
    in the same shape."""

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return JSONResponse(error_body(err.status, err.message, err.param), err.status, headers=err.headers)

    @app.exception_handler(TunesmithError)
    async def user_error(request, err: TunesmithError):
        return JSONResponse(error_body(400, "; ".join(err.problems)), 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        return JSONResponse(error_body(err.status_code, str(err.detail)), err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, err: RequestValidationError):
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"] if p != "body")
        return JSONResponse(error_body(400, f"{where}: {first['msg']}", where), 400)
