"""Signatures against the spec's vectors (shared/spec/vectors.json), both schemes, both channels."""

from __future__ import annotations

import hashlib
import json
import re
from importlib import resources

import pytest

from gateway.access import signing
from gateway.access.signing import (
    SignatureError,
    Verdict,
    compact,
    http_signature,
    parse_signed_mqtt,
    sign_mqtt,
    verify_http,
)
from tests.conftest import SHARED_SPEC

V = json.loads(resources.files("gateway").joinpath("data/spec-vectors.json").read_text())
KEY = V["secret_key"]


def test_shipped_vectors_are_the_specs() -> None:
    # The package ships a copy (the demo signs with its test key); it must not drift.
    if not SHARED_SPEC.is_dir():
        pytest.skip(f"{SHARED_SPEC} not beside this checkout")
    assert json.loads((SHARED_SPEC / "vectors.json").read_text()) == V


def test_http_vectors() -> None:
    body = V["http_sha256_suffix"]["body"].encode()
    assert http_signature(body, KEY) == V["http_sha256_suffix"]["x-signature"]
    assert http_signature(body, KEY, "hmac-sha256") == V["http_hmac_sha256"]["x-signature"]
    assert http_signature(V["http_get_path"]["path"].encode(), KEY) == V["http_get_path"]["x-signature"]


def test_verify_http_schemes_case_and_failures() -> None:
    body = V["http_sha256_suffix"]["body"].encode()
    sig = V["http_sha256_suffix"]["x-signature"]
    hmac_sig = V["http_hmac_sha256"]["x-signature"]
    args = {"body": body, "path_with_query": "/api/v1/devices/need-register", "key": KEY}
    assert verify_http(sig, **args) is Verdict.OK
    assert verify_http(sig.upper(), **args) is Verdict.OK
    assert verify_http(None, **args) is Verdict.MISSING
    assert verify_http("  ", **args) is Verdict.MISSING
    assert verify_http(hmac_sig, **args) is Verdict.INVALID  # hmac not enabled by default
    assert verify_http(hmac_sig, schemes=("sha256-suffix", "hmac-sha256"), **args) is Verdict.OK
    assert verify_http(hmac_sig, schemes=("hmac-sha256",), **args) is Verdict.OK
    assert verify_http(sig, schemes=("hmac-sha256",), **args) is Verdict.INVALID
    assert verify_http(sig, **{**args, "body": body + b" "}) is Verdict.INVALID
    assert verify_http(sig, **{**args, "key": KEY + "x"}) is Verdict.INVALID


def test_verify_http_without_body_signs_the_path() -> None:
    path = V["http_get_path"]["path"]
    sig = V["http_get_path"]["x-signature"]
    assert verify_http(sig, body=b"", path_with_query=path, key=KEY) is Verdict.OK
    assert verify_http(sig, body=b"", path_with_query=path + "?x=1", key=KEY) is Verdict.INVALID
    empty = hashlib.sha256(KEY.encode()).hexdigest()
    assert verify_http(empty, body=b"", path_with_query=path, key=KEY) is Verdict.INVALID
    assert verify_http(empty, body=b"", path_with_query=path, key=KEY, legacy_empty_body=True) is Verdict.OK


def test_mqtt_vector_sign_and_verify() -> None:
    mv = V["mqtt_ack"]
    msg = mv["message_without_sha256"]
    assert compact(msg).decode() == mv["compact"]
    signed = sign_mqtt(msg, KEY)
    assert json.loads(signed)["sha256"] == mv["sha256"]
    assert list(json.loads(signed))[-1] == "sha256"
    assert parse_signed_mqtt(signed, KEY) == msg


def test_mqtt_verify_uses_bytes_as_sent() -> None:
    mv = V["mqtt_ack"]
    # Pretty-printed by the device: whitespace outside strings is not part of the signed form.
    pretty = json.dumps({**mv["message_without_sha256"], "sha256": mv["sha256"]}, indent=2).encode()
    assert parse_signed_mqtt(pretty, KEY)["command_id"] == mv["message_without_sha256"]["command_id"]
    # Numbers stay as written: 1.0 signed as "1.0" verifies (a re-serialisation could differ).
    raw = b'{"rssi":-76,"ratio":1.0,"note":"a b","sha256":"'
    digest = hashlib.sha256(b'{"rssi":-76,"ratio":1.0,"note":"a b"}' + KEY.encode()).hexdigest()
    assert parse_signed_mqtt(raw + digest.encode() + b'"}', KEY)["ratio"] == 1.0
    # Non-ASCII kept as UTF-8.
    thai = {"name": "ล้างรถ", "n": 1}
    assert parse_signed_mqtt(sign_mqtt(thai, KEY), KEY) == thai


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not_json"),
        (b"\xff\xfe", "not_json"),
        (b"[1,2]", "not_object"),
        (b'{"a":1}', "missing_signature"),
        (b'{"sha256":"00","a":1}', "signature_not_last"),
        (b'{"a":1,"sha256":"' + b"0" * 64 + b'"}', "bad_signature"),
    ],
)
def test_mqtt_rejections(raw: bytes, reason: str) -> None:
    with pytest.raises(SignatureError) as err:
        parse_signed_mqtt(raw, KEY)
    assert err.value.reason == reason


def test_mqtt_any_changed_byte_fails() -> None:
    signed = sign_mqtt(V["mqtt_ack"]["message_without_sha256"], KEY)
    cut = signed.index(b',"sha256"')
    for i in range(1, cut - 1):
        changed = bytearray(signed)
        changed[i] = ord("x") if changed[i] != ord("x") else ord("y")
        with pytest.raises(SignatureError):
            parse_signed_mqtt(bytes(changed), KEY)


def test_mqtt_signature_off_accepts_unsigned() -> None:
    assert parse_signed_mqtt(b'{"a":1}', KEY, require=False) == {"a": 1}


COMPACT_CMD = {"command_id": "cmd-1", "command": "APPLY_CONFIG", "require_ack": True,
               "payload": {"configs": {"machine": {"ACTIVE": True}}}, "timestamp": 1}
COMPACT = sign_mqtt(COMPACT_CMD, KEY)


@pytest.mark.parametrize("raw", [
    COMPACT,
    sign_mqtt({"a": 'with spaces, "quotes" and \\ a backslash'}, KEY),  # whitespace inside strings
    b'{ "a" : 1 ,' + COMPACT[1:],  # whitespace between tokens
    sign_mqtt(COMPACT_CMD, "another key"),
    COMPACT.replace(b'"cmd-1"', b'"cmd-2"'),
    COMPACT.replace(b'"sha256":"', b'"sha256":"0'),
    COMPACT.upper(),
    b'{"sha256":"' + COMPACT[-66:-2] + b'","a":1}',  # signature not last
    b'{"a":"x\\\\","sha256":"00"}',
    b"[1]",
    b"not json",
    b'{"a":1}',
])
def test_compact_messages_skip_the_strip_with_the_same_verdict(raw: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    """A message without whitespace skips the byte-by-byte strip: same result and same reason as
    when every message goes through it."""
    def outcome() -> object:
        try:
            return parse_signed_mqtt(raw, KEY)
        except SignatureError as exc:
            return exc.reason

    fast = outcome()
    monkeypatch.setattr(signing, "_JSON_WS", re.compile(rb""))  # matches everywhere: always strip
    assert outcome() == fast
