"""Fuzzing the HTTP API of a running gateway from its own OpenAPI document (schemathesis).

One harness for two budgets: `tests/test_fuzz_api.py` (a bounded run in CI) and
`bench/fuzz_api.py` (a large run that reports figures). `run(target, budget)` never raises on
what it finds: every finding is counted in the returned `Report`, and the caller decides.

What a run does, against a gateway that is already up (core + gunicorn):
1. `seed_site` registers two devices, claims one, stores a firmware image, sends a command and a
   bulk operation, and creates a payment when the site has a cloud: ids the fuzzer may then use,
   so generated requests get past "unknown device" into the code that stores things.
2. For every selected operation and generation mode (positive: valid per the document; negative:
   violating it), Hypothesis draws `max_examples` cases with a fixed seed (no shrinking, no
   example database: reproducible and bounded). Half of the cases then name the site's ids,
   half spell whole numbers as integers, a quarter get a newline appended to one string (see
   `_inject`, `_plain_ints`, `_near_miss`). Device API requests are signed by `DeviceSignature`
   on the exact bytes sent (the path with its query string when there is no body); technician
   API requests carry `Authorization: Bearer <token>` (`Bearer`).
3. Each response is checked: no 5xx other than the documented unavailability (503
   `CLOUD_UNAVAILABLE` / `PLC_OFFLINE`); every status >= 400 is the envelope of device-api.md §1;
   a request the hook signed (or authorised) is never refused for its signature (or token);
   no 429 from the device API (loopback is exempt from its rate limit); no connection errors or
   timeouts.
4. `audit_database` reads the SQLite file and checks every stored row against the spec's rules.
   These checks are written from the spec, not with the gateway's own validators.

`replay` sends the bugs the runs found (`REGRESSIONS`) as they were found, with the same checks:
some came up only in the large run, and the bounded one must still guard their fixes.

`python -m tests.fuzzing --config gateway.toml --out report.json` runs it in a process of its own:
the test does that because schemathesis patches Hypothesis process-wide when it generates
(buffer size, pretty printer), which would change how the rest of the suite's property tests
run; the child runs with `-W error` so warnings still fail as they do under pytest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import re
import sqlite3
import sys
import time
import urllib.parse
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import requests
from requests.auth import AuthBase

ENVELOPE_KEYS = {"success", "errorCode", "message", "statusCode", "timestamp", "path"}
# device-api.md §1, plus the three docs/decisions.md adds for statuses the list does not cover.
ERROR_CODES = frozenset({
    "INVALID_JSON", "VALIDATION_FAILED", "MISSING_SIGNATURE", "INVALID_SIGNATURE", "UNAUTHORIZED", "FORBIDDEN",
    "DEVICE_NOT_FOUND", "BAY_NOT_FOUND", "PAYMENT_NOT_FOUND", "COMMAND_NOT_FOUND", "CONFLICT", "BAY_BUSY",
    "BAY_NOT_ACTIVE", "PLC_OFFLINE", "PAYLOAD_TOO_LARGE", "UNSUPPORTED_MEDIA_TYPE", "RATE_LIMITED",
    "CLOUD_UNAVAILABLE", "INTERNAL_ERROR",
    "NOT_FOUND", "METHOD_NOT_ALLOWED", "SERVICE_UNAVAILABLE",
})
# 503s the spec documents as an answer of a healthy gateway (the device falls back to cash; the
# bay's PLC is unreachable): counted, not findings. SERVICE_UNAVAILABLE ("the core did not
# answer") is a finding: a healthy core answers every RPC.
DOCUMENTED_UNAVAILABLE = frozenset({"CLOUD_UNAVAILABLE", "PLC_OFFLINE"})
TIMESTAMP_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,6})?Z")

KINDS = ("server_error", "envelope", "signature_refused", "auth_refused", "rate_limited", "transport", "bad_row")
EXAMPLES_PER_KIND_AND_OPERATION = 3
EXCERPT = 300


# --- what to fuzz, and how much ---------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """A running gateway: where its web answers, its database and firmware folder, its device
    key, and a technician login."""

    base_url: str
    database: Path
    firmware_dir: Path
    device_key: str
    username: str = "demo"
    password: str = "demo"

    @classmethod
    def from_config(cls, config_path: Path, username: str = "demo", password: str = "demo") -> Target:
        from gateway.config import load_config, load_secrets

        cfg = load_config(config_path)
        host = cfg.web.bind if cfg.web.bind not in ("0.0.0.0", "::", "") else "127.0.0.1"
        host = f"[{host}]" if ":" in host else host
        return cls(f"http://{host}:{cfg.web.port}", Path(cfg.paths.database), Path(cfg.paths.firmware_dir),
                   load_secrets(cfg).device_signing_key, username, password)


Scope = Literal["json", "all"]


@dataclass(frozen=True)
class Budget:
    """How much to generate. `max_examples` is per operation and generation mode; `seed` fixes
    what is generated. Scope `json`: the JSON API only (see `select`); `all`: every operation,
    event streams read for `stream_timeout_sec` at most and at most `stream_examples` times per
    mode (each stream holds a gunicorn thread until its next keepalive, also after the client
    left: many at once would starve the other requests of threads)."""

    max_examples: int = 10
    seed: int = 20_250_923
    scope: Scope = "json"
    modes: tuple[str, ...] = ("positive", "negative")
    request_timeout_sec: float = 15.0
    stream_timeout_sec: float = 1.0
    stream_examples: int = 5


# --- what a run measured ----------------------------------------------------------------------


@dataclass
class Finding:
    kind: str
    operation: str
    detail: str
    request: str = ""  # method, URL and the start of the body: enough to replay it
    response: str = ""


@dataclass
class Report:
    operations: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)
    requests: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    by_operation: dict[str, dict[str, int]] = field(default_factory=dict)  # label -> status -> responses
    unavailable: int = 0  # documented 503s
    unsendable: dict[str, int] = field(default_factory=dict)  # cases the HTTP client refused to send
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    findings: list[Finding] = field(default_factory=list)  # examples, a few per kind and operation
    generation_errors: list[str] = field(default_factory=list)
    rows_checked: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)  # of every answered request
    duration_sec: float = 0.0

    def add(self, finding: Finding) -> None:
        self.counts[finding.kind] = self.counts.get(finding.kind, 0) + 1
        same = sum(1 for f in self.findings if f.kind == finding.kind and f.operation == finding.operation)
        if same < EXAMPLES_PER_KIND_AND_OPERATION:
            self.findings.append(finding)

    @property
    def total_findings(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        lines = [f"{len(self.operations)} operations, {self.requests} requests in {self.duration_sec:.1f} s; "
                 f"statuses {dict(sorted(self.statuses.items()))}; documented 503s {self.unavailable}; "
                 f"unsendable {self.unsendable or 0}; rows checked {self.rows_checked}",
                 "findings: " + ", ".join(f"{k} {v}" for k, v in self.counts.items())]
        lines += [f"generation error: {e}" for e in self.generation_errors]
        for f in self.findings:
            lines.append(f"- [{f.kind}] {f.operation}: {f.detail}\n    {f.request}\n    -> {f.response}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Report:
        return cls(**{**d, "findings": [Finding(**f) for f in d["findings"]]})


# --- the hooks: signatures and tokens on what is actually sent ------------------------------------


def device_signature(data: bytes, key: str) -> str:
    """device-api.md §2: lowercase hex SHA256(data || key), written from the spec."""
    return hashlib.sha256(data + key.encode()).hexdigest()


class DeviceSignature(AuthBase):
    """Sets `x-signature` on the prepared request: requests calls this after the body is final,
    so the signature covers the bytes that go on the wire (the request target with its query
    string when there is no body), whatever the generator put in the header."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        body = r.body
        if isinstance(body, str):
            body = r.body = body.encode()  # what http.client would send, made explicit
        if body is not None and not isinstance(body, bytes):
            raise TypeError(f"cannot sign a streamed body ({type(body).__name__})")
        r.headers["x-signature"] = device_signature(body if body else r.path_url.encode(), self.key)
        return r


