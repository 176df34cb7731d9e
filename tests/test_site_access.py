"""Site access through the real core and gunicorn (issue 17): who may read and change what.

- every route of `/api/openapi.json` refuses a request without a token, except the signed device
  API, the documented public ones and the logins; every operation declares its security;
- removal, disabling, a password change and logout end the API's and the page's sessions at once;
- device requests exactly as the seed shows them (no Content-Type; SHA256 or HMAC), raw HTTP;
- an oversized chunked body gets 413 whatever the endpoint;
- one CORS allow-list for REST, SSE and Socket.IO.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from importlib import resources
from typing import Any

import pytest

from gateway.access.signing import http_signature
from sim.demo import ensure_demo_user
from sim.procs import child_env, gateway_command
from tests.clients import http_json
from tests.conftest import Proc, Site, make_site, start_process
from web.context import STATUS_CONNECTED

V = json.loads(resources.files("gateway").joinpath("data/spec-vectors.json").read_text())
KIOSK = "http://kiosk.example:3000"
BODY_LIMIT = 262144


class Gateway:
    def __init__(self, site: Site, core: Proc, web: Proc) -> None:
        self.site, self.core, self.web = site, core, web

    @property
    def url(self) -> str:
        return self.site.web_url

    def cli(self, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run(gateway_command(*args, "--config", str(self.site.config_path)), input=stdin,
                              capture_output=True, text=True, env=child_env(), timeout=60)

    def login(self, user: str = "demo", password: str = "demo") -> str:
        code, body = http_json(self.url + "/api/v1/auth/login", method="POST",
                               body={"username": user, "password": password})
        assert code == 200, body
        return str(body["data"]["token"])


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    site = make_site(tmp_path_factory.mktemp("access") / "site")
    text = site.config_path.read_text()
    site.config_path.write_text(text.replace("[web]\n", f'[web]\ncors_allowed_origins = ["{KIOSK}"]\n', 1))
    ensure_demo_user(site.config_path)
    core = start_process(site, "core")
    web = None
    try:
        web = start_process(site, "web")
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        yield Gateway(site, core, web)
    finally:
        if web is not None:
            web.stop()
        assert core.stop() == 0, core.log()[-3000:]


def raw_http(port: int, head: str, body: bytes = b"",
             chunks: list[bytes] | None = None) -> tuple[int, dict[str, str], bytes]:
    """Send exactly `head` (request line and headers, CRLF-separated, without the blank line) and
    the body; return status, headers (lower-case names) and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(head.encode() + b"\r\n\r\n" + body)
        try:
            for c in chunks or ():
                s.sendall(b"%x\r\n%s\r\n" % (len(c), c))
            if chunks is not None:
                s.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before reading it all: the answer is what counts
        data = b""
        while True:
            try:
                part = s.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            data += part
            if b"\r\n\r\n" in data:
                head_end = data.index(b"\r\n\r\n")
                m = re.search(rb"(?i)content-length:\s*(\d+)", data[:head_end])
                if m and len(data) >= head_end + 4 + int(m.group(1)):
                    break
    head_raw, _, rest = data.partition(b"\r\n\r\n")
    lines = head_raw.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return status, headers, rest


# --- 2. every route behind a token, except the documented public ones -------------------------

# Documented public (docs/security.md): health, the OpenAPI document itself, the wash API as the
# contract defines it (LAN access only; web.wash_api_auth = "jwt" changes that), firmware
# downloads (devices cannot sign them), the logins, and the page's login, recovery and language
# forms (the recovery code is its own proof).
PUBLIC = {
    ("get", "/api/health"), ("get", "/api/openapi.json"),
    ("get", "/api/bays"), ("post", "/api/wash/start"), ("post", "/api/wash/stop"),
    ("get", "/api/wash/status/{bay_id}"), ("get", "/api/wash/status"), ("get", "/api/wash/history"),
    ("get", "/api/wash/stats"), ("get", "/api/wash/events"),
    ("get", "/firmware/{name}"),
    ("post", "/api/v1/auth/login"),
    ("get", "/login"), ("post", "/login"), ("post", "/logout"), ("get", "/recover"), ("post", "/recover"),
    ("get", "/lang/{code}"),
    # No technician token: allowed by address (metrics.allow, loopback by default) or with the
    # metrics token (tests/test_metrics.py refuses another address without it).
    ("get", "/metrics"),
}


