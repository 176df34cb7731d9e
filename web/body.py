"""Reading request bodies: JSON only, raw bytes kept for signature checks, clear errors."""

from __future__ import annotations

import json
from typing import Any

from flask import g, request
from werkzeug.exceptions import ClientDisconnected, RequestEntityTooLarge

from web.errors import ApiError

# The largest SQLite INTEGER. A larger Python int cannot be bound to a query (OverflowError, a 500):
# ids and sequence numbers from a request are checked against it first.
SQLITE_MAX_INT = 2**63 - 1


def raw_body() -> bytes:
    """The body exactly as received, at most the request's limit (`max_content_length`).

    A declared length above the limit was refused before reading (web/app.py). A body without one
    (`Transfer-Encoding: chunked`) is read up to the limit and refused with 413 PAYLOAD_TOO_LARGE
    past it, before the endpoint checks anything else (signature, JSON): Werkzeug's
    `get_data()` would hand over the first `limit` bytes as if they were the whole body."""
    cached: bytes | None = g.get("carwash_body")
    if cached is not None:
        return cached
    limit = request.max_content_length
    declared = request.content_length
    if limit is None:
        data = request.get_data(cache=True)
    elif declared is not None and declared <= limit:
        # The declared length (at most the limit, web/app.py), read from the server's input as
        # WSGI allows; not `limit + 1` through Werkzeug's stream, which allocates a zeroed buffer
        # of the size asked for (256 KiB by default: an mmap and its page faults per request).
        data = request.environ["wsgi.input"].read(declared) if declared else b""
        if len(data) != declared:
            raise ClientDisconnected()  # what Werkzeug's stream raises for a short body (400)
    else:
        try:
            data = request.stream.read(limit + 1)
            if len(data) == limit:
                data += request.stream.read(1)  # Werkzeug's stream stops at the limit; one more raises
        except RequestEntityTooLarge:
            data = b"x" * (limit + 1)
        if len(data) > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes")
    g.carwash_body = data
    return data


def read_json(*, require_object: bool = True, untyped_is_json: bool = False) -> Any:
    """Parse the body as JSON: 415 UNSUPPORTED_MEDIA_TYPE unless the content type is JSON,
    400 INVALID_JSON when it does not parse, 400 VALIDATION_FAILED when not an object.

    `untyped_is_json`: a request without Content-Type is JSON (signed device requests: the seed's
    firmware sends none, and the signature already vouches for the bytes). A declared type other
    than JSON is still 415."""
    if request.mimetype != "application/json" and not (untyped_is_json and not request.headers.get("Content-Type")):
        raise ApiError(415, "UNSUPPORTED_MEDIA_TYPE",
                       "Content-Type must be application/json" + (" or absent" if untyped_is_json else ""))
    data = raw_body()
    try:
        value = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ApiError(400, "INVALID_JSON", f"body is not valid JSON: {exc}") from None
    if require_object and not isinstance(value, dict):
        raise ApiError(400, "VALIDATION_FAILED", "body must be a JSON object")
    return value
