"""The connection side of the patches: the reader, the writer and the protocol handler each
connection of `GatewayBroker` gets (each class and method names its patch of `PATCHES` in
gateway/mqtt/amqtt_patches/__init__.py)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from struct import pack
from typing import Any

from amqtt.adapters import BufferReader, StreamReaderAdapter, StreamWriterAdapter
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import MQTTEvents
from amqtt.mqtt import packet_class
from amqtt.mqtt.connect import ConnectPacket
from amqtt.mqtt.constants import QOS_0, QOS_1
from amqtt.mqtt.packet import (
    CONNACK,
    CONNECT,
    DISCONNECT,
    PINGREQ,
    PINGRESP,
    PUBACK,
    PUBCOMP,
    PUBLISH,
    PUBREC,
    PUBREL,
    RESERVED_0,
    RESERVED_15,
    SUBACK,
    SUBSCRIBE,
    UNSUBACK,
    UNSUBSCRIBE,
    MQTTFixedHeader,
    MQTTPacket,
    PacketIdVariableHeader,
)
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.publish import PublishPacket, PublishPayload, PublishVariableHeader
from amqtt.session import INCOMING, OutgoingApplicationMessage

from gateway.mqtt.amqtt_patches import log
from gateway.mqtt.guard import AbuseGuard

PUBACK_TIMEOUT = 5.0  # amqtt 0.12.1's wait for the PUBACK of an outgoing QoS 1 PUBLISH
_RESERVED = object()  # a reserved packet type was read (amqtt: the connection is treated as closed)


class PacketTooLarge(Exception):
    """A client announced a packet above its limit. Not an MQTTError on purpose: amqtt's reader
    loop skips those and reads on (out of step with the stream); anything else closes the connection."""


class GuardedReader(StreamReaderAdapter):
    """Patch `packet_size_limit`: amqtt 0.12.1 reads a packet's body with one `read(n)` once the
    fixed header announced it: refusing a large `n` refuses the packet before a byte of it is
    buffered. The gateway's own reader (`GatewayHandler._next_packet`) asks `admit` first."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int, guard: AbuseGuard, peer: Any) -> None:
        super().__init__(reader)
        self.stream = reader
        self.max_bytes = max_bytes
        self._guard = guard
        self._peer = peer

    def admit(self, n: int) -> None:
        """Raise PacketTooLarge (counted, the address cools down) when `n` bytes are above the limit."""
        if n > self.max_bytes:
            self._guard.refusals.drop("packet_size", "connection",
                                      f"{self._peer}: a packet of more than {n} bytes, above the limit of "
                                      f"{self.max_bytes}; connection closed, the address cools down")
            # No device sends such packets: whoever does would otherwise reconnect and try again at once.
            self._guard.cool_down(self._peer[0] if self._peer else None)
            raise PacketTooLarge(f"packet above {self.max_bytes} bytes")

    async def read(self, n: int = -1) -> bytes:
        self.admit(n)
        data: bytes = await super().read(n)
        return data


class CorkedWriter(StreamWriterAdapter):
    """Patch `coalesced_writes`: amqtt 0.12.1 writes each packet to the socket at once (a `send`
    syscall per PUBACK and per PUBLISH out). Here what a connection's packets write during one turn
    of the event loop goes out in one `send` at the end of that turn, in order. `drain` (amqtt's
    flow control after each packet) still waits while the transport is above its high-water mark."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        super().__init__(writer)
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def write(self, data: bytes) -> None:
        if self.is_closed:
            return
        if not self._pending:
            self._loop.call_soon(self.flush)
        self._pending.append(data)

    def flush(self) -> None:
        """Hand what is pending to the transport (one `send` when the socket takes it all)."""
        if self._pending:
            data = b"".join(self._pending)
            self._pending.clear()
            try:
                self._writer.write(data)
            except RuntimeError:  # the transport's end was written (closed): as amqtt's write, lost
                pass

    async def close(self) -> None:
        self.flush()
        await super().close()


def has_room(writer: Any) -> bool:
    """True when a write to `writer` now would not have waited in amqtt's `drain` (a TCP
    connection's writer, open, its transport under the high-water mark)."""
    if not isinstance(writer, StreamWriterAdapter) or writer.is_closed:
        return False
    transport = writer._writer.transport
    return not transport.is_closing() and transport.get_write_buffer_size() < transport.get_write_buffer_limits()[1]


