"""The fleet's shortcut for checking a command's signature takes and refuses exactly what
`parse_signed_mqtt` does (the firmware's check), with the same reasons."""

from __future__ import annotations

import pytest

from gateway.access.signing import SignatureError, parse_signed_mqtt, sign_mqtt
from sim.fleet import CAR_WASH_CONFIGS, Fleet

KEY = "k" * 32
COMMAND = {"command_id": "cmd-1", "command": "APPLY_CONFIG", "require_ack": True,
           "payload": {"configs": CAR_WASH_CONFIGS}, "timestamp": 1}


def fleet() -> Fleet:
    return Fleet(base_url="http://127.0.0.1:1", mqtt_host="127.0.0.1", mqtt_port=1, key=KEY, count=1)


def outcome(fn, raw: bytes):  # type: ignore[no-untyped-def]
    try:
        return fn(raw)
    except SignatureError as exc:
        return exc.reason


SIGNED = sign_mqtt(COMMAND, KEY)


@pytest.mark.parametrize("raw", [
    SIGNED,
    sign_mqtt({"a": 'with spaces, "quotes" and \\ a backslash'}, KEY),  # whitespace inside strings: the full check
    b'{ "a" : 1 ,' + SIGNED[1:],  # whitespace between tokens
    sign_mqtt(COMMAND, "another key"),
    SIGNED.replace(b'"cmd-1"', b'"cmd-2"'),
    SIGNED.replace(b'"sha256":"', b'"sha256":"0'),
    SIGNED.upper(),
    b'{"sha256":"' + SIGNED[-66:-2] + b'","a":1}',  # signature not last
    b'{"a":"x\\\\","sha256":"00"}',
    b"[1]",
    b"not json",
    b'{"a":1}',
])
def test_same_verdict_as_parse_signed_mqtt(raw: bytes) -> None:
    assert outcome(fleet()._verified, raw) == outcome(lambda r: parse_signed_mqtt(r, KEY), raw)


def test_a_gateway_command_is_accepted() -> None:
    assert fleet()._verified(SIGNED) == COMMAND
