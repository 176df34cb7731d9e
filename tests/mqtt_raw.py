"""MQTT 3.1.1 packets as bytes, for tests and benchmarks that must control exactly what goes on
the wire (a length announced but not sent, a thousand publishes in one write): paho would not."""

from __future__ import annotations

import asyncio


def remaining_length(n: int) -> bytes:
    """The fixed header's variable-length integer."""
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    return len(s.encode()).to_bytes(2, "big") + s.encode()


def connect(client_id: str, username: str | None = None, password: str | None = None, *,
            keepalive: int = 30) -> bytes:
    """CONNECT with a clean session, and a user name and password when given."""
    flags = 0x02 | (0xC0 if username is not None else 0)
    body = b"\x00\x04MQTT\x04" + bytes([flags]) + keepalive.to_bytes(2, "big")
    body += b"".join(_string(f) for f in (client_id, username, password) if f is not None)
    return b"\x10" + remaining_length(len(body)) + body


def publish(topic: str, payload: bytes, *, packet_id: int | None = None) -> bytes:
    """PUBLISH at QoS 0, or QoS 1 with `packet_id`."""
    body = _string(topic) + (packet_id.to_bytes(2, "big") if packet_id is not None else b"") + payload
    return (b"\x30" if packet_id is None else b"\x32") + remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"
CONNACK_PREFIX = b"\x20\x02"
PUBACK_PREFIX = b"\x40\x02"


class RawConnection:
    """A raw MQTT 3.1.1 connection over asyncio streams, for tests that control every byte."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int, source: str = "127.0.0.1") -> RawConnection:
        """A TCP connection to 127.0.0.1:`port` from `source` (any 127.x address is this machine:
        another LAN host to the broker)."""
        return cls(*await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)))

    async def connect(self, client_id: str, username: str | None = None, password: str | None = None, *,
                      clean: bool = True, keepalive: int = 30) -> int:
        """CONNECT; returns the CONNACK return code."""
        packet = connect(client_id, username, password, keepalive=keepalive)
        if not clean:  # the flags byte follows the protocol name and level
            at = packet.index(b"MQTT\x04") + 5
            packet = packet[:at] + bytes([packet[at] & ~0x02]) + packet[at + 1:]
        self.writer.write(packet)
        connack = await asyncio.wait_for(self.reader.readexactly(4), 5)
        assert connack[:2] == CONNACK_PREFIX, connack
        return connack[3]

    async def closed_by_broker(self, timeout: float = 5.0, *, drain: bool = False) -> bool:
        """True when the broker closes the connection within `timeout` (EOF or reset). Without
        `drain` nothing may come first (the next read is the EOF); with it, what the broker still
        sends is read and dropped until the EOF. False when it stays open that long."""
        try:
            async with asyncio.timeout(timeout):
                while await self.reader.read(65536):
                    if not drain:
                        return False
                return True
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.writer.close()
