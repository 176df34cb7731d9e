"""The error envelope of device-api.md §1, for every error of every endpoint.

`{"success": false, "errorCode", "message", "statusCode", "timestamp", "path"}` with the real HTTP
status. Views raise `ApiError`; Werkzeug's own errors (404, 405, 413, ...) and anything unexpected
are mapped here, and a 500 never shows a traceback (it is logged instead).
"""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, Response, jsonify, request
from werkzeug.exceptions import HTTPException

from gateway.clock import iso_z

log = logging.getLogger(__name__)

# Codes for statuses no view chose a code for. NOT_FOUND, METHOD_NOT_ALLOWED and
# SERVICE_UNAVAILABLE are not in the spec's list: see docs/decisions.md.
DEFAULT_CODES: dict[int, str] = {
    400: "VALIDATION_FAILED",
    401: "UNAUTHORIZED",
    403: "FORBIDDEN",
    404: "NOT_FOUND",
    405: "METHOD_NOT_ALLOWED",
    409: "CONFLICT",
    413: "PAYLOAD_TOO_LARGE",
    415: "UNSUPPORTED_MEDIA_TYPE",
    429: "RATE_LIMITED",
    500: "INTERNAL_ERROR",
    503: "SERVICE_UNAVAILABLE",
}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        super().__init__(message)


def envelope(status: int, code: str, message: str) -> dict[str, Any]:
    return {
        "success": False,
        "errorCode": code,
        "message": message,
        "statusCode": status,
        "timestamp": iso_z(),
        "path": request.path,
    }


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    resp = jsonify(envelope(status, code, message))
    resp.status_code = status
    for k, v in (headers or {}).items():
        resp.headers[k] = v
    return resp


def install(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def _api_error(exc: ApiError) -> Response:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        headers = {}
        valid = getattr(exc, "valid_methods", None)
        if status == 405 and valid:
            headers["Allow"] = ", ".join(valid)
        message = {
            404: f"no route for {request.method} {request.path}",
            405: f"method {request.method} not allowed here",
            413: "request body too large",
        }.get(status, exc.description or exc.name)
        fallback = "INTERNAL_ERROR" if status >= 500 else "VALIDATION_FAILED"
        return error_response(status, DEFAULT_CODES.get(status, fallback), message, headers)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        log.exception("unhandled error on %s %s", request.method, request.path)
        return error_response(500, "INTERNAL_ERROR", "internal error")
