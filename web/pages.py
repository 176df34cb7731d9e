"""The technician page's routes: server-rendered HTML in Thai or English, small plain JavaScript.

Every action on the page calls the same JSON APIs the tests and other clients use; the pages only
read the store and the live feeds. Elsewhere: the session and rendering (web/session.py), the
report maths (web/reports.py), the Money page's chart data (web/charts.py, drawn in the browser
with the vendored uPlot), CSV exports (web/exports.py), config forms (web/forms.py). The chart
and export APIs are blueprints nested in this one (`pages.charts`, `pages.exports`).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
from typing import Any

from flask import Blueprint, Response, make_response, redirect, request, url_for

from gateway.clock import iso_z
from gateway.devices.schemas import SCHEMA_FILES, schema
from gateway.store.models import Command, Device, DeviceConfig, FirmwareImage, OutboxEvent, Payment, WashSession
from gateway.store.outbox import state_is
from web import charts, exports
from web.auth import CSRF_COOKIE, TOKEN_COOKIE, csrf_ok, end_sessions, issue_token, verify_login
from web.commands import result_counts
from web.context import ctx
from web.errors import ApiError
from web.forms import config_form
from web.openapi import DocOptions, doc
from web.reports import BANKNOTES, COINS, RANGES, device_days, window
from web.session import LANGS, current_user, page, render, safe_next, start_session, t

__all__ = ["PAGE_SESSION", "bp", "page", "render", "t"]  # web/access.py builds its page with these

bp = Blueprint("pages", __name__, template_folder="templates")
bp.register_blueprint(charts.bp)
bp.register_blueprint(exports.bp)

PAGE: DocOptions = {"tags": ("pages",), "response": {"type": "string"}, "content_type": "text/html"}
PAGE_SESSION: DocOptions = {**PAGE, "security": "session"}  # without a valid session: 302 to /login


# --- session -----------------------------------------------------------------------------------


@bp.get("/login")
@doc("Technician page: the login form", **PAGE)
def login_form() -> Response:
    return render("login.html", None, why=request.args.get("why", ""), next=request.args.get("next", "/"),
                  csrf=request.cookies.get(CSRF_COOKIE, ""))


@bp.post("/login")
@doc("Technician page: log in (form post with the CSRF token); sets the session cookies", **PAGE)
def login_post() -> Any:
    form = request.form
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not csrf_ok():
        return render("login.html", None, why="csrf", next="/", csrf=cookie), 403
    name, password = form.get("username", ""), form.get("password", "")
    try:
        ok = verify_login(name, password)
    except ApiError as exc:  # too many failures from this address
        resp = make_response(render("login.html", None, why="limited", next=form.get("next", "/"), csrf=cookie), 429)
        resp.headers.update(exc.headers)
        return resp
    if not ok:
        return render("login.html", None, why="wrong", next=form.get("next", "/"), csrf=cookie), 401
    token, exp = issue_token(name)
    return start_session(make_response(redirect(safe_next(form.get("next")))), token, exp)


@bp.post("/logout")
@doc("Technician page: log out (form post with the CSRF token)", **PAGE)
def logout() -> Any:
    resp = make_response(redirect(url_for("pages.login_form")))
    if csrf_ok():
        # Ends every session of this technician, not only this browser's cookie (a copied or
        # stolen cookie stops working too).
        if (user := current_user()) is not None:
            end_sessions(user)
        resp.delete_cookie(TOKEN_COOKIE)
    return resp


@bp.get("/recover")
@doc("Technician page: set a password with the one-time code of the service button (10 s press)", **PAGE)
def recover_form() -> Response:
    return render("recover.html", None, done=False, error="", csrf=request.cookies.get(CSRF_COOKIE, ""))


@bp.post("/recover")
@doc("Technician page: redeem the one-time recovery code (decided by the core)", **PAGE)
def recover_post() -> Any:
    from web.context import ask_core

    form = request.form
    cookie = request.cookies.get(CSRF_COOKIE, "")
    if not csrf_ok():
        return render("recover.html", None, done=False, error="csrf", csrf=cookie), 403
    try:
        ask_core("recovery.redeem", {"code": form.get("code", "").strip(), "username": form.get("username", ""),
                                     "password": form.get("password", "")})
    except ApiError as exc:
        return render("recover.html", None, done=False, error=exc.message, csrf=cookie), exc.status
    return render("recover.html", None, done=True, error="", csrf=cookie)


@bp.get("/lang/<code>")
@doc("Technician page: switch the language (th, en)", **PAGE)
def set_lang(code: str) -> Any:
    back = request.args.get("next", "/")
    resp = make_response(redirect(safe_next(back)))
    if code in LANGS:
        resp.set_cookie("lang", code, samesite="Lax", max_age=3600 * 24 * 365)
    return resp


# --- pages -------------------------------------------------------------------------------------


def _courses() -> list[str]:
    cfg = ctx().config
    return _profile_courses(cfg.wash.extra_profiles, tuple(b.profile for b in cfg.bays))


@functools.cache
def _profile_courses(extra_profiles: tuple[str, ...], bay_profiles: tuple[str, ...]) -> list[str]:
    """The courses of the bays' profiles, read from the profile files once per process."""
    from plc.profile import load_profiles

    profiles = load_profiles(extra_profiles)
    names: list[str] = []
    for profile in bay_profiles:
        p = profiles.get(profile)
        for name in (p.courses.values() if p else ()):
            if name not in names:
                names.append(name)
    return names


