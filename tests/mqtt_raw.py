"""MQTT 3.1.1 packets as bytes, for tests and benchmarks that must control exactly what goes on
the wire (a length announced but not sent, a thousand publishes in one write): paho would not."""

from __future__ import annotations


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
