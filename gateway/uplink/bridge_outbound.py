"""What the cloud bridge still owes the cloud broker: the latest payload of each topic.

Contract (all on the bridge's event loop): `put(topic, payload)` keeps only the newest payload of
a topic and returns its sequence number and the topic dropped to make room (the oldest, when
`max_topics` are waiting) or None. `sent(mid, topic, seq)` records a publish on the current
connection; `acked(mid)` is its PUBACK: True when it was one of these (the entry is gone unless a
newer payload came meanwhile). `lost()` forgets the publishes of a connection that went: their
topics stay and are sent again, oldest topic first (`waiting()`), after the next CONNACK.
"""

from __future__ import annotations

from collections import OrderedDict


class LatestPerTopic:
    def __init__(self, max_topics: int) -> None:
        self.max_topics = max_topics
        self._pending: OrderedDict[str, tuple[int, bytes]] = OrderedDict()  # topic -> (seq, latest payload)
        self._seq = 0
        self._inflight: dict[int, tuple[str, int]] = {}  # mid -> (topic, seq) on the current connection

    def __len__(self) -> int:
        return len(self._pending)

    def put(self, topic: str, payload: bytes) -> tuple[int, str | None]:
        self._seq += 1
        dropped = None
        if topic in self._pending:
            self._pending.move_to_end(topic)
        elif len(self._pending) >= self.max_topics:
            dropped, _ = self._pending.popitem(last=False)
        self._pending[topic] = (self._seq, payload)
        return self._seq, dropped

    def waiting(self) -> list[tuple[str, int, bytes]]:
        """(topic, seq, payload), oldest topic first."""
        return [(topic, seq, payload) for topic, (seq, payload) in self._pending.items()]

    def sent(self, mid: int, topic: str, seq: int) -> None:
        self._inflight[mid] = (topic, seq)

    def acked(self, mid: int) -> bool:
        entry = self._inflight.pop(mid, None)
        if entry is None:
            return False
        topic, seq = entry
        latest = self._pending.get(topic)
        if latest is not None and latest[0] == seq:
            del self._pending[topic]
        return True

    def lost(self) -> None:
        self._inflight.clear()
