"""The cloud simulator over real HTTP: signed event batches, dedup, faults, payments, the CLI."""

from __future__ import annotations

import datetime as dt
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gateway.access.signing import http_signature
from gateway.payments.promptpay import check_emv, parse_tlv, satang_from_decimal_js
from sim.cloud import CloudSim
from sim.procs import child_env, stop_process
from tests.clients import http_json

KEY = "sim-test-key-1"
SITE = "site-1"
EVENTS = f"/api/v1/gateways/{SITE}/events"
PAYMENTS = "/api/v1/payment-gateway/payments"


@pytest.fixture
def sim() -> Iterator[CloudSim]:
    s = CloudSim(KEY, site_id=SITE).start()
    yield s
    s.stop()


def post(sim: CloudSim, path: str, doc: Any, *, key: str | None = KEY, timeout: float = 10) -> tuple[int, Any]:
    raw = json.dumps(doc).encode()
    headers = {"x-signature": http_signature(raw, key)} if key is not None else {}
    return http_json(sim.url + path, method="POST", data=raw, headers=headers, timeout=timeout)


def get(sim: CloudSim, path: str, *, key: str = KEY) -> tuple[int, Any]:
    return http_json(sim.url + path, headers={"x-signature": http_signature(path.encode(), key)})


def ev(eid: str, device: str | None = None, **payload: Any) -> dict[str, Any]:
    if device is not None:
        payload["device_id"] = device
    return {"id": eid, "type": "device.event_logs", "occurred_at": "2026-01-01T00:00:00.000Z", "site_id": SITE,
            "payload": payload}


def test_events_are_deduplicated_and_filed_per_partition(sim: CloudSim) -> None:
    status, doc = post(sim, EVENTS, {"events": [ev("a1", "d1"), ev("b1", "d2"), ev("a2", "d1")]})
    assert (status, doc) == (200, {"success": True, "data": {"accepted": ["a1", "b1", "a2"]}})
    # A re-sent batch (plus one new event): everything accepted, the copies counted as duplicates.
    status, doc = post(sim, EVENTS, {"events": [ev("a2", "d1"), ev("b1", "d2"), ev("a3", "d1")]})
    assert doc["data"]["accepted"] == ["a2", "b1", "a3"]
    assert sim.stats() == {"requests": 2, "received": 6, "unique": 4, "duplicates": 2, "rejected": 0, "held": 0,
                           "payments_created": 0}
    assert sim.event_ids() == ["a1", "b1", "a2", "a3"]
    assert sim.partitions() == {"d1": ["a1", "a2", "a3"], "d2": ["b1"]}
    assert [e["id"] for e in sim.events()] == ["a1", "b1", "a2", "a3"]
    assert sim.events()[0]["payload"] == {"device_id": "d1"}
    assert sim.batches() == [["a1", "b1", "a2"], ["a2", "b1", "a3"]]
    status, doc = http_json(sim.url + "/_sim/stats")
    assert (status, doc["data"]["unique"]) == (200, 4)


def test_signature_and_validation_errors(sim: CloudSim) -> None:
    status, doc = post(sim, EVENTS, {"events": [ev("x1")]}, key=None)
    assert (status, doc["errorCode"], doc["statusCode"], doc["path"]) == (401, "MISSING_SIGNATURE", 401, EVENTS)
    status, doc = post(sim, EVENTS, {"events": [ev("x1")]}, key=KEY + "wrong")
    assert (status, doc["errorCode"], doc["success"]) == (401, "INVALID_SIGNATURE", False)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", doc["timestamp"])
    # The signature covers the raw bytes: the same document serialised differently does not pass.
    raw = json.dumps({"events": [ev("x1")]}, indent=1).encode()
    sig = http_signature(json.dumps({"events": [ev("x1")]}).encode(), KEY)
    status, doc = http_json(sim.url + EVENTS, method="POST", data=raw, headers={"x-signature": sig})
    assert (status, doc["errorCode"]) == (401, "INVALID_SIGNATURE")
    assert post(sim, "/api/v1/gateways/other-site/events", {"events": [ev("x1")]})[0] == 404
    assert post(sim, EVENTS, {"events": []})[0] == 400
    assert post(sim, EVENTS, {"events": [{"type": "no id"}]})[0] == 400
    assert post(sim, EVENTS, ["not", "an", "object"])[0] == 400
    stats = sim.stats()
    assert (stats["unique"], stats["received"], stats["rejected"]) == (0, 0, 7)


