"""WashService in-process: the real embedded broker and store, a fake fieldbus at the scheduler's
seam (writes recorded, polls composed by the test) and a frozen clock (gateway.wash.service's
`time`), so that session ids, timestamps and the start timeout are exact whatever the load."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.store.models import Bay, BayReset, OutboxEvent, WashSession
from gateway.wash import service as wash_service
from gateway.wash.machine import Verdict
from gateway.wash.service import WashService
from tests.conftest import make_site
from tests.mqtt_probe import Probe
from tests.unit.harness import WAIT, FakeClock, FakeFieldbus, Reading, Rig, expect, publish, rig

SITE_TOML = """[wash]
start_timeout_sec = 5
offline_after = 3
[[buses]]
name = "lan"
type = "tcp"
host = "127.0.0.1"
port = 1  # never dialled: FakeFieldbus replaces the scheduler
[[bays]]
id = "bay1"
bus = "lan"
unit = 1
[[bays]]
id = "bay2"
bus = "lan"
unit = 1
base = 18
"""
START_CODE, RESET_CODE = 1, 3  # washbay-v1 commands
BASIC = 1


@dataclass
class Wash:
    rig: Rig
    service: WashService
    plc: FakeFieldbus
    clock: FakeClock
    health: list[dict[str, bool]]
    probe: Probe

    async def status(self, bay: str = "bay1") -> dict:
        return json.loads((await expect(self.probe, f"wash/{bay}/status")).payload)

    async def mqtt_command(self, bay: str, body: dict | bytes) -> dict:
        """Publish on wash/{bay}/cmd as a local client would; the service's answer on cmd/result."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await publish(self.probe, f"wash/{bay}/cmd", raw)
        return json.loads((await expect(self.probe, f"wash/{bay}/cmd/result")).payload)


@contextlib.asynccontextmanager
async def running_wash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Wash]:
    """A started WashService with its tasks running, wired as CoreApp wires it (the conftest's
    runner has no async fixtures: tests enter this themselves)."""
    clock = FakeClock()
    monkeypatch.setattr(wash_service, "time", clock)
    async with rig(make_site(tmp_path / "site", SITE_TOML)) as r:
        health: list[dict[str, bool]] = []
        svc = WashService(r.config, r.db, r.bus, health.append)
        await svc.start(r.rpc)
        plc = FakeFieldbus.install(svc)["lan"]
        r.run(svc.services(), svc.stop)
        with r.probe(client_id="wash-test") as probe:
            await asyncio.to_thread(probe.connect, WAIT)
            for topic in ("wash/+/status", "wash/+/cmd/result", "gateway/reply/wash-test"):
                await asyncio.to_thread(probe.subscribe, topic, 1, WAIT)
            yield Wash(r, svc, plc, clock, health, probe)


async def bring_online(w: Wash, bay: str = "bay1") -> None:
    """Bays start OFFLINE (retained); the first good poll makes one IDLE."""
    assert (await w.status(bay))["state"] == "OFFLINE"
    w.plc.poll(bay, Reading())
    assert (await w.status(bay))["state"] == "IDLE"


