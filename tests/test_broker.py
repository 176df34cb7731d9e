"""The embedded broker: auth, topic ACL, retained messages and the core's LocalBus / RPC.

Each test runs the real amqtt broker in the test's event loop on an ephemeral port and talks to it
with paho clients, as devices and the web do. Negative checks ("X was not delivered") use a
marker message published after X by the same client: MQTT keeps one client's order, so when the
marker arrives, X would have arrived before it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pytest

from gateway.mqtt.broker import LocalBus
from gateway.mqtt.client import BusClient, BusUnavailable, RpcTimeout
from gateway.mqtt.rpc import RpcError, RpcServer
from tests import mqtt_probe, mqtt_raw
from tests.mqtt_probe import Probe

USER, PASSWORD = "carwash-gateway", "internal-password-0123456789"


def running_bus(**options: Any) -> contextlib.AbstractAsyncContextManager[LocalBus]:
    return mqtt_probe.running_bus(USER, PASSWORD, **options)


def port_of(bus: LocalBus) -> int:
    return bus._settings.port


def internal(bus: LocalBus) -> Probe:
    return Probe(port_of(bus), username=USER, password=PASSWORD)


async def test_internal_user_connects_and_wrong_credentials_are_refused() -> None:
    async with running_bus() as bus:
        for username, password, accepted in [
            (USER, PASSWORD, True),
            (USER, "wrong", False),
            ("someone", PASSWORD, False),
            (None, None, True),  # anonymous device
        ]:
            with Probe(port_of(bus), username=username, password=password) as p:
                rc = await asyncio.to_thread(p.connect)
                assert (not rc.is_failure if hasattr(rc, "is_failure") else False) == accepted, (username, rc)


async def test_anonymous_refused_when_not_allowed() -> None:
    async with running_bus(allow_anonymous=False) as bus:
        with Probe(port_of(bus)) as p:
            rc = await asyncio.to_thread(p.connect)
            assert rc.is_failure
        with internal(bus) as p:
            assert not (await asyncio.to_thread(p.connect)).is_failure


async def test_anonymous_publish_outside_device_topics_is_not_acknowledged() -> None:
    """MQTT 3.1.1 has no negative PUBACK (§3.3.5: acknowledge or close): a refused publish closes
    the connection before any PUBACK, is counted, and reaches nobody; device topics pass."""
    async with running_bus() as bus:
        seen: list[str] = []
        bus.subscribe("#", lambda topic, data, cid: seen.append(topic))
        with internal(bus) as watcher:
            await asyncio.to_thread(watcher.connect)
            assert await asyncio.to_thread(watcher.subscribe, "#") == [1]
            refused = ("wash/bay1/cmd", "device/d1/command", "gateway/rpc/ping", "server/d1/other")
            for topic in refused:
                with Probe(port_of(bus)) as device:
                    await asyncio.to_thread(device.connect)
                    assert await asyncio.to_thread(device.publish_refused, topic, b'{"x":1}'), topic
            with Probe(port_of(bus)) as device:
                await asyncio.to_thread(device.connect)
                await asyncio.to_thread(device.publish, "server/d1/ack", b'{"a":1}')
                await asyncio.to_thread(device.publish, "server/d1/streaming", b'{"marker":1}')
            before = await asyncio.to_thread(watcher.until, "server/d1/streaming")
            assert [m.topic for m in before] == ["server/d1/ack"]
        # The core's in-process handlers saw exactly what the ACL let through.
        assert [t for t in seen if not t.startswith("$")] == ["server/d1/ack", "server/d1/streaming"]
        assert bus.refusals.counts["acl_publish"] == len(refused)


async def test_internal_user_may_publish_wash_cmd() -> None:
    async with running_bus() as bus:
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        bus.subscribe("wash/+/cmd", lambda topic, data, cid: got.put_nowait((topic, data)))
        with internal(bus) as web:
            await asyncio.to_thread(web.connect)
            await asyncio.to_thread(web.publish, "wash/bay1/cmd", b'{"action":"START"}')
            topic, data = await asyncio.wait_for(got.get(), 5)
        assert (topic, data) == ("wash/bay1/cmd", b'{"action":"START"}')


async def test_anonymous_subscriptions_limited_to_device_topics_and_no_retained_leak() -> None:
    async with running_bus() as bus:
        await bus.publish("gateway/health", b'{"secret":"internal"}', retain=True)
        await bus.publish("wash/bay1/status", b'{"state":"IDLE"}', retain=True)
        await bus.publish("device/d1/command", b'{"retained":"for d1"}', retain=True)
        with internal(bus) as web:
            # An internal subscriber holds gateway/# (amqtt 0.12.1 would replay its retained
            # messages to every client that connects afterwards).
            await asyncio.to_thread(web.connect)
            await asyncio.to_thread(web.subscribe, "gateway/#")
            with Probe(port_of(bus)) as device:
                await asyncio.to_thread(device.connect)
                assert await asyncio.to_thread(device.subscribe, "gateway/#") == [0x80]
                assert await asyncio.to_thread(device.subscribe, "wash/+/status") == [0x80]
                assert await asyncio.to_thread(device.subscribe, "#") == [0x80]
                # Devices subscribe exact topics; wildcards would let a LAN client read every device's traffic.
                assert await asyncio.to_thread(device.subscribe, "device/d1/#") == [0x80]
                assert await asyncio.to_thread(device.subscribe, "device/+/command") == [0x80]
                assert await asyncio.to_thread(device.subscribe, "device/d1/other") == [0x80]
                assert await asyncio.to_thread(device.subscribe, "device/d1/command") == [1]
                assert await asyncio.to_thread(device.subscribe, "device/ch_1/payment-status") == [1]
                await bus.publish("device/ch_1/payment-status", b"{}")
                before = await asyncio.to_thread(device.until, "device/ch_1/payment-status")
        assert [(m.topic, m.retain) for m in before] == [("device/d1/command", True)]


async def test_retained_state_cleared_with_empty_payload() -> None:
    async with running_bus() as bus:
        await bus.publish("device/ch_1/payment-status", b'{"status":"PENDING"}', retain=True)
        assert bus.retained("device/ch_1/payment-status") == b'{"status":"PENDING"}'
        await bus.publish("device/ch_1/payment-status", b"", retain=True)
        assert bus.retained("device/ch_1/payment-status") is None


async def test_rpc_round_trip_error_unknown_method_and_timeout() -> None:
    async with running_bus() as bus:
        rpc = RpcServer(bus)
        release = asyncio.Event()

        async def echo(params: dict) -> dict:
            return {"echo": params}

        async def refuse(params: dict) -> None:
            raise RpcError("BAY_BUSY", "bay1 is washing", 409)

        async def slow(params: dict) -> None:
            await release.wait()

        rpc.register("echo", echo)
        rpc.register("refuse", refuse)
        rpc.register("slow", slow)
        client = BusClient("127.0.0.1", port_of(bus), USER, PASSWORD, name="test")
        with pytest.raises(BusUnavailable):
            client.call("echo", {})
        client.start()
        try:
            assert await asyncio.to_thread(client.wait_connected, 5)
            assert await asyncio.to_thread(client.call, "echo", {"a": [1, "ü"]}) == {"echo": {"a": [1, "ü"]}}
            with pytest.raises(RpcError) as err:
                await asyncio.to_thread(client.call, "refuse", {})
            assert (err.value.code, err.value.status, str(err.value)) == ("BAY_BUSY", 409, "bay1 is washing")
            with pytest.raises(RpcError) as err:
                await asyncio.to_thread(client.call, "nope", {})
            assert err.value.status == 404
            with pytest.raises(RpcTimeout):
                await asyncio.to_thread(client.call, "slow", {}, timeout=0.3)
            release.set()
            # The late reply to the timed-out call is ignored; the next call still works.
            assert await asyncio.to_thread(client.call, "echo", {"n": 2}) == {"echo": {"n": 2}}
        finally:
            await asyncio.to_thread(client.stop)


async def test_a_concurrent_rpc_does_not_hold_up_the_bus() -> None:
    """A handler waiting on slow I/O (the cloud, a PLC scan) registered `concurrent`: other RPCs
    and client messages are handled meanwhile. An ordinary handler keeps the arrival order."""
    async with running_bus() as bus:
        rpc = RpcServer(bus)
        release = asyncio.Event()
        seen: list[str] = []
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append(topic))

        async def slow(params: dict) -> dict:
            await release.wait()
            return {"slow": True}

        async def echo(params: dict) -> dict:
            return params

        rpc.register("slow", slow, concurrent=True)
        rpc.register("echo", echo)
        client = BusClient("127.0.0.1", port_of(bus), USER, PASSWORD, name="test")
        client.start()
        try:
            assert await asyncio.to_thread(client.wait_connected, 5)
            pending = asyncio.ensure_future(asyncio.to_thread(client.call, "slow", {}, timeout=10))
            assert await asyncio.to_thread(client.call, "echo", {"n": 1}, timeout=3) == {"n": 1}
            with Probe(port_of(bus)) as device:
                await asyncio.to_thread(device.connect)
                await asyncio.to_thread(device.publish, "server/d1/ack", b"{}")
                await _wait(lambda: seen == ["server/d1/ack"])
            assert not pending.done()
            release.set()
            assert await pending == {"slow": True}
        finally:
            await asyncio.to_thread(client.stop)


async def test_malformed_rpc_requests_are_counted_not_fatal() -> None:
    async with running_bus() as bus:
        rpc = RpcServer(bus)

        async def echo(params: dict) -> dict:
            return params

        rpc.register("echo", echo)
        with internal(bus) as web:
            await asyncio.to_thread(web.connect)
            await asyncio.to_thread(web.subscribe, "gateway/reply/t")
            for bad in (b"not json", b"[]", json.dumps({"id": 1, "reply_to": "gateway/reply/t"}).encode(),
                        json.dumps({"id": "x", "reply_to": "wash/bay1/cmd"}).encode()):
                await asyncio.to_thread(web.publish, "gateway/rpc/echo", bad)
            await asyncio.to_thread(web.publish, "gateway/rpc/echo",
                                    json.dumps({"id": "ok", "reply_to": "gateway/reply/t", "params": {"v": 1}}))
            reply = await asyncio.to_thread(web.expect, "gateway/reply/t")
        assert json.loads(reply.payload) == {"id": "ok", "ok": True, "result": {"v": 1}}
        assert rpc.bad_requests == 4


async def test_routing_exact_and_wildcard_filters_and_departed_subscribers() -> None:
    """The broker's indexed routing (GatewayBroker._routes) delivers what amqtt's full scan would."""
    async with running_bus() as bus:
        exact, wild, deep = Probe(port_of(bus)), internal(bus), internal(bus)
        try:
            for p, f in ((exact, "device/a/command"), (wild, "device/+/command"), (deep, "device/#")):
                await asyncio.to_thread(p.connect)
                assert await asyncio.to_thread(p.subscribe, f) == [1]
            await bus.wait_subscribers(["device/a/command", "device/b/command", "device/b/x/y"], 5)
            assert not bus.has_subscriber("server/a/ack")
            await bus.publish("device/a/command", b"1")
            await bus.publish("device/b/command", b"2")
            await bus.publish("device/b/x/y", b"3")
            await bus.publish("device/a/command", b"end")
            got = {}
            for name, p in (("exact", exact), ("wild", wild), ("deep", deep)):
                got[name] = [m.payload for m in await asyncio.to_thread(p.until, "device/a/command", 5)]
            # `until` stops at the first message on the marker topic: drain to the real marker.
            for name, p in (("exact", exact), ("wild", wild), ("deep", deep)):
                while not got[name] or got[name][-1] != b"end":
                    m = await asyncio.to_thread(p.expect, None, 5)
                    got[name].append(m.payload)
            assert got["exact"] == [b"end"]  # b"1" was the first marker; the exact filter sees only topic a
            assert got["wild"] == [b"2", b"end"] and got["deep"] == [b"2", b"3", b"end"]
            wild.close()
            await bus.wait_clients(lambda c: len(c) == 2, 5)
            await bus.publish("device/b/command", b"4")
            assert (await asyncio.to_thread(deep.expect, "device/b/command", 5)).payload == b"4"
        finally:
            for p in (exact, wild, deep):
                p.close()


async def test_subscription_bookkeeping_survives_many_sessions() -> None:
    """Per-session filter sets (GatewayBroker): subscriptions and their index are gone with the
    sessions, refused subscriptions are never indexed, and routing still reaches who is left."""
    async with running_bus() as bus:
        probes = [Probe(port_of(bus), client_id=f"dev-{i}") for i in range(12)]
        try:
            for i, p in enumerate(probes):
                await asyncio.to_thread(p.connect)
                assert await asyncio.to_thread(p.subscribe, f"device/dev-{i}/command") == [1]
            assert await asyncio.to_thread(probes[0].subscribe, "gateway/#") == [0x80]  # refused by the ACL
            assert bus.broker._session_filters["dev-0"] == {"device/dev-0/command"}
            for p in probes[1:]:
                p.close()
            await bus.wait_clients(lambda c: c == {"dev-0"}, 10)
            # amqtt drops a session's subscriptions just after announcing the disconnection.
            await _settled(lambda: set(bus.broker._subscriptions) == {"device/dev-0/command"})
            assert set(bus.broker._session_filters) == {"dev-0"}
            assert "subscription filters" in repr(bus.broker._subscriptions)  # O(1), not every session
            await bus.publish("device/dev-0/command", b"still routed")
            assert (await asyncio.to_thread(probes[0].expect, "device/dev-0/command", 5)).payload == b"still routed"
        finally:
            for p in probes:
                p.close()
        await bus.wait_clients(lambda c: not c, 10)
        await _settled(lambda: not bus.broker._subscriptions and not bus.broker._session_filters)


async def _settled(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Broker state with no event of its own: checked at each turn of the loop, bounded."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


# --- limits against LAN abuse (raw MQTT 3.1.1 packets: exact control of what is sent) -------------


async def raw_client(bus: LocalBus, source: str = "127.0.0.1") -> mqtt_raw.RawConnection:
    """A raw connection to the bus's broker from `source` (any 127.x address: another LAN host)."""
    return await mqtt_raw.RawConnection.open(port_of(bus), source)


