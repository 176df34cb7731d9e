"""Technician accounts: argon2id password hashes in the `technician_user` table.

`token_version` is what the web's tokens are bound to (web/auth.py): a password change, disabling
and `end_sessions` (logout) bump it, so every token issued before stops working at once.
"""

from __future__ import annotations

import functools
import re

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from peewee import SqliteDatabase

from gateway.clock import utc_now
from gateway.store import write_tx
from gateway.store.models import TechnicianUser

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}\Z")  # \Z: `$` would take a trailing newline
MIN_PASSWORD = 4

_hasher = PasswordHasher()


class UserError(Exception):
    pass


def _check(username: str, password: str | None = None) -> None:
    if not USERNAME_RE.match(username):
        raise UserError("username: 1-64 letters, digits, '_', '.', '-'")
    if password is not None and len(password) < MIN_PASSWORD:
        raise UserError(f"password: at least {MIN_PASSWORD} characters")


def add_user(db: SqliteDatabase, username: str, password: str) -> None:
    _check(username, password)
    with write_tx(db):
        if TechnicianUser.select().where(TechnicianUser.username == username).exists():
            raise UserError(f"user {username!r} exists")
        TechnicianUser.create(username=username, password_hash=_hasher.hash(password), created_at=utc_now())


def exists(db: SqliteDatabase, username: str) -> bool:
    return bool(TechnicianUser.select().where(TechnicianUser.username == username).exists())


def set_password(db: SqliteDatabase, username: str, password: str) -> None:
    _check(username, password)
    with write_tx(db):
        n = (TechnicianUser.update(password_hash=_hasher.hash(password),
                                   token_version=TechnicianUser.token_version + 1)
             .where(TechnicianUser.username == username).execute())
    if n == 0:
        raise UserError(f"no user {username!r}")


def remove_user(db: SqliteDatabase, username: str) -> None:
    with write_tx(db):
        n = TechnicianUser.delete().where(TechnicianUser.username == username).execute()
    if n == 0:
        raise UserError(f"no user {username!r}")


def set_disabled(db: SqliteDatabase, username: str, disabled: bool) -> None:
    """Disable (ending its sessions) or enable an account."""
    with write_tx(db):
        n = (TechnicianUser.update(disabled=disabled, token_version=TechnicianUser.token_version + 1)
             .where(TechnicianUser.username == username).execute())
    if n == 0:
        raise UserError(f"no user {username!r}")


def end_sessions(db: SqliteDatabase, username: str) -> None:
    """Invalidate every token issued to `username` so far (logout)."""
    with write_tx(db):
        (TechnicianUser.update(token_version=TechnicianUser.token_version + 1)
         .where(TechnicianUser.username == username).execute())


def token_version(db: SqliteDatabase, username: str) -> int | None:
    row = (TechnicianUser.select(TechnicianUser.token_version).where(TechnicianUser.username == username)
           .tuples().first())
    return int(row[0]) if row else None


def verify(db: SqliteDatabase, username: str, password: str) -> bool:
    """Constant work whether or not the user exists (no username probing by timing)."""
    user = TechnicianUser.get_or_none((TechnicianUser.username == username) & (TechnicianUser.disabled == False))  # noqa: E712
    stored = user.password_hash if user else _dummy_hash()
    ok: bool
    try:
        ok = _hasher.verify(stored, password)
    except (VerificationError, InvalidHashError):
        ok = False
    return ok and user is not None


@functools.cache
def _dummy_hash() -> str:
    return _hasher.hash("not-a-real-password")
