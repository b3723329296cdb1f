"""Every error leaves as JSON `{"error": {"code", "message", "field"}}` — never a trace."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loom.coordinator.errors import ServiceError

log = logging.getLogger(__name__)


def error_response(status: int, code: str, message: str, field: str | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": {"code": code, "message": message, "field": field}}
    return JSONResponse(body, status_code=status)


def _loc_path(loc: Sequence[Any]) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts)


async def _validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if errors and errors[0].get("type") == "json_invalid":
        return error_response(400, "malformed_json", "request body is not valid JSON")
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    path = _loc_path(first.get("loc", ()))
    messages = []
    for err in errors[:5]:
        where = _loc_path(err.get("loc", ())) or "body"
        msg = str(err.get("msg", "invalid"))
        if err.get("type") == "extra_forbidden":
            msg = "unknown field (remove it or check its spelling)"
        messages.append(f"{where}: {msg}")
    return error_response(400, "invalid_request", "; ".join(messages), path or None)


async def _http(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        return error_response(
            404, "not_found", f"no such route: {_request.method} {_request.url.path} (see /docs)"
        )
    if exc.status_code == 405:
        return error_response(
            405, "method_not_allowed", f"{_request.method} is not allowed on {_request.url.path}"
        )
    return error_response(exc.status_code, "http_error", str(exc.detail))


async def _service(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ServiceError)
    return error_response(exc.status, exc.code, exc.message, exc.field)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal_error", "the coordinator hit an unexpected error")


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(ServiceError, _service)
    app.add_exception_handler(Exception, _unexpected)