async def _wait(predicate: Any, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)  # polls a counter of the broker in this loop; bounded by the timeout


async def test_oversized_packet_closes_that_connection_only() -> None:
    async with running_bus(max_packet_bytes=2048, internal_max_packet_bytes=300_000) as bus:
        seen: list[tuple[str, int]] = []
        bus.subscribe("#", lambda topic, data, cid: seen.append((topic, len(data))))
        big, small, web = await raw_client(bus), await raw_client(bus), await raw_client(bus)
        try:
            assert await big.connect("dev-big") == 0
            assert await small.connect("dev-small") == 0
            assert await web.connect("carwash-web-1", USER, PASSWORD) == 0
            # Only the header of the big one is sent: the broker must refuse on the announced length.
            header = mqtt_raw.publish("server/dev-big/streaming", b"x" * 4000)[:40]
            big.writer.write(header)
            assert await big.closed_by_broker()
            assert bus.refusals.counts["packet_size"] == 1
            # The others are unaffected; the internal user may send request-sized packets.
            small.writer.write(mqtt_raw.publish("server/dev-small/streaming", b"y" * 1500))
            web.writer.write(mqtt_raw.publish("gateway/rpc/echo", b"z" * 200_000))
            await _wait(lambda: len(seen) == 2)
            assert sorted(seen) == [("gateway/rpc/echo", 200_000), ("server/dev-small/streaming", 1500)]
        finally:
            for c in (big, small, web):
                c.close()
        # From a LAN address (127.0.0.1 is exempt as the gateway's own), the address then cools down.
        lan = await raw_client(bus, source="127.0.0.5")
        try:
            assert await lan.connect("dev-lan") == 0
            lan.writer.write(header)
            assert await lan.closed_by_broker()
        finally:
            lan.close()
        again = await raw_client(bus, source="127.0.0.5")
        try:
            assert await again.closed_by_broker()
            assert bus.refusals.counts["cooldown"] == 1
        finally:
            again.close()


