"""The upload's way through the app, made cheaper without changing what a client sees: the
upload reply, the body read at its declared length, Socket.IO's middleware only on its path,
`ensure_sync` remembered, the metrics children reused."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Blueprint, Flask, jsonify, request

from gateway.access.signing import http_signature
from tests.conftest import Site
from tests.unit.harness import web_app
from web.body import raw_body
from web.device_api import UPLOADED_REPLY


def probe_blueprint() -> Blueprint:
    bp = Blueprint("probe", __name__)

    @bp.post("/api/probe/raw")
    def raw() -> Any:
        return jsonify({"length": len(raw_body()), "sha": http_signature(raw_body(), "k"),
                        "socketio_environ": "flask.app" in request.environ})

    return bp


@pytest.fixture
def app(site: Site) -> Iterator[Flask]:
    with web_app(site, probe_blueprint(), migrated=True) as a:
        yield a


def test_the_upload_reply_is_what_jsonify_made(app: Flask) -> None:
    with app.test_request_context():
        for n in (0, 1, 10, 1000):
            expected = jsonify({"success": True, "data": {"length": n}, "message": "Logs uploaded successfully"})
            assert (UPLOADED_REPLY % n).encode() == expected.get_data()


def test_the_body_is_read_at_its_declared_length(app: Flask) -> None:
    c = app.test_client()
    body = json.dumps({"items": ["x" * 100] * 50}).encode()
    r = c.post("/api/probe/raw", data=body, content_type="application/json")
    assert r.get_json()["length"] == len(body) and r.get_json()["sha"] == http_signature(body, "k")
    assert c.post("/api/probe/raw", data=b"", content_type="application/json").get_json()["length"] == 0
    limit = app.config["MAX_CONTENT_LENGTH"]
    at_limit = c.post("/api/probe/raw", data=b"x" * limit, content_type="application/json")
    assert at_limit.get_json()["length"] == limit
    assert c.post("/api/probe/raw", data=b"x" * (limit + 1)).status_code == 413


def test_a_body_shorter_than_declared_is_400_not_a_signature_error(app: Flask) -> None:
    r = app.test_client().post("/api/probe/raw", data=b"{}", content_type="application/json",
                               environ_overrides={"CONTENT_LENGTH": "100"})
    assert r.status_code == 400 and r.get_json()["errorCode"] == "VALIDATION_FAILED"


def test_socketio_middleware_only_on_its_path(app: Flask) -> None:
    c = app.test_client()
    env = {"gunicorn.socket": object()}  # what made the middleware define a class per request
    r = c.post("/api/probe/raw", data=b"{}", content_type="application/json", environ_overrides=env)
    assert r.status_code == 200 and r.get_json()["socketio_environ"] is False
    # Engine.IO still answers its path (an unknown session: no connection, no background thread),
    # not Flask's 404 envelope.
    eio = c.get("/socket.io/?EIO=4&transport=polling&sid=nope", environ_overrides=env)
    assert eio.status_code == 400 and not eio.is_json


def test_ensure_sync_remembers_sync_functions_only(app: Flask) -> None:
    def view() -> str:
        return "ok"

    async def coroutine() -> str:
        return "ok"

    assert app.ensure_sync(view) is view and app.ensure_sync(view) is view
    for _ in range(2):  # not remembered: every call still goes through Flask's async handling
        with pytest.raises(RuntimeError, match="async"):
            app.ensure_sync(coroutine)


def test_metrics_count_every_answer_by_status(app: Flask) -> None:
    c = app.test_client()
    for _ in range(3):
        c.post("/api/probe/raw", data=b"{}", content_type="application/json")
    c.post("/api/probe/raw", data=b"x" * (app.config["MAX_CONTENT_LENGTH"] + 1))
    text = c.get("/metrics").get_data(as_text=True)
    assert 'carwash_http_requests_total{method="POST",route="/api/probe/raw",status="200"} 3.0' in text
    assert 'carwash_http_requests_total{method="POST",route="/api/probe/raw",status="413"} 1.0' in text
    assert 'carwash_http_request_duration_seconds_count{method="POST",route="/api/probe/raw"} 4.0' in text