def test_every_route_refuses_a_request_without_a_token(gw: Gateway) -> None:
    code, spec = http_json(gw.url + "/api/openapi.json")
    assert code == 200
    checked: dict[str, int] = {}
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            assert "security" in op, f"{method} {path} does not declare its security"
            schemes = {name for req in op["security"] for name in req}
            if (method, path) in PUBLIC:
                assert op["security"] == [], f"{method} {path} is public but declares {op['security']}"
                continue
            assert schemes, f"{method} {path} declares no security and is not documented public"
            url = gw.url + re.sub(r"\{[^}]+\}", "1", path)
            req = urllib.request.Request(url, data=b"{}" if method in ("post", "put") else None,
                                         method=method.upper(), headers={"Content-Type": "application/json"})

            class NoRedirect(urllib.request.HTTPRedirectHandler):
                def redirect_request(self, *a: Any, **k: Any) -> None:
                    return None

            try:
                with urllib.request.build_opener(NoRedirect).open(req, timeout=15) as r:
                    status, location = r.status, r.headers.get("Location", "")
            except urllib.error.HTTPError as e:
                status, location = e.code, e.headers.get("Location", "")
                answer = e.read()
            if schemes == {"session"}:
                assert status == 302 and "/login" in location, (method, path, status)
            else:
                assert status == 401, (method, path, status, answer[:200])
                assert json.loads(answer)["errorCode"] in ("UNAUTHORIZED", "MISSING_SIGNATURE"), (method, path)
            checked[f"{method} {path}"] = status
    # The listing that leaked PINs, MACs and chip ids is among them.
    assert checked["get /api/v1/devices"] == 401 and checked["get /api/v1/devices/{device_id}"] == 401
    assert checked["post /api/v1/devices/need-register"] == 401  # signed, not public
    assert len(checked) > 30


# --- 3. one token check; sessions end at once ---------------------------------------------------


def _page(gw: Gateway, token: str) -> int:
    req = urllib.request.Request(gw.url + "/devices", headers={"Cookie": f"cw_token={token}"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    try:
        with urllib.request.build_opener(NoRedirect).open(req, timeout=15) as r:
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)


def _api(gw: Gateway, token: str) -> int:
    return http_json(gw.url + "/api/v1/devices", headers={"Authorization": f"Bearer {token}"})[0]


def test_removal_disabling_password_change_and_logout_end_page_and_api_sessions(gw: Gateway) -> None:
    from gateway.access import users
    from gateway.store import open_database

    assert gw.cli("user", "add", "tech1", "--password-stdin", stdin="first-pass\n").returncode == 0
    # A password change ends the sessions issued before; a fresh login works.
    token = gw.login("tech1", "first-pass")
    assert (_page(gw, token), _api(gw, token)) == (200, 200)
    assert gw.cli("user", "passwd", "tech1", "--password-stdin", stdin="second-pass\n").returncode == 0
    assert (_page(gw, token), _api(gw, token)) == (302, 401)
    # Logout (API) ends every session of the account, the page's cookie included.
    token = gw.login("tech1", "second-pass")
    other = gw.login("tech1", "second-pass")
    assert http_json(gw.url + "/api/v1/auth/logout", method="POST", data=b"",
                     headers={"Authorization": f"Bearer {token}"})[0] == 200
    assert (_page(gw, token), _api(gw, token), _page(gw, other), _api(gw, other)) == (302, 401, 302, 401)
    # Disabled.
    token = gw.login("tech1", "second-pass")
    db = open_database(gw.site.config.paths.database)
    try:
        users.set_disabled(db, "tech1", True)
    finally:
        db.close()
    assert (_page(gw, token), _api(gw, token)) == (302, 401)
    code, body = http_json(gw.url + "/api/v1/auth/login", method="POST",
                           body={"username": "tech1", "password": "second-pass"})
    assert code == 401
    # Removed.
    db = open_database(gw.site.config.paths.database)
    try:
        users.set_disabled(db, "tech1", False)
    finally:
        db.close()
    token = gw.login("tech1", "second-pass")
    assert _page(gw, token) == 200
    assert gw.cli("user", "remove", "tech1").returncode == 0
    assert (_page(gw, token), _api(gw, token)) == (302, 401)


def test_page_logout_ends_the_session_everywhere(gw: Gateway) -> None:
    token = gw.login()
    csrf = "c" * 32
    req = urllib.request.Request(gw.url + "/logout", data=f"csrf={csrf}".encode(), method="POST",
                                 headers={"Cookie": f"cw_token={token}; cw_csrf={csrf}",
                                          "Content-Type": "application/x-www-form-urlencoded"})

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *a: Any, **k: Any) -> None:
            return None

    try:
        urllib.request.build_opener(NoRedirect).open(req, timeout=15)
    except urllib.error.HTTPError as e:
        assert e.code == 302
    assert (_page(gw, token), _api(gw, token)) == (302, 401)