async def test_silent_connections_are_closed_and_free_their_slot() -> None:
    async with running_bus(max_connections=2, connect_timeout_sec=0.5) as bus:
        silent = [await raw_client(bus) for _ in range(2)]
        try:
            for c in silent:
                assert await c.closed_by_broker()
            assert bus.refusals.counts["connect_timeout"] == 2
            late = await raw_client(bus)
            try:
                assert await late.connect("dev-late") == 0  # both slots were given back
            finally:
                late.close()
        finally:
            for c in silent:
                c.close()


async def test_connection_beyond_the_maximum_is_closed_at_once_not_parked() -> None:
    async with running_bus(max_connections=2, connect_timeout_sec=60) as bus:
        a, b = await raw_client(bus), await raw_client(bus)
        try:
            assert await a.connect("dev-a") == 0 and await b.connect("dev-b") == 0
            third = await raw_client(bus)
            # Closed well before the 60 s connect timeout could have done it.
            assert await third.closed_by_broker(timeout=5.0)
            third.close()
            assert bus.refusals.counts["max_connections"] == 1
            a.close()
            await bus.wait_clients(lambda ids: "dev-a" not in ids, 5)
            again = await raw_client(bus)
            try:
                assert await again.connect("dev-again") == 0
            finally:
                again.close()
        finally:
            a.close()
            b.close()


