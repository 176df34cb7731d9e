"""Technician-access recovery from the service button: a one-time login code in the journal.

Contract: `RecoveryCodes.issue()` (core, on a long press) makes an 8-digit code valid
`VALID_SEC`, logs it at WARNING (the journal: only someone with a shell or console on the Pi, or
at the box, sees it) and keeps only its hash. RPC `recovery.redeem {code, username, password}`
(the web's login page) checks the code once, then sets that technician's password (creating the
account when absent) and forgets the code. Wrong codes count; after `MAX_TRIES` the code is void.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
import time
from typing import Any

from peewee import SqliteDatabase

from gateway.access import users
from gateway.mqtt.rpc import RpcError, RpcServer

log = logging.getLogger(__name__)

VALID_SEC = 15 * 60
MAX_TRIES = 5


class RecoveryCodes:
    def __init__(self, db: SqliteDatabase) -> None:
        self.db = db
        self._hash: bytes | None = None
        self._until = 0.0
        self._tries = 0

    def issue(self) -> str:
        code = f"{secrets.randbelow(10**8):08d}"
        self._hash = hashlib.sha256(code.encode()).digest()
        self._until = time.monotonic() + VALID_SEC
        self._tries = 0
        log.warning("technician-access recovery: one-time code %s, valid %d min; log in with it at /recover",
                    code, VALID_SEC // 60)
        return code

    def register(self, rpc: RpcServer) -> None:
        rpc.register("recovery.redeem", self._rpc_redeem)

    def _check(self, code: str) -> bool:
        if self._hash is None or time.monotonic() > self._until or self._tries >= MAX_TRIES:
            return False
        self._tries += 1
        ok = hmac.compare_digest(hashlib.sha256(code.encode()).digest(), self._hash)
        if ok:
            self._hash = None
        return ok

    async def _rpc_redeem(self, params: dict[str, Any]) -> dict[str, Any]:
        code, username, password = params.get("code"), params.get("username"), params.get("password")
        if not all(isinstance(v, str) for v in (code, username, password)):
            raise RpcError("VALIDATION_FAILED", "code, username and password are required", 400)
        if not self._check(str(code)):
            raise RpcError("UNAUTHORIZED", "no valid recovery code", 401)
        def apply() -> None:  # argon2 hashing takes tens of ms: not on the event loop
            if users.exists(self.db, str(username)):
                users.set_password(self.db, str(username), str(password))
            else:
                users.add_user(self.db, str(username), str(password))

        try:
            await asyncio.to_thread(apply)
        except users.UserError as exc:
            raise RpcError("VALIDATION_FAILED", str(exc), 400) from None
        log.warning("technician-access recovery: password of %s set with the one-time code", username)
        return {"username": username}
