"""One test per amqtt patch (gateway/mqtt/amqtt_patches/, `PATCHES`), each naming the amqtt
version it patches.

Each test shows what its patch fixes, on the real broker over TCP. To see a test fail without its
patch (done for every one when it was written; do it again for each patch on an amqtt upgrade):

    CARWASH_REVERT_PATCH=indexed_routing .venv/bin/python -m pytest tests/unit/test_amqtt_patches*.py

runs that patch's test against `GatewayBroker` with the patch reverted to amqtt's own code
(`REVERTED` below). A test that passes reverted means amqtt fixed the issue: drop the patch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections import deque
from typing import Any

import pytest
from amqtt.broker import Broker

from gateway.mqtt import amqtt_patches
from gateway.mqtt.acl import ACCOUNT
from gateway.mqtt.amqtt_patches import AUDITED_AMQTT, PATCHES, GatewayBroker, GatewayHandler
from gateway.mqtt.broker import LocalBus
from gateway.mqtt.guard import AUTHENTICATED, KICKED
from tests import mqtt_probe, mqtt_raw
from tests.mqtt_probe import Probe, counting_tasks

USER, PASSWORD = "carwash-gateway", "internal-password-0123456789"


# --- each patch reverted to amqtt 0.12.1's own code -------------------------------------------------


class _NoRetainedFix(GatewayBroker):
    _publish_retained_messages_for_subscription = Broker._publish_retained_messages_for_subscription


class _NoQuietRepr(GatewayBroker):
    def _subscriptions_table(self) -> dict[str, list[Any]]:
        return {}


class _NoIndexedRouting(GatewayBroker):
    def _routes(self, topic: str) -> list[Any]:  # amqtt: every filter matched against every message
        return [s for f, subs in self._subscriptions.items() if self._matches(topic, f) for s in subs]


class _NoOwnFilters(GatewayBroker):
    _del_all_subscriptions = Broker._del_all_subscriptions


class _NoDeliveryOnDisconnect(GatewayBroker):
    _client_message_loop = Broker._client_message_loop


class _KeepRefusedSessions(GatewayBroker):
    def _forget_if_refused(self, client_session: Any) -> None:
        return None


class _AckBeforeAcl(GatewayBroker):
    def _refuse_before_ack(self, session: Any, handler: Any) -> None:
        return None


class _NoPacketLimit(GatewayBroker):
    def _reader(self, reader: asyncio.StreamReader, peer: Any) -> Any:
        from amqtt.adapters import StreamReaderAdapter

        return StreamReaderAdapter(reader)


class _ParkPastMax(GatewayBroker):
    def _full(self, listener_name: str, peer: Any) -> bool:
        return False


class _NoConnectTimeout(GatewayBroker):
    _initialize_client_session = Broker._initialize_client_session


class _PluginTasks(GatewayBroker):
    _topic_filtering = Broker._topic_filtering


class _HandOffByPluginEvent(GatewayBroker):
    _handle_message_delivery = Broker._handle_message_delivery


class _BroadcastOneByOne(GatewayBroker):
    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        await self._route(await self._broadcast_queue.get(), running_tasks)


class _ReaderTasks(GatewayBroker):
    def _install_handler(self, handler: Any) -> None:
        return None


class _AttributesKept(GatewayBroker):
    async def _authenticate(self, session: Any, listener: Any) -> bool:
        ok: bool = await Broker._authenticate(self, session, listener)
        session.attributes[AUTHENTICATED] = ok  # what forget_refused_sessions needs, nothing else
        return ok


REVERTED: dict[str, type[GatewayBroker]] = {
    "retained_to_own_subscriptions": _NoRetainedFix,
    "quiet_subscriptions_repr": _NoQuietRepr,
    "indexed_routing": _NoIndexedRouting,
    "own_filters_on_disconnect": _NoOwnFilters,
    "deliver_queued_on_disconnect": _NoDeliveryOnDisconnect,
    "forget_refused_sessions": _KeepRefusedSessions,
    "acl_before_puback": _AckBeforeAcl,
    "packet_size_limit": _NoPacketLimit,
    "refuse_past_max_connections": _ParkPastMax,
    "connect_timeout": _NoConnectTimeout,
    "direct_topic_filtering": _PluginTasks,
    "direct_local_hand_off": _HandOffByPluginEvent,
    "batched_broadcast": _BroadcastOneByOne,
    "reader_without_tasks": _ReaderTasks,
    "login_decides_attributes": _AttributesKept,
}


def broker_for(patch: str) -> type[GatewayBroker]:
    """The broker a patch's test runs: patched, or with that patch reverted (module doc)."""
    return REVERTED[patch] if os.environ.get("CARWASH_REVERT_PATCH") == patch else GatewayBroker