async def test_publish_flood_of_one_client_is_cut_to_its_rate() -> None:
    async with running_bus(client_rate_per_sec=1.0, client_rate_burst=5, flood_cooldown_sec=0) as bus:
        seen: list[str | None] = []
        bus.subscribe("server/+/streaming", lambda topic, data, cid: seen.append(cid))
        flood, calm = await raw_client(bus), await raw_client(bus)
        try:
            assert await flood.connect("dev-flood") == 0 and await calm.connect("dev-calm") == 0
            flood.writer.write(b"".join(mqtt_raw.publish("server/dev-flood/streaming", b"{}") for _ in range(50)))
            await _wait(lambda: seen.count("dev-flood") + bus.refusals.counts["rate"] == 50)
            passed = seen.count("dev-flood")
            assert 5 <= passed <= 6, passed  # the burst, plus at most one refilled token
            calm.writer.write(mqtt_raw.publish("server/dev-calm/streaming", b"{}"))
            await _wait(lambda: "dev-calm" in seen)  # another device is not limited by the flood
        finally:
            flood.close()
            calm.close()


async def test_a_flooder_is_cut_off_and_its_address_cools_down() -> None:
    async with running_bus(client_rate_per_sec=1.0, client_rate_burst=5, flood_cooldown_sec=30) as bus:
        flood = await raw_client(bus, source="127.0.0.2")
        try:
            assert await flood.connect("dev-flood") == 0
            flood.writer.write(b"".join(mqtt_raw.publish("server/dev-flood/streaming", b"{}") for _ in range(50)))
            assert await flood.closed_by_broker()
        finally:
            flood.close()
        assert bus.refusals.counts["flood"] == 1
        again = await raw_client(bus, source="127.0.0.2")
        try:
            assert await again.closed_by_broker()  # closed before CONNECT: no CONNACK at all
        finally:
            again.close()
        assert bus.refusals.counts["cooldown"] == 1
        # Other addresses are not affected; exempt ones (the gateway's own) are cut off but never wait.
        for source in ("127.0.0.3", "127.0.0.1"):
            c = await raw_client(bus, source=source)
            try:
                assert await c.connect(f"dev-{source}") == 0
                c.writer.write(b"".join(mqtt_raw.publish(f"server/dev-{source}/streaming", b"{}") for _ in range(50)))
                assert await c.closed_by_broker()
            finally:
                c.close()
        back = await raw_client(bus, source="127.0.0.1")
        try:
            assert await back.connect("dev-back") == 0
        finally:
            back.close()
        assert bus.refusals.counts["flood"] == 3 and bus.refusals.counts["cooldown"] == 1


