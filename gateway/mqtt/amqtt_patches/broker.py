"""The patched broker: `GatewayBroker` and its helpers, each method naming its patch of
`PATCHES` (gateway/mqtt/amqtt_patches/__init__.py: the audit list, the audited amqtt version)."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.events import BrokerEvents
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from gateway.mqtt.acl import ACCOUNT, AccountBook, may_publish
from gateway.mqtt.amqtt_patches import check_amqtt_version, log
from gateway.mqtt.amqtt_patches.handler import CorkedWriter, GatewayHandler, GuardedReader, PacketTooLarge
from gateway.mqtt.guard import AUTHENTICATED, KICKED, AbuseGuard, BrokerLimits


class _Subscriptions(dict[str, list[tuple[Session, int]]]):
    """Patch `quiet_subscriptions_repr`: amqtt 0.12.1 builds `repr(self._subscriptions)` for a DEBUG
    line after every SUBSCRIBE (even with DEBUG off): with one filter per device, a connection
    storm was quadratic in sessions."""

    def __repr__(self) -> str:
        return f"<{len(self)} subscription filters>"


class GatewayBroker(Broker):
    """amqtt 0.12.1's Broker with the patches of `PATCHES` (each method names its patch). Build it
    with `make_broker()`."""

    BATCH = 64  # queued broadcasts routed, or a client's messages delivered, per turn of the loop
    handler_class: type[GatewayHandler] = GatewayHandler  # each connection's (patch reader_without_tasks)

    def __init__(self, config: dict[str, Any], guard: AbuseGuard | None = None,
                 accounts: AccountBook | None = None) -> None:
        super().__init__(config)
        self.guard = guard or AbuseGuard(BrokerLimits())
        self.accounts = accounts if accounts is not None else AccountBook()
        self.guard.kick = self._kick
        self._subscriptions = self._subscriptions_table()
        self._wildcard_filters: set[str] = set()  # a superset: stale ones are dropped while routing
        self._session_filters: dict[str, set[str]] = {}  # client id -> the filters it holds
        # Every permitted client publish, in arrival order (LocalBus sets it; patch direct_local_hand_off).
        self.on_client_message: Callable[[str, bytes, str | None], None] | None = None

    def _subscriptions_table(self) -> dict[str, list[tuple[Session, int]]]:
        return _Subscriptions()

    # --- bookkeeping the patches rely on (not patches: they only add to amqtt's behaviour) --------

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

    async def _kick(self, session: Session) -> None:
        """Close a client's connection (amqtt then cleans its session up as for any lost client)."""
        _, handler = self._sessions.get(session.client_id, (None, None))
        if handler is not None and handler.writer is not None:
            await handler.writer.close()

    # --- patches ---------------------------------------------------------------------------------

    async def _del_all_subscriptions(self, session: Session) -> None:
        """Patch `own_filters_on_disconnect`: amqtt's version scans every filter of every session at
        each disconnect; this one only the session's own (same effect: its subscriptions gone,
        emptied filters removed)."""
        for topic_filter in list(self._session_filters.pop(session.client_id, ())):
            if super()._del_subscription(topic_filter, session) and not self._subscriptions.get(topic_filter):
                self._subscriptions.pop(topic_filter, None)

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        """Patches `refuse_past_max_connections` and `packet_size_limit` (and the address cool-down
        of the abuse guard, before a byte is read)."""
        peer = writer.get_extra_info("peername")
        if self._full(listener_name, peer):
            writer.close()
            return
        if peer and self.guard.cooling_down(peer[0]):
            # Before a byte is read: a flooder's reconnects cost an accept() and a close().
            self.guard.refusals.drop("cooldown", "connect", f"{peer}: flooded a moment ago; closed")
            writer.close()
            return
        await self._client_connected(listener_name, self._reader(reader, peer), self._writer(writer))

    def _full(self, listener_name: str, peer: Any) -> bool:
        """Patch `refuse_past_max_connections`: amqtt would park the client, without CONNACK, until
        a slot frees: it could not tell a full gateway from a dead one. Closed at once, it retries
        with its own backoff."""
        server = self._servers.get(listener_name)
        if server is None or server.semaphore is None or not server.semaphore.locked():
            return False
        self.guard.refusals.drop("max_connections", "connect", f"{server.max_connections} connections already; "
                                 f"closed {peer}")
        return True

    def _reader(self, reader: asyncio.StreamReader, peer: Any) -> StreamReaderAdapter:
        """Patch `packet_size_limit`: the connection's reader refuses packets above the limit."""
        return GuardedReader(reader, self.guard.limits.max_packet_bytes, self.guard, peer)

    def _writer(self, writer: asyncio.StreamWriter) -> StreamWriterAdapter:
        """Patch `coalesced_writes`: the connection's writer sends what one turn of the loop wrote
        in one go (`CorkedWriter`)."""
        return CorkedWriter(writer)

    async def _client_message_loop(self, client_session: Session, handler: Any) -> None:
        """Patch `deliver_queued_on_disconnect`: amqtt 0.12.1 ends this loop at the client's
        DISCONNECT (or lost connection) and dropped what it had queued but not yet broadcast:
        messages it had already PUBACKed. Deliver them now, in order, as the loop would."""
        await self._message_loop(client_session, handler)
        queue = client_session.delivered_message_queue
        while not queue.empty():
            if not await self._deliver(client_session, queue.get_nowait()):
                break

    async def _message_loop(self, client_session: Session, handler: Any) -> None:
        """Patch `drain_delivery_queue`: amqtt 0.12.1's `_client_message_loop` (same four waiters,
        handled in the same order) waits on the four with `asyncio.wait` and starts a task to take
        the next message, for each message. Here, once a delivery is handled, what the session has
        already queued is delivered in the same wake-up (at most BATCH), in order, as long as no
        other waiter (disconnect, subscribe, unsubscribe) is done: those still come first, as in amqtt."""
        queue = client_session.delivered_message_queue
        disconnect_waiter = asyncio.ensure_future(handler.wait_disconnect())
        subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
        unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
        wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
        connected = True
        while connected:
            try:
                done, _ = await asyncio.wait([disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver],
                                             return_when=asyncio.FIRST_COMPLETED)
                if disconnect_waiter in done:
                    await self._handle_disconnect(client_session, handler, disconnect_waiter)
                    connected = False
                if subscribe_waiter in done:
                    await self._handle_subscription(client_session, handler, subscribe_waiter)
                    subscribe_waiter = asyncio.ensure_future(handler.get_next_pending_subscription())
                if unsubscribe_waiter in done:
                    await self._handle_unsubscription(client_session, handler, unsubscribe_waiter)
                    unsubscribe_waiter = asyncio.ensure_future(handler.get_next_pending_unsubscription())
                if wait_deliver in done:
                    if not await self._handle_message_delivery(client_session, handler, wait_deliver):
                        break
                    for _ in range(self.BATCH):  # a bounded turn: other connections get theirs
                        if (not connected or queue.empty() or handler.session is None or disconnect_waiter.done()
                                or subscribe_waiter.done() or unsubscribe_waiter.done()):
                            break
                        if not await self._deliver(client_session, queue.get_nowait()):
                            connected = False  # amqtt: the loop ends (an invalid topic)
                    if not connected and not disconnect_waiter.done():
                        break
                    wait_deliver = asyncio.ensure_future(handler.mqtt_deliver_next_message())
            except asyncio.CancelledError:
                break
        waiters = [disconnect_waiter, subscribe_waiter, unsubscribe_waiter, wait_deliver]
        for waiter in waiters:
            waiter.cancel()
        await asyncio.gather(*waiters, return_exceptions=True)

    async def _handle_message_delivery(self, client_session: Session, handler: Any,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        """amqtt's entry point, kept for amqtt's own callers."""
        return await self._deliver(client_session, wait_deliver.result())

    async def _deliver(self, client_session: Session, app_message: Any) -> bool:
        """amqtt 0.12.1's `_handle_message_delivery` (same checks, same order) with patch
        `direct_local_hand_off`: the LocalBus gets a permitted publish in place, not via a task of
        the plugin event. False: the connection must close (an invalid topic)."""
        cid = client_session.client_id
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED, client_id=cid, message=app_message)
        if app_message is None:
            return True
        topic = app_message.topic
        if not topic:
            log.info("mqtt: [MQTT-4.7.3-1] client %r published an empty topic; connection closed", cid)
            return False
        if "#" in topic or "+" in topic:
            log.info("mqtt: [MQTT-3.3.2-2] client %r published to a wildcard topic; connection closed", cid)
            return False
        if topic.startswith("$"):
            log.info("mqtt: [MQTT-4.7.2-1] client %r published to a $ topic; connection closed", cid)
            return False
        if not await self._topic_filtering(client_session, topic=topic, action=Action.PUBLISH):
            return True
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_BROADCAST, client_id=cid, message=app_message)
        if self.on_client_message is not None:
            self.on_client_message(topic, bytes(app_message.data or b""), cid)
        await self._broadcast_message(client_session, topic, app_message.data)
        if app_message.publish_packet and app_message.publish_packet.retain_flag:
            await self.retain_message(client_session, topic, app_message.data, app_message.qos)
        return True

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        """Patch `direct_topic_filtering`: amqtt 0.12.1's rule (every topic plugin must answer
        truthy; no plugin: allowed), each plugin awaited in place instead of a task each, gathered."""
        for plugin in self.plugins_manager._topic_plugins:
            if not await plugin.topic_filtering(session=session, topic=topic, action=action):
                return False
        return True

    def _refuse_before_ack(self, session: Session, handler: Any) -> None:
        """Patch `acl_before_puback`: check a non-internal client's PUBLISH against the ACL before
        amqtt acknowledges it (amqtt 0.12.1 PUBACKs on receipt and filters later): a refused one
        closes the connection instead (MQTT 3.1.1 §3.3.5), so the sender does not take it for accepted."""
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

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> Any:
        """Patch `connect_timeout`: amqtt's, bounded: a connection that sends no complete CONNECT
        in time is closed (else a silent socket holds a connection slot forever). Also installs
        patch `reader_without_tasks`."""
        try:
            async with asyncio.timeout(self.guard.limits.connect_timeout_sec):
                handler, session = await super()._initialize_client_session(reader, writer, remote_address,
                                                                             remote_port)
            self._install_handler(handler)
            return handler, session
        except TimeoutError as exc:
            self.guard.refusals.drop("connect_timeout", "connect", f"{remote_address}:{remote_port}: no CONNECT "
                                     f"within {self.guard.limits.connect_timeout_sec:g} s; connection closed")
            await writer.close()
            raise AMQTTError("connect timeout") from exc
        except PacketTooLarge as exc:  # counted by the reader
            await writer.close()
            raise AMQTTError(str(exc)) from exc

    def _install_handler(self, handler: Any) -> None:
        """Patch `reader_without_tasks`: the connection's handler (built by amqtt's classmethod,
        before its reader starts) becomes a `handler_class`, same state, its patched methods differing."""
        if type(handler) is BrokerProtocolHandler:
            handler.__class__ = self.handler_class

    async def _handle_client_session(self, reader: Any, writer: Any, client_session: Session, *args: Any) -> None:
        """Patches `packet_size_limit` (the internal users' larger limit), `acl_before_puback`
        (installed on the session's handler) and `forget_refused_sessions`."""
        # The internal users' RPCs carry request bodies (up to the web's body limit). Raised before
        # the password is checked, which is harmless: a refused login is closed right after CONNACK.
        if isinstance(reader, GuardedReader) and client_session.username == self.guard.limits.internal_username:
            reader.max_bytes = self.guard.limits.internal_max_packet_bytes
        elif args:
            self._refuse_before_ack(client_session, args[0])
        try:
            await super()._handle_client_session(reader, writer, client_session, *args)
        finally:
            self._forget_if_refused(client_session)

    def _forget_if_refused(self, client_session: Session) -> None:
        """Patch `forget_refused_sessions`: amqtt 0.12.1 keeps a refused client's session in its
        table for good: refused logins with ever new client ids would grow it without bound."""
        if not client_session.attributes.get(AUTHENTICATED):
            held, _ = self._sessions.get(client_session.client_id, (None, None))
            if held is client_session:
                del self._sessions[client_session.client_id]

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        """Patch `login_decides_attributes`: a resumed (persistent) session keeps its attributes in
        amqtt 0.12.1; each login decides them anew."""
        session.attributes.pop(KICKED, None)
        session.attributes.pop(ACCOUNT, None)
        ok: bool = await super()._authenticate(session, listener)
        session.attributes[AUTHENTICATED] = ok
        return ok

    def _routes(self, topic: str) -> list[tuple[Session, int]]:
        """Patch `indexed_routing`: the subscriptions `topic` goes to: a dict lookup for the exact
        filters plus a scan of the wildcard filters only."""
        out = list(self._subscriptions.get(topic, ()))
        for f in list(self._wildcard_filters):
            subs = self._subscriptions.get(f)
            if subs is None:
                self._wildcard_filters.discard(f)
            elif self._matches(topic, f):
                out.extend(subs)
        return out

    async def _run_broadcast(self, running_tasks: deque[asyncio.Task[Any]]) -> None:
        """Patches `indexed_routing` and `batched_broadcast`: amqtt 0.12.1's `_run_broadcast` (same
        rules, same order of checks) with indexed routing, and up to BATCH queued broadcasts taken
        per call (amqtt's loop starts a task and waits on it for each)."""
        queue = self._broadcast_queue
        broadcast = await queue.get()
        for _ in range(self.BATCH):
            await self._route(broadcast, running_tasks)
            if queue.empty():
                return
            broadcast = queue.get_nowait()
        await self._route(broadcast, running_tasks)

    async def _route(self, broadcast: dict[str, Any], running_tasks: deque[asyncio.Task[Any]]) -> None:
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
                task = self._send(handler, topic, broadcast["data"], qos)
                if task is not None:
                    running_tasks.append(task)

    def _send(self, handler: Any, topic: str, data: bytes, qos: int) -> asyncio.Task[Any] | None:
        """Patch `direct_outgoing_publish`: a delivery is written in place when it can be
        (`GatewayHandler.publish`); amqtt 0.12.1 starts a task running `mqtt_publish` for each."""
        if isinstance(handler, GatewayHandler):
            return handler.publish(topic, data, qos)
        task: asyncio.Task[Any] = asyncio.ensure_future(handler.mqtt_publish(topic, data, qos, retain=False))
        return task

    async def _publish_retained_messages_for_subscription(
        self, subscription: tuple[str, int], session: Session
    ) -> None:
        """Patch `retained_to_own_subscriptions`: amqtt 0.12.1 publishes, to every client that
        connects, the retained messages of every filter *any* client subscribed to, and sends
        retained messages for subscriptions the ACL refused. Only filters the session holds here,
        at the QoS granted."""
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


def make_broker(config: dict[str, Any], guard: AbuseGuard, accounts: AccountBook, *,
                broker_class: type[GatewayBroker] = GatewayBroker) -> GatewayBroker:
    """The one place the patches are applied: check the installed amqtt against the audited
    version (loud when it differs), then build the patched broker. Tests pass a `broker_class`
    with one patch reverted to show what it fixes."""
    check_amqtt_version()
    return broker_class(config, guard, accounts)
