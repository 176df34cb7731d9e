"""The broker's limits against LAN abuse and their state (docs/security.md).

`BrokerLimits` are the numbers; one `AbuseGuard`, shared by the broker and its plugins, holds the
per-client publish buckets, the addresses cooling down after a flood and the refusal counts
(`refusals`, per reason, each reason logged once a minute). The broker side of each limit (packet
size, CONNECT timeout, refusal past `max_connections`) is in `gateway.mqtt.amqtt_patches`.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from amqtt.session import Session

from gateway.access.ratelimit import RateLimiter
from gateway.droplog import Drops

log = logging.getLogger("gateway.mqtt.broker")  # the name operators grep the journal for


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

