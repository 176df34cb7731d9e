"""The embedded amqtt broker of the site LAN, its auth and topic ACL, and the core's view of it.

Who may do what (docs/security.md explains why):
- The gateway's own services log in as `mqtt.internal_username` with the internal password from
  the secrets file: they may publish and subscribe anything.
- Anyone else connects anonymously when `mqtt.allow_anonymous` is true (ESP32 devices do) and may
  publish only `server/{id}/ack` and `server/{id}/streaming`, and subscribe only to exact
  `device/{id}/command` and `device/{chargeId}/payment-status` topics (no wildcards). Any other
  username, or a wrong password, is refused at CONNECT.

`LocalBus` is how core code talks to the broker without a TCP hop: `publish()` broadcasts (and
retains) in-process; `subscribe()` registers a handler for messages that clients published and
the ACL let through. Handlers run one at a time, in arrival order, on one task.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

from gateway.bus.topics import is_valid_filter, matches

log = logging.getLogger(__name__)

ANON_PUBLISH = ("server/+/ack", "server/+/streaming")
# Exact topics only (no wildcards): a device listens to its own commands and to the payment status
# of a charge it created; a LAN client cannot sweep up every device's commands and payments.
ANON_SUBSCRIBE = ("device/+/command", "device/+/payment-status")

Handler = Callable[[str, bytes, str | None], Awaitable[None] | None]


class GatewayAuthPlugin(BaseAuthPlugin):
    """Internal user by password (constant-time), anonymous devices when allowed, nobody else."""

    @dataclass
    class Config:
        internal_username: str = ""
        internal_password: str = ""
        allow_anonymous: bool = False

    async def authenticate(self, *, session: Session) -> bool | None:
        cfg = self.config
        if session.username is None:
            return bool(cfg.allow_anonymous)
        user_ok = hmac.compare_digest(session.username.encode(), cfg.internal_username.encode())
        pw_ok = hmac.compare_digest((session.password or "").encode(), cfg.internal_password.encode())
        if user_ok and pw_ok:
            return True
        log.warning("mqtt: refused login of user %r from client %r", session.username, session.client_id)
        return False


class GatewayTopicPlugin(BaseTopicPlugin):
    """The topic ACL. Internal users: everything. Others: the device topics only."""

    @dataclass
    class Config:
        internal_username: str = ""

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        if session.username is not None and session.username == self.config.internal_username:
            return True  # authenticate() already checked the password
        if action == Action.RECEIVE:
            return True  # the subscription was checked when it was made
        if action == Action.PUBLISH:
            allowed = any(matches(f, topic) for f in ANON_PUBLISH)
        elif action == Action.SUBSCRIBE:
            allowed = (is_valid_filter(topic) and "+" not in topic and "#" not in topic
                       and any(matches(a, topic) for a in ANON_SUBSCRIBE))
        else:
            allowed = False
        if not allowed:
            self.context.logger.info("mqtt acl: denied %s of %r to client %r", action, topic, session.client_id)
        return allowed


class GatewayBusPlugin(BasePlugin[BaseContext]):
    """Hands every permitted client publish to the LocalBus (set after the broker is built)."""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.sink: Callable[[str, bytes, str | None], None] | None = None
        self.presence: Callable[[str, bool], Awaitable[None]] | None = None
        self.subscribed: Callable[[], Awaitable[None]] | None = None

    async def on_broker_message_broadcast(self, *, client_id: str, message: ApplicationMessage) -> None:
        # Runs as its own task per message; put without awaiting so arrival order is kept.
        if self.sink is not None and message is not None and message.topic:
            self.sink(message.topic, bytes(message.data or b""), client_id)

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        if self.presence is not None:
            await self.presence(client_id, True)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        if self.presence is not None:
            await self.presence(client_id, False)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        if self.subscribed is not None:
            await self.subscribed()


class _Subscriptions(dict):  # type: ignore[type-arg]
    """amqtt builds `repr(self._subscriptions)` for a DEBUG line after every SUBSCRIBE (even with
    DEBUG off): with one filter per device, a connection storm was quadratic in sessions."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class GatewayBroker(Broker):
    """amqtt's Broker with two fixes.

    1. Retained messages go only to subscriptions a session holds: amqtt 0.12.1 publishes, to every
       client that connects, the retained messages of every filter *any* client subscribed to, and
       sends retained messages for subscriptions the ACL refused (tests/test_broker.py shows both).
       Both bypass the topic ACL, so the gateway filters here.
    2. Work per message, connection and disconnection does not grow with the number of sessions
       (`_Subscriptions`, `_session_filters`). Routing a message costs a dict lookup plus a scan of
       the wildcard filters only: amqtt matches
       every message against every subscription filter (and formats a debug string for each miss),
       so with one `device/{id}/command` filter per device a bulk command to 1,000 devices cost
       a million matches (bench/commands.py measured seconds of delay).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._subscriptions = _Subscriptions()
        self._wildcard_filters: set[str] = set()  # a superset: stale ones are dropped while routing
        self._session_filters: dict[str, set[str]] = {}  # client id -> the filters it holds

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code = await super().add_subscription(subscription, session)
        if any(s.client_id == session.client_id for s, _ in self._subscriptions.get(subscription[0], ())):
            self._session_filters.setdefault(session.client_id, set()).add(subscription[0])
            if "+" in subscription[0] or "#" in subscription[0]:
                self._wildcard_filters.add(subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        held = self._session_filters.get(session.client_id)
        if held is not None:
            held.discard(a_filter)
        return super()._del_subscription(a_filter, session)  # type: ignore[no-any-return]

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's version scans every filter of every session at each disconnect; this one only the
        session's own filters (same effect: its subscriptions gone, emptied filters removed)."""
        for topic_filter in list(self._session_filters.pop(session.client_id, ())):
            if super()._del_subscription(topic_filter, session) and not self._subscriptions.get(topic_filter):
                self._subscriptions.pop(topic_filter, None)

    def _routes(self, topic: str) -> list[tuple[Session, int]]:
        out = list(self._subscriptions.get(topic, ()))
        for f in list(self._wildcard_filters):
            subs = self._subscriptions.get(f)
            if subs is None:
                self._wildcard_filters.discard(f)
            elif self._matches(topic, f):
                out.extend(subs)
        return out

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """amqtt 0.12.1's `_run_broadcast` (same rules, same order of checks) with indexed routing."""
        broadcast = await self._broadcast_queue.get()
        topic = broadcast["topic"]
        for target_session, sub_qos in self._routes(topic):
            qos = broadcast.get("qos", sub_qos)
            if not await self._topic_filtering(target_session, topic=topic, action=Action.RECEIVE):
                continue
            # Kept for an offline persistent session (MQTT 3.1.2.4), as amqtt does.
            if (target_session.transitions.state != "connected" and not target_session.clean_session
                    and qos in (1, 2) and not target_session.is_anonymous):
                await self._retain_broadcast_message(broadcast, qos, target_session)
                continue
            if target_session.transitions.state != "connected":
                continue
            handler = self._get_handler(target_session)
            if handler:
                running_tasks.append(asyncio.ensure_future(
                    handler.mqtt_publish(topic, broadcast["data"], qos, retain=False)))

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        topic_filter = subscription[0]
        # amqtt calls this for every filter of the broker when a session resumes: a set lookup first.
        if topic_filter not in self._session_filters.get(session.client_id, ()):
            return
        granted = next(
            (qos for s, qos in self._subscriptions.get(topic_filter, ()) if s.client_id == session.client_id), None
        )
        if granted is None:
            return
        await super()._publish_retained_messages_for_subscription((topic_filter, granted), session)


