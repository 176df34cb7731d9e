"""Technician APIs for the cloud link and the PLC buses (Bearer JWT or the page's session).

The core owns the outbox drain and the buses: these routes ask it (RPC) and relay its answer.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, jsonify

from web.auth import require_technician
from web.body import SQLITE_MAX_INT, read_json
from web.context import ask_core
from web.errors import ApiError
from web.openapi import doc

bp = Blueprint("cloud", __name__)

MAX_SEQ = SQLITE_MAX_INT  # outbox seq are SQLite rowids
MAX_SEQS = 1000  # per call: more than the cloud page ever lists (100), well below SQLite's variable limit
SEQ_REQ = {"type": "object", "required": ["seq"],
           "properties": {"seq": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": MAX_SEQ},
                                  "minItems": 1, "maxItems": MAX_SEQS}}}


@bp.get("/api/v1/outbox/state")
@doc("The outbox drainer's state: backlog, dead letters, last error, degraded reasons", tags=("cloud",),
     response={"type": "object"}, errors=(401, 503), security="bearer")
def outbox_state() -> Any:
    require_technician()
    return jsonify({"success": True, "data": ask_core("uplink.state", {})})


def _seqs() -> list[int]:
    """The outbox sequence numbers of the body; 400 unless 1 to MAX_SEQS integers in 1..MAX_SEQ
    (a larger integer made the core's query fail: SQLite cannot bind it, a 500)."""
    seq = read_json().get("seq")
    if (not isinstance(seq, list) or not 1 <= len(seq) <= MAX_SEQS
            or not all(isinstance(x, int) and not isinstance(x, bool) and 1 <= x <= MAX_SEQ for x in seq)):
        raise ApiError(400, "VALIDATION_FAILED", f"seq must be a list of 1 to {MAX_SEQS} outbox sequence numbers")
    return seq


@bp.post("/api/v1/outbox/requeue")
@doc("Send dead-letter events again (they become pending)", tags=("cloud",), request=SEQ_REQ,
     response={"type": "object"}, errors=(400, 401, 403, 415, 503), security="bearer")
def requeue() -> Any:
    require_technician()
    return jsonify({"success": True, "data": ask_core("uplink.requeue", {"seq": _seqs()})})


@bp.post("/api/v1/outbox/discard")
@doc("Delete dead-letter events for good", tags=("cloud",), request=SEQ_REQ, response={"type": "object"},
     errors=(400, 401, 403, 415, 503), security="bearer")
def discard() -> Any:
    require_technician()
    return jsonify({"success": True, "data": ask_core("uplink.discard", {"seq": _seqs()})})


@bp.get("/api/v1/buses/diagnostics")
@doc("Per PLC bus: link, transactions, reconnects; per bay: polls, errors, last error, latency", tags=("wash",),
     response={"type": "object"}, errors=(401, 503), security="bearer")
def diagnostics() -> Any:
    require_technician()
    return jsonify({"success": True, "data": ask_core("wash.diagnostics", {})})


SCAN_REQ = {"type": "object", "required": ["bus"],
            "properties": {"bus": {"type": "string"}, "first": {"type": "integer", "minimum": 1},
                           "last": {"type": "integer", "maximum": 247}, "profile": {"type": "string"}}}


@bp.post("/api/v1/buses/scan")
@doc("Probe unit ids on a PLC bus between polls and read their poll registers (decided by the core)",
     tags=("wash",), request=SCAN_REQ, response={"type": "object"}, errors=(400, 401, 403, 415, 503),
     security="bearer")
def scan() -> Any:
    require_technician()
    body = read_json()
    params = {k: body[k] for k in ("bus", "first", "last", "profile") if k in body}
    return jsonify({"success": True, "data": ask_core("wash.scan", params, timeout=SCAN_TIMEOUT_SEC)})


SCAN_TIMEOUT_SEC = 60.0  # 32 silent units x the bus timeout, at worst
