"""`create_app(config, secrets)`: the Flask application of the web process (no I/O here)."""

from __future__ import annotations

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


def create_app(config: Config, secrets: Secrets) -> Flask:
    app = Flask(__name__)
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

    @app.before_request
    def _guards() -> None:
        limit = app.config["MAX_CONTENT_LENGTH"]
        if request.path == firmware.UPLOAD_PATH and request.method == "POST":
            limit = config.web.firmware_max_bytes
            request.max_content_length = limit  # also bounds a chunked upload while it is read
        if request.content_length is not None and request.content_length > limit:
            # Refuse before reading a byte of the body.
            raise ApiError(413, "PAYLOAD_TOO_LARGE", f"request body larger than {limit} bytes")
        if request.path not in UNGATED and not ctx(app).schema_current():
            raise ApiError(503, "SERVICE_UNAVAILABLE",
                           "database schema is not current; the core is starting or upgrading", {"Retry-After": "5"})

    limiter = RateLimiter(config.web.device_rate_per_sec, config.web.device_rate_burst, config.web.rate_limit_exempt)
    app.extensions["carwash.ratelimit"] = limiter
    app.extensions["carwash.login_failures"] = auth.login_limiter(config)

    @app.before_request
    def _limit() -> None:
        if request.blueprint not in RATE_LIMITED_BLUEPRINTS:
            return
        wait = limiter.check(request.remote_addr)
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
    return app