@dataclass(frozen=True)
class BrokerSettings:
    bind: str
    port: int
    internal_username: str
    internal_password: str
    allow_anonymous: bool
    max_connections: int


def broker_config(s: BrokerSettings) -> dict[str, Any]:
    """amqtt config: explicit bind, only our plugins (the default loggers cost a task a packet)."""
    host = f"[{s.bind}]" if ":" in s.bind else s.bind
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{s.port}", "max_connections": s.max_connections},
        },
        "timeout_disconnect_delay": 0,
        "plugins": {
            f"{__name__}.GatewayAuthPlugin": {
                "internal_username": s.internal_username,
                "internal_password": s.internal_password,
                "allow_anonymous": s.allow_anonymous,
            },
            f"{__name__}.GatewayTopicPlugin": {"internal_username": s.internal_username},
            f"{__name__}.GatewayBusPlugin": {},
        },
    }


class LocalBus:
    """The core's side of the embedded broker. Create inside the running loop, then `start()`."""

    def __init__(self, settings: BrokerSettings) -> None:
        self._settings = settings
        self._broker: GatewayBroker | None = None
        self._handlers: list[tuple[str, Handler]] = []
        self._queue: asyncio.Queue[tuple[str, bytes, str | None]] = asyncio.Queue()
        self._presence_changed = asyncio.Condition()
        self.clients: set[str] = set()
        self.dropped_handler_errors = 0
        self._publish_listeners: list[Callable[[str, bytes], None]] = []

    @property
    def started(self) -> bool:
        return self._broker is not None

    @property
    def broker(self) -> GatewayBroker:
        if self._broker is None:
            raise RuntimeError("bus not started")
        return self._broker

    async def start(self) -> None:
        """Bind the listener; raises if the address cannot be bound."""
        broker = GatewayBroker(broker_config(self._settings))
        plugin = broker.plugins_manager.get_plugin("GatewayBusPlugin")
        assert isinstance(plugin, GatewayBusPlugin)
        plugin.sink = self._enqueue
        plugin.presence = self._on_presence
        plugin.subscribed = self._on_subscribed
        await broker.start()
        self._broker = broker

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    async def _on_presence(self, client_id: str, connected: bool) -> None:
        async with self._presence_changed:
            (self.clients.add if connected else self.clients.discard)(client_id)
            self._presence_changed.notify_all()

    async def _on_subscribed(self) -> None:
        async with self._presence_changed:
            self._presence_changed.notify_all()

    def has_subscriber(self, topic: str) -> bool:
        """True when some client holds a subscription matching `topic` (exact filters are a dict hit)."""
        subs = self.broker._subscriptions
        if subs.get(topic):
            return True
        return any(s and ("+" in f or "#" in f) and matches(f, topic) for f, s in subs.items())

    async def wait_subscribers(self, topics: Collection[str], timeout: float) -> None:
        """Wait until every topic in `topics` has a subscriber. TimeoutError."""
        remaining = list(topics)

        def ready() -> bool:
            while remaining and self.has_subscriber(remaining[-1]):
                remaining.pop()
            return not remaining

        async with asyncio.timeout(timeout):
            async with self._presence_changed:
                await self._presence_changed.wait_for(ready)

    async def wait_clients(self, predicate: Callable[[set[str]], bool], timeout: float) -> None:
        """Wait until `predicate(self.clients)` holds (connected client ids). TimeoutError."""
        async with asyncio.timeout(timeout):
            async with self._presence_changed:
                await self._presence_changed.wait_for(lambda: predicate(self.clients))

    def _enqueue(self, topic: str, data: bytes, client_id: str | None) -> None:
        self._queue.put_nowait((topic, data, client_id))

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Receive client publishes matching `topic_filter` (handlers are called in order)."""
        if not is_valid_filter(topic_filter):
            raise ValueError(f"invalid topic filter {topic_filter!r}")
        self._handlers.append((topic_filter, handler))

    def on_publish(self, fn: Callable[[str, bytes], None]) -> None:
        """Also hand every message the core publishes to `fn(topic, payload)` (the cloud bridge
        forwards some). `fn` must not block; its errors are logged, never raised."""
        self._publish_listeners.append(fn)

    async def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Deliver to subscribers; with `retain`, also replace the retained message (b"" clears)."""
        for fn in self._publish_listeners:
            try:
                fn(topic, payload)
            except Exception:
                log.exception("publish listener failed on %s", topic)
        broker = self.broker
        if retain:
            await broker.retain_message(None, topic, payload, qos)
        if payload or not retain:
            await broker.internal_message_broadcast(topic, payload, qos)

    def retained(self, topic: str) -> bytes | None:
        msg = self.broker.retained_messages.get(topic)
        return bytes(msg.data) if msg is not None else None

    async def dispatch_forever(self) -> None:
        """Run the handlers for each received message; one failing handler never stops the bus."""
        while True:
            topic, data, client_id = await self._queue.get()
            for topic_filter, handler in self._handlers:
                if not matches(topic_filter, topic):
                    continue
                try:
                    result = handler(topic, data, client_id)
                    if result is not None:
                        await result
                except Exception:
                    self.dropped_handler_errors += 1
                    log.exception("handler for %s failed on a message on %s", topic_filter, topic)
