"""Device commands end to end: technician → gunicorn → core (RPC) → embedded broker → simulated
devices (the fleet, real MQTT clients) → ACKs → stored outcomes → SSE, with short timeouts."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest

from gateway.access.signing import sign_mqtt
from gateway.store import open_database
from gateway.store.models import CommandResult, Device, DeviceConfig, OperationEvent, OutboxEvent
from gateway.store.outbox import stored_events
from sim.demo import ensure_demo_user
from sim.fleet import Fleet, FleetThread
from tests.clients import SseReader, http_json
from tests.conftest import Proc, Site, make_site, start_process
from tests.mqtt_probe import Probe
from web.context import STATUS_CONNECTED

TIMEOUT_SEC = 2.0
BEHAVIOURS = ("success", "failure", "silent", "progress")
COUNT = 8


@dataclass
class Rig:
    site: Site
    core: Proc
    web: Proc
    fleet: Fleet
    auth: dict[str, str]

    @property
    def api(self) -> str:
        return self.site.web_url

    def dev(self, behaviour: str, n: int = 0) -> str:
        return [d.device_id for d in self.fleet.devices if d.behaviour == behaviour][n]

    def post(self, path: str, body: Any = None, *, auth: bool = True) -> tuple[int, Any]:
        return http_json(self.api + path, method="POST", body=body if body is not None else {},
                         headers=self.auth if auth else {})

    def sse(self, path: str, **headers: str) -> SseReader:
        return SseReader(self.api + path, headers={**self.auth, **headers})


def token_for(site: Site) -> dict[str, str]:
    code, body = http_json(site.web_url + "/api/v1/auth/login", method="POST",
                           body={"username": "demo", "password": "demo"})
    assert code == 200, body
    return {"Authorization": "Bearer " + body["data"]["token"]}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    site = make_site(tmp_path_factory.mktemp("commands") / "site",
                     f"[devices]\ncommand_timeout_sec = {TIMEOUT_SEC}\n")
    core = start_process(site, "core")
    web = start_process(site, "web")
    fleet_thread = None
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        ensure_demo_user(site.config_path)
        fleet = Fleet(base_url=site.web_url, mqtt_host="127.0.0.1", mqtt_port=site.mqtt_port,
                      key=site.secrets.device_signing_key, count=COUNT, interval=30.0, behaviours=BEHAVIOURS,
                      helmet_share=0.0)
        fleet_thread = FleetThread(fleet)
        fleet_thread.start()
        yield Rig(site, core, web, fleet, token_for(site))
    finally:
        if fleet_thread is not None:
            fleet_thread.stop()
            assert not fleet_thread._thread.is_alive()
        web.stop()
        assert core.stop() == 0, core.log()[-3000:]


def read_all(reader: SseReader, timeout: float = 15) -> list[tuple[str, str, Any]]:
    """Every event until the server closes the stream."""
    out = []
    while True:
        ev = reader.next(timeout)
        if ev[0] == "__closed__":
            return out
        out.append(ev)


def names(events: list[tuple[str, str, Any]]) -> list[str]:
    return [e[0] for e in events]


CONFIGS = {"machine": {"ACTIVE": True, "BANKNOTE": True, "COIN": True, "QR": True, "ON_TIME": "7:00",
                       "OFF_TIME": "22:00", "SAVE_STATE": True},
           "function": {"sec_per_baht": {"HP_WATER": 12, "FOAM": 10, "AIR": 10, "WATER": 10, "VACUUM": 10,
                                         "BLACK_TIRE": 10, "WAX": 10, "AIR_FRESHENER": 0, "PARKING_FEE": 600}}}


def test_the_seeds_three_device_example(rig: Rig) -> None:
    ok, bad, mute = rig.dev("success"), rig.dev("failure"), rig.dev("silent")
    code, body = rig.post("/api/v1/devices/apply-config", {"device_ids": [ok, bad, mute, ok], "configs": CONFIGS})
    assert code == 200, body
    data = body["data"]
    assert data["device_ids"] == [ok, bad, mute] and data["total_devices"] == 3 and data["status"] == "INITIATED"
    assert body["message"] == "Config apply initiated successfully"
    assert data["setup_id"].startswith("setup-") and data["command_id"] == "cmd-" + data["setup_id"][6:]
    reader = rig.sse(f"/api/v1/devices/bulk-events/{data['setup_id']}")
    try:
        assert reader.status == 200 and reader.content_type.startswith("text/event-stream")
        events = read_all(reader, timeout=TIMEOUT_SEC + 10)
    finally:
        reader.close()
    seq = names(events)
    # The two answers may arrive in either order; the timeout comes last, then the summary.
    assert seq[0] == "progress" and events[0][2]["progress"] == 0 and events[0][2]["pending"] == 3
    assert sorted([seq[1], seq[3]]) == ["device-failed", "device-success"] and seq[2] == seq[4] == "progress"
    assert seq[5:] == ["device-timeout", "progress", "complete", "results"]
    assert [events[i][2]["progress"] for i in (2, 4, 6)] == [33.33, 66.67, 100]
    by_dev = {e[2]["device_id"]: e[2] for e in events if e[0].startswith("device-")}
    cid = data["command_id"]
    assert by_dev[ok] == {"device_id": ok, "command_id": cid, "command": "APPLY_CONFIG", "setup_id": data["setup_id"],
                          "status": "SUCCESS", "timestamp": by_dev[ok]["timestamp"]}
    assert by_dev[bad]["status"] == "FAILED" and by_dev[bad]["error"] == "simulated failure"
    assert by_dev[mute]["status"] == "TIMEOUT" and by_dev[mute]["error"] == "Device did not respond"
    # The timeout came after the answers (its precision is measured in bench/commands.py, not here).
    assert by_dev[mute]["timestamp"] > max(by_dev[ok]["timestamp"], by_dev[bad]["timestamp"])
    assert events[-2][2] == {"command_id": cid, "command": "APPLY_CONFIG", "setup_id": data["setup_id"], "total": 3,
                             "completed": 1, "failed": 1, "timeout": 1, "status": "COMPLETED",
                             "timestamp": events[-2][2]["timestamp"]}
    assert [(r["device_id"], r["status"]) for r in events[-1][2]["results"]] == [
        (ok, "SUCCESS"), (bad, "FAILED"), (mute, "TIMEOUT")]
    ids = [int(e[1]) for e in events]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # The device really got the configs, once, and the store records them as applied.
    sim = next(d for d in rig.fleet.devices if d.device_id == ok)
    assert sim.configs == CONFIGS
    assert sum(1 for c in sim.commands if c["command_id"] == cid) == 1
    db = open_database(rig.site.config.paths.database)
    try:
        applied = DeviceConfig.select().where((DeviceConfig.device == ok) & (DeviceConfig.source == "apply")).get()
        assert json.loads(applied.configs) == CONFIGS
        assert not DeviceConfig.select().where((DeviceConfig.device == bad) & (DeviceConfig.source == "apply")).exists()
        results = {r.device_id: r.status for r in CommandResult.select().where(CommandResult.command == cid)}
        assert results == {ok: "SUCCESS", bad: "FAILED", mute: "TIMEOUT"}
        outbox = [body["payload"] for _, body in stored_events(OutboxEvent.type == "command.result")]
        mine = sorted((o["device_id"], o["status"]) for o in outbox if o["command_id"] == cid)
        assert mine == sorted(results.items())
    finally:
        db.close()

    # A late client gets the whole story, then the stream closes; Last-Event-ID resumes after an event.
    for path in (f"/api/v1/devices/bulk-events/{data['setup_id']}", f"/api/v1/devices/command-events/{cid}",
                 f"/api/v1/devices/events/{cid}"):
        late = rig.sse(path)
        try:
            assert read_all(late) == events
        finally:
            late.close()
    resumed = rig.sse(f"/api/v1/devices/command-events/{cid}", **{"Last-Event-ID": events[3][1]})
    try:
        assert read_all(resumed) == events[4:]
    finally:
        resumed.close()
    # The token may come as a query parameter (EventSource cannot send headers).
    token = rig.auth["Authorization"].split()[1]
    q = SseReader(rig.api + f"/api/v1/devices/events/{cid}?access_token={token}")
    try:
        assert names(read_all(q))[-1] == "results"
    finally:
        q.close()


class InternalProbe(Probe):
    """A client of the gateway's internal user: what it publishes reaches the core in order, so an
    RPC after some ACKs is answered after the core has handled them."""

    def __init__(self, site: Site) -> None:
        super().__init__(site.mqtt_port, username=site.config.mqtt.internal_username,
                         password=site.secrets.mqtt_internal_password, client_id=f"probe-{uuid.uuid4().hex[:8]}")
        self.reply = f"gateway/reply/{self.client._client_id.decode()}"

    def stats(self) -> dict[str, Any]:
        self.publish("gateway/rpc/commands.stats", json.dumps({"id": "1", "reply_to": self.reply, "params": {}}))
        answer = json.loads(self.expect(self.reply, 10).payload)
        assert answer["ok"], answer
        return answer["result"]  # type: ignore[no-any-return]


def test_duplicate_late_and_forged_acks_are_ignored(rig: Rig) -> None:
    ok, mute = rig.dev("success", 1), rig.dev("silent", 1)
    code, body = rig.post(f"/api/v1/devices/{mute}/restart", {"delay_seconds": 1})
    assert code == 200, body
    cid = body["data"]["command_id"]
    code, body = rig.post(f"/api/v1/devices/{ok}/restart")
    assert code == 200, body
    ok_cid = body["data"]["command_id"]
    key = rig.site.secrets.device_signing_key
    with InternalProbe(rig.site) as p:
        p.connect()
        p.subscribe(p.reply)
        before = p.stats()
        # A forged ACK (bad sha256) for the silent device: dropped, so the command still times out.
        forged = {"command_id": cid, "device_id": mute, "command": "RESTART", "status": "SUCCESS", "timestamp": 1}
        p.publish(f"server/{mute}/ack", sign_mqtt(forged, "not-the-key"))
        events = read_all(rig.sse(f"/api/v1/devices/events/{cid}"), timeout=TIMEOUT_SEC + 10)
        assert names(events) == ["progress", "device-timeout", "progress", "complete", "results"]
        assert names(read_all(rig.sse(f"/api/v1/devices/events/{ok_cid}")))[-1] == "results"
        # A late ACK after the timeout, and a duplicate ACK of a finished command: both ignored.
        late = {"command_id": cid, "device_id": mute, "command": "RESTART", "status": "SUCCESS", "timestamp": 2}
        p.publish(f"server/{mute}/ack", sign_mqtt(late, key))
        dup = {"command_id": ok_cid, "device_id": ok, "command": "RESTART", "status": "FAILED", "timestamp": 3}
        p.publish(f"server/{ok}/ack", sign_mqtt(dup, key))
        after = p.stats()
    assert after["dropped"].get("bad_signature", 0) == before["dropped"].get("bad_signature", 0) + 1
    assert after["acks_ignored"].get("late", 0) == before["acks_ignored"].get("late", 0) + 1
    assert after["acks_ignored"].get("duplicate", 0) == before["acks_ignored"].get("duplicate", 0) + 1
    # Nothing changed in the store: no new events for either stream, outcomes as they were.
    assert read_all(rig.sse(f"/api/v1/devices/events/{cid}")) == events
    code, one = http_json(rig.api + f"/api/v1/devices/commands/{ok_cid}", headers=rig.auth)
    assert code == 200 and [r["status"] for r in one["data"]["results"]] == ["SUCCESS"]


def test_fire_and_forget_ping(rig: Rig) -> None:
    dev = rig.dev("silent")
    code, body = rig.post(f"/api/v1/devices/{dev}/commands", {"command": "PING"})
    assert code == 200, body
    events = read_all(rig.sse(f"/api/v1/devices/command-events/{body['data']['command_id']}"))
    assert names(events) == ["progress", "command-sent", "progress", "complete", "results"]
    assert events[1][2]["status"] == "SENT" and events[-2][2]["completed"] == 1
    sim = next(d for d in rig.fleet.devices if d.device_id == dev)
    got = [c for c in sim.commands if c["command_id"] == body["data"]["command_id"]]
    assert got and got[0]["require_ack"] is False and got[0]["command"] == "PING"


def test_bulk_restart_and_a_duplicate_free_bulk(rig: Rig) -> None:
    devs = [d.device_id for d in rig.fleet.devices if d.behaviour == "success"]
    code, body = rig.post("/api/v1/devices/bulk-restart", {"device_ids": devs + devs, "delay_seconds": 5})
    assert code == 200 and body["data"]["total_devices"] == len(devs), body
    events = read_all(rig.sse(f"/api/v1/devices/bulk-events/{body['data']['setup_id']}"))
    assert names(events).count("device-success") == len(devs) and events[-2][2]["completed"] == len(devs)
    cid = body["data"]["command_id"]
    for d in rig.fleet.devices:
        n = sum(1 for c in d.commands if c["command_id"] == cid)
        assert n == (1 if d.device_id in devs else 0)
        if n:
            assert next(c for c in d.commands if c["command_id"] == cid)["payload"] == {"delay_seconds": 5}


@pytest.mark.parametrize("body, status, code, words", [
    ({"device_ids": [], "configs": CONFIGS}, 400, "VALIDATION_FAILED", "device_ids"),
    ({"device_ids": ["dev-nope"], "configs": CONFIGS}, 404, "DEVICE_NOT_FOUND", "dev-nope"),
    ({"device_ids": ["not a device!"], "configs": CONFIGS}, 400, "VALIDATION_FAILED", "device_ids[0]"),
    ({"device_ids": "@success", "configs": {**CONFIGS, "machine": {**CONFIGS["machine"], "ACTIVE": "yes"}}}, 400,
     "VALIDATION_FAILED", "configs.machine.ACTIVE"),
    ({"device_ids": "@success"}, 400, "VALIDATION_FAILED", "configs"),
])
def test_apply_config_refusals(rig: Rig, body: dict, status: int, code: str, words: str) -> None:
    if body.get("device_ids") == "@success":
        body = {**body, "device_ids": [rig.dev("success"), rig.dev("failure")]}
    got, answer = rig.post("/api/v1/devices/apply-config", body)
    assert (got, answer["errorCode"]) == (status, code), answer
    assert words in answer["message"] and answer["path"] == "/api/v1/devices/apply-config"
    if code == "VALIDATION_FAILED" and "configs." in words:
        assert f"device {rig.dev('success')}" in answer["message"]  # the failing device is named


@pytest.mark.parametrize("command, payload, words", [
    ("SELF_DESTRUCT", {}, "command"),
    ("RESTART", {"delay_seconds": "soon"}, "payload.delay_seconds"),
    ("UPDATE_FIRMWARE", {"url": "ftp://x", "version": "1", "sha256": "0" * 64}, "payload.url"),
    ("UPDATE_FIRMWARE", {"firmware_id": 424242}, "424242"),
])
def test_command_refusals(rig: Rig, command: str, payload: dict, words: str) -> None:
    got, answer = rig.post(f"/api/v1/devices/{rig.dev('success')}/commands", {"command": command, "payload": payload})
    assert got in (400, 404) and words in answer["message"], answer


def test_tokens_missing_expired_and_forged_are_401(rig: Rig) -> None:
    cfg = rig.site
    expired = jwt.encode({"sub": "demo", "iss": "carwash-gateway", "exp": dt.datetime.now(dt.UTC)
                          - dt.timedelta(seconds=5)}, cfg.secrets.jwt_secret, algorithm="HS256")
    forged = jwt.encode({"sub": "demo", "iss": "carwash-gateway",
                         "exp": dt.datetime.now(dt.UTC) + dt.timedelta(hours=1)},
                        "a-guessed-key-that-is-long-enough!!", algorithm="HS256")
    for headers in ({}, {"Authorization": f"Bearer {expired}"}, {"Authorization": f"Bearer {forged}"},
                    {"Authorization": "Basic ZGVtbzpkZW1v"}):
        for method, path in (("POST", "/api/v1/devices/apply-config"), ("POST", "/api/v1/devices/bulk-restart"),
                             ("POST", f"/api/v1/devices/{rig.dev('success')}/restart"),
                             ("POST", f"/api/v1/devices/{rig.dev('success')}/commands"),
                             ("GET", "/api/v1/devices/command-events/cmd-x"),
                             ("GET", "/api/v1/devices/bulk-events/setup-x"), ("GET", "/api/v1/firmware")):
            code, body = http_json(rig.api + path, method=method, body={} if method == "POST" else None,
                                   headers=headers)
            assert code == 401 and body["errorCode"] == "UNAUTHORIZED", (headers, path, body)
    code, body = http_json(rig.api + "/api/v1/devices/command-events/cmd-nope", headers=rig.auth)
    assert code == 404 and body["errorCode"] == "COMMAND_NOT_FOUND"


def upload(rig: Rig, image: bytes, version: str) -> dict[str, Any]:
    code, body = http_json(rig.api + f"/api/v1/firmware?version={version}&device_type=CAR_WASH", method="POST",
                           data=image, headers={**rig.auth, "Content-Type": "application/octet-stream"})
    assert code in (200, 201), body
    return body["data"]  # type: ignore[no-any-return]


def test_firmware_update_with_progress(rig: Rig) -> None:
    image = bytes(range(256)) * 1200 + b"carwash-v2"
    img = upload(rig, image, "car_wash_v2.00")
    assert img["sha256"] == hashlib.sha256(image).hexdigest() and img["size"] == len(image)
    with urllib.request.urlopen(img["url"], timeout=10) as r:
        assert r.read() == image
    again = upload(rig, image, "car_wash_v2.00")
    assert again["id"] == img["id"]
    code, listing = http_json(rig.api + "/api/v1/firmware", headers=rig.auth)
    assert code == 200 and [i["id"] for i in listing["data"]].count(img["id"]) == 1

    flasher, plain = rig.dev("progress"), rig.dev("success")
    code, body = rig.post("/api/v1/devices/bulk-commands", {
        "device_ids": [flasher, plain], "command": "UPDATE_FIRMWARE",
        "payload": {"firmware_id": img["id"], "reboot_after": True, "timeout_sec": 30}})
    assert code == 200, body
    events = read_all(rig.sse(f"/api/v1/devices/bulk-events/{body['data']['setup_id']}"), timeout=40)
    progress = [e[2] for e in events if e[0] == "device-progress"]
    assert [p["progress"] for p in progress] == [25, 50, 75] and all(p["device_id"] == flasher for p in progress)
    done = {e[2]["device_id"]: e[2] for e in events if e[0] == "device-success"}
    assert set(done) == {flasher, plain} and done[flasher]["new_version"] == "car_wash_v2.00"
    sim = next(d for d in rig.fleet.devices if d.device_id == flasher)
    cmd = next(c for c in sim.commands if c["command_id"] == body["data"]["command_id"])
    assert cmd["payload"] == {"url": img["url"], "version": "car_wash_v2.00", "sha256": img["sha256"],
                              "size": len(image), "reboot_after": True, "timeout_sec": 30}
    code, one = http_json(rig.api + f"/api/v1/devices/{flasher}", headers=rig.auth)
    assert one["data"]["firmware_version"] == "car_wash_v2.00"

    # A payload whose sha256 is not the file's: the device refuses to flash (ERROR), nothing changes.
    code, body = rig.post(f"/api/v1/devices/{plain}/commands", {"command": "UPDATE_FIRMWARE", "payload": {
        "url": img["url"], "version": "car_wash_v9", "sha256": "ab" * 32}})
    events = read_all(rig.sse(f"/api/v1/devices/events/{body['data']['command_id']}"))
    failed = [e[2] for e in events if e[0] == "device-failed"]
    assert failed and failed[0]["status"] == "ERROR" and "sha256" in failed[0]["error"]
    db = open_database(rig.site.config.paths.database)
    try:
        assert Device.get_by_id(plain).firmware_version == "car_wash_v2.00"
    finally:
        db.close()


def test_firmware_upload_refusals(rig: Rig) -> None:
    url = rig.api + "/api/v1/firmware?version=v1"
    code, body = http_json(url, method="POST", data=b"x", headers={**rig.auth, "Content-Type": "application/json"})
    assert code == 415
    code, body = http_json(rig.api + "/api/v1/firmware?version=has%20space", method="POST", data=b"x",
                           headers={**rig.auth, "Content-Type": "application/octet-stream"})
    assert code == 400 and "version" in body["message"]
    # Announce one byte more than allowed: 413 before the server reads any of the body.
    conn = http.client.HTTPConnection("127.0.0.1", rig.site.web_port, timeout=10)
    try:
        conn.putrequest("POST", "/api/v1/firmware?version=v1")
        for k, v in {**rig.auth, "Content-Type": "application/octet-stream",
                     "Content-Length": str(rig.site.config.web.firmware_max_bytes + 1)}.items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        assert resp.status == 413 and json.loads(resp.read())["errorCode"] == "PAYLOAD_TOO_LARGE"
    finally:
        conn.close()
    code, body = http_json(rig.api + "/firmware/" + "0" * 64 + ".bin")
    assert code == 404 and body["errorCode"] == "NOT_FOUND"
    leftovers = list(Path(rig.site.config.paths.firmware_dir).glob(".upload-*"))
    assert leftovers == []


def test_events_are_stored_once_per_stream(rig: Rig) -> None:
    db = open_database(rig.site.config.paths.database)
    try:
        rows = list(OperationEvent.select().order_by(OperationEvent.id))
        assert rows and len({r.id for r in rows}) == len(rows)
        finals = [r.stream for r in rows if r.event == "results"]
        assert len(finals) == len(set(finals))  # every finished command closed exactly once
    finally:
        db.close()
