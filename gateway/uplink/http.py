"""The cloud's events endpoint as the drainer uses it: one signed POST of a batch, classified.

Contract
- `EventsClient(url, site_id, key, timeout_sec)` does no I/O. `post(events)` (blocking; the
  drainer's worker thread) sends `{"events": [...]}` (each element the stored event JSON, byte
  for byte) to `{url}/api/v1/gateways/{site_id}/events`, signed `x-signature` =
  sha256(raw body || key), over one keep-alive connection (`timeout_sec` per connect and read;
  a kept-alive connection the server closed meanwhile is retried once at once), and returns an
  `Answer`: `ok` (with the ids in `data.accepted`), `retry` (no connection, timeout, 5xx, 408,
  429, an unreadable answer; with Retry-After in seconds when sent), `channel` (3xx, 401, 403,
  404, 405: the key, site id or URL is wrong, not the event), `reject` (any other 4xx), or
  `stopped` (after `abort()`).
- `abort()` (any thread) makes a blocked send or receive return at once and every later `post()`
  answer `stopped` until `resume()`. `close()` closes the connection.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import urllib.parse
from dataclasses import dataclass

from gateway.access.signing import http_signature

RETRYABLE_4XX = frozenset({408, 429})
CHANNEL_4XX = frozenset({401, 403, 404, 405})  # the site/key/URL is wrong, not the event

_BODY_HEAD = b'{"events":['
_BODY_TAIL = b"]}"
BODY_OVERHEAD = len(_BODY_HEAD) + len(_BODY_TAIL)  # a body is this plus the events and their commas
_STALE_CONNECTION = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError)


@dataclass
class Answer:
    kind: str  # ok | retry | channel | reject | stopped
    error: str = ""
    accepted: frozenset[str] = frozenset()
    retry_after: float | None = None


class EventsClient:
    """One keep-alive HTTP(S) connection to the cloud's events endpoint (see the module docstring)."""

    def __init__(self, url: urllib.parse.SplitResult, site_id: str, key: str, timeout_sec: float) -> None:
        self._url = url
        self._key = key
        self._timeout = timeout_sec
        prefix = url.path.rstrip("/")
        self.path = f"{prefix}/api/v1/gateways/{urllib.parse.quote(site_id, safe='')}/events"
        self._conn: http.client.HTTPConnection | None = None
        self._conn_lock = threading.Lock()  # another thread aborts the worker's connection
        self._stopping = threading.Event()

    def resume(self) -> None:
        """Allow posts again after `abort()`."""
        self._stopping.clear()

    def abort(self) -> None:
        """Any thread: later posts answer `stopped`, a blocked one returns at once."""
        self._stopping.set()
        with self._conn_lock:
            sock = self._conn.sock if self._conn is not None else None
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with self._conn_lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    def _connection(self) -> http.client.HTTPConnection:
        with self._conn_lock:
            if self._conn is None:
                host, port = self._url.hostname or "", self._url.port
                if self._url.scheme == "https":
                    self._conn = http.client.HTTPSConnection(host, port, timeout=self._timeout)
                else:
                    self._conn = http.client.HTTPConnection(host, port, timeout=self._timeout)
            return self._conn

    def post(self, events: list[bytes]) -> Answer:
        """Send one batch and classify the answer (blocking)."""
        if self._stopping.is_set():
            return Answer("stopped")
        body = _BODY_HEAD + b",".join(events) + _BODY_TAIL
        headers = {"Content-Type": "application/json", "x-signature": http_signature(body, self._key)}
        for attempt in (1, 2):
            reused = self._conn is not None
            conn = self._connection()
            try:
                if conn.sock is None:
                    conn.connect()
                    # http.client writes headers and body separately: without this, Nagle and the
                    # peer's delayed ACK add ~40 ms to every request.
                    sock: socket.socket = conn.sock  # type: ignore[assignment]  # set by connect()
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                conn.request("POST", self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if self._stopping.is_set():  # aborted by the drainer's end: not a cloud failure
                    return Answer("stopped")
                # A kept-alive connection the server closed meanwhile: one immediate retry.
                if reused and attempt == 1 and isinstance(exc, _STALE_CONNECTION):
                    continue
                return Answer("retry", f"cannot reach the cloud: {type(exc).__name__}: {exc}".rstrip(": "))
            if resp.will_close:
                self.close()
            return classify(resp.status, resp.getheader("Retry-After"), data)
        raise AssertionError("unreachable")


def classify(status: int, retry_after_header: str | None, data: bytes) -> Answer:
    """The drainer's reading of an HTTP answer (pure)."""
    if 200 <= status < 300:
        try:
            doc = json.loads(data)
            accepted = doc["data"]["accepted"]
            if doc.get("success") is not True or not isinstance(accepted, list):
                raise ValueError("no accepted list")
            return Answer("ok", accepted=frozenset(a for a in accepted if isinstance(a, str)))
        except (ValueError, KeyError, TypeError) as exc:
            return Answer("retry", f"HTTP {status} with an unreadable answer: {exc}")
    error = f"HTTP {status}"
    try:
        doc = json.loads(data)
        if isinstance(doc, dict):
            error += f" {doc.get('errorCode', '')}: {doc.get('message', '')}".rstrip(": ")
    except ValueError:
        if data:
            error += f": {data[:200].decode(errors='replace')}"
    retry_after: float | None = None
    if retry_after_header:
        try:
            retry_after = max(0.0, float(retry_after_header))
        except ValueError:
            retry_after = None  # an HTTP date: our own backoff will do
    if status >= 500 or status in RETRYABLE_4XX:
        return Answer("retry", error, retry_after=retry_after)
    if 400 <= status < 500 and status not in CHANNEL_4XX:
        return Answer("reject", error)
    return Answer("channel", error, retry_after=retry_after)
