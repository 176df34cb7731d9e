"""Restart recovery of device commands: kill -9 of the core with commands pending, then a restart.

- a command whose time ran out while the core was down is TIMEOUT at once;
- a command with time left is still answered (ACKs accepted, outcome stored, SSE complete);
- a command the core stored but never published (a crash in between) is published when its device
  is back.
"""

from __future__ import annotations

import datetime as dt
import json
import signal
import time
from typing import Any

from gateway.access.signing import http_signature, parse_signed_mqtt, sign_mqtt
from gateway.clock import utc_now
from gateway.store import open_database, write_tx
from gateway.store.models import Command, CommandResult, OperationEvent
from sim.demo import ensure_demo_user
from tests.clients import SseReader, http_json
from tests.conftest import Site, make_site, start_process
from tests.mqtt_probe import Probe
from tests.test_commands_e2e import names, read_all, token_for
from web.context import STATUS_CONNECTED

TIMEOUT_SEC = 2.0
KEY = "modernchabackdoor"  # the demo site's signing key (the spec's test vector)


def register(site: Site, chip: str) -> str:
    raw = json.dumps({"chip_id": chip, "mac_address": "24:0A:C4:00:00:" + chip[-2:],
                      "firmware_version": "car_wash_v1.00"}).encode()
    code, body = http_json(site.web_url + "/api/v1/devices/need-register", method="POST", data=raw,
                           headers={"Content-Type": "application/json",
                                    "x-signature": http_signature(raw, site.secrets.device_signing_key)})
    assert code == 200, body
    return body["data"]["device_id"]  # type: ignore[no-any-return]


def device(site: Site, device_id: str) -> Probe:
    p = Probe(site.mqtt_port, client_id=device_id)
    p.connect()
    p.subscribe(f"device/{device_id}/command")
    return p


def command_of(p: Probe, device_id: str, timeout: float = 10) -> dict[str, Any]:
    return parse_signed_mqtt(p.expect(f"device/{device_id}/command", timeout).payload, KEY)


def published(site: Site, command_id: str) -> dt.datetime | None:
    db = open_database(site.config.paths.database)
    try:
        row = CommandResult.get(CommandResult.command == command_id)
        return row.deadline_at  # type: ignore[no-any-return]
    finally:
        db.close()


def wait_published(site: Site, command_id: str, timeout: float = 10) -> dt.datetime:
    """The core marks a result row published right after the MQTT publish; poll the store for it."""
    end = time.monotonic() + timeout
    while (deadline := published(site, command_id)) is None:
        assert time.monotonic() < end, f"{command_id} never marked published"
        time.sleep(0.05)
    return deadline


def test_kill_9_with_commands_pending(tmp_path) -> None:  # type: ignore[no-untyped-def]
    site = make_site(tmp_path / "site", f"[devices]\ncommand_timeout_sec = {TIMEOUT_SEC}\n")
    core = start_process(site, "core")
    web = start_process(site, "web")
    probes: list[Probe] = []
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        ensure_demo_user(site.config_path)
        auth = token_for(site)
        a, b, c = (register(site, chip) for chip in ("A1B2C3D401", "A1B2C3D402", "A1B2C3D403"))
        pa, pb = device(site, a), device(site, b)
        probes += [pa, pb]

        def send(dev: str, command: str, payload: dict[str, Any]) -> str:
            code, body = http_json(site.web_url + f"/api/v1/devices/{dev}/commands", method="POST",
                                   body={"command": command, "payload": payload}, headers=auth)
            assert code == 200, body
            return body["data"]["command_id"]  # type: ignore[no-any-return]

        short = send(a, "RESTART", {"delay_seconds": 1})
        long = send(b, "UPDATE_FIRMWARE", {"url": "http://127.0.0.1/f.bin", "version": "car_wash_v3",
                                           "sha256": "ab" * 32, "timeout_sec": 60})
        assert command_of(pa, a)["command_id"] == short and command_of(pb, b)["command_id"] == long
        short_deadline = wait_published(site, short)
        wait_published(site, long)
        # b starts flashing before the crash: its PROGRESS is stored.
        pb.publish(f"server/{b}/ack", sign_mqtt({"command_id": long, "device_id": b, "command": "UPDATE_FIRMWARE",
                                                 "status": "PROGRESS", "progress": 10, "timestamp": 1},
                                                site.secrets.device_signing_key))
        ev = SseReader(site.web_url + f"/api/v1/devices/events/{long}", headers=auth)
        try:
            assert ev.wait_for(lambda d: d.get("status") == "PROGRESS")[-1][0] == "device-progress"
        finally:
            ev.close()

        core.popen.send_signal(signal.SIGKILL)
        core.popen.wait(10)
        core.notify.close()
        for p in probes:
            p.close()
        probes.clear()
        # While the core is down: a command stored but never published (what a crash between the
        # two leaves), for device c.
        db = open_database(site.config.paths.database)
        try:
            with write_tx(db):
                Command.create(command_id="cmd-crashed", command="PING", payload="{}", require_ack=False,
                               timeout_sec=TIMEOUT_SEC, created_at=utc_now(), source="web")
                CommandResult.create(command="cmd-crashed", device=c, status="PENDING", updated_at=utc_now())
        finally:
            db.close()
        # The scenario needs the short command's deadline to pass while the core is down.
        time.sleep(max(0.0, (short_deadline - utc_now()).total_seconds()) + 0.2)

        core = start_process(site, "core")
        # At once: while loading, not after a new wait (the core says so when it starts).
        assert "1 commands timed out while the core was down" in core.log()
        timed_out = read_all(SseReader(site.web_url + f"/api/v1/devices/events/{short}", headers=auth))
        assert names(timed_out) == ["progress", "device-timeout", "progress", "complete", "results"]

        pc = device(site, c)  # c comes back: the command a crash left unsent reaches it
        probes.append(pc)
        assert command_of(pc, c)["command_id"] == "cmd-crashed"
        crashed = read_all(SseReader(site.web_url + "/api/v1/devices/events/cmd-crashed", headers=auth))
        assert names(crashed) == ["command-sent", "progress", "complete", "results"]

        pb = device(site, b)
        probes.append(pb)
        pb.publish(f"server/{b}/ack", sign_mqtt({"command_id": long, "device_id": b, "command": "UPDATE_FIRMWARE",
                                                 "status": "SUCCESS", "new_version": "car_wash_v3", "timestamp": 2},
                                                site.secrets.device_signing_key))
        story = read_all(SseReader(site.web_url + f"/api/v1/devices/events/{long}", headers=auth))
        assert names(story) == ["progress", "device-progress", "device-success", "progress", "complete", "results"]
        assert story[2][2]["new_version"] == "car_wash_v3"
        code, one = http_json(site.web_url + f"/api/v1/devices/{b}", headers=auth)
        assert one["data"]["firmware_version"] == "car_wash_v3"
        db = open_database(site.config.paths.database)
        try:
            assert not Command.select().where(Command.completed_at.is_null()).exists()
            ids = [e.id for e in OperationEvent.select()]
            assert len(ids) == len(set(ids))
        finally:
            db.close()
    finally:
        for p in probes:
            p.close()
        web.stop()
        assert core.stop() == 0, core.log()[-3000:]
