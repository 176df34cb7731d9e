"""Technician login and Bearer JWT checks (HS256, key from the secrets file).

`POST /api/v1/auth/login {username, password}` → `data: {token, expires_at}`. `require_technician()`
raises 401 UNAUTHORIZED (missing, malformed, expired or forged token, or a removed, disabled or
signed-out account). `account_of(token)` is the one check behind it and behind the technician
page's session (web/session.py): signature, expiry, and the account's row, whose `token_version`
must equal the token's `ver` claim. Removing or disabling an account, changing its password and
logging out (which bumps the version) thus end every token issued before, on the next request.
"""

from __future__ import annotations

import datetime as dt
import hmac
from typing import Any

import jwt
from flask import Blueprint, current_app, jsonify, request

from gateway.access import users
from gateway.access.ratelimit import RateLimiter, retry_after
from gateway.clock import iso_z
from gateway.config import Config
from web.body import read_json
from web.context import ctx
from web.errors import ApiError
from web.openapi import doc

bp = Blueprint("auth", __name__)

ALGORITHM = "HS256"
TOKEN_COOKIE = "cw_token"
CSRF_COOKIE = "cw_csrf"
CSRF_HEADER = "X-CSRF-Token"
ISSUER = "carwash-gateway"

LOGIN_REQ = {"type": "object", "required": ["username", "password"],
             "properties": {"username": {"type": "string"}, "password": {"type": "string"}}}


def login_limiter(config: Config) -> RateLimiter:
    """Failed logins per client address (create_app keeps one per app)."""
    return RateLimiter(config.web.login_failures_per_min / 60.0, config.web.login_failure_burst)


def verify_login(username: str, password: str) -> bool:
    """The password check of both logins (API and page). Raises 429 RATE_LIMITED while the client
    address has failed too often: only failures count, so a technician who types the password
    right is never held up, and past the limit even the right password waits (else guessing would
    go on)."""
    failures: RateLimiter = current_app.extensions["carwash.login_failures"]
    wait = failures.peek(request.remote_addr)
    if wait:
        raise ApiError(429, "RATE_LIMITED", "too many failed logins from this address",
                       {"Retry-After": retry_after(wait)})
    db = ctx().db
    if db is not None and users.verify(db, username, password):
        return True
    failures.check(request.remote_addr)
    return False


def issue_token(username: str) -> tuple[str, dt.datetime]:
    """A token for `username` (whose password was just checked), bound to its current version."""
    c = ctx()
    now = dt.datetime.now(dt.UTC)
    exp = now + dt.timedelta(minutes=c.config.web.jwt_ttl_minutes)
    version = users.token_version(c.db, username) if c.db is not None else None
    claims = {"sub": username, "iat": now, "exp": exp, "iss": ISSUER, "site": c.config.site.id, "ver": version or 0}
    return jwt.encode(claims, c.secrets.jwt_secret, algorithm=ALGORITHM), exp


def end_sessions(username: str) -> None:
    """Bump the account's token version through the web's writer (returns after the commit)."""
    c = ctx()
    if c.db is None or c.writer is None:
        raise ApiError(503, "SERVICE_UNAVAILABLE", "database not open")
    db = c.db
    c.writer.run(lambda: users.end_sessions(db, username))


ACCOUNT_ROW_SQL = 'SELECT "disabled", "token_version" FROM "technician_user" WHERE "username" = ?'


class TokenRefused(Exception):
    """Why a token does not authenticate: a short English sentence for the 401 message."""


def account_of(token: str) -> str:
    """The user name a token authenticates, else TokenRefused. One indexed row read per call."""
    try:
        claims = jwt.decode(token.strip(), ctx().secrets.jwt_secret, algorithms=[ALGORITHM], issuer=ISSUER,
                            options={"require": ["exp", "sub", "iss"]})
    except jwt.ExpiredSignatureError:
        raise TokenRefused("token expired") from None
    except jwt.InvalidTokenError:
        raise TokenRefused("invalid token") from None
    username = str(claims["sub"])
    db = ctx().db
    if db is None:
        raise TokenRefused("database not open")
    # Plain SQL on the unique index: Peewee's query building cost 4x the read (bench access_checks).
    row = db.execute_sql(ACCOUNT_ROW_SQL, (username,)).fetchone()
    if row is None or row[0]:
        raise TokenRefused("account no longer exists or is disabled")
    if claims.get("ver", 0) != row[1]:
        raise TokenRefused("session ended (signed out, or the password changed)")
    return username


def csrf_ok() -> bool:
    """The request carries the CSRF cookie's value (X-CSRF-Token header or `csrf` form field)."""
    cookie = request.cookies.get(CSRF_COOKIE, "")
    given = request.headers.get(CSRF_HEADER) or (request.form.get("csrf", "") if request.form else "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), given.encode())


def require_technician(*, allow_query: bool = False) -> str:
    """The user name of a valid Bearer token, else 401 with the envelope.

    With `allow_query` (SSE streams: a browser's EventSource cannot send headers) the token may
    also come as `?access_token=`.
    """
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if not header and allow_query and request.args.get("access_token"):
        scheme, token = "bearer", request.args["access_token"]
    if not header and request.cookies.get(TOKEN_COOKIE):
        # The technician page's session: a cookie the browser sends by itself, so every change must
        # also carry the CSRF token the page read from its own cookie (double submit).
        if request.method not in ("GET", "HEAD", "OPTIONS") and not csrf_ok():
            raise ApiError(403, "FORBIDDEN", "missing or wrong X-CSRF-Token")
        scheme, token = "bearer", request.cookies[TOKEN_COOKIE]
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "UNAUTHORIZED", "a technician token is required (Authorization: Bearer ...)",
                       {"WWW-Authenticate": "Bearer"})
    try:
        return account_of(token)
    except TokenRefused as exc:
        raise ApiError(401, "UNAUTHORIZED", str(exc), {"WWW-Authenticate": "Bearer"}) from None


@bp.post("/api/v1/auth/login")
@doc("Technician login: a Bearer token for the web API", tags=("auth",), request=LOGIN_REQ,
     response={"type": "object"}, errors=(400, 401, 415, 429))
def login() -> Any:
    body = read_json()
    username, password = body.get("username"), body.get("password")
    if not isinstance(username, str) or not isinstance(password, str):
        raise ApiError(400, "VALIDATION_FAILED", "username and password must be strings")
    if not verify_login(username, password):
        raise ApiError(401, "UNAUTHORIZED", "wrong user name or password")
    token, exp = issue_token(username)
    return jsonify({"success": True, "data": {"token": token, "token_type": "Bearer", "expires_at": iso_z(exp)},
                    "message": "Logged in"})


@bp.post("/api/v1/auth/logout")
@doc("End every session of the calling technician (all tokens issued before stop working)", tags=("auth",),
     response={"type": "object"}, errors=(401, 403), security="bearer")
def logout() -> Any:
    user = require_technician()
    end_sessions(user)
    return jsonify({"success": True, "message": "Logged out"})
