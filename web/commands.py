"""Device commands from the technician (device-api.md §5, Bearer JWT) and their SSE streams.

The web never decides: every command goes to the core (`commands.send` over the local broker),
which validates, stores, publishes and tracks it. The SSE streams replay a command's stored events
(`operation_event`, ids are SSE ids; `Last-Event-ID` resumes) and follow the live ones, woken by
the core's announcements; after `complete` and `results` the server closes the stream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, jsonify, request
from peewee import fn

from gateway.clock import iso_z
from gateway.commands.catalogue import catalogue
from gateway.store.models import BulkOperation, Command, CommandResult, FirmwareImage, OperationEvent, tuple_rows
from web.auth import require_technician
from web.body import SQLITE_MAX_INT, read_json
from web.context import ask_core, ctx
from web.errors import ApiError
from web.firmware import download_url
from web.openapi import DocOptions, doc
from web.sse import KEEPALIVE, KEEPALIVE_SEC, frame, sse_response

bp = Blueprint("commands", __name__)

REPLAY_PAGE = 2000
COMMAND_NAMES = ["APPLY_CONFIG", "RESTART", "UPDATE_FIRMWARE", "RESET_CONFIG", "PING", "GET_STATUS"]
DEVICE_IDS = {"type": "array", "items": {"type": "string"}, "minItems": 1}
APPLY_REQ = {"type": "object", "required": ["device_ids", "configs"],
             "properties": {"device_ids": DEVICE_IDS, "configs": {"type": "object"}}}
RESTART_REQ = {"type": "object", "required": ["device_ids"],
               "properties": {"device_ids": DEVICE_IDS, "delay_seconds": {"type": "integer", "minimum": 0}}}
# Each command's payload as the core's catalogue (gateway/data/commands.json) checks it, and the
# web's UPDATE_FIRMWARE by stored image (`firmware_id`): the document says what is valid.
FIRMWARE_BY_ID = {"type": "object", "required": ["firmware_id"], "additionalProperties": False,
                  "properties": {"firmware_id": {"type": "integer", "minimum": 1, "maximum": SQLITE_MAX_INT},
                                 "reboot_after": {"type": "boolean"},
                                 "timeout_sec": {"type": "integer", "minimum": 5, "maximum": 3600}}}
PAYLOADS = [{"properties": {"command": {"const": ct.name}, "payload": ct.validator.schema}}
            for ct in catalogue().values()]
PAYLOADS.append({"properties": {"command": {"const": "UPDATE_FIRMWARE"}, "payload": FIRMWARE_BY_ID}})
COMMAND_REQ = {"type": "object", "required": ["command"], "anyOf": PAYLOADS,
               "properties": {"command": {"enum": COMMAND_NAMES}, "payload": {"type": "object"}}}
BULK_REQ = {"type": "object", "required": ["device_ids", "command"], "anyOf": PAYLOADS,
            "properties": {"device_ids": DEVICE_IDS, "command": {"enum": COMMAND_NAMES},
                           "payload": {"type": "object"}}}
INITIATED = {"type": "object", "properties": {"setup_id": {"type": "string"}, "command_id": {"type": "string"},
                                              "device_ids": DEVICE_IDS, "total_devices": {"type": "integer"},
                                              "status": {"const": "INITIATED"}}}
COMMAND_ERRORS = (400, 401, 404, 409, 415, 503)


def _send(command: str, payload: dict[str, Any], device_ids: Any, *, bulk: bool) -> dict[str, Any]:
    reply: dict[str, Any] = ask_core("commands.send", {"command": command, "payload": payload,
                                                       "device_ids": device_ids, "bulk": bulk, "source": "web"})
    return reply


def _payload(body: dict[str, Any]) -> dict[str, Any]:
    raw = body.get("payload", {})
    if not isinstance(raw, dict):
        raise ApiError(400, "VALIDATION_FAILED", "payload must be an object")
    payload: dict[str, Any] = raw
    if body.get("command") == "UPDATE_FIRMWARE" and "firmware_id" in payload:
        payload = _firmware_payload(payload)
    return payload


def _firmware_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """`{"firmware_id": N, ...}` → the image's `url`, `version`, `sha256` and `size` from the store."""
    fid = payload["firmware_id"]
    if isinstance(fid, bool) or not isinstance(fid, int):
        raise ApiError(400, "VALIDATION_FAILED", "payload.firmware_id must be an integer")
    # Beyond SQLite's integers no image can exist (and the query could not even be built: a 500).
    image = FirmwareImage.get_or_none(FirmwareImage.id == fid) if fid <= SQLITE_MAX_INT else None
    if image is None:
        raise ApiError(404, "NOT_FOUND", f"no firmware image {fid}")
    rest = {k: v for k, v in payload.items() if k != "firmware_id"}
    return {"url": download_url(image), "version": image.version, "sha256": image.sha256, "size": image.size, **rest}


