"""PromptPay EMVCo strings: CRC-16/CCITT-FALSE, building, checking, and the cloud's amount JSON.

The reference strings are published examples: the test suite of the widely used `promptpay-qr`
npm package (dtinth/promptpay-qr, index.test.js) and the cloud's rawData of the seed
(device-communication.md, also in spec-vectors.json). Our builder writes tags in ascending order
(as the seed's cloud does) while promptpay-qr writes 58 before 53, so a built string is compared
to the published one tag by tag, and its own CRC is checked independently.
"""

from __future__ import annotations

import binascii
import json
from importlib import resources

import pytest

from gateway.payments.promptpay import (
    build_promptpay,
    check_emv,
    crc16_ccitt,
    decimal_js,
    format_baht,
    parse_tlv,
    satang_from_decimal_js,
)

# (target, amount in satang, published string) from dtinth/promptpay-qr's tests.
PUBLISHED = [
    ("0801234567", None, "00020101021129370016A000000677010111011300668012345675802TH530376463046197"),
    ("080-123-4567", None, "00020101021129370016A000000677010111011300668012345675802TH530376463046197"),
    ("+66-89-123-4567", None, "00020101021129370016A000000677010111011300668912345675802TH5303764630429C1"),
    ("1111111111111", None, "00020101021129370016A000000677010111021311111111111115802TH530376463047B5A"),
    ("1-1111-11111-11-1", None, "00020101021129370016A000000677010111021311111111111115802TH530376463047B5A"),
    ("0123456789012", None, "00020101021129370016A000000677010111021301234567890125802TH530376463040CBD"),
    ("000-000-0000", 422, "00020101021229370016A000000677010111011300660000000005802TH530376454044.226304E469"),
]
SEED_RAW = json.loads(resources.files("gateway").joinpath("data/spec-vectors.json").read_text())[
    "emv_promptpay_rawdata"]["rawData"]


def test_crc16_ccitt_false_check_value() -> None:
    # The catalogue check value of CRC-16/CCITT-FALSE (a.k.a. CRC-16/IBM-3740).
    assert crc16_ccitt(b"123456789") == 0x29B1
    assert crc16_ccitt(b"") == 0xFFFF
    for data in (b"A", b"\x00\xff" * 50, SEED_RAW.encode()):
        assert crc16_ccitt(data) == binascii.crc_hqx(data, 0xFFFF)


@pytest.mark.parametrize("raw", sorted({p[2] for p in PUBLISHED} | {SEED_RAW}))
def test_published_strings_have_our_crc(raw: str) -> None:
    assert crc16_ccitt(raw[:-4].encode()) == int(raw[-4:], 16)
    check_emv(raw)


@pytest.mark.parametrize(("target", "amount", "published"), PUBLISHED)
def test_built_string_matches_published_tags(target: str, amount: int | None, published: str) -> None:
    built = build_promptpay(target, amount)
    check_emv(built)
    ours, theirs = dict(parse_tlv(built)), dict(parse_tlv(published))
    del ours["63"], theirs["63"]
    assert ours == theirs
    tags = [t for t, _ in parse_tlv(built)]
    assert tags == sorted(tags[:-1]) + ["63"]  # ascending, CRC last
    assert built.endswith("6304" + f"{crc16_ccitt(built[:-4].encode()):04X}")


def _crc_hqx(body: str) -> str:
    # binascii's CRC-CCITT (poly 0x1021, MSB first) with init 0xFFFF is CRC-16/CCITT-FALSE:
    # an implementation independent of ours.
    return f"{binascii.crc_hqx(body.encode(), 0xFFFF):04X}"


def test_exact_strings_of_our_layout() -> None:
    static = ("000201" "010211" "2937" "0016A000000677010111" "01130066801234567" "5303764" "5802TH" "6304")
    assert build_promptpay("0801234567", None) == static + _crc_hqx(static)
    dynamic = ("000201" "010212" "2937" "0016A000000677010111" "01130066812345678" "5303764" "54041.00"
               "5802TH" "6228" "0524CCW-1758650767283-JY1R54" "6304")
    assert build_promptpay("0812345678", 100, "CCW-1758650767283-JY1R54") == dynamic + _crc_hqx(dynamic)


