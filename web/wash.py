"""The wash REST API of wash-contract.md, its SSE stream, and the Socket.IO `wash:status` event.

Start, stop and reset are decisions of the core: the web asks over RPC (`wash.command`) and relays
the answer (200, idempotent 200, 404, 409, 503). A reset (RESET_ERROR to a PLC that latched an
error) needs the technician's token whatever `web.wash_api_auth` says, and is recorded with the
technician's name. Reads come from the live feed (retained status) and
the database (history, stats); the web never writes bay state or sessions.
"""

from __future__ import annotations

import datetime as dt
import json
import queue
from collections.abc import Iterator
from typing import Any, Literal, overload

from flask import Blueprint, Response, jsonify, request

from gateway.clock import iso_z
from gateway.store.models import Bay, BayReset, WashSession, tuple_rows
from web.auth import require_technician
from web.body import read_json
from web.context import ask_core, ctx
from web.errors import ApiError
from web.openapi import doc
from web.sse import KEEPALIVE, KEEPALIVE_SEC, frame, sse_response

bp = Blueprint("wash", __name__)

STATUS: dict[str, Any] = {
    "type": "object",
    "properties": {
        "bayId": {"type": "string"}, "sessionId": {"type": ["string", "null"]},
        "requestId": {"type": ["string", "null"]},
        "state": {"enum": ["IDLE", "STARTING", "WASHING", "DONE", "CANCELED", "ERROR", "OFFLINE"]},
        "progress": {"type": "integer", "minimum": 0, "maximum": 100},
        "course": {"type": ["string", "null"]}, "errorCode": {"type": ["string", "null"]},
        "timestampUtc": {"type": "string"},
    },
}
BAY = {"type": "object", "properties": {**STATUS["properties"], "name": {"type": "string"}}}
SESSION = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "bayId": {"type": "string"}, "course": {"type": ["string", "null"]},
        "state": {"type": "string"}, "startTime": {"type": "string"}, "endTime": {"type": ["string", "null"]},
        "errorCode": {"type": ["string", "null"]}, "sessionId": {"type": "string"},
        "requestId": {"type": ["string", "null"]},
    },
}
FIELD = {"type": "string", "minLength": 1, "maxLength": 128}  # what _str_field accepts
START_REQ = {
    "type": "object", "required": ["bayId", "course"],
    "properties": {"bayId": FIELD, "course": FIELD, "requestId": FIELD},
}
STOP_REQ = {"type": "object", "required": ["bayId"], "properties": {"bayId": FIELD}}
RESET = {
    "type": "object",
    "properties": {
        "id": {"type": "integer"}, "bayId": {"type": "string"}, "requestId": {"type": "string"},
        "by": {"type": "string"}, "errorCode": {"type": ["string", "null"]},
        "outcome": {"enum": ["CLEARED", "STILL_IN_ERROR", "NO_ANSWER", "OFFLINE"]},
        "requestedAt": {"type": "string"}, "doneAt": {"type": "string"},
    },
}
RANGE_PARAMS = {"from": {"type": "string", "format": "date-time"}, "to": {"type": "string", "format": "date-time"}}


def _statuses() -> dict[str, dict[str, Any]]:
    """Live status of every configured bay (the feed; the stored row until the feed has it)."""
    c = ctx()
    live = c.feed.snapshot()
    out: dict[str, dict[str, Any]] = {}
    rows = {r.bay_id: r for r in Bay.select()} if len(live) < len(c.config.bays) else {}
    for b in c.config.bays:
        if b.id in live:
            out[b.id] = live[b.id]
            continue
        r = rows.get(b.id)
        out[b.id] = {
            "bayId": b.id, "sessionId": r.session_id if r else None, "requestId": r.request_id if r else None,
            "state": r.state if r else "OFFLINE", "progress": r.progress if r else 0,
            "course": r.course if r else None, "errorCode": r.error_code if r else "PLC_OFFLINE",
            "timestampUtc": iso_z(r.updated_at) if r else iso_z(),
        }
    return out


def _known_bay(bay_id: str) -> None:
    if bay_id not in {b.id for b in ctx().config.bays}:
        raise ApiError(404, "BAY_NOT_FOUND", f"no bay {bay_id!r}")


def _authorize_write() -> None:
    # The seed needs only LAN access; a site may require the technician token (web.wash_api_auth).
    if ctx().config.web.wash_api_auth == "jwt":
        require_technician()


@overload
def _str_field(body: dict[str, Any], name: str, *, required: Literal[True], max_len: int = 128) -> str: ...