def _delay_payload(body: dict[str, Any]) -> dict[str, Any]:
    return {"delay_seconds": body["delay_seconds"]} if "delay_seconds" in body else {}


@bp.post("/api/v1/devices/apply-config")
@doc("Apply one config document to many devices (validated per device type); progress on bulk-events",
     tags=("commands",), request=APPLY_REQ, response=INITIATED, errors=COMMAND_ERRORS, security="bearer")
def apply_config() -> Any:
    require_technician()
    body = read_json()
    if not isinstance(body.get("configs"), dict):
        raise ApiError(400, "VALIDATION_FAILED", "configs must be an object")
    data = _send("APPLY_CONFIG", {"configs": body["configs"]}, body.get("device_ids"), bulk=True)
    return jsonify({"success": True, "data": data, "message": "Config apply initiated successfully"})


@bp.post("/api/v1/devices/bulk-restart")
@doc("Restart many devices (optional delay_seconds); progress on bulk-events", tags=("commands",),
     request=RESTART_REQ, response=INITIATED, errors=COMMAND_ERRORS, security="bearer")
def bulk_restart() -> Any:
    require_technician()
    body = read_json()
    data = _send("RESTART", _delay_payload(body), body.get("device_ids"), bulk=True)
    return jsonify({"success": True, "data": data, "message": "Restart initiated successfully"})


@bp.post("/api/v1/devices/bulk-commands")
@doc("Any command to many devices (UPDATE_FIRMWARE may name a stored image: payload.firmware_id)",
     tags=("commands",), request=BULK_REQ, response=INITIATED, errors=COMMAND_ERRORS, security="bearer")
def bulk_command() -> Any:
    require_technician()
    body = read_json()
    data = _send(str(body.get("command")), _payload(body), body.get("device_ids"), bulk=True)
    return jsonify({"success": True, "data": data, "message": "Command initiated successfully"})


@bp.post("/api/v1/devices/<device_id>/restart")
@doc("Restart one device (optional body {delay_seconds}); outcome on events/{command_id}", tags=("commands",),
     response={"type": "object"}, errors=COMMAND_ERRORS, security="bearer")
def restart_one(device_id: str) -> Any:
    require_technician()
    body = read_json() if request.content_length else {}
    data = _send("RESTART", _delay_payload(body), [device_id], bulk=False)
    return jsonify({"success": True, "data": {"command_id": data["command_id"]}, "message": "Restart initiated"})


@bp.post("/api/v1/devices/<device_id>/commands")
@doc("Any command to one device; outcome on events/{command_id}", tags=("commands",), request=COMMAND_REQ,
     response={"type": "object"}, errors=COMMAND_ERRORS, security="bearer")
def command_one(device_id: str) -> Any:
    require_technician()
    body = read_json()
    data = _send(str(body.get("command")), _payload(body), [device_id], bulk=False)
    return jsonify({"success": True, "data": {"command_id": data["command_id"]}, "message": "Command sent"})


# --- state -------------------------------------------------------------------------------------


def result_counts(command_ids: list[str]) -> dict[str, dict[str, int]]:
    """`{command_id: {status: devices}}` for the given commands (one grouped query)."""
    out: dict[str, dict[str, int]] = {}
    q = (CommandResult.select(CommandResult.command, CommandResult.status, fn.COUNT(CommandResult.device).alias("n"))
         .where(CommandResult.command.in_(command_ids)).group_by(CommandResult.command, CommandResult.status))
    for row in tuple_rows(q):
        out.setdefault(row[0], {})[row[1]] = row[2]
    return out


def _command_view(c: Command, counts: dict[str, int]) -> dict[str, Any]:
    return {"command_id": c.command_id, "setup_id": c.setup_id, "command": c.command, "source": c.source,
            "payload": json.loads(c.payload), "require_ack": c.require_ack, "timeout_sec": c.timeout_sec,
            "created_at": iso_z(c.created_at), "completed_at": iso_z(c.completed_at) if c.completed_at else None,
            "total": sum(counts.values()), "counts": counts}


