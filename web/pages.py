"""The technician page: server-rendered HTML in Thai or English, small plain JavaScript.

Session: `POST /login` (a form with a CSRF token) sets the JWT in an HttpOnly cookie and a CSRF
cookie the page's script sends back as `X-CSRF-Token` on every change (web/auth.py checks both).
Every action on the page calls the same JSON APIs the tests and other clients use; the pages only
read the store and the live feeds. Plots are SVG drawn here (nothing fetched from the internet).
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import secrets
import zoneinfo
from collections import defaultdict
from collections.abc import Callable
from importlib import resources
from typing import Any

from flask import Blueprint, Response, make_response, redirect, render_template, request, url_for
from markupsafe import Markup, escape

from gateway.clock import iso_z, utc_now
from gateway.devices.schemas import SCHEMA_FILES, schema
from gateway.store.models import (
    Command,
    Device,
    DeviceConfig,
    EventLogItem,
    FirmwareImage,
    OutboxEvent,
    Payment,
    WashSession,
)
from gateway.store.outbox import state_is
from web.auth import (
    CSRF_COOKIE,
    TOKEN_COOKIE,
    TokenRefused,
    account_of,
    csrf_ok,
    end_sessions,
    issue_token,
    verify_login,
)
from web.commands import result_counts
from web.context import ctx
from web.errors import ApiError
from web.openapi import DocOptions, doc

bp = Blueprint("pages", __name__, template_folder="templates")

LANGS = ("th", "en")
PAGE: DocOptions = {"tags": ("pages",), "response": {"type": "string"}, "content_type": "text/html"}
PAGE_SESSION: DocOptions = {**PAGE, "security": "session"}  # without a valid session: 302 to /login
BANKNOTES = (20, 50, 100, 500, 1000)
COINS = (1, 2, 5, 10)


@functools.cache
def _texts() -> dict[str, dict[str, str]]:
    texts: dict[str, dict[str, str]] = json.loads(resources.files("web").joinpath("static/i18n.json").read_text())
    return texts


def lang() -> str:
    value = request.cookies.get("lang", "th")
    return value if value in LANGS else "th"


def t(key: str) -> str:
    entry = _texts().get(key)
    return entry.get(lang(), entry["en"]) if entry else key


def _user() -> str | None:
    """The session's technician: the same check as the API's (web/auth.py `account_of`)."""
    token = request.cookies.get(TOKEN_COOKIE)
    if not token:
        return None
    try:
        return account_of(token)
    except TokenRefused:
        return None


def page(view: Callable[..., Any]) -> Callable[..., Any]:
    """A page for a logged-in technician; otherwise to the login form (saying why)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = _user()
        if user is None:
            why = "expired" if request.cookies.get(TOKEN_COOKIE) else ""
            return redirect(url_for("pages.login_form", why=why, next=request.path))
        return view(user, *args, **kwargs)

    return wrapper


def render(template: str, user: str | None, **values: Any) -> Response:
    html = render_template(template, t=t, lang=lang(), user=user, site=ctx().config.site, path=request.path,
                           **values)
    resp = make_response(html)
    resp.headers["Content-Type"] = "text/html; charset=utf-8"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    if not request.cookies.get(CSRF_COOKIE):
        resp.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), samesite="Strict", httponly=False)
    return resp


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
    target = form.get("next", "/")
    resp = make_response(redirect(target if target.startswith("/") and not target.startswith("//") else "/"))
    resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict",
                    max_age=int((exp - dt.datetime.now(dt.UTC)).total_seconds()))
    return resp


@bp.post("/logout")
@doc("Technician page: log out (form post with the CSRF token)", **PAGE)
def logout() -> Any:
    resp = make_response(redirect(url_for("pages.login_form")))
    if csrf_ok():
        # Ends every session of this technician, not only this browser's cookie (a copied or
        # stolen cookie stops working too).
        if (user := _user()) is not None:
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
    resp = make_response(redirect(back if back.startswith("/") and not back.startswith("//") else "/"))
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


