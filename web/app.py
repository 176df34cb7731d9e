"""`create_app(config, secrets)`: the Flask application of the web process (no I/O here)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flask import Flask, request
from flask_socketio import SocketIO

from gateway.access.ratelimit import RateLimiter, retry_after
from gateway.config import Config, Secrets
from web import (
    access,
    auth,
    cloud,
    commands,
    device_api,
    errors,
    firmware,
    health,
    meta,
    metrics,
    pages,
    payments,
    wash,
)
from web.context import WebContext, ctx
from web.cors import OriginPolicy
from web.errors import ApiError

# Routes that answer while the schema is not current (health must always answer).
UNGATED = ("/api/health", "/api/openapi.json", "/metrics", "/static/app.js", "/static/style.css")
SOCKETIO_PATH = "socket.io"
RATE_LIMITED_BLUEPRINTS = ("device_api", "payments")  # what devices call; limited per client address


class GatewayFlask(Flask):
    """Flask, with `ensure_sync` remembered per function: Flask asks it for every hook, view and
    error handler of every request, and each answer ran `inspect.iscoroutinefunction`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_functions: set[Callable[..., Any]] = set()

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        if func in self._sync_functions:
            return func
        wrapped = super().ensure_sync(func)
        if wrapped is func:  # registered hooks and views: a bounded set
            self._sync_functions.add(func)
        return wrapped


def create_app(config: Config, secrets: Secrets) -> Flask:
    app = GatewayFlask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = config.web.body_limit_bytes
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    app.extensions["carwash"] = WebContext(config, secrets)
    errors.install(app)
    metrics.install(app)  # first: its timer starts before the other hooks run (web/metrics.py)
    health.install(app)
    origins = OriginPolicy(config.web.cors_allowed_origins)
    origins.install(app)

    limiter = RateLimiter(config.web.device_rate_per_sec, config.web.device_rate_burst, config.web.rate_limit_exempt)
    app.extensions["carwash.ratelimit"] = limiter
    app.extensions["carwash.login_failures"] = auth.login_limiter(config)
    web_ctx = ctx(app)

    @app.before_request
    def _gate() -> None:
        """Body size (before reading a byte of it), the schema gate, then the device rate limit.
        One hook reading the request once: it runs before every request."""
        req = request._get_current_object()  # type: ignore[attr-defined]  # once, not per attribute
        path = req.path
        limit = app.config["MAX_CONTENT_LENGTH"]
        if path == firmware.UPLOAD_PATH and req.method == "POST":
            limit = config.web.firmware_max_bytes
            req.max_content_length = limit  # also bounds a chunked upload while it is read
        length = req.content_length  # parsed from the header on every access
        if length is not None and length > limit:
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes")
        if path not in UNGATED and not web_ctx.schema_current():
            raise ApiError(503, "SERVICE_UNAVAILABLE",
                           "database schema is not current; the core is starting or upgrading", {"Retry-After": "5"})
        if req.blueprint in RATE_LIMITED_BLUEPRINTS:
            wait = limiter.check(req.remote_addr)
            if wait:
                raise ApiError(429, "RATE_LIMITED", "too many requests from this address",
                               {"Retry-After": retry_after(wait)})

    app.register_blueprint(meta.bp)
    app.register_blueprint(wash.bp)
    app.register_blueprint(auth.bp)
    app.register_blueprint(device_api.bp)
    app.register_blueprint(commands.bp)
    app.register_blueprint(firmware.bp)
    app.register_blueprint(payments.bp)
    app.register_blueprint(cloud.bp)
    app.register_blueprint(pages.bp)
    app.register_blueprint(access.bp)
    # Socket.IO for clients of the seed's `wash:status` event; threading mode under gthread.
    socketio = SocketIO(app, async_mode="threading", cors_allowed_origins=origins.allows, cors_credentials=False,
                        path=SOCKETIO_PATH)
    ctx(app).feed.add_listener(lambda status: socketio.emit("wash:status", status))
    app.extensions["carwash.socketio"] = socketio
    _socketio_only_on_its_path(app)
    return app


def _socketio_only_on_its_path(app: Flask) -> None:
    """Send only Socket.IO's own path through its middleware. Under gunicorn, that middleware
    copies the environ and defines a class for every request (python-engineio's
    `eventlet.input` shim), whatever the path: a cost on every API call and cyclic garbage for
    the collector. Other paths go straight to Flask, as the middleware itself would send them."""
    middleware = app.wsgi_app
    flask_wsgi = middleware.wsgi_app  # type: ignore[attr-defined]
    prefix: str = middleware.engineio_path  # type: ignore[attr-defined]  # "/socket.io/"

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO")
        if path is not None and path.startswith(prefix):
            return middleware(environ, start_response)
        return flask_wsgi(environ, start_response)

    app.wsgi_app = dispatch  # type: ignore[method-assign]