async def test_anonymous_client_ids_reserved_or_malformed_are_refused() -> None:
    async with running_bus() as bus:
        for client_id, accepted in [("device-a1b2c3", True), ("carwash-web-0123456789ab", False),
                                    ("d" * 129, False), ("dev\x01ice", False)]:
            c = await raw_client(bus)
            try:
                assert (await c.connect(client_id) == 0) == accepted, client_id
            finally:
                c.close()
        assert bus.refusals.counts["client_id"] == 3
        web = await raw_client(bus)  # the gateway's own clients keep their prefix
        try:
            assert await web.connect("carwash-web-0123456789ab", USER, PASSWORD) == 0
        finally:
            web.close()


async def test_what_was_acknowledged_before_a_disconnect_is_delivered() -> None:
    """amqtt 0.12.1 PUBACKs a QoS 1 message when it queues it, and dropped the queue when its
    publisher left: a device that ACKs a RESTART and reboots lost its ACK."""
    n = 500
    async with running_bus(client_rate_per_sec=0) as bus:
        seen: list[bytes] = []
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append(data))
        for how in ("DISCONNECT", "connection lost"):
            seen.clear()
            c = await raw_client(bus)
            try:
                assert await c.connect("dev-burst") == 0
                c.writer.write(b"".join(mqtt_raw.publish("server/dev-burst/ack", b"%d" % i, packet_id=i + 1)
                                        for i in range(n)))
                pubacks = await asyncio.wait_for(c.reader.readexactly(4 * n), 10)
                assert pubacks.count(mqtt_raw.PUBACK_PREFIX) == n
                if how == "DISCONNECT":
                    c.writer.write(mqtt_raw.DISCONNECT)
                    await c.writer.drain()
            finally:
                c.close()
            await _wait(lambda: len(seen) == n, timeout=10)
            assert seen == [b"%d" % i for i in range(n)], how  # all of them, in order