def running_bus(patch: str, **options: Any) -> contextlib.AbstractAsyncContextManager[LocalBus]:
    return mqtt_probe.running_bus(USER, PASSWORD, broker_class=broker_for(patch), **options)


async def raw_open(bus: LocalBus) -> mqtt_raw.RawConnection:
    return await mqtt_raw.RawConnection.open(bus._settings.port)


async def _until(predicate: Any, timeout: float = 5.0) -> None:
    """Broker state with no event of its own: checked at each turn of the loop, bounded."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


# --- the audit itself --------------------------------------------------------------------------------


def test_installed_amqtt_is_the_audited_one_and_every_patch_has_its_test() -> None:
    assert amqtt_patches.check_amqtt_version(), f"amqtt differs from {AUDITED_AMQTT}: review every patch"
    assert {p.amqtt for p in PATCHES} == {AUDITED_AMQTT}
    from tests.unit import test_amqtt_patches_io  # the patches of handler.py (registers its REVERTED)

    tests = {name for name in (*globals(), *vars(test_amqtt_patches_io)) if name.startswith("test_")}
    for p in PATCHES:
        assert f"test_{p.name}" in tests, p.name
        assert p.name in REVERTED, p.name
        for method in p.methods:
            assert method in vars(GatewayBroker) or method in vars(GatewayHandler), (p.name, method)


# --- one test per patch, amqtt 0.12.1 ---------------------------------------------------------------


async def test_retained_to_own_subscriptions() -> None:
    """amqtt 0.12.1 sent a connecting client the retained messages of filters other clients hold."""
    async with running_bus("retained_to_own_subscriptions") as bus:
        await bus.publish("gateway/health", b'{"secret":"internal"}', retain=True)
        with Probe(bus._settings.port, username=USER, password=PASSWORD) as web:
            await asyncio.to_thread(web.connect)
            assert await asyncio.to_thread(web.subscribe, "gateway/#") == [1]
            with Probe(bus._settings.port) as device:
                await asyncio.to_thread(device.connect)
                assert await asyncio.to_thread(device.subscribe, "device/d1/command") == [1]
                await bus.publish("device/d1/command", b"marker")
                before = await asyncio.to_thread(device.until, "device/d1/command")
        assert before == []  # only the marker came: no retained message of gateway/#


async def test_quiet_subscriptions_repr() -> None:
    """amqtt 0.12.1 formats the whole subscription table after every SUBSCRIBE."""
    async with running_bus("quiet_subscriptions_repr") as bus:
        with Probe(bus._settings.port, client_id="dev-0") as device:
            await asyncio.to_thread(device.connect)
            assert await asyncio.to_thread(device.subscribe, "device/dev-0/command") == [1]
            assert "dev-0" not in repr(bus.broker._subscriptions)


async def test_indexed_routing() -> None:
    """amqtt 0.12.1 matches each message against every filter; exact filters are a dict hit here."""
    async with running_bus("indexed_routing") as bus:
        probes = [Probe(bus._settings.port, client_id=f"dev-{i}") for i in range(8)]
        try:
            for i, p in enumerate(probes):
                await asyncio.to_thread(p.connect)
                assert await asyncio.to_thread(p.subscribe, f"device/dev-{i}/command") == [1]
            matched: list[str] = []
            match = bus.broker._matches
            bus.broker._matches = lambda topic, f: matched.append(f) or match(topic, f)  # type: ignore[method-assign]
            await bus.publish("device/dev-3/command", b"for dev-3")
            assert (await asyncio.to_thread(probes[3].expect, "device/dev-3/command")).payload == b"for dev-3"
            assert matched == []  # no wildcard filter held: nothing to match
        finally:
            for p in probes:
                p.close()


async def test_own_filters_on_disconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """amqtt 0.12.1 scans every filter of every session when one session goes."""
    async with running_bus("own_filters_on_disconnect") as bus:
        probes = [Probe(bus._settings.port, client_id=f"dev-{i}") for i in range(6)]
        try:
            for i, p in enumerate(probes):
                await asyncio.to_thread(p.connect)
                assert await asyncio.to_thread(p.subscribe, f"device/dev-{i}/command") == [1]
            tried: list[str] = []
            delete = Broker._del_subscription
            monkeypatch.setattr(Broker, "_del_subscription",
                                lambda self, f, session: tried.append(f) or delete(self, f, session))
            probes[0].close()
            await _until(lambda: "device/dev-0/command" not in bus.broker._subscriptions)
            assert tried == ["device/dev-0/command"]
        finally:
            for p in probes:
                p.close()


async def test_deliver_queued_on_disconnect() -> None:
    """amqtt 0.12.1 PUBACKs a QoS 1 message on receipt and dropped the queue at DISCONNECT."""
    n = 300
    async with running_bus("deliver_queued_on_disconnect", client_rate_per_sec=0) as bus:
        seen: list[bytes] = []
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append(data))
        deliver = bus.broker._deliver

        async def busy(session: Any, message: Any) -> bool:
            await asyncio.sleep(0)  # a busy core: deliveries fall behind the reader, the queue grows
            await asyncio.sleep(0)
            return await deliver(session, message)

        bus.broker._deliver = busy  # type: ignore[method-assign]
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-burst") == 0
            c.writer.write(b"".join(mqtt_raw.publish("server/dev-burst/ack", b"%d" % i, packet_id=i + 1)
                                    for i in range(n)) + mqtt_raw.DISCONNECT)
            pubacks = await asyncio.wait_for(c.reader.readexactly(4 * n), 10)
            assert pubacks.count(mqtt_raw.PUBACK_PREFIX) == n
        finally:
            c.close()
        await bus.wait_clients(lambda ids: "dev-burst" not in ids, 5)
        await _until(lambda: len(seen) == n, timeout=3)
        assert seen == [b"%d" % i for i in range(n)]


async def test_forget_refused_sessions() -> None:
    """amqtt 0.12.1 keeps the session of every refused login."""
    async with running_bus("forget_refused_sessions") as bus:
        for i in range(5):
            c = await raw_open(bus)
            try:
                assert await c.connect(f"guess-{i}", USER, f"wrong-{i}") != 0
                assert await c.closed_by_broker(3.0, drain=True)
            finally:
                c.close()
        assert not [cid for cid in bus.broker._sessions if cid.startswith("guess-")]


async def test_acl_before_puback() -> None:
    """amqtt 0.12.1 acknowledges a PUBLISH before its ACL check: a refused one must not be PUBACKed."""
    async with running_bus("acl_before_puback") as bus:
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-sneaky") == 0
            c.writer.write(mqtt_raw.publish("gateway/rpc/wash.command", b"{}", packet_id=7))
            assert await asyncio.wait_for(c.reader.read(4), 5) == b""  # closed, no PUBACK
        finally:
            c.close()
        assert bus.refusals.counts["acl_publish"] == 1


async def test_packet_size_limit() -> None:
    """amqtt 0.12.1 reads a packet of any announced size; here the announcement closes the connection."""
    async with running_bus("packet_size_limit", max_packet_bytes=2048) as bus:
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-big") == 0
            c.writer.write(mqtt_raw.publish("server/dev-big/streaming", b"x" * 4000)[:40])
            assert await c.closed_by_broker(3.0, drain=True)
        finally:
            c.close()
        assert bus.refusals.counts["packet_size"] == 1


async def test_refuse_past_max_connections() -> None:
    """amqtt 0.12.1 parks a connection past `max_connections` without CONNACK."""
    async with running_bus("refuse_past_max_connections", max_connections=1, connect_timeout_sec=60) as bus:
        first = await raw_open(bus)
        try:
            assert await first.connect("dev-a") == 0
            second = await raw_open(bus)
            try:
                assert await second.closed_by_broker(3, drain=True)
            finally:
                second.close()
        finally:
            first.close()


async def test_connect_timeout() -> None:
    """amqtt 0.12.1 waits for CONNECT forever."""
    async with running_bus("connect_timeout", connect_timeout_sec=0.3) as bus:
        silent = await raw_open(bus)
        try:
            assert await silent.closed_by_broker(3, drain=True)
        finally:
            silent.close()
        assert bus.refusals.counts["connect_timeout"] == 1


async def test_direct_topic_filtering() -> None:
    """amqtt 0.12.1 runs each ACL check as a task per topic plugin; here the plugin is awaited in place."""
    async with running_bus("direct_topic_filtering", client_rate_per_sec=0) as bus:
        scheduled: list[str] = []
        manager = bus.broker.plugins_manager
        mapped = manager.map_plugin_topic

        async def counted(**kwargs: Any) -> Any:
            scheduled.append(kwargs["topic"])
            return await mapped(**kwargs)

        manager.map_plugin_topic = counted  # type: ignore[method-assign]
        got: asyncio.Queue[str] = asyncio.Queue()
        bus.subscribe("server/+/streaming", lambda topic, data, cid: got.put_nowait(topic))
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            c.writer.write(mqtt_raw.publish("server/dev-1/streaming", b"{}"))
            assert await asyncio.wait_for(got.get(), 5) == "server/dev-1/streaming"
            c.writer.write(mqtt_raw.publish("gateway/status", b"{}", packet_id=1))  # still refused
            assert await c.closed_by_broker(3.0, drain=True)
        finally:
            c.close()
        assert scheduled == []


async def test_direct_local_hand_off() -> None:
    """amqtt 0.12.1 hands permitted publishes to plugins as a task per message; the LocalBus is fed
    in place, in arrival order (LocalBus no longer listens to the plugin event)."""
    n = 50
    async with running_bus("direct_local_hand_off", client_rate_per_sec=0) as bus:
        seen: list[bytes] = []
        bus.subscribe("server/+/streaming", lambda topic, data, cid: seen.append(data))
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            c.writer.write(b"".join(mqtt_raw.publish("server/dev-1/streaming", b"%d" % i) for i in range(n)))
            await _until(lambda: len(seen) == n, timeout=3)
        finally:
            c.close()
        assert seen == [b"%d" % i for i in range(n)]


async def test_batched_broadcast() -> None:
    """amqtt 0.12.1 starts a task and a wait per broadcast; a burst is routed in one turn here."""
    n = 40
    async with running_bus("batched_broadcast") as bus:
        with Probe(bus._settings.port, username=USER, password=PASSWORD) as web:
            await asyncio.to_thread(web.connect)
            assert await asyncio.to_thread(web.subscribe, "wash/+/status") == [1]
            turns = 0
            run = bus.broker._run_broadcast

            async def counted(tasks: Any) -> None:
                nonlocal turns
                turns += 1
                await run(tasks)

            bus.broker._run_broadcast = counted  # type: ignore[method-assign]
            # The running loop holds amqtt's current call: wake it once so the next calls are counted.
            await bus.publish("wash/bay0/status", b"-")
            assert (await asyncio.to_thread(web.expect, "wash/bay0/status")).payload == b"-"
            turns = 0
            for i in range(n):  # a burst: a status per bay, as the core publishes them
                await bus.publish(f"wash/bay{i}/status", b"%d" % i)
            got = [(await asyncio.to_thread(web.expect, None)).payload for _ in range(n)]
        assert got == [b"%d" % i for i in range(n)]
        assert turns <= 2, turns


async def test_reader_without_tasks() -> None:
    """amqtt 0.12.1's reader starts two tasks per PUBLISH and per PUBACK (the read's timeout, the
    handling); here none, the order kept, the keep-alive still bounding each read."""
    n = 30
    async with running_bus("reader_without_tasks", client_rate_per_sec=0) as bus:
        seen: list[bytes] = []
        bus.subscribe("server/+/streaming", lambda topic, data, cid: seen.append(data))
        c = await raw_open(bus)
        web = Probe(bus._settings.port, username=USER, password=PASSWORD, client_id="web-1")
        try:
            await asyncio.to_thread(web.connect)
            assert await asyncio.to_thread(web.subscribe, "wash/+/status") == [1]
            assert await c.connect("dev-1") == 0
            with counting_tasks() as started:
                c.writer.write(b"".join(mqtt_raw.publish("server/dev-1/streaming", b"%d" % i) for i in range(n)))
                await _until(lambda: len(seen) == n, timeout=3)
                for i in range(5):  # QoS 1 to a client: its PUBACKs come back
                    await bus.publish(f"wash/bay{i}/status", b"%d" % i)
                    assert (await asyncio.to_thread(web.expect, None)).payload == b"%d" % i
                web_session = bus.broker._sessions["web-1"][0]
                await _until(lambda: not web_session.inflight_out)
        finally:
            c.close()
            web.close()
        assert seen == [b"%d" % i for i in range(n)]
        per_packet = [q for q in started if q.endswith(("handle_publish", "handle_puback", "from_stream"))]
        assert per_packet == [], per_packet[:3]
        # The read's time limit is the keep-alive, handled as amqtt does (0.12.1: nothing happens).
        quiet = await raw_open(bus)
        try:
            assert await quiet.connect("dev-quiet", keepalive=1) == 0
            handler = bus.broker._sessions["dev-quiet"][1]
            timed_out = asyncio.Event()
            handler.handle_read_timeout = timed_out.set
            await asyncio.wait_for(timed_out.wait(), 4)
            quiet.writer.write(mqtt_raw.publish("server/dev-quiet/streaming", b"still here"))
            await _until(lambda: seen[-1] == b"still here", timeout=3)
        finally:
            quiet.close()


async def test_login_decides_attributes() -> None:
    """amqtt 0.12.1 resumes a persistent session with its attributes: a client cut off once (KICKED)
    stayed ignored after a new, valid login."""
    from argon2 import PasswordHasher

    from gateway.access.mqtt_accounts import Account

    account = Account("backend", PasswordHasher().hash("backend-password-123"), "wash-backend", 0)
    async with running_bus("login_decides_attributes") as bus:
        await bus.reload_accounts({"backend": account})
        got: asyncio.Queue[bytes] = asyncio.Queue()
        bus.subscribe("wash/+/cmd", lambda topic, data, cid: got.put_nowait(data))
        first = await raw_open(bus)
        try:
            assert await first.connect("backend-1", "backend", "backend-password-123", clean=False) == 0
            session, _ = bus.broker._sessions["backend-1"]
            assert session.attributes[ACCOUNT] == ("backend", 0)
            session.attributes[KICKED] = True  # as the flood guard leaves a client it cut off
        finally:
            first.close()
        await bus.wait_clients(lambda ids: "backend-1" not in ids, 5)
        again = await raw_open(bus)
        try:
            assert await again.connect("backend-1", "backend", "backend-password-123", clean=False) == 0
            again.writer.write(mqtt_raw.publish("wash/bay1/cmd", b"after login", packet_id=1))
            assert await asyncio.wait_for(got.get(), 5) == b"after login"
        finally:
            again.close()
