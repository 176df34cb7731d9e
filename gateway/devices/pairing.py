"""The pairing window: while `devices.pairing_requires_button` is on, registrations are accepted
only while it is open. The core owns it; it is opened by the GPIO service button (packaging
issue) or from the web over RPC (`pairing.open`, `pairing.close`), closes by itself after
`devices.pairing_window_sec`, and its state is retained on `gateway/pairing`
(`{"open": bool, "until": ISO 8601 | null}`) for the web to check on each registration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import time
from typing import Any

from gateway.clock import iso_z, utc_now
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.rpc import RpcError, RpcServer
from gateway.mqtt.topics import PAIRING

log = logging.getLogger(__name__)

MAX_WINDOW_SEC = 3600


class PairingWindow:
    def __init__(self, bus: LocalBus, default_sec: int) -> None:
        self.bus = bus
        self.default_sec = default_sec
        self.until: float | None = None  # time.monotonic()
        self.until_wall: dt.datetime | None = None
        self._changed = asyncio.Event()

    @property
    def is_open(self) -> bool:
        return self.until is not None and time.monotonic() < self.until

    async def start(self, rpc: RpcServer) -> None:
        rpc.register("pairing.open", self._rpc_open)
        rpc.register("pairing.close", self._rpc_close)
        await self._publish()

    def services(self) -> list[tuple[str, Any]]:
        return [("pairing-window", self._run)]

    async def open(self, seconds: int | None = None, *, by: str = "?") -> None:
        sec = seconds or self.default_sec
        self.until = time.monotonic() + sec
        self.until_wall = utc_now() + dt.timedelta(seconds=sec)
        log.info("pairing window open for %d s (by %s)", sec, by)
        await self._publish()
        self._changed.set()

    async def close(self, *, by: str = "?") -> None:
        if self.until is not None:
            log.info("pairing window closed (by %s)", by)
        self.until = self.until_wall = None
        await self._publish()
        self._changed.set()

    def snapshot(self) -> dict[str, Any]:
        open_ = self.is_open
        return {"open": open_, "until": iso_z(self.until_wall) if open_ and self.until_wall else None}

    async def _publish(self) -> None:
        await self.bus.publish(PAIRING, json.dumps(self.snapshot()).encode(), qos=1, retain=True)

    async def _rpc_open(self, params: dict[str, Any]) -> dict[str, Any]:
        sec = params.get("seconds")
        if sec is not None and (isinstance(sec, bool) or not isinstance(sec, int) or not 1 <= sec <= MAX_WINDOW_SEC):
            raise RpcError("VALIDATION_FAILED", f"seconds: 1 to {MAX_WINDOW_SEC}", 400)
        await self.open(sec, by=str(params.get("by", "web")))
        return self.snapshot()

    async def _rpc_close(self, params: dict[str, Any]) -> dict[str, Any]:
        await self.close(by=str(params.get("by", "web")))
        return self.snapshot()

    async def _run(self) -> None:
        """Close the window when its time is up."""
        while True:
            self._changed.clear()
            if self.until is None:
                await self._changed.wait()
                continue
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, self.until - time.monotonic()))
            except TimeoutError:
                await self.close(by="timer")
