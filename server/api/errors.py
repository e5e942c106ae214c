"""Domain errors -> HTTP: the one status table, and OpenAI's error shape
`{"error": {"message", "type", "param", "code"}}` for every refusal."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from loramux.server import errors
from loramux.server.api.protocol import ErrorInfo, ErrorResponse

log = logging.getLogger("loramux.api")

STATUS: dict[type[errors.LoramuxError], int] = {
    errors.Invalid: 400,
    errors.Unauthorized: 401,
    errors.Forbidden: 403,
    errors.NotFound: 404,
    errors.Conflict: 409,
    errors.TooLarge: 413,
    errors.Unprocessable: 422,
    errors.Busy: 429,
    errors.ClientGone: 499,
    errors.Failed: 500,
    errors.Unavailable: 503,
}

_ERROR_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 405: "invalid_request_error", 409: "conflict_error",
    413: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
    500: "internal_server_error", 503: "service_unavailable",
}


def status_of(exc: errors.LoramuxError) -> int:
    return next(s for cls, s in STATUS.items() if isinstance(exc, cls))


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> ErrorResponse:
    return ErrorResponse(error=ErrorInfo(message=message, type=_ERROR_TYPES.get(status, "error"), param=param,
                                         code=code))


def error_response(status: int, message: str, param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code).model_dump(), status_code=status, headers=headers)


def response_for(exc: errors.LoramuxError) -> JSONResponse:
    return error_response(status_of(exc), exc.message, exc.param, exc.code)


def event_for(exc: errors.LoramuxError) -> ErrorResponse:
    """The error as an SSE event's body (a stream that already began cannot change its status)."""
    return error_body(status_of(exc), exc.message, exc.param, exc.code)


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(errors.LoramuxError)
    async def _domain_error(request: Request, exc: errors.LoramuxError):
        return response_for(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        found = exc.errors()
        first = found[0] if found else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in first.get("loc", ())]
        if loc[:1] in (["body"], ["query"], ["path"]):  # where the field was, not its name
            loc = loc[1:]
        msg = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        param = ".".join(loc) or None
        return error_response(400, f"{param}: {msg}" if param else msg, param, "invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "error"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        return error_response(500, "internal server error", code="internal_error")
