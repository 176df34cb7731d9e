"""The tests of the amqtt patches on a connection's reads and writes (gateway/mqtt/amqtt_patches/
handler.py), one per patch as in tests/unit/test_amqtt_patches.py (whose audit test also checks
these; the same CARWASH_REVERT_PATCH=name runs one against amqtt 0.12.1's own code)."""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any

import pytest
from amqtt.adapters import StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.publish import PublishPacket

from gateway.mqtt.amqtt_patches import GatewayBroker, GatewayHandler, handler as handler_module
from gateway.mqtt.broker import LocalBus
from tests import mqtt_raw
from tests.mqtt_probe import Probe, counting_tasks
from tests.unit.test_amqtt_patches import PASSWORD, REVERTED, USER, _until, raw_open, running_bus

# --- each patch reverted to amqtt 0.12.1's own code -------------------------------------------------


class _AmqttReads(GatewayHandler):
    _next_packet = GatewayHandler._amqtt_next_packet


class _FieldByFieldReads(GatewayBroker):
    handler_class = _AmqttReads


class _WriteEachPacket(GatewayBroker):
    def _writer(self, writer: asyncio.StreamWriter) -> StreamWriterAdapter:
        return StreamWriterAdapter(writer)


class _TaskPerDelivery(GatewayBroker):
    _message_loop = Broker._client_message_loop


class _PublishTasks(GatewayBroker):
    def _send(self, handler: Any, topic: str, data: bytes, qos: int) -> asyncio.Task[Any] | None:
        task: asyncio.Task[Any] = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        return task


class _AmqttPuback(GatewayHandler):
    _handle_qos1_message_flow = BrokerProtocolHandler._handle_qos1_message_flow


class _PubackByPacket(GatewayBroker):
    handler_class = _AmqttPuback


REVERTED.update({
    "whole_packet_reads": _FieldByFieldReads,
    "coalesced_writes": _WriteEachPacket,
    "drain_delivery_queue": _TaskPerDelivery,
    "direct_outgoing_publish": _PublishTasks,
    "puback_in_place": _PubackByPacket,
})


def _handler(bus: LocalBus, client_id: str) -> Any:
    return bus.broker._sessions[client_id][1]


def _burst(client_id: str, n: int, *, qos1: bool) -> bytes:
    return b"".join(mqtt_raw.publish(f"server/{client_id}/ack", b"%d" % i, packet_id=(i + 1) if qos1 else None)
                    for i in range(n))


# --- one test per patch, amqtt 0.12.1 ---------------------------------------------------------------


async def test_whole_packet_reads() -> None:
    """amqtt 0.12.1 reads a PUBLISH in 6 or more `readexactly` calls; here two (header, body), and
    the packets decode as amqtt's decoder decodes them."""
    n = 20
    async with running_bus("whole_packet_reads", client_rate_per_sec=0) as bus:
        seen: list[tuple[str, bytes]] = []
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append((topic, data)))
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            stream = _handler(bus, "dev-1").reader._reader
            reads = 0
            readexactly = stream.readexactly

            async def counted(k: int) -> bytes:
                nonlocal reads
                reads += 1
                data: bytes = await readexactly(k)
                return data

            stream.readexactly = counted
            c.writer.write(_burst("dev-1", n, qos1=True) + mqtt_raw.publish("server/dev-1/ack", b"x" * 300))
            await _until(lambda: len(seen) == n + 1)
            assert await asyncio.wait_for(c.reader.readexactly(4 * n), 5)  # every PUBACK
        finally:
            c.close()
        assert seen == [("server/dev-1/ack", b"%d" % i) for i in range(n)] + [("server/dev-1/ack", b"x" * 300)]
        assert reads <= 2 * (n + 1) + 2, reads  # the header, the body (+ the reads that waited for data)


async def test_coalesced_writes() -> None:
    """amqtt 0.12.1 writes each PUBACK to the socket on its own; a burst's go out together here."""
    n = 30
    async with running_bus("coalesced_writes", client_rate_per_sec=0) as bus:
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            transport_writer = _handler(bus, "dev-1").writer._writer
            writes = 0
            write = transport_writer.write

            def counted(data: bytes) -> None:
                nonlocal writes
                writes += 1
                write(data)

            transport_writer.write = counted
            c.writer.write(_burst("dev-1", n, qos1=True))
            pubacks = await asyncio.wait_for(c.reader.readexactly(4 * n), 5)
        finally:
            c.close()
        assert [pubacks[i:i + 4] for i in range(0, 4 * n, 4)] == [
            mqtt_raw.PUBACK_PREFIX + (i + 1).to_bytes(2, "big") for i in range(n)]  # in order
        assert writes <= n // 3, writes


async def test_drain_delivery_queue() -> None:
    """amqtt 0.12.1 starts a task (and a four-future wait) per message it delivers from a client."""
    n = 40
    async with running_bus("drain_delivery_queue", client_rate_per_sec=0) as bus:
        seen: list[bytes] = []
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append(data))
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            with counting_tasks() as started:
                c.writer.write(_burst("dev-1", n, qos1=False))
                await _until(lambda: len(seen) == n, timeout=3)
        finally:
            c.close()
        assert seen == [b"%d" % i for i in range(n)]
        takes = [q for q in started if q.endswith("mqtt_deliver_next_message")]
        assert len(takes) <= n // 4, len(takes)


