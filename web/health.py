"""The Pi's own health for the technician: `GET /api/v1/health/pi` (JSON) and `pi_health()` in
the page templates (the overview's warning and figures).

The core reads the Pi (gateway/core/health.py) and answers RPC `health.pi`; the web adds its own
process's bytes written, so the page shows the gateway's (core + web) bytes written per day.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

from gateway.core.health import WriteRate, process_written_bytes
from web.auth import require_technician
from web.context import ctx
from web.openapi import doc

log = logging.getLogger(__name__)

bp = Blueprint("pihealth", __name__)
CORE_TIMEOUT_SEC = 1.5  # a page render waits at most this for the core
WRITES = "carwash.web_writes"

PI_SCHEMA = {
    "type": "object",
    "required": ["available"],
    "properties": {
        "available": {"type": "boolean", "description": "false when the core did not answer"},
        "cpu_temp_c": {"type": ["number", "null"]},
        "flags": {"type": ["object", "null"], "description": "get_throttled flags; null: not available"},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "attention": {"type": "boolean"},
        "disk_used_percent": {"type": "number"},
        "gateway_written_bytes_per_day": {"type": ["number", "null"]},
    },
}


def pi_report(app: Flask | None = None) -> dict[str, Any]:
    """The core's `health.pi` plus the web's writes; `available: false` when the core is silent."""
    from gateway.mqtt.client import BusUnavailable, RpcTimeout
    from gateway.mqtt.rpc import RpcError

    app = app or current_app._get_current_object()  # type: ignore[attr-defined]
    c = ctx(app)
    writes: WriteRate = app.extensions[WRITES]
    web_written = process_written_bytes()
    if web_written is not None:
        writes.add(web_written)
    out: dict[str, Any] = {"available": False}
    try:
        if c.bus is None:
            raise BusUnavailable("no broker client")
        core = c.bus.call("health.pi", {}, timeout=CORE_TIMEOUT_SEC)
        if isinstance(core, dict) and core:
            out = {"available": True, **core}
    except (BusUnavailable, RpcTimeout, RpcError) as exc:
        log.debug("health.pi: %s", exc)
    unclean = out.get("last_unclean_stop") or {}
    at = unclean.get("detected_at") if isinstance(unclean, dict) else None
    out["last_unclean_stop_text"] = (dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
                                     if isinstance(at, (int, float)) else None)
    out["web_written_bytes"] = web_written
    out["web_written_bytes_per_day"] = writes.per_day()
    parts = [out.get("core_written_bytes_per_day"), out["web_written_bytes_per_day"]]
    out["gateway_written_bytes_per_day"] = sum(parts) if all(p is not None for p in parts) else None
    return out


@bp.get("/api/v1/health/pi")
@doc("The Pi's own health: temperature, throttling and under-voltage, data disk, memory, uptime, writes, "
     "last unclean stop", tags=("gateway",), response=PI_SCHEMA, errors=(401,), security="bearer")
def pi_health() -> Any:
    require_technician()
    return jsonify(pi_report())


def install(app: Flask) -> None:
    """The blueprint, and `pi_health()` for templates (called only by a template that shows it)."""
    app.extensions[WRITES] = WriteRate()
    app.register_blueprint(bp)

    @app.context_processor
    def _pi() -> dict[str, Any]:
        return {"pi_health": lambda: pi_report(app)}
