"""The embedded amqtt broker of the site LAN, its auth and topic ACL, and the core's view of it.

Who may do what (docs/security.md explains why):
- The gateway's own services log in as `mqtt.internal_username` with the internal password from
  the secrets file: they may publish and subscribe anything.
- Programs of the site (a wash backend, dashboards) log in with an MQTT account
  (`gateway.access.mqtt_accounts`: argon2id hash, a role that is a fixed ACL). The core hands the accounts
  to `LocalBus.reload_accounts()` at start and whenever the table changed; connections of an
  account that was removed or changed are closed at once, and every ACL check looks the account up
  again, so a removed account loses its rights even before its connection is gone.
- Anyone else connects anonymously when `mqtt.allow_anonymous` is true (ESP32 devices do) and may
  publish only `server/{id}/ack` and `server/{id}/streaming`, and subscribe only to exact
  `device/{id}/command` and `device/{chargeId}/payment-status` topics (no wildcards). Any other
  username, or a wrong password, is refused at CONNECT.
- A PUBLISH the ACL refuses (account or anonymous) closes the client's connection before the
  broker acknowledges it: MQTT 3.1.1 has no negative PUBACK, and §3.3.5 allows either a positive
  acknowledgement or closing the connection. It is counted (`acl_publish`) and logged. Publishes
  over the rate limit are still acknowledged and dropped (a device's burst is not an error).

`LocalBus` is how core code talks to the broker without a TCP hop: `publish()` broadcasts (and
retains) in-process; `subscribe()` registers a handler for messages that clients published and
the ACL let through. Handlers run one at a time, in arrival order, on one task.

Limits against LAN abuse (`BrokerLimits`, enforced by one `AbuseGuard` shared by the broker and
its plugins; docs/security.md):
- a packet larger than `max_packet_bytes` (anonymous) or `internal_max_packet_bytes` (the
  gateway's own users) closes the connection before its body is read, and the address cools down;
- a connection that sends no CONNECT within `connect_timeout_sec` is closed;
- past `max_connections` a new connection is closed at once (amqtt would park it without CONNACK);
- an anonymous client publishing faster than `client_rate_per_sec` (bursts of `client_rate_burst`)
  has the excess dropped; at more than twice that rate it is disconnected and its address cools
  down: no connection from it for `flood_cooldown_sec` (never for the `ban_exempt` addresses, the
  gateway's own);
- anonymous client ids are at most 128 printable ASCII characters and may not start with the
  gateway's own prefix `carwash-`.
Every refusal is counted per reason (`LocalBus.refusals`) and logged once a minute per reason.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, BaseContext
from amqtt.errors import AMQTTError
from amqtt.plugins.base import BaseAuthPlugin, BasePlugin, BaseTopicPlugin
from amqtt.session import ApplicationMessage, Session

from gateway.access.mqtt_accounts import ROLES, Account, Role
from gateway.access.ratelimit import RateLimiter
from gateway.droplog import Drops
from gateway.mqtt.topics import is_valid_filter, matches

log = logging.getLogger(__name__)

ANON_PUBLISH = ("server/+/ack", "server/+/streaming")
# Exact topics only (no wildcards): a device listens to its own commands and to the payment status
# of a charge it created; a LAN client cannot sweep up every device's commands and payments.
ANON_SUBSCRIBE = ("device/+/command", "device/+/payment-status")

Handler = Callable[[str, bytes, str | None], Awaitable[None] | None]

# The gateway's own clients (web, tools) use ids "carwash-{name}-{random}"; an anonymous client
# taking one of them over would disconnect the web from the bus.
INTERNAL_CLIENT_PREFIX = "carwash-"
MAX_CLIENT_ID_LEN = 128


def client_id_problem(client_id: str | None) -> str | None:
    """Why an anonymous client may not use `client_id`, or None when it may."""
    if not client_id:
        return None  # the broker generates one
    if len(client_id) > MAX_CLIENT_ID_LEN:
        return f"client id longer than {MAX_CLIENT_ID_LEN} characters"
    if not client_id.isascii() or not client_id.isprintable():
        return "client id has non-printable or non-ASCII characters"
    if client_id.startswith(INTERNAL_CLIENT_PREFIX):
        return f"client id prefix {INTERNAL_CLIENT_PREFIX!r} is reserved for the gateway's own services"
    return None


class GatewayAuthPlugin(BaseAuthPlugin):
    """Internal user by password (constant-time), anonymous devices when allowed, nobody else."""

    @dataclass
    class Config:
        internal_username: str = ""
        internal_password: str = ""
        allow_anonymous: bool = False

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.guard = AbuseGuard(BrokerLimits())  # LocalBus replaces it with the one it shares
        self.accounts = AccountBook()  # likewise

    def _client_id_ok(self, session: Session) -> bool:
        problem = client_id_problem(session.client_id)
        if problem is not None:
            self.guard.refusals.drop("client_id", "connect", f"{problem}: {session.client_id[:40]!r}")
            return False
        return True

    async def authenticate(self, *, session: Session) -> bool | None:
        cfg = self.config
        if session.username is None:
            if not cfg.allow_anonymous:
                return False
            return self._client_id_ok(session)
        user_ok = hmac.compare_digest(session.username.encode(), cfg.internal_username.encode())
        pw_ok = hmac.compare_digest((session.password or "").encode(), cfg.internal_password.encode())
        if user_ok and pw_ok:
            return True
        if not user_ok and (account := self.accounts.get(session.username)) is not None:
            if await self.accounts.verify(account, session.password or "", session.remote_address) \
                    and self._client_id_ok(session):
                session.attributes[ACCOUNT] = (account.username, account.generation)
                log.info("mqtt: account %r (%s) connected as client %r", account.username, account.role,
                         session.client_id)
                return True
        self.guard.refusals.drop("login", "connect", f"refused login of user {session.username[:64]!r} "
                                 f"from client {session.client_id[:40]!r} at {session.remote_address}")
        return False


class GatewayTopicPlugin(BaseTopicPlugin):
    """The topic ACL. Internal users: everything. Others: the device topics only."""

    @dataclass
    class Config:
        internal_username: str = ""

    def __init__(self, context: BaseContext) -> None:
        super().__init__(context)
        self.guard = AbuseGuard(BrokerLimits())  # LocalBus replaces it with the one it shares
        self.accounts = AccountBook()  # likewise

    async def topic_filtering(
        self, *, session: Session | None = None, topic: str | None = None, action: Action | None = None
    ) -> bool | None:
        if session is None or topic is None:
            return False
        if session.username is not None and session.username == self.config.internal_username:
            return True  # authenticate() already checked the password
        if action == Action.RECEIVE:
            # The subscription was checked when it was made; an account must still exist as it was.
            return ACCOUNT not in session.attributes or self.accounts.role_of(session) is not None
        if action == Action.PUBLISH:
            allowed = may_publish(session, topic, self.accounts)
            if allowed and not await self.guard.may_publish(session, topic):
                return False
        elif action == Action.SUBSCRIBE:
            allowed = may_subscribe(session, topic, self.accounts)
        else:
            allowed = False
        if not allowed:
            self.guard.refusals.drop(f"acl_{getattr(action, 'name', str(action)).lower()}", topic[:128],
                                     f"denied {action} of {topic[:128]!r} to client {session.client_id!r}")
        return allowed


def may_publish(session: Session, topic: str, accounts: AccountBook) -> bool:
    """The publish ACL of a non-internal client (anonymous device or account)."""
    if ACCOUNT in session.attributes:
        role = accounts.role_of(session)
        return role is not None and role.may_publish(topic)
    return any(matches(f, topic) for f in ANON_PUBLISH)


def may_subscribe(session: Session, topic_filter: str, accounts: AccountBook) -> bool:
    """The subscribe ACL of a non-internal client: a role's filters cover it; anonymous clients
    only exact device topics."""
    if not is_valid_filter(topic_filter):
        return False
    if ACCOUNT in session.attributes:
        role = accounts.role_of(session)
        return role is not None and role.may_subscribe(topic_filter)
    return ("+" not in topic_filter and "#" not in topic_filter
            and any(matches(a, topic_filter) for a in ANON_SUBSCRIBE))


class AccountBook:
    """The MQTT accounts as the broker knows them (replaced whole by `LocalBus.reload_accounts`),
    and the failed logins per address: past `LOGIN_FAILURE_BURST` failures an address waits
    (`LOGIN_FAILURES_PER_MIN`) before its password is checked again, so a LAN client cannot keep
    the Pi busy with argon2 checks. A successful check is remembered per (account, generation,
    password digest): a backend that reconnects costs a hash lookup, not an argon2 check."""

    LOGIN_FAILURES_PER_MIN = 10
    LOGIN_FAILURE_BURST = 10

    def __init__(self) -> None:
        self._accounts: dict[str, Account] = {}
        self._failures = RateLimiter(self.LOGIN_FAILURES_PER_MIN / 60.0, self.LOGIN_FAILURE_BURST)
        self._verified: set[tuple[str, int, bytes]] = set()

    def __len__(self) -> int:
        return len(self._accounts)

    def get(self, username: str) -> Account | None:
        return self._accounts.get(username)

    def replace(self, accounts: dict[str, Account]) -> set[str]:
        """Take the new table; returns the names removed or changed (their connections must go)."""
        gone = {name for name, old in self._accounts.items()
                if (new := accounts.get(name)) is None or new.generation != old.generation}
        self._accounts = dict(accounts)
        if gone:
            self._verified = {v for v in self._verified if v[0] not in gone}
        return gone

    def role_of(self, session: Session) -> Role | None:
        """The role of an account session, None when its account was removed or changed since it
        logged in (a dict lookup: this runs for every publish and every delivery)."""
        name, generation = session.attributes[ACCOUNT]
        account = self._accounts.get(name)
        if account is None or account.generation != generation:
            return None
        return ROLES.get(account.role)

    async def verify(self, account: Account, password: str, address: str | None) -> bool:
        key = (account.username, account.generation, hashlib.sha256(password.encode()).digest())
        if key in self._verified:
            return True
        if self._failures.peek(address):
            return False
        ok = await asyncio.to_thread(account.verify, password)  # argon2: tens of ms, off the loop
        if ok:
            if len(self._verified) > 1000:
                self._verified.clear()
            self._verified.add(key)
        else:
            self._failures.check(address)
        return ok


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


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """amqtt builds `repr(self._subscriptions)` for a DEBUG line after every SUBSCRIBE (even with
    DEBUG off): with one filter per device, a connection storm was quadratic in sessions."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class GatewayBroker(Broker):
    """amqtt's Broker with four fixes (and the limits of the module doc).

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
    3. Messages a client published (and had acknowledged) just before it disconnected are delivered
       (`_client_message_loop`).
    4. A refused client's session is not kept (`_handle_client_session`).
    """

    def __init__(self, config: dict[str, Any], guard: AbuseGuard | None = None,
                 accounts: AccountBook | None = None) -> None:
        super().__init__(config)
        self.guard = guard or AbuseGuard(BrokerLimits())
        self.accounts = accounts if accounts is not None else AccountBook()
        self.guard.kick = self._kick
        self._subscriptions = _Subscriptions()
        self._wildcard_filters: set[str] = set()  # a superset: stale ones are dropped while routing
        self._session_filters: dict[str, set[str]] = {}  # client id -> the filters it holds

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        code: int = await super().add_subscription(subscription, session)
        if any(s.client_id == session.client_id for s, _ in self._subscriptions.get(subscription[0], ())):
            self._session_filters.setdefault(session.client_id, set()).add(subscription[0])
            if "+" in subscription[0] or "#" in subscription[0]:
                self._wildcard_filters.add(subscription[0])
        return code

    def _del_subscription(self, a_filter: str, session: Session) -> int:
        held = self._session_filters.get(session.client_id)
        if held is not None:
            held.discard(a_filter)
        code: int = super()._del_subscription(a_filter, session)
        return code

    async def _del_all_subscriptions(self, session: Session) -> None:
        """amqtt's version scans every filter of every session at each disconnect; this one only the
        session's own filters (same effect: its subscriptions gone, emptied filters removed)."""
        for topic_filter in list(self._session_filters.pop(session.client_id, ())):
            if super()._del_subscription(topic_filter, session) and not self._subscriptions.get(topic_filter):
                self._subscriptions.pop(topic_filter, None)

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        server = self._servers.get(listener_name)
        peer = writer.get_extra_info("peername")
        if server is not None and server.semaphore is not None and server.semaphore.locked():
            # amqtt would park the client, without CONNACK, until a slot frees: it could not tell
            # a full gateway from a dead one. Closed at once, it retries with its own backoff.
            self.guard.refusals.drop("max_connections", "connect",
                                     f"{server.max_connections} connections already; closed {peer}")
            writer.close()
            return
        if peer and self.guard.cooling_down(peer[0]):
            # Before a byte is read: a flooder's reconnects cost an accept() and a close().
            self.guard.refusals.drop("cooldown", "connect", f"{peer}: flooded a moment ago; closed")
            writer.close()
            return
        guarded = _GuardedReader(reader, self.guard.limits.max_packet_bytes, self.guard, peer)
        await self._client_connected(listener_name, guarded, StreamWriterAdapter(writer))

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        await super()._client_message_loop(client_session, handler)
        # amqtt 0.12.1 ends this loop at the client's DISCONNECT (or lost connection) and dropped
        # what it had queued but not yet broadcast: messages it had already PUBACKed (a device that
        # ACKs a RESTART and reboots lost its ACK). Deliver them now, in order, as the loop would.
        queue = client_session.delivered_message_queue
        while not queue.empty():
            message = asyncio.get_running_loop().create_future()
            message.set_result(queue.get_nowait())
            if not await self._handle_message_delivery(client_session, handler, message):
                break

    def _refuse_before_ack(self, session: Session, handler: Any) -> None:
        """Check a non-internal client's PUBLISH against the ACL before amqtt acknowledges it
        (amqtt PUBACKs on receipt and filters later): a refused one closes the connection instead
        (MQTT 3.1.1 §3.3.5), so the sender does not take it for accepted."""
        accept = handler.handle_publish

        async def handle_publish(packet: Any) -> None:
            topic = packet.topic_name
            if session.attributes.get(KICKED):
                return  # read after the cut: neither acknowledged nor delivered
            if topic and not may_publish(session, topic, self.accounts):
                session.attributes[KICKED] = True
                who = session.attributes.get(ACCOUNT, ("anonymous",))[0]
                self.guard.refusals.drop("acl_publish", topic[:128], f"client {session.client_id!r} ({who}) may not "
                                         f"publish {topic[:128]!r}: not acknowledged, connection closed")
                await self._kick(session)
                return
            await accept(packet)

        handler.handle_publish = handle_publish

    async def _kick(self, session: Session) -> None:
        """Close a client's connection (amqtt then cleans its session up as for any lost client)."""
        _, handler = self._sessions.get(session.client_id, (None, None))
        if handler is not None and handler.writer is not None:
            await handler.writer.close()

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> Any:
        """amqtt's, bounded: a connection that sends no complete CONNECT in time is closed (else a
        silent socket holds a connection slot forever)."""
        try:
            async with asyncio.timeout(self.guard.limits.connect_timeout_sec):
                return await super()._initialize_client_session(reader, writer, remote_address, remote_port)
        except TimeoutError as exc:
            self.guard.refusals.drop("connect_timeout", "connect", f"{remote_address}:{remote_port}: no CONNECT "
                                     f"within {self.guard.limits.connect_timeout_sec:g} s; connection closed")
            await writer.close()
            raise AMQTTError("connect timeout") from exc
        except PacketTooLarge as exc:  # counted by the reader
            await writer.close()
            raise AMQTTError(str(exc)) from exc

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session, *args: Any) -> None:
        # The internal users' RPCs carry request bodies (up to the web's body limit). Raised before
        # the password is checked, which is harmless: a refused login is closed right after CONNACK.
        if isinstance(reader, _GuardedReader) and client_session.username == self.guard.limits.internal_username:
            reader.max_bytes = self.guard.limits.internal_max_packet_bytes
        elif args:
            self._refuse_before_ack(client_session, args[0])
        try:
            await super()._handle_client_session(reader, writer, client_session, *args)
        finally:
            # amqtt 0.12.1 keeps a refused client's session in its table for good: refused logins
            # with ever new client ids would grow it without bound.
            if not client_session.attributes.get(AUTHENTICATED):
                held, _ = self._sessions.get(client_session.client_id, (None, None))
                if held is client_session:
                    del self._sessions[client_session.client_id]

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # A resumed (persistent) session keeps its attributes: each login decides them anew.
        session.attributes.pop(KICKED, None)
        session.attributes.pop(ACCOUNT, None)
        ok: bool = await super()._authenticate(session, listener)
        session.attributes[AUTHENTICATED] = ok
        return ok

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


