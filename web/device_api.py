"""The HTTP API devices call (device-api.md §3, all signed per §2) and the device listing.

Order of checks: body size (413, before reading) → signature on the raw bytes (401, nothing
stored) → content type (415) → JSON (400 INVALID_JSON) → fields (400 VALIDATION_FAILED naming
the field) → device known (404 DEVICE_NOT_FOUND) → stored in one IMMEDIATE transaction → 2xx.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from gateway.access.signing import Verdict, verify_http
from gateway.clock import iso_z, utc_now
from gateway.devices import validate
from gateway.devices.registry import (
    ClaimRefused,
    DeviceNotFound,
    claim,
    prepare_upload,
    register,
    reject,
    report_configs,
    store_upload,
)
from gateway.store.models import Device, DeviceConfig, DeviceLifecycleEvent
from web.auth import require_technician
from web.body import raw_body, read_json
from web.context import ask_core, ctx, require_db
from web.errors import ApiError
from web.openapi import doc

bp = Blueprint("device_api", __name__)

SIGNED_ERRORS = (400, 401, 404, 413, 415)
UPLOADED_REPLY = '{"success":true,"data":{"length":%d},"message":"Logs uploaded successfully"}\n'
# The request schemas state the rules of device-api.md §3 that `gateway.devices.validate` enforces,
# so that a client (and the fuzzer, tests/fuzzing.py) can tell a valid request from an invalid one.
DEVICE_ID = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
EPOCH_MS = {"type": "integer", "minimum": 0, "maximum": validate.MAX_INT}
REGISTER_REQ = {"type": "object", "required": ["chip_id", "mac_address", "firmware_version"],
                "properties": {"chip_id": {"type": "string", "pattern": "^[0-9A-Fa-f]{6,16}$"},
                               "mac_address": {"type": "string", "pattern": "^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$"},
                               "firmware_version": {"type": "string", "minLength": 1, "maxLength": 64,
                                                    "description": "printable characters"}}}
LIFECYCLE_REQ = {"type": "object", "required": ["topic_request", "device_id"],
                 "properties": {"topic_request": {"enum": ["startup", "shutdown"]}, "device_id": DEVICE_ID,
                                "device_status": {"enum": list(validate.DEVICE_STATUSES)},
                                "payload": {"type": "object", "properties": {"configs": {"type": "object"}}},
                                "timestamp": EPOCH_MS}}


def _counts(keys: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "properties": {k: {"type": "integer", "minimum": 0, "maximum": 1_000_000} for k in keys}}


LOG_ITEM = {"type": "object", "required": ["type", "status", "timestamp", "total_amount"],
            "properties": {"type": {"type": "string", "pattern": "^[A-Z][A-Z0-9_]{0,31}$"},
                           "status": {"enum": list(validate.PAYMENT_STATUSES)}, "timestamp": EPOCH_MS,
                           "total_amount": {**EPOCH_MS, "description": "baht"},
                           "qr": {"type": "object", "properties": {"chargeId": {"type": "string", "maxLength": 128},
                                                                   "net_amount": EPOCH_MS}},
                           "bank": _counts(validate.BANKNOTES), "coin": _counts(validate.COINS)}}
LOGS_REQ = {"type": "object", "required": ["device_id", "items"],
            "properties": {"device_id": DEVICE_ID,
                           "items": {"type": "array", "minItems": 1, "maxItems": validate.MAX_ITEMS,
                                     "items": LOG_ITEM}}}

def signed_target() -> str:
    """What a request without a body signs: its target (path and query string) as received,
    escapes included. Not `request.path`: that is percent-decoded, so a device that signed the
    path it sent (`/payments/a%20b/status`) was refused (device-api.md §2: the bytes received,
    never a re-serialisation). gunicorn and Werkzeug give the target as RAW_URI."""
    raw = request.environ.get("RAW_URI")
    if isinstance(raw, str) and raw.startswith("/"):
        return raw
    return request.full_path.rstrip("?") if request.query_string else request.path


def verify_signature() -> None:
    """401 MISSING_SIGNATURE / INVALID_SIGNATURE unless `x-signature` matches the raw request."""
    c = ctx()
    verdict = verify_http(request.headers.get("x-signature"), body=raw_body(), path_with_query=signed_target(),
                          key=c.secrets.device_signing_key, schemes=c.config.signatures.http_schemes,
                          legacy_empty_body=c.config.signatures.legacy_empty_body_signature)
    if verdict is Verdict.MISSING:
        raise ApiError(401, "MISSING_SIGNATURE", "x-signature header is required")
    if verdict is Verdict.INVALID:
        raise ApiError(401, "INVALID_SIGNATURE", "x-signature does not match the request")


def _body() -> dict[str, Any]:
    verify_signature()
    body: dict[str, Any] = read_json(untyped_is_json=True)  # an object: read_json requires one
    return body


def _invalid(exc: validate.Invalid) -> ApiError:
    return ApiError(400, "VALIDATION_FAILED", str(exc))


def _write(fn: Any) -> Any:
    """Run a store write through the group-commit writer (returns after the commit)."""
    writer = ctx().writer
    if writer is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "database not open")
    return writer.run(fn)


@bp.post("/api/v1/devices/need-register")
@doc("Pairing: the device's id and a fresh 4-digit PIN (valid devices.pin_ttl_sec)", tags=("device",),
     request=REGISTER_REQ, response={"type": "object"}, errors=(*SIGNED_ERRORS, 403), security="device-signature")
def need_register() -> Any:
    body = _body()
    try:
        reg = validate.registration(body)
    except validate.Invalid as exc:
        raise _invalid(exc) from None
    c = ctx()
    if c.config.devices.pairing_requires_button and not c.pairing_open():
        raise ApiError(403, "FORBIDDEN", "the pairing window is closed: press the gateway's service button "
                                         "or open it on the technician page")
    db = require_db()
    r = _write(lambda: register(db, reg, pin_ttl_sec=c.config.devices.pin_ttl_sec, site_id=c.config.site.id))
    return jsonify({"success": True, "data": {"pin": r.pin, "device_id": r.device_id},
                    "message": "Device registered successfully"})


def _lifecycle_or_none(body: dict[str, Any], path_id: str | None) -> validate.Lifecycle | None:
    if "topic_request" not in body:
        return None
    try:
        doc_ = validate.lifecycle(body)
    except validate.Invalid as exc:
        raise _invalid(exc) from None
    if path_id is not None and doc_.device_id != path_id:
        raise ApiError(400, "VALIDATION_FAILED", "device_id: differs from the one in the path")
    return doc_


@bp.post("/api/v1/device/sync-configs/<device_id>")
@doc("A device reports its configs (any object), or its startup/shutdown document", tags=("device",),
     request={"type": "object"}, response={"type": "object"}, errors=SIGNED_ERRORS, security="device-signature")
def sync_configs(device_id: str) -> Any:
    body = _body()
    life = _lifecycle_or_none(body, device_id)
    configs = life.configs if life else body
    c = ctx()
    try:
        db = require_db()
        _write(lambda: report_configs(db, device_id, configs, site_id=c.config.site.id, lifecycle=life))
    except DeviceNotFound:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}; register it first") from None
    return jsonify({"success": True, "message": "Device configs synced successfully"})


@bp.post("/api/v1/devices/sync")
@doc("The startup/shutdown document of a device", tags=("device",), request=LIFECYCLE_REQ,
     response={"type": "object"}, errors=SIGNED_ERRORS, security="device-signature")
def devices_sync() -> Any:
    body = _body()
    life = _lifecycle_or_none(body, None)
    if life is None:
        raise ApiError(400, "VALIDATION_FAILED", "topic_request: startup or shutdown")
    c = ctx()
    try:
        db = require_db()
        _write(lambda: report_configs(db, life.device_id, life.configs, site_id=c.config.site.id, lifecycle=life))
    except DeviceNotFound:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {life.device_id!r}; register it first") from None
    return jsonify({"success": True, "message": "Device configs synced successfully"})


@bp.post("/api/v1/device-event-logs/uploads")
@doc("Upload buffered event logs (1-1000 items); stored before the 201", tags=("device",), request=LOGS_REQ,
     response={"type": "object"}, status=201, errors=SIGNED_ERRORS, security="device-signature")
def logs_upload() -> Any:
    body = _body()
    try:
        dev, items = validate.log_upload(body)
    except validate.Invalid as exc:
        raise _invalid(exc) from None
    # Keys, rows and the outbox event are worked out here, in the request's thread: the writer
    # thread, which every write of the web waits for, only runs the statements.
    prepared = prepare_upload(dev, items, site_id=ctx().config.site.id)
    try:
        db = require_db()
        r = _write(lambda: store_upload(db, prepared))
    except DeviceNotFound:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {dev!r}; register it first") from None
    # What jsonify makes of {"success": true, "data": {"length": n}, "message": ...}, without
    # its JSON provider and encoder set-up on the busiest endpoint.
    return current_app.response_class(UPLOADED_REPLY % int(r.length), status=201, mimetype="application/json")


def _device_view(d: Device) -> dict[str, Any]:
    pending = not d.claimed
    pin_valid = pending and d.pin_expires_at is not None and d.pin_expires_at > utc_now()
    view = {"device_id": d.device_id, "device_type": d.device_type, "firmware_version": d.firmware_version,
            "name": d.name, "claimed": d.claimed, "pending": pending and not d.rejected,
            "pin": d.pairing_pin if pin_valid else None,
            "pin_expires_at": iso_z(d.pin_expires_at) if pin_valid and d.pin_expires_at else None,
            "status": d.status, "online": d.online, "rssi": d.rssi,
            "last_seen_at": iso_z(d.last_seen_at) if d.last_seen_at else None,
            "mac_address": d.mac_address, "chip_id": d.chip_id}
    return ctx().presence.merge(d.device_id, view)


@bp.get("/api/v1/devices")
@doc("Devices with status and pairing PIN while pending; filters type and status", tags=("device",),
     response={"type": "object"}, params={"type": {"enum": ["CAR_WASH", "HELMET_DRYER", "UNKNOWN"]},
                                          "status": {"type": "string"}}, errors=(400, 401), security="bearer")
def list_devices() -> Any:
    require_technician()  # the PIN is the proof that a technician stands at the device
    q = Device.select().order_by(Device.registered_at)
    if (kind := request.args.get("type")) is not None:
        q = q.where(Device.device_type == kind)
    if (status := request.args.get("status")) is not None:
        if status == "pending":
            q = q.where((Device.claimed == False) & (Device.rejected == False))  # noqa: E712
        elif status in ("online", "offline"):
            q = q.where(Device.online == (status == "online"))
        elif status in validate.DEVICE_STATUSES:
            q = q.where(Device.status == status)
        else:
            raise ApiError(400, "VALIDATION_FAILED", "status: pending, online, offline, NORMAL, ERROR or OFFLINE")
    return jsonify({"success": True, "data": [_device_view(d) for d in q]})


@bp.get("/api/v1/devices/<device_id>")
@doc("One device with its reported configs and recent events", tags=("device",), response={"type": "object"},
     errors=(401, 404), security="bearer")
def get_device(device_id: str) -> Any:
    require_technician()
    d = Device.get_or_none(Device.device_id == device_id)
    if d is None:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}")
    cfg = DeviceConfig.select().where(DeviceConfig.device == device_id).order_by(DeviceConfig.id.desc()).first()
    events = (DeviceLifecycleEvent.select().where(DeviceLifecycleEvent.device == device_id)
              .order_by(DeviceLifecycleEvent.id.desc()).limit(20))
    view = _device_view(d)
    view["configs"] = json.loads(cfg.configs) if cfg else None
    view["configs_reported_at"] = iso_z(cfg.reported_at) if cfg else None
    view["events"] = [{"kind": e.kind, "at": iso_z(e.at), "detail": json.loads(e.detail) if e.detail else None}
                      for e in events]
    return jsonify({"success": True, "data": view})


CLAIM_REQ = {"type": "object", "required": ["name"],
             "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 64},
                            "pin": {"type": "string", "pattern": "^[0-9]{4}$"}}}


@bp.post("/api/v1/devices/<device_id>/claim")
@doc("Claim a pending device under a name (optionally checking the PIN it shows)", tags=("device",),
     request=CLAIM_REQ, response={"type": "object"}, errors=(400, 401, 404, 409, 415), security="bearer")
def claim_device(device_id: str) -> Any:
    user = require_technician()
    body = read_json()
    name, pin = body.get("name"), body.get("pin")
    if not isinstance(name, str) or not 1 <= len(name.strip()) <= 64:
        raise ApiError(400, "VALIDATION_FAILED", "name: 1 to 64 characters")
    if pin is not None and (not isinstance(pin, str) or len(pin) != 4 or not (pin.isascii() and pin.isdigit())):
        raise ApiError(400, "VALIDATION_FAILED", "pin: 4 digits")
    try:
        db, site_id = require_db(), ctx().config.site.id
        _write(lambda: claim(db, device_id, name.strip(), pin=pin, site_id=site_id, by=user))
    except DeviceNotFound:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}") from None
    except ClaimRefused as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    return jsonify({"success": True, "message": "Device claimed"})


@bp.post("/api/v1/devices/<device_id>/reject")
@doc("Reject a pending device", tags=("device",), response={"type": "object"}, errors=(401, 404),
     security="bearer")
def reject_device(device_id: str) -> Any:
    user = require_technician()
    try:
        db = require_db()
        _write(lambda: reject(db, device_id, by=user))
    except DeviceNotFound:
        raise ApiError(404, "DEVICE_NOT_FOUND", f"no device {device_id!r}") from None
    return jsonify({"success": True, "message": "Device rejected"})


@bp.get("/api/v1/pairing")
@doc("The pairing window: open, and until when", tags=("device",), response={"type": "object"}, errors=(401,),
     security="bearer")
def pairing_state() -> Any:
    require_technician()
    c = ctx()
    return jsonify({"success": True, "data": {"open": c.pairing_open(), "until": c.pairing.get("until"),
                                              "required": c.config.devices.pairing_requires_button}})


@bp.post("/api/v1/pairing/<action>")
@doc("Open (optionally {seconds}) or close the pairing window; decided by the core", tags=("device",),
     response={"type": "object"}, params={"action": {"enum": ["open", "close"]}}, errors=(400, 401, 404, 503),
     security="bearer")
def pairing_action(action: str) -> Any:
    user = require_technician()
    if action not in ("open", "close"):
        raise ApiError(404, "NOT_FOUND", "action must be open or close")
    params: dict[str, Any] = {"by": user}
    if action == "open" and request.content_length:
        body = read_json()
        if "seconds" in body:
            params["seconds"] = body["seconds"]
    state = ask_core(f"pairing.{action}", params)
    ctx().pairing = state  # the retained update follows; answer with the core's word now
    return jsonify({"success": True, "data": state})
