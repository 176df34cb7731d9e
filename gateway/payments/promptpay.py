"""Thai PromptPay QR strings (EMVCo merchant-presented mode) and the cloud's amount format.

Pure functions, no I/O:

- `crc16_ccitt(data)`: CRC-16/CCITT-FALSE (poly 0x1021, init 0xFFFF, no reflection, no final
  xor), the checksum EMVCo puts in tag 63. Check value: `crc16_ccitt(b"123456789") == 0x29B1`.
- `build_promptpay(target, amount_satang, reference)`: a PromptPay "credit transfer" QR string
  (tag 29, AID A000000677010111) for a mobile number, a 13-digit national/tax id or a 15-digit
  e-wallet id. Tags are written in ascending order (as the cloud's own strings in the seed are):
  00 "01", 01 "12" (dynamic, one payment) when an amount is given or "11" (static) without one,
  29, 53 "764" (THB), 54 amount in baht with two decimals, 58 "TH", 62 (sub-tag 05, reference
  label) when a reference is given, 63 CRC over everything before it including "6304".
- `parse_tlv(raw)` / `check_emv(raw)`: structure and CRC checks of a received string, raising
  ValueError naming the problem (what the gateway does before relaying a cloud's rawData).
- `decimal_js(satang)` / `satang_from_decimal_js(obj)`: the `{"s", "e", "d"}` amount of the
  seed's payment response, which is decimal.js's JSON of the amount in baht (the cloud runs
  Node with Prisma decimals): sign, decimal exponent of the leading digit, digits in base-10^7
  words aligned on the decimal point, trailing zero words removed.
"""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

PROMPTPAY_AID = "A000000677010111"  # PromptPay credit transfer (Bank of Thailand)
CURRENCY_THB = "764"
COUNTRY_TH = "TH"
MAX_AMOUNT_SATANG = 99_999_999_999  # tag 54 holds at most 13 characters: 999999999.99

# Templates whose value is itself a TLV list: merchant account information (26-51) and the
# additional data field (62). Other tags are opaque strings.
_NESTED_TAGS = frozenset({f"{t:02d}" for t in range(26, 52)} | {"62"})
_REFERENCE_RE = re.compile(r"^[\x20-\x7E]{1,25}\Z")  # EMV "ans", at most 25 characters


def crc16_ccitt(data: bytes) -> int:
    """CRC-16/CCITT-FALSE of `data` (poly 0x1021, init 0xFFFF), as EMVCo tag 63 requires."""
    crc = 0xFFFF
    for byte in data:
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
            crc &= 0xFFFF
    return crc


def _tlv(tag: str, value: str) -> str:
    if len(value) > 99:
        raise ValueError(f"tag {tag}: value longer than 99 characters")
    return f"{tag}{len(value):02d}{value}"


def _proxy(target: str) -> tuple[str, str]:
    """(sub-tag, value) of tag 29 for a phone number, national/tax id or e-wallet id."""
    text = target.strip()
    digits = re.sub(r"[\s-]", "", text)
    international = digits.startswith("+")
    digits = digits.lstrip("+")
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"PromptPay target {target!r} must contain only digits, spaces, '-' and a leading '+'")
    if international or (len(digits) == 11 and digits.startswith("66")):
        if not (digits.startswith("66") and len(digits) == 11):
            raise ValueError(f"PromptPay target {target!r}: only Thai (+66) mobile numbers are accepted")
        return "01", "00" + digits  # 0066 + 9 digits
    if len(digits) == 10 and digits.startswith("0"):
        return "01", "0066" + digits[1:]
    if len(digits) == 13:
        return "02", digits  # national id or tax id
    if len(digits) == 15:
        return "03", digits  # e-wallet id
    raise ValueError(
        f"PromptPay target {target!r}: expected a mobile number (0XXXXXXXXX or +66XXXXXXXXX), "
        "a 13-digit national/tax id or a 15-digit e-wallet id"
    )


def format_baht(amount_satang: int) -> str:
    """`100` → `"1.00"`: satang as baht with two decimals, the form of tag 54."""
    return f"{amount_satang // 100}.{amount_satang % 100:02d}"


def build_promptpay(target: str, amount_satang: int | None, reference: str | None = None) -> str:
    """A complete PromptPay QR string with its CRC.

    `target`: mobile number, 13-digit national/tax id or 15-digit e-wallet id.
    `amount_satang`: positive integer, or None for a static QR without amount.
    `reference`: optional label (1-25 printable ASCII characters) in tag 62, sub-tag 05.
    Raises ValueError for an impossible target, amount or reference.
    """
    sub, proxy = _proxy(target)
    parts = [_tlv("00", "01")]
    if amount_satang is None:
        parts.append(_tlv("01", "11"))
    else:
        if isinstance(amount_satang, bool) or not isinstance(amount_satang, int):
            raise ValueError("amount_satang must be an integer number of satang")
        if not 1 <= amount_satang <= MAX_AMOUNT_SATANG:
            raise ValueError(f"amount_satang must be between 1 and {MAX_AMOUNT_SATANG}, got {amount_satang}")
        parts.append(_tlv("01", "12"))
    parts.append(_tlv("29", _tlv("00", PROMPTPAY_AID) + _tlv(sub, proxy)))
    parts.append(_tlv("53", CURRENCY_THB))
    if amount_satang is not None:
        parts.append(_tlv("54", format_baht(amount_satang)))
    parts.append(_tlv("58", COUNTRY_TH))
    if reference is not None:
        if not _REFERENCE_RE.match(reference):
            raise ValueError("reference must be 1-25 printable ASCII characters")
        parts.append(_tlv("62", _tlv("05", reference)))
    body = "".join(parts) + "6304"
    return body + f"{crc16_ccitt(body.encode('utf-8')):04X}"