async def test_direct_outgoing_publish() -> None:
    """amqtt 0.12.1 sends each delivery from a task of its own; here in place, same bytes, in order,
    QoS 1 in flight until its PUBACK."""
    for args in (("a/b", b"x" * 200, 0, None), ("wash/bay1/status", b"", 1, 7), ("t" * 300, b"y" * 20000, 1, 65535)):
        packet = PublishPacket.build(args[0], args[1], args[3], False, args[2], False)
        assert handler_module.encode_publish(*args) == packet.to_bytes()
    n = 30
    async with running_bus("direct_outgoing_publish") as bus:
        with Probe(bus._settings.port, username=USER, password=PASSWORD, client_id="web-1") as web:
            await asyncio.to_thread(web.connect)
            assert await asyncio.to_thread(web.subscribe, "wash/+/status") == [1]
            with counting_tasks() as started:
                for i in range(n):
                    await bus.publish(f"wash/bay{i}/status", b"%d" % i, qos=i % 2)
                got = [(await asyncio.to_thread(web.expect, None)).payload for _ in range(n)]
            session = bus.broker._sessions["web-1"][0]
            await _until(lambda: not session.inflight_out)  # every QoS 1 acknowledged, none left in flight
        assert got == [b"%d" % i for i in range(n)]
        assert [q for q in started if q.endswith("mqtt_publish")] == []


async def test_direct_outgoing_publish_drops_an_unacknowledged_qos1_as_amqtt(monkeypatch: Any) -> None:
    """amqtt 0.12.1 gives up on an outgoing QoS 1 PUBLISH 5 s after sending it (warning; no retry
    on the connection); the one timer per connection does the same (here after 0.2 s)."""
    if os.environ.get("CARWASH_REVERT_PATCH") == "direct_outgoing_publish":
        pytest.skip("amqtt's own flow waits its fixed 5 s")
    monkeypatch.setattr(handler_module, "PUBACK_TIMEOUT", 0.2)
    async with running_bus("direct_outgoing_publish") as bus:
        c = await raw_open(bus)
        try:
            assert await c.connect("web-2", USER, PASSWORD) == 0
            body = b"\x00\x01" + len(b"wash/+/status").to_bytes(2, "big") + b"wash/+/status" + b"\x01"
            c.writer.write(b"\x82" + mqtt_raw.remaining_length(len(body)) + body)  # SUBSCRIBE at QoS 1
            assert (await asyncio.wait_for(c.reader.readexactly(5), 5))[:2] == b"\x90\x03"  # SUBACK
            session = bus.broker._sessions["web-2"][0]
            await bus.publish("wash/bay1/status", b"never acked", qos=1)
            await asyncio.wait_for(c.reader.readexactly(2), 5)  # the PUBLISH arrives, no PUBACK is sent
            assert session.inflight_out
            await _until(lambda: not session.inflight_out, timeout=3)
            assert not _handler(bus, "web-2")._puback_waiters
        finally:
            c.close()


async def test_puback_in_place() -> None:
    """amqtt 0.12.1 sends each PUBACK through its packet path (a packet object, a drain, a timer)."""
    n = 20
    async with running_bus("puback_in_place", client_rate_per_sec=0) as bus:
        seen: deque[bytes] = deque()
        bus.subscribe("server/+/ack", lambda topic, data, cid: seen.append(data))
        c = await raw_open(bus)
        try:
            assert await c.connect("dev-1") == 0
            handler = _handler(bus, "dev-1")
            sent: list[str] = []
            send = handler._send_packet

            async def counted(packet: Any) -> None:
                sent.append(type(packet).__name__)
                await send(packet)

            handler._send_packet = counted
            c.writer.write(_burst("dev-1", n, qos1=True))
            pubacks = await asyncio.wait_for(c.reader.readexactly(4 * n), 5)
            await _until(lambda: len(seen) == n)
        finally:
            c.close()
        assert pubacks == b"".join(mqtt_raw.PUBACK_PREFIX + (i + 1).to_bytes(2, "big") for i in range(n))
        assert sent == []


async def test_whole_packet_reads_decodes_every_length_as_amqtt() -> None:
    """The fixed header read in one go (buffered) or piece by piece (arriving) gives amqtt's
    remaining length at each boundary of the variable-length integer; 5 length bytes are amqtt's
    MQTTError."""
    from amqtt.errors import MQTTError
    from amqtt.mqtt.packet import MQTTFixedHeader

    for n in (0, 1, 127, 128, 200, 16383, 16384, 2097151, 2097152, 268435455):
        encoded = MQTTFixedHeader(3, 2, n).to_bytes()
        for buffered in (True, False):
            stream = asyncio.StreamReader()
            stream.feed_data(encoded + b"next")
            size = handler_module._header_size(stream._buffer) if buffered else 2  # type: ignore[attr-defined]
            assert size == (len(encoded) if buffered else 2)
            assert await handler_module._read_header(stream, size) == (encoded[0], n)
            assert await stream.readexactly(4) == b"next"
    stream = asyncio.StreamReader()
    stream.feed_data(b"\x30\xff\xff\xff\xff\x01")
    assert handler_module._header_size(stream._buffer) == 0  # type: ignore[attr-defined]
    with pytest.raises(MQTTError):
        await handler_module._read_header(stream, 2)
