"""The core's cloud bridge through Debian's mosquitto (plain TCP here; TLS is covered by
test_cloud_bridge.py): device presence out under the site prefix, a device command and a payment
push in, both through the same decision paths as local ones."""

from __future__ import annotations

import json
from pathlib import Path

from gateway.access.signing import parse_signed_mqtt, sign_mqtt
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY
from tests.conftest import make_site, start_process
from tests.mqtt_probe import Probe
from tests.test_cloud_bridge import mosquitto
from tests.test_payments_e2e import KEY, pay, wait_delivered
from tests.test_uplink_e2e import signed_post
from web.context import STATUS_CONNECTED


def test_core_bridge_out_and_in(tmp_path: Path) -> None:
    sim = CloudSim(DEMO_CLOUD_KEY, site_id="demo-site").start()
    probes: list[Probe] = []
    core = web = None
    try:
        (tmp_path / "cloud-broker").mkdir()
        with mosquitto(tmp_path / "cloud-broker") as cloud:
            site = make_site(tmp_path / "site", f'[cloud]\nurl = "{sim.url}"\n[cloud.bridge]\nenabled = true\n'
                                                f'host = "127.0.0.1"\nport = {cloud.port}\ntls = false\n')
            cloud_probe = Probe(cloud.port)
            probes.append(cloud_probe)
            cloud_probe.connect()
            cloud_probe.subscribe("sites/demo-site/#")
            core = start_process(site, "core")
            web = start_process(site, "web")
            web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
            online = cloud_probe.expect("sites/demo-site/gateway/status", 15)
            assert json.loads(online.payload)["online"] is True

            device = signed_post(site, "/api/v1/devices/need-register", {
                "chip_id": "B41D6E01", "mac_address": "24:0A:C4:00:03:01",
                "firmware_version": "car_wash_v1.00"})["data"]["device_id"]
            dev = Probe(site.mqtt_port, client_id=device)
            probes.append(dev)
            dev.connect()
            dev.subscribe(f"device/{device}/command")
            dev.publish(f"server/{device}/streaming", sign_mqtt({"rssi": -60, "status": "NORMAL", "uptime": 1,
                                                                "timestamp": 1}, KEY))
            presence = cloud_probe.expect(f"sites/demo-site/devices/{device}/presence", 15)
            assert json.loads(presence.payload)["online"] is True

            # A command from the cloud: checked like a local one, then sent to the device.
            cloud_probe.publish(f"sites/demo-site/device/{device}/command",
                                json.dumps({"command": "PING", "payload": {}}))
            cmd = parse_signed_mqtt(dev.expect(f"device/{device}/command", 15).payload, KEY)
            assert cmd["command"] == "PING" and cmd["require_ack"] is False
            cloud_probe.publish(f"sites/demo-site/device/{device}/command",
                                json.dumps({"command": "SELF_DESTRUCT"}))  # refused, never reaches the device
            cloud_probe.publish(f"sites/demo-site/device/{device}/command", json.dumps({"command": "GET_STATUS"}))
            nxt = parse_signed_mqtt(dev.expect(f"device/{device}/command", 15).payload, KEY)
            assert nxt["command"] == "GET_STATUS"

            # A payment pushed by the cloud over the bridge, before any poll would find it.
            code, body = pay(site, device, 500)
            assert code == 200, body
            charge = body["data"]["payment_results"]["chargeId"]
            dev.subscribe(f"device/{charge}/payment-status")
            assert parse_signed_mqtt(dev.expect(f"device/{charge}/payment-status", 10).payload,
                                     KEY)["payload"]["status"] == "PENDING"
            cloud_probe.publish(f"sites/demo-site/payments/{charge}/status", json.dumps({"status": "SUCCEEDED"}))
            final = parse_signed_mqtt(dev.expect(f"device/{charge}/payment-status", 10).payload, KEY)
            assert final["payload"] == {"chargeId": charge, "status": "SUCCEEDED"}
            wait_delivered(site, charge)
            for p in probes:
                p.close()
            probes.clear()
            web.stop()
            web = None
            rc = core.stop()
            core = None
            assert rc == 0
    finally:
        for p in probes:
            p.close()
        if web is not None:
            web.stop()
        if core is not None:
            core.stop()
        sim.stop()
