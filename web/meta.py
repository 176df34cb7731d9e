"""Gateway-level endpoints: health (wash-contract.md) and the OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify

from web.context import ctx
from web.openapi import build_spec, doc

bp = Blueprint("meta", __name__)

HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status", "mqtt", "plc", "cloud", "db"],
    "properties": {
        "status": {"enum": ["ok", "degraded"]},
        "mqtt": {"type": "boolean"},
        "plc": {"type": "object", "additionalProperties": {"type": "boolean"}},
        "cloud": {"type": "boolean"},
        "db": {"type": "boolean"},
    },
}


def health_report() -> dict[str, Any]:
    """`status` is ok only when every part is up. A site without a cloud URL ignores the cloud."""
    c = ctx()
    bus = c.bus
    mqtt_ok = bool(bus and bus.connected)
    core = (bus.health if bus else None) or {}
    plc = {bay.id: False for bay in c.config.bays}
    plc.update({k: bool(v) for k, v in (core.get("plc") or {}).items() if k in plc})
    cloud = bool(core.get("cloud")) if mqtt_ok else False
    db_ok = c.db_ok()
    cloud_needed = bool(c.config.cloud.url)
    ok = mqtt_ok and db_ok and all(plc.values()) and (cloud or not cloud_needed)
    return {"status": "ok" if ok else "degraded", "mqtt": mqtt_ok, "plc": plc, "cloud": cloud, "db": db_ok}


@bp.get("/api/health")
@doc("Gateway health; always 200", tags=("gateway",), response=HEALTH_SCHEMA)
def health() -> Any:
    return jsonify(health_report())


@bp.get("/api/openapi.json")
@doc("This OpenAPI 3.1 document", tags=("gateway",), response={"type": "object"})
def openapi() -> Any:
    return jsonify(build_spec(current_app))
