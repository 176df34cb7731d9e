"""A paho-mqtt client for tests: connect, subscribe and wait for messages, all with timeouts.

Blocking calls wait on events set by paho's network thread; async tests call them through
`asyncio.to_thread` so the broker in the test's loop keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mqtt.amqtt_patches import GatewayBroker
from gateway.mqtt.broker import BrokerSettings, LocalBus
from gateway.mqtt.client import close_client


@dataclass
class Msg:
    topic: str
    payload: bytes
    retain: bool


class Probe:
    def __init__(self, port: int, *, username: str | None = None, password: str | None = None,
                 client_id: str | None = None) -> None:
        self.port = port
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id or f"probe-{uuid.uuid4().hex[:8]}")
        if username is not None:
            self.client.username_pw_set(username, password)
        self.messages: queue.Queue[Msg] = queue.Queue()
        self.skipped: list[Msg] = []
        self._connack: queue.Queue[Any] = queue.Queue()
        self._subacks: dict[int, queue.Queue[list[Any]]] = {}
        self._published: dict[int, threading.Event] = {}
        self._lock = threading.Lock()
        self.client.on_connect = lambda c, u, f, rc, p: self._connack.put(rc)
        self.client.on_message = lambda c, u, m: self.messages.put(Msg(m.topic, m.payload, bool(m.retain)))
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self.client.on_connect_fail = lambda c, u: self._connack.put("connect failed")
        self.client.on_disconnect = self._on_disconnect
        self.disconnected = threading.Event()

    def connect(self, timeout: float = 5.0) -> Any:
        """Connect and return the CONNACK reason code (raises TimeoutError)."""
        self.client.connect("127.0.0.1", self.port, keepalive=30)
        self.client.loop_start()
        try:
            return self._connack.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError("no CONNACK") from None

    def close(self) -> None:
        # The network thread writes DISCONNECT: stopping it first would drop the packet, and the
        # broker would see the socket vanish mid-session (amqtt then leaves its side of the
        # connection open: a ResourceWarning at some later garbage collection, in another test).
        if self.client.disconnect() == mqtt.MQTT_ERR_SUCCESS:
            self.disconnected.wait(5.0)
        close_client(self.client)  # also paho's socket after a refused CONNACK, and its wake-up pair

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_disconnect(self, _c: Any, _u: Any, _f: Any, rc: Any, _p: Any) -> None:
        self.disconnected.set()
        if rc.is_failure:
            self._connack.put(rc)

    def publish_refused(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 5.0) -> bool:
        """Publish and wait for the broker to close the connection; True when it closed it without
        acknowledging the publish (paho's reconnects are stopped)."""
        self.disconnected.clear()
        info = self.client.publish(topic, payload, qos=qos)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if not self.disconnected.wait(timeout):
            raise TimeoutError(f"connection not closed after publishing {topic}")
        self.client.disconnect()  # no reconnect that would send it again
        with self._lock:
            acked = self._published.get(info.mid)
        return acked is None or not acked.is_set()

    def _on_subscribe(self, _c: Any, _u: Any, mid: int, reason_codes: list[Any], _p: Any) -> None:
        with self._lock:
            q = self._subacks.setdefault(mid, queue.Queue())
        q.put(reason_codes)

    def _on_publish(self, _c: Any, _u: Any, mid: int, _rc: Any, _p: Any) -> None:
        with self._lock:
            ev = self._published.setdefault(mid, threading.Event())
        ev.set()

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> list[int]:
        """Subscribe and return the granted codes (0x80 = refused)."""
        rc, mid = self.client.subscribe(topic, qos)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self._lock:
            q = self._subacks.setdefault(mid, queue.Queue())
        try:
            codes = q.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no SUBACK for {topic}") from None
        return [c.value for c in codes]

    def publish(self, topic: str, payload: bytes | str, qos: int = 1, retain: bool = False,
                timeout: float = 5.0) -> None:
        """Publish and, for QoS 1, wait for the broker's PUBACK."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        assert info.rc == mqtt.MQTT_ERR_SUCCESS, info.rc
        if qos:
            with self._lock:
                ev = self._published.setdefault(info.mid, threading.Event())
            if not ev.wait(timeout):
                raise TimeoutError(f"no PUBACK for {topic}")

    def expect(self, topic: str | None = None, timeout: float = 5.0) -> Msg:
        """The next message (on `topic` if given; others are kept in `skipped` for later calls)."""
        for i, m in enumerate(self.skipped):
            if topic is None or m.topic == topic:
                del self.skipped[i]
                return m
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no message on {topic or 'any topic'} within {timeout} s")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if topic is None or m.topic == topic:
                return m
            self.skipped.append(m)

    def until(self, topic: str, timeout: float = 5.0) -> list[Msg]:
        """Every message received before the first one on `topic` (a marker), in order."""
        seen: list[Msg] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"marker {topic} not received; got {[m.topic for m in seen]}")
            try:
                m = self.messages.get(timeout=left)
            except queue.Empty:
                continue
            if m.topic == topic:
                return seen
            seen.append(m)


@contextlib.asynccontextmanager
async def running_bus(user: str, password: str, *, allow_anonymous: bool = True, max_connections: int = 100,
                      broker_class: type[GatewayBroker] = GatewayBroker, **limits: Any) -> AsyncIterator[LocalBus]:
    """The core's embedded broker (`LocalBus`) on 127.0.0.1 at a free port, dispatching, for the
    test's duration; `broker_class` reverts an amqtt patch (tests/unit/test_amqtt_patches.py)."""
    from sim.demo import free_port

    bus = LocalBus(BrokerSettings("127.0.0.1", free_port(), user, password, allow_anonymous, max_connections,
                                  **limits), broker_class=broker_class)
    await bus.start()
    dispatcher = asyncio.create_task(bus.dispatch_forever())
    try:
        yield bus
    finally:
        dispatcher.cancel()
        await asyncio.gather(dispatcher, return_exceptions=True)
        await bus.stop()


@contextlib.contextmanager
def counting_tasks() -> Iterator[list[str]]:
    """The coroutine names (`__qualname__`) of every task the running loop starts inside the block."""
    loop = asyncio.get_running_loop()
    started: list[str] = []
    factory = loop.get_task_factory()

    def counting(loop_: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        started.append(getattr(coro, "__qualname__", ""))
        return factory(loop_, coro, **kwargs) if factory else asyncio.Task(coro, loop=loop_, **kwargs)

    loop.set_task_factory(counting)
    try:
        yield started
    finally:
        loop.set_task_factory(factory)