async def test_start_is_decided_written_and_the_session_follows_the_plc(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_wash(tmp_path, monkeypatch) as w:
        # An offline bay refuses, and nothing is written.
        d = await w.service.judge("bay1", "START", "BASIC", "r0")
        assert (d.verdict, d.status, d.code) == (Verdict.REJECTED, 503, "PLC_OFFLINE")
        await bring_online(w)
        assert w.plc.writes.empty()

        result = await w.mqtt_command("bay1", {"bayId": "bay1", "action": "START", "course": "BASIC",
                                               "requestId": "r1"})
        assert (result["accepted"], result["idempotent"], result["errorCode"]) == (True, False, None)
        st = await w.status()
        # The session id is the site's local time (Asia/Bangkok) of the frozen clock.
        assert (st["state"], st["requestId"], st["course"]) == ("STARTING", "r1", "BASIC")
        assert st["sessionId"] == "20260114-150000-bay1-001"
        assert st["timestampUtc"] == "2026-01-14T08:00:00.000Z"
        bay, offset, regs = await w.plc.next_write()
        assert (bay, offset, regs[:2]) == ("bay1", 0, [START_CODE, BASIC])
        seq = regs[2]

        # The same request again is idempotent (no second write); another one finds the bay busy.
        result = await w.mqtt_command("bay1", {"action": "START", "course": "BASIC", "requestId": "r1"})
        assert (result["accepted"], result["idempotent"]) == (True, True)
        result = await w.mqtt_command("bay1", {"action": "START", "course": "BASIC", "requestId": "r2"})
        assert (result["accepted"], result["statusCode"], result["errorCode"]) == (False, 409, "BAY_BUSY")
        assert w.plc.writes.empty()

        # The PLC takes it, washes, finishes: each step is published, the session closed and stored.
        w.clock.advance(1)
        w.plc.poll("bay1", Reading("WASHING", 40, seq, course="BASIC", session_counter=1))
        assert (await w.status())["state"] == "WASHING"
        w.clock.advance(60)
        w.plc.poll("bay1", Reading("DONE", 100, seq, course="BASIC", session_counter=1))
        st = await w.status()
        assert (st["state"], st["progress"], st["sessionId"]) == ("DONE", 100, "20260114-150000-bay1-001")
        row = WashSession.get(WashSession.session_id == "20260114-150000-bay1-001")
        assert (row.state, row.course, row.request_id) == ("DONE", "BASIC", "r1")
        assert (row.end_time - row.start_time).total_seconds() == 61
        assert OutboxEvent.select().where(OutboxEvent.type == "wash.session").count() == 1
        assert Bay.get(Bay.bay_id == "bay1").state == "DONE"


async def test_rpc_wash_command_meets_the_same_rules(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """The web's path: RPC `wash.command` over the broker, refusals as envelope codes."""
    async with running_wash(tmp_path, monkeypatch) as w:
        await bring_online(w, "bay2")

        async def call(params: dict) -> dict:
            req = {"id": uuid.uuid4().hex, "reply_to": "gateway/reply/wash-test", "params": params}
            await publish(w.probe, "gateway/rpc/wash.command", json.dumps(req).encode())
            reply = json.loads((await expect(w.probe, "gateway/reply/wash-test")).payload)
            assert reply["id"] == req["id"]
            return reply

        reply = await call({"bayId": "bay2", "action": "START", "course": "PREMIUM", "requestId": "web-1"})
        assert reply["ok"] and reply["result"]["sessionId"] == "20260114-150000-bay2-001"
        assert reply["result"]["course"] == "PREMIUM" and not reply["result"]["idempotent"]
        for params, status, code in [
            ({"bayId": "bay2", "action": "START", "course": "PREMIUM", "requestId": "web-2"}, 409, "BAY_BUSY"),
            ({"bayId": "bay9", "action": "START", "course": "BASIC"}, 404, "BAY_NOT_FOUND"),
            ({"bayId": "bay1", "action": "START", "course": "BASIC"}, 503, "PLC_OFFLINE"),
            ({"bayId": "bay2", "action": "START", "course": "DELUXE"}, 400, "VALIDATION_FAILED"),
            ({"bayId": "bay2", "action": "WAX"}, 400, "VALIDATION_FAILED"),
        ]:
            reply = await call(params)
            assert not reply["ok"] and (reply["error"]["status"], reply["error"]["code"]) == (status, code), params


async def test_bad_mqtt_commands_are_answered_not_obeyed(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_wash(tmp_path, monkeypatch) as w:
        await bring_online(w)
        for body, code, status in [
            (b"not json", "VALIDATION_FAILED", 400),
            (b"[1]", "VALIDATION_FAILED", 400),
            ({"bayId": "bay2", "action": "START", "course": "BASIC"}, "VALIDATION_FAILED", 400),  # not the topic's
            ({"action": "WAX"}, "VALIDATION_FAILED", 400),
            ({"action": "START", "course": 3}, "VALIDATION_FAILED", 400),
            ({"action": "STOP"}, "BAY_NOT_ACTIVE", 409),
            ({"action": "RESET"}, "CONFLICT", 409),
        ]:
            result = await w.mqtt_command("bay1", body)
            assert (result["accepted"], result["errorCode"], result["statusCode"]) == (False, code, status), body
        result = await w.mqtt_command("bay9", {"action": "START", "course": "BASIC"})
        assert (result["errorCode"], result["statusCode"]) == ("BAY_NOT_FOUND", 404)
        assert w.plc.writes.empty()


async def test_unconfirmed_start_times_out_on_the_clock(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A START the PLC never confirms (here the write itself fails) ends as ERROR / START_TIMEOUT
    when the clock passes `wash.start_timeout_sec`, not before: with the clock frozen, no load on
    the machine can make it time out early."""
    async with running_wash(tmp_path, monkeypatch) as w:
        await bring_online(w)
        w.plc.fail_writes = "timeout"
        d = await w.service.judge("bay1", "START", "STANDARD", "slow-1", "technician:t")
        assert d.verdict is Verdict.ACCEPTED
        assert (await w.status())["state"] == "STARTING"
        await w.plc.next_write()  # attempted, failed: logged, the timer decides
        w.clock.advance(5.25)
        st = await w.status()
        assert (st["state"], st["errorCode"]) == ("ERROR", "START_TIMEOUT")
        assert st["timestampUtc"] == "2026-01-14T08:00:05.250Z"
        row = WashSession.get(WashSession.request_id == "slow-1")
        assert (row.state, row.error_code) == ("ERROR", "START_TIMEOUT")
        assert (row.end_time - row.start_time).total_seconds() == 5.25
        # The PLC, reachable again, says IDLE without an error: the gateway's error clears.
        w.plc.fail_writes = None
        w.plc.poll("bay1", Reading())
        assert (await w.status())["state"] == "IDLE"


async def test_offline_after_failed_polls_health_and_reset_record(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_wash(tmp_path, monkeypatch) as w:
        await bring_online(w)
        assert w.health[-1]["bay1"] is True
        for _ in range(3):  # wash.offline_after
            w.plc.poll_failed("bay1")
        st = await w.status()
        assert (st["state"], st["errorCode"]) == ("OFFLINE", "PLC_OFFLINE")
        assert w.health[-1] == {"bay1": False, "bay2": False}
        # Back with a latched error (4: DOOR_OPEN); a RESET over MQTT is written and recorded.
        w.plc.poll("bay1", Reading("ERROR", error_code=4))
        st = await w.status()
        assert (st["state"], st["errorCode"]) == ("ERROR", "DOOR_OPEN")
        assert w.health[-1]["bay1"] is True
        result = await w.mqtt_command("bay1", {"action": "RESET"})
        assert result["accepted"]
        bay, _offset, regs = await w.plc.next_write()
        assert (bay, regs[0]) == ("bay1", RESET_CODE)
        w.clock.advance(1)
        w.plc.poll("bay1", Reading("IDLE", ack_seq=regs[2]))
        assert (await w.status())["state"] == "IDLE"
        await w.rig.close()  # stores what is unsaved; the rig's own close finds nothing left to do
        reset = BayReset.get(BayReset.bay == "bay1")
        assert (reset.error_code, reset.outcome) == ("DOOR_OPEN", "CLEARED")
        assert reset.requested_by == "mqtt:carwash-gateway/wash-test"

