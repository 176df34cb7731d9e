"""CommandService in-process: RPC `commands.send` over the real embedded broker, paho devices that
receive the signed command and ACK it, outcomes in the store and on the events topic. The clock of
gateway.commands.service is frozen (FakeClock), so a device without an ACK times out when the test
moves the clock past the deadline, never because the machine was slow."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.access.signing import parse_signed_mqtt, sign_mqtt
from gateway.clock import utc_now
from gateway.commands import service as command_service
from gateway.commands.service import CommandService
from gateway.devices.badmessages import BadMessages
from gateway.store.models import Command, CommandResult, Device, OperationEvent
from tests.conftest import make_site
from tests.mqtt_probe import Probe
from tests.unit.harness import WAIT, FakeClock, Rig, expect, publish, rig

# devices.command_timeout_sec at its minimum: while the clock stands still the service's timer
# wakes every second and finds nothing expired; once the clock is moved it acts within a second.
SITE_TOML = "[devices]\ncommand_timeout_sec = 1\n"
DEVICES = ("dev-a", "dev-b")


@dataclass
class Commands:
    rig: Rig
    service: CommandService
    clock: FakeClock
    bad: BadMessages
    observer: Probe
    devices: dict[str, Probe]

    async def call(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        """An RPC as the web's BusClient makes it; the reply as it arrives."""
        req = {"id": uuid.uuid4().hex, "reply_to": "gateway/reply/cmd-test", "params": params}
        await publish(self.observer, f"gateway/rpc/{method}", json.dumps(req).encode())
        reply = json.loads((await expect(self.observer, "gateway/reply/cmd-test")).payload)
        assert reply["id"] == req["id"]
        return reply

    async def received(self, device: str) -> dict[str, Any]:
        """The command a device got, checked against the site's signing key."""
        msg = await expect(self.devices[device], f"device/{device}/command")
        return parse_signed_mqtt(msg.payload, self.rig.secrets.device_signing_key)

    async def ack(self, device: str, command: dict[str, Any], status: str = "SUCCESS",
                  key: str | None = None) -> None:
        body = {"command_id": command["command_id"], "device_id": device, "command": command["command"],
                "status": status}
        await publish(self.devices[device], f"server/{device}/ack",
                      sign_mqtt(body, key or self.rig.secrets.device_signing_key))

    async def events(self, command_id: str, until: str) -> list[tuple[str, dict[str, Any]]]:
        """A command's stored events (as the web's SSE replays them), read at each announcement
        on `gateway/commands/{id}/events` until one names `until`."""
        out: list[tuple[str, dict[str, Any]]] = []
        last = 0
        while until not in (name for name, _ in out):
            msg = await expect(self.observer, f"gateway/commands/{command_id}/events")
            assert json.loads(msg.payload) == {"command_id": command_id}
            mine = (OperationEvent.stream == command_id) & (OperationEvent.id > last)
            rows = list(OperationEvent.select().where(mine).order_by(OperationEvent.id))
            if rows:
                last = rows[-1].id
            # The web sends the stored text as it is: the SSE data line.
            out += [(r.event, json.loads(r.data) if isinstance(r.data, str) else r.data) for r in rows]
        return out


def add_device(device_id: str, *, rejected: bool = False) -> None:
    Device.create(device_id=device_id, chip_id=f"chip-{device_id}", mac_address="AA:BB:CC:DD:EE:FF",
                  device_type="CAR_WASH", firmware_version="1.0.0", claimed=True, rejected=rejected,
                  registered_at=utc_now())


@contextlib.asynccontextmanager
async def running_commands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Commands]:
    clock = FakeClock()
    monkeypatch.setattr(command_service, "time", clock)
    async with rig(make_site(tmp_path / "site", SITE_TOML)) as r:
        with contextlib.ExitStack() as probes:
            for d in DEVICES:
                add_device(d)
            add_device("dev-rejected", rejected=True)
            bad = BadMessages()
            svc = CommandService(r.config, r.secrets, r.db, r.bus, bad)
            await svc.start(r.rpc)
            r.run(svc.services(), svc.stop)
            observer = probes.enter_context(r.probe(client_id="cmd-test"))
            await asyncio.to_thread(observer.connect, WAIT)
            for topic in ("gateway/reply/cmd-test", "gateway/commands/+/events"):
                await asyncio.to_thread(observer.subscribe, topic, 1, WAIT)
            devices = {}
            for d in DEVICES:
                devices[d] = probes.enter_context(r.probe(internal=False, client_id=d))
                await asyncio.to_thread(devices[d].connect, WAIT)
                await asyncio.to_thread(devices[d].subscribe, f"device/{d}/command", 1, WAIT)
            yield Commands(r, svc, clock, bad, observer, devices)