# --- 4. device requests as the seed sends them --------------------------------------------------


@pytest.mark.parametrize("vector", ["http_sha256_suffix", "http_hmac_sha256"])
def test_seed_device_request_without_content_type_with_either_signature(gw: Gateway, vector: str) -> None:
    """The seed's request: `POST`, `x-signature`, the body; no Content-Type. Both schemes of the
    seed ("HMAC or SHA256") pass with the default configuration."""
    body = V[vector]["body"].encode()
    head = (f"POST /api/v1/devices/need-register HTTP/1.1\r\nHost: 127.0.0.1:{gw.site.web_port}\r\n"
            f"x-signature: {V[vector]['x-signature']}\r\nContent-Length: {len(body)}\r\nConnection: close")
    status, _, answer = raw_http(gw.site.web_port, head, body)
    data = json.loads(answer)
    assert status == 200, data
    assert data["success"] is True and data["data"]["device_id"] == "device-24ab3c91"


def test_declared_non_json_type_is_415_and_stores_nothing(gw: Gateway) -> None:
    body = V["http_sha256_suffix"]["body"].encode()
    for ctype in ("text/plain", "application/x-www-form-urlencoded"):
        head = (f"POST /api/v1/devices/need-register HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                f"x-signature: {V['http_sha256_suffix']['x-signature']}\r\nContent-Length: {len(body)}\r\n"
                "Connection: close")
        status, _, answer = raw_http(gw.site.web_port, head, body)
        assert (status, json.loads(answer)["errorCode"]) == (415, "UNSUPPORTED_MEDIA_TYPE"), ctype


# --- 5. limits and origins ----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/v1/devices/need-register", "/api/wash/start",
                                  "/api/v1/device-event-logs/uploads"])
def test_oversized_chunked_body_is_413_whatever_the_endpoint(gw: Gateway, path: str) -> None:
    head = (f"POST {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/json\r\nx-signature: 00\r\nConnection: close")
    chunks = [b'{"pad":"' + b"a" * 65536] + [b"a" * 65536] * 4 + [b'"}']
    status, _, answer = raw_http(gw.site.web_port, head, chunks=chunks)
    assert (status, json.loads(answer)["errorCode"]) == (413, "PAYLOAD_TOO_LARGE")