class PacketTooLarge(Exception):
    """A client announced a packet above its limit. Not an MQTTError on purpose: amqtt's reader
    loop skips those and reads on (out of step with the stream); anything else closes the connection."""


class _GuardedReader(StreamReaderAdapter):
    """amqtt reads a packet's body with one `read(n)` once the fixed header announced it: refusing
    a large `n` refuses the packet before a byte of it is buffered."""

    def __init__(self, reader: asyncio.StreamReader, max_bytes: int, guard: AbuseGuard, peer: Any) -> None:
        super().__init__(reader)
        self.max_bytes = max_bytes
        self._guard = guard
        self._peer = peer

    async def read(self, n: int = -1) -> bytes:
        if n > self.max_bytes:
            self._guard.refusals.drop("packet_size", "connection",
                                      f"{self._peer}: a packet of more than {n} bytes, above the limit of "
                                      f"{self.max_bytes}; connection closed, the address cools down")
            # No device sends such packets: whoever does would otherwise reconnect and try again at once.
            self._guard.cool_down(self._peer[0] if self._peer else None)
            raise PacketTooLarge(f"packet above {self.max_bytes} bytes")
        data: bytes = await super().read(n)
        return data


@dataclass(frozen=True)
class BrokerLimits:
    internal_username: str = ""
    max_packet_bytes: int = 16 * 1024
    internal_max_packet_bytes: int = 1024 * 1024
    connect_timeout_sec: float = 10.0
    client_rate_per_sec: float = 20.0  # anonymous publishes per client id; 0: no limit
    client_rate_burst: int = 100
    flood_cooldown_sec: float = 60.0  # 0: flooders are never disconnected
    ban_exempt: tuple[str, ...] = ("127.0.0.1", "::1")