async def test_ack_succeeds_silence_times_out_on_the_clock_late_ack_ignored(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_commands(tmp_path, monkeypatch) as c:
        reply = await c.call("commands.send", {"command": "RESTART", "payload": {"delay_seconds": 0},
                                               "device_ids": ["dev-a", "dev-b"], "bulk": False, "source": "web"})
        assert reply["ok"], reply
        answer = reply["result"]
        assert (answer["status"], answer["total_devices"], answer["device_ids"]) == ("INITIATED", 2, ["dev-a", "dev-b"])
        cid = answer["command_id"]
        first = await c.events(cid, "progress")
        assert [d["pending"] for e, d in first if e == "progress"] == [2]

        got = {d: await c.received(d) for d in DEVICES}
        assert all(m["command_id"] == cid and m["command"] == "RESTART" and m["require_ack"] for m in got.values())
        # One signed body serves every device (it names none): signed once, when publishing began.
        assert got["dev-a"] == got["dev-b"]
        await c.ack("dev-a", got["dev-a"])
        events = await c.events(cid, "device-success")
        assert [d["device_id"] for e, d in events if e == "device-success"] == ["dev-a"]

        # dev-b stays silent. The clock stands still, so its deadline cannot pass; moved beyond the
        # one-second timeout, the timer turns it into TIMEOUT and completes the command.
        c.clock.advance(1.5)
        events = await c.events(cid, "results")
        names = [e for e, _ in events]
        assert "device-timeout" in names and "complete" in names
        timeout = next(d for e, d in events if e == "device-timeout")
        assert (timeout["device_id"], timeout["status"]) == ("dev-b", "TIMEOUT")
        complete = next(d for e, d in events if e == "complete")
        assert (complete["completed"], complete["timeout"], complete["failed"]) == (1, 1, 0)
        rows = {r.device_id: r.status for r in CommandResult.select().where(CommandResult.command == cid)}
        assert rows == {"dev-a": "SUCCESS", "dev-b": "TIMEOUT"}

        # A late ACK changes nothing; it is counted as ignored.
        await c.ack("dev-b", got["dev-b"])
        stats = (await c.call("commands.stats", {}))["result"]
        assert stats["acks_accepted"] == 1 and sum(stats["acks_ignored"].values()) == 1, stats
        assert stats["pending_commands"] == 0
        await c.rig.close()  # flushes what is queued
        assert Command.get(Command.command_id == cid).completed_at is not None
        assert {r.device_id: r.status for r in CommandResult.select()} == {"dev-a": "SUCCESS", "dev-b": "TIMEOUT"}


async def test_fire_and_forget_is_sent_at_once_and_bad_acks_are_counted(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_commands(tmp_path, monkeypatch) as c:
        reply = await c.call("commands.send", {"command": "PING", "device_ids": ["dev-a"], "bulk": True})
        assert reply["ok"] and reply["result"]["setup_id"].startswith("setup-")
        setup = reply["result"]["setup_id"]
        cid = reply["result"]["command_id"]
        got = await c.received("dev-a")
        assert (got["command"], got["require_ack"]) == ("PING", False)
        # Fire-and-forget: SENT once published, and the (bulk) command completes at once.
        events = await c.events(cid, "results")
        assert ("command-sent", "dev-a") in [(e, d.get("device_id")) for e, d in events]
        assert all(d["setup_id"] == setup for _, d in events)
        assert CommandResult.get(CommandResult.command == cid).status == "SENT"

        # An ACK signed with another key is dropped and recorded against the device.
        reply = await c.call("commands.send", {"command": "RESTART", "device_ids": ["dev-b"]})
        restart = await c.received("dev-b")
        await c.ack("dev-b", restart, key="not-the-site-key")
        await c.ack("dev-b", restart, status="FAILED")  # the genuine one is taken after it
        events = await c.events(reply["result"]["command_id"], "results")
        assert [d["status"] for e, d in events if e == "device-failed"] == ["FAILED"]
        assert c.bad.get("dev-b") is not None


async def test_refusals_name_what_is_wrong(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_commands(tmp_path, monkeypatch) as c:
        for params, status, code, words in [
            ({"command": "SELF_DESTRUCT", "device_ids": ["dev-a"]}, 400, "VALIDATION_FAILED", "command"),
            ({"command": "RESTART", "payload": {"delay_seconds": -1}, "device_ids": ["dev-a"]}, 400,
             "VALIDATION_FAILED", "payload.delay_seconds"),
            ({"command": "RESTART", "device_ids": []}, 400, "VALIDATION_FAILED", "device_ids"),
            ({"command": "RESTART", "device_ids": ["dev-a", "dev-zz"]}, 404, "DEVICE_NOT_FOUND", "dev-zz"),
            ({"command": "RESTART", "device_ids": ["dev-rejected"]}, 409, "CONFLICT", "dev-rejected"),
            ({"command": "APPLY_CONFIG", "payload": {"configs": {"machine": 1}}, "device_ids": ["dev-a"]}, 400,
             "VALIDATION_FAILED", "dev-a"),
            ({"command": "RESTART", "device_ids": ["dev-a"], "source": "mars"}, 400, "VALIDATION_FAILED", "source"),
        ]:
            reply = await c.call("commands.send", params)
            assert not reply["ok"], params
            err = reply["error"]
            assert (err["status"], err["code"]) == (status, code) and words in err["message"], (params, err)
        assert Command.select().count() == 0
        for d in DEVICES:  # nothing was published to anyone
            assert c.devices[d].messages.empty()