def test_dynamic_amount_reference_and_wallet() -> None:
    raw = build_promptpay("0812345678", 123456, "REF-1")
    tags = dict(parse_tlv(raw))
    assert tags["01"] == "12"
    assert tags["54"] == "1234.56"
    assert tags["62"] == "0505REF-1"
    assert tags["29"] == "0016A000000677010111" + "01130066812345678"
    wallet = dict(parse_tlv(build_promptpay("123456789012345", 1)))
    assert wallet["29"].endswith("0315123456789012345")
    assert wallet["54"] == "0.01"
    assert format_baht(10_000_000) == "100000.00"


@pytest.mark.parametrize(("target", "amount", "reference", "match"), [
    ("12345", 100, None, "expected a mobile number"),
    ("08-ABC-1234", 100, None, "only digits"),
    ("+1 555 123 4567", 100, None, "only Thai"),
    ("0812345678", 0, None, "between 1 and"),
    ("0812345678", -5, None, "between 1 and"),
    ("0812345678", True, None, "integer"),
    ("0812345678", 100, "", "reference"),
    ("0812345678", 100, "x" * 26, "reference"),
    ("0812345678", 100, "บาท", "reference"),
])
def test_build_refuses(target: str, amount: int, reference: str | None, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        build_promptpay(target, amount, reference)


def test_check_emv_names_the_problem() -> None:
    good = build_promptpay("0812345678", 2500)
    check_emv(good)
    check_emv(good[:-4] + good[-4:].lower())  # hex case does not matter
    bad_crc = good[:-4] + ("0000" if good[-4:] != "0000" else "0001")
    with pytest.raises(ValueError, match="incorrect CRC"):
        check_emv(bad_crc)
    # A changed amount with the old CRC: the CRC catches it.
    with pytest.raises(ValueError, match="incorrect CRC"):
        check_emv(good.replace("540525.00", "540599.00"))
    with pytest.raises(ValueError, match="missing CRC"):
        check_emv(good[:-8])
    with pytest.raises(ValueError, match="must be the last tag"):
        body = good[:-8] + "6304" + good[-4:] + "5903ABC"
        check_emv(body)
    with pytest.raises(ValueError, match="bad TLV structure"):
        check_emv(good[:-9])  # truncated inside a value
    with pytest.raises(ValueError, match="bad TLV structure"):
        check_emv("00020101021229X7" + good[16:])
    with pytest.raises(ValueError, match="must start with tag 00"):
        body = "01021200020153037646304"
        check_emv(body + f"{crc16_ccitt(body.encode()):04X}")
    with pytest.raises(ValueError, match="inside tag 29"):
        body = "000201010212" + "2905" + "00991" + "6304"
        check_emv(body + f"{crc16_ccitt(body.encode()):04X}")
    with pytest.raises(ValueError, match="appears twice"):
        body = "000201" + "5303764" + "5303764" + "6304"
        check_emv(body + f"{crc16_ccitt(body.encode()):04X}")
    with pytest.raises(ValueError, match="4 hex digits"):
        check_emv(good[:-4] + "12G4")
    with pytest.raises(ValueError, match="empty"):
        check_emv("")


@pytest.mark.parametrize(("satang", "expected"), [
    (100, {"s": 1, "e": 0, "d": [1]}),  # the seed: 1.00 baht
    (1250, {"s": 1, "e": 1, "d": [12, 5000000]}),
    (50, {"s": 1, "e": -1, "d": [5000000]}),
    (5, {"s": 1, "e": -2, "d": [500000]}),
    (123456789, {"s": 1, "e": 6, "d": [1234567, 8900000]}),
    (1_000_000_000, {"s": 1, "e": 7, "d": [1]}),
    (1_234_567_891, {"s": 1, "e": 7, "d": [1, 2345678, 9100000]}),
    (0, {"s": 1, "e": 0, "d": [0]}),
    (-250, {"s": -1, "e": 0, "d": [2, 5000000]}),
])
def test_decimal_js_amounts(satang: int, expected: dict[str, object]) -> None:
    assert decimal_js(satang) == expected
    assert satang_from_decimal_js(expected) == satang


@pytest.mark.parametrize("obj", [
    {"s": 1, "e": 0},
    {"s": 2, "e": 0, "d": [1]},
    {"s": 1, "e": 1, "d": [1]},  # exponent does not match the digits
    {"s": 1, "e": -3, "d": [50000]},  # 0.005 baht: half a satang
    {"s": 1, "e": 0, "d": [10_000_000]},
    [1, 0, [1]],
])
def test_decimal_js_refuses(obj: object) -> None:
    with pytest.raises(ValueError):
        satang_from_decimal_js(obj)
