"""Event-log uploads built in one pass (issue #20): `validate.log_upload` and
`registry.prepare_upload` give exactly what the item-by-item code they replaced gave, kept here as
the reference: the same items or the same named error, the same dedup keys (stored keys must match
re-uploads after an upgrade), rows and outbox event bytes."""

from __future__ import annotations

import hashlib
import json
import string
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st
from peewee import SqliteDatabase

from gateway.clock import utc_now
from gateway.devices import validate
from gateway.devices.registry import prepare_upload, upload_logs
from gateway.devices.validate import BANKNOTES, COINS, MAX_INT, Invalid, log_upload
from gateway.store import migrate, open_database, write_tx
from gateway.store.models import Device
from gateway.store.outbox import PreparedEvent, payload_bytes, stored_events

# --- the reference: the code before the one-pass construction, verbatim but for the names ---------


def _ref_item(it: Any, f: str) -> tuple[Any, ...]:
    if not isinstance(it, dict):
        raise Invalid(f, "an object")
    typ = it.get("type")
    if not isinstance(typ, str) or not validate.UPPER_WORD_RE.match(typ):
        raise Invalid(f"{f}.type", "PAYMENT or another upper-case word")
    status = it.get("status")
    if status not in validate.PAYMENT_STATUSES:
        raise Invalid(f"{f}.status", "one of " + ", ".join(validate.PAYMENT_STATUSES))
    ts = validate._amount(it.get("timestamp"), f"{f}.timestamp")
    total = validate._amount(it.get("total_amount"), f"{f}.total_amount")
    qr = it.get("qr")
    charge, net = None, None
    if qr is not None:
        if not isinstance(qr, dict):
            raise Invalid(f"{f}.qr", "an object")
        charge = qr.get("chargeId")
        if charge is not None and (not isinstance(charge, str) or len(charge) > 128):
            raise Invalid(f"{f}.qr.chargeId", "a string")
        net = validate._amount(qr.get("net_amount", 0), f"{f}.qr.net_amount")
    return (typ, status, ts, total, charge, net, validate._count_map(it.get("bank"), f"{f}.bank", BANKNOTES),
            validate._count_map(it.get("coin"), f"{f}.coin", COINS))


def _ref_log_upload(body: dict[str, Any]) -> tuple[str, list[tuple[Any, ...]]]:
    dev = validate.device_id(body.get("device_id"))
    items = body.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= validate.MAX_ITEMS:
        raise Invalid("items", f"a list of 1 to {validate.MAX_ITEMS} items")
    return dev, [_ref_item(it, f"items[{i}]") for i, it in enumerate(items)]


def _ref_key(device: str, it: tuple[Any, ...]) -> str:
    typ, status, ts, total, charge, net, bank, coin = it
    ident = json.dumps([device, ts, typ, status, total, charge, net, sorted(bank.items()), sorted(coin.items())],
                       separators=(",", ":"))
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


def _ref_prepare(dev: str, items: list[tuple[Any, ...]]) -> tuple[list[str], list[tuple[Any, ...]], list[Any]]:
    """(keys, rows without received_at, the event's items) as the item-by-item code built them."""
    seen: set[str] = set()
    keys, rows, stored = [], [], []
    for it in items:
        typ, status, ts, total, charge, net, bank, coin = it
        key = _ref_key(dev, it)
        if key in seen:
            continue
        seen.add(key)
        counted = sum(int(k) * n for k, n in bank.items()) + sum(int(k) * n for k, n in coin.items())
        mismatch = counted + (net or 0) != total
        keys.append(key)
        rows.append((dev, key, typ, status, ts, total, charge, net, json.dumps(bank) if bank else None,
                     json.dumps(coin) if coin else None, mismatch))
        stored.append({"type": typ, "status": status, "timestamp": ts, "total_amount": total,
                       "qr": {"chargeId": charge, "net_amount": net}, "bank": bank, "coin": coin,
                       "amount_mismatch": mismatch, "dedup_key": key})
    return keys, rows, stored


def _event_bytes(event: PreparedEvent) -> bytes:
    return payload_bytes(event.stored)


def _as_dumped(body: dict[str, Any]) -> bytes:
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


# --- generated uploads --------------------------------------------------------------------------

unicode_text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=128)  # quotes, controls, emoji
counts = st.integers(0, 1_000_000)


def _count_maps(keys: tuple[str, ...]) -> st.SearchStrategy[Any]:
    """None, absent-like {}, or some denominations in any order (a permutation, then a prefix)."""
    some = st.permutations(keys).flatmap(
        lambda order: st.lists(counts, max_size=len(order)).map(lambda ns: dict(zip(order, ns, strict=False))))
    return st.none() | st.just({}) | some | st.fixed_dictionaries({k: counts for k in keys})