def _resolve(root: dict[str, Any], sub: dict[str, Any]) -> dict[str, Any]:
    """Follow a local `$ref` (`#/$defs/x`), keeping the referring node's own keywords (its title)."""
    ref = sub.get("$ref")
    if not isinstance(ref, str) or not ref.startswith("#/"):
        return sub
    target: Any = root
    for part in ref[2:].split("/"):
        target = target[part]
    return {**_resolve(root, target), **{k: v for k, v in sub.items() if k != "$ref"}}


def config_form(schema_doc: dict[str, Any], values: Any, prefix: str = "configs",
                root: dict[str, Any] | None = None) -> Markup:
    """Form fields from a device type's JSON Schema: booleans as switches, integers as numbers,
    strings with their pattern; the field names are the dotted paths the API's errors name."""
    root = root or schema_doc
    out: list[str] = []
    for key, raw in _resolve(root, schema_doc).get("properties", {}).items():
        sub = _resolve(root, raw)
        path = f"{prefix}.{key}"
        value = values.get(key) if isinstance(values, dict) else None
        label = escape(f"{key} · {sub['title']}" if sub.get("title") else key)
        if sub.get("type") == "object":
            out.append(f'<fieldset><legend>{label}</legend>{config_form(sub, value, path, root)}</fieldset>')
            continue
        field_id = escape(path)
        if sub.get("type") == "boolean":
            checked = " checked" if value else ""
            inp = f'<input type="checkbox" id="{field_id}" name="{field_id}" data-kind="boolean"{checked}>'
        elif sub.get("type") == "integer":
            lo = f' min="{sub["minimum"]}"' if "minimum" in sub else ""
            hi = f' max="{sub["maximum"]}"' if "maximum" in sub else ""
            inp = (f'<input type="number" id="{field_id}" name="{field_id}" data-kind="integer" step="1"{lo}{hi} '
                   f'value="{escape("" if value is None else value)}" required>')
        else:
            pattern = f' pattern="{escape(sub["pattern"].strip("^$"))}"' if "pattern" in sub else ""
            inp = (f'<input type="text" id="{field_id}" name="{field_id}" data-kind="string"{pattern} '
                   f'value="{escape("" if value is None else value)}" required>')
        out.append(f'<div class="field"><label for="{field_id}">{label}</label>{inp}'
                   f'<span class="field-error" data-for="{field_id}" role="alert"></span></div>')
    return Markup("".join(out))


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


def _local_day(ms: int, zone: zoneinfo.ZoneInfo) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, zone).strftime("%Y-%m-%d")


