"""The cloud simulator: a small HTTP server standing in for the company backend.

Used by tests, the demo and the benchmarks, never by the production services. It speaks the
two cloud interfaces the gateway uses (uplink.md, device-api.md §3):

- `POST /api/v1/gateways/{site_id}/events` with `{"events": [...]}`, signed with the site key
  (`x-signature` = sha256(raw body || key), 401 otherwise). Events are deduplicated by `id`; the
  answer is `{"success": true, "data": {"accepted": [ids...]}}` (duplicates are accepted too, as
  the real cloud must, so a re-sent batch is marked delivered). Every unique event is recorded in
  arrival order, globally and per partition (`default_partition`: the payload's `device_id`, else
  `bay_id`).
- `POST /api/v1/payment-gateway/payments` creates a PromptPay charge and answers in the seed's
  shape (`payment_results.chargeId`, `encodedImage.rawData` built by `gateway.payments.promptpay`,
  `expiry`, the amount as decimal.js JSON); `GET .../payments/{chargeId}/status` answers
  `{chargeId, status}`. A charge stays PENDING until told otherwise (`pay`/`fail`/`cancel`, from
  Python or `POST /_sim/payments/{chargeId}/pay|fail|cancel`, or the buttons of `GET /_sim/`) or
  until `payment_auto_delay_sec` has passed (then it becomes `payment_auto_status`).

Fault injection, from Python or over HTTP (`POST /_sim/<control>` with a JSON body):
`fail(status, count)` answers the next `count` requests (None: until `clear()`) with `status`;
`poison(ids, status)` rejects any batch containing one of those event ids (nothing of it is
accepted); `stall(seconds, after_processing)` holds requests (before or after recording them)
for `seconds` or until `release()`; `go_away(seconds)` closes the listening socket and every open
connection, and `come_back()` (or the timer) listens again on the same port. `latency_sec` delays
every API answer. `stats()` (also `GET /_sim/stats`) gives the counters.

Threads: `start()` runs a `ThreadingHTTPServer` in a thread; `stop()` closes every connection,
releases held requests and joins every thread it started. The constructor does no I/O.
CLI: `python -m sim.cloud --port N --site-key KEY` prints its URL and runs until SIGTERM or
SIGINT.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import html
import json
import logging
import re
import secrets
import signal
import socket
import socketserver
import string
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import FrameType
from typing import Any, Self

from gateway.access.signing import Verdict, verify_http
from gateway.payments.promptpay import build_promptpay, decimal_js

log = logging.getLogger(__name__)

PAYMENT_STATUSES = ("PENDING", "SUCCEEDED", "FAILED", "CANCELLED")
FINAL_STATUSES = frozenset(PAYMENT_STATUSES[1:])
BANGKOK = dt.timezone(dt.timedelta(hours=7))  # the seed's created_at/expiry are Bangkok wall time
DEFAULT_PROMPTPAY_TARGET = "0812345678"

_EVENTS_RE = re.compile(r"^/api/v1/gateways/([^/]+)/events$")
_PAYMENTS_PATH = "/api/v1/payment-gateway/payments"
_STATUS_RE = re.compile(r"^/api/v1/payment-gateway/payments/([^/]+)/status$")
_SIM_PAYMENT_RE = re.compile(r"^/_sim/payments/([^/]+)/(pay|fail|cancel)$")
_ALNUM = string.ascii_letters + string.digits
_CONTROL_ACTIONS = {"pay": "SUCCEEDED", "fail": "FAILED", "cancel": "CANCELLED"}


def default_partition(event: dict[str, Any]) -> str | None:
    """The ordering key the simulator files an event under: payload device_id, else bay_id."""
    payload = event.get("payload")
    if isinstance(payload, dict):
        for key in ("device_id", "bay_id"):
            if isinstance(payload.get(key), str):
                return str(payload[key])
    return None


def _random(alphabet: str, n: int) -> str:
    return "".join(secrets.choice(alphabet) for _ in range(n))


@dataclass
class Charge:
    """One simulated charge."""

    charge_id: str
    id: str
    device_id: str
    amount_satang: int
    payment_method: str
    description: str
    reference_id: str
    raw_data: str
    expiry: str
    status: str
    created_at: dt.datetime
    updated_at: dt.datetime
    created_mono: float


class _ApiError(Exception):
    """An API error answered with the spec's error envelope."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class _Server(ThreadingHTTPServer):
    """Tracks its open connections so `go_away`/`stop` can cut them (keep-alive handler threads
    otherwise block in a read until the client closes, and server_close() joins them)."""

    daemon_threads = True
    allow_reuse_address = True  # come back on the same port despite TIME_WAIT connections

    request_queue_size = 128

    def __init__(self, addr: tuple[str, int], sim: CloudSim) -> None:
        self.sim = sim
        self.active: set[socket.socket] = set()
        self.active_lock = threading.Lock()
        super().__init__(addr, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the host name (getfqdn), a DNS lookup we do not need.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.active_lock:
            self.active.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.active_lock:
            self.active.discard(request)
        super().shutdown_request(request)

    def drop_connections(self) -> None:
        with self.active_lock:
            conns = list(self.active)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Connections cut by go_away/stop or by the client are part of the simulation.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, OSError)):
            return
        log.exception("cloudsim: error handling a request from %s", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the drainer's connection expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stall
    server: _Server

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("cloudsim: " + fmt, *args)

    def do_GET(self) -> None:
        self.server.sim._dispatch(self, "GET")

    def do_POST(self) -> None:
        self.server.sim._dispatch(self, "POST")


class CloudSim:
    """The simulator; see the module docstring. All public methods are thread-safe."""

    def __init__(
        self,
        site_key: str,
        *,
        site_id: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        promptpay_target: str = DEFAULT_PROMPTPAY_TARGET,
        payment_auto_delay_sec: float | None = None,
        payment_auto_status: str = "SUCCEEDED",
        expiry_minutes: float = 30.0,
        latency_sec: float = 0.0,
        record_events: bool = True,
        partition_of: Callable[[dict[str, Any]], str | None] = default_partition,
        body_limit_bytes: int = 4 * 1024 * 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if payment_auto_status not in FINAL_STATUSES:
            raise ValueError(f"payment_auto_status must be one of {sorted(FINAL_STATUSES)}")
        self.site_key = site_key
        self.site_id = site_id  # None: any site id is accepted
        self.host = host
        self._port = port
        self.promptpay_target = promptpay_target
        self.payment_auto_delay_sec = payment_auto_delay_sec
        self.payment_auto_status = payment_auto_status
        self.expiry_minutes = expiry_minutes
        self.latency_sec = latency_sec
        self.record_events = record_events
        self.partition_of = partition_of
        self.body_limit_bytes = body_limit_bytes
        self.clock = clock
        # One condition guards all state and wakes waiters (wait_for, held requests).
        self._cond = threading.Condition()
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self._lifecycle = threading.Lock()  # start/stop/go_away/come_back, never under _cond
        self._generation = 0  # bumped when the server goes away: held requests of it return
        self._stopping = False
        self._started = False
        self._timers: list[threading.Thread] = []
        # events
        self._seen: dict[str, int] = {}  # event id -> arrival index of its first copy
        self._events: list[dict[str, Any]] = []
        self._partitions: dict[str | None, list[str]] = {}
        self._batches: list[list[str]] = []  # ids of each accepted request, in arrival order
        self._counters = {"requests": 0, "received": 0, "unique": 0, "duplicates": 0, "rejected": 0,
                          "held": 0, "payments_created": 0}
        # faults
        self._fail_status: int | None = None
        self._fail_left: int | None = None
        self._fail_scope = "events"
        self._poison: dict[str, int] = {}
        self._stall_until: float | None = None  # monotonic deadline; inf = until release()
        self._stall_after = False
        # payments
        self._charges: dict[str, Charge] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind (port 0: an ephemeral port, kept for come_back) and serve in a thread."""
        with self._lifecycle:
            if self._started:
                raise RuntimeError("CloudSim already started")
            self._started = True
            self._bind()
        return self

    def stop(self) -> None:
        """Close every connection, release held requests, join every thread. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        with self._lifecycle:
            self._unbind()
        while self._timers:  # a timer may add another (go_away -> come_back) while we join
            self._timers.pop().join()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("CloudSim not started")
        return self._port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def up(self) -> bool:
        return self._server is not None

    def _bind(self) -> None:
        server = _Server((self.host, self._port), self)
        self._port = int(server.server_address[1])
        thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                  name=f"cloudsim-{self._port}", daemon=True)
        self._server, self._serve_thread = server, thread
        thread.start()
        with self._cond:
            self._cond.notify_all()  # wait_for(lambda s: s.up, ...)

    def _unbind(self) -> None:
        server, thread = self._server, self._serve_thread
        if server is None or thread is None:
            return
        self._server = self._serve_thread = None
        server.shutdown()  # stop accepting
        with self._cond:
            self._generation += 1
            self._cond.notify_all()  # held requests of this server return now
        server.drop_connections()
        server.server_close()  # joins the handler threads
        thread.join()

    def go_away(self, seconds: float | None = None) -> None:
        """Close the listening socket and every connection; with `seconds`, come back after that."""
        with self._lifecycle:
            self._unbind()
        if seconds is not None:
            self._later(seconds, self.come_back)

    def come_back(self) -> None:
        """Listen again on the same port (no-op if up or stopped)."""
        with self._lifecycle:
            if self._server is None and not self._stopping and self._started:
                self._bind()

    def _later(self, seconds: float, fn: Callable[[], None]) -> None:
        def run() -> None:
            with self._cond:
                deadline = time.monotonic() + seconds
                while not self._stopping and time.monotonic() < deadline:
                    self._cond.wait(deadline - time.monotonic())
                if self._stopping:
                    return
            fn()

        t = threading.Thread(target=run, name="cloudsim-timer", daemon=True)
        self._timers.append(t)
        t.start()

    # --- fault controls ----------------------------------------------------------------------

    def fail(self, status: int, count: int | None = None, *, scope: str = "events") -> None:
        """Answer the next `count` requests (None: all until clear()) of `scope` (events,
        payments or all) with `status` and the error envelope."""
        if scope not in ("events", "payments", "all"):
            raise ValueError("scope must be events, payments or all")
        if not 400 <= status <= 599:
            raise ValueError("status must be a 4xx or 5xx")
        with self._cond:
            self._fail_status, self._fail_left, self._fail_scope = status, count, scope

    def poison(self, event_ids: Iterable[str], status: int = 400) -> None:
        """Reject (nothing accepted) any batch that contains one of these event ids."""
        with self._cond:
            for eid in event_ids:
                self._poison[eid] = status

    def stall(self, seconds: float | None = None, *, after_processing: bool = False) -> None:
        """Hold API requests for `seconds` (None: until release()); `after_processing` records
        the events first and holds only the answer (the gateway then never learns it)."""
        with self._cond:
            self._stall_until = float("inf") if seconds is None else time.monotonic() + seconds
            self._stall_after = after_processing

    def release(self) -> None:
        """Let held requests go on, and stop holding new ones."""
        with self._cond:
            self._stall_until = None
            self._cond.notify_all()

    def clear(self) -> None:
        """Remove every fault (failures, poison, stall)."""
        with self._cond:
            self._fail_status = self._fail_left = None
            self._poison.clear()
            self._stall_until = None
            self._cond.notify_all()

    # --- observations ------------------------------------------------------------------------

    def stats(self) -> dict[str, int]:
        """requests, received (events incl. duplicates), unique, duplicates, rejected (requests
        answered 4xx/5xx), held (requests being held now), payments_created."""
        with self._cond:
            return dict(self._counters)

    @property
    def unique(self) -> int:
        with self._cond:
            return self._counters["unique"]

    @property
    def duplicates(self) -> int:
        with self._cond:
            return self._counters["duplicates"]

    @property
    def received(self) -> int:
        with self._cond:
            return self._counters["received"]

    def event_ids(self) -> list[str]:
        """Unique event ids in order of first arrival."""
        with self._cond:
            return list(self._seen)

    def events(self) -> list[dict[str, Any]]:
        """Unique events as received, in order of first arrival (record_events only)."""
        with self._cond:
            return list(self._events)

    def partitions(self) -> dict[str | None, list[str]]:
        """Per partition key, the unique event ids in order of first arrival."""
        with self._cond:
            return {k: list(v) for k, v in self._partitions.items()}

    def batches(self) -> list[list[str]]:
        """The event ids of each accepted request, in arrival order (duplicates included)."""
        with self._cond:
            return [list(b) for b in self._batches]

    def wait_for(self, predicate: Callable[[CloudSim], bool], timeout: float) -> None:
        """Block until `predicate(self)` is true (checked after each change); TimeoutError."""
        deadline = time.monotonic() + timeout
        with self._cond:  # an RLock: the predicate may use the (locking) accessors
            while not predicate(self):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"cloudsim condition not met within {timeout:g} s: {self._counters}")
                self._cond.wait(min(left, 0.5))

    # --- payments ----------------------------------------------------------------------------

    def charges(self) -> list[Charge]:
        with self._cond:
            for c in self._charges.values():
                self._auto_settle(c)
            return list(self._charges.values())

    def charge(self, charge_id: str) -> Charge:
        with self._cond:
            c = self._charges[charge_id]
            self._auto_settle(c)
            return c

    def set_payment_status(self, charge_id: str, status: str) -> Charge:
        """Move a PENDING charge to a final status; KeyError (unknown), ValueError (not pending)."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {sorted(FINAL_STATUSES)}")
        with self._cond:
            c = self._charges[charge_id]
            self._auto_settle(c)
            if c.status != "PENDING":
                raise ValueError(f"charge {charge_id} is already {c.status}")
            c.status, c.updated_at = status, dt.datetime.now(BANGKOK)
            self._cond.notify_all()
            return c

    def pay(self, charge_id: str) -> Charge:
        return self.set_payment_status(charge_id, "SUCCEEDED")

    def fail_payment(self, charge_id: str) -> Charge:
        return self.set_payment_status(charge_id, "FAILED")

    def cancel_payment(self, charge_id: str) -> Charge:
        return self.set_payment_status(charge_id, "CANCELLED")

    def _auto_settle(self, c: Charge) -> None:
        """Lazily apply the automatic final status (no timer thread: checked when observed)."""
        if (c.status == "PENDING" and self.payment_auto_delay_sec is not None
                and self.clock() - c.created_mono >= self.payment_auto_delay_sec):
            c.status, c.updated_at = self.payment_auto_status, dt.datetime.now(BANGKOK)

    def create_charge(self, device_id: str, amount_satang: int, description: str = "",
                      payment_method: str = "QR_PROMPT_PAY") -> Charge:
        now = dt.datetime.now(BANGKOK).replace(microsecond=0)
        ms = time.time_ns() // 1_000_000
        reference = f"CCW-{ms}-{_random(string.ascii_uppercase + string.digits, 6)}"
        c = Charge(
            charge_id="ch_" + _random(_ALNUM, 27),
            id="c" + _random(string.ascii_lowercase + string.digits, 24),
            device_id=device_id,
            amount_satang=amount_satang,
            payment_method=payment_method,
            description=description,
            reference_id=reference,
            raw_data=build_promptpay(self.promptpay_target, amount_satang, reference),
            expiry=(now + dt.timedelta(minutes=self.expiry_minutes)).strftime("%Y-%m-%d %H:%M:%S"),
            status="PENDING",
            created_at=now,
            updated_at=now,
            created_mono=self.clock(),
        )
        with self._cond:
            self._charges[c.charge_id] = c
            self._counters["payments_created"] += 1
            self._cond.notify_all()
        return c

    @staticmethod
    def charge_document(c: Charge) -> dict[str, Any]:
        """The seed's `data` of a payment response."""
        return {
            "id": c.id,
            "device_id": c.device_id,
            "amount": decimal_js(c.amount_satang),
            "payment_method": c.payment_method,
            "reference_id": c.reference_id,
            "status": c.status,
            "payment_results": {
                "chargeId": c.charge_id,
                "redirect": None,
                "encodedImage": {"expiry": c.expiry, "rawData": c.raw_data},
                "actionRequired": "ENCODED_IMAGE",
                "paymentMethodType": c.payment_method,
            },
            "created_at": c.created_at.strftime("%Y-%m-%d %H:%M:%S"),
            "updated_at": c.updated_at.strftime("%Y-%m-%d %H:%M:%S"),
        }

    # --- request handling --------------------------------------------------------------------

    def _dispatch(self, h: _Handler, method: str) -> None:
        path = h.path.split("?", 1)[0]
        try:
            length = int(h.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0 or length > self.body_limit_bytes:
            h.close_connection = True  # the body is not read: the connection cannot be reused
            self._error(h, 413 if length > 0 else 400, "PAYLOAD_TOO_LARGE" if length > 0 else "INVALID_JSON",
                        "body too large" if length > 0 else "bad Content-Length", path)
            return
        body = h.rfile.read(length) if length else b""
        try:
            if path.startswith("/_sim"):
                self._control(h, method, path, body)
                return
            m = _EVENTS_RE.match(path)
            if m and method == "POST":
                self._events_request(h, m.group(1), body, path)
            elif path == _PAYMENTS_PATH and method == "POST":
                self._payment_create(h, body, path)
            elif (m2 := _STATUS_RE.match(path)) and method == "GET":
                self._payment_status(h, m2.group(1), path)
            elif m or path == _PAYMENTS_PATH or _STATUS_RE.match(path):
                raise _ApiError(405, "VALIDATION_FAILED", f"{method} not allowed on {path}")
            else:
                raise _ApiError(404, "NOT_FOUND", f"no route {path}")
        except OSError:
            raise  # the connection is gone (go_away, stop, client): nothing to answer
        except _ApiError as r:
            if path.startswith("/api/"):
                with self._cond:
                    self._counters["rejected"] += 1
                    self._cond.notify_all()
            self._error(h, r.status, r.code, str(r), path)
        except Exception:
            log.exception("cloudsim: internal error on %s %s", method, path)
            self._error(h, 500, "INTERNAL_ERROR", "internal error", path)

    def _prelude(self, h: _Handler, body: bytes, path: str, scope: str) -> int:
        """Latency, stall (before), injected failure, signature. Returns the server generation."""
        with self._cond:
            gen = self._generation
            self._counters["requests"] += 1
            self._cond.notify_all()
        if self.latency_sec > 0:
            self._hold(gen, time.monotonic() + self.latency_sec)
        if not self._stall_after_mode():
            self._hold_while_stalled(gen)
        with self._cond:
            if self._fail_status is not None and self._fail_scope in (scope, "all"):
                status = self._fail_status
                if self._fail_left is not None:
                    self._fail_left -= 1
                    if self._fail_left <= 0:
                        self._fail_status = self._fail_left = None
                raise _ApiError(status, "CLOUD_UNAVAILABLE" if status >= 500 else "VALIDATION_FAILED",
                                f"injected failure {status}")
        verdict = verify_http(h.headers.get("x-signature"), body=body, path_with_query=h.path, key=self.site_key)
        if verdict is Verdict.MISSING:
            raise _ApiError(401, "MISSING_SIGNATURE", "x-signature header missing")
        if verdict is Verdict.INVALID:
            raise _ApiError(401, "INVALID_SIGNATURE", "x-signature does not match")
        return gen

    def _stall_after_mode(self) -> bool:
        with self._cond:
            return self._stall_until is not None and self._stall_after

    def _hold(self, gen: int, deadline: float) -> None:
        with self._cond:
            while not self._stopping and self._generation == gen and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())

    def _hold_while_stalled(self, gen: int) -> None:
        with self._cond:
            if self._stall_until is None:
                return
            self._counters["held"] += 1
            self._cond.notify_all()
            try:
                while (not self._stopping and self._generation == gen and self._stall_until is not None
                       and time.monotonic() < self._stall_until):
                    self._cond.wait(min(self._stall_until - time.monotonic(), 1.0))
            finally:
                self._counters["held"] -= 1
                self._cond.notify_all()
            if self._generation != gen or self._stopping:
                raise ConnectionAbortedError("cloudsim went away while holding the request")

    def _events_request(self, h: _Handler, site_id: str, body: bytes, path: str) -> None:
        gen = self._prelude(h, body, path, "events")
        if self.site_id is not None and site_id != self.site_id:
            raise _ApiError(404, "NOT_FOUND", f"unknown site {site_id}")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _ApiError(400, "INVALID_JSON", "body is not JSON") from None
        events = doc.get("events") if isinstance(doc, dict) else None
        if not isinstance(events, list) or not events:
            raise _ApiError(400, "VALIDATION_FAILED", "events must be a non-empty list")
        for i, ev in enumerate(events):
            if not isinstance(ev, dict) or not isinstance(ev.get("id"), str) or not ev["id"]:
                raise _ApiError(400, "VALIDATION_FAILED", f"events[{i}].id must be a non-empty string")
        ids = [ev["id"] for ev in events]
        with self._cond:
            bad = [eid for eid in ids if eid in self._poison]
            if bad:
                raise _ApiError(self._poison[bad[0]], "VALIDATION_FAILED", f"event {bad[0]} rejected")
            for ev in events:
                eid = ev["id"]
                self._counters["received"] += 1
                if eid in self._seen:
                    self._counters["duplicates"] += 1
                    continue
                self._seen[eid] = len(self._seen)
                self._counters["unique"] += 1
                self._partitions.setdefault(self.partition_of(ev), []).append(eid)
                if self.record_events:
                    self._events.append(ev)
            self._batches.append(ids)
            self._cond.notify_all()
        if self._stall_after_mode():
            self._hold_while_stalled(gen)
        self._json(h, 200, {"success": True, "data": {"accepted": ids}})

    def _payment_create(self, h: _Handler, body: bytes, path: str) -> None:
        self._prelude(h, body, path, "payments")
        try:
            doc = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise _ApiError(400, "INVALID_JSON", "body is not JSON") from None
        if not isinstance(doc, dict):
            raise _ApiError(400, "VALIDATION_FAILED", "body must be an object")
        device_id, amount = doc.get("device_id"), doc.get("amount")
        method, description = doc.get("payment_method"), doc.get("description", "")
        if not isinstance(device_id, str) or not device_id:
            raise _ApiError(400, "VALIDATION_FAILED", "device_id must be a non-empty string")
        if isinstance(amount, bool) or not isinstance(amount, int) or not 1 <= amount <= 10_000_000:
            raise _ApiError(400, "VALIDATION_FAILED", "amount must be an integer number of satang, 1..10000000")
        if method != "QR_PROMPT_PAY":
            raise _ApiError(400, "VALIDATION_FAILED", "payment_method must be QR_PROMPT_PAY")
        if not isinstance(description, str) or len(description) > 255:
            raise _ApiError(400, "VALIDATION_FAILED", "description must be a string of at most 255 characters")
        c = self.create_charge(device_id, amount, description, method)
        self._json(h, 200, {"success": True, "data": self.charge_document(c),
                            "message": "Payment created successfully"})

    def _payment_status(self, h: _Handler, charge_id: str, path: str) -> None:
        self._prelude(h, b"", path, "payments")
        with self._cond:
            c = self._charges.get(charge_id)
            if c is None:
                raise _ApiError(404, "PAYMENT_NOT_FOUND", f"no charge {charge_id}")
            self._auto_settle(c)
            data = {"chargeId": c.charge_id, "status": c.status}
        self._json(h, 200, {"success": True, "data": data, "message": "Payment status checked successfully"})

    def _control(self, h: _Handler, method: str, path: str, body: bytes) -> None:
        form = "application/x-www-form-urlencoded" in (h.headers.get("Content-Type") or "")
        args: dict[str, Any] = {}
        if body and not form:
            try:
                parsed = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise _ApiError(400, "INVALID_JSON", "control body is not JSON") from None
            if not isinstance(parsed, dict):
                raise _ApiError(400, "VALIDATION_FAILED", "control body must be an object")
            args = parsed
        try:
            if method == "GET" and path in ("/_sim", "/_sim/"):
                self._send(h, 200, self._html().encode(), "text/html; charset=utf-8")
                return
            if method == "GET" and path == "/_sim/stats":
                self._json(h, 200, {"success": True, "data": self.stats()})
                return
            if method == "GET" and path == "/_sim/events":
                self._json(h, 200, {"success": True, "data": {"ids": self.event_ids(), "events": self.events()}})
                return
            if method == "GET" and path == "/_sim/payments":
                self._json(h, 200, {"success": True, "data": [self.charge_document(c) for c in self.charges()]})
                return
            if method != "POST":
                raise _ApiError(404, "NOT_FOUND", f"no route {method} {path}")
            m = _SIM_PAYMENT_RE.match(path)
            if m:
                try:
                    c = self.set_payment_status(m.group(1), _CONTROL_ACTIONS[m.group(2)])
                except KeyError:
                    raise _ApiError(404, "PAYMENT_NOT_FOUND", f"no charge {m.group(1)}") from None
                except ValueError as exc:
                    raise _ApiError(409, "CONFLICT", str(exc)) from None
                if form:  # the demo page's buttons: back to the list
                    self._send(h, 303, b"", "text/plain", {"Location": "/_sim/"})
                else:
                    self._json(h, 200, {"success": True, "data": {"chargeId": c.charge_id, "status": c.status}})
                return
            if path == "/_sim/fail":
                count = args.get("count")
                self.fail(int(args["status"]), None if count is None else int(count),
                          scope=str(args.get("scope", "events")))
            elif path == "/_sim/poison":
                self.poison([str(x) for x in args["ids"]], int(args.get("status", 400)))
            elif path == "/_sim/stall":
                seconds = args.get("seconds")
                self.stall(None if seconds is None else float(seconds),
                           after_processing=bool(args.get("after_processing", False)))
            elif path == "/_sim/release":
                self.release()
            elif path == "/_sim/clear":
                self.clear()
            elif path == "/_sim/go-away":
                seconds = float(args.get("seconds", 5.0))
                self._json(h, 200, {"success": True, "data": self.stats()})
                # After the answer is out, and not from this handler thread: going away cuts
                # this connection and joins the handler threads.
                self._later(0.0, lambda: self.go_away(seconds))
                return
            else:
                raise _ApiError(404, "NOT_FOUND", f"no control {path}")
        except (KeyError, TypeError, ValueError) as exc:
            raise _ApiError(400, "VALIDATION_FAILED", f"bad control arguments: {exc}") from None
        self._json(h, 200, {"success": True, "data": self.stats()})

    def _html(self) -> str:
        rows = []
        for c in self.charges():
            buttons = "".join(
                f'<form method="post" action="/_sim/payments/{html.escape(c.charge_id)}/{action}">'
                f'<button>{label}</button></form>'
                for action, label in (("pay", "mark paid"), ("fail", "fail"), ("cancel", "cancel"))
            ) if c.status == "PENDING" else ""
            rows.append(
                f"<tr><td>{html.escape(c.charge_id)}</td><td>{html.escape(c.device_id)}</td>"
                f"<td>{c.amount_satang / 100:.2f}</td><td>{html.escape(c.status)}</td>"
                f"<td>{html.escape(c.created_at.strftime('%H:%M:%S'))}</td><td>{buttons}</td></tr>"
            )
        s = self.stats()
        return (
            "<!doctype html><html><head><meta charset='utf-8'><title>Cloud simulator</title>"
            "<style>body{font-family:sans-serif}td,th{padding:4px 8px;border-bottom:1px solid #ddd}"
            "form{display:inline}</style></head><body><h1>Cloud simulator</h1>"
            f"<p>events: {s['unique']} unique, {s['duplicates']} duplicates, {s['requests']} requests</p>"
            "<table><tr><th>chargeId</th><th>device</th><th>baht</th><th>status</th><th>created</th><th></th></tr>"
            + "".join(rows) + "</table></body></html>"
        )

    # --- answers -----------------------------------------------------------------------------

    def _send(self, h: _Handler, status: int, data: bytes, content_type: str,
              headers: dict[str, str] | None = None) -> None:
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        h.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        if h.close_connection:
            h.send_header("Connection", "close")
        h.end_headers()
        h.wfile.write(data)

    def _json(self, h: _Handler, status: int, doc: Any) -> None:
        self._send(h, status, json.dumps(doc, separators=(",", ":")).encode(), "application/json")

    def _error(self, h: _Handler, status: int, code: str, message: str, path: str) -> None:
        now = dt.datetime.now(dt.UTC)
        self._json(h, status, {"success": False, "errorCode": code, "message": message, "statusCode": status,
                               "timestamp": now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z",
                               "path": path})


# --- command line ----------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sim.cloud", description="Run the cloud simulator.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0: an ephemeral port (printed)")
    ap.add_argument("--site-key", required=True, help="the site's signing key (x-signature)")
    ap.add_argument("--site-id", default=None, help="accept events for this site only (default: any)")
    ap.add_argument("--promptpay-target", default=DEFAULT_PROMPTPAY_TARGET,
                    help="mobile number or tax id the QR strings pay to")
    ap.add_argument("--payment-auto-delay", type=float, default=None, metavar="SEC",
                    help="settle charges automatically after SEC seconds")
    ap.add_argument("--payment-auto-status", default="SUCCEEDED", choices=sorted(FINAL_STATUSES))
    ap.add_argument("--latency", type=float, default=0.0, metavar="SEC", help="artificial latency of API answers")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s cloudsim %(levelname)s %(message)s")
    sim = CloudSim(args.site_key, site_id=args.site_id, host=args.host, port=args.port,
                   promptpay_target=args.promptpay_target, payment_auto_delay_sec=args.payment_auto_delay,
                   payment_auto_status=args.payment_auto_status, latency_sec=args.latency)
    done = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    sim.start()
    print(sim.url, flush=True)
    try:
        done.wait()
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