@bp.get("/api/v1/devices/commands")
@doc("Recent commands, newest first, with per-status counts", tags=("commands",), response={"type": "object"},
     params={"limit": {"type": "integer", "minimum": 1, "maximum": 500}}, errors=(400, 401), security="bearer")
def list_commands() -> Any:
    require_technician()
    try:
        limit = int(request.args.get("limit", "50"))
        if not 1 <= limit <= 500:
            raise ValueError
    except ValueError:
        raise ApiError(400, "VALIDATION_FAILED", "limit must be an integer 1..500") from None
    rows = list(Command.select().order_by(Command.created_at.desc(), Command.command_id.desc()).limit(limit))
    counts = result_counts([c.command_id for c in rows])
    return jsonify({"success": True, "data": [_command_view(c, counts.get(c.command_id, {})) for c in rows]})


@bp.get("/api/v1/devices/commands/<command_id>")
@doc("One command with every device's outcome", tags=("commands",), response={"type": "object"},
     errors=(401, 404), security="bearer")
def get_command(command_id: str) -> Any:
    require_technician()
    c = Command.get_or_none(Command.command_id == command_id)
    if c is None:
        raise ApiError(404, "COMMAND_NOT_FOUND", f"no command {command_id!r}")
    view = _command_view(c, result_counts([command_id]).get(command_id, {}))
    view["results"] = [{"device_id": r.device_id, "status": r.status, "error": r.error,
                        "progress": json.loads(r.progress) if r.progress else None, "updated_at": iso_z(r.updated_at)}
                       for r in CommandResult.select().where(CommandResult.command == command_id)]
    return jsonify({"success": True, "data": view})


# --- SSE ---------------------------------------------------------------------------------------


def _last_event_id() -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("lastEventId") or "0"
    try:
        value = int(raw)
        if value < 0:
            raise ValueError
    except ValueError:
        raise ApiError(400, "VALIDATION_FAILED", "Last-Event-ID must be a non-negative integer") from None
    return value


def _stream(command_id: str) -> Response:
    feed = ctx().commands
    last = _last_event_id()

    def gen() -> Iterator[str]:
        nonlocal last
        wake = feed.watch(command_id)
        try:
            while True:
                wake.clear()  # before reading: an announcement during the read wakes the next wait
                q = (OperationEvent.select(OperationEvent.id, OperationEvent.event, OperationEvent.data)
                     .where((OperationEvent.stream == command_id) & (OperationEvent.id > last))
                     .order_by(OperationEvent.id).limit(REPLAY_PAGE))
                rows = list(tuple_rows(q))
                for ev_id, name, data in rows:
                    yield frame(name, data, ev_id)
                    last = ev_id
                    if name == "results":
                        return
                if len(rows) == REPLAY_PAGE:
                    continue
                if not wake.wait(KEEPALIVE_SEC):
                    yield KEEPALIVE
        finally:
            feed.unwatch(command_id, wake)

    return sse_response(gen())


SSE_DOC: DocOptions = {"tags": ("commands",), "response": {"type": "string"}, "content_type": "text/event-stream",
                       "errors": (400, 401, 404), "security": "bearer",
                       "params": {"access_token": {"type": "string"}, "lastEventId": {"type": "integer"}}}


@bp.get("/api/v1/devices/command-events/<command_id>")
@doc("SSE of one command: every stored event first (or after Last-Event-ID), then live ones; closes after "
     "`results`", **SSE_DOC)
def command_events(command_id: str) -> Response:
    require_technician(allow_query=True)
    if not Command.select().where(Command.command_id == command_id).exists():
        raise ApiError(404, "COMMAND_NOT_FOUND", f"no command {command_id!r}")
    return _stream(command_id)


@bp.get("/api/v1/devices/events/<command_id>")
@doc("SSE of one command (the seed's second path for command-events)", **SSE_DOC)
def events(command_id: str) -> Response:
    return command_events(command_id)


@bp.get("/api/v1/devices/bulk-events/<setup_id>")
@doc("SSE of a bulk operation (its command's events)", **SSE_DOC)
def bulk_events(setup_id: str) -> Response:
    require_technician(allow_query=True)
    if not BulkOperation.select().where(BulkOperation.setup_id == setup_id).exists():
        raise ApiError(404, "COMMAND_NOT_FOUND", f"no bulk operation {setup_id!r}")
    c = Command.get_or_none(Command.bulk == setup_id)
    if c is None:
        raise ApiError(404, "COMMAND_NOT_FOUND", f"no command for bulk operation {setup_id!r}")
    return _stream(c.command_id)