def bar_chart(series: dict[str, dict[str, float]], keys: list[str], labels: dict[str, str],
              colors: dict[str, str], title: str) -> Markup:
    """A stacked bar chart as SVG: one bar per key of `keys`, one stack per series."""
    width, height, pad = 640, 220, 32
    totals = [sum(series[s].get(k, 0) for s in series) for k in keys]
    top = max(totals + [1.0])
    bw = (width - 2 * pad) / max(1, len(keys))
    parts = [f'<svg class="chart" viewBox="0 0 {width} {height + 40}" role="img" aria-label="{escape(title)}">',
             f'<text x="{pad}" y="16" class="chart-title">{escape(title)}</text>']
    for i, k in enumerate(keys):
        y: float = height
        for s in series:
            v = series[s].get(k, 0)
            h = (height - pad) * v / top
            if h > 0:
                parts.append(f'<rect x="{pad + i * bw + 2:.1f}" y="{y - h:.1f}" width="{max(1.0, bw - 4):.1f}" '
                             f'height="{h:.1f}" fill="{colors[s]}"><title>{escape(labels.get(s, s))} {escape(k)}: '
                             f'{v:g}</title></rect>')
            y -= h
        if len(keys) <= 31:
            parts.append(f'<text x="{pad + i * bw + bw / 2:.1f}" y="{height + 14}" class="chart-label" '
                         f'text-anchor="middle">{escape(k[-5:] if len(k) > 5 else k)}</text>')
    parts.append(f'<text x="{width - pad}" y="{pad - 4}" text-anchor="end" class="chart-label">max {top:g}</text>')
    for j, s in enumerate(series):
        parts.append(f'<rect x="{pad + j * 90}" y="{height + 24}" width="10" height="10" fill="{colors[s]}"/>'
                     f'<text x="{pad + j * 90 + 14}" y="{height + 33}" class="chart-label">'
                     f'{escape(labels.get(s, s))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


@bp.get("/money")
@doc("Technician page: cash and QR per device and day, payments, sessions, and their plots", **PAGE_SESSION)
@page
def money(user: str) -> Response:
    zone = zoneinfo.ZoneInfo(ctx().config.site.timezone)
    since = utc_now() - dt.timedelta(days=14)
    per_day: dict[str, dict[str, float]] = {"cash": {}, "qr": {}}
    per_device_day: dict[tuple[str, str], dict[str, Any]] = {}
    for item in EventLogItem.select().where(EventLogItem.received_at >= since):
        day = _local_day(item.timestamp_ms, zone)
        bank, coin = json.loads(item.bank or "{}"), json.loads(item.coin or "{}")
        cash = sum(int(k) * int(v) for k, v in bank.items()) + sum(int(k) * int(v) for k, v in coin.items())
        qr = item.qr_net_amount or 0
        per_day["cash"][day] = per_day["cash"].get(day, 0) + cash
        per_day["qr"][day] = per_day["qr"].get(day, 0) + qr
        row = per_device_day.setdefault((day, item.device_id), {"day": day, "device": item.device_id, "cash": 0,
                                                                 "qr": 0, "notes": defaultdict(int),
                                                                 "coins": defaultdict(int)})
        row["cash"] += cash
        row["qr"] += qr
        for k, v in bank.items():
            row["notes"][k] += int(v)
        for k, v in coin.items():
            row["coins"][k] += int(v)
    days = sorted(set(per_day["cash"]) | set(per_day["qr"]))
    revenue = bar_chart(per_day, days, {"cash": t("cash"), "qr": t("qr")}, {"cash": "#2e7d32", "qr": "#1565c0"},
                        t("revenue_per_day"))
    today = dt.datetime.now(zone).date()
    hours = [f"{h:02d}" for h in range(24)]
    per_bay: dict[str, dict[str, float]] = {}
    for s in WashSession.select().where(WashSession.start_time >= utc_now() - dt.timedelta(days=1)):
        local = s.start_time.replace(tzinfo=dt.UTC).astimezone(zone)
        if local.date() == today:
            per_bay.setdefault(s.bay_id, {})[f"{local.hour:02d}"] = per_bay.get(s.bay_id, {}).get(
                f"{local.hour:02d}", 0) + 1
    palette = ["#6a1b9a", "#ef6c00", "#00838f", "#ad1457", "#558b2f", "#4e342e", "#283593", "#9e9d24"]
    sessions_chart = bar_chart(per_bay, hours, {}, {b: palette[i % len(palette)] for i, b in enumerate(per_bay)},
                               t("sessions_per_hour"))
    errors: dict[str, dict[str, float]] = {}
    for s in WashSession.select().where((WashSession.start_time >= since) & WashSession.error_code.is_null(False)):
        day = s.start_time.replace(tzinfo=dt.UTC).astimezone(zone).strftime("%Y-%m-%d")
        code = s.error_code
        if code is None:  # the query leaves NULL out; this tells the type checker
            continue
        errors.setdefault(code, {})[day] = errors.get(code, {}).get(day, 0) + 1
    error_days = [(today - dt.timedelta(days=i)).strftime("%Y-%m-%d") for i in range(13, -1, -1)]
    errors_chart = bar_chart(errors, error_days, {}, {c: palette[i % len(palette)] for i, c in enumerate(errors)},
                             t("errors_per_day"))
    payments = list(Payment.select().order_by(Payment.created_at.desc()).limit(50))
    sessions = list(WashSession.select().order_by(WashSession.start_time.desc()).limit(50))
    rows = sorted(per_device_day.values(), key=lambda r: (r["day"], r["device"]), reverse=True)
    return render("money.html", user, revenue=revenue, sessions_chart=sessions_chart, errors_chart=errors_chart,
                  payments=payments,
                  sessions=sessions, rows=rows, banknotes=BANKNOTES, coins=COINS, iso=iso_z)


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
