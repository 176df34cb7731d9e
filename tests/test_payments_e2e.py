"""A full QR payment from a simulated device through gunicorn, the core and the cloud simulator:
create (PromptPay rawData with a correct CRC), MQTT status PENDING then SUCCEEDED, the retained
status cleared, the HTTP fallback; and the cloud unreachable → 503 at once."""

from __future__ import annotations

import json
import time
from typing import Any

from gateway.access.signing import http_signature, parse_signed_mqtt
from gateway.payments.promptpay import check_emv, satang_from_decimal_js
from gateway.store import open_database
from gateway.store.models import OutboxEvent, Payment
from gateway.store.outbox import stored_events
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY
from tests.clients import http_json
from tests.conftest import Site, make_site, start_process
from tests.mqtt_probe import Probe
from tests.test_uplink_e2e import signed_post
from web.context import STATUS_CONNECTED

KEY = "modernchabackdoor"


def pay(site: Site, device: str, amount: int) -> tuple[int, dict[str, Any]]:
    raw = json.dumps({"device_id": device, "amount": amount, "payment_method": "QR_PROMPT_PAY",
                      "description": "Car wash payment"}).encode()
    return http_json(site.web_url + "/api/v1/payment-gateway/payments", method="POST", data=raw,
                     headers={"Content-Type": "application/json", "x-signature": http_signature(raw, KEY)})


def status(site: Site, charge_id: str) -> tuple[int, dict[str, Any]]:
    path = f"/api/v1/payment-gateway/payments/{charge_id}/status"
    return http_json(site.web_url + path, headers={"x-signature": http_signature(path.encode(), KEY)})


def payment_row(site: Site, charge_id: str) -> Payment:
    db = open_database(site.config.paths.database)
    try:
        return Payment.get_by_id(charge_id)
    finally:
        db.close()


def wait_delivered(site: Site, charge_id: str, timeout: float = 10) -> None:
    """The core marks the final status delivered after clearing the retained message; poll it."""
    end = time.monotonic() + timeout
    while not payment_row(site, charge_id).final_delivered:
        assert time.monotonic() < end, "final status never marked delivered"
        time.sleep(0.05)


def test_a_full_payment_and_the_fallback(tmp_path) -> None:  # type: ignore[no-untyped-def]
    sim = CloudSim(DEMO_CLOUD_KEY, site_id="demo-site").start()
    site = make_site(tmp_path / "site", f'[cloud]\nurl = "{sim.url}"\ntimeout_sec = 1.0\n')
    core = web = None
    probes: list[Probe] = []
    try:
        core = start_process(site, "core")
        web = start_process(site, "web")
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        device = signed_post(site, "/api/v1/devices/need-register", {
            "chip_id": "DEC0DE01", "mac_address": "24:0A:C4:00:02:01",
            "firmware_version": "car_wash_v1.00"})["data"]["device_id"]

        code, body = pay(site, device, 2500)
        assert code == 200, body
        data = body["data"]
        charge = data["payment_results"]["chargeId"]
        assert charge.startswith("ch_") and body["message"] == "Payment created successfully"
        check_emv(data["payment_results"]["encodedImage"]["rawData"])
        assert "540525.00" in data["payment_results"]["encodedImage"]["rawData"]  # tag 54: 25.00 baht
        assert satang_from_decimal_js(data["amount"]) == 2500 and data["status"] == "PENDING"

        # The device listens on its charge: the PENDING status is retained, signed.
        dev = Probe(site.mqtt_port, client_id=device)
        probes.append(dev)
        dev.connect()
        dev.subscribe(f"device/{charge}/payment-status")
        first = dev.expect(f"device/{charge}/payment-status", 10)
        assert first.retain and parse_signed_mqtt(first.payload, KEY) == {
            "command_id": f"cmd-{charge}", "command": "PAYMENT", "payload": {"chargeId": charge, "status": "PENDING"},
            "timestamp": parse_signed_mqtt(first.payload, KEY)["timestamp"]}
        code, st = status(site, charge)
        assert code == 200 and st["data"] == {"chargeId": charge, "status": "PENDING"}

        sim.pay(charge)  # the customer pays: the core's poll finds it
        final = dev.expect(f"device/{charge}/payment-status", 30)
        assert parse_signed_mqtt(final.payload, KEY)["payload"] == {"chargeId": charge, "status": "SUCCEEDED"}
        wait_delivered(site, charge)
        # The topic is "destroyed": a new subscriber gets no retained status (the marker comes first).
        late = Probe(site.mqtt_port)
        probes.append(late)
        late.connect()
        late.subscribe(f"device/{charge}/payment-status")
        internal = Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                         password=site.secrets.mqtt_internal_password)
        probes.append(internal)
        internal.connect()
        late.subscribe(f"device/marker-{charge}/payment-status")
        internal.publish(f"device/marker-{charge}/payment-status", b"m")
        assert late.until(f"device/marker-{charge}/payment-status", 10) == []
        code, st = status(site, charge)
        assert st["data"]["status"] == "SUCCEEDED"

        # The fallback: the charge fails at the cloud and the device asks over HTTP at once.
        code, body = pay(site, device, 100)
        other = body["data"]["payment_results"]["chargeId"]
        sim.fail_payment(other)
        code, st = status(site, other)
        assert code == 200 and st["data"] == {"chargeId": other, "status": "FAILED"}
        assert payment_row(site, other).status == "FAILED"
        db = open_database(site.config.paths.database)
        try:
            updates = [body["payload"] for _, body in stored_events(OutboxEvent.type == "payment.updated")]
        finally:
            db.close()
        assert [(u["charge_id"], u["status"]) for u in updates] == [
            (charge, "PENDING"), (charge, "SUCCEEDED"), (other, "PENDING"), (other, "FAILED")]

        # Refusals: bad amount, unknown device, bad signature.
        assert pay(site, device, 0)[0] == 400
        assert pay(site, "device-nope", 100)[1]["errorCode"] == "DEVICE_NOT_FOUND"
        code, st = status(site, "ch_unknown")
        assert code == 404 and st["errorCode"] == "PAYMENT_NOT_FOUND"

        # The cloud stalls: the first call waits out the timeout, the next one is refused at once
        # without reaching the cloud.
        sim.stall()
        code, body = pay(site, device, 100)
        assert code == 503 and body["errorCode"] == "CLOUD_UNAVAILABLE"
        requests = sim.stats()["requests"]
        code, body = pay(site, device, 100)
        assert code == 503 and body["errorCode"] == "CLOUD_UNAVAILABLE" and "last call failed" in body["message"]
        assert sim.stats()["requests"] == requests
        sim.release()
    finally:
        for p in probes:
            p.close()
        if web is not None:
            web.stop()
        rc = core.stop() if core is not None else 0
        sim.stop()
    assert rc == 0


def test_no_cloud_means_503_at_once(site: Site, web) -> None:  # type: ignore[no-untyped-def]
    web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
    device = signed_post(site, "/api/v1/devices/need-register", {
        "chip_id": "DEC0DE02", "mac_address": "24:0A:C4:00:02:02", "firmware_version": "car_wash_v1.00"})
    code, body = pay(site, device["data"]["device_id"], 100)
    assert code == 503 and body["errorCode"] == "CLOUD_UNAVAILABLE" and "no cloud" in body["message"]