def _header_size(buf: bytearray) -> int:
    """The size of the fixed header `buf` starts with (type byte, 1-4 length bytes); 0 when it
    is not wholly buffered yet."""
    for i in range(1, min(len(buf), 5)):
        if buf[i] < 0x80:
            return i + 1
    return 0


async def _read_header(stream: asyncio.StreamReader, size: int) -> tuple[int, int]:
    """The fixed header, in one read when its `size` is known (else byte by byte past the
    first two): (first byte, remaining length). MQTTError on a length of over 4 bytes, as amqtt 0.12.1."""
    head = await stream.readexactly(size)
    length, multiplier, i = 0, 1, 1
    while True:
        if i == len(head):
            head += await stream.readexactly(1)
        byte = head[i]
        length += (byte & 0x7F) * multiplier
        if not byte & 0x80:
            return head[0], length
        if i == 4:
            raise MQTTError(f"Invalid remaining length bytes, packet_type={head[0] >> 4}")
        multiplier *= 128
        i += 1


def decode_publish(flags: int, length: int, body: bytes) -> PublishPacket | None:
    """A PUBLISH decoded from its whole body in one pass, as amqtt 0.12.1's decoder would (same
    classes, same MQTTError on a wildcard topic); None when the body is malformed or its topic not
    UTF-8: amqtt's own decoder then decides."""
    if length < 2:
        return None
    end = 2 + ((body[0] << 8) | body[1])
    qos = (flags >> 1) & 0x03
    if end + (2 if qos else 0) > length:
        return None
    try:
        topic = body[2:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    packet_id = None
    if qos:
        packet_id = (body[end] << 8) | body[end + 1]
        end += 2
    packet = PublishPacket(MQTTFixedHeader(PUBLISH, flags, length), PublishVariableHeader(topic, packet_id),
                           PublishPayload(body[end:]))
    packet.protocol_ts = datetime.now(UTC)
    return packet


def encode_publish(topic: str, data: bytes | bytearray, qos: int, packet_id: int | None) -> bytes:
    """The bytes amqtt 0.12.1's `PublishPacket.build(...).to_bytes()` gives (no DUP, no RETAIN)."""
    name = topic.encode("utf-8")
    var = pack("!H", len(name)) + name + (pack("!H", packet_id) if qos and packet_id is not None else b"")
    length = len(var) + len(data)
    head = bytearray((0x30 | (qos << 1),))
    while True:
        byte, length = length % 0x80, length // 0x80
        head.append(byte | 0x80 if length else byte)
        if not length:
            break
    return bytes(head) + var + data


_IN_TASK = {  # amqtt 0.12.1 handles these packets in a task each, as here
    CONNACK: "handle_connack", SUBSCRIBE: "handle_subscribe", UNSUBSCRIBE: "handle_unsubscribe",
    SUBACK: "handle_suback", UNSUBACK: "handle_unsuback", PUBACK: "handle_puback", PUBREC: "handle_pubrec",
    PUBREL: "handle_pubrel", PUBCOMP: "handle_pubcomp", PINGREQ: "handle_pingreq", PINGRESP: "handle_pingresp",
    DISCONNECT: "handle_disconnect",
}


class GatewayHandler(BrokerProtocolHandler):
    """amqtt 0.12.1's `BrokerProtocolHandler` with patches `reader_without_tasks`,
    `whole_packet_reads`, `direct_outgoing_publish` and `puback_in_place`. Installed on each connection's handler by
    `GatewayBroker._install_handler`."""

    _queued_sends = 0  # outgoing publishes on amqtt's path (a task each) not yet finished
    _expiry: deque[tuple[float, asyncio.Future[PubackPacket]]] | None = None
    _expiry_timer: asyncio.TimerHandle | None = None

    async def _reader_loop(self) -> None:
        """Patch `reader_without_tasks`: amqtt 0.12.1's `ProtocolHandler._reader_loop`, same checks
        and order, two changes: the fixed header's read is bounded by the keep-alive under
        `asyncio.timeout` (amqtt: `wait_for`, a task per packet), and a QoS 0/1 PUBLISH and a PUBACK
        are handled in place (amqtt: a task each; neither waits on a later packet: a PUBACK only
        resolves its waiter). QoS 2 keeps its task: it waits for a PUBREL that this loop must read."""
        if self.session is None or self._reader_ready is None:
            raise AMQTTError("Session is not initialized.")
        running: deque[asyncio.Task[None]] = deque()
        keepalive: int | None = self.session.keep_alive
        if keepalive is not None and keepalive <= 0:
            keepalive = None
        while True:
            try:
                self._reader_ready.set()
                while running and running[0].done():
                    running.popleft()
                if self.reader is None:
                    break
                packet = await self._next_packet(keepalive)
                if packet is None:
                    break  # EOF
                if packet is _RESERVED:
                    await self.handle_connection_closed()
                    continue
                assert isinstance(packet, MQTTPacket)
                await self.plugins_manager.fire_event(MQTTEvents.PACKET_RECEIVED, packet=packet, session=self.session)
                kind = packet.fixed_header.packet_type if packet.fixed_header is not None else None
                if ((kind == PUBLISH and isinstance(packet, PublishPacket) and packet.qos in (QOS_0, QOS_1))
                        or (kind == PUBACK and isinstance(packet, PubackPacket))):
                    try:
                        await (self.handle_publish(packet) if kind == PUBLISH else self.handle_puback(packet))
                    except (asyncio.CancelledError, TimeoutError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - amqtt's task would have swallowed it too
                        log.warning("mqtt: client %r: a packet failed: %r", self.session.client_id, exc)
                elif kind == PUBLISH:
                    running.append(asyncio.create_task(self.handle_publish(packet)))
                elif kind == CONNECT and isinstance(packet, ConnectPacket):
                    await self.handle_connect(packet)
                elif kind in _IN_TASK:
                    running.append(asyncio.create_task(getattr(self, _IN_TASK[kind])(packet)))
                else:
                    log.warning("mqtt: client %r sent an unhandled packet type %s", self.session.client_id, kind)
            except MQTTError:
                pass  # amqtt: "Message discarded"
            except asyncio.CancelledError:
                break
            except TimeoutError:
                self.handle_read_timeout()
            except NoDataError:
                pass
            except Exception as exc:  # noqa: BLE001 - as amqtt: the connection ends, the broker does not
                log.warning("mqtt: unhandled exception in the reader of %r: %r", self.session.client_id, exc)
                break
        while running:
            running.popleft().cancel()
        await self.handle_connection_closed()
        self._reader_stopped.set()
        await self.stop()

    async def _next_packet(self, keepalive: float | None) -> object:
        """Patch `whole_packet_reads`: the next packet, None at EOF, `_RESERVED` for a reserved type.
        amqtt 0.12.1 reads a packet in ~11 `readexactly` calls (the type byte, each length byte,
        then the body field by field); here the fixed header is one read (when it has to be
        waited for: two, then one per further length byte), the body one more, and a PUBLISH is
        decoded from it in one pass (other packets by amqtt's decoders, from the body in memory).
        The keep-alive bounds the wait for the fixed header as in amqtt; a header already buffered
        needs no timer."""
        stream = getattr(self.reader, "stream", None)
        if not isinstance(stream, asyncio.StreamReader):
            return await self._amqtt_next_packet(keepalive)
        try:
            size = _header_size(stream._buffer)  # type: ignore[attr-defined]  # CPython's StreamReader
            if size:
                first, length = await _read_header(stream, size)
            else:
                async with asyncio.timeout(keepalive):
                    first, length = await _read_header(stream, 2)
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            return None  # amqtt: no data for a fixed header is the end of the stream
        kind = first >> 4
        if kind in (RESERVED_0, RESERVED_15):
            return _RESERVED
        admit: Callable[[int], None] | None = getattr(self.reader, "admit", None)
        if admit is not None:
            admit(length)
        try:
            body = await stream.readexactly(length) if length else b""
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            raise NoDataError("No more data") from None  # as amqtt's decoders: the next read sees EOF
        if kind == PUBLISH:
            packet = decode_publish(first & 0x0F, length, body)
            if packet is not None:
                return packet
        header = MQTTFixedHeader(kind, first & 0x0F, length)
        if kind == PUBACK and length == 2:  # what amqtt's decoder makes of it, without the stream adapter
            puback = PubackPacket(header, PacketIdVariableHeader((body[0] << 8) | body[1]))
            puback.protocol_ts = datetime.now(UTC)
            return puback
        return await packet_class(header).from_stream(BufferReader(body), fixed_header=header)

    async def _amqtt_next_packet(self, keepalive: float | None) -> object:
        """amqtt 0.12.1's way: the fixed header (under the keep-alive), then the packet's decoder
        reading the stream field by field."""
        assert self.reader is not None
        async with asyncio.timeout(keepalive):
            fixed_header = await MQTTFixedHeader.from_stream(self.reader)
        if not fixed_header:
            return None
        if fixed_header.packet_type in (RESERVED_0, RESERVED_15):
            return _RESERVED
        return await packet_class(fixed_header).from_stream(self.reader, fixed_header=fixed_header)

    # --- patch direct_outgoing_publish ----------------------------------------------------------------

    def publish(self, topic: str, data: bytes | bytearray, qos: int) -> asyncio.Task[Any] | None:
        """Patch `direct_outgoing_publish`: send a broadcast to this client. amqtt 0.12.1 starts a
        task per message (`mqtt_publish`: a PublishPacket built, encoded by many small
        concatenations, written under the write lock, a keep-alive timer re-armed, and for QoS 1 a
        `wait_for` on the PUBACK with a timer each). Here a QoS 0/1 PUBLISH is encoded straight to
        bytes and written in place when amqtt's path would not have waited (nothing of this
        connection queued before it, the write lock free, the transport under its high-water
        mark, no plugin listening for sent packets); the QoS 1 flow is amqtt's (in flight until its
        PUBACK, dropped after 5 s without one, as amqtt does) with one timer per connection.
        Otherwise amqtt's path, as a task (returned; the caller keeps it as amqtt does)."""
        if self._writes_now(topic, qos):
            self._write_publish(topic, data, qos)
            return None
        task: asyncio.Task[Any] = asyncio.ensure_future(self.mqtt_publish(topic, data, qos, retain=False))
        self._queued_sends += 1
        task.add_done_callback(self._sent_by_task)
        return task

    def _sent_by_task(self, _task: asyncio.Future[Any]) -> None:
        self._queued_sends -= 1

    def _writes_now(self, topic: str, qos: int) -> bool:
        writer = self.writer
        return (qos in (QOS_0, QOS_1) and self.session is not None and not self._queued_sends
                and has_room(writer) and not self._write_lock.locked()
                and "#" not in topic and "+" not in topic  # amqtt's PublishPacket refuses those: its path
                and MQTTEvents.PACKET_SENT not in self.plugins_manager._event_plugin_callbacks)

    def _write_publish(self, topic: str, data: bytes | bytearray, qos: int) -> None:
        session, writer = self.session, self.writer
        assert session is not None and writer is not None
        if qos == QOS_0:
            writer.write(encode_publish(topic, data, QOS_0, None))
            return
        packet_id = session.next_packet_id  # never one in flight (amqtt's Session skips those)
        message = OutgoingApplicationMessage(packet_id, topic, QOS_1, data, False)
        session.inflight_out[packet_id] = message
        writer.write(encode_publish(topic, data, QOS_1, packet_id))
        # What amqtt keeps of a sent PUBLISH (`PublishPacket.build`'s result, built directly): a
        # redelivery (`_retry_deliveries`) sets DUP from it.
        message.publish_packet = PublishPacket(MQTTFixedHeader(PUBLISH, QOS_1 << 1),
                                               PublishVariableHeader(topic, packet_id), PublishPayload(bytes(data)))
        waiter: asyncio.Future[PubackPacket] = self._loop.create_future()
        self._puback_waiters[packet_id] = waiter
        waiter.add_done_callback(partial(self._puback_done, message))
        self._expire_later(waiter)

    def _puback_done(self, message: OutgoingApplicationMessage, waiter: asyncio.Future[PubackPacket]) -> None:
        """amqtt's `finally` of its QoS 1 flow: the message leaves the flight, acknowledged or not."""
        assert message.packet_id is not None
        if self._puback_waiters.get(message.packet_id) is waiter:
            del self._puback_waiters[message.packet_id]
        if self.session is not None:
            self.session.inflight_out.pop(message.packet_id, None)
        if not waiter.cancelled():
            message.puback_packet = waiter.result()

    def _expire_later(self, waiter: asyncio.Future[PubackPacket]) -> None:
        expiry = self._expiry
        if expiry is None:
            expiry = self._expiry = deque()
        while expiry and expiry[0][1].done():
            expiry.popleft()  # acknowledged: nothing to expire
        expiry.append((self._loop.time() + PUBACK_TIMEOUT, waiter))
        if self._expiry_timer is None:
            self._expiry_timer = self._loop.call_at(expiry[0][0], self._expire)

    def _expire(self) -> None:
        """Every waiter past its 5 s is dropped as amqtt drops it (a warning; the message leaves
        the flight), then the one timer is set for the next deadline."""
        self._expiry_timer = None
        expiry = self._expiry
        now = self._loop.time()
        while expiry and expiry[0][0] <= now:
            waiter = expiry.popleft()[1]
            if not waiter.done():
                log.warning("mqtt: client %r: timeout waiting for PUBACK; message dropped",
                            self.session.client_id if self.session else None)
                waiter.cancel()
        if expiry:
            self._expiry_timer = self._loop.call_at(expiry[0][0], self._expire)

    async def _handle_qos1_message_flow(self, app_message: Any) -> None:
        """Patch `puback_in_place`: amqtt 0.12.1's flow for an incoming QoS 1 PUBLISH (queue the
        message for delivery, then PUBACK), the PUBACK written in place when nothing else of this
        connection waits to be written (else amqtt's packet path: a packet object, the write lock,
        a drain, a keep-alive timer re-armed per packet). Outgoing flows and the checks: amqtt's."""
        session = self.session
        packet_id = app_message.packet_id
        if (app_message.direction != INCOMING or session is None or packet_id is None
                or app_message.puback_packet or app_message.qos != QOS_1):
            await super()._handle_qos1_message_flow(app_message)
            return
        await session.delivered_message_queue.put(app_message)
        puback = PubackPacket.build(packet_id)
        if self._writes_now("", QOS_1):
            assert self.writer is not None
            self.writer.write(pack("!BBH", PUBACK << 4, 2, packet_id))
        else:
            await self._send_packet(puback)
        app_message.puback_packet = puback

    async def stop(self) -> None:
        if self._expiry_timer is not None:
            self._expiry_timer.cancel()
            self._expiry_timer = None
        await super().stop()