async def test_refused_logins_leave_no_session_behind() -> None:
    async with running_bus() as bus:
        before = len(bus.broker._sessions)
        for i in range(30):
            c = await raw_client(bus)
            try:
                assert await c.connect(f"guess-{i}", USER, f"wrong-{i}") != 0
                assert await c.closed_by_broker()
            finally:
                c.close()
        assert len(bus.broker._sessions) == before


def _accounts(**roles: tuple[str, int]) -> dict[str, Any]:
    from argon2 import PasswordHasher

    from gateway.access.mqtt_accounts import Account

    hasher = PasswordHasher()
    return {name: Account(name, hasher.hash(f"{name}-password-123"), role, gen) for name, (role, gen) in roles.items()}


async def test_accounts_roles_and_their_acl() -> None:
    """wash-backend publishes wash/+/cmd and reads status and results; monitor only reads; neither
    gets wildcards beyond its role nor the gateway's own topics; wrong passwords are refused."""
    async with running_bus() as bus:
        await bus.reload_accounts(_accounts(backend=("wash-backend", 0), dash=("monitor", 0)))
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()
        bus.subscribe("wash/+/cmd", lambda topic, data, cid: got.put_nowait((topic, data)))
        with Probe(port_of(bus), username="backend", password="wrong-password-123") as p:
            assert (await asyncio.to_thread(p.connect)).is_failure
        with Probe(port_of(bus), username="nobody", password="backend-password-123") as p:
            assert (await asyncio.to_thread(p.connect)).is_failure
        with Probe(port_of(bus), username="backend", password="backend-password-123") as backend, \
                Probe(port_of(bus), username="dash", password="dash-password-123") as dash:
            assert not (await asyncio.to_thread(backend.connect)).is_failure
            assert not (await asyncio.to_thread(dash.connect)).is_failure
            for topic_filter, code in [("wash/+/status", 1), ("wash/bay1/status", 1), ("wash/+/cmd/result", 1),
                                       ("wash/#", 0x80), ("gateway/#", 0x80), ("device/d1/command", 0x80),
                                       ("wash/+/cmd", 0x80)]:
                assert await asyncio.to_thread(backend.subscribe, topic_filter) == [code], topic_filter
            for topic_filter, code in [("wash/+/status", 1), ("gateway/status", 1), ("gateway/health", 1),
                                       ("gateway/presence/+", 1), ("wash/+/cmd/result", 0x80), ("gateway/#", 0x80),
                                       ("gateway/rpc/+", 0x80), ("#", 0x80)]:
                assert await asyncio.to_thread(dash.subscribe, topic_filter) == [code], topic_filter
            await asyncio.to_thread(backend.publish, "wash/bay1/cmd", b'{"action":"START"}')
            assert await asyncio.wait_for(got.get(), 5) == ("wash/bay1/cmd", b'{"action":"START"}')
            await bus.publish("wash/bay1/status", b'{"state":"IDLE"}')
            assert (await asyncio.to_thread(dash.expect, "wash/bay1/status")).payload == b'{"state":"IDLE"}'
            assert await asyncio.to_thread(dash.publish_refused, "wash/bay1/cmd", b'{"action":"START"}')
            assert await asyncio.to_thread(backend.publish_refused, "gateway/rpc/wash.command", b"{}")
        assert got.empty()
        assert bus.refusals.counts["acl_publish"] == 2 and bus.refusals.counts["login"] == 2