class Bearer(AuthBase):
    """`Authorization: Bearer <token>`, replacing whatever the generator put there."""

    def __init__(self, token: str) -> None:
        self.token = token

    def __call__(self, r: requests.PreparedRequest) -> requests.PreparedRequest:
        r.headers["Authorization"] = f"Bearer {self.token}"
        return r


# --- operations -------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpInfo:
    label: str  # "POST /api/v1/devices/need-register"
    security: str | None  # device-signature | bearer | None
    content_type: str  # of the success response; "" without a body

    @property
    def stream(self) -> bool:
        return self.content_type == "text/event-stream"

    @property
    def page(self) -> bool:
        return self.content_type == "text/html"


def describe(document: dict[str, Any]) -> dict[str, OpInfo]:
    """Every operation of the OpenAPI document, by label."""
    out = {}
    for path, methods in document["paths"].items():
        for method, op in methods.items():
            label = f"{method.upper()} {path}"
            security = next(iter(op["security"][0]), None) if op.get("security") else None
            ok = next((r for code, r in op["responses"].items() if code.startswith("2")), {})
            out[label] = OpInfo(label, security, next(iter(ok.get("content", {})), ""))
    return out


# Operations no scope runs: each would end the fuzzer's own session (tests/test_site_access.py covers it).
NOT_FUZZED = {"POST /api/v1/auth/logout": "ends every session of the fuzzer's technician"}


def select(ops: dict[str, OpInfo], scope: Scope) -> tuple[list[str], dict[str, str]]:
    """(operations to fuzz, excluded ones with the reason). Scope `json` keeps the JSON API:
    routes under /api/ whose success is JSON. Out of it: the event streams (they stay open;
    the large run reads them briefly), the HTML pages (they answer their own HTML, e.g. the
    login form's 401, and are covered by the page tests) and the firmware download (raw
    bytes, served to OTA clients unauthenticated)."""
    chosen, excluded = [], {}
    for label, info in sorted(ops.items()):
        if label in NOT_FUZZED:
            excluded[label] = NOT_FUZZED[label]
        elif scope == "all":
            chosen.append(label)
        elif info.stream:
            excluded[label] = "event stream (stays open)"
        elif info.page:
            excluded[label] = "HTML page"
        elif not label.split(" ", 1)[1].startswith("/api/"):
            excluded[label] = f"not the JSON API ({info.content_type or 'no body'})"
        else:
            chosen.append(label)
    return chosen, excluded