def parse_tlv(raw: str, *, where: str = "") -> list[tuple[str, str]]:
    """Split an EMV TLV string into (tag, value) pairs, in order; ValueError on bad structure.

    Lengths count characters. Nested templates (26-51, 62) are checked recursively but returned
    as their raw value.
    """
    items: list[tuple[str, str]] = []
    seen: set[str] = set()
    pos = 0
    while pos < len(raw):
        head = raw[pos:pos + 4]
        if len(head) < 4 or not head.isdigit() or not head.isascii():
            raise ValueError(f"bad TLV structure{where} at offset {pos}: expected 2-digit tag and 2-digit length, "
                             f"got {head!r}")
        tag, length = head[:2], int(head[2:])
        value = raw[pos + 4:pos + 4 + length]
        if len(value) != length or length == 0:
            raise ValueError(f"bad TLV structure{where}: tag {tag} declares length {length}, "
                             f"{len(value)} character(s) left")
        if tag in seen:
            raise ValueError(f"bad TLV structure{where}: tag {tag} appears twice")
        seen.add(tag)
        if not where and tag in _NESTED_TAGS:
            parse_tlv(value, where=f" inside tag {tag}")
        items.append((tag, value))
        pos += 4 + length
    return items


def check_emv(raw: str) -> None:
    """Raise ValueError naming the problem unless `raw` is a well-formed EMVCo QR string whose
    tag 00 is "01" and whose last tag is 63 with the correct CRC (hex, either case)."""
    if not raw:
        raise ValueError("empty EMV string")
    if not raw.isascii():
        raise ValueError("EMV string contains non-ASCII characters")
    items = parse_tlv(raw)
    if items[0] != ("00", "01"):
        raise ValueError(f"bad TLV structure: must start with tag 00 = '01', got tag {items[0][0]} "
                         f"= {items[0][1]!r}")
    tags = [t for t, _ in items]
    if "63" not in tags:
        raise ValueError("missing CRC (tag 63)")
    if tags[-1] != "63":
        raise ValueError("CRC (tag 63) must be the last tag")
    given = items[-1][1]
    if len(given) != 4 or not re.fullmatch(r"[0-9A-Fa-f]{4}", given):
        raise ValueError(f"CRC (tag 63) must be 4 hex digits, got {given!r}")
    expected = crc16_ccitt(raw[:-4].encode("ascii"))
    if int(given, 16) != expected:
        raise ValueError(f"incorrect CRC: tag 63 says {given.upper()}, computed {expected:04X}")


# --- the cloud's amount format (decimal.js JSON) ----------------------------------------------

_WORD = 10**7  # decimal.js LOG_BASE = 7


def decimal_js(amount_satang: int) -> dict[str, Any]:
    """The amount (given in satang) in baht as decimal.js serialises it: `100` → `{"s": 1, "e": 0,
    "d": [1]}`, `1250` → `{"s": 1, "e": 1, "d": [12, 5000000]}`."""
    if isinstance(amount_satang, bool) or not isinstance(amount_satang, int):
        raise TypeError("amount_satang must be an integer")
    sign = -1 if amount_satang < 0 else 1
    value = Decimal(abs(amount_satang)).scaleb(-2)
    if value == 0:
        return {"s": 1, "e": 0, "d": [0]}
    exponent = value.adjusted()
    # Word k holds the digits of 10^(7k) .. 10^(7k+6); the top word is the one of the leading digit.
    k = exponent // 7
    words: list[int] = []
    rest = value
    while rest != 0:
        word = int(rest.scaleb(-7 * k)) % _WORD
        words.append(word)
        rest -= Decimal(word).scaleb(7 * k)
        k -= 1
    return {"s": sign, "e": exponent, "d": words}


def satang_from_decimal_js(obj: Any) -> int:
    """Inverse of `decimal_js`; ValueError for a malformed object or a fraction of a satang."""
    if not isinstance(obj, dict) or set(obj) != {"s", "e", "d"}:
        raise ValueError("amount must be an object with s, e, d")
    s, e, d = obj["s"], obj["e"], obj["d"]
    if s not in (1, -1) or isinstance(e, bool) or not isinstance(e, int) or not isinstance(d, list) or not d:
        raise ValueError("amount: s must be 1 or -1, e an integer, d a non-empty list")
    if any(isinstance(w, bool) or not isinstance(w, int) or not 0 <= w < _WORD for w in d):
        raise ValueError("amount: d must hold integers 0..9999999")
    if d == [0]:
        return 0
    top = e // 7
    value = sum((Decimal(w).scaleb(7 * (top - i)) for i, w in enumerate(d)), Decimal(0))
    if value.adjusted() != e:
        raise ValueError(f"amount: exponent {e} does not match the digits {d}")
    satang = value.scaleb(2)
    if satang != satang.to_integral_value():
        raise ValueError("amount has a fraction of a satang")
    return int(s) * int(satang)