def test_injected_failures_and_poison(sim: CloudSim) -> None:
    sim.fail(503, count=2)
    assert post(sim, EVENTS, {"events": [ev("e1")]})[0] == 503
    status, doc = post(sim, EVENTS, {"events": [ev("e1")]})
    assert (status, doc["errorCode"]) == (503, "CLOUD_UNAVAILABLE")
    assert post(sim, EVENTS, {"events": [ev("e1")]})[0] == 200
    # Over HTTP: poison one id; a batch holding it is refused whole, others go through.
    assert http_json(sim.url + "/_sim/poison", method="POST", body={"ids": ["bad"], "status": 422})[0] == 200
    status, doc = post(sim, EVENTS, {"events": [ev("e2"), ev("bad"), ev("e3")]})
    assert (status, doc["errorCode"]) == (422, "VALIDATION_FAILED")
    assert "bad" in doc["message"]
    assert post(sim, EVENTS, {"events": [ev("e2"), ev("e3")]})[0] == 200
    assert http_json(sim.url + "/_sim/fail", method="POST", body={"status": 500})[0] == 200
    for _ in range(3):
        assert post(sim, EVENTS, {"events": [ev("e4")]})[0] == 500
    assert http_json(sim.url + "/_sim/clear", method="POST", body={})[0] == 200
    assert post(sim, EVENTS, {"events": [ev("bad"), ev("e4")]})[0] == 200
    assert sim.event_ids() == ["e1", "e2", "e3", "bad", "e4"]
    assert sim.stats()["rejected"] == 6
    assert http_json(sim.url + "/_sim/fail", method="POST", body={"status": "x"})[0] == 400