def site_toml(cloud_url: str, dead_plc_port: int) -> str:
    """Extra config of a site worth fuzzing: a cloud (payments go through, not straight to 503)
    and one bay on a PLC that never answers (the wash API reaches the core and its 503
    PLC_OFFLINE). `dead_plc_port`: a free port nothing listens on."""
    return (f'[cloud]\nurl = "{cloud_url}"\n'
            f'[[buses]]\nname = "lan"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {dead_plc_port}\n'
            '[[bays]]\nid = "bay1"\nname = "Bay 1"\nbus = "lan"\nunit = 1\n')


# --- the site's own ids, so that generated requests reach the code that stores things -------------

# Path parameters and top-level body members that name something on the site.
KNOWN_PATH = ("device_id", "charge_id", "command_id", "setup_id", "image_id", "name", "bay_id")
KNOWN_BODY = {"device_id": "device_id", "bayId": "bay_id", "bus": "bus"}
FUZZ_DEVICES = (("F022A0000001", "24:0A:C4:F0:00:01", "car_wash_fuzz_1.0"),
                ("F022A0000002", "24:0A:C4:F0:00:02", "helmet_dryer_fuzz_1.0"))


class Client:
    """The HTTP session of a run, with the two auth hooks (the token once `seed_site` logged in)."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.target = target
        self.session = requests.Session()
        self.timeout = timeout
        self.signature = DeviceSignature(target.device_key)
        self.bearer: Bearer | None = None

    def call(self, method: str, path: str, *, signed: bool = False, authorised: bool = False,
             **kwargs: Any) -> requests.Response:
        auth = self.signature if signed else self.bearer if authorised else None
        return self.session.request(method, self.target.base_url + path, auth=auth, timeout=self.timeout, **kwargs)

    def expect(self, status: int | tuple[int, ...], method: str, path: str, **kwargs: Any) -> Any:
        """The `data` of a request that must succeed (seeding); RuntimeError otherwise."""
        r = self.call(method, path, **kwargs)
        if r.status_code not in (status if isinstance(status, tuple) else (status,)):
            raise RuntimeError(f"seeding: {method} {path}: {r.status_code} {r.text[:300]}")
        return r.json().get("data") if r.headers.get("Content-Type", "").startswith("application/json") else None

    def close(self) -> None:
        self.session.close()


def seed_site(client: Client) -> dict[str, list[Any]]:
    """Log in and create a few of everything (see the module docstring); the ids by name."""
    t = client.target
    login = client.expect(200, "POST", "/api/v1/auth/login", json={"username": t.username, "password": t.password})
    client.bearer = Bearer(login["token"])
    known: dict[str, list[Any]] = {k: [] for k in (*KNOWN_PATH, *KNOWN_BODY.values())}
    for chip, mac, fw in FUZZ_DEVICES:
        reg = client.expect(200, "POST", "/api/v1/devices/need-register", signed=True,
                            json={"chip_id": chip, "mac_address": mac, "firmware_version": fw})
        known["device_id"].append(reg["device_id"])
    dev = known["device_id"][0]
    client.expect(200, "POST", f"/api/v1/devices/{dev}/claim", authorised=True, json={"name": "fuzz box 1"})
    image = client.expect((200, 201), "POST", "/api/v1/firmware?version=fuzz-1.0&device_type=CAR_WASH",
                          authorised=True, data=b"\xe9fuzz firmware image\n",
                          headers={"Content-Type": "application/octet-stream"})
    known["image_id"].append(image["id"])
    known["name"].append(image["url"].rsplit("/", 1)[1])
    cmd = client.expect(200, "POST", f"/api/v1/devices/{dev}/commands", authorised=True, json={"command": "PING"})
    known["command_id"].append(cmd["command_id"])
    bulk = client.expect(200, "POST", "/api/v1/devices/bulk-restart", authorised=True,
                         json={"device_ids": known["device_id"], "delay_seconds": 5})
    known["setup_id"].append(bulk["setup_id"])
    r = client.call("POST", "/api/v1/payment-gateway/payments", signed=True,
                    json={"device_id": dev, "amount": 2000, "payment_method": "QR_PROMPT_PAY", "description": "fuzz"})
    if r.status_code == 200:  # a site without a cloud answers 503 and has no charge to look up
        known["charge_id"].append(r.json()["data"]["payment_results"]["chargeId"])
    known["bay_id"] = [b["bayId"] for b in client.call("GET", "/api/bays").json()]
    known["bus"] = list(client.expect(200, "GET", "/api/v1/buses/diagnostics", authorised=True))
    return {k: v for k, v in known.items() if v}


# --- checks of one response -------------------------------------------------------------------


def envelope_problem(status: int, content_type: str, body: bytes, path: str) -> str | None:
    """Why this error response is not the envelope of device-api.md §1 (None when it is)."""
    if not content_type.startswith("application/json"):
        return f"Content-Type {content_type or '(none)'}"
    try:
        doc = json.loads(body)
    except ValueError:
        return "body is not JSON"
    if not isinstance(doc, dict):
        return "body is not an object"
    problems = []
    if set(doc) != ENVELOPE_KEYS:
        problems.append(f"members {sorted(doc)}")
    if doc.get("success") is not False:
        problems.append(f"success {doc.get('success')!r}")
    code = doc.get("errorCode")
    if not isinstance(code, str) or code not in ERROR_CODES:
        problems.append(f"errorCode {code!r}")
    if not isinstance(doc.get("message"), str) or not doc["message"]:
        problems.append("no message")
    sc = doc.get("statusCode")
    if isinstance(sc, bool) or sc != status:
        problems.append(f"statusCode {sc!r} but HTTP {status}")
    if not isinstance(doc.get("timestamp"), str) or not TIMESTAMP_RE.fullmatch(doc["timestamp"]):
        problems.append(f"timestamp {doc.get('timestamp')!r}")
    if doc.get("path") != path:
        problems.append(f"path {doc.get('path')!r} for {path!r}")
    if status >= 500 and isinstance(doc.get("message"), str) and "Traceback" in doc["message"]:
        problems.append("traceback in the message")
    return "; ".join(problems) or None


def _excerpt(data: bytes | str | None) -> str:
    if data is None:
        return ""
    text = data if isinstance(data, str) else data.decode("utf-8", "backslashreplace")
    return text if len(text) <= EXCERPT else text[:EXCERPT] + f"... ({len(text)} chars)"


def check_response(report: Report, info: OpInfo, request: requests.PreparedRequest, status: int,
                   headers: dict[str, str], body: bytes) -> None:
    """Count the response and add a finding for each rule it breaks (see the module docstring)."""
    report.requests += 1
    report.statuses[str(status)] = report.statuses.get(str(status), 0) + 1
    per_op = report.by_operation.setdefault(info.label, {})
    per_op[str(status)] = per_op.get(str(status), 0) + 1
    content_type = headers.get("content-type", "")

    def finding(kind: str, detail: str) -> None:
        report.add(Finding(kind, info.label, detail, f"{request.method} {request.url} {_excerpt(request.body)}",
                           f"{status} {_excerpt(body)}"))

    code = None
    if content_type.startswith("application/json"):
        try:
            doc = json.loads(body)
            code = doc.get("errorCode") if isinstance(doc, dict) else None
        except ValueError:
            pass
    if status >= 500:
        if status == 503 and code in DOCUMENTED_UNAVAILABLE:
            report.unavailable += 1
        else:
            finding("server_error", f"HTTP {status} {code or ''}".strip())
    if status >= 400:
        # The pages answer their own HTML (the login form's 401/403); any JSON they send is the envelope.
        if not (info.page and content_type.startswith("text/html")):
            path = urllib.parse.unquote(urllib.parse.urlsplit(request.url or "").path, errors="replace")
            problem = envelope_problem(status, content_type, body, path)
            if problem:
                finding("envelope", problem)
    if status == 401 and info.security == "device-signature" and code in ("MISSING_SIGNATURE", "INVALID_SIGNATURE"):
        finding("signature_refused", f"signed by the hook, refused with {code}")
    if status == 401 and info.security == "bearer":
        finding("auth_refused", f"valid token, refused with {code}")
    if status == 429 and info.security == "device-signature":
        # The device API exempts loopback (web.rate_limit_exempt). Failed logins are limited for
        # every address: the login's 429 is its designed answer to the fuzzer's wrong passwords.
        finding("rate_limited", "the device API rate-limited the fuzzer (is its address exempt?)")


# --- the run ----------------------------------------------------------------------------------


class Fuzzer:
    """Generates, sends and checks; one instance per run."""

    def __init__(self, target: Target, budget: Budget) -> None:
        self.target = target
        self.budget = budget
        self.report = Report()
        self.client = Client(target, budget.request_timeout_sec)
        self.known: dict[str, list[Any]] = {}

    def run(self) -> Report:
        import schemathesis

        t0 = time.monotonic()
        try:
            # An explicit default config: `from_url` would otherwise pick up any schemathesis.toml
            # found above the working directory.
            schema = schemathesis.openapi.from_url(self.target.base_url + "/api/openapi.json",
                                                   config=schemathesis.Config(),
                                                   timeout=self.budget.request_timeout_sec)
            ops = describe(schema.raw_schema)
            chosen, self.report.excluded = select(ops, self.budget.scope)
            self.known = seed_site(self.client)
            by_label = {r.ok().label: r.ok() for r in schema.get_all_operations()}
            for label in chosen:
                if label not in by_label:
                    # schemathesis leaves out the operation that serves the document it loaded
                    self.report.excluded[label] = "not generated by schemathesis (the document itself)"
                    continue
                self.report.operations.append(label)
                for mode in self.budget.modes:
                    self._fuzz(by_label[label], ops[label], mode)
        finally:
            self.client.close()
        self.report.rows_checked = audit_database(self.target.database, self.target.firmware_dir, self.report)
        self.report.duration_sec = round(time.monotonic() - t0, 2)
        return self.report

    def _fuzz(self, operation: Any, info: OpInfo, mode: str) -> None:
        from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings, strategies as st
        from hypothesis.errors import Unsatisfiable
        from schemathesis import GenerationMode

        strategy = operation.as_strategy(generation_mode=GenerationMode(mode))
        examples = self.budget.max_examples
        if info.stream:
            examples = min(examples, self.budget.stream_examples)

        # Generate only: no shrinking (a finding is recorded, never raised), no example database.
        @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
        @seed(self.budget.seed ^ zlib.crc32(f"{info.label} {mode}".encode()))
        @given(case=strategy, data=st.data())
        def each(case: Any, data: st.DataObject) -> None:
            self._exercise(case, info, data)

        try:
            each()
        except Unsatisfiable:
            pass  # nothing to negate (an operation without parameters): no negative cases exist
        except Exception as exc:  # noqa: BLE001 - a generation failure is reported, the run goes on
            self.report.generation_errors.append(f"{info.label} {mode}: {type(exc).__name__}: {exc}"[:500])

    def _inject(self, case: Any, data: Any) -> None:
        """Half of the cases name something that exists (a device, a charge, a bay ...)."""
        from hypothesis import strategies as st

        if not data.draw(st.booleans()):
            return
        for name, value in list((case.path_parameters or {}).items()):
            if name in self.known and value is not None:
                case.path_parameters[name] = data.draw(st.sampled_from(self.known[name]))
        if isinstance(case.body, dict):
            for member, name in KNOWN_BODY.items():
                if member in case.body and name in self.known:
                    case.body[member] = data.draw(st.sampled_from(self.known[name]))
            if "device_ids" in case.body and isinstance(case.body["device_ids"], list):
                case.body["device_ids"] = data.draw(st.lists(st.sampled_from(self.known["device_id"]), min_size=1))

    def _plain_ints(self, case: Any, data: Any) -> None:
        """Half of the cases spell whole numbers as integers. schemathesis writes half of every
        JSON Schema integer as a float (`2000.0`), which the gateway refuses (400) wherever the
        spec says integer; without this, a body with several integers is almost never valid and
        the code that stores event logs and payments would hardly be reached."""
        from hypothesis import strategies as st

        if isinstance(case.body, (dict, list)) and data.draw(st.booleans()):
            case.body = _whole_floats_to_ints(case.body)

    def _near_miss(self, case: Any, data: Any) -> None:
        """A quarter of the cases get a newline appended to one of their strings: Python's `$`
        also matches before a trailing newline, the classic hole in regex validation, and random
        strings almost never end in exactly one after a valid value."""
        from hypothesis import strategies as st

        if data.draw(st.integers(0, 3)) != 0:
            return
        slots = [(c, k) for c in (case.path_parameters, case.query) if isinstance(c, dict) for k, v in c.items()
                 if isinstance(v, str)]
        slots += list(_string_slots(case.body))
        if slots:
            container, key = data.draw(st.sampled_from(slots))
            container[key] += "\n"

    def _exercise(self, case: Any, info: OpInfo, data: Any) -> None:
        self._inject(case, data)
        self._plain_ints(case, data)
        self._near_miss(case, data)
        auth = self.client.signature if info.security == "device-signature" else (
            self.client.bearer if info.security == "bearer" else None)
        timeout = self.budget.stream_timeout_sec if info.stream else self.budget.request_timeout_sec
        self.client.session.cookies.clear()  # each case on its own: no page's cookie leaks into the next
        try:
            response = case.call(session=self.client.session, auth=auth, timeout=timeout)
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.report.requests += 1
            self.report.add(Finding("transport", info.label, f"{type(exc).__name__}: {exc}"[:EXCERPT],
                                    f"{case.method} {case.formatted_path}"))
            return
        except (requests.RequestException, ValueError, UnicodeError) as exc:
            # The client refused to send it (e.g. a header value http.client cannot encode).
            name = type(exc).__name__
            self.report.unsendable[name] = self.report.unsendable.get(name, 0) + 1
            return
        self.report.latencies_ms.append(round(response.elapsed * 1000, 3))
        headers = {k.lower(): v[0] if isinstance(v, list) else v for k, v in response.headers.items()}
        check_response(self.report, info, response.request, response.status_code, headers, response.content)


def _whole_floats_to_ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _whole_floats_to_ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_whole_floats_to_ints(v) for v in value]
    return value


def _string_slots(value: Any, depth: int = 0) -> Iterator[tuple[Any, Any]]:
    """(container, key) of every string inside a JSON value, a few levels deep."""
    if depth > 4:
        return
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        if isinstance(v, str):
            yield value, k
        else:
            yield from _string_slots(v, depth + 1)


def run(target: Target, budget: Budget) -> Report:
    """Fuzz `target` within `budget`; every finding is in the report, none is raised."""
    return Fuzzer(target, budget).run()


# --- what the fuzzing found, replayed -----------------------------------------------------------

DEVICE = "device-f022a0000001"  # FUZZ_DEVICES[0], registered by seed_site

# (operation label, path, keyword arguments of the request): the bugs the runs found (some only
# in the large run, or once in 16,000 requests), so the bounded run in CI checks every fix.
# Each must come out with no finding: no 5xx, the envelope, no signature refused, nothing
# invalid stored, an answer within the request timeout.
REGRESSIONS: tuple[tuple[str, str, dict[str, Any]], ...] = (
    # An integer SQLite cannot bind reached the core's query: 500.
    ("POST /api/v1/outbox/discard", "/api/v1/outbox/discard", {"json": {"seq": [1, 2**63]}}),
    ("POST /api/v1/outbox/requeue", "/api/v1/outbox/requeue", {"json": {"seq": [-(2**70)]}}),
    ("DELETE /api/v1/firmware/{image_id}", "/api/v1/firmware/99999999999999999999", {}),
    ("POST /api/v1/devices/{device_id}/commands", f"/api/v1/devices/{DEVICE}/commands",
     {"json": {"command": "UPDATE_FIRMWARE", "payload": {"firmware_id": 2**64}}}),
    # Python's `$` let a trailing newline through: stored (or sent to a device) as valid.
    ("POST /api/v1/devices/need-register", "/api/v1/devices/need-register",
     {"json": {"chip_id": "F022A00000F1\n", "mac_address": "24:0A:C4:F0:00:F1", "firmware_version": "car_wash_1"}}),
    ("POST /api/v1/devices/need-register", "/api/v1/devices/need-register",
     {"json": {"chip_id": "F022A00000F2", "mac_address": "24:0A:C4:F0:00:F2\n", "firmware_version": "car_wash_1"}}),
    ("POST /api/v1/device-event-logs/uploads", "/api/v1/device-event-logs/uploads",
     {"json": {"device_id": DEVICE, "items": [{"type": "PAYMENT\n", "status": "SUCCEEDED", "timestamp": 1,
                                                "total_amount": 0}]}}),
    ("POST /api/v1/firmware", "/api/v1/firmware?version=v1%0A",
     {"data": b"\x01image", "headers": {"Content-Type": "application/octet-stream"}}),
    ("POST /api/v1/devices/{device_id}/commands", f"/api/v1/devices/{DEVICE}/commands",
     {"json": {"command": "UPDATE_FIRMWARE", "payload": {"url": "http://x/a.bin\n", "version": "1",
                                                          "sha256": "a" * 64}}}),
    ("POST /api/v1/devices/{device_id}/commands", f"/api/v1/devices/{DEVICE}/commands",
     {"json": {"command": "UPDATE_FIRMWARE", "payload": {"url": "http://x/a.bin", "version": "1",
                                                          "sha256": "a" * 64 + "\n"}}}),
    # A time at the end of the calendar has no UTC equivalent: OverflowError, 500.
    ("GET /api/wash/history", "/api/wash/history?from=0001-01-01T00:00:00%2B01:00", {}),
    ("GET /api/wash/stats", "/api/wash/stats?to=9999-12-31T23:59:59-01:00", {}),
    # "¹".isdigit() is true, int("¹") raises: 500 (found by the large run of bench/fuzz_api.py).
    ("GET /api/wash/history", "/api/wash/history?limit=%C2%B9", {}),
    # A path with an escape, signed as sent, was refused: the server signed the decoded path.
    ("GET /api/v1/payment-gateway/payments/{charge_id}/status", "/api/v1/payment-gateway/payments/a%20b/status", {}),
    # A scan of a bus that is down took minutes and held up every other RPC of the core.
    ("POST /api/v1/buses/scan", "/api/v1/buses/scan", {"json": {"bus": "lan", "first": 1, "last": 32}}),
)
REPLAY_TIMEOUT_SEC = 10.0


def replay(target: Target, cases: Iterable[tuple[str, str, dict[str, Any]]] = REGRESSIONS) -> Report:
    """Send each case (signed or authorised as its operation requires) and check it like a fuzzed
    one, then audit the database; the report of that."""
    report = Report()
    client = Client(target, REPLAY_TIMEOUT_SEC)
    try:
        ops = describe(client.call("GET", "/api/openapi.json").json())
        seed_site(client)
        for label, path, kwargs in cases:
            info = ops[label]
            report.operations.append(label)
            method = label.split(" ", 1)[0]
            try:
                r = client.call(method, path, signed=info.security == "device-signature",
                                authorised=info.security == "bearer", **kwargs)
            except (requests.ConnectionError, requests.Timeout) as exc:
                report.requests += 1
                report.add(Finding("transport", label, f"{type(exc).__name__}: {exc}"[:EXCERPT], f"{method} {path}"))
                continue
            headers = {k.lower(): v for k, v in r.headers.items()}
            check_response(report, info, r.request, r.status_code, headers, r.content)
    finally:
        client.close()
    report.rows_checked = audit_database(target.database, target.firmware_dir, report)
    return report


# --- the database afterwards ------------------------------------------------------------------

CHIP_RE = re.compile(r"[0-9A-Fa-f]{6,16}")
MAC_RE = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
DEVICE_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
UPPER_WORD_RE = re.compile(r"[A-Z][A-Z0-9_]*")
VERSION_RE = re.compile(r"[\x21-\x7e]{1,64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
PAYMENT_STATUSES = {"PENDING", "SUCCEEDED", "FAILED", "CANCELLED"}
DEVICE_STATUSES = {"NORMAL", "ERROR", "OFFLINE"}
BANKNOTES = {"20": 20, "50": 50, "100": 100, "500": 500, "1000": 1000}
COINS = {"1": 1, "2": 2, "5": 5, "10": 10}
LIFECYCLE_KINDS = {"registered", "claimed", "rejected", "startup", "shutdown", "online", "offline"}
CONFIG_SOURCES = {"sync", "startup", "shutdown", "apply"}
COMMANDS = {"APPLY_CONFIG", "RESTART", "UPDATE_FIRMWARE", "RESET_CONFIG", "PING", "GET_STATUS"}
MAX_JSON_INT = 2**53 - 1


def _int(v: Any, lo: int, hi: int = MAX_JSON_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


_NOT_JSON = object()


def _json(v: Any) -> Any:
    """The JSON value stored in a TEXT column, or `_NOT_JSON`."""
    try:
        return json.loads(v) if isinstance(v, str) else _NOT_JSON
    except ValueError:
        return _NOT_JSON


def _fw_type(fw: str) -> str:
    """device-api.md §3: the firmware version's prefix gives the device type."""
    low = fw.lower()
    if low.startswith("car_wash_"):
        return "CAR_WASH"
    if low.startswith(("helmet_dryer_", "helmet_")):
        return "HELMET_DRYER"
    return "UNKNOWN"


