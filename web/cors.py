"""One CORS allow-list (`web.cors_allowed_origins`) for REST, SSE and Socket.IO.

Same origin is always allowed; other browser origins only when listed ("*": any). For an allowed
cross-origin request the answer carries `Access-Control-Allow-Origin` (the origin itself, with
`Vary: Origin`) and, for a preflight, the methods and headers the API uses. Credentials (the
page's cookie) are never allowed cross-origin: a kiosk uses the public wash API or a Bearer token.
A cross-origin request from an origin not listed gets no CORS headers, and if it would change
something (not GET/HEAD/OPTIONS) 403 FORBIDDEN before the view runs: a browser may send a
"simple" POST without a preflight, and the wash API takes writes without a token by default.
Requests without `Origin` (devices, curl, backends) are not concerned.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, request

from web.errors import ApiError

ALLOW_METHODS = "GET, POST, DELETE, OPTIONS"
ALLOW_HEADERS = "Content-Type, Authorization, Last-Event-ID, X-CSRF-Token"
MAX_AGE = "600"


def same_origin(origin: str, environ: Mapping[str, Any]) -> bool:
    host = environ.get("HTTP_HOST")
    return bool(host) and origin == f"{environ.get('wsgi.url_scheme', 'http')}://{host}"


class OriginPolicy:
    def __init__(self, allowed: tuple[str, ...]) -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(o.rstrip("/") for o in allowed if o != "*")

    def allows(self, origin: str | None, environ: Mapping[str, Any]) -> bool:
        """Socket.IO's check too (python-engineio calls it with the origin and the environ)."""
        if not origin:
            return True
        return self.any or origin in self.allowed or same_origin(origin, environ)

    def install(self, app: Flask) -> None:
        @app.before_request
        def _refuse_foreign_writes() -> None:
            origin = request.headers.get("Origin")
            if origin and request.method not in ("GET", "HEAD", "OPTIONS") and not self.allows(origin, request.environ):
                raise ApiError(403, "FORBIDDEN", f"origin {origin[:100]!r} is not allowed (web.cors_allowed_origins)")

        @app.after_request
        def _cors_headers(resp: Response) -> Response:
            origin = request.headers.get("Origin")
            if not origin or same_origin(origin, request.environ) or not self.allows(origin, request.environ):
                return resp
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers.add("Vary", "Origin")
            if request.method == "OPTIONS":
                resp.headers["Access-Control-Allow-Methods"] = ALLOW_METHODS
                resp.headers["Access-Control-Allow-Headers"] = ALLOW_HEADERS
                resp.headers["Access-Control-Max-Age"] = MAX_AGE
            return resp
