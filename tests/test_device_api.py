"""The device HTTP API through the real gunicorn: pairing, config sync, event logs, signatures."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from importlib import resources

import pytest

from gateway.access.signing import http_signature
from gateway.store import open_database
from gateway.store.models import Device, DeviceConfig, EventLogItem, OutboxEvent
from sim.demo import ensure_demo_user
from tests.clients import http_json
from tests.conftest import Proc, Site
from web.context import STATUS_CONNECTED

V = json.loads(resources.files("gateway").joinpath("data/spec-vectors.json").read_text())
KEY = V["secret_key"]
REGISTER_BODY = V["http_sha256_suffix"]["body"].encode()
DEVICE = "device-24ab3c91"

# The seed's own examples (shared/spec/seeds/device-communication.md), device id adapted.
STARTUP = {"topic_request": "startup", "device_id": DEVICE, "device_status": "NORMAL",
           "payload": {"configs": {"machine": {"ACTIVE": True, "BANKNOTE": True, "COIN": True, "QR": True,
                                               "ON_TIME": "8:00", "OFF_TIME": "16:00", "SAVE_STATE": True},
                                   "function": {"sec_per_baht": {"HP_WATER": 10, "FOAM": 10, "AIR": 10, "WATER": 10,
                                                                 "VACUUM": 10, "BLACK_TIRE": 10, "WAX": 10,
                                                                 "AIR_FRESHENER": 0, "PARKING_FEE": 600}}}},
           "timestamp": 1758358335794}
LOG_ITEM = {"qr": {"chargeId": "ACB-1152-1152", "net_amount": 0},
            "bank": {"20": 0, "50": 0, "100": 0, "500": 0, "1000": 0},
            "coin": {"1": 5, "2": 0, "5": 0, "10": 0}, "type": "PAYMENT", "status": "SUCCEEDED",
            "timestamp": 1760634265248, "total_amount": 5}


@pytest.fixture
def api(site: Site, web: Proc) -> Iterator[str]:

    ensure_demo_user(site.config_path)  # the device listing needs a technician
    web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
    yield site.web_url


def post(url: str, raw: bytes, *, sign: bool = True, sig: str | None = None,
         content_type: str = "application/json") -> tuple[int, dict]:
    headers = {"Content-Type": content_type}
    if sign:
        headers["x-signature"] = sig or http_signature(raw, KEY)
    return http_json(url, method="POST", data=raw, headers=headers)


def counts(site: Site) -> dict[str, int]:
    db = open_database(site.config.paths.database)
    try:
        return {"devices": Device.select().count(), "configs": DeviceConfig.select().count(),
                "logs": EventLogItem.select().count(), "outbox": OutboxEvent.select().count()}
    finally:
        db.close()


def test_pairing_with_the_spec_vector_and_listing(api: str, site: Site) -> None:
    code, body = post(api + "/api/v1/devices/need-register", REGISTER_BODY, sig=V["http_sha256_suffix"]["x-signature"])
    assert code == 200 and body["success"] is True and body["message"] == "Device registered successfully"
    assert body["data"]["device_id"] == DEVICE and len(body["data"]["pin"]) == 4 and body["data"]["pin"].isdigit()
    # Pressing Pairing Mode again: the same id, a fresh PIN; nothing duplicated.
    code, again = post(api + "/api/v1/devices/need-register", REGISTER_BODY)
    assert code == 200 and again["data"]["device_id"] == DEVICE
    auth = login(api)
    code, listing = http_json(api + "/api/v1/devices?status=pending", headers=auth)
    [dev] = listing["data"]
    assert (dev["device_id"], dev["device_type"], dev["pending"], dev["pin"]) == (
        DEVICE, "CAR_WASH", True, again["data"]["pin"])
    assert counts(site)["devices"] == 1
    assert http_json(api + "/api/v1/devices?type=HELMET_DRYER", headers=auth)[1]["data"] == []


def test_signature_failures_store_nothing(api: str, site: Site) -> None:
    before = counts(site)
    code, body = post(api + "/api/v1/devices/need-register", REGISTER_BODY, sign=False)
    assert (code, body["errorCode"]) == (401, "MISSING_SIGNATURE")
    code, body = post(api + "/api/v1/devices/need-register", REGISTER_BODY + b" ",
                      sig=V["http_sha256_suffix"]["x-signature"])
    assert (code, body["errorCode"]) == (401, "INVALID_SIGNATURE")
    code, body = post(api + "/api/v1/device-event-logs/uploads", b'{"device_id":"x","items":[]}', sig="0" * 64)
    assert (code, body["errorCode"]) == (401, "INVALID_SIGNATURE")
    assert counts(site) == before


@pytest.mark.parametrize(
    ("body", "status", "code", "words"),
    [
        (b'{"chip_id":"24AB3C91","mac_address":"24:6F:28:AB:3C:91"', 400, "INVALID_JSON", ""),
        (b'[1]', 400, "VALIDATION_FAILED", "object"),
        (b'{"chip_id":"XYZ","mac_address":"24:6F:28:AB:3C:91","firmware_version":"car_wash_v1"}', 400,
         "VALIDATION_FAILED", "chip_id"),
        (b'{"chip_id":"24AB3C91","mac_address":"24-6F","firmware_version":"car_wash_v1"}', 400,
         "VALIDATION_FAILED", "mac_address"),
        (b'{"chip_id":"24AB3C91","mac_address":"24:6F:28:AB:3C:91","firmware_version":5}', 400,
         "VALIDATION_FAILED", "firmware_version"),
    ],
)
def test_registration_bad_input(api: str, site: Site, body: bytes, status: int, code: str, words: str) -> None:
    got, resp = post(api + "/api/v1/devices/need-register", body)
    assert (got, resp["errorCode"]) == (status, code) and words in resp["message"]
    assert counts(site)["devices"] == 0


def test_wrong_content_type_is_415(api: str) -> None:
    code, body = post(api + "/api/v1/devices/need-register", REGISTER_BODY, content_type="text/plain")
    assert (code, body["errorCode"]) == (415, "UNSUPPORTED_MEDIA_TYPE")


def test_config_sync_both_forms(api: str, site: Site) -> None:
    raw = json.dumps({"machine": {"ACTIVE": False}}).encode()
    code, body = post(api + f"/api/v1/device/sync-configs/{DEVICE}", raw)
    assert (code, body["errorCode"]) == (404, "DEVICE_NOT_FOUND")
    post(api + "/api/v1/devices/need-register", REGISTER_BODY)
    code, body = post(api + f"/api/v1/device/sync-configs/{DEVICE}", raw)
    assert (code, body) == (200, {"success": True, "message": "Device configs synced successfully"})
    startup = json.dumps(STARTUP, indent=2).encode()
    assert post(api + "/api/v1/devices/sync", startup)[0] == 200
    assert post(api + f"/api/v1/device/sync-configs/{DEVICE}", startup)[0] == 200
    other = json.dumps({**STARTUP, "device_id": "device-other"}).encode()
    code, body = post(api + f"/api/v1/device/sync-configs/{DEVICE}", other)
    assert (code, body["errorCode"]) == (400, "VALIDATION_FAILED") and "device_id" in body["message"]
    code, dev = http_json(api + f"/api/v1/devices/{DEVICE}", headers=login(api))
    assert dev["data"]["configs"] == STARTUP["payload"]["configs"] and dev["data"]["status"] == "NORMAL"
    assert [e["kind"] for e in dev["data"]["events"]][:2] == ["startup", "startup"]
    assert counts(site)["configs"] == 3


def test_event_log_upload_dedup_mismatch_limits(api: str, site: Site) -> None:
    post(api + "/api/v1/devices/need-register", REGISTER_BODY)
    url = api + "/api/v1/device-event-logs/uploads"
    raw = json.dumps({"device_id": DEVICE, "items": [LOG_ITEM]}).encode()
    assert post(url, raw) == (201, {"success": True, "data": {"length": 1}, "message": "Logs uploaded successfully"})
    # The same item again: counted, not stored twice.
    wrong_total = {**LOG_ITEM, "timestamp": LOG_ITEM["timestamp"] + 1, "total_amount": 7}
    raw2 = json.dumps({"device_id": DEVICE, "items": [LOG_ITEM, wrong_total]}).encode()
    assert post(url, raw2)[1]["data"] == {"length": 2}
    db = open_database(site.config.paths.database)
    try:
        rows = list(EventLogItem.select().order_by(EventLogItem.timestamp_ms))
        assert [(r.total_amount, r.amount_mismatch) for r in rows] == [(5, False), (7, True)]
        assert OutboxEvent.select().where(OutboxEvent.type == "device.event_logs").count() == 2
    finally:
        db.close()
    for body, field in ((json.dumps({"device_id": DEVICE, "items": []}), "items"),
                        (json.dumps({"device_id": DEVICE, "items": [LOG_ITEM] * 1001}), "items"),
                        (json.dumps({"device_id": DEVICE, "items": [{**LOG_ITEM, "status": "PAID"}]}),
                         "items[0].status"),
                        (json.dumps({"device_id": DEVICE, "items": [{**LOG_ITEM, "coin": {"3": 1}}]}),
                         "items[0].coin.3")):
        code, resp = post(url, body.encode())
        assert (code, resp["errorCode"]) == (400, "VALIDATION_FAILED") and field in resp["message"]
    code, resp = post(url, json.dumps({"device_id": "device-unknown", "items": [LOG_ITEM]}).encode())
    assert (code, resp["errorCode"]) == (404, "DEVICE_NOT_FOUND")
    assert counts(site)["logs"] == 2


def test_streaming_presence_online_offline_and_bad_messages(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from gateway.access.signing import sign_mqtt
    from tests.conftest import make_site, start_process
    from tests.mqtt_probe import Probe

    site = make_site(tmp_path / "site", "[devices]\nstreaming_interval_sec = 1.0\noffline_after_intervals = 2\n")
    ensure_demo_user(site.config_path)
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        post(site.web_url + "/api/v1/devices/need-register", REGISTER_BODY)
        with Probe(site.mqtt_port) as device, Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                                                    password=site.secrets.mqtt_internal_password) as watch:
            watch.connect()
            watch.subscribe("server/#")
            watch.subscribe(f"gateway/presence/{DEVICE}")
            device.connect()
            good = sign_mqtt({"rssi": -76, "status": "NORMAL", "uptime": 39623, "timestamp": 1758358335794}, KEY)
            bad_sig = good.replace(b"-76", b"-77")
            for payload in (b"not json", bad_sig, sign_mqtt({"rssi": "loud"}, KEY), good):
                device.publish(f"server/{DEVICE}/streaming", payload)
            # A malformed ACK: dropped (it cannot be trusted), but counted for the device's page.
            device.publish(f"server/{DEVICE}/ack", sign_mqtt({"command_id": "cmd-1", "device_id": DEVICE,
                                                              "command": "RESTART", "status": "MAYBE",
                                                              "timestamp": 1}, KEY))
            device.publish("server/device-unknown/streaming", good)
            watch.until("server/device-unknown/streaming")
            # Online now; silent for 2 intervals: offline.
            online = json.loads(watch.expect(f"gateway/presence/{DEVICE}").payload)
            offline = json.loads(watch.expect(f"gateway/presence/{DEVICE}", 15).payload)
        assert (online["online"], online["rssi"], offline["online"]) == (True, -76, False)
        code, dev = http_json(site.web_url + f"/api/v1/devices/{DEVICE}", headers=login(site.web_url))
        assert dev["data"]["online"] is False and dev["data"]["rssi"] == -76 and dev["data"]["status"] == "NORMAL"
        assert [e["kind"] for e in dev["data"]["events"]][:2] == ["offline", "online"]
        log = core.log()
        for reason in ("not_json", "bad_signature", "invalid", "unknown_device"):
            assert f": {reason}: " in log, reason
        # The device's page: per-device counts and the last reason (issue 17).
        import urllib.request

        token = login(site.web_url)["Authorization"].split()[1]
        req = urllib.request.Request(site.web_url + f"/devices/{DEVICE}", headers={"Cookie": f"cw_token={token}"})
        with urllib.request.urlopen(req, timeout=15) as r:
            html = r.read().decode()
        m = re.search(r'<p id="bad-messages"[^>]*>(.*?)</p>', html, re.S)
        assert m is not None, html
        assert "ACK 1" in m.group(1) and "streaming 3" in m.group(1) and "ack invalid" in m.group(1)
    finally:
        web.stop()
        assert core.stop() == 0


def test_presence_saved_in_batches_with_history_over_every_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """SD-card wear: only the online transition is written at once; last seen and rssi wait for
    the next save (here: the orderly stop), and the history bucket covers every message. The web
    shows the live values meanwhile (`gateway/live/{device_id}`)."""
    from gateway.access.signing import sign_mqtt
    from gateway.clock import iso_z
    from gateway.store import open_database
    from gateway.store.models import Device, DeviceStatusSample
    from sim.demo import ensure_demo_user
    from tests.conftest import make_site, start_process
    from tests.mqtt_probe import Probe

    site = make_site(tmp_path / "site", "[devices]\npresence_save_sec = 3600\n")
    core = start_process(site, "core")
    web = start_process(site, "web")

    def stored_last_seen() -> str:
        db = open_database(site.config.paths.database)
        try:
            return iso_z(Device.get_by_id(DEVICE).last_seen_at)
        finally:
            db.close()

    def stored() -> tuple[int | None, list[tuple[int | None, int | None, int | None, int]]]:
        db = open_database(site.config.paths.database)
        try:
            return Device.get_by_id(DEVICE).rssi, [(r.rssi_min, r.rssi_max, r.rssi_last, r.samples)
                                                    for r in DeviceStatusSample.select()]
        finally:
            db.close()

    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        post(site.web_url + "/api/v1/devices/need-register", REGISTER_BODY)
        with Probe(site.mqtt_port) as device, Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                                                    password=site.secrets.mqtt_internal_password,
                                                    client_id="presence-test") as watch:
            watch.connect()
            watch.subscribe(f"gateway/presence/{DEVICE}")
            watch.subscribe("gateway/reply/presence-test")
            device.connect()
            for rssi in (-80, -60, -70):
                device.publish(f"server/{DEVICE}/streaming", sign_mqtt({"rssi": rssi, "status": "NORMAL"}, KEY))
            assert json.loads(watch.expect(f"gateway/presence/{DEVICE}").payload)["online"] is True
            # The core handles client messages in arrival order: once this RPC is answered, it has
            # taken the three streaming messages.
            watch.publish("gateway/rpc/commands.stats",
                          json.dumps({"id": "1", "reply_to": "gateway/reply/presence-test", "params": {}}))
            assert json.loads(watch.expect("gateway/reply/presence-test", 10).payload)["ok"] is True
        assert stored() == (-80, [])  # the online transition only
        # The web asks the core (outbox state) over the broker: the core published the live state
        # before it took that request, so the web has it once the answer is back.
        ensure_demo_user(site.config_path)
        auth = login(site.web_url)
        assert http_json(site.web_url + "/api/v1/outbox/state", headers=auth)[0] == 200
        code, body = http_json(site.web_url + f"/api/v1/devices/{DEVICE}", headers=auth)
        assert code == 200 and (body["data"]["rssi"], body["data"]["online"]) == (-70, True), body
        assert body["data"]["last_seen_at"] >= stored_last_seen()
    finally:
        web.stop()
        assert core.stop() == 0
    assert stored() == (-70, [(-80, -60, -70, 3)])  # saved at the stop, over every message


def login(api: str) -> dict[str, str]:
    code, body = http_json(api + "/api/v1/auth/login", method="POST", body={"username": "demo", "password": "demo"})
    assert code == 200, body
    return {"Authorization": "Bearer " + body["data"]["token"]}


def test_claim_and_reject_need_a_technician(api: str, site: Site) -> None:
    from sim.demo import ensure_demo_user

    ensure_demo_user(site.config_path)
    pin = post(api + "/api/v1/devices/need-register", REGISTER_BODY)[1]["data"]["pin"]
    url = api + f"/api/v1/devices/{DEVICE}/claim"
    code, body = http_json(url, method="POST", body={"name": "Box 1"})
    assert (code, body["errorCode"]) == (401, "UNAUTHORIZED")
    code, body = http_json(url, method="POST", body={"name": "Box 1"}, headers={"Authorization": "Bearer forged.x.y"})
    assert (code, body["errorCode"]) == (401, "UNAUTHORIZED")
    code, body = http_json(api + "/api/v1/auth/login", method="POST", body={"username": "demo", "password": "nope"})
    assert (code, body["errorCode"]) == (401, "UNAUTHORIZED")
    auth = login(api)
    wrong = "0000" if pin != "0000" else "1111"
    code, body = http_json(url, method="POST", body={"name": "Box 1", "pin": wrong}, headers=auth)
    assert (code, body["errorCode"]) == (409, "CONFLICT")
    assert http_json(url, method="POST", body={"name": "Box 1", "pin": pin}, headers=auth)[0] == 200
    dev = http_json(api + f"/api/v1/devices/{DEVICE}", headers=auth)[1]["data"]
    assert (dev["claimed"], dev["pending"], dev["name"], dev["pin"]) == (True, False, "Box 1", None)
    assert http_json(api + "/api/v1/devices?status=pending", headers=auth)[1]["data"] == []
    code, body = http_json(api + "/api/v1/devices/nobody/reject", method="POST", headers=auth)
    assert (code, body["errorCode"]) == (404, "DEVICE_NOT_FOUND")


def test_pin_expires(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_site, start_process

    site = make_site(tmp_path / "site", "[devices]\npin_ttl_sec = 30\n")
    ensure_demo_user(site.config_path)
    core, web = start_process(site, "core"), None
    try:
        web = start_process(site, "web")
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        post(site.web_url + "/api/v1/devices/need-register", REGISTER_BODY)
        # Age the PIN in the store instead of waiting: the listing must stop showing it.
        db = open_database(site.config.paths.database)
        try:
            from gateway.clock import utc_now

            Device.update(pin_expires_at=utc_now()).where(Device.device_id == DEVICE).execute()
        finally:
            db.close()
        dev = http_json(site.web_url + "/api/v1/devices", headers=login(site.web_url))[1]["data"][0]
        assert (dev["pending"], dev["pin"]) == (True, None)
    finally:
        if web is not None:
            web.stop()
        core.stop()


def test_upload_is_on_disk_when_the_201_arrives(api: str, site: Site, web: Proc) -> None:
    import signal

    post(api + "/api/v1/devices/need-register", REGISTER_BODY)
    items = [{**LOG_ITEM, "timestamp": LOG_ITEM["timestamp"] + i} for i in range(500)]
    code, _ = post(api + "/api/v1/device-event-logs/uploads",
                   json.dumps({"device_id": DEVICE, "items": items}).encode())
    assert code == 201
    import psutil

    # SIGKILL the worker that answered and its arbiter at once: nothing gets to flush anything.
    procs = [psutil.Process(web.popen.pid), *psutil.Process(web.popen.pid).children(recursive=True)]
    for p in procs:
        p.send_signal(signal.SIGKILL)
    psutil.wait_procs(procs, timeout=10)
    web.popen.wait(10)
    assert counts(site)["logs"] == 500


def test_pairing_window_when_required(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from sim.demo import ensure_demo_user
    from tests.conftest import make_site, start_process
    from tests.mqtt_probe import Probe

    site = make_site(tmp_path / "site", "[devices]\npairing_requires_button = true\npairing_window_sec = 10\n")
    ensure_demo_user(site.config_path)
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        url = site.web_url
        code, body = post(url + "/api/v1/devices/need-register", REGISTER_BODY)
        assert (code, body["errorCode"]) == (403, "FORBIDDEN")
        assert counts(site)["devices"] == 0
        auth = login(url)
        assert http_json(url + "/api/v1/pairing/open", method="POST")[0] == 401
        with Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                   password=site.secrets.mqtt_internal_password) as watch:
            watch.connect()
            watch.subscribe("gateway/pairing")
            assert json.loads(watch.expect("gateway/pairing").payload)["open"] is False
            code, body = http_json(url + "/api/v1/pairing/open", method="POST", body={"seconds": 1}, headers=auth)
            assert code == 200 and body["data"]["open"] is True
            assert json.loads(watch.expect("gateway/pairing").payload)["open"] is True
            assert post(url + "/api/v1/devices/need-register", REGISTER_BODY)[0] == 200
            # It closes by itself.
            assert json.loads(watch.expect("gateway/pairing", 10).payload)["open"] is False
        code, body = post(url + "/api/v1/devices/need-register", REGISTER_BODY)
        assert (code, body["errorCode"]) == (403, "FORBIDDEN")
        code, body = http_json(url + "/api/v1/pairing/open", method="POST", body={"seconds": 0}, headers=auth)
        assert (code, body["errorCode"]) == (400, "VALIDATION_FAILED")
    finally:
        web.stop()
        assert core.stop() == 0


def test_device_api_is_rate_limited_per_address(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from tests.conftest import make_site, start_process

    site = make_site(tmp_path / "site")
    text = site.config_path.read_text()  # the demo config has its own [web] table: add to it
    site.config_path.write_text(text.replace("[web]\n", "[web]\ndevice_rate_per_sec = 0.5\ndevice_rate_burst = 3\n"
                                                         "rate_limit_exempt = []\n", 1))
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        url = site.web_url + "/api/v1/devices/need-register"
        codes = [post(url, REGISTER_BODY)[0] for _ in range(3)]
        assert codes == [200, 200, 200]
        code, body = post(url, REGISTER_BODY)
        assert code == 429 and body["errorCode"] == "RATE_LIMITED" and body["statusCode"] == 429
        # Other APIs of the same address are not the device API's budget.
        code, _ = http_json(site.web_url + "/api/health")
        assert code == 200
    finally:
        web.stop()
        assert core.stop() == 0