def _counts_ok(raw: Any, denominations: dict[str, int]) -> int | None:
    """The value of a stored bank/coin map in baht, or None when it is not a valid one."""
    if raw is None:
        return 0
    value = _json(raw)
    if not isinstance(value, dict) or not all(k in denominations and _int(n, 0) for k, n in value.items()):
        return None
    return sum(denominations[k] * n for k, n in value.items())


def emv_crc_ok(raw: str) -> bool:
    """EMVCo tag 63: CRC-16/CCITT-FALSE over everything before its 4 hex digits."""
    if len(raw) < 8 or not raw.isascii() or raw[-8:-4] != "6304":
        return False
    crc = 0xFFFF
    for byte in raw[:-4].encode():
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021 if crc & 0x8000 else crc << 1) & 0xFFFF
    return raw[-4:].upper() == f"{crc:04X}"


Rule = Callable[[dict[str, Any]], Iterable[str]]


def _device_rules(r: dict[str, Any]) -> Iterator[str]:
    if not isinstance(r["chip_id"], str) or not CHIP_RE.fullmatch(r["chip_id"]):
        yield f"chip_id {r['chip_id']!r}"
    if not isinstance(r["mac_address"], str) or not MAC_RE.fullmatch(r["mac_address"]):
        yield f"mac_address {r['mac_address']!r}"
    fw = r["firmware_version"]
    if not isinstance(fw, str) or not 1 <= len(fw) <= 64 or not fw.isprintable():
        yield f"firmware_version {fw!r}"
    elif r["device_type"] != _fw_type(fw):
        yield f"device_type {r['device_type']!r} for firmware {fw!r}"
    if not isinstance(r["device_id"], str) or not DEVICE_ID_RE.fullmatch(r["device_id"]):
        yield f"device_id {r['device_id']!r}"
    if r["status"] is not None and r["status"] not in DEVICE_STATUSES:
        yield f"status {r['status']!r}"
    if r["name"] is not None and (not isinstance(r["name"], str) or not 1 <= len(r["name"]) <= 64
                                  or r["name"] != r["name"].strip()):
        yield f"name {r['name']!r}"
    if r["pairing_pin"] is not None and not re.fullmatch(r"[0-9]{4}", str(r["pairing_pin"])):
        yield f"pairing_pin {r['pairing_pin']!r}"


