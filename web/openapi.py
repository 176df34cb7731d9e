"""The OpenAPI 3.1 document, built from the app's own routes.

Views declare their documentation with `@doc(...)`; `build_spec(app)` walks `app.url_map`, so a
route cannot exist without appearing in `/api/openapi.json` (an undocumented one is listed with
`x-undocumented: true`, which a test forbids).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, TypedDict, TypeVar

from flask import Flask

from gateway import __version__

F = TypeVar("F", bound=Callable[..., Any])

ENVELOPE_ERROR = {
    "type": "object",
    "required": ["success", "errorCode", "message", "statusCode", "timestamp", "path"],
    "properties": {
        "success": {"const": False},
        "errorCode": {"type": "string"},
        "message": {"type": "string"},
        "statusCode": {"type": "integer"},
        "timestamp": {"type": "string", "format": "date-time"},
        "path": {"type": "string"},
    },
}


class DocOptions(TypedDict, total=False):
    """Keyword arguments of `doc` that several views share (`@doc("...", **PAGE)`)."""

    tags: tuple[str, ...]
    request: dict[str, Any] | None
    response: dict[str, Any] | None
    status: int
    errors: tuple[int, ...]
    security: str | None
    params: dict[str, dict[str, Any]] | None
    required_params: tuple[str, ...]
    content_type: str
    request_content_type: str


def doc(
    summary: str,
    *,
    tags: tuple[str, ...] = (),
    request: dict[str, Any] | None = None,
    response: dict[str, Any] | None = None,
    status: int = 200,
    errors: tuple[int, ...] = (),
    security: str | None = None,
    params: dict[str, dict[str, Any]] | None = None,
    required_params: tuple[str, ...] = (),
    content_type: str = "application/json",
    request_content_type: str = "application/json",
) -> Callable[[F], F]:
    """Attach OpenAPI metadata to a view. `security`: "device-signature", "bearer" or "session"
    (the technician page's cookie); None: public (the operation says so with `security: []`);
    `required_params`: the query parameters (of `params`) the view refuses to go without."""

    def wrap(fn: F) -> F:
        fn.__openapi__ = {  # type: ignore[attr-defined]
            "summary": summary,
            "tags": list(tags),
            "request": request,
            "response": response,
            "status": status,
            "errors": errors,
            "security": security,
            "params": params or {},
            "required_params": required_params,
            "content_type": content_type,
            "request_content_type": request_content_type,
        }
        return fn

    return wrap


# The wash writes of the seed need only LAN access; `web.wash_api_auth = "jwt"` puts them behind the
# technician token (web/wash.py), so their declared security follows the configuration.
WASH_WRITES = ("wash.start", "wash.stop")

_CONVERTER = re.compile(r"<(?:(\w+):)?(\w+)>")
# Path parameters the URL converter already restricts (Werkzeug's `int` takes digits only; the
# views answer 404 past SQLite's integers, where no row can be).
_CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {"int": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}}


def build_spec(app: Flask) -> dict[str, Any]:
    paths: dict[str, dict[str, Any]] = {}
    for rule in sorted(app.url_map.iter_rules(), key=lambda r: r.rule):
        if rule.endpoint == "static":
            continue
        view = app.view_functions[rule.endpoint]
        meta: dict[str, Any] | None = getattr(view, "__openapi__", None)
        path = _CONVERTER.sub(lambda m: "{" + m.group(2) + "}", rule.rule)
        path_params = {m.group(2): _CONVERTER_SCHEMAS.get(m.group(1) or "", {"type": "string"})
                       for m in _CONVERTER.finditer(rule.rule)}
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            op: dict[str, Any] = {"operationId": f"{rule.endpoint}.{method.lower()}"}
            if meta is None:
                op["summary"] = rule.endpoint
                op["x-undocumented"] = True
                op["responses"] = {"default": {"description": "undocumented"}}
            else:
                op.update(_operation(meta, path_params))
                if rule.endpoint in WASH_WRITES and _wash_writes_need_token(app):
                    op["security"] = [{"bearer": []}]
            paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "carwash-gateway", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": {"Error": ENVELOPE_ERROR},
            "securitySchemes": {
                "device-signature": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "x-signature",
                    "description": "SHA256(raw body || key) in lowercase hex (device-api.md §2)",
                },
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                           "description": "technician token (POST /api/v1/auth/login); the page's session "
                                          "cookie also works, with X-CSRF-Token on changes"},
                "session": {"type": "apiKey", "in": "cookie", "name": "cw_token",
                            "description": "the technician page's session (POST /login)"},
            },
        },
    }


def _wash_writes_need_token(app: Flask) -> bool:
    context = app.extensions.get("carwash")
    return bool(context is not None and context.config.web.wash_api_auth == "jwt")


def _operation(meta: dict[str, Any], path_params: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """`path_params`: name -> the schema its URL converter implies (a view's `params` win)."""
    op: dict[str, Any] = {"summary": meta["summary"], "tags": meta["tags"]}
    parameters = [
        {"name": p, "in": "path", "required": True, "schema": meta["params"].get(p, implied)}
        for p, implied in path_params.items()
    ]
    parameters += [
        {"name": name, "in": "query", "required": name in meta["required_params"], "schema": schema}
        for name, schema in meta["params"].items()
        if name not in path_params
    ]
    if parameters:
        op["parameters"] = parameters
    if meta["request"] is not None:
        op["requestBody"] = {"required": True,
                             "content": {meta["request_content_type"]: {"schema": meta["request"]}}}
    ok: dict[str, Any] = {"description": "success"}
    if meta["response"] is not None:
        ok["content"] = {meta["content_type"]: {"schema": meta["response"]}}
    responses: dict[str, Any] = {str(meta["status"]): ok}
    err_ref = {"description": "error",
               "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    for code in sorted({*meta["errors"], 500}):
        responses[str(code)] = err_ref
    op["responses"] = responses
    # Every operation states its security; `[]` is "public" (the health, the wash API as the
    # contract defines it, firmware downloads, the logins).
    op["security"] = [{meta["security"]: []}] if meta["security"] else []
    return op