@bp.get("/")
@doc("Technician page: the site at a glance (bays live, gateway health)", **PAGE_SESSION)
@page
def overview(user: str) -> Response:
    from web.meta import health_report
    from web.wash import _statuses

    names = {b.id: b.name or b.id for b in ctx().config.bays}
    bus = ctx().bus
    return render("overview.html", user, bays=list(_statuses().values()), names=names, health=health_report(),
                  courses=_courses(), uplink=(bus.health or {}).get("uplink") if bus else None)


def _device_rows() -> list[dict[str, Any]]:
    rows = []
    for d in Device.select().order_by(Device.claimed.desc(), Device.name, Device.device_id):
        rows.append(ctx().presence.merge(d.device_id, {
            "id": d.device_id, "name": d.name, "type": d.device_type, "firmware": d.firmware_version,
            "online": d.online, "rssi": d.rssi, "status": d.status, "claimed": d.claimed,
            "rejected": d.rejected, "pin": d.pairing_pin if not d.claimed else None,
            "last_seen": iso_z(d.last_seen_at) if d.last_seen_at else None}, last_seen_key="last_seen"))
    return rows


@bp.get("/devices")
@doc("Technician page: devices, pending devices with their PIN, the pairing window", **PAGE_SESSION)
@page
def devices(user: str) -> Response:
    return render("devices.html", user, devices=_device_rows(), pairing=ctx().pairing,
                  pairing_open=ctx().pairing_open())


@bp.get("/devices/<device_id>")
@doc("Technician page: one device, its reported configs and the config form of its type", **PAGE_SESSION)
@page
def device_page(user: str, device_id: str) -> Any:
    d = Device.get_or_none(Device.device_id == device_id)
    if d is None:
        return render("missing.html", user, what=device_id), 404
    cfg = DeviceConfig.select().where(DeviceConfig.device == device_id).order_by(DeviceConfig.id.desc()).first()
    reported = json.loads(cfg.configs) if cfg else None
    form = config_form(schema(d.device_type), reported) if d.device_type in SCHEMA_FILES else None
    from web.context import ask_core

    try:
        bad = ask_core("devices.bad_messages", {"device_id": device_id})  # the core's memory, since its start
    except ApiError:
        bad = None
    return render("device.html", user, d=d, reported=reported, form=form, bad=bad,
                  reported_json=json.dumps(reported, indent=2, ensure_ascii=False) if reported else "")