def _post_in_thread(sim: CloudSim, doc: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = post(sim, EVENTS, doc)
        except OSError as exc:
            out["error"] = exc

    t = threading.Thread(target=run)
    t.start()
    return t, out


def test_stall_before_and_after_processing(sim: CloudSim) -> None:
    sim.stall()
    t, out = _post_in_thread(sim, {"events": [ev("s1")]})
    sim.wait_for(lambda s: s.stats()["held"] == 1, 5)
    assert sim.unique == 0 and "result" not in out  # held before being recorded
    sim.release()
    t.join(5)
    assert out["result"][0] == 200 and sim.unique == 1

    sim.stall(after_processing=True)
    t, out = _post_in_thread(sim, {"events": [ev("s2")]})
    sim.wait_for(lambda s: s.stats()["held"] == 1, 5)
    assert sim.unique == 2 and "result" not in out  # recorded, answer held back
    assert http_json(sim.url + "/_sim/release", method="POST", body={})[0] == 200
    t.join(5)
    assert out["result"][0] == 200

    # A timed stall lets the request through by itself.
    sim.stall(0.3)
    t0 = time.monotonic()
    assert post(sim, EVENTS, {"events": [ev("s3")]})[0] == 200
    assert time.monotonic() - t0 >= 0.25


def test_go_away_and_come_back_on_the_same_port(sim: CloudSim) -> None:
    port = sim.port
    # An open keep-alive connection is cut too, not only the listening socket.
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    conn.request("GET", "/_sim/stats")
    assert conn.getresponse().read()
    sim.stall()
    t, out = _post_in_thread(sim, {"events": [ev("g1")]})
    sim.wait_for(lambda s: s.stats()["held"] == 1, 5)
    sim.go_away()
    assert not sim.up
    t.join(5)
    assert "error" in out or out["result"][0] != 200  # the held request was dropped
    with pytest.raises(OSError):
        conn.request("GET", "/_sim/stats")
        conn.getresponse().read()
    conn.close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    sim.clear()
    sim.come_back()
    assert sim.port == port and sim.up
    assert post(sim, EVENTS, {"events": [ev("g2")]})[0] == 200
    # Over HTTP, with a timer: gone now, back by itself.
    assert http_json(sim.url + "/_sim/go-away", method="POST", body={"seconds": 0.3})[0] == 200
    sim.wait_for(lambda s: not s.up, 5)
    sim.wait_for(lambda s: s.up, 5)
    assert post(sim, EVENTS, {"events": [ev("g3")]})[0] == 200
    assert sim.event_ids() == ["g2", "g3"]


def test_payment_create_shape_and_status_flow(sim: CloudSim) -> None:
    body = {"device_id": "device-0004", "amount": 2550, "payment_method": "QR_PROMPT_PAY",
            "description": "Car wash payment"}
    status, doc = post(sim, PAYMENTS, body)
    assert status == 200 and doc["success"] is True and doc["message"] == "Payment created successfully"
    data = doc["data"]
    assert set(data) == {"id", "device_id", "amount", "payment_method", "reference_id", "status", "payment_results",
                         "created_at", "updated_at"}
    results = data["payment_results"]
    assert set(results) == {"chargeId", "redirect", "encodedImage", "actionRequired", "paymentMethodType"}
    assert (data["device_id"], data["status"], data["payment_method"]) == ("device-0004", "PENDING", "QR_PROMPT_PAY")
    assert data["amount"] == {"s": 1, "e": 1, "d": [25, 5000000]}
    assert satang_from_decimal_js(data["amount"]) == 2550
    assert re.fullmatch(r"ch_[A-Za-z0-9]{27}", results["chargeId"])
    assert re.fullmatch(r"CCW-\d{13}-[A-Z0-9]{6}", data["reference_id"])
    assert results["actionRequired"] == "ENCODED_IMAGE" and results["redirect"] is None
    raw = results["encodedImage"]["rawData"]
    check_emv(raw)
    tags = dict(parse_tlv(raw))
    assert tags["54"] == "25.50" and tags["01"] == "12" and tags["62"] == "0524" + data["reference_id"]
    created = dt.datetime.strptime(data["created_at"], "%Y-%m-%d %H:%M:%S")
    expiry = dt.datetime.strptime(results["encodedImage"]["expiry"], "%Y-%m-%d %H:%M:%S")
    assert expiry - created == dt.timedelta(minutes=30)
    charge = results["chargeId"]
    status_path = f"{PAYMENTS}/{charge}/status"
    assert get(sim, status_path) == (200, {"success": True, "data": {"chargeId": charge, "status": "PENDING"},
                                           "message": "Payment status checked successfully"})
    assert get(sim, status_path, key="wrong-key")[0] == 401
    assert http_json(sim.url + f"/_sim/payments/{charge}/pay", method="POST", body={})[0] == 200
    assert get(sim, status_path)[1]["data"]["status"] == "SUCCEEDED"
    status, doc = http_json(sim.url + f"/_sim/payments/{charge}/cancel", method="POST", body={})
    assert (status, doc["errorCode"]) == (409, "CONFLICT")  # final stays final
    assert get(sim, f"{PAYMENTS}/ch_nope/status")[1]["errorCode"] == "PAYMENT_NOT_FOUND"
    assert http_json(sim.url + "/_sim/payments/ch_nope/pay", method="POST", body={})[0] == 404
    # Python controls
    other = sim.create_charge("device-1", 100)
    sim.fail_payment(other.charge_id)
    assert sim.charge(other.charge_id).status == "FAILED"
    assert sim.cancel_payment(sim.create_charge("device-1", 100).charge_id).status == "CANCELLED"
    assert sim.stats()["payments_created"] == 3


@pytest.mark.parametrize(("change", "field"), [
    ({"amount": 0}, "amount"), ({"amount": 10_000_001}, "amount"), ({"amount": "100"}, "amount"),
    ({"amount": True}, "amount"), ({"payment_method": "CASH"}, "payment_method"), ({"device_id": ""}, "device_id"),
    ({"description": "x" * 256}, "description"),
])
def test_payment_validation(sim: CloudSim, change: dict[str, Any], field: str) -> None:
    body = {"device_id": "d", "amount": 100, "payment_method": "QR_PROMPT_PAY", "description": "x", **change}
    status, doc = post(sim, PAYMENTS, body)
    assert (status, doc["errorCode"]) == (400, "VALIDATION_FAILED")
    assert field in doc["message"]
    assert sim.stats()["payments_created"] == 0


def test_payment_auto_settles_after_the_delay() -> None:
    now = [1000.0]
    with CloudSim(KEY, payment_auto_delay_sec=30, payment_auto_status="FAILED", clock=lambda: now[0]) as sim:
        charge = sim.create_charge("d", 100).charge_id
        path = f"{PAYMENTS}/{charge}/status"
        now[0] += 29.9
        assert get(sim, path)[1]["data"]["status"] == "PENDING"
        now[0] += 0.1
        assert get(sim, path)[1]["data"]["status"] == "FAILED"


def test_demo_page_marks_paid_with_a_form_post(sim: CloudSim) -> None:
    charge = sim.create_charge("device-0004", 4000, "wash").charge_id
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    try:
        conn.request("GET", "/_sim/")
        resp = conn.getresponse()
        page = resp.read().decode()
        assert resp.status == 200 and resp.getheader("Content-Type", "").startswith("text/html")
        assert charge in page and "40.00" in page and f'action="/_sim/payments/{charge}/pay"' in page
        conn.request("POST", f"/_sim/payments/{charge}/pay", body=b"",
                     headers={"Content-Type": "application/x-www-form-urlencoded"})
        resp = conn.getresponse()
        resp.read()
        assert (resp.status, resp.getheader("Location")) == (303, "/_sim/")
    finally:
        conn.close()
    assert sim.charge(charge).status == "SUCCEEDED"
    status, doc = http_json(sim.url + "/_sim/payments")
    assert (status, doc["data"][0]["status"]) == (200, "SUCCEEDED")


def test_latency_delays_api_answers() -> None:
    with CloudSim(KEY, latency_sec=0.3) as sim:
        t0 = time.monotonic()
        assert post(sim, EVENTS, {"events": [ev("l1")]})[0] == 200
        assert time.monotonic() - t0 >= 0.3
        t0 = time.monotonic()
        http_json(sim.url + "/_sim/stats")  # controls are not delayed
        assert time.monotonic() - t0 < 0.3


def test_cli_runs_until_sigterm() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "sim.cloud", "--port", "0", "--site-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=child_env())
    try:
        assert proc.stdout is not None
        url = proc.stdout.readline().decode().strip()
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+", url), url
        raw = json.dumps({"events": [ev("c1")]}).encode()
        status, doc = http_json(url + EVENTS, method="POST", data=raw,
                                headers={"x-signature": http_signature(raw, KEY)})
        assert (status, doc["data"]["accepted"]) == (200, ["c1"])
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        stop_process(proc)
        for f in (proc.stdout, proc.stderr):
            if f is not None:
                f.close()
