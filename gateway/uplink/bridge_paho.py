"""paho-mqtt plumbing of the cloud bridge: its logger, TLS context, connection record, clean-up.

Contract: helpers only, no state of the bridge. `PahoLog` turns paho's errors into one callback
(logged at DEBUG), `TlsContext` remembers the sockets it wrapped so a failed handshake's socket can
be closed, `Conn` is one connection attempt, `hand_callbacks_to_loop` wires paho's callbacks to the
event loop (a client ends with `gateway.mqtt.client.close_client`), `run_joined` runs a blocking
call whose thread a cancellation waits for, `describe` names a connect failure in one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import paho.mqtt.client as mqtt

from gateway.uplink.bridge_settings import BridgeSettings

_BRIDGE_LOGGER = "gateway.uplink.bridge"
T = TypeVar("T")


class PahoLog(logging.Logger):
    """paho's logger for one client: its errors (already reported by the bridge as one warning)
    go to `on_error` and are logged at DEBUG like the rest of paho's chatter."""

    def __init__(self, on_error: Callable[[str], None]) -> None:
        super().__init__(f"{_BRIDGE_LOGGER}.paho")
        self.parent = logging.getLogger(_BRIDGE_LOGGER)
        self._on_error = on_error

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if level >= logging.ERROR:
            try:
                text = str(msg) % args if args else str(msg)
            except (TypeError, ValueError):
                text = f"{msg} {args}"
            self._on_error(text)
            level = logging.DEBUG
        super().log(level, msg, *args, **kwargs)


class TlsContext(ssl.SSLContext):
    """Remembers the sockets it wrapped: paho leaves the socket of a failed TLS handshake open,
    and the bridge closes it (else a ResourceWarning at garbage collection)."""

    wrapped: list[ssl.SSLSocket]

    def wrap_socket(self, sock: socket.socket, server_side: bool = False, do_handshake_on_connect: bool = True,
                    suppress_ragged_eofs: bool = True, server_hostname: str | bytes | None = None,
                    session: ssl.SSLSession | None = None) -> ssl.SSLSocket:
        wrapped = super().wrap_socket(sock, server_side, do_handshake_on_connect, suppress_ragged_eofs,
                                      server_hostname, session)
        self.wrapped.append(wrapped)
        return wrapped


@dataclass
class Conn:
    """One connection attempt: its paho client and what the loop waits for."""

    client: mqtt.Client
    connack: asyncio.Future[tuple[Any, bool] | None]  # (reason code, session present); None: lost first
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    lost_reason: str = ""
    error: str = ""  # the first error paho logged on this connection
    accepted: bool = False


def describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate rejected: {exc.verify_message}"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if not isinstance(exc, ssl.SSLError) else f"TLS: {text}"


def hand_callbacks_to_loop(client: mqtt.Client, to_loop: Callable[..., None], *,
                           on_connack: Callable[[mqtt.Client, Any, bool], None],
                           on_lost: Callable[[mqtt.Client, str], None],
                           on_puback: Callable[[mqtt.Client, int], None],
                           on_suback: Callable[[mqtt.Client, list[Any]], None],
                           on_message: Callable[[str | None, bytes, bool], None]) -> None:
    """Set the client's paho callbacks (VERSION2): each hands what paho reports to `to_loop`,
    which calls the handler on the event loop; nothing runs in paho's network thread."""

    def p_on_connect(c: mqtt.Client, _u: Any, flags: Any, reason: Any, _p: Any) -> None:
        to_loop(on_connack, c, reason, bool(flags.session_present))

    def p_on_disconnect(c: mqtt.Client, _u: Any, _f: Any, reason: Any, _p: Any) -> None:
        # MQTT 3.1.1 has no reason codes: paho says "Unspecified error" (0x80) for a closed socket.
        to_loop(on_lost, c, "socket closed" if reason == 0x80 else str(reason))

    def p_on_publish(c: mqtt.Client, _u: Any, mid: int, _reason: Any, _p: Any) -> None:
        to_loop(on_puback, c, mid)

    def p_on_subscribe(c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
        to_loop(on_suback, c, list(reasons))

    def p_on_message(_c: mqtt.Client, _u: Any, msg: mqtt.MQTTMessage) -> None:
        try:
            topic: str | None = msg.topic
        except UnicodeDecodeError:
            topic = None
        to_loop(on_message, topic, bytes(msg.payload), bool(msg.retain))

    client.on_connect = p_on_connect
    client.on_disconnect = p_on_disconnect
    client.on_publish = p_on_publish
    client.on_subscribe = p_on_subscribe
    client.on_message = p_on_message


async def run_joined(executor: Executor, fn: Callable[..., T], *args: Any) -> T:
    """Run `fn` in `executor`. A cancellation waits for `fn` to end before it is re-raised (what
    `fn` returned or raised is then discarded): no thread outlives the bridge's `run()`."""
    fut = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        while not fut.done():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({fut})
        if not fut.cancelled():
            fut.exception()  # retrieved: no "exception was never retrieved" at collection
        raise


def open_connection(client: mqtt.Client, s: BridgeSettings) -> None:
    """Blocking (the bridge's worker thread): TLS context (reads the files), TCP connect,
    handshake, CONNECT sent."""
    ctx: TlsContext | None = None
    if s.tls:
        ctx = TlsContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the host name
        ctx.wrapped = []
        if s.ca_file:
            ctx.load_verify_locations(cafile=s.ca_file)
        else:
            ctx.load_default_certs()
        if s.cert_file:
            ctx.load_cert_chain(s.cert_file, s.key_file or None)
        client.tls_set_context(ctx)
    try:
        client.connect(s.host, s.port, keepalive=s.keepalive_sec)
    except BaseException:
        for sock in ctx.wrapped if ctx is not None else ():
            sock.close()
        raise