@bp.get("/bulk")
@doc("Technician page: select devices and apply a config, restart, reset or update firmware, live", **PAGE_SESSION)
@page
def bulk(user: str) -> Response:
    forms = {}
    for device_type in SCHEMA_FILES:
        latest = (DeviceConfig.select(DeviceConfig.configs).join(Device).where(Device.device_type == device_type)
                  .order_by(DeviceConfig.id.desc()).first())
        forms[device_type] = config_form(schema(device_type), json.loads(latest.configs) if latest else None)
    images = list(FirmwareImage.select().order_by(FirmwareImage.id.desc()))
    return render("bulk.html", user, devices=[r for r in _device_rows() if not r["rejected"]], forms=forms,
                  images=images)


@bp.get("/commands")
@doc("Technician page: command history with outcomes", **PAGE_SESSION)
@page
def commands(user: str) -> Response:
    rows = list(Command.select().order_by(Command.created_at.desc()).limit(100))
    counts = result_counts([c.command_id for c in rows])
    return render("commands.html", user, rows=rows, counts=counts, iso=iso_z)


# --- money and sessions -------------------------------------------------------------------------


@bp.get("/money")
@doc("Technician page: revenue, sessions and errors charts (today, 7 or 30 days), cash and QR per device and "
     "day, payments, sessions, CSV exports", **PAGE_SESSION)
@page
def money(user: str) -> Response:
    zone = charts.site_zone()
    today = dt.datetime.now(zone).date()
    w = window("7d", dt.datetime.now(dt.UTC), zone)  # the table's days; the charts ask for theirs
    payments = list(Payment.select().order_by(Payment.created_at.desc()).limit(50))
    sessions = list(WashSession.select().order_by(WashSession.start_time.desc()).limit(50))
    return render("money.html", user, rows=device_days(charts.read_items(w.start, w.end, per_device=True), zone),
                  payments=payments, sessions=sessions, banknotes=BANKNOTES, coins=COINS, iso=iso_z,
                  ranges=RANGES, today=today.isoformat(), month_start=today.replace(day=1).isoformat(),
                  exports=exports.KINDS, timezone=zone.key)


@bp.get("/firmware-store")
@doc("Technician page: upload, list and delete firmware images", **PAGE_SESSION)
@page
def firmware_page(user: str) -> Response:
    return render("firmware.html", user, images=list(FirmwareImage.select().order_by(FirmwareImage.id.desc())),
                  iso=iso_z)


@bp.get("/cloud")
@doc("Technician page: the cloud link, the outbox backlog and the events the cloud refused", **PAGE_SESSION)
@page
def cloud(user: str) -> Response:
    bus = ctx().bus
    health = (bus.health or {}) if bus else {}
    dead = list(OutboxEvent.select().where(state_is("dead")).order_by(OutboxEvent.seq.desc()).limit(100))
    # The drainer's own figure (delivered events are marked sent up to outbox.mark_sent_delay_sec
    # later, so the database still counts them); the database's when the core is silent.
    backlog = (health.get("uplink") or {}).get("backlog")
    pending = backlog if backlog is not None else OutboxEvent.select().where(state_is("pending")).count()
    return render("cloud.html", user, health=health, dead=dead, pending=pending, cloud_url=ctx().config.cloud.url)


@bp.get("/diagnostics")
@doc("Technician page: PLC bus diagnostics (poll counts, errors, latency per bay)", **PAGE_SESSION)
@page
def diagnostics(user: str) -> Response:
    from web.context import ask_core

    try:
        buses = ask_core("wash.diagnostics", {})
    except ApiError:
        buses = None
    names = {b.id: b.name or b.id for b in ctx().config.bays}
    return render("diagnostics.html", user, buses=buses, names=names)