async def test_account_removed_or_changed_is_cut_off_at_once() -> None:
    async with running_bus() as bus:
        await bus.reload_accounts(_accounts(backend=("wash-backend", 0), dash=("monitor", 0)))
        with Probe(port_of(bus), username="backend", password="backend-password-123") as backend, \
                Probe(port_of(bus), username="dash", password="dash-password-123") as dash:
            await asyncio.to_thread(backend.connect)
            await asyncio.to_thread(dash.connect)
            assert await asyncio.to_thread(dash.subscribe, "wash/+/status") == [1]
            # The dashboard's password changes (generation 1): cut; the backend is untouched.
            assert await bus.reload_accounts(_accounts(backend=("wash-backend", 0), dash=("monitor", 1))) == 1
            assert await asyncio.to_thread(dash.disconnected.wait, 5)
            assert not backend.disconnected.is_set()
            await asyncio.to_thread(backend.publish, "wash/bay1/cmd", b"{}")
            assert await bus.reload_accounts({}) == 1
            assert await asyncio.to_thread(backend.disconnected.wait, 5)
        with Probe(port_of(bus), username="backend", password="backend-password-123") as p:
            assert (await asyncio.to_thread(p.connect)).is_failure


def test_anonymous_publish_acl_is_the_filters_of_anon_publish() -> None:
    """`acl._anonymous_may_publish` (no split per filter) answers as matching ANON_PUBLISH would."""
    from gateway.mqtt.acl import ANON_PUBLISH, _anonymous_may_publish
    from gateway.mqtt.topics import matches

    topics = ["server/d1/ack", "server/d1/streaming", "server//ack", "server/d1/ack/x", "server/ack",
              "server/d1/streamingx", "server/d1/", "server", "server/", "xserver/d1/ack", "Server/d1/ack",
              "device/d1/command", "server/+/ack", "server/d1/d2/streaming", "$SYS/server/d1/ack", "",
              "/server/d1/ack", "server/d1/Ack"]
    for t in topics:
        assert _anonymous_may_publish(t) == any(matches(f, t) for f in ANON_PUBLISH), t
