"""The server's one error body and the handlers that turn every refusal into it: ours (:class:`BadRequest`, with
its status), the core's (:class:`HiCacheError`: a 400) and Starlette's own (no such route, a method a route does
not take). OpenAI's shape, with SGLang's top-level ``message``; a 429 says when to retry, a 401 how to log in."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi import Request as HTTPRequest
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hicache_core.errors import HiCacheError
from hicache_core.serve.auth import BEARER_CHALLENGE
from hicache_core.serve.protocol import BadRequest
from hicache_core.serve.tenants import RETRY_AFTER_S

ERROR_TYPES = {401: "AuthenticationError", 404: "NotFoundError", 429: "RateLimitError"}  # OpenAI's names


def error(status: int, message: str) -> JSONResponse:
    kind = ERROR_TYPES.get(status, "BadRequestError" if status < 500 else "ServerError")
    return JSONResponse(
        {"error": {"message": message, "type": kind, "code": status}, "object": "error", "message": message},
        status_code=status,
    )


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(BadRequest)
    async def bad_request(_: HTTPRequest, e: BadRequest) -> JSONResponse:
        out = error(e.status, str(e))
        if e.status == 429:
            out.headers["Retry-After"] = str(RETRY_AFTER_S)
        elif e.status == 401:
            out.headers["WWW-Authenticate"] = BEARER_CHALLENGE
        return out

    @app.exception_handler(StarletteHTTPException)
    async def http_error(req: HTTPRequest, e: StarletteHTTPException) -> JSONResponse:
        if e.status_code == 404:
            message = f"no route {req.method} {req.url.path}; the routes are listed in /openapi.json"
        elif e.status_code == 405:
            message = f"{req.url.path} does not take {req.method}; the routes are listed in /openapi.json"
        else:
            message = str(e.detail)
        out = error(e.status_code, message)
        for k, v in (e.headers or {}).items():
            out.headers[k] = v
        return out

    @app.exception_handler(HiCacheError)
    async def hicache_error(_: HTTPRequest, e: HiCacheError) -> JSONResponse:
        return error(400, str(e))