def _config_rules(r: dict[str, Any]) -> Iterator[str]:
    if not isinstance(_json(r["configs"]), dict):
        yield f"configs not a JSON object: {_excerpt(r['configs'])}"
    if r["source"] not in CONFIG_SOURCES:
        yield f"source {r['source']!r}"


def _lifecycle_rules(r: dict[str, Any]) -> Iterator[str]:
    if r["kind"] not in LIFECYCLE_KINDS:
        yield f"kind {r['kind']!r}"
    if r["detail"] is not None and _json(r["detail"]) is _NOT_JSON:
        yield "detail not JSON"


def _log_rules(r: dict[str, Any]) -> Iterator[str]:
    if not isinstance(r["type"], str) or not UPPER_WORD_RE.fullmatch(r["type"]):
        yield f"type {r['type']!r}"
    if r["status"] not in PAYMENT_STATUSES:
        yield f"status {r['status']!r}"
    for col in ("timestamp_ms", "total_amount"):
        if not _int(r[col], 0):
            yield f"{col} {r[col]!r}"
    if r["qr_net_amount"] is not None and not _int(r["qr_net_amount"], 0):
        yield f"qr_net_amount {r['qr_net_amount']!r}"
    bank, coin = _counts_ok(r["bank"], BANKNOTES), _counts_ok(r["coin"], COINS)
    if bank is None:
        yield f"bank {r['bank']!r}"
    if coin is None:
        yield f"coin {r['coin']!r}"
    if bank is not None and coin is not None and _int(r["total_amount"], 0):
        mismatch = bank + coin + (r["qr_net_amount"] or 0) != r["total_amount"]
        if bool(r["amount_mismatch"]) != mismatch:
            yield f"amount_mismatch {r['amount_mismatch']!r}, but notes+coins+qr vs total says {mismatch}"