@overload
def _str_field(body: dict[str, Any], name: str, *, required: bool, max_len: int = 128) -> str | None: ...


def _str_field(body: dict[str, Any], name: str, *, required: bool, max_len: int = 128) -> str | None:
    """The string field `name`: None when absent and not required; 400 VALIDATION_FAILED otherwise
    unless a non-empty string of at most `max_len` characters."""
    v = body.get(name)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v or len(v) > max_len:
        raise ApiError(400, "VALIDATION_FAILED", f"{name} must be a non-empty string of at most {max_len} characters")
    return v


@bp.get("/api/bays")
@doc("Every configured bay with its live status", tags=("wash",), response={"type": "array", "items": BAY})
def bays() -> Any:
    names = {b.id: b.name or b.id for b in ctx().config.bays}
    out = []
    for bay_id, s in _statuses().items():
        out.append({"bayId": bay_id, "name": names[bay_id], "state": s["state"], "progress": s["progress"],
                    "course": s["course"], "errorCode": s["errorCode"], "sessionId": s["sessionId"],
                    "requestId": s["requestId"]})
    return jsonify(out)


@bp.post("/api/wash/start")
@doc("Start a wash (decided by the core; same rules as MQTT wash/{bayId}/cmd)", tags=("wash",), request=START_REQ,
     response={"type": "object"}, errors=(400, 401, 404, 409, 415, 503))
def start() -> Any:
    _authorize_write()
    body = read_json()
    bay_id = _str_field(body, "bayId", required=True)
    course = _str_field(body, "course", required=True)
    request_id = _str_field(body, "requestId", required=False)
    _known_bay(bay_id)
    r = ask_core("wash.command", {"bayId": bay_id, "action": "START", "course": course, "requestId": request_id})
    out: dict[str, Any] = {"success": True, "bayId": bay_id, "course": r.get("course") or course,
                           "requestId": r["requestId"]}
    if r.get("idempotent"):
        out["idempotent"] = True
    return jsonify(out)


@bp.post("/api/wash/stop")
@doc("Stop the running wash of a bay", tags=("wash",), request=STOP_REQ, response={"type": "object"},
     errors=(400, 401, 404, 409, 415, 503))
def stop() -> Any:
    _authorize_write()
    body = read_json()
    bay_id = _str_field(body, "bayId", required=True)
    _known_bay(bay_id)
    r = ask_core("wash.command", {"bayId": bay_id, "action": "STOP"})
    return jsonify({"success": True, "bayId": bay_id, "requestId": r["requestId"]})


@bp.post("/api/wash/reset")
@doc("Clear a bay's latched PLC error (RESET_ERROR), decided by the core; recorded with the technician",
     tags=("wash",), request=STOP_REQ, response={"type": "object"}, errors=(400, 401, 404, 409, 415, 503),
     security="bearer")
def reset() -> Any:
    username = require_technician()
    body = read_json()
    bay_id = _str_field(body, "bayId", required=True)
    _known_bay(bay_id)
    r = ask_core("wash.command", {"bayId": bay_id, "action": "RESET", "by": f"technician:{username}"})
    out: dict[str, Any] = {"success": True, "bayId": bay_id, "requestId": r["requestId"]}
    if r.get("idempotent"):
        out["idempotent"] = True
    return jsonify(out)


