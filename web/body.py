"""Reading request bodies: JSON only, raw bytes kept for signature checks, clear errors."""

from __future__ import annotations

import json
from typing import Any

from flask import request

from web.errors import ApiError

# The largest SQLite INTEGER. A larger Python int cannot be bound to a query (OverflowError, a 500):
# ids and sequence numbers from a request are checked against it first.
SQLITE_MAX_INT = 2**63 - 1


def raw_body() -> bytes:
    """The body exactly as received (the limit was enforced before reading)."""
    return request.get_data(cache=True)


def read_json(*, require_object: bool = True) -> Any:
    """Parse the body as JSON: 415 UNSUPPORTED_MEDIA_TYPE unless the content type is JSON,
    400 INVALID_JSON when it does not parse, 400 VALIDATION_FAILED when not an object."""
    if request.mimetype != "application/json":
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE", "Content-Type must be application/json")
    data = raw_body()
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "INVALID_JSON", f"body is not valid JSON: {exc}") from None
    if require_object and not isinstance(value, dict):
        raise ApiError(400, "VALIDATION_FAILED", "body must be a JSON object")
    return value
