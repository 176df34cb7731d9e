"""The live MQTT bridge to the cloud broker (uplink.md, "MQTT bridge (live)").

Contract
- `CloudBridge(settings, on_wash_cmd=..., on_device_command=..., on_payment_status=...)` does no
  I/O. `await run()` connects and keeps connecting until cancelled; it never returns otherwise.
  Cancelling it publishes the retained offline status (waiting at most `OFFLINE_ACK_TIMEOUT_SEC`
  for the broker's PUBACK), disconnects cleanly and returns once every thread it started is joined.
- Connection: paho-mqtt, MQTT 3.1.1, persistent session (clean session off) under a stable client
  id (default `carwash-gateway-{site_id}`), TLS with hostname check (CA file or the system's CAs,
  optional client certificate and key for mutual TLS) or plain TCP, optional username/password.
  Will: `sites/{site_id}/gateway/status` = `{"online": false}`, QoS 1, retained; after every
  CONNACK the bridge publishes `{"online": true}` there (retained).
- Reconnect: `run()` owns the only reconnect loop (paho's own is off). Delays use full jitter,
  uniform in [min, min(max, min * 2^n)] (defaults 1 s and 60 s), where n counts the attempts
  since the last connection that stayed up `STABLE_AFTER_SEC`. Each attempt uses a fresh paho
  client (nothing of an old connection is retransmitted behind newer data) and subscribes again.
- Local -> cloud: `publish_wash_status(bay_id, payload)`, `publish_device_presence(device_id,
  payload)` and `forward(local_topic, payload)` (for `wash/{bay}/status` and
  `gateway/presence/{device_id}`) publish to `sites/{site_id}/wash/{bay}/status` and
  `sites/{site_id}/devices/{device_id}/presence`, QoS 1, retained. They never block and never
  raise on bad input (a bad id, a payload over `max_payload_bytes`, an unmapped topic: dropped,
  counted, logged; the call returns False). The latest payload of each topic is kept until the
  broker acknowledged it, so while offline only the latest per topic waits (at most
  `max_pending_topics` topics; beyond that the oldest topic is dropped) and is sent after the next
  CONNACK, oldest topic first. Safe from any thread while `run()` runs (calls from other threads
  are handed to its loop); before that, call them from one thread.
- Cloud -> local: subscribes (QoS 1) `sites/{site_id}/wash/+/cmd`, `sites/{site_id}/device/+/command`
  and `sites/{site_id}/payments/+/status`. Each message is handed, in arrival order and one at a
  time, to `on_wash_cmd(bay_id, payload)`, `on_device_command(device_id, payload)` or
  `on_payment_status(charge_id, payload)`, awaited on the event loop running `run()`. Dropped with
  one log line naming the problem (repeats of a reason are counted, logged at most once a
  minute): a topic outside those three shapes, an id not matching `ID_RE`, a payload over
  `max_payload_bytes`, a *retained* command (a stale replay sent at subscription time, not a
  new command; retained payment statuses pass), or a full inbound queue. A callback that raises
  is logged and counted; the bridge goes on. Delivery to the callbacks is at least once while
  running (QoS 1 may repeat a message) and messages still queued when `run()` is cancelled are
  lost: callbacks must check commands as for local ones. A subscription the cloud broker refuses
  is logged and reported (`subscribed` stays false, `last_error`); forwarding goes on.
- Observability: `connected`, counters `forwarded` (status messages acknowledged by the cloud
  broker), `received` (messages from the cloud, dropped ones included), `dropped` (both ways),
  `reconnects` (connections after the first), `connect_failures`, `callback_errors`; `state()` is
  a dict snapshot for the health report and `wait_state(predicate, timeout)` waits for a change.
- Threads: per connection attempt the blocking TCP connect and TLS handshake run in the bridge's
  own one-thread executor, then paho's network thread (`loop_start`). Everything paho reports is
  handed to the event loop with `call_soon_threadsafe`; bridge state is only changed on the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode

from gateway.backoff import backoff_delay
from gateway.clock import iso_z
from gateway.droplog import Drops
from gateway.mqtt import topics
from gateway.mqtt.client import close_client
from gateway.uplink.bridge_outbound import LatestPerTopic
from gateway.uplink.bridge_paho import (
    Conn,
    PahoLog,
    describe,
    hand_callbacks_to_loop,
    open_connection,
    run_joined,
)
from gateway.uplink.bridge_settings import ID_RE, BridgeSettings, is_forwarded

log = logging.getLogger(__name__)

T = TypeVar("T")
CloudCallback = Callable[[str, bytes], Awaitable[None]]

SUBSCRIPTIONS = (topics.CLOUD_WASH_CMD_FILTER, topics.CLOUD_DEVICE_COMMAND_FILTER, topics.CLOUD_PAYMENT_STATUS_FILTER)
ONLINE = json.dumps({"online": True}).encode()
OFFLINE = json.dumps({"online": False}).encode()
STABLE_AFTER_SEC = 30.0  # a connection that lasted this long resets the backoff
OFFLINE_ACK_TIMEOUT_SEC = 2.0
DROP_LOG_EVERY_SEC = 60.0


class CloudBridge:
    """The MQTT bridge to the cloud broker; see the module docstring for the whole contract."""

    def __init__(self, settings: BridgeSettings, *, on_wash_cmd: CloudCallback, on_device_command: CloudCallback,
                 on_payment_status: CloudCallback, rng: random.Random | None = None) -> None:
        self.settings = settings
        site = settings.site_id
        self._status_topic = topics.CLOUD_GATEWAY_STATUS.format(site_id=site)
        self._filters = [f.format(site_id=site) for f in SUBSCRIPTIONS]
        self._routes: dict[tuple[str, str], tuple[str, CloudCallback]] = {
            ("wash", "cmd"): ("wash command", on_wash_cmd),
            ("device", "command"): ("device command", on_device_command),
            ("payments", "status"): ("payment status", on_payment_status),
        }
        self._rng = rng or random.Random()
        self.forwarded = 0
        self.received = 0
        self.reconnects = 0
        self.connect_failures = 0
        self.callback_errors = 0
        self.last_error = ""
        self._drops = Drops(log, DROP_LOG_EVERY_SEC)
        self._pending = LatestPerTopic(settings.max_pending_topics)
        self._waiters: dict[int, asyncio.Future[None]] = {}  # mid -> PUBACK wanted by the bridge itself
        self._conn: Conn | None = None
        self._connected = False
        self._subscribed = False
        self._connected_once = False
        self._since: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._inbound: asyncio.Queue[tuple[str, CloudCallback, str, bytes, str]] | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running = False
        self._change = asyncio.Event()
        self._last_logged_error = ""

    # --- public surface ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between an accepted CONNACK and the loss of that connection."""
        return self._connected

    @property
    def dropped(self) -> int:
        return sum(self._drops.counts.values())

    def state(self) -> dict[str, Any]:
        """Snapshot for the health report (no I/O)."""
        s = self.settings
        return {
            "running": self._running,
            "connected": self._connected,
            "subscribed": self._subscribed,
            "broker": f"{s.host}:{s.port}",
            "tls": s.tls,
            "client_id": s.effective_client_id,
            "connected_since": self._since,
            "forwarded": self.forwarded,
            "received": self.received,
            "dropped": self.dropped,
            "dropped_by_reason": dict(self._drops.counts),
            "reconnects": self.reconnects,
            "connect_failures": self.connect_failures,
            "callback_errors": self.callback_errors,
            "pending": len(self._pending),
            "last_error": self.last_error,
        }

    async def wait_state(self, predicate: Callable[[dict[str, Any]], bool], timeout: float) -> dict[str, Any]:
        """Wait until `predicate(self.state())` holds and return that state; TimeoutError."""
        async with asyncio.timeout(timeout):
            while True:
                st = self.state()
                if predicate(st):
                    return st
                await self._change.wait()

    def publish_wash_status(self, bay_id: str, payload: bytes) -> bool:
        """Forward a bay's status to `sites/{site}/wash/{bay_id}/status` (QoS 1, retained)."""
        topic = topics.CLOUD_WASH_STATUS.format(site_id=self.settings.site_id, bay_id=bay_id)
        return self._forward(bay_id, topic, payload)

    def publish_device_presence(self, device_id: str, payload: bytes) -> bool:
        """Forward a device's presence to `sites/{site}/devices/{device_id}/presence` (QoS 1, retained)."""
        topic = topics.CLOUD_DEVICE_PRESENCE.format(site_id=self.settings.site_id, device_id=device_id)
        return self._forward(device_id, topic, payload)

    def forward(self, local_topic: str, payload: bytes) -> bool:
        """Forward a local `wash/{bay}/status` or `gateway/presence/{device_id}`; others are dropped."""
        if topics.matches(topics.WASH_STATUS_FILTER, local_topic):
            return self.publish_wash_status(local_topic.split("/")[1], payload)
        if topics.matches(topics.PRESENCE_FILTER, local_topic):
            return self.publish_device_presence(local_topic.split("/")[2], payload)
        self._on_loop(self._drop, "unmapped local topic", local_topic,
                      "only wash/+/status and gateway/presence/+ are forwarded")
        return False

    async def run(self) -> None:
        """Connect, serve and reconnect until cancelled (see the module docstring)."""
        if self._running:
            raise RuntimeError("CloudBridge.run() is already running")
        self._running = True
        self._loop = asyncio.get_running_loop()
        self._inbound = asyncio.Queue(self.settings.max_inbound_queue)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-bridge")
        dispatcher = asyncio.create_task(self._dispatch_forever(), name="cloud-bridge-dispatch")
        try:
            await self._connect_forever()
        finally:
            dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await dispatcher
            self._executor.shutdown(wait=True)  # idle: every job was awaited
            self._executor = None
            self._inbound = None
            self._loop = None
            self._running = False
            self._changed()

    # --- connection ----------------------------------------------------------------------------

    async def _connect_forever(self) -> None:
        s = self.settings
        failures = 0
        while True:
            lasted = await self._session()
            if lasted is not None and lasted >= STABLE_AFTER_SEC:
                failures = 0
            failures += 1
            delay = backoff_delay(failures, s.backoff_min_sec, s.backoff_max_sec, self._rng)
            log.debug("cloud bridge: next attempt in %.2f s", delay)
            await asyncio.sleep(delay)

    async def _session(self) -> float | None:
        """One attempt and, if the broker accepts it, the connection's life: returns how long it
        was connected, None if it never was. Always leaves the paho client closed and joined."""
        s = self.settings
        loop = asyncio.get_running_loop()
        client = self._new_client()
        conn = Conn(client, loop.create_future())
        self._conn = conn
        connected_at: float | None = None
        try:
            try:
                await self._in_thread(open_connection, client, self.settings)
            except (OSError, ValueError) as exc:  # refused, unreachable, TLS/certificate, unreadable files
                self._failed(f"cannot connect to {s.host}:{s.port}: {describe(exc)}")
                return None
            client.loop_start()
            try:
                async with asyncio.timeout(s.connect_timeout_sec):
                    answer = await conn.connack
            except TimeoutError:
                self._failed(f"no CONNACK from {s.host}:{s.port} within {s.connect_timeout_sec:g} s")
                return None
            if answer is None:
                self._failed(f"{s.host}:{s.port} closed the connection before CONNACK ({conn.lost_reason})")
                return None
            reason, session_present = answer
            if reason.is_failure:
                self._failed(f"{s.host}:{s.port} refused the connection: {reason}")
                return None
            connected_at = time.monotonic()
            self._on_connected(conn, session_present)
            await conn.lost.wait()
            self.last_error = f"connection lost: {conn.lost_reason}"
            log.warning("cloud bridge: connection to %s:%d lost (%s); reconnecting", s.host, s.port,
                        conn.lost_reason)
            return time.monotonic() - connected_at
        except asyncio.CancelledError:
            if self._connected:
                await self._say_offline(client)
            raise
        finally:
            self._conn = None
            self._connected = self._subscribed = False
            self._since = None
            self._pending.lost()
            for fut in self._waiters.values():
                fut.cancel()
            self._waiters.clear()
            self._changed()
            await self._in_thread(close_client, client)

    def _new_client(self) -> mqtt.Client:
        s = self.settings
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=s.effective_client_id, clean_session=False,
                             protocol=mqtt.MQTTv311, reconnect_on_failure=False)
        client.enable_logger(PahoLog(lambda text: self._to_loop(self._on_paho_error, client, text)))
        client.suppress_exceptions = True  # a bug in a callback must not kill the network thread
        client.connect_timeout = s.connect_timeout_sec
        client.max_inflight_messages_set(s.max_inflight)
        if s.username:
            client.username_pw_set(s.username, s.password or None)
        client.will_set(self._status_topic, OFFLINE, qos=1, retain=True)
        hand_callbacks_to_loop(client, self._to_loop, on_connack=self._on_connack, on_lost=self._on_lost,
                               on_puback=self._on_puback, on_suback=self._on_suback, on_message=self._on_message)
        return client

    def _on_connected(self, conn: Conn, session_present: bool) -> None:
        s = self.settings
        client = conn.client
        conn.accepted = True
        self._connected = True
        if self._connected_once:
            self.reconnects += 1
        self._connected_once = True
        self._since = iso_z()
        self.last_error = ""
        self._last_logged_error = ""
        client.publish(self._status_topic, ONLINE, qos=1, retain=True)
        client.subscribe([(f, 1) for f in self._filters])
        for topic, seq, payload in self._pending.waiting():
            self._send(client, topic, seq, payload)
        log.info("cloud bridge: connected to %s:%d as %s (%s, session present: %s, %d pending sent)",
                 s.host, s.port, s.effective_client_id, "TLS" if s.tls else "plain TCP", session_present,
                 len(self._pending))
        self._changed()

    async def _say_offline(self, client: mqtt.Client) -> None:
        """Clean shutdown: the will is not sent after a DISCONNECT, so say it ourselves."""
        info = client.publish(self._status_topic, OFFLINE, qos=1, retain=True)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters[info.mid] = fut
        await asyncio.wait({fut}, timeout=OFFLINE_ACK_TIMEOUT_SEC)

    def _failed(self, error: str) -> None:
        self.connect_failures += 1
        self.last_error = error
        if error != self._last_logged_error:
            log.warning("cloud bridge: %s", error)
            self._last_logged_error = error
        else:
            log.debug("cloud bridge: %s (again)", error)
        self._changed()

    async def _in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        assert self._executor is not None
        return await run_joined(self._executor, fn, *args)

    def _to_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """From paho's network thread: everything it reports is handled on the loop."""
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the bridge is gone
            loop.call_soon_threadsafe(fn, *args)

    # --- on the loop -----------------------------------------------------------------------------

    def _current(self, client: mqtt.Client) -> Conn | None:
        conn = self._conn
        return conn if conn is not None and conn.client is client else None

    def _on_connack(self, client: mqtt.Client, reason: Any, session_present: bool) -> None:
        conn = self._current(client)
        if conn is not None and not conn.connack.done():
            conn.connack.set_result((reason, session_present))

    def _on_paho_error(self, client: mqtt.Client, text: str) -> None:
        conn = self._current(client)
        if conn is not None and not conn.error:
            conn.error = text

    def _on_lost(self, client: mqtt.Client, reason: str) -> None:
        conn = self._current(client)
        if conn is None:
            return
        conn.lost_reason = conn.error or reason
        conn.lost.set()
        if not conn.connack.done():
            conn.connack.set_result(None)
        if conn.accepted:
            self._connected = self._subscribed = False
            self._changed()

    def _on_puback(self, client: mqtt.Client, mid: int) -> None:
        if self._current(client) is None:
            return
        waiter = self._waiters.pop(mid, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(None)
            return
        if self._pending.acked(mid):  # else the online status
            self.forwarded += 1
            self._changed()

    def _on_suback(self, client: mqtt.Client, reasons: list[Any]) -> None:
        if self._current(client) is None:
            return
        refused = [f for f, rc in zip(self._filters, reasons, strict=False) if rc.is_failure]
        if refused or len(reasons) != len(self._filters):
            self.last_error = f"cloud broker refused the subscriptions {refused or self._filters}: {reasons}"
            log.error("cloud bridge: %s", self.last_error)
        else:
            self._subscribed = True
        self._changed()

    def _on_message(self, topic: str | None, payload: bytes, retain: bool) -> None:
        self.received += 1
        try:
            if topic is None:
                self._drop("topic not UTF-8", "(undecodable topic)", "dropped")
                return
            parts = topic.split("/")
            route = (self._routes.get((parts[2], parts[4]))
                     if len(parts) == 5 and parts[0] == "sites" and parts[1] == self.settings.site_id else None)
            if route is None:
                self._drop("unexpected topic", topic, "not a wash command, device command or payment status")
                return
            kind, callback = route
            ident = parts[3]
            if not ID_RE.match(ident):
                self._drop("bad id", topic, f"{ident!r} does not match {ID_RE.pattern}")
                return
            if len(payload) > self.settings.max_payload_bytes:
                self._drop("payload too large", topic,
                           f"{len(payload)} bytes, more than {self.settings.max_payload_bytes}")
                return
            if retain and kind != "payment status":
                self._drop("retained command", topic, "a retained command is a replay, not a new command")
                return
            if self._inbound is None:
                return
            try:
                self._inbound.put_nowait((kind, callback, ident, payload, topic))
            except asyncio.QueueFull:
                self._drop("inbound queue full", topic, f"{self.settings.max_inbound_queue} messages waiting")
        finally:
            self._changed()

    async def _dispatch_forever(self) -> None:
        assert self._inbound is not None
        inbound = self._inbound
        while True:
            kind, callback, ident, payload, topic = await inbound.get()
            try:
                await callback(ident, payload)
            except Exception:
                self.callback_errors += 1
                log.exception("cloud bridge: the %s handler failed on a message on %s", kind, topic)
            self._changed()

    # --- local -> cloud --------------------------------------------------------------------------

    def _forward(self, ident: str, topic: str, payload: bytes) -> bool:
        data = bytes(payload)
        if not ID_RE.match(ident):
            self._on_loop(self._drop, "bad id", topic, f"{ident!r} does not match {ID_RE.pattern}")
            return False
        if len(data) > self.settings.max_payload_bytes:
            self._on_loop(self._drop, "payload too large", topic,
                          f"{len(data)} bytes, more than {self.settings.max_payload_bytes}")
            return False
        self._on_loop(self._store_and_send, topic, data)
        return True

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Call `fn` now when on the bridge's loop (or when not running), else on that loop."""
        loop = self._loop
        if loop is None or _running_loop() is loop:
            fn(*args)
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: the bridge is gone
            loop.call_soon_threadsafe(fn, *args)

    def _store_and_send(self, topic: str, payload: bytes) -> None:
        seq, dropped = self._pending.put(topic, payload)
        if dropped is not None:
            self._drop("pending buffer full", dropped, f"{self.settings.max_pending_topics} topics waiting")
        conn = self._conn
        if self._connected and conn is not None:
            self._send(conn.client, topic, seq, payload)

    def _send(self, client: mqtt.Client, topic: str, seq: int, payload: bytes) -> None:
        info = client.publish(topic, payload, qos=1, retain=True)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            self._pending.sent(info.mid, topic, seq)
        # else (the connection just went): it stays pending and is sent after the next CONNACK

    def _drop(self, reason: str, where: str, detail: str) -> None:
        self._drops.drop(reason, where, detail)
        self._changed()

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


__all__ = ["ID_RE", "BridgeSettings", "CloudBridge", "is_forwarded"]
