"""The core's follower of QR charges: from PENDING to a final status, and the device told over MQTT.

Contract:
- A charge is followed from the moment the web stored it (RPC `payments.track`, and a rescan of
  the store every `RESCAN_SEC` for charges the core has not seen, e.g. created while it was down).
- While PENDING, `device/{chargeId}/payment-status` holds the signed PENDING status, retained, and
  the cloud's status endpoint is polled with backoff (`POLL_MIN_SEC` doubling to `POLL_MAX_SEC`).
  `apply(charge_id, status)` takes a status from any source (poll, bridge push, refresh).
- A final status (SUCCEEDED, FAILED, CANCELLED) is stored with an outbox `payment.updated` event in
  one transaction, then published retained. The retained message is cleared (the topic
  "destroyed") once the device has been sent it: at once when a subscriber holds the topic, else
  when one subscribes, or after `UNDELIVERED_KEEP_SEC` (the device has used the HTTP fallback or is
  gone). `final_delivered` records it.
- A charge still PENDING after the cloud's `expiry` (site local time) is asked once more and then
  CANCELLED locally (reported with `reason: "expired"`).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
import zoneinfo
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from peewee import SqliteDatabase

from gateway.access.signing import sign_mqtt
from gateway.clock import epoch_ms, iso_z, utc_now
from gateway.config import Config, Secrets
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.rpc import RpcError, RpcServer
from gateway.mqtt.topics import PAYMENT_STATUS
from gateway.payments.cloud import CloudRefused, CloudUnavailable, PaymentsClient
from gateway.store import write_tx
from gateway.store.dbthread import DbThread
from gateway.store.models import Payment
from gateway.store.outbox import add_event

log = logging.getLogger(__name__)

FINAL = ("SUCCEEDED", "FAILED", "CANCELLED")
STATUSES = ("PENDING", *FINAL)
POLL_MIN_SEC = 1.0
POLL_MAX_SEC = 15.0
RESCAN_SEC = 5.0
TICK_SEC = 1.0
UNDELIVERED_KEEP_SEC = 600.0


@dataclass
class _Charge:
    charge_id: str
    device_id: str
    status: str
    expiry: dt.datetime | None  # naive UTC
    next_poll: float = 0.0
    delay: float = POLL_MIN_SEC
    final_since: float | None = None  # monotonic time the final status was published


class PaymentFollower:
    def __init__(self, config: Config, secrets: Secrets, db: SqliteDatabase, bus: LocalBus) -> None:
        self.config = config
        self.key = secrets.device_signing_key
        self.db = db
        self.bus = bus
        self.client = PaymentsClient(config.cloud.url, secrets.cloud_key, config.cloud.timeout_sec) \
            if config.cloud.url else None
        self.zone = zoneinfo.ZoneInfo(config.site.timezone)
        self.charges: dict[str, _Charge] = {}
        self.polls = 0
        self.poll_failures = 0
        self._wake = asyncio.Event()
        self._db_thread = DbThread("payments-db", db)
        self._http = ThreadPoolExecutor(max_workers=2, thread_name_prefix="payments-http")

    async def start(self, rpc: RpcServer) -> None:
        await self._rescan()
        rpc.register("payments.track", self._rpc_track)
        rpc.register("payments.refresh", self._rpc_refresh, concurrent=True)  # asks the cloud (up to its timeout)

    def services(self) -> list[tuple[str, Any]]:
        return [("payment-follower", self._run)]

    async def stop(self) -> None:
        self._http.shutdown(wait=True, cancel_futures=True)
        await self._db_thread.close()

    # --- charges -------------------------------------------------------------------------------

    def _expiry(self, text: str | None) -> dt.datetime | None:
        if not text:
            return None
        try:
            local = dt.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(tzinfo=self.zone)
        except ValueError:
            return None
        return local.astimezone(dt.UTC).replace(tzinfo=None)

    def _load(self) -> list[tuple[str, str, str, str | None]]:
        q = Payment.select(Payment.charge_id, Payment.device, Payment.status, Payment.expiry).where(
            (Payment.status == "PENDING") | (Payment.final_delivered == False))  # noqa: E712
        return [(p.charge_id, p.device_id, p.status, p.expiry) for p in q]

    async def _rescan(self) -> None:
        for charge_id, device_id, status, expiry in await self._db_thread.run(self._load):
            if charge_id not in self.charges:
                c = _Charge(charge_id, device_id, status, self._expiry(expiry))
                self.charges[charge_id] = c
                await self._publish(c)
                if status in FINAL:
                    c.final_since = time.monotonic()
        self._wake.set()

    async def _publish(self, c: _Charge) -> None:
        body = {"command_id": f"cmd-{c.charge_id}", "command": "PAYMENT",
                "payload": {"chargeId": c.charge_id, "status": c.status}, "timestamp": epoch_ms()}
        await self.bus.publish(PAYMENT_STATUS.format(charge_id=c.charge_id), sign_mqtt(body, self.key), qos=1,
                               retain=True)

    def _store_final(self, charge_id: str, status: str, reason: str | None) -> bool:
        with write_tx(self.db):
            p = Payment.get_or_none(Payment.charge_id == charge_id)
            if p is None or p.status in FINAL:
                return False
            now = utc_now()
            Payment.update(status=status, updated_at=now).where(Payment.charge_id == charge_id).execute()
            payload = {"charge_id": charge_id, "device_id": p.device_id, "status": status,
                       "amount_satang": p.amount_satang, "reference_id": p.reference_id, "at": iso_z(now)}
            if reason:
                payload["reason"] = reason
            add_event("payment.updated", payload, site_id=self.config.site.id, partition=p.device_id)
        return True

    def _mark_delivered(self, charge_id: str) -> None:
        with write_tx(self.db):
            Payment.update(final_delivered=True).where(Payment.charge_id == charge_id).execute()

    async def apply(self, charge_id: str, status: str, *, reason: str | None = None) -> str:
        """Take a status from any source; returns the charge's status afterwards."""
        c = self.charges.get(charge_id)
        if c is None:
            await self._rescan()
            c = self.charges.get(charge_id)
            if c is None:
                raise RpcError("PAYMENT_NOT_FOUND", f"no payment {charge_id!r}", 404)
        if status not in STATUSES:
            log.warning("payment %s: ignored unknown status %r", charge_id, status)
            return c.status
        if c.status in FINAL or status == "PENDING":
            return c.status
        if await self._db_thread.run(self._store_final, charge_id, status, reason):
            log.info("payment %s of %s: %s%s", charge_id, c.device_id, status, f" ({reason})" if reason else "")
        c.status = status
        await self._publish(c)
        c.final_since = time.monotonic()
        await self._settle(c)
        return c.status

    async def _settle(self, c: _Charge) -> None:
        """Clear the retained final status once the device has been sent it (or has had time to)."""
        topic = PAYMENT_STATUS.format(charge_id=c.charge_id)
        waited = time.monotonic() - (c.final_since or 0)
        if self.bus.has_subscriber(topic) or waited >= UNDELIVERED_KEEP_SEC:
            await self.bus.publish(topic, b"", qos=1, retain=True)
            await self._db_thread.run(self._mark_delivered, c.charge_id)
            del self.charges[c.charge_id]

    # --- polling -------------------------------------------------------------------------------

    async def _poll(self, c: _Charge) -> str | None:
        if self.client is None:
            return None
        self.polls += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._http, self.client.status, c.charge_id)
        except (CloudUnavailable, CloudRefused) as exc:
            self.poll_failures += 1
            log.debug("payment %s: status poll failed: %s", c.charge_id, exc)
            return None

    async def _run(self) -> None:
        last_scan = time.monotonic()
        while True:
            try:
                await asyncio.wait_for(self._wake.wait(), TICK_SEC)
            except TimeoutError:
                pass
            self._wake.clear()
            now = time.monotonic()
            if now - last_scan >= RESCAN_SEC:
                last_scan = now
                await self._rescan()
            for c in list(self.charges.values()):
                if c.status in FINAL:
                    await self._settle(c)
                elif now >= c.next_poll:
                    await self._follow(c)

    async def _follow(self, c: _Charge) -> None:
        status = await self._poll(c)
        if status is not None and status != "PENDING":
            await self.apply(c.charge_id, status)
            return
        if c.expiry is not None and utc_now() > c.expiry:
            await self.apply(c.charge_id, "CANCELLED", reason="expired")
            return
        c.delay = min(c.delay * 2, POLL_MAX_SEC)
        c.next_poll = time.monotonic() + c.delay

    # --- RPC -------------------------------------------------------------------------------------

    async def _rpc_track(self, params: dict[str, Any]) -> dict[str, Any]:
        await self._rescan()
        c = self.charges.get(str(params.get("charge_id")))
        return {"tracked": c is not None}

    async def _rpc_refresh(self, params: dict[str, Any]) -> dict[str, Any]:
        charge_id = str(params.get("charge_id"))
        c = self.charges.get(charge_id)
        if c is None:
            await self._rescan()
            c = self.charges.get(charge_id)
        if c is None:
            raise RpcError("PAYMENT_NOT_FOUND", f"no pending payment {charge_id!r}", 404)
        if c.status == "PENDING":
            status = await self._poll(c)
            if status is not None:
                await self.apply(charge_id, status)
        return {"chargeId": charge_id, "status": c.status}

    def stats(self) -> dict[str, Any]:
        return {"followed": len(self.charges), "polls": self.polls, "poll_failures": self.poll_failures}
