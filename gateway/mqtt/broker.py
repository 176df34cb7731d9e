"""The embedded amqtt broker of the site LAN as the core sees it: `BrokerSettings`, the amqtt
config, and `LocalBus`.

The parts, one concern each (docs/security.md explains the rules):
- `gateway.mqtt.acl`: who may connect and what each client may publish and subscribe (auth and
  topic ACL plugins, `may_publish`, `AccountBook`);
- `gateway.mqtt.guard`: the limits against LAN abuse (`BrokerLimits`, `AbuseGuard`: packet size,
  CONNECT timeout, `max_connections`, per-client publish rate, address cool-downs), every refusal
  counted per reason (`LocalBus.refusals`) and logged once a minute per reason;
- `gateway.mqtt.amqtt_patches`: every change to amqtt's own code (`GatewayBroker`), audited
  against one amqtt version.

A PUBLISH the ACL refuses (account or anonymous) closes the client's connection before the broker
acknowledges it (MQTT 3.1.1 §3.3.5); publishes over the rate limit are acknowledged and dropped.

`LocalBus` is how core code talks to the broker without a TCP hop: `publish()` broadcasts (and
retains) in-process; `subscribe()` registers a handler for messages that clients published and
the ACL let through. Handlers run one at a time, in arrival order, on one task.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from amqtt.contexts import BaseContext
from amqtt.plugins.base import BasePlugin
from amqtt.session import Session

from gateway.access.mqtt_accounts import Account
from gateway.mqtt.acl import (
    ACCOUNT,
    ANON_PUBLISH,
    ANON_SUBSCRIBE,
    INTERNAL_CLIENT_PREFIX,
    MAX_CLIENT_ID_LEN,
    AccountBook,
    GatewayAuthPlugin,
    GatewayTopicPlugin,
    client_id_problem,
    may_publish,
    may_subscribe,
)
from gateway.mqtt.amqtt_patches import GatewayBroker, PacketTooLarge, make_broker
from gateway.mqtt.guard import AUTHENTICATED, KICKED, AbuseGuard, BrokerLimits
from gateway.mqtt.topics import is_valid_filter, matches

# Names other modules import from here (kept so the split of issue #19 changed no importer).
__all__ = [
    "ACCOUNT", "ANON_PUBLISH", "ANON_SUBSCRIBE", "AUTHENTICATED", "INTERNAL_CLIENT_PREFIX", "KICKED",
    "MAX_CLIENT_ID_LEN", "AbuseGuard", "AccountBook", "BrokerLimits", "BrokerSettings", "GatewayAuthPlugin",
    "GatewayBroker", "GatewayBusPlugin", "GatewayTopicPlugin", "Handler", "LocalBus", "PacketTooLarge",
    "broker_config", "client_id_problem", "may_publish", "may_subscribe",
]

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes, str | None], Awaitable[None] | None]
ROUTE_CACHE = 4096  # topics whose handlers LocalBus remembers (a site has at most ~1,000 devices)


class GatewayBusPlugin(BasePlugin[BaseContext]):
    """Tells the LocalBus of connections and subscriptions (set after the broker is built). Client
    publishes reach it in place (`GatewayBroker.on_client_message`), not through this plugin."""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.presence: Callable[[str, bool], Awaitable[None]] | None = None
        self.subscribed: Callable[[], Awaitable[None]] | None = None

    async def on_broker_client_connected(self, *, client_id: str, client_session: Session) -> None:
        if self.presence is not None:
            await self.presence(client_id, True)

    async def on_broker_client_disconnected(self, *, client_id: str, client_session: Session) -> None:
        if self.presence is not None:
            await self.presence(client_id, False)

    async def on_broker_client_subscribed(self, *, client_id: str, topic: str, qos: int) -> None:
        if self.subscribed is not None:
            await self.subscribed()



@dataclass(frozen=True)
class BrokerSettings:
    bind: str
    port: int
    internal_username: str
    internal_password: str
    allow_anonymous: bool
    max_connections: int
    max_packet_bytes: int = BrokerLimits.max_packet_bytes
    internal_max_packet_bytes: int = BrokerLimits.internal_max_packet_bytes
    connect_timeout_sec: float = BrokerLimits.connect_timeout_sec
    client_rate_per_sec: float = BrokerLimits.client_rate_per_sec
    client_rate_burst: int = BrokerLimits.client_rate_burst
    flood_cooldown_sec: float = BrokerLimits.flood_cooldown_sec
    ban_exempt: tuple[str, ...] = BrokerLimits.ban_exempt

    @property
    def limits(self) -> BrokerLimits:
        return BrokerLimits(self.internal_username, self.max_packet_bytes, self.internal_max_packet_bytes,
                            self.connect_timeout_sec, self.client_rate_per_sec, self.client_rate_burst,
                            self.flood_cooldown_sec, self.ban_exempt)


def broker_config(s: BrokerSettings) -> dict[str, Any]:
    """amqtt config: explicit bind, only our plugins (the default loggers cost a task a packet)."""
    host = f"[{s.bind}]" if ":" in s.bind else s.bind
    return {
        "listeners": {
            "default": {"type": "tcp", "bind": f"{host}:{s.port}", "max_connections": s.max_connections},
        },
        "timeout_disconnect_delay": 0,
        "plugins": {
            "gateway.mqtt.acl.GatewayAuthPlugin": {
                "internal_username": s.internal_username,
                "internal_password": s.internal_password,
                "allow_anonymous": s.allow_anonymous,
            },
            "gateway.mqtt.acl.GatewayTopicPlugin": {"internal_username": s.internal_username},
            f"{__name__}.GatewayBusPlugin": {},
        },
    }


class LocalBus:
    """The core's side of the embedded broker. Create inside the running loop, then `start()`."""

    def __init__(self, settings: BrokerSettings, *, broker_class: type[GatewayBroker] = GatewayBroker) -> None:
        self._settings = settings
        self._broker_class = broker_class  # tests revert one amqtt patch with a subclass
        self._broker: GatewayBroker | None = None
        self._handlers: list[tuple[str, Handler]] = []
        # topic -> its handlers: the filters are matched once per topic, not once per message
        # (bounded: device topics carry ids; cleared when full or on subscribe).
        self._routes: dict[str, list[tuple[str, Handler]]] = {}
        self._queue: asyncio.Queue[tuple[str, bytes, str | None]] = asyncio.Queue()
        self._presence_changed = asyncio.Condition()
        self.clients: set[str] = set()
        self.dropped_handler_errors = 0
        self.received: Counter[str] = Counter()  # client publishes per role_of_client (metrics)
        self.guard = AbuseGuard(settings.limits)
        self.refusals = self.guard.refusals  # what the broker refused to whom, per reason (module doc)
        self.accounts = AccountBook()
        self._publish_listeners: list[Callable[[str, bytes], None]] = []

    @property
    def started(self) -> bool:
        return self._broker is not None

    def username_of(self, client_id: str | None) -> str | None:
        """The user name a connected client logged in with (None: anonymous, or gone)."""
        if self._broker is None or client_id is None:
            return None
        session, _ = self._broker._sessions.get(client_id, (None, None))
        return None if session is None else session.username

    @property
    def broker(self) -> GatewayBroker:
        if self._broker is None:
            raise RuntimeError("bus not started")
        return self._broker

    async def start(self) -> None:
        """Bind the listener; raises if the address cannot be bound."""
        broker = make_broker(broker_config(self._settings), self.guard, self.accounts, broker_class=self._broker_class)
        for name in ("GatewayAuthPlugin", "GatewayTopicPlugin"):
            plugin_ = broker.plugins_manager.get_plugin(name)
            assert isinstance(plugin_, (GatewayAuthPlugin, GatewayTopicPlugin))
            plugin_.guard = self.guard
            plugin_.accounts = self.accounts
        plugin = broker.plugins_manager.get_plugin("GatewayBusPlugin")
        assert isinstance(plugin, GatewayBusPlugin)
        broker.on_client_message = self._enqueue
        plugin.presence = self._on_presence
        plugin.subscribed = self._on_subscribed
        await broker.start()
        self._broker = broker

    async def stop(self) -> None:
        if self._broker is not None:
            broker, self._broker = self._broker, None
            await broker.shutdown()

    async def reload_accounts(self, accounts: dict[str, Account]) -> int:
        """Take the MQTT accounts as stored now; close the connections of accounts removed or
        changed since (they lost their rights already: the ACL looks the account up every time).
        Returns how many connections were closed."""
        gone = self.accounts.replace(accounts)
        if not gone or self._broker is None:
            return 0
        cut = 0
        for session, _ in list(self._broker._sessions.values()):
            account = session.attributes.get(ACCOUNT)
            if account is not None and account[0] in gone and session.transitions.state == "connected":
                session.attributes[KICKED] = True
                log.warning("mqtt: account %r was removed or changed; closing its connection %r",
                            account[0], session.client_id)
                await self.broker._kick(session)
                cut += 1
        return cut

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
        self.received[self.role_of_client(client_id)] += 1
        self._queue.put_nowait((topic, data, client_id))

    def role_of_client(self, client_id: str | None) -> str:
        """A connection's role for metrics: "internal" (the gateway's own users), an account's role
        ("wash-backend", "monitor"), "device" (anonymous), "unknown" (gone)."""
        if client_id is None or self._broker is None:
            return "unknown"
        session, _ = self._broker._sessions.get(client_id, (None, None))
        if session is None:
            return "unknown"
        if session.username is None:
            return "device"
        if session.username == self._settings.internal_username:
            return "internal"
        account = self.accounts.get(session.username)
        return account.role if account is not None else "unknown"

    def subscribe(self, topic_filter: str, handler: Handler) -> None:
        """Receive client publishes matching `topic_filter` (handlers are called in order)."""
        if not is_valid_filter(topic_filter):
            raise ValueError(f"invalid topic filter {topic_filter!r}")
        self._handlers.append((topic_filter, handler))
        self._routes.clear()

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
            routes = self._routes.get(topic)
            if routes is None:
                if len(self._routes) >= ROUTE_CACHE:
                    self._routes.clear()
                routes = self._routes[topic] = [(f, h) for f, h in self._handlers if matches(f, topic)]
            for topic_filter, handler in routes:
                try:
                    result = handler(topic, data, client_id)
                    if result is not None:
                        await result
                except Exception:
                    self.dropped_handler_errors += 1
                    log.exception("handler for %s failed on a message on %s", topic_filter, topic)
