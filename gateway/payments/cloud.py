"""The cloud's payments API, blocking (call from a worker thread): create a charge, read its status.

Requests are signed like the uplink (`x-signature` = sha256(raw body || cloud_key); a GET signs its
path). `CloudUnavailable` covers everything that says "the cloud cannot answer now" (no route,
refused, timeout, 5xx, an unreadable answer); `CloudRefused` is a 4xx with the cloud's envelope.
"""

from __future__ import annotations

import http.client
import json
import socket
import urllib.parse
from typing import Any

from gateway.access.signing import http_signature

PAYMENTS_PATH = "/api/v1/payment-gateway/payments"


class CloudUnavailable(Exception):
    pass


class CloudRefused(Exception):
    def __init__(self, status: int, answer: dict[str, Any]) -> None:
        self.status = status
        self.answer = answer
        super().__init__(f"cloud refused with {status}: {answer.get('message', '')}")


class PaymentsClient:
    def __init__(self, url: str, key: str, timeout: float) -> None:
        parts = urllib.parse.urlsplit(url)
        self._https = parts.scheme == "https"
        self._host = parts.hostname or ""
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._key = key
        self.timeout = timeout

    def _request(self, method: str, path: str, body: bytes | None) -> dict[str, Any]:
        full = self._prefix + path
        signature = http_signature(body if body is not None else full.encode(), self._key)
        headers = {"x-signature": signature, "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=self.timeout)
        try:
            conn.connect()
            # Headers and body may leave in two segments: without NODELAY, Nagle and the peer's
            # delayed ACK add 40 ms to every call.
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.request(method, full, body=body, headers=headers)
            resp = conn.getresponse()
            raw = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            raise CloudUnavailable(f"{type(exc).__name__}: {exc}") from None
        finally:
            conn.close()
        try:
            answer = json.loads(raw)
            if not isinstance(answer, dict):
                raise ValueError("not an object")
        except ValueError:
            raise CloudUnavailable(f"unreadable answer ({resp.status})") from None
        if resp.status >= 500 or resp.status in (408, 429):
            raise CloudUnavailable(f"cloud answered {resp.status}")
        if resp.status >= 400:
            raise CloudRefused(resp.status, answer)
        return answer

    def create(self, body: bytes) -> dict[str, Any]:
        """Forward the device's request body as received; the cloud's whole answer."""
        return self._request("POST", PAYMENTS_PATH, body)

    def status(self, charge_id: str) -> str:
        answer = self._request("GET", f"{PAYMENTS_PATH}/{urllib.parse.quote(charge_id)}/status", None)
        status = (answer.get("data") or {}).get("status")
        if not isinstance(status, str):
            raise CloudUnavailable("status answer without data.status")
        return status
