"""The technician page's session and rendering: language, texts, the logged-in technician.

Session = the JWT in an HttpOnly cookie (`cw_token`) and a CSRF cookie the page's script sends
back as `X-CSRF-Token` on every change (double submit, checked in web/auth.py). Who the cookie
authenticates is decided by `web.auth.account_of`, the same check as the API's Bearer token
(signature, expiry, the account's row and token version): there is no second JWT decode here.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import secrets
from collections.abc import Callable
from importlib import resources
from typing import Any

from flask import Response, make_response, redirect, render_template, request, url_for

from web.auth import CSRF_COOKIE, TOKEN_COOKIE, TokenRefused, account_of
from web.context import ctx

LANGS = ("th", "en")


@functools.cache
def texts() -> dict[str, dict[str, str]]:
    """static/i18n.json: {key: {"th": ..., "en": ...}}, read once per process."""
    data: dict[str, dict[str, str]] = json.loads(resources.files("web").joinpath("static/i18n.json").read_text())
    return data


def lang() -> str:
    """The page's language from the `lang` cookie; Thai by default."""
    value = request.cookies.get("lang", "th")
    return value if value in LANGS else "th"


def t(key: str) -> str:
    """The text of `key` in the page's language (English when that language lacks it; the key
    itself when unknown, so a missing text shows rather than breaking the page)."""
    entry = texts().get(key)
    return entry.get(lang(), entry["en"]) if entry else key


def current_user() -> str | None:
    """The technician the session cookie authenticates (web/auth.py `account_of`), else None."""
    token = request.cookies.get(TOKEN_COOKIE)
    if not token:
        return None
    try:
        return account_of(token)
    except TokenRefused:
        return None


def page(view: Callable[..., Any]) -> Callable[..., Any]:
    """A page for a logged-in technician, called with the user name first; otherwise a redirect
    to the login form (saying why, and coming back here after)."""

    @functools.wraps(view)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        user = current_user()
        if user is None:
            why = "expired" if request.cookies.get(TOKEN_COOKIE) else ""
            return redirect(url_for("pages.login_form", why=why, next=request.path))
        return view(user, *args, **kwargs)

    return wrapper


def render(template: str, user: str | None, **values: Any) -> Response:
    """A page as an uncached, unframeable HTML response; gives the browser a CSRF cookie when it
    has none."""
    html = render_template(template, t=t, lang=lang(), user=user, site=ctx().config.site, path=request.path,
                           **values)
    resp = make_response(html)
    resp.headers["Content-Type"] = "text/html; charset=utf-8"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["X-Frame-Options"] = "DENY"
    if not request.cookies.get(CSRF_COOKIE):
        resp.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), samesite="Strict", httponly=False)
    return resp


def safe_next(target: str | None) -> str:
    """A redirect target on this site only (no open redirect): a path, else "/"."""
    return target if target and target.startswith("/") and not target.startswith("//") else "/"


def start_session(resp: Response, token: str, expires: dt.datetime) -> Response:
    """Put a freshly issued token in the session cookie, living as long as the token."""
    resp.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict",
                    max_age=int((expires - dt.datetime.now(dt.UTC)).total_seconds()))
    return resp