def test_chunked_body_within_the_limit_still_works(gw: Gateway) -> None:
    body = V["http_sha256_suffix"]["body"].encode()
    head = (f"POST /api/v1/devices/need-register HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"x-signature: {http_signature(body, V['secret_key'])}\r\nConnection: close")
    status, _, answer = raw_http(gw.site.web_port, head, chunks=[body[:20], body[20:]])
    assert status == 200, answer


def test_cors_allow_list_for_rest_sse_and_socketio(gw: Gateway) -> None:
    port = gw.site.web_port
    # REST: the listed kiosk gets the header (and a preflight answer); another origin does not,
    # and its writes are refused before anything runs.
    status, h, _ = raw_http(port, f"GET /api/wash/status HTTP/1.1\r\nHost: x\r\nOrigin: {KIOSK}\r\nConnection: close")
    assert status == 200 and h.get("access-control-allow-origin") == KIOSK and "origin" in h.get("vary", "").lower()
    status, h, _ = raw_http(port, f"OPTIONS /api/wash/start HTTP/1.1\r\nHost: x\r\nOrigin: {KIOSK}\r\n"
                                  "Access-Control-Request-Method: POST\r\n"
                                  "Access-Control-Request-Headers: content-type\r\nConnection: close")
    assert status == 200 and h.get("access-control-allow-origin") == KIOSK
    assert "POST" in h["access-control-allow-methods"] and "Content-Type" in h["access-control-allow-headers"]
    status, h, _ = raw_http(port, "GET /api/wash/status HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
                                  "Connection: close")
    assert status == 200 and "access-control-allow-origin" not in h
    body = b'{"bayId":"bay1","course":"BASIC"}'
    status, h, answer = raw_http(port, "POST /api/wash/start HTTP/1.1\r\nHost: x\r\nOrigin: http://evil.example\r\n"
                                       f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                                       "Connection: close", body)
    assert (status, json.loads(answer)["errorCode"]) == (403, "FORBIDDEN")
    # Same origin needs no listing.
    status, h, _ = raw_http(port, f"GET /api/wash/status HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                  f"Origin: http://127.0.0.1:{port}\r\nConnection: close")
    assert status == 200
    # SSE: the same rule (the headers come with the stream's first bytes).
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET /api/wash/events HTTP/1.1\r\nHost: x\r\nOrigin: {KIOSK}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            part = s.recv(4096)
            assert part, head
            head += part
    assert f"access-control-allow-origin: {KIOSK}".lower() in head.decode().lower()
    # Socket.IO (engine.io polling handshake): the kiosk may connect, another origin may not.
    hs = "GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\nHost: x\r\nOrigin: {}\r\nConnection: close"
    status, h, _ = raw_http(port, hs.format(KIOSK))
    assert status == 200 and h.get("access-control-allow-origin") == KIOSK
    status, h, _ = raw_http(port, hs.format("http://evil.example"))
    assert status == 400 and "access-control-allow-origin" not in h


# --- 1. MQTT accounts through the web API -------------------------------------------------------


def test_mqtt_accounts_api_validates_hides_hashes_and_the_broker_follows(gw: Gateway) -> None:
    from tests.mqtt_probe import Probe

    auth = {"Authorization": f"Bearer {gw.login()}"}
    api = gw.url + "/api/v1/mqtt-accounts"
    for body, field in [({"username": "kiosk", "password": "short", "role": "monitor"}, "password"),
                        ({"username": "kiosk", "password": "long-enough-pass", "role": "admin"}, "role"),
                        ({"username": "carwash-web", "password": "long-enough-pass", "role": "monitor"}, "name"),
                        ({"username": "bad name", "password": "long-enough-pass", "role": "monitor"}, "name")]:
        code, answer = http_json(api, method="POST", body=body, headers=auth)
        assert (code, answer["errorCode"]) == (400, "VALIDATION_FAILED") and answer["message"].startswith(field), answer
    assert http_json(api, method="POST", body={"username": "kiosk", "password": "long-enough-pass",
                                               "role": "monitor"})[0] == 401
    body = {"username": "kiosk", "password": "long-enough-pass", "role": "monitor"}
    assert http_json(api, method="POST", body=body, headers=auth)[0] == 201
    assert http_json(api, method="POST", body=body, headers=auth)[1]["errorCode"] == "CONFLICT"
    code, listing = http_json(api, headers=auth)
    assert [(a["username"], a["role"]) for a in listing["data"]] == [("kiosk", "monitor")]
    assert "argon2" not in json.dumps(listing) and "password_hash" not in json.dumps(listing)
    # The core's broker takes the account up without a restart (it reloads every second).
    with Probe(gw.site.mqtt_port, username="kiosk", password="long-enough-pass") as p:
        import time

        deadline = time.monotonic() + 10
        while (rc := p.connect()).is_failure:
            assert time.monotonic() < deadline, rc
            p.close()
            p = Probe(gw.site.mqtt_port, username="kiosk", password="long-enough-pass")
        assert p.subscribe("gateway/health") == [1]
        code, _ = http_json(api + "/kiosk", method="DELETE", headers=auth)
        assert code == 200
        assert p.disconnected.wait(10)  # cut off once the core saw the removal
        p.close()
    assert http_json(api + "/kiosk", method="DELETE", headers=auth)[1]["errorCode"] == "NOT_FOUND"
    assert http_json(api + "/kiosk", method="POST", body={"role": "monitor"}, headers=auth)[0] == 404
