"""The technician page's session rules through Flask's test client (the flows themselves run in
Chromium in test_technician_page.py): login form with CSRF, cookie-authenticated API calls need
the CSRF header, pages redirect when logged out, both languages render every page."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from flask.testing import FlaskClient

from gateway.config import load_config, load_secrets
from gateway.store import migrate, open_database
from sim.demo import ensure_demo_user, free_port, write_demo_site
from web.app import create_app

PAGES = ("/", "/devices", "/bulk", "/commands", "/money", "/firmware-store", "/cloud", "/diagnostics",
         "/mqtt-accounts")


@pytest.fixture
def client(tmp_path: Path) -> Iterator[FlaskClient]:
    cfg_path = write_demo_site(tmp_path, web_port=free_port(), mqtt_port=free_port())
    cfg = load_config(cfg_path)
    db = open_database(cfg.paths.database)
    migrate(db)
    db.close()
    ensure_demo_user(cfg_path)
    app = create_app(cfg, load_secrets(cfg))
    app.extensions["carwash"].start(connect_bus=False)
    try:
        yield app.test_client()
    finally:
        app.extensions["carwash"].stop()


def login(c: FlaskClient) -> str:
    c.get("/login")
    csrf = c.get_cookie("cw_csrf").value
    r = c.post("/login", data={"username": "demo", "password": "demo", "csrf": csrf, "next": "/devices"})
    assert r.status_code == 302 and r.headers["Location"] == "/devices"
    assert c.get_cookie("cw_token") is not None
    return csrf


def test_logged_out_pages_go_to_the_login_form(client: FlaskClient) -> None:
    for p in PAGES:
        r = client.get(p)
        assert r.status_code == 302 and r.headers["Location"].startswith("/login"), p
    client.set_cookie("cw_token", "not-a-token")
    assert "why=expired" in client.get("/").headers["Location"]


def test_login_needs_the_csrf_token_and_the_right_password(client: FlaskClient) -> None:
    client.get("/login")
    csrf = client.get_cookie("cw_csrf").value
    assert client.post("/login", data={"username": "demo", "password": "demo", "csrf": "forged"}).status_code == 403
    assert client.post("/login", data={"username": "demo", "password": "nope", "csrf": csrf}).status_code == 401
    assert client.get_cookie("cw_token") is None
    r = client.post("/login", data={"username": "demo", "password": "demo", "csrf": csrf, "next": "//evil.example"})
    assert r.status_code == 302 and r.headers["Location"] == "/"  # no open redirect


def test_cookie_session_needs_csrf_on_changes(client: FlaskClient) -> None:
    csrf = login(client)
    assert client.get("/api/v1/firmware").status_code == 200  # reads need no CSRF header
    r = client.post("/api/v1/devices/bulk-restart", json={"device_ids": ["device-x"]})
    assert r.status_code == 403 and r.get_json()["errorCode"] == "FORBIDDEN"
    r = client.post("/api/v1/devices/bulk-restart", json={"device_ids": ["device-x"]},
                    headers={"X-CSRF-Token": "wrong"})
    assert r.status_code == 403
    # With the token the request reaches the command API (here: no core to ask, so 503).
    r = client.post("/api/v1/devices/bulk-restart", json={"device_ids": ["device-x"]}, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 503 and r.get_json()["errorCode"] == "SERVICE_UNAVAILABLE"
    client.post("/logout", data={"csrf": csrf})
    assert client.get_cookie("cw_token") is None


@pytest.mark.parametrize("lang, word", [("th", "อุปกรณ์"), ("en", "Devices")])
def test_every_page_renders_in_both_languages(client: FlaskClient, lang: str, word: str) -> None:
    login(client)
    client.get(f"/lang/{lang}")
    for p in PAGES:
        r = client.get(p)
        assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/html"), p
        html = r.get_data(as_text=True)
        assert word in html and f'lang="{lang}"' in html, p
        assert re.search(r'<body data-page="[a-z]+"', html), p  # the page's script is chosen by this name
    assert client.get("/devices/device-none").status_code == 404


def test_recover_form_needs_csrf_and_the_core(client: FlaskClient) -> None:
    r = client.get("/recover")
    assert r.status_code == 200 and "journalctl" in r.get_data(as_text=True)
    csrf = client.get_cookie("cw_csrf").value
    assert client.post("/recover", data={"code": "12345678", "username": "x", "password": "y" * 8,
                                         "csrf": "forged"}).status_code == 403
    # No core to ask in this test: the page says so instead of failing.
    r = client.post("/recover", data={"code": "12345678", "username": "x", "password": "y" * 8, "csrf": csrf})
    assert r.status_code == 503 and "core" in r.get_data(as_text=True)


def test_failed_logins_are_limited_per_address_on_the_api_and_the_page(client: FlaskClient) -> None:
    """10 failures (the default burst) get 401; then 429 with the envelope and Retry-After, even for
    the right password; another address still logs in; the page says so in its own words."""
    api = "/api/v1/auth/login"
    attacker, other = {"REMOTE_ADDR": "10.0.0.66"}, {"REMOTE_ADDR": "10.0.0.7"}
    # Time stands still: 22 argon2 checks on a busy machine would otherwise refill a token (6 s).
    client.application.extensions["carwash.login_failures"].clock = lambda: 1_000.0
    for _ in range(10):
        r = client.post(api, json={"username": "demo", "password": "guess"}, environ_base=attacker)
        assert r.status_code == 401
    for password in ("guess", "demo"):
        r = client.post(api, json={"username": "demo", "password": password}, environ_base=attacker)
        body = r.get_json()
        assert r.status_code == 429 and body["errorCode"] == "RATE_LIMITED" and body["statusCode"] == 429
        assert int(r.headers["Retry-After"]) >= 1
    r = client.post(api, json={"username": "demo", "password": "demo"}, environ_base=other)
    assert r.status_code == 200 and r.get_json()["data"]["token"]
    # A right password does not use up the allowance of its address.
    for _ in range(20):
        assert client.post(api, json={"username": "demo", "password": "demo"}, environ_base=other).status_code == 200
    client.get("/login", environ_base=attacker)
    csrf = client.get_cookie("cw_csrf").value
    r = client.post("/login", data={"username": "demo", "password": "demo", "csrf": csrf}, environ_base=attacker)
    assert r.status_code == 429 and "Retry-After" in r.headers
    assert 'class="error"' in r.get_data(as_text=True)


def test_vendored_uplot_is_the_pinned_release() -> None:
    """web/static/vendor holds what update.sh fetched and checked: the files match SHA256SUMS (no
    hand edits), the build's banner names update.sh's VERSION, the licence ships beside it."""
    vendor = Path(__file__).resolve().parent.parent / "web" / "static" / "vendor"
    sums = dict(line.split()[::-1] for line in (vendor / "SHA256SUMS").read_text().splitlines())
    assert set(sums) == {"uPlot.iife.min.js", "uPlot.min.css", "uPlot.LICENSE"}
    for name, digest in sums.items():
        assert hashlib.sha256((vendor / name).read_bytes()).hexdigest() == digest, name
    version = re.search(r"^VERSION=(\S+)$", (vendor / "update.sh").read_text(), re.M)
    banner = f"/*! https://github.com/leeoniya/uPlot (v{version[1] if version else '?'})"
    assert (vendor / "uPlot.iife.min.js").read_text().startswith(banner)
    assert "Permission is hereby granted" in (vendor / "uPlot.LICENSE").read_text()  # MIT