qr_objects = st.none() | st.fixed_dictionaries({}, optional={
    "chargeId": st.none() | unicode_text | st.sampled_from(["ch_1", "ช้าง", "\u2028", '"\\/', "\x00\x1f"]),
    "net_amount": st.integers(0, MAX_INT)})
valid_items = st.fixed_dictionaries(
    {"type": st.sampled_from(["PAYMENT", "REFUND", "A", "X_9"])
     | st.from_regex(r"[A-Z][A-Z0-9_]{0,31}", fullmatch=True),
     "status": st.sampled_from(validate.PAYMENT_STATUSES),
     "timestamp": st.integers(0, MAX_INT) | st.sampled_from([0, MAX_INT, 1_760_000_000_000]),
     "total_amount": st.integers(0, MAX_INT) | st.integers(0, 5000)},
    optional={"qr": qr_objects, "bank": _count_maps(BANKNOTES), "coin": _count_maps(COINS), "extra": st.integers()})
device_ids = st.from_regex(r"[A-Za-z0-9_.-]{1,64}", fullmatch=True)


@settings(max_examples=200, deadline=None)
@given(dev=device_ids, items=st.lists(valid_items, min_size=1, max_size=12), repeat=st.integers(0, 3))
def test_valid_uploads_give_the_reference_items_keys_rows_and_event(dev: str, items: list[dict[str, Any]],
                                                                    repeat: int) -> None:
    items = items + items[:repeat]  # the same item twice in one upload counts once
    body = {"device_id": dev, "items": items}
    ref_dev, ref_items = _ref_log_upload(body)
    got_dev, got_items = log_upload(json.loads(json.dumps(body)))
    assert (got_dev, [tuple(it) for it in got_items]) == (ref_dev, ref_items)
    assert [it.dedup_key(dev) for it in got_items] == [_ref_key(dev, it) for it in ref_items]

    p = prepare_upload(got_dev, got_items, site_id="site-ท")
    keys, rows, stored = _ref_prepare(ref_dev, ref_items)
    assert p.keys == keys and [r[:-1] for r in p.rows] == rows and {r[-1] for r in p.rows} == {str(p.now)}
    event = json.loads(_event_bytes(p.event))
    assert event["payload"] == {"device_id": dev, "items": stored, "received_at": event["payload"]["received_at"]}
    assert _event_bytes(p.event) == _as_dumped(event) and p.event.size == len(_as_dumped(event))
    assert [event[k] for k in ("id", "type", "occurred_at", "site_id")] == [
        p.event.event_id, "device.event_logs", p.event.occurred_at, "site-ท"]


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**64, 2**64) | st.floats(allow_nan=False)
                           | st.text(max_size=6), lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)
fields = st.sampled_from(["type", "status", "timestamp", "total_amount", "qr", "bank", "coin"])
denominations = st.sampled_from(BANKNOTES + COINS + ("3", "", "20 "))
odd_counts = st.sampled_from([True, False, 1.0, -1, 1_000_001, 2**70, "1", None, [1]])


@st.composite
def _spoilt(draw: st.DrawFn) -> Any:
    """A valid item with one to three things changed to anything (or not an object at all)."""
    item: Any = draw(valid_items)
    for _ in range(draw(st.integers(1, 3))):
        how = draw(st.integers(0, 5))
        if how == 0:
            item[draw(fields)] = draw(json_values)
        elif how == 1:
            item.pop(draw(fields), None)
        elif how == 2:
            item[draw(st.sampled_from(["bank", "coin"]))] = {draw(denominations): draw(counts | odd_counts)}
        elif how == 3:
            item["qr"] = {draw(st.sampled_from(["chargeId", "net_amount"])): draw(json_values | odd_counts)}
        elif how == 4:
            item[draw(st.sampled_from(["timestamp", "total_amount"]))] = draw(
                st.sampled_from([MAX_INT + 1, -1, True, 1.0, 2**63]))
        else:
            return draw(json_values)
    return item


@settings(max_examples=400, deadline=None)
@given(good=st.lists(valid_items, max_size=3), bad=_spoilt(), after=st.lists(valid_items | _spoilt(), max_size=2))
def test_any_item_is_accepted_or_refused_as_by_the_reference_naming_the_same_field(
        good: list[Any], bad: Any, after: list[Any]) -> None:
    body = {"device_id": "device-1", "items": [*good, bad, *after]}
    try:
        expected: Any = _ref_log_upload(body)
    except Invalid as exc:
        expected = (exc.field, str(exc))
    try:
        dev, items = log_upload(body)
        got: Any = (dev, [tuple(it) for it in items])
    except Invalid as exc:
        got = (exc.field, str(exc))
    assert got == expected


