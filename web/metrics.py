"""`GET /metrics`: the site's one Prometheus scrape target, core and web together.

The web keeps its own metrics (HTTP requests by route, method and status with latency
histograms; database and WAL size, outbox age and dead letters, wash sessions by outcome read from
SQLite at scrape time; its process's CPU, memory and bytes written) and asks the core for its
exposition over the local broker (RPC `metrics.scrape`, gateway/core/metrics.py). Both are parsed
into metric families and rendered once, so a family that both processes report
(`carwash_process_*`, labelled `process`) appears once with both samples. When the core does not
answer, the scrape still succeeds with `carwash_core_up 0` (the web's own metrics stay useful).

Access: clients whose address is in `metrics.allow` (loopback by default), or any client with
`Authorization: Bearer <metrics_token>` from the secrets file; others get 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import CONTENT_TYPE_PLAIN_0_0_4, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway.core.metrics import process_families
from web.context import ctx
from web.errors import ApiError
from web.openapi import doc

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)
PATH = "/metrics"
CORE_TIMEOUT_SEC = 3.0
# Seconds; an API answer on a Pi takes milliseconds, an upload or a firmware image longer.
HTTP_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
REGISTRY = "carwash.metrics"
WARN_EVERY_SEC = 600.0
_last_warning = -WARN_EVERY_SEC
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class _Http:
    """The web's request metrics, in the app's own registry (tests make several apps)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter("carwash_http_requests", "HTTP requests answered, by route template and status",
                                ["route", "method", "status"], registry=registry)
        self.latency = Histogram("carwash_http_request_duration_seconds",
                                 "Time to the response (a stream: to its first byte), by route template",
                                 ["route", "method"], buckets=HTTP_BUCKETS, registry=registry)


def _route() -> str:
    """The matched rule's template (`/api/v1/devices/<device_id>`): bounded, no ids; "unmatched"
    for 404s without a rule."""
    rule = request.url_rule
    return rule.rule if rule is not None else "unmatched"


