"""Who may do what on the embedded broker: the auth and topic ACL plugins (amqtt's plugin API),
the publish and subscribe rules, and the MQTT accounts as the broker knows them.

- The gateway's own services log in as `mqtt.internal_username` with the internal password from
  the secrets file: they may publish and subscribe anything.
- Programs of the site log in with an MQTT account (`gateway.access.mqtt_accounts`: argon2id hash,
  a role that is a fixed ACL); every ACL check looks the account up again (`AccountBook`), so a
  removed or changed account loses its rights at once.
- Anyone else connects anonymously when `mqtt.allow_anonymous` is true and may publish only
  `server/{id}/ack` and `server/{id}/streaming`, and subscribe only to exact `device/{id}/command`
  and `device/{chargeId}/payment-status` topics. Any other username, or a wrong password, is
  refused at CONNECT.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass

from amqtt.contexts import Action, BaseContext
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from gateway.access.mqtt_accounts import ROLES, Account, Role
from gateway.access.ratelimit import RateLimiter
from gateway.mqtt.guard import AbuseGuard, BrokerLimits
from gateway.mqtt.topics import is_valid_filter, matches

log = logging.getLogger("gateway.mqtt.broker")  # the name operators grep the journal for

# Session.attributes is amqtt's place for plugin-owned state: (name, generation) of an account session.
ACCOUNT = "carwash.account"

ANON_PUBLISH = ("server/+/ack", "server/+/streaming")
# Exact topics only (no wildcards): a device listens to its own commands and to the payment status
# of a charge it created; a LAN client cannot sweep up every device's commands and payments.
ANON_SUBSCRIBE = ("device/+/command", "device/+/payment-status")

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
    return _anonymous_may_publish(topic)


def _anonymous_may_publish(topic: str) -> bool:
    """`matches(f, topic)` for some f of ANON_PUBLISH, without splitting the topic per filter (this
    runs twice for every device message); tests/test_broker.py holds the two to the same answers."""
    head, sep, rest = topic.partition("/")
    if head != "server" or not sep:
        return False
    _device, sep, tail = rest.partition("/")
    return bool(sep) and tail in _ANON_PUBLISH_TAILS


_ANON_PUBLISH_TAILS = frozenset(f.split("/", 2)[2] for f in ANON_PUBLISH)
assert all(f.startswith("server/+/") and "/" not in f.split("/", 2)[2] for f in ANON_PUBLISH)


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