def _payment_rules(r: dict[str, Any]) -> Iterator[str]:
    if not _int(r["amount_satang"], 1, 10_000_000):
        yield f"amount_satang {r['amount_satang']!r}"
    if r["payment_method"] != "QR_PROMPT_PAY":
        yield f"payment_method {r['payment_method']!r}"
    if r["description"] is not None and (not isinstance(r["description"], str) or len(r["description"]) > 255):
        yield f"description of {len(str(r['description']))} characters"
    if r["status"] not in PAYMENT_STATUSES:
        yield f"status {r['status']!r}"
    if not isinstance(r["raw_data"], str) or not emv_crc_ok(r["raw_data"]):
        yield f"raw_data fails the EMV CRC: {r['raw_data']!r}"


def _command_rules(r: dict[str, Any]) -> Iterator[str]:
    if r["command"] not in COMMANDS:
        yield f"command {r['command']!r}"
    payload = _json(r["payload"])
    if not isinstance(payload, dict):
        yield "payload not a JSON object"
    elif r["command"] == "UPDATE_FIRMWARE":
        if not isinstance(payload.get("sha256"), str) or not re.fullmatch(r"[0-9a-fA-F]{64}", payload["sha256"]):
            yield f"UPDATE_FIRMWARE sha256 {payload.get('sha256')!r}"
        if not isinstance(payload.get("url"), str) or not re.fullmatch(r"https?://\S+", payload["url"]):
            yield f"UPDATE_FIRMWARE url {payload.get('url')!r}"


