"""The Flask app through its test client: envelope on every error, limits, schema gate, OpenAPI."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from flask import Blueprint, Flask, jsonify

from gateway.store import migrate
from tests.conftest import Site
from tests.unit.harness import web_app
from web.body import read_json
from web.context import ctx
from web.openapi import doc

ENVELOPE_KEYS = {"success", "errorCode", "message", "statusCode", "timestamp", "path"}


def probe_blueprint() -> Blueprint:
    bp = Blueprint("probe", __name__)

    @bp.post("/api/probe/json")
    @doc("echo a JSON object", request={"type": "object"}, errors=(400, 415))
    def echo() -> object:
        return jsonify(read_json())

    @bp.get("/api/probe/boom")
    @doc("always fails")
    def boom() -> object:
        raise RuntimeError("secret internals")

    return bp


@pytest.fixture
def app(site: Site) -> Iterator[Flask]:
    with web_app(site, probe_blueprint()) as a:
        yield a


def check_envelope(resp, status: int, code: str, path: str) -> dict:
    body = resp.get_json()
    assert resp.status_code == status
    assert set(body) == ENVELOPE_KEYS
    assert (body["success"], body["errorCode"], body["statusCode"], body["path"]) == (False, code, status, path)
    assert body["timestamp"].endswith("Z")
    return body


def test_schema_gate_then_serving(app: Flask) -> None:
    client = app.test_client()
    # The database exists but the core has not migrated it yet.
    check_envelope(client.post("/api/probe/json", json={}), 503, "SERVICE_UNAVAILABLE", "/api/probe/json")
    health = client.get("/api/health")
    assert health.status_code == 200 and health.get_json()["db"] is False
    migrate(ctx(app).db)
    assert client.post("/api/probe/json", json={"a": 1}).get_json() == {"a": 1}
    assert client.get("/api/health").get_json()["db"] is True


def test_every_error_uses_the_envelope(app: Flask) -> None:
    migrate(ctx(app).db)
    c = app.test_client()
    check_envelope(c.get("/nope"), 404, "NOT_FOUND", "/nope")
    r = c.get("/api/probe/json")
    check_envelope(r, 405, "METHOD_NOT_ALLOWED", "/api/probe/json")
    assert "POST" in r.headers["Allow"]
    check_envelope(c.post("/api/probe/json", data="{}", content_type="text/plain"), 415,
                   "UNSUPPORTED_MEDIA_TYPE", "/api/probe/json")
    check_envelope(c.post("/api/probe/json", data="{bad", content_type="application/json"), 400,
                   "INVALID_JSON", "/api/probe/json")
    check_envelope(c.post("/api/probe/json", data="[1]", content_type="application/json"), 400,
                   "VALIDATION_FAILED", "/api/probe/json")
    big = b"{" + b" " * (256 * 1024) + b"}"
    check_envelope(c.post("/api/probe/json", data=big, content_type="application/json"), 413,
                   "PAYLOAD_TOO_LARGE", "/api/probe/json")
    body = check_envelope(c.get("/api/probe/boom"), 500, "INTERNAL_ERROR", "/api/probe/boom")
    assert "secret internals" not in str(body) and "Traceback" not in str(body)


def test_openapi_lists_every_route_documented(app: Flask) -> None:
    spec = app.test_client().get("/api/openapi.json").get_json()
    assert spec["openapi"].startswith("3.1")
    routes = {re.sub(r"<(?:\w+:)?(\w+)>", r"{\1}", r.rule) for r in app.url_map.iter_rules() if r.endpoint != "static"}
    assert routes == set(spec["paths"])
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert not op.get("x-undocumented"), f"{method.upper()} {path} has no @doc"
            assert "500" in op["responses"]


def test_device_api_rate_limit_per_address() -> None:
    """Token buckets: a burst passes, then 429 with Retry-After; other addresses and the exempt
    ones are unaffected; refills with time; memory bounded."""
    from gateway.access import ratelimit
    from gateway.access.ratelimit import RateLimiter

    rl = RateLimiter(rate=2.0, burst=3, exempt=("127.0.0.1",))
    assert [rl.check("10.0.0.5", now=100.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    wait = rl.check("10.0.0.5", now=100.0)
    assert wait == pytest.approx(0.5) and rl.limited == 1
    assert rl.check("10.0.0.6", now=100.0) == 0.0  # another device
    assert all(rl.check("127.0.0.1", now=100.0) == 0.0 for _ in range(50))
    assert rl.check("10.0.0.5", now=100.6) == 0.0  # refilled
    assert RateLimiter(rate=0, burst=1).check("10.0.0.5") == 0.0  # off
    old = ratelimit.MAX_CLIENTS
    ratelimit.MAX_CLIENTS = 10
    try:
        for i in range(50):
            rl.check(f"10.1.0.{i}", now=200.0)
        assert len(rl._buckets) == 10
    finally:
        ratelimit.MAX_CLIENTS = old
