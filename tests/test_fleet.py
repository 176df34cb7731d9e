"""The device fleet simulator against the real core and gunicorn: pairing, startup, streaming
presence for every device, command answers by behaviour, and payments uploaded after a reset."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from gateway.access.signing import parse_signed_mqtt, sign_mqtt
from sim.demo import ensure_demo_user
from sim.fleet import Fleet
from tests.clients import http_json
from tests.conftest import Site, make_site, start_process
from tests.mqtt_probe import Probe
from web.context import STATUS_CONNECTED

COUNT = 40


@contextlib.asynccontextmanager
async def fleet_on_site(tmp_path: Path, toml: str, topics: tuple[str, ...], **fleet_kw: Any) -> AsyncIterator[
        tuple[Site, Fleet, Probe]]:
    """A real core and web, an internal MQTT probe subscribed to `topics`, and `Fleet(**fleet_kw)`
    running (paired and connected) against them; everything stopped afterwards."""
    site = make_site(tmp_path / "site", toml)
    ensure_demo_user(site.config_path)  # the device listing needs a technician
    core = await asyncio.to_thread(start_process, site, "core")
    web = await asyncio.to_thread(start_process, site, "web")
    stop = asyncio.Event()
    fleet = Fleet(base_url=site.web_url, mqtt_host="127.0.0.1", mqtt_port=site.mqtt_port,
                  key=site.secrets.device_signing_key, **fleet_kw)
    runner = None
    try:
        await asyncio.to_thread(web.notify.wait_for, "STATUS=" + STATUS_CONNECTED, 20)
        with Probe(site.mqtt_port, username=site.config.mqtt.internal_username,
                   password=site.secrets.mqtt_internal_password) as gw:
            await asyncio.to_thread(gw.connect)
            for topic in topics:
                await asyncio.to_thread(gw.subscribe, topic)
            runner = asyncio.create_task(fleet.run(stop))
            await asyncio.wait_for(fleet.ready.wait(), 60)
            yield site, fleet, gw
    finally:
        stop.set()
        if runner is not None:
            await asyncio.wait_for(runner, 30)
        await asyncio.to_thread(web.stop)
        assert await asyncio.to_thread(core.stop) == 0


async def test_fleet_pairs_streams_and_answers(tmp_path: Path) -> None:
    async with fleet_on_site(tmp_path, "[devices]\nstreaming_interval_sec = 2.0\n",
                             ("gateway/presence/+", "server/+/ack"), count=COUNT, interval=1.0,
                             behaviours=("success", "failure", "silent")) as (site, fleet, gw):
        key = site.secrets.device_signing_key
        online: set[str] = set()
        while len(online) < COUNT:
            m = await asyncio.to_thread(gw.expect, None, 20)
            if m.topic.startswith("gateway/presence/") and json.loads(m.payload)["online"]:
                online.add(m.topic.rsplit("/", 1)[1])
        assert online == {d.device_id for d in fleet.devices}
        # Commands (published here as the dispatcher of the commands issue will): answers by behaviour.
        answers: dict[str, str] = {}
        for d in fleet.devices[:3]:
            cmd = {"command_id": f"cmd-{d.device_id}", "command": "RESTART", "require_ack": True,
                   "payload": {"delay_seconds": 0}, "timestamp": 1}
            await asyncio.to_thread(gw.publish, f"device/{d.device_id}/command", sign_mqtt(cmd, key))
        while len(answers) < 2:
            m = await asyncio.to_thread(gw.expect, None, 10)
            if m.topic.endswith("/ack"):
                ack = parse_signed_mqtt(m.payload, key)
                answers[ack["device_id"]] = ack["status"]
        assert answers == {fleet.devices[0].device_id: "SUCCESS", fleet.devices[1].device_id: "FAILED"}
        code, token = await asyncio.to_thread(http_json, site.web_url + "/api/v1/auth/login", method="POST",
                                              body={"username": "demo", "password": "demo"})
        auth = {"Authorization": "Bearer " + token["data"]["token"]}
        code, listing = await asyncio.to_thread(http_json, site.web_url + "/api/v1/devices?status=online",
                                                headers=auth)
        assert code == 200 and len(listing["data"]) == COUNT
        kinds = {d["device_type"] for d in listing["data"]}
        assert kinds == {"CAR_WASH", "HELMET_DRYER"}
        code, one = await asyncio.to_thread(http_json, site.web_url + f"/api/v1/devices/{fleet.devices[0].device_id}",
                                            headers=auth)
        assert one["data"]["configs"]["machine"]["ACTIVE"] is True


def _stored(site_db: str | Path, device_id: str) -> tuple[int, int, int]:
    """(event-log items, distinct timestamps, startup documents) stored for a device."""
    con = sqlite3.connect(f"file:{site_db}?mode=ro", uri=True)
    try:
        items, stamps = con.execute('SELECT COUNT(*), COUNT(DISTINCT "timestamp_ms") FROM "event_log_item" '
                                    'WHERE "device_id" = ?', (device_id,)).fetchone()
        (startups,) = con.execute('SELECT COUNT(*) FROM "device_lifecycle_event" WHERE "device_id" = ? '
                                  "AND \"kind\" = 'startup'", (device_id,)).fetchone()
    finally:
        con.close()
    return items, stamps, startups


async def test_devices_upload_their_payments_after_a_reset(tmp_path: Path) -> None:
    """As firmware does: payments wait in the device; a RESTART it acknowledges makes it start up
    again and upload them, once; a device that refuses the restart uploads nothing."""
    async with fleet_on_site(tmp_path, "", ("server/+/ack",), count=2, interval=30.0,
                             behaviours=("success", "failure"), payment_every=0.02,
                             reboots=True) as (site, fleet, gw):
        key = site.secrets.device_signing_key
        ok, refusing = fleet.devices
        db = site.config.paths.database
        assert await asyncio.to_thread(_stored, db, ok.device_id) == (0, 0, 1)  # no reset, no upload

        async def restart(n: int) -> None:
            for d in fleet.devices:
                cmd = {"command_id": f"cmd-{n}-{d.device_id}", "command": "RESTART", "require_ack": True,
                       "payload": {"delay_seconds": 0}, "timestamp": 1}
                await asyncio.to_thread(gw.publish, f"device/{d.device_id}/command", sign_mqtt(cmd, key))
            acks: dict[str, str] = {}
            while len(acks) < 2:
                m = await asyncio.to_thread(gw.expect, None, 10)
                ack = parse_signed_mqtt(m.payload, key)
                acks[ack["device_id"]] = ack["status"]
            assert acks == {ok.device_id: "SUCCESS", refusing.device_id: "FAILED"}
            await asyncio.wait_for(ok.rebooted.wait(), 30)

        await restart(1)
        first = ok.uploaded
        assert first > 0 and not ok.buffer and ok.boots == 2
        assert await asyncio.to_thread(_stored, db, ok.device_id) == (first, first, 2)
        ok.rebooted.clear()
        await restart(2)  # only the payments made since the first reset
        assert ok.uploaded > first and ok.boots == 3
        assert await asyncio.to_thread(_stored, db, ok.device_id) == (ok.uploaded, ok.uploaded, 3)
        assert refusing.boots == 1 and refusing.uploaded == 0
        assert await asyncio.to_thread(_stored, db, refusing.device_id) == (0, 0, 1)
