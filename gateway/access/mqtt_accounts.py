"""MQTT accounts of programs on the site LAN (a wash backend, dashboards): roles, hashed passwords.

Stored in `mqtt_account` (argon2id hashes, as technician accounts); written by the `mqtt-user` CLI
and the technician page, read by the core's broker (`gateway.mqtt.broker`), which reloads the table
every `RELOAD_SEC` and cuts the live connections of an account that was removed or changed
(a password or role change bumps `generation`). A role is a fixed ACL:

- `wash-backend`: publish `wash/+/cmd` (every action of the wash contract); subscribe
  `wash/+/status` and `wash/+/cmd/result`;
- `monitor`: read only: `wash/+/status`, `gateway/status` (availability), `gateway/health`,
  `gateway/presence/+` (device online/offline transitions).

A subscription is allowed when a role's filter covers it (`wash/bay1/status` or `wash/+/status`,
never `wash/#`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from peewee import SqliteDatabase

from gateway.clock import iso_z, utc_now
from gateway.mqtt.topics import (
    HEALTH,
    PRESENCE_FILTER,
    STATUS,
    WASH_CMD_FILTER,
    WASH_CMD_RESULT_FILTER,
    WASH_STATUS_FILTER,
    covers,
    matches,
)
from gateway.store import write_tx
from gateway.store.models import MqttAccount, tuple_rows

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")
MIN_PASSWORD = 12  # programs, not people, type it: no reason for a short one
# Names the broker gives a meaning of its own (the internal user is configured; `carwash-` is the
# prefix of the gateway's own client ids).
RESERVED_PREFIX = "carwash"


@dataclass(frozen=True)
class Role:
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return any(matches(f, topic) for f in self.publish)

    def may_subscribe(self, topic_filter: str) -> bool:
        return any(covers(f, topic_filter) for f in self.subscribe)


ROLES: dict[str, Role] = {
    "wash-backend": Role(publish=(WASH_CMD_FILTER,), subscribe=(WASH_STATUS_FILTER, WASH_CMD_RESULT_FILTER)),
    "monitor": Role(publish=(), subscribe=(WASH_STATUS_FILTER, STATUS, HEALTH, PRESENCE_FILTER)),
}

_hasher = PasswordHasher()


class AccountError(Exception):
    """A refused change, with a sentence naming the field."""


class AccountExists(AccountError):
    pass


class NoAccount(AccountError):
    pass


@dataclass(frozen=True)
class Account:
    username: str
    password_hash: str
    role: str
    generation: int

    def verify(self, password: str) -> bool:
        """argon2id check (tens of milliseconds: callers on an event loop run it in a thread)."""
        try:
            return bool(_hasher.verify(self.password_hash, password))
        except (VerificationError, InvalidHashError):
            return False


def _check(username: str, *, password: str | None = None, role: str | None = None,
           internal_username: str = "") -> None:
    if not USERNAME_RE.match(username):
        raise AccountError("name: 1-64 letters, digits, '_', '.', '-'")
    if username.lower().startswith(RESERVED_PREFIX) or (internal_username and username == internal_username):
        raise AccountError(f"name: names starting with {RESERVED_PREFIX!r} are the gateway's own")
    if password is not None and len(password) < MIN_PASSWORD:
        raise AccountError(f"password: at least {MIN_PASSWORD} characters")
    if role is not None and role not in ROLES:
        raise AccountError(f"role: one of {', '.join(ROLES)}")


def check(username: str, *, password: str | None = None, role: str | None = None,
          internal_username: str = "") -> None:
    """AccountError naming the field, before anything is hashed or written."""
    _check(username, password=password, role=role, internal_username=internal_username)


def hash_password(password: str) -> str:
    """argon2id (tens of milliseconds: the web hashes in the request's thread, not its writer's)."""
    return _hasher.hash(password)


def add(db: SqliteDatabase, username: str, password: str, role: str, *, internal_username: str = "") -> None:
    _check(username, password=password, role=role, internal_username=internal_username)
    add_hashed(db, username, hash_password(password), role)


def add_hashed(db: SqliteDatabase, username: str, password_hash: str, role: str) -> None:
    """Insert a checked account (`check` first). AccountExists."""
    now = utc_now()
    with write_tx(db):
        if MqttAccount.select().where(MqttAccount.username == username).exists():
            raise AccountExists(f"name: account {username!r} exists")
        MqttAccount.create(username=username, password_hash=password_hash, role=role, created_at=now, changed_at=now)


def change(db: SqliteDatabase, username: str, *, password: str | None = None, role: str | None = None) -> None:
    """New password and/or role; the account's live connections are cut (they log in again)."""
    _check(username, password=password, role=role)
    change_hashed(db, username, password_hash=hash_password(password) if password is not None else None, role=role)


def change_hashed(db: SqliteDatabase, username: str, *, password_hash: str | None, role: str | None) -> None:
    """Set a checked new hash and/or role and bump the generation. NoAccount."""
    fields: dict[object, object] = {MqttAccount.generation: MqttAccount.generation + 1,
                                    MqttAccount.changed_at: utc_now()}
    if password_hash is not None:
        fields[MqttAccount.password_hash] = password_hash
    if role is not None:
        fields[MqttAccount.role] = role
    with write_tx(db):
        n = MqttAccount.update(fields).where(MqttAccount.username == username).execute()
    if n == 0:
        raise NoAccount(f"name: no account {username!r}")


def remove(db: SqliteDatabase, username: str) -> None:
    with write_tx(db):
        n = MqttAccount.delete().where(MqttAccount.username == username).execute()
    if n == 0:
        raise NoAccount(f"name: no account {username!r}")


def listing(db: SqliteDatabase) -> list[dict[str, str]]:
    """Name, role, created and changed (never the hash), by name."""
    return [{"username": a.username, "role": a.role, "created_at": iso_z(a.created_at),
             "changed_at": iso_z(a.changed_at)}
            for a in MqttAccount.select().order_by(MqttAccount.username)]


def load(db: SqliteDatabase) -> dict[str, Account]:
    """Every account by name (what the broker keeps in memory)."""
    rows = tuple_rows(MqttAccount.select(MqttAccount.username, MqttAccount.password_hash, MqttAccount.role,
                                         MqttAccount.generation))
    return {r[0]: Account(*r) for r in rows}
