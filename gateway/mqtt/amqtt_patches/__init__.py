"""Every change the gateway makes to amqtt's own code, in one audited package.

amqtt is embedded, not forked: `GatewayBroker` (`broker.py` here) subclasses amqtt's `Broker` and overrides some of
its internals; each connection gets a `GatewayHandler` (`handler.py`: its reader, writer and
protocol handler). Each override is a *patch*, listed in `PATCHES` with the amqtt version it was
written against (`AUDITED_AMQTT`) and why it exists; `make_broker()` is the one function that puts
them in place (and checks the installed amqtt first). tests/unit/test_amqtt_patches/ has one test per
patch, each showing the behaviour the patch fixes both ways: with the patch, and with it reverted
(a subclass restoring amqtt's method), so a test that stops failing without its patch says that amqtt
fixed the issue upstream and the patch can go.

Upgrading amqtt: compare every overridden method below with the new release's version of it
(`git diff v0.12.1 vNEW -- amqtt/broker.py amqtt/adapters.py amqtt/mqtt/protocol/handler.py
amqtt/plugins/manager.py`), adapt, set `AUDITED_AMQTT`, run tests/unit/test_amqtt_patches/ (also
once per patch with CARWASH_REVERT_PATCH=name, see there) and tests/test_broker.py. Until then
the core logs a critical line at every start (`check_amqtt_version`) and
tests/unit/test_amqtt_patches/ fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import version

log = logging.getLogger("gateway.mqtt.broker")  # the name operators grep the journal for

AUDITED_AMQTT = "0.12.1"


@dataclass(frozen=True)
class Patch:
    """One change to amqtt: what it overrides (`Broker` methods, or the class installed), the amqtt
    version it was checked against, and why it exists."""

    name: str
    methods: tuple[str, ...]
    amqtt: str
    why: str


PATCHES: tuple[Patch, ...] = (
    Patch("retained_to_own_subscriptions", ("_publish_retained_messages_for_subscription",), "0.12.1",
          "amqtt sends a (re)connecting client the retained messages of every filter any client holds, and "
          "sends retained messages for subscriptions the ACL refused: both bypass the topic ACL."),
    Patch("quiet_subscriptions_repr", ("_subscriptions_table",), "0.12.1",
          "amqtt formats repr() of the whole subscription table for a DEBUG line after every SUBSCRIBE, even "
          "with DEBUG off: a connection storm of devices was quadratic in sessions."),
    Patch("indexed_routing", ("_routes", "_run_broadcast"), "0.12.1",
          "amqtt matches every message against every subscription filter (formatting a debug string per "
          "miss): a bulk command to 1,000 devices cost a million matches. Exact filters are a dict hit here."),
    Patch("own_filters_on_disconnect", ("_del_all_subscriptions",), "0.12.1",
          "amqtt scans every filter of every session at each disconnect; here only the session's own."),
    Patch("deliver_queued_on_disconnect", ("_client_message_loop",), "0.12.1",
          "amqtt PUBACKs a QoS 1 message when it queues it, and dropped what was still queued when the "
          "client disconnected: a device that ACKs a RESTART and reboots lost its ACK."),
    Patch("forget_refused_sessions", ("_handle_client_session", "_forget_if_refused"), "0.12.1",
          "amqtt keeps a refused client's session for good: refused logins with ever new client ids "
          "grew the session table without bound."),
    Patch("acl_before_puback", ("_handle_client_session", "_refuse_before_ack"), "0.12.1",
          "amqtt acknowledges a PUBLISH on receipt and checks the ACL later: a refused publish must close "
          "the connection instead (MQTT 3.1.1 §3.3.5), or the sender takes it for accepted."),
    Patch("packet_size_limit", ("stream_connected", "_reader", "_handle_client_session"), "0.12.1",
          "amqtt reads a packet of any announced size (up to 256 MiB) into memory."),
    Patch("refuse_past_max_connections", ("stream_connected", "_full"), "0.12.1",
          "past max_connections amqtt parks a new client without CONNACK until a slot frees: it cannot tell "
          "a full gateway from a dead one."),
    Patch("connect_timeout", ("_initialize_client_session",), "0.12.1",
          "amqtt waits for CONNECT forever: silent sockets hold connection slots."),
    Patch("direct_topic_filtering", ("_topic_filtering",), "0.12.1",
          "amqtt runs every ACL check (each PUBLISH, and each delivery to each subscriber) as one task per "
          "topic plugin gathered: two tasks per message for one plugin. Awaited in place here, same rule "
          "(every plugin must answer True)."),
    Patch("direct_local_hand_off", ("_handle_message_delivery",), "0.12.1",
          "amqtt hands a permitted publish to the plugins' `on_broker_message_broadcast` as a task per "
          "message; the core's LocalBus is called in place (`on_client_message`), in arrival order."),
    Patch("batched_broadcast", ("_run_broadcast",), "0.12.1",
          "amqtt's broadcast loop starts a task and waits on it (with the shutdown future) for each message: "
          "what is already queued (the core's bursts: a status per bay) is routed in one go here, at most "
          "BATCH per turn so a burst cannot hold the loop."),
    Patch("reader_without_tasks", ("_initialize_client_session", "_install_handler"), "0.12.1",
          "amqtt's reader starts a task per packet for the keep-alive timeout of its read (`wait_for`) and "
          "another to handle each PUBLISH and PUBACK; a QoS 0/1 PUBLISH or a PUBACK never waits on a later "
          "packet, so it is handled in place, in order, and the read is bounded by `asyncio.timeout` "
          "(`GatewayHandler`)."),
    Patch("whole_packet_reads", ("_next_packet",), "0.12.1",
          "amqtt reads a packet in ~11 `readexactly` calls (the type byte, each length byte, then the body "
          "field by field); here the fixed header and the body are a read each and a PUBLISH is decoded in one "
          "pass; a header already buffered needs no keep-alive timer."),
    Patch("coalesced_writes", ("_writer",), "0.12.1",
          "amqtt writes each packet to the socket at once: a `send` syscall per PUBACK and per PUBLISH out. "
          "What a connection's packets write during one turn of the event loop goes out in one `send` here."),
    Patch("drain_delivery_queue", ("_message_loop",), "0.12.1",
          "amqtt's per-client loop waits on four futures and starts a task for each message it delivers; "
          "here what the client has already queued is delivered in the same wake-up, in order."),
    Patch("direct_outgoing_publish", ("_send", "publish"), "0.12.1",
          "amqtt sends each delivery in a task of its own: a PublishPacket built and encoded piece by piece, a "
          "keep-alive timer re-armed, and for QoS 1 a `wait_for` with a timer per message. Here a QoS 0/1 "
          "PUBLISH is encoded straight to bytes and written in place when amqtt's path would not have waited; "
          "the QoS 1 flow (in flight until its PUBACK, dropped after 5 s) runs on one timer per connection."),
    Patch("puback_in_place", ("_handle_qos1_message_flow",), "0.12.1",
          "amqtt sends each PUBACK through its generic packet path (a packet object, a drain, a keep-alive "
          "timer re-armed per packet); here it is written in place, after the message is queued, as in amqtt."),
    Patch("login_decides_attributes", ("_authenticate",), "0.12.1",
          "a resumed persistent session keeps its attributes: a login must decide the account and the "
          "kicked mark anew."),
)


def check_amqtt_version() -> bool:
    """True when the installed amqtt is the audited one; loud (CRITICAL, at every start) when not."""
    installed = version("amqtt")
    if installed == AUDITED_AMQTT:
        return True
    log.critical("amqtt %s is installed but gateway/mqtt/amqtt_patches/ was audited against amqtt %s: "
                 "the broker's ACL, limits and retained-message fixes may not hold; review every patch "
                 "(module doc) before running this in production", installed, AUDITED_AMQTT)
    return False


# The code of the patches; imported last: it uses the names above.
from gateway.mqtt.amqtt_patches.broker import GatewayBroker, make_broker  # noqa: E402
from gateway.mqtt.amqtt_patches.handler import GatewayHandler, PacketTooLarge  # noqa: E402

__all__ = ["AUDITED_AMQTT", "PATCHES", "GatewayBroker", "GatewayHandler", "PacketTooLarge", "Patch",
           "check_amqtt_version", "make_broker"]
