"""MQTT accounts on the technician page and its JSON API (Bearer token or the page's session).

`GET /api/v1/mqtt-accounts`, `POST /api/v1/mqtt-accounts {username, password, role}`,
`POST /api/v1/mqtt-accounts/{username} {password?, role?}`, `DELETE /api/v1/mqtt-accounts/{username}`.
Passwords are hashed (argon2id) in the request's thread, then written through the web's writer;
the core's broker takes a change up within a second and cuts the connections of an account that
was removed or changed (gateway.access.mqtt_accounts). Hashes never leave the store.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from gateway.access import mqtt_accounts
from gateway.access.mqtt_accounts import ROLES, AccountError, AccountExists, NoAccount
from web.auth import require_technician
from web.body import read_json
from web.context import ctx, require_db
from web.errors import ApiError
from web.openapi import doc
from web.pages import PAGE_SESSION, page, render

bp = Blueprint("access", __name__)

ACCOUNT_REQ = {"type": "object", "required": ["username", "password", "role"],
               "properties": {"username": {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"},
                              "password": {"type": "string", "minLength": mqtt_accounts.MIN_PASSWORD},
                              "role": {"enum": list(ROLES)}}}
CHANGE_REQ = {"type": "object",
              "properties": {"password": {"type": "string", "minLength": mqtt_accounts.MIN_PASSWORD},
                             "role": {"enum": list(ROLES)}}}


def _write(fn: Any) -> Any:
    writer = ctx().writer
    if writer is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "database not open")
    try:
        return writer.run(fn)
    except AccountExists as exc:
        raise ApiError(409, "CONFLICT", str(exc)) from None
    except NoAccount as exc:
        raise ApiError(404, "NOT_FOUND", str(exc)) from None


def _optional_str(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise ApiError(400, "VALIDATION_FAILED", f"{key}: must be a string")
    return value


@bp.get("/api/v1/mqtt-accounts")
@doc("MQTT accounts of programs on the site (name, role, dates; never the hash)", tags=("access",),
     response={"type": "object"}, errors=(401,), security="bearer")
def list_accounts() -> Any:
    require_technician()
    return jsonify({"success": True, "data": mqtt_accounts.listing(require_db()),
                    "roles": {name: {"publish": list(r.publish), "subscribe": list(r.subscribe)}
                              for name, r in ROLES.items()}})


@bp.post("/api/v1/mqtt-accounts")
@doc("Add an MQTT account (wash-backend or monitor); it can log in within a second", tags=("access",),
     request=ACCOUNT_REQ, response={"type": "object"}, status=201, errors=(400, 401, 403, 409, 415),
     security="bearer")
def add_account() -> Any:
    require_technician()
    body = read_json()
    username, password, role = (_optional_str(body, k) for k in ("username", "password", "role"))
    if username is None or password is None or role is None:
        raise ApiError(400, "VALIDATION_FAILED", "username, password and role are required")
    try:
        mqtt_accounts.check(username, password=password, role=role,
                            internal_username=ctx().config.mqtt.internal_username)
    except AccountError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    hashed, db = mqtt_accounts.hash_password(password), require_db()
    _write(lambda: mqtt_accounts.add_hashed(db, username, hashed, role))
    return jsonify({"success": True, "message": "MQTT account added"}), 201


@bp.post("/api/v1/mqtt-accounts/<username>")
@doc("Change an MQTT account's password and/or role; its live connections are closed", tags=("access",),
     request=CHANGE_REQ, response={"type": "object"}, errors=(400, 401, 403, 404, 415), security="bearer")
def change_account(username: str) -> Any:
    require_technician()
    body = read_json()
    password, role = _optional_str(body, "password"), _optional_str(body, "role")
    if password is None and role is None:
        raise ApiError(400, "VALIDATION_FAILED", "password or role is required")
    try:
        mqtt_accounts.check(username, password=password, role=role)
    except AccountError as exc:
        raise ApiError(400, "VALIDATION_FAILED", str(exc)) from None
    hashed = mqtt_accounts.hash_password(password) if password is not None else None
    db = require_db()
    _write(lambda: mqtt_accounts.change_hashed(db, username, password_hash=hashed, role=role))
    return jsonify({"success": True, "message": "MQTT account changed"})


@bp.delete("/api/v1/mqtt-accounts/<username>")
@doc("Remove an MQTT account; its live connections are closed within a second", tags=("access",),
     response={"type": "object"}, errors=(401, 403, 404), security="bearer")
def remove_account(username: str) -> Any:
    require_technician()
    db = require_db()
    _write(lambda: mqtt_accounts.remove(db, username))
    return jsonify({"success": True, "message": "MQTT account removed"})


@bp.get("/mqtt-accounts")
@doc("Technician page: MQTT accounts of the wash backend and dashboards", **PAGE_SESSION)
@page
def accounts_page(user: str) -> Response:
    return render("mqtt_accounts.html", user, accounts=mqtt_accounts.listing(require_db()), roles=ROLES,
                  min_password=mqtt_accounts.MIN_PASSWORD, mqtt_port=ctx().config.mqtt.port)
