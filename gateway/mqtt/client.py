"""A thread-safe paho client of the local broker for processes other than the core (the web).

Contract: `BusClient.start()` connects in the background (paho's own network thread, which
reconnects by itself) and returns at once; `call()` sends an RPC to the core and blocks until its
reply, a timeout (`RpcTimeout`) or a refusal (`RpcError`); `BusUnavailable` when not connected.
`on_message(filter, fn)` registers callbacks run on paho's thread: keep them short.
Retained `gateway/health` and `gateway/status` are kept and exposed as `health`/`core_status`.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, TimeoutError as FutureTimeout
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from gateway.mqtt.rpc import RpcError
from gateway.mqtt.topics import HEALTH, RPC_REPLY, RPC_REQUEST, STATUS, matches

log = logging.getLogger(__name__)


def close_client(client: mqtt.Client) -> None:
    """Blocking: DISCONNECT if still connected, join paho's thread, close what is left.

    Every paho client started with `loop_start()` ends here: paho closes the wake-up socket pair
    of `loop_start()` only when the client is collected (and a client in a reference cycle may
    have its sockets finalised first: a ResourceWarning, an fd held until the next collection)."""
    client.disconnect()
    client.loop_stop()
    sock = client.socket()
    if sock is not None:
        sock.close()
    # Closes the wake-up socket pair of loop_start() now rather than when the client is collected
    # (an exception logged by paho's thread can keep the client alive through its traceback), and
    # drops the callbacks and the logger (which refer back to the client).
    client.reinitialise()


class BusUnavailable(Exception):
    """Not connected to the local broker (the core is down or starting)."""


class RpcTimeout(Exception):
    """The core did not answer in time."""


class BusClient:
    def __init__(self, host: str, port: int, username: str, password: str, *, name: str = "web",
                 on_connected: Callable[[], None] | None = None,
                 on_disconnected: Callable[[], None] | None = None) -> None:
        self.client_id = f"carwash-{name}-{uuid.uuid4().hex[:12]}"
        self._host, self._port = host, port
        self._reply_topic = RPC_REPLY.format(client_id=self.client_id)
        self._pending: dict[str, Future[Any]] = {}
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._stopping = False
        self._callbacks: list[tuple[str, Callable[[str, bytes], None]]] = []
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected
        self.health: dict[str, Any] | None = None
        self.core_status: dict[str, Any] | None = None
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.client_id, clean_session=True)
        c.username_pw_set(username, password)
        c.reconnect_delay_set(min_delay=1, max_delay=10)
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        self._client = c

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def on_message(self, topic_filter: str, fn: Callable[[str, bytes], None]) -> None:
        """Register before start(); the filter is subscribed on every (re)connect."""
        self._callbacks.append((topic_filter, fn))

    def start(self) -> None:
        self._client.connect_async(self._host, self._port, keepalive=30)
        self._client.loop_start()

    def wait_connected(self, timeout: float) -> bool:
        return self._connected.wait(timeout)

    def stop(self) -> None:
        self._stopping = True  # our own disconnect is not a lost connection
        close_client(self._client)
        with self._lock:
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(BusUnavailable("bus client stopped"))

    def call(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 5.0) -> Any:
        if not self._connected.is_set():
            raise BusUnavailable("not connected to the local broker")
        req_id = uuid.uuid4().hex
        fut: Future[Any] = Future()
        with self._lock:
            self._pending[req_id] = fut
        payload = json.dumps({"id": req_id, "reply_to": self._reply_topic, "params": params or {}})
        try:
            info = self._client.publish(RPC_REQUEST.format(method=method), payload, qos=1)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise BusUnavailable(f"publish failed ({mqtt.error_string(info.rc)})")
            return fut.result(timeout=timeout)
        except FutureTimeout:
            raise RpcTimeout(f"core did not answer {method} within {timeout:g} s") from None
        finally:
            with self._lock:
                self._pending.pop(req_id, None)

    # --- paho callbacks (network thread) ---

    def _on_connect(self, client: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("local broker refused the connection: %s", reason)
            return
        sock = client.socket()
        if isinstance(sock, socket.socket):
            # paho leaves Nagle on: an RPC's small packets then wait for delayed ACKs (40 ms a call).
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        subs = [(self._reply_topic, 1), (HEALTH, 1), (STATUS, 1)] + [(f, 1) for f, _ in self._callbacks]
        client.subscribe(subs)
        self._connected.set()
        log.info("connected to the local broker as %s", self.client_id)
        if self._on_connected is not None:
            self._on_connected()

    def _on_disconnect(self, _c: mqtt.Client, _ud: Any, _flags: Any, reason: Any, _props: Any) -> None:
        was_connected = self._connected.is_set()
        self._connected.clear()
        if was_connected and not self._stopping:
            log.warning("lost the local broker connection: %s", reason)
            if self._on_disconnected is not None:
                self._on_disconnected()

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic == self._reply_topic:
            self._on_reply(bytes(msg.payload))
            return
        if topic in (HEALTH, STATUS):
            try:
                value = json.loads(msg.payload) if msg.payload else None
            except ValueError:
                log.warning("ignored a non-JSON message on %s", topic)
                return
            if topic == HEALTH:
                self.health = value
            else:
                self.core_status = value
        for topic_filter, fn in self._callbacks:
            if matches(topic_filter, topic):
                try:
                    fn(topic, bytes(msg.payload))
                except Exception:
                    log.exception("bus callback for %s failed", topic_filter)

    def _on_reply(self, payload: bytes) -> None:
        try:
            reply = json.loads(payload)
            req_id = reply["id"]
        except (ValueError, KeyError, TypeError):
            log.warning("ignored a malformed rpc reply")
            return
        with self._lock:
            fut = self._pending.pop(req_id, None)
        if fut is None or fut.done():
            return  # a reply after its caller timed out
        if reply.get("ok"):
            fut.set_result(reply.get("result"))
        else:
            err = reply.get("error") or {}
            fut.set_exception(RpcError(str(err.get("code", "INTERNAL_ERROR")), str(err.get("message", "")),
                                       int(err.get("status", 500))))