def _outbox_rules(r: dict[str, Any]) -> Iterator[str]:
    if r["state"] not in ("pending", "sent", "dead"):
        yield f"state {r['state']!r}"


def _outbox_payload_rules(r: dict[str, Any]) -> Iterator[str]:
    v = r["payload"]
    try:  # TEXT, or zlib-compressed JSON as a BLOB (docs/decisions.md, Storage)
        text = v if isinstance(v, str) else zlib.decompress(v).decode()
    except (zlib.error, UnicodeDecodeError, TypeError):
        yield "payload neither JSON text nor a zlib-compressed JSON BLOB"
        return
    if not isinstance(_json(text), dict):
        yield "payload not a JSON object"


def _mqtt_account_rules(row: dict[str, Any]) -> Iterator[str]:
    from gateway.access.mqtt_accounts import ROLES, USERNAME_RE

    if not USERNAME_RE.match(row["username"]) or row["username"].lower().startswith("carwash"):
        yield f"username {row['username']!r} is not a valid account name"
    if row["role"] not in ROLES:
        yield f"role {row['role']!r} is not a role"
    if not str(row["password_hash"]).startswith("$argon2id$"):
        yield "password not stored as an argon2id hash"


TABLE_RULES: dict[str, Rule] = {
    "mqtt_account": _mqtt_account_rules,
    "device": _device_rules,
    "device_config": _config_rules,
    "device_lifecycle_event": _lifecycle_rules,
    "event_log_item": _log_rules,
    "payment": _payment_rules,
    "command": _command_rules,
    "outbox_event": _outbox_rules,
    "outbox_payload": _outbox_payload_rules,
}