def test_known_cases_name_their_field() -> None:
    item = {"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": 1, "total_amount": 20, "bank": {"20": 1}}
    for change, field in (({"bank": {"20": True}}, "items[1].bank.20"), ({"coin": {"5": 1.0}}, "items[1].coin.5"),
                          ({"type": "payment"}, "items[1].type"), ({"timestamp": MAX_INT + 1}, "items[1].timestamp"),
                          ({"qr": {"chargeId": 7}}, "items[1].qr.chargeId"), ({"qr": []}, "items[1].qr"),
                          ({"qr": {"net_amount": -1}}, "items[1].qr.net_amount"),
                          ({"bank": {"3": 1}}, "items[1].bank.3")):
        with pytest.raises(Invalid) as caught:
            log_upload({"device_id": "device-1", "items": [item, {**item, **change}]})
        assert caught.value.field == field


@pytest.fixture
def db(tmp_path: Path):
    d = open_database(tmp_path / "g.db")
    migrate(d)
    with write_tx(d):
        Device.create(device_id="device-24ab3c91", chip_id="24AB3C91", mac_address="24:6F:28:AB:3C:91",
                      device_type="CAR_WASH", firmware_version="car_wash_v1.00", registered_at=utc_now())
    yield d
    d.close()


def test_a_re_upload_tells_the_cloud_only_the_new_items_in_the_same_shape(db: SqliteDatabase) -> None:
    """The event of a partly known upload is cut from the prepared items' JSON: its items are the
    new ones, in order, each exactly as a whole upload would have sent it."""
    def item(i: int) -> dict[str, Any]:
        return {"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": 1_760_000_000_000 + i,
                "total_amount": 20 + 2 * i, "bank": {"20": 1}, "coin": {},
                "qr": {"chargeId": f"ช-{i}" if i % 2 else None, "net_amount": i}}
    dev, first = log_upload({"device_id": "device-24ab3c91", "items": [item(i) for i in (0, 2, 4)]})
    assert upload_logs(db, dev, first, site_id="site-1").stored == 3
    dev, again = log_upload({"device_id": "device-24ab3c91", "items": [item(i) for i in range(6)]})
    r = upload_logs(db, dev, again, site_id="site-1")
    assert (r.length, r.stored, r.mismatches) == (6, 3, 3)
    (_, whole), (row, part) = stored_events()
    _, _, stored = _ref_prepare(dev, [tuple(it) for it in again])
    assert part["payload"]["items"] == [stored[i] for i in (1, 3, 5)]
    assert whole["payload"]["items"] == _ref_prepare(dev, [tuple(it) for it in first])[2]
    assert row.size == len(_as_dumped(part))


def test_a_prepared_event_from_payload_text_is_the_event_from_its_dict() -> None:
    payload = {"device_id": "d", "items": [{"a": "ข\"\\\n", "b": None, "c": [1, True]}], "n": 2**60}
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    for given_payload in (payload, text):
        event = PreparedEvent("device.event_logs", given_payload, site_id="ไซต์", partition="d")
        body = {"id": event.event_id, "type": "device.event_logs", "occurred_at": event.occurred_at,
                "site_id": "ไซต์", "payload": payload}
        assert _event_bytes(event) == _as_dumped(body) and event.size == len(_as_dumped(body))


def test_the_storm_items_build_the_keys_the_reference_builds() -> None:
    """The benchmark's buffer (repeated note and coin maps, as devices send them) through the cache
    of serialised maps, 1,000 items."""
    from bench.restart_storm import _items

    dev, items = log_upload({"device_id": "device-24ab3c91", "items": _items(1000, 1_760_000_000_000)})
    p = prepare_upload(dev, items, site_id="site-1")
    assert p.keys == [_ref_key(dev, tuple(it)) for it in items] and len(set(p.keys)) == 1000
    assert json.loads(_event_bytes(p.event))["payload"]["items"] == _ref_prepare(dev, [tuple(it) for it in items])[2]


def test_string_alphabet_of_the_key_is_hex() -> None:
    dev, items = log_upload({"device_id": "d", "items": [{"type": "PAYMENT", "status": "PENDING", "timestamp": 0,
                                                           "total_amount": 0}]})
    key = prepare_upload(dev, items, site_id="s").keys[0]
    assert len(key) == 16 and set(key) <= set(string.hexdigits.lower()) and key == items[0].dedup_key(dev)