# Session.attributes is amqtt's place for plugin-owned state.
KICKED = "carwash.kicked"
AUTHENTICATED = "carwash.authenticated"
ACCOUNT = "carwash.account"  # (name, generation) of an MQTT account session


class AbuseGuard:
    """The broker's limits with their state: per-client publish buckets, strikes, addresses cooling
    down after a flood, and the refusal counts. `kick` is set by the broker."""

    MAX_ADDRESSES = 10_000

    def __init__(self, limits: BrokerLimits) -> None:
        self.limits = limits
        self.refusals = Drops(log)
        self.kick: Callable[[Session], Awaitable[None]] | None = None
        self._rate = RateLimiter(limits.client_rate_per_sec, limits.client_rate_burst)
        self._excess = RateLimiter(limits.client_rate_per_sec, limits.client_rate_burst)  # drops, per client
        self._cooling: OrderedDict[str, float] = OrderedDict()  # address -> monotonic time it may return

    async def may_publish(self, session: Session, topic: str) -> bool:
        """Take a token for an anonymous publish. Each dropped publish also takes a token from a
        second bucket of the same size: a client that goes on at more than twice its rate empties
        it, is disconnected, and its address cools down."""
        if session.attributes.get(KICKED):
            return False  # what it had sent before the cut is still being read
        cid = session.client_id
        if self._rate.check(cid) == 0:
            return True
        lim = self.limits
        self.refusals.drop("rate", topic, f"client {cid!r} publishes faster than {lim.client_rate_per_sec:g}/s "
                           f"(bursts of {lim.client_rate_burst})")
        if lim.flood_cooldown_sec <= 0 or self._excess.check(cid) == 0:
            return False
        session.attributes[KICKED] = True
        self.refusals.drop("flood", topic, f"client {cid!r} from {session.remote_address} disconnected; the address "
                           f"cools down for {lim.flood_cooldown_sec:g} s unless exempt")
        self.cool_down(session.remote_address)
        if self.kick is not None:
            await self.kick(session)
        return False

    def cool_down(self, address: str | None) -> None:
        """Refuse connections from `address` for `flood_cooldown_sec` (unless exempt or 0)."""
        lim = self.limits
        if not address or address in lim.ban_exempt or lim.flood_cooldown_sec <= 0:
            return
        self._cooling[address] = time.monotonic() + lim.flood_cooldown_sec
        self._cooling.move_to_end(address)
        while len(self._cooling) > self.MAX_ADDRESSES:
            self._cooling.popitem(last=False)

    def cooling_down(self, address: str) -> bool:
        until = self._cooling.get(address)
        if until is None:
            return False
        if time.monotonic() < until:
            return True
        del self._cooling[address]
        return False


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
        broker = GatewayBroker(broker_config(self._settings), self.guard, self.accounts)
        for name in ("GatewayAuthPlugin", "GatewayTopicPlugin"):
            plugin_ = broker.plugins_manager.get_plugin(name)
            assert isinstance(plugin_, (GatewayAuthPlugin, GatewayTopicPlugin))
            plugin_.guard = self.guard
            plugin_.accounts = self.accounts
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