def audit_database(database: Path, firmware_dir: Path, report: Report) -> dict[str, int]:
    """Check every stored row against the spec's rules (a `bad_row` finding for each broken
    one); returns the rows checked per table. Read-only: the gateway may still be running."""
    checked: dict[str, int] = {}
    with closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=10)) as db:
        db.row_factory = sqlite3.Row

        def bad(table: str, key: Any, problem: str) -> None:
            report.add(Finding("bad_row", table, f"{table} {key!r}: {problem}"))

        for table, rule in TABLE_RULES.items():
            rows = [dict(r) for r in db.execute(f'SELECT * FROM "{table}"')]  # noqa: S608 - our own table names
            checked[table] = len(rows)
            for row in rows:
                key = next(iter(row.values()))
                for problem in rule(row):
                    bad(table, key, problem)
        for table, rowid, parent, _fk in db.execute("PRAGMA foreign_key_check"):
            bad(table, rowid, f"refers to a {parent} row that does not exist")
        for (seq,) in db.execute('SELECT e.seq FROM "outbox_event" e LEFT JOIN "outbox_payload" p '
                                 'ON p.seq = e.seq WHERE p.seq IS NULL'):
            bad("outbox_event", seq, "has no payload")
        # Re-uploading the same item stores nothing new (device-api.md §3).
        same = db.execute('SELECT device_id, timestamp_ms, type, status, total_amount, qr_charge_id, qr_net_amount, '
                          'bank, coin, COUNT(*) FROM "event_log_item" GROUP BY 1, 2, 3, 4, 5, 6, 7, 8, 9 '
                          'HAVING COUNT(*) > 1').fetchall()
        for row in same:
            bad("event_log_item", tuple(row)[:3], f"stored {row[-1]} times")
        images = [dict(r) for r in db.execute('SELECT * FROM "firmware_image"')]
        checked["firmware_image"] = len(images)
        for r in images:
            for problem in _firmware_rules(r, firmware_dir):
                bad("firmware_image", r["id"], problem)
    return checked


def _firmware_rules(r: dict[str, Any], folder: Path) -> Iterator[str]:
    if not isinstance(r["version"], str) or not VERSION_RE.fullmatch(r["version"]):
        yield f"version {r['version']!r}"
    if r["device_type"] not in (None, "CAR_WASH", "HELMET_DRYER"):
        yield f"device_type {r['device_type']!r}"
    sha = r["sha256"]
    if not isinstance(sha, str) or not SHA256_RE.fullmatch(sha) or r["filename"] != f"{sha}.bin":
        yield f"sha256 {r['sha256']!r} / filename {r['filename']!r}"
        return
    path = folder / r["filename"]
    if not path.is_file():
        yield "its file is missing"
        return
    data = path.read_bytes()
    if len(data) != r["size"] or r["size"] < 1 or hashlib.sha256(data).hexdigest() != r["sha256"]:
        yield f"the file ({len(data)} bytes) does not match size {r['size']} and sha256"


# --- a run in a process of its own ------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.fuzzing", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, required=True, help="the running gateway's gateway.toml")
    ap.add_argument("--user", default="demo")
    ap.add_argument("--password", default="demo")
    ap.add_argument("--max-examples", type=int, default=Budget.max_examples)
    ap.add_argument("--seed", type=int, default=Budget.seed)
    ap.add_argument("--scope", choices=("json", "all"), default="json")
    ap.add_argument("--out", type=Path, required=True, help="the report, as JSON")
    args = ap.parse_args(argv)
    report = run(Target.from_config(args.config, args.user, args.password),
                 Budget(max_examples=args.max_examples, seed=args.seed, scope=args.scope))
    args.out.write_text(json.dumps(report.to_json(), indent=1, ensure_ascii=False))
    print(report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
