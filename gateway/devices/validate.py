"""Validation of what devices send over HTTP (device-api.md §3), pure: no I/O.

Each function returns the cleaned value or raises `Invalid` naming the field (a JSON path such as
`items[3].bank.20`), which the web turns into 400 VALIDATION_FAILED.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

# \Z, not $: Python's `$` also matches before a trailing newline ("24AB3C91\n" was a chip id).
CHIP_RE = re.compile(r"^[0-9A-Fa-f]{6,16}\Z")
MAC_RE = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}\Z")
DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
UPPER_WORD_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}\Z")
PAYMENT_STATUSES = ("PENDING", "SUCCEEDED", "FAILED", "CANCELLED")
DEVICE_STATUSES = ("NORMAL", "ERROR", "OFFLINE")
BANKNOTES = ("20", "50", "100", "500", "1000")
COINS = ("1", "2", "5", "10")
MAX_ITEMS = 1000
DEDUP_KEY_LEN = 16  # hex digits: the index holds device and time, the key tells apart the rest
MAX_INT = 2**53 - 1  # what a JSON number can hold exactly in the devices' JavaScript-like world


class Invalid(ValueError):
    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        super().__init__(f"{field}: {problem}")


def device_type(firmware_version: str) -> str:
    fw = firmware_version.lower()
    if fw.startswith("car_wash_"):
        return "CAR_WASH"
    if fw.startswith("helmet_dryer_") or fw.startswith("helmet_"):
        return "HELMET_DRYER"
    return "UNKNOWN"


def device_id_for(chip_id: str) -> str:
    """Stable id of a chip on this site: the same chip always gets the same id, across reinstalls."""
    return f"device-{chip_id.lower()}"


@dataclass(frozen=True)
class Registration:
    chip_id: str
    mac_address: str
    firmware_version: str


def _str(body: dict[str, Any], name: str) -> str:
    v = body.get(name)
    if not isinstance(v, str):
        raise Invalid(name, "required, a string")
    return v


def registration(body: dict[str, Any]) -> Registration:
    chip = _str(body, "chip_id")
    if not CHIP_RE.match(chip):
        raise Invalid("chip_id", "6 to 16 hexadecimal digits")
    mac = _str(body, "mac_address")
    if not MAC_RE.match(mac):
        raise Invalid("mac_address", "XX:XX:XX:XX:XX:XX")
    fw = _str(body, "firmware_version")
    if not 1 <= len(fw) <= 64 or not fw.isprintable():
        raise Invalid("firmware_version", "1 to 64 printable characters")
    return Registration(chip.upper(), mac.upper(), fw)


def device_id(value: Any, field: str = "device_id") -> str:
    if not isinstance(value, str) or not DEVICE_ID_RE.match(value):
        raise Invalid(field, "1 to 64 letters, digits, '_', '.', '-'")
    return value


@dataclass(frozen=True)
class Lifecycle:
    topic: str  # startup | shutdown
    device_id: str
    device_status: str | None
    configs: dict[str, Any]
    timestamp: int | None


def lifecycle(body: dict[str, Any]) -> Lifecycle:
    topic = body.get("topic_request")
    if topic not in ("startup", "shutdown"):
        raise Invalid("topic_request", "startup or shutdown")
    dev = device_id(body.get("device_id"))
    status = body.get("device_status")
    if status is not None and status not in DEVICE_STATUSES:
        raise Invalid("device_status", "one of " + ", ".join(DEVICE_STATUSES))
    payload = body.get("payload", {})
    if not isinstance(payload, dict):
        raise Invalid("payload", "an object")
    configs = payload.get("configs", {})
    if not isinstance(configs, dict):
        raise Invalid("payload.configs", "an object")
    ts = body.get("timestamp")
    if ts is not None and (isinstance(ts, bool) or not isinstance(ts, int) or not 0 <= ts <= MAX_INT):
        raise Invalid("timestamp", "epoch milliseconds")
    return Lifecycle(topic, dev, status, configs, ts)


def _count_map(value: Any, field: str, keys: tuple[str, ...]) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Invalid(field, "an object of counts")
    out = {}
    for k, v in value.items():
        if k not in keys:
            raise Invalid(f"{field}.{k}", "unknown denomination (" + ", ".join(keys) + ")")
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 1_000_000:
            raise Invalid(f"{field}.{k}", "a count from 0")
        out[k] = v
    return out


class LogItem(NamedTuple):
    """One event-log item as validated: a tuple (an upload makes a thousand of them), whose maps
    hold exact ints under their denominations as sent."""

    type: str
    status: str
    timestamp_ms: int
    total_amount: int
    qr_charge_id: str | None
    qr_net_amount: int | None
    bank: dict[str, int]
    coin: dict[str, int]

    @property
    def mismatch(self) -> bool:
        counted = sum(int(k) * n for k, n in self.bank.items()) + sum(int(k) * n for k, n in self.coin.items())
        return counted + (self.qr_net_amount or 0) != self.total_amount

    def dedup_key(self, device: str) -> str:
        """Same device, timestamp, type and amounts: the same item (re-uploads store nothing new).

        16 hex digits: the first 64 bits of a SHA-256 (migration 4 cut stored keys to them). This is
        the definition of the key; `gateway.devices.registry.prepare_upload` builds the same bytes
        without a list per item (tests/unit/test_log_items.py compares them)."""
        ident = json.dumps([device, self.timestamp_ms, self.type, self.status, self.total_amount,
                            self.qr_charge_id, self.qr_net_amount, sorted(self.bank.items()),
                            sorted(self.coin.items())], separators=(",", ":"))
        return hashlib.sha256(ident.encode()).hexdigest()[:DEDUP_KEY_LEN]


def _amount(v: Any, field: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_INT:
        raise Invalid(field, "a non-negative integer")
    return v


def _log_item(it: Any, f: str) -> LogItem:
    """One item, checked field by field: the first problem is raised, named."""
    if not isinstance(it, dict):
        raise Invalid(f, "an object")
    typ = it.get("type")
    if not isinstance(typ, str) or not UPPER_WORD_RE.match(typ):
        raise Invalid(f"{f}.type", "PAYMENT or another upper-case word")
    status = it.get("status")
    if status not in PAYMENT_STATUSES:
        raise Invalid(f"{f}.status", "one of " + ", ".join(PAYMENT_STATUSES))
    ts = _amount(it.get("timestamp"), f"{f}.timestamp")
    total = _amount(it.get("total_amount"), f"{f}.total_amount")
    qr = it.get("qr")
    charge, net = None, None
    if qr is not None:
        if not isinstance(qr, dict):
            raise Invalid(f"{f}.qr", "an object")
        charge = qr.get("chargeId")
        if charge is not None and (not isinstance(charge, str) or len(charge) > 128):
            raise Invalid(f"{f}.qr.chargeId", "a string")
        net = _amount(qr.get("net_amount", 0), f"{f}.qr.net_amount")
    return LogItem(typ, status, ts, total, charge, net, _count_map(it.get("bank"), f"{f}.bank", BANKNOTES),
                   _count_map(it.get("coin"), f"{f}.coin", COINS))


_STATUS_SET = frozenset(PAYMENT_STATUSES)
_BANKNOTE_SET = frozenset(BANKNOTES)
_COIN_SET = frozenset(COINS)


def _counts_ok(value: dict[str, int], keys: frozenset[str]) -> bool:
    """True when `_count_map` would accept `value` as it is (exact ints: no bool, no subclass)."""
    for k, v in value.items():
        if k not in keys or type(v) is not int or not 0 <= v <= 1_000_000:
            return False
    return True


def log_upload(body: dict[str, Any]) -> tuple[str, list[LogItem]]:
    """The device and its items, or `Invalid` naming the first problem (`items[3].bank.20`).

    Most items are well formed: each is checked in one pass of exact type tests, and an item that
    fails any of them goes through `_log_item`, field by field in the order of the API, which
    names the problem (or accepts it: the quick pass is stricter, never looser)."""
    dev = device_id(body.get("device_id"))
    items = body.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ITEMS:
        raise Invalid("items", f"a list of 1 to {MAX_ITEMS} items")
    out = []
    types: set[str] = set()  # the upper-case words matched already in this upload
    new = tuple.__new__
    match_type = UPPER_WORD_RE.match
    for i, it in enumerate(items):
        if type(it) is dict:
            get = it.get
            typ, status, ts, total = get("type"), get("status"), get("timestamp"), get("total_amount")
            qr, bank, coin = get("qr"), get("bank"), get("coin")
            charge = net = None
            if type(typ) is str and typ not in types and match_type(typ):
                types.add(typ)
            if (type(typ) is str and typ in types and type(status) is str and status in _STATUS_SET
                    and type(ts) is int and 0 <= ts <= MAX_INT and type(total) is int and 0 <= total <= MAX_INT
                    and (qr is None or (type(qr) is dict
                                        and ((charge := qr.get("chargeId")) is None
                                             or (type(charge) is str and len(charge) <= 128))
                                        and type(net := qr.get("net_amount", 0)) is int and 0 <= net <= MAX_INT))
                    and (bank is None or (type(bank) is dict and _counts_ok(bank, _BANKNOTE_SET)))
                    and (coin is None or (type(coin) is dict and _counts_ok(coin, _COIN_SET)))):
                # The maps as sent (same keys, order and ints): `_count_map` would copy them.
                out.append(new(LogItem, (typ, status, ts, total, charge, net,
                                         {} if bank is None else bank, {} if coin is None else coin)))
                continue
        out.append(_log_item(it, f"items[{i}]"))
    return dev, out