class _WebCollector(Collector):
    """What the web reads at scrape time: SQLite files and rows, its own process."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        c = ctx(self.app)
        path = c.config.paths.database
        for name, file, doc_ in (("carwash_database_size_bytes", path, "Size of the SQLite database file"),
                                 ("carwash_database_wal_size_bytes", path + "-wal", "Size of its write-ahead log")):
            try:
                yield GaugeMetricFamily(name, doc_, value=os.path.getsize(file))
            except OSError:
                pass
        if c.db is not None and c.schema_current():
            try:
                yield from self._rows(c.db)
            except Exception:  # a locked or half-migrated database must not fail the whole scrape
                log.warning("metrics: database figures unavailable", exc_info=True)
        yield from process_families("web")

    @staticmethod
    def _rows(db: Any) -> Iterator[Metric]:
        (oldest,) = db.execute_sql('SELECT MIN("occurred_at") FROM "outbox_event" '
                                   'WHERE "state" = \'pending\'').fetchone()
        age = GaugeMetricFamily("carwash_outbox_oldest_pending_age_seconds",
                                "Age of the oldest event waiting for the cloud (0: none)", value=0)
        if oldest is not None:
            age = GaugeMetricFamily(age.name, age.documentation, value=max(0.0, time.time() - _epoch(oldest)))
        yield age
        (dead,) = db.execute_sql('SELECT COUNT(*) FROM "outbox_event" WHERE "state" = \'dead\'').fetchone()
        yield GaugeMetricFamily("carwash_outbox_dead_letters_waiting",
                                "Dead letters kept for a technician to resend or discard", value=dead)
        sessions = CounterMetricFamily("carwash_wash_sessions", "Finished wash sessions by bay and outcome "
                                       "(DONE, CANCELED, ERROR)", labels=["bay", "outcome"])
        for bay, outcome, n in db.execute_sql('SELECT "bay_id", "state", COUNT(*) FROM "wash_session" '
                                              'WHERE "end_time" IS NOT NULL GROUP BY 1, 2 ORDER BY 1, 2'):
            sessions.add_metric([bay, outcome], n)
        yield sessions


def _epoch(value: Any) -> float:
    """A stored timestamp (datetime, ISO text or epoch number) as Unix seconds."""
    import datetime as dt

    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    if isinstance(value, dt.datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=dt.UTC)
        return float(value.timestamp())
    raise ValueError(f"unexpected timestamp {value!r}")


class _Merged(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        return iter(self.families)


def merge(*sources: Any) -> list[Metric]:
    """Families of several sources as one list: samples of a family several sources report are
    joined under its first appearance (a name must appear once in an exposition)."""
    by_name: dict[str, Metric] = {}
    for families in sources:
        for fam in families:
            if fam.name in by_name:
                by_name[fam.name].samples.extend(fam.samples)
            else:
                by_name[fam.name] = fam
    return list(by_name.values())


def allowed(remote: str | None, authorization: str, allow: tuple[str, ...], token: str) -> bool:
    """May this client scrape: its address in `allow`, or the right bearer token."""
    scheme, _, given = authorization.partition(" ")
    if token and scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return True
    try:
        addr = ipaddress.ip_address(remote or "")
    except ValueError:
        return False
    if addr.version == 6 and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return any(addr in ipaddress.ip_network(net, strict=False) for net in allow)


def _core_families() -> list[Metric]:
    from gateway.mqtt.client import BusUnavailable, RpcTimeout
    from gateway.mqtt.rpc import RpcError

    bus = ctx().bus
    try:
        if bus is None:
            raise BusUnavailable("no broker client")
        answer = bus.call("metrics.scrape", {}, timeout=CORE_TIMEOUT_SEC)
        return list(text_string_to_metric_families(answer["text"]))
    except (BusUnavailable, RpcTimeout, RpcError, KeyError, TypeError, ValueError) as exc:
        global _last_warning
        if time.monotonic() - _last_warning >= WARN_EVERY_SEC:  # a scrape every 15 s must not flood the log
            _last_warning = time.monotonic()
            log.warning("metrics: the core did not answer the scrape: %s", exc)
        return [GaugeMetricFamily("carwash_core_up", "1 when the core answered this scrape (the web sets 0 when "
                                  "it did not)", value=0)]


@bp.get(PATH)
@doc("Prometheus metrics of the site (core and web), text format; from metrics.allow or with the metrics token",
     tags=("gateway",), errors=(403, 404), content_type="text/plain",
     response={"type": "string", "description": "the Prometheus text format 0.0.4"})
def metrics() -> Response:
    c = ctx()
    if not c.config.metrics.enabled:
        raise ApiError(404, "NOT_FOUND", "metrics are disabled (metrics.enabled)")
    if not allowed(request.remote_addr, request.headers.get("Authorization", ""), c.config.metrics.allow,
                   c.secrets.metrics_token):
        raise ApiError(403, "FORBIDDEN", "this address may not scrape /metrics (metrics.allow or the metrics token)")
    web_registry: CollectorRegistry = current_app.extensions[REGISTRY]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged(merge(_core_families(), web_registry.collect())))
    # The classic text format (0.0.4): every name here is a legacy name, so the output is the same,
    # and scrapers that predate the 1.0.0 content type (Prometheus 2, agents) take it as it is.
    return Response(generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4,
                                                        "Cache-Control": "no-store"})


def install(app: Flask) -> None:
    """The /metrics blueprint and the request hooks that count every answer (no I/O)."""
    from prometheus_client import disable_created_metrics

    disable_created_metrics()  # no `_created` series: half the lines, and Prometheus ignores them
    registry = CollectorRegistry(auto_describe=False)
    http = _Http(registry)
    registry.register(_WebCollector(app))
    app.extensions[REGISTRY] = registry

    @app.before_request
    def _start_timer() -> None:
        g.metrics_t0 = time.perf_counter()

    # The labelled children per (route, method, status): `labels()` validates and locks on every
    # call. As bounded as the series themselves (route templates, METHODS, statuses).
    children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    @app.after_request
    def _count(resp: Response) -> Response:
        t0 = g.pop("metrics_t0", None)
        route = _route()
        method = request.method
        if method not in METHODS:
            method = "other"  # clients choose it: bounded
        key = (route, method, resp.status_code)
        pair = children.get(key)
        if pair is None:
            pair = children[key] = (http.requests.labels(route, method, str(resp.status_code)),
                                    http.latency.labels(route, method))
        pair[0].inc()
        if t0 is not None:
            pair[1].observe(time.perf_counter() - t0)
        return resp

    app.register_blueprint(bp)
