"""PresenceService in-process: paho devices stream signed messages to the real embedded broker; the
service's transitions appear retained on `gateway/presence/{id}` and in the store. Its clock
(gateway.devices.presence's `time`) is frozen: a device goes offline when the test moves the clock
past `streaming_interval_sec × offline_after_intervals`, not when the machine is slow."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.access.signing import sign_mqtt
from gateway.clock import utc_now
from gateway.devices import presence as presence_module
from gateway.devices.badmessages import BadMessages
from gateway.devices.presence import PresenceService
from gateway.store.models import Device, DeviceLifecycleEvent, DeviceStatusSample, OutboxEvent
from tests.conftest import make_site
from tests.mqtt_probe import Probe
from tests.unit.harness import WAIT, FakeClock, Rig, expect, publish, rig, until

# Offline after 3 × 10 s of silence (on the frozen clock); samples saved every 60 s.
SITE_TOML = "[devices]\nstreaming_interval_sec = 10\noffline_after_intervals = 3\npresence_save_sec = 60\n"


@dataclass
class Presence:
    rig: Rig
    service: PresenceService
    clock: FakeClock
    bad: BadMessages
    observer: Probe
    device: Probe

    async def stream(self, device: str = "dev-a", key: str | None = None, **fields: Any) -> None:
        body = {"device_id": device, "rssi": -60, "status": "NORMAL", "uptime": 5, **fields}
        await publish(self.device, f"server/{device}/streaming",
                      sign_mqtt(body, key or self.rig.secrets.device_signing_key))

    async def presence(self, device: str = "dev-a") -> dict[str, Any]:
        return json.loads((await expect(self.observer, f"gateway/presence/{device}")).payload)

    async def live(self, device: str = "dev-a") -> dict[str, Any]:
        return json.loads((await expect(self.observer, f"gateway/live/{device}")).payload)

    async def live_until(self, rssi: int, device: str = "dev-a") -> None:
        """Read live updates up to the one with `rssi`. Tests end with this: a subscriber that
        disconnects while the broker still delivers to it leaves the broker's side of the
        connection open (amqtt 0.12.1; reproduced with LocalBus alone), a ResourceWarning."""
        while (await self.live(device))["rssi"] != rssi:
            pass


@contextlib.asynccontextmanager
async def running_presence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Presence]:
    clock = FakeClock()
    monkeypatch.setattr(presence_module, "time", clock)
    async with rig(make_site(tmp_path / "site", SITE_TOML)) as r:
        Device.create(device_id="dev-a", chip_id="chip-a", mac_address="AA:BB:CC:DD:EE:01", device_type="CAR_WASH",
                      firmware_version="1.0.0", claimed=True, registered_at=utc_now())
        bad = BadMessages()
        svc = PresenceService(r.config, r.secrets, r.db, r.bus, bad)
        await svc.start()
        r.run(svc.services(), svc.stop)
        with r.probe(client_id="presence-test") as observer, r.probe(internal=False, client_id="dev-a") as device:
            for p in (observer, device):
                await asyncio.to_thread(p.connect, WAIT)
            for topic in ("gateway/presence/+", "gateway/live/+"):
                await asyncio.to_thread(observer.subscribe, topic, 1, WAIT)
            yield Presence(r, svc, clock, bad, observer, device)


def kinds(device: str = "dev-a") -> list[str]:
    q = DeviceLifecycleEvent.select().where(DeviceLifecycleEvent.device == device).order_by(DeviceLifecycleEvent.id)
    return [e.kind for e in q]


async def test_online_on_first_message_offline_when_the_clock_passes_the_silence(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_presence(tmp_path, monkeypatch) as p:
        await p.stream(rssi=-60)
        on = await p.presence()
        assert (on["device_id"], on["online"], on["rssi"], on["status"]) == ("dev-a", True, -60, "NORMAL")
        dev = Device.get(Device.device_id == "dev-a")
        assert (dev.online, dev.rssi) == (True, -60)
        assert kinds() == ["online"]
        assert OutboxEvent.select().where(OutboxEvent.type == "device.status").count() == 1

        # Later messages are live updates only: no transition, no row.
        assert (await p.live())["rssi"] == -60
        await p.stream(rssi=-50)
        assert (await p.live())["rssi"] == -50
        p.clock.advance(29)  # within 3 × 10 s of the last message
        await p.stream(rssi=-70, status="ERROR")
        live = await p.live()
        assert (live["online"], live["rssi"], live["status"]) == (True, -70, "ERROR")

        # 30 s of silence on the clock (and past the 60 s save): offline, stored, announced.
        p.clock.advance(61)
        off = await p.presence()
        assert (off["online"], off["rssi"], off["status"]) == (False, -70, "ERROR")
        assert kinds() == ["online", "offline"]
        assert Device.get(Device.device_id == "dev-a").online is False
        # The rssi history of the three messages, saved in one bucket row by the periodic save.
        await until(lambda: DeviceStatusSample.select().count() == 1)
        s = DeviceStatusSample.get()
        assert (s.rssi_min, s.rssi_max, s.rssi_last, s.samples) == (-70, -50, -70, 3)

        # The next message brings it back.
        await p.stream(rssi=-40)
        back = await p.presence()
        assert (back["online"], back["rssi"]) == (True, -40)
        assert kinds() == ["online", "offline", "online"]
        await p.live_until(-40)


async def test_bad_and_unknown_messages_are_dropped_and_counted(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    async with running_presence(tmp_path, monkeypatch) as p:
        await p.stream(key="not-the-site-key")
        await p.stream(rssi=999)
        await p.stream(status="ASLEEP")
        await p.stream(device="dev-x")  # never registered
        await p.stream(device_id="dev-b")  # body names another device than the topic
        await p.stream(rssi=-42)  # a good one last: once it is seen, the others were handled
        assert (await p.presence())["rssi"] == -42
        assert p.service.accepted == 1
        assert dict(p.service.dropped) == {"bad_signature": 1, "invalid": 2, "unknown_device": 1,
                                           "device_mismatch": 1}
        assert p.bad.get("dev-a") is not None and p.bad.get("dev-x") is None
        assert kinds() == ["online"]
        await p.live_until(-42)
