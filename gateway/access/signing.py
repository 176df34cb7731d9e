"""Device signatures (device-api.md §2): HTTP `x-signature` and the MQTT `sha256` member.

HTTP: lowercase hex of SHA256(raw body || key) (`sha256-suffix`, the seed's scheme) or
HMAC-SHA256(key, raw body) (`hmac-sha256`). A request without a body signs its path with the
query string. MQTT: the last member `"sha256"` = SHA256(compact JSON of the message without it,
members in the order sent || key).

Verification works on the bytes received, never on a re-serialisation: for MQTT the compact form
is obtained by deleting insignificant whitespace and the trailing sha256 member from the raw
text, so numbers and escapes stay exactly as the device wrote them. Comparisons are constant-time.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any


class SignatureError(Exception):
    """Why a message was refused; `reason` is a stable word used in counters and logs."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Verdict(enum.Enum):
    OK = "ok"
    MISSING = "missing"
    INVALID = "invalid"


def http_signature(data: bytes, key: str, scheme: str = "sha256-suffix") -> str:
    k = key.encode()
    if scheme == "sha256-suffix":
        return hashlib.sha256(data + k).hexdigest()
    if scheme == "hmac-sha256":
        return hmac.new(k, data, hashlib.sha256).hexdigest()
    raise ValueError(f"unknown signature scheme {scheme!r}")


def verify_http(
    header: str | None,
    *,
    body: bytes,
    path_with_query: str,
    key: str,
    schemes: Iterable[str] = ("sha256-suffix",),
    legacy_empty_body: bool = False,
) -> Verdict:
    """Check an `x-signature` header against the body (or, with no body, the path)."""
    if header is None or not header.strip():
        return Verdict.MISSING
    given = header.strip().lower().encode()
    candidates = [body] if body else [path_with_query.encode()]
    if not body and legacy_empty_body:
        candidates.append(b"")
    ok = False
    for data in candidates:
        for scheme in schemes:
            # Evaluate every candidate so timing does not tell which one matched.
            ok |= hmac.compare_digest(given, http_signature(data, key, scheme).encode())
    return Verdict.OK if ok else Verdict.INVALID


def compact(message: Mapping[str, Any]) -> bytes:
    """The compact JSON the MQTT signature covers: no whitespace, non-ASCII kept as UTF-8."""
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def sign_mqtt(message: Mapping[str, Any], key: str) -> bytes:
    """Serialise `message` compactly with its `sha256` as the last member."""
    body = {k: v for k, v in message.items() if k != "sha256"}
    digest = hashlib.sha256(compact(body) + key.encode()).hexdigest()
    body["sha256"] = digest
    return compact(body)


_JSON_WS = re.compile(rb"[ \t\n\r]")


def _strip_whitespace(raw: bytes) -> bytes:
    """Delete JSON whitespace outside strings, keeping everything else byte for byte."""
    out = bytearray()
    in_string = escaped = False
    for b in raw:
        if in_string:
            out.append(b)
            if escaped:
                escaped = False
            elif b == 0x5C:  # backslash
                escaped = True
            elif b == 0x22:
                in_string = False
        elif b in (0x20, 0x09, 0x0A, 0x0D):
            continue
        else:
            out.append(b)
            if b == 0x22:
                in_string = True
    return bytes(out)


def parse_signed_mqtt(raw: bytes, key: str, *, require: bool = True) -> dict[str, Any]:
    """Parse a device message and verify its signature; return the members without `sha256`.

    Raises SignatureError with reason `not_json`, `not_object`, `missing_signature`,
    `signature_not_last` or `bad_signature`.
    """
    try:
        message = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise SignatureError("not_json", "payload is not JSON") from None
    if not isinstance(message, dict):
        raise SignatureError("not_object", "payload is not a JSON object")
    given = message.pop("sha256", None)
    if not require:
        return message
    if not isinstance(given, str):
        raise SignatureError("missing_signature", "sha256 member missing")
    # Firmware and the gateway send compact JSON: with no whitespace byte anywhere the strip is
    # the identity, and its byte-by-byte loop was most of the check's cost per device message.
    packed = raw if _JSON_WS.search(raw) is None else _strip_whitespace(raw)
    suffix = b',"sha256":"' + given.encode() + b'"}'
    if packed.endswith(suffix):
        covered = packed[: -len(suffix)] + b"}"
    elif packed == b'{"sha256":"' + given.encode() + b'"}':
        covered = b"{}"
    else:
        raise SignatureError("signature_not_last", "sha256 must be the last member")
    expected = hashlib.sha256(covered + key.encode()).hexdigest()
    if not hmac.compare_digest(given.lower().encode(), expected.encode()):
        raise SignatureError("bad_signature", "sha256 does not match")
    return message
