"""Property tests (hypothesis) of the parsers and codecs that face untrusted input: signatures,
MQTT payloads, EMV QR data, PLC register decoding, ACK parsing, configuration files. Any input either parses or fails
with the module's own error naming the problem; any change to signed bytes is caught."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from hypothesis import example, given, settings, strategies as st

from gateway.access.signing import SignatureError, Verdict, http_signature, parse_signed_mqtt, sign_mqtt, verify_http
from gateway.commands.tracker import parse_ack
from gateway.config import Config, ConfigError, load_config
from gateway.devices.validate import Invalid
from gateway.payments.promptpay import build_promptpay, check_emv
from plc.profile import DecodeError, builtin_profiles, decode_status
from tests.conftest import REPO

KEY = "modernchabackdoor"
json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=4), max_leaves=12)


@settings(max_examples=300, deadline=None)
@given(body=st.binary(min_size=1, max_size=300), pos=st.integers(min_value=0), flip=st.integers(1, 255))
def test_http_signature_any_byte_change_fails(body: bytes, pos: int, flip: int) -> None:
    sig = http_signature(body, KEY)
    assert verify_http(sig, body=body, path_with_query="/x", key=KEY) is Verdict.OK
    i = pos % len(body)
    changed = body[:i] + bytes([body[i] ^ flip]) + body[i + 1:]
    assert verify_http(sig, body=changed, path_with_query="/x", key=KEY) is Verdict.INVALID


@settings(max_examples=300, deadline=None)
@given(msg=st.dictionaries(st.text(min_size=1, max_size=10).filter(lambda k: k != "sha256"), json_values, max_size=6))
def test_mqtt_signature_round_trip_and_tamper(msg: dict) -> None:
    raw = sign_mqtt(msg, KEY)
    assert parse_signed_mqtt(raw, KEY) == json.loads(json.dumps(msg))
    body = json.loads(raw)
    body["tampered"] = 1  # anything added (or changed) before the signature breaks it
    tampered = json.dumps({k: v for k, v in body.items() if k != "sha256"} | {"sha256": body["sha256"]}).encode()
    try:
        parse_signed_mqtt(tampered, KEY)
    except SignatureError as exc:
        assert exc.reason == "bad_signature"
    else:
        raise AssertionError("a tampered message was accepted")


@settings(max_examples=500, deadline=None)
@given(raw=st.binary(max_size=400))
def test_mqtt_parser_takes_any_bytes(raw: bytes) -> None:
    try:
        parse_signed_mqtt(raw, KEY)
    except SignatureError as exc:
        assert exc.reason in ("not_json", "not_object", "missing_signature", "signature_not_last", "bad_signature")


@settings(max_examples=300, deadline=None)
@given(amount=st.integers(1, 10_000_000), ref=st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=1, max_size=20),
       pos=st.integers(min_value=0), char=st.sampled_from("0123456789ABCDEF"))
def test_emv_crc_catches_any_single_change(amount: int, ref: str, pos: int, char: str) -> None:
    raw = build_promptpay("0812345678", amount, ref)
    check_emv(raw)
    i = pos % len(raw)
    if raw[i] == char:
        return
    changed = raw[:i] + char + raw[i + 1:]
    try:
        check_emv(changed)
    except ValueError:
        return
    raise AssertionError(f"a changed QR string passed the check: {changed}")


@settings(max_examples=500, deadline=None)
@given(regs=st.lists(st.integers(0, 0xFFFF), min_size=8, max_size=8))
def test_register_decoding_takes_any_words(regs: list[int]) -> None:
    profile = builtin_profiles()["washbay-v1"]
    try:
        status = decode_status(profile, regs)
    except DecodeError:
        return
    assert 0 <= status.progress <= 100 and status.state in profile.states.values()


@settings(max_examples=300, deadline=None)
@given(msg=st.dictionaries(st.sampled_from(["command_id", "device_id", "command", "status", "error", "new_version",
                                            "progress", "bytes", "x"]), json_values, max_size=9))
def test_ack_parser_takes_any_object(msg: dict) -> None:
    try:
        ack = parse_ack("device-1", msg)
    except Invalid as exc:
        assert exc.field
    else:
        assert ack.device_id == "device-1" and ack.status in ("SUCCESS", "FAILED", "PROGRESS", "ERROR")



EXAMPLE = REPO / "gateway" / "data" / "gateway.example.toml"


def _example_keys() -> list[tuple[str, str]]:
    """(section, key) of every `key = value` line of the example outside arrays of tables."""
    keys, section = [], ""
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("["):
            section = "" if line.startswith("[[") else line.strip("[] ")
        elif section and " = " in line and not line.startswith("#"):
            keys.append((section, line.split(" = ", 1)[0]))
    return keys


def _with_value(section: str, key: str, literal: str) -> str:
    out, current = [], ""
    for line in EXAMPLE.read_text().splitlines():
        if line.startswith("["):
            current = "" if line.startswith("[[") else line.strip("[] ")
        elif current == section and line.startswith(f"{key} = "):
            line = f"{key} = {literal}"
        out.append(line)
    return "\n".join(out) + "\n"


toml_literals = (st.booleans().map(lambda b: str(b).lower()) | st.integers(-2**40, 2**40).map(str)
                 | st.floats(allow_nan=False, allow_infinity=False).map(repr)
                 | st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=30).map(
                     lambda t: json.dumps(t, ensure_ascii=False))
                 | st.lists(st.text("abc-_.0123456789", max_size=8), max_size=3).map(json.dumps))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(where=st.sampled_from(_example_keys()), literal=toml_literals)
@example(where=("cloud.bridge", "enabled"), literal="true")  # the error names cloud.bridge.host
def test_config_any_value_for_any_key_loads_or_names_that_key(where: tuple[str, str], literal: str) -> None:
    """The example with one key set to anything: it loads, or the one-line error names that key
    (or, for a rule between two keys, names the key it depends on)."""
    section, key = where
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gateway.toml"
        path.write_text(_with_value(section, key, literal))
        try:
            assert isinstance(load_config(path), Config)
        except ConfigError as exc:
            # Or a rule between two keys names the other one and says which key it depends on.
            name = f"{section}.{key}"
            assert exc.key.startswith(name) or name in exc.problem, (literal, str(exc))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(raw=st.binary(max_size=300))
@example(raw=b"\x80")  # not UTF-8: tomllib let UnicodeDecodeError through (a traceback, not one line)
def test_config_any_bytes_load_or_fail_with_a_config_error(raw: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gateway.toml"
        path.write_bytes(raw)
        try:
            load_config(path)
        except ConfigError as exc:
            assert str(exc).startswith(str(path))
