"""Live state in the web process: the latest `wash/{bayId}/status` of every bay, fanned out
to SSE streams and Socket.IO clients (`wash:status`); the devices' presence between the core's
saves (`gateway/live/{device_id}`); announcements of command events.

The core publishes the status retained, so the feed is complete as soon as the web's broker
client has subscribed. Callbacks run on paho's network thread; SSE generators read from their
own bounded queue (a slow client loses old events, never blocks the feed).
"""

from __future__ import annotations

import json
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

SUBSCRIBER_QUEUE = 256


class WashFeed:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.latest: dict[str, dict[str, Any]] = {}
        self._subscribers: set[queue.Queue[dict[str, Any]]] = set()
        self._listeners: list[Callable[[dict[str, Any]], None]] = []
        self.bad_messages = 0

    def add_listener(self, fn: Callable[[dict[str, Any]], None]) -> None:
        self._listeners.append(fn)

    def on_message(self, topic: str, payload: bytes) -> None:
        parts = topic.split("/")
        if not payload:
            return  # a cleared retained message
        try:
            status = json.loads(payload)
            if not isinstance(status, dict) or status.get("bayId") != parts[1]:
                raise ValueError("not a status of this bay")
        except ValueError as exc:
            self.bad_messages += 1
            log.warning("ignored a bad message on %s: %s", topic, exc)
            return
        with self._lock:
            self.latest[parts[1]] = status
            subscribers = list(self._subscribers)
        for q in subscribers:
            try:
                q.put_nowait(status)
            except queue.Full:
                pass  # that client is too slow; it keeps what it has
        for fn in self._listeners:
            try:
                fn(status)
            except Exception:
                log.exception("wash status listener failed")

    def subscribe(self) -> queue.Queue[dict[str, Any]]:
        q: queue.Queue[dict[str, Any]] = queue.Queue(SUBSCRIBER_QUEUE)
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.Queue[dict[str, Any]]) -> None:
        with self._lock:
            self._subscribers.discard(q)

    def snapshot(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return dict(self.latest)


class CommandFeed:
    """Wakes SSE streams of a command when the core announces new events on
    `gateway/commands/{command_id}/events` (the topic names the command; the payload carries
    nothing more). The streams read the events from the store, so a missed announcement only
    delays them to the next keepalive, never loses them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watchers: dict[str, set[threading.Event]] = {}
        self.announcements = 0

    def on_message(self, topic: str, _payload: bytes) -> None:
        parts = topic.split("/")
        if len(parts) != 4:
            return
        self.announcements += 1
        with self._lock:
            watchers = list(self._watchers.get(parts[2], ()))
        for ev in watchers:
            ev.set()

    def wake_all(self) -> None:
        """After a reconnect to the broker: announcements may have been missed, every stream re-reads."""
        with self._lock:
            watchers = [ev for evs in self._watchers.values() for ev in evs]
        for ev in watchers:
            ev.set()

    def watch(self, command_id: str) -> threading.Event:
        ev = threading.Event()
        with self._lock:
            self._watchers.setdefault(command_id, set()).add(ev)
        return ev

    def unwatch(self, command_id: str, ev: threading.Event) -> None:
        with self._lock:
            s = self._watchers.get(command_id)
            if s is not None:
                s.discard(ev)
                if not s:
                    del self._watchers[command_id]


@dataclass(frozen=True)
class LivePresence:
    """What views take from a live message (`online` comes from the row; see `merge`)."""

    rssi: int | None
    status: str | None
    last_seen_at: str  # ISO 8601 UTC with Z, as the core wrote it


class PresenceFeed:
    """The core's retained `gateway/live/{device_id}` messages: each device's state as of its last
    streaming message. The core saves it to the store only every `devices.presence_save_sec`, so
    views merge it over the row (`merge`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: dict[str, LivePresence] = {}
        self.bad_messages = 0

    def on_message(self, topic: str, payload: bytes) -> None:
        dev = topic.rsplit("/", 1)[1]
        if not payload:
            with self._lock:
                self._latest.pop(dev, None)
            return
        try:
            m = json.loads(payload)
            if not isinstance(m, dict) or m.get("device_id") != dev:
                raise ValueError("not the presence of this device")
            _opt_int(m.get("uptime"))  # the core's whole document is checked, though views show no uptime
            live = LivePresence(rssi=_opt_int(m.get("rssi")),
                                status=m.get("status") if isinstance(m.get("status"), str) else None,
                                last_seen_at=str(m["last_seen_at"]))
        except (ValueError, KeyError, TypeError) as exc:
            self.bad_messages += 1
            log.warning("ignored a bad message on %s: %s", topic, exc)
            return
        with self._lock:
            self._latest[dev] = live

    def get(self, device_id: str) -> LivePresence | None:
        with self._lock:
            return self._latest.get(device_id)

    def merge(self, device_id: str, view: dict[str, Any], *, last_seen_key: str = "last_seen_at") -> dict[str, Any]:
        """`view` (built from the device's row) with rssi, status and last seen replaced by the live
        ones when those are as new or newer. `online` stays the row's: the core writes transitions
        at once (a live message lost while the web was away cannot leave a device shown online)."""
        live = self.get(device_id)
        if live is not None and (view.get(last_seen_key) or "") <= live.last_seen_at:
            view.update({"rssi": live.rssi, "status": live.status, last_seen_key: live.last_seen_at})
        return view


def _opt_int(v: Any) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise ValueError("not an integer")
    return v