@bp.get("/api/wash/resets")
@doc("Resets of latched PLC errors, newest first: who, when, which code, outcome", tags=("wash",),
     response={"type": "array", "items": RESET}, security="bearer",
     params={"limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}, "bayId": {"type": "string"}},
     errors=(400, 401, 404))
def resets() -> Any:
    require_technician()
    q = BayReset.select()
    bay_id = request.args.get("bayId")
    if bay_id is not None:
        _known_bay(bay_id)
        q = q.where(BayReset.bay == bay_id)
    rows = q.order_by(BayReset.id.desc()).limit(_limit())
    return jsonify([{"id": r.id, "bayId": r.bay_id, "requestId": r.request_id, "by": r.requested_by,
                     "errorCode": r.error_code, "outcome": r.outcome, "requestedAt": iso_z(r.requested_at),
                     "doneAt": iso_z(r.done_at)} for r in rows])


def _limit() -> int:
    raw = request.args.get("limit", "20")
    # isascii: str.isdigit() is true for "¹" and other digits int() refuses (a 500).
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 500:
        raise ApiError(400, "VALIDATION_FAILED", "limit must be an integer from 1 to 500")
    return int(raw)


def _status_view(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in ("bayId", "state", "progress", "course", "errorCode", "sessionId", "timestampUtc")}


@bp.get("/api/wash/status/<bay_id>")
@doc("Status of one bay", tags=("wash",), response=STATUS, errors=(404,))
def status_one(bay_id: str) -> Any:
    _known_bay(bay_id)
    return jsonify(_status_view(_statuses()[bay_id]))


@bp.get("/api/wash/status")
@doc("Status of every bay, by bay id", tags=("wash",), response={"type": "object", "additionalProperties": STATUS})
def status_all() -> Any:
    return jsonify({k: _status_view(v) for k, v in _statuses().items()})


def _parse_time(name: str) -> dt.datetime | None:
    raw = request.args.get(name)
    if raw is None:
        return None
    try:
        t = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
        if t.tzinfo is not None:
            # OverflowError: a time at either end of the calendar has no UTC equivalent
            # ("0001-01-01T00:00:00+01:00"), which was a 500.
            t = t.astimezone(dt.UTC).replace(tzinfo=None)
    except (ValueError, OverflowError):
        raise ApiError(400, "VALIDATION_FAILED", f"{name} must be an ISO 8601 date-time") from None
    return t


def _finished_between() -> Any:
    q = WashSession.select().where(WashSession.end_time.is_null(False))
    frm, to = _parse_time("from"), _parse_time("to")
    if frm is not None:
        q = q.where(WashSession.start_time >= frm)
    if to is not None:
        q = q.where(WashSession.start_time < to)
    return q


@bp.get("/api/wash/history")
@doc("Finished sessions, newest first", tags=("wash",), response={"type": "array", "items": SESSION},
     params={"limit": {"type": "integer", "minimum": 1, "maximum": 500, "default": 20}, "bayId": {"type": "string"},
             **RANGE_PARAMS}, errors=(400,))
def history() -> Any:
    limit = _limit()
    q = _finished_between()
    bay_id = request.args.get("bayId")
    if bay_id is not None:
        _known_bay(bay_id)
        q = q.where(WashSession.bay == bay_id)
    rows = q.order_by(WashSession.start_time.desc(), WashSession.id.desc()).limit(limit)
    return jsonify([{
        "id": r.id, "bayId": r.bay_id, "course": r.course, "state": r.state, "startTime": iso_z(r.start_time),
        "endTime": iso_z(r.end_time) if r.end_time else None, "errorCode": r.error_code, "sessionId": r.session_id,
        "requestId": r.request_id} for r in rows])


@bp.get("/api/wash/stats")
@doc("Counts and average durations of finished sessions", tags=("wash",), response={"type": "object"},
     params=RANGE_PARAMS, errors=(400,))
def stats() -> Any:
    rows = list(tuple_rows(_finished_between().select(WashSession.bay, WashSession.state, WashSession.error_code,
                                                      WashSession.start_time, WashSession.end_time)))
    total = len(rows)
    completed = [r for r in rows if r[1] == "DONE"]
    per_bay: dict[str, list[float]] = {}
    for bay, _state, _err, start_t, end_t in completed:
        per_bay.setdefault(bay, []).append((end_t - start_t).total_seconds())
    durations = [d for ds in per_bay.values() for d in ds]
    errors: dict[str, int] = {}
    for _bay, state, err, _s, _e in rows:
        if state == "ERROR":
            errors[err or "UNKNOWN"] = errors.get(err or "UNKNOWN", 0) + 1
    return jsonify({
        "summary": {"total": total, "completed": len(completed),
                    "canceled": sum(1 for r in rows if r[1] == "CANCELED"),
                    "error": sum(1 for r in rows if r[1] == "ERROR")},
        "avgDurationSec": round(sum(durations) / len(durations)) if durations else 0,
        "perBayAvg": [{"bayId": b, "avgDurationSec": round(sum(ds) / len(ds))} for b, ds in sorted(per_bay.items())],
        "errorByCode": [{"errorCode": k, "count": v} for k, v in sorted(errors.items(), key=lambda kv: -kv[1])],
    })


@bp.get("/api/wash/events")
@doc("Server-sent events: `wash:status` on every status change (current status of every bay first)",
     tags=("wash",), response={"type": "string"}, content_type="text/event-stream")
def events() -> Response:
    feed = ctx().feed
    q = feed.subscribe()
    first = list(_statuses().values())

    def gen() -> Iterator[str]:
        try:
            for s in first:
                yield frame("wash:status", json.dumps(s))
            while True:
                try:
                    s = q.get(timeout=KEEPALIVE_SEC)
                except queue.Empty:
                    yield KEEPALIVE
                    continue
                yield frame("wash:status", json.dumps(s))
        finally:
            feed.unsubscribe(q)

    return sse_response(gen())

