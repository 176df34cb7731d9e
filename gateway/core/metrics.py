"""Prometheus metrics of the core, read at scrape time from the stats its modules already keep.

One custom `Collector` (`CoreCollector`) walks the live objects of the core (`CoreParts`) (bus schedulers,
bay machines, the broker, presence, commands, the drainer, the bridge, the Pi monitor) when a
scrape asks, so nothing here sits on a hot path. `exposition(app)` renders it in the text format;
the web asks for it over RPC `metrics.scrape` and serves it together with its own metrics on
`GET /metrics` (web/metrics.py): one scrape target per site.

Names follow Prometheus' conventions: `carwash_` prefix, base units (seconds, bytes), `_total` on
counters, label values from bounded sets (bus and bay ids of the configuration, roles, reasons,
states, command types; never a device, request or session id). `process_families` is shared with
the web so that both processes report under one family with a `process` label.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway.core.health import THROTTLE_BITS, process_written_bytes
from gateway.metrics_hist import Buckets

if TYPE_CHECKING:
    from gateway.core.app import CoreParts

# The wash contract's bay states (wash-contract.md); a state outside it is still shown.
BAY_STATES = ("IDLE", "STARTING", "WASHING", "DONE", "ERROR", "OFFLINE")
POLL_ERROR_KINDS = ("timeout", "exception", "bad_frame", "decode", "disconnected", "other")  # plc.bus.error_kind
# The broker's refusal reasons (gateway/mqtt/broker.py), shown at 0 from the start so that
# rate() and alerts see the series before the first refusal; a new reason still appears.
REFUSAL_REASONS = ("login", "client_id", "acl_publish", "acl_subscribe", "max_connections",
                   "cooldown", "connect_timeout", "packet_size", "rate", "flood")
START_TIME = time.time()


def _counter(name: str, doc: str, labels: Iterable[str], items: Iterable[tuple[Iterable[str], float]]) -> Metric:
    m = CounterMetricFamily(name, doc, labels=list(labels))
    for values, v in items:
        m.add_metric(list(values), v)
    return m


def _gauge(name: str, doc: str, labels: Iterable[str] = (), items: Iterable[tuple[Iterable[str], float]] = (),
           value: float | None = None) -> Metric:
    if value is not None:
        return GaugeMetricFamily(name, doc, value=value)
    m = GaugeMetricFamily(name, doc, labels=list(labels))
    for values, v in items:
        m.add_metric(list(values), v)
    return m


def histogram(name: str, doc: str, b: Buckets) -> Metric:
    m = HistogramMetricFamily(name, doc)
    m.add_metric([], b.cumulative(), b.sum)
    return m


def process_families(process: str, root: Path = Path("/")) -> list[Metric]:
    """This process's CPU, memory and bytes written to storage, labelled `process`."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    out = [_counter("carwash_process_cpu_seconds", "CPU time of the process (user + system)", ["process"],
                    [([process], usage.ru_utime + usage.ru_stime)]),
           _gauge("carwash_process_start_time_seconds", "Start of the process, Unix time", ["process"],
                  [([process], START_TIME)])]
    try:
        rss = int((root / "proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        out.append(_gauge("carwash_process_resident_memory_bytes", "Resident memory of the process", ["process"],
                          [([process], rss)]))
    except (OSError, ValueError, IndexError):
        pass
    written = process_written_bytes(root)
    if written is not None:
        out.append(_counter("carwash_process_disk_written_bytes",
                            "Bytes the process caused to be written to storage (/proc/self/io write_bytes)",
                            ["process"], [([process], written)]))
    return out


class CoreCollector(Collector):
    """Everything the core knows, read from `app` at each `collect()` (on the core's loop)."""

    def __init__(self, app: CoreParts) -> None:
        self.app = app

    def collect(self) -> Iterator[Metric]:
        app = self.app
        yield _gauge("carwash_core_up", "1 when the core answered this scrape (the web sets 0 when it did not)",
                     value=1)
        yield from self._modbus(app)
        yield from self._bays(app)
        yield from self._mqtt(app)
        yield from self._devices(app)
        yield from self._commands(app)
        yield from self._uplink(app)
        yield from pi_families(app.pi.snapshot())
        yield from process_families("core")

    @staticmethod
    def _modbus(app: CoreParts) -> Iterator[Metric]:
        schedulers = getattr(app.wash, "schedulers", None) or {}
        line = {n: s.line_stats() for n, s in schedulers.items()}
        for key, name, doc in (("transactions", "carwash_modbus_transactions", "Modbus transactions on the bus"),
                               ("timeouts", "carwash_modbus_timeouts", "Transactions without a reply in time"),
                               ("bad_frames", "carwash_modbus_bad_frames",
                                "Replies refused for a bad CRC or broken framing"),
                               ("stale_dropped", "carwash_modbus_stale_replies",
                                "Late replies dropped (they answered an earlier request)")):
            yield _counter(name, doc, ["bus"], [([n], st.get(key, 0)) for n, st in line.items()])
        yield _gauge("carwash_modbus_bus_connected", "1 while the bus's serial device or TCP link is open", ["bus"],
                     [([n], float(bool(s.connected))) for n, s in schedulers.items()])
        yield _counter("carwash_modbus_reconnects", "Reconnections of the bus", ["bus"],
                       [([n], s.reconnects) for n, s in schedulers.items()])
        polls = CounterMetricFamily("carwash_modbus_polls", "Status polls of the bay", labels=["bus", "bay"])
        errors = CounterMetricFamily("carwash_modbus_poll_errors",
                                     "Failed polls by kind: timeout, exception (the PLC's exception reply), "
                                     "bad_frame (CRC or framing), decode, disconnected (bus down), other",
                                     labels=["bus", "bay", "kind"])
        latency = GaugeMetricFamily("carwash_modbus_poll_latency_median_seconds",
                                    "Median poll round trip over the recent polls", labels=["bus", "bay"])
        for n, s in schedulers.items():
            for bay, st in s.stats().items():
                polls.add_metric([n, bay], st["polls"])
                for kind in POLL_ERROR_KINDS:
                    errors.add_metric([n, bay, kind], st.get("errors_by_kind", {}).get(kind, 0))
                if st.get("latency_ms_median") is not None:
                    latency.add_metric([n, bay], st["latency_ms_median"] / 1000)
        yield polls
        yield errors
        yield latency

    @staticmethod
    def _bays(app: CoreParts) -> Iterator[Metric]:
        bays = getattr(app.wash, "bays", None) or {}
        state = GaugeMetricFamily("carwash_bay_state", "1 for the bay's current state (wash contract)",
                                  labels=["bay", "state"])
        for bay_id, bay in bays.items():
            current = bay.machine.view.state
            for s in (*BAY_STATES, *((current,) if current not in BAY_STATES else ())):
                state.add_metric([bay_id, s], float(s == current))
        yield state
        yield _gauge("carwash_bay_plc_answering", "1 while the bay's PLC answers its polls", ["bay"],
                     [([b], float(bool(up))) for b, up in app.health.health.plc.items()])

    @staticmethod
    def _mqtt(app: CoreParts) -> Iterator[Metric]:
        bus = app.bus
        by_role: dict[str, int] = {}
        for cid in list(bus.clients):
            role = bus.role_of_client(cid)
            by_role[role] = by_role.get(role, 0) + 1
        roles = ("device", "internal", "wash-backend", "monitor")
        yield _gauge("carwash_mqtt_connections", "Connected MQTT clients of the site broker by role", ["role"],
                     [([r], by_role.get(r, 0)) for r in sorted({*roles, *by_role})])
        yield _counter("carwash_mqtt_messages_received", "Publishes the broker received from clients, by role",
                       ["role"], [([r], n) for r, n in sorted(bus.received.items())])
        counts = bus.refusals.counts
        yield _counter("carwash_mqtt_refusals", "What the broker refused, by reason (logins, ACL, limits)",
                       ["reason"], [([r], counts.get(r, 0)) for r in sorted({*REFUSAL_REASONS, *counts})])

    @staticmethod
    def _devices(app: CoreParts) -> Iterator[Metric]:
        p = app.presence
        if p is not None:
            yield _gauge("carwash_devices_online", "Devices streaming within their offline timeout",
                         value=sum(1 for s in p.seen.values() if s.online))
            yield _counter("carwash_device_streaming_messages_accepted", "Streaming messages accepted", [],
                           [([], p.accepted)])
        drops: list[tuple[Iterable[str], float]] = []
        if p is not None:
            drops += [(["streaming", r], n) for r, n in sorted(p.dropped.items())]
        if app.commands is not None:
            drops += [(["ack", r], n) for r, n in sorted(app.commands.drops.counts.items())]
        yield _counter("carwash_device_messages_dropped", "Device messages dropped, by topic kind and reason",
                       ["source", "reason"], drops)

    @staticmethod
    def _commands(app: CoreParts) -> Iterator[Metric]:
        c = app.commands
        yield _counter("carwash_command_results", "Final per-device outcomes of device commands",
                       ["command", "status"], [(list(k), n) for k, n in sorted(c.tracker.outcomes.items())])
        yield _counter("carwash_command_acks_ignored", "ACKs that matched no pending command, by reason",
                       ["reason"], [([r], n) for r, n in sorted(c.tracker.ignored.items())])
        yield _gauge("carwash_commands_pending", "Commands waiting for ACKs", value=len(c.tracker.pending))
        yield histogram("carwash_command_ack_latency_seconds",
                        "From a command's (last) publish to a device's final ACK", c.ack_latency)

    @staticmethod
    def _uplink(app: CoreParts) -> Iterator[Metric]:
        if app.drainer is not None:
            st: dict[str, Any] = app.drainer.state()
            yield _gauge("carwash_outbox_backlog_events", "Outbox events waiting for the cloud",
                         value=st["backlog"])
            yield _gauge("carwash_outbox_backlog_bytes", "Bytes of the outbox events waiting",
                         value=st["pending_bytes"])
            yield _counter("carwash_outbox_sent_events", "Events the cloud accepted", [], [([], st["sent"])])
            yield _counter("carwash_outbox_dead_letters", "Events the cloud refused for good (turned dead letters) "
                           "since the core started", [], [([], st["dead"])])
            yield _counter("carwash_outbox_dropped_events", "Events dropped over the outbox's size cap", [],
                           [([], st["dropped"])])
            cloud_up = bool(st["enabled"]) and st["consecutive_failures"] == 0
            yield _gauge("carwash_cloud_enabled", "1 when a cloud URL is configured", value=float(bool(st["enabled"])))
            yield _gauge("carwash_cloud_up", "1 when the last exchange with the cloud succeeded",
                         value=float(cloud_up))
            yield _gauge("carwash_cloud_consecutive_failures", "Failed cloud exchanges in a row",
                         value=st["consecutive_failures"])
            yield _gauge("carwash_cloud_degraded", "1 when the uplink is degraded (see the Cloud page)",
                         value=float(bool(st["degraded"])))
        if app.bridge is not None:
            yield _gauge("carwash_cloud_bridge_connected", "1 while the MQTT bridge to the cloud is connected",
                         value=float(app.bridge.connected))


def pi_families(pi: dict[str, Any]) -> Iterator[Metric]:
    """The Pi's health (a `PiMonitor.snapshot()`); what this machine does not report is left out."""
    if not pi:
        return
    if pi.get("cpu_temp_c") is not None:
        yield _gauge("carwash_pi_cpu_temperature_celsius", "CPU temperature", value=pi["cpu_temp_c"])
    flags = pi.get("flags")
    if flags is not None:
        yield _gauge("carwash_pi_throttle_flag",
                     "The firmware's get_throttled flags: 1 when set (under_voltage_now, ..._occurred since boot)",
                     ["flag"], [([f], float(bool(flags.get(f)))) for f in THROTTLE_BITS])
    yield _gauge("carwash_pi_data_disk_size_bytes", "Size of the data partition", value=pi["disk_total_bytes"])
    yield _gauge("carwash_pi_data_disk_free_bytes", "Free bytes of the data partition", value=pi["disk_free_bytes"])
    if pi.get("mem_total_bytes") is not None:
        yield _gauge("carwash_pi_memory_total_bytes", "MemTotal", value=pi["mem_total_bytes"])
    if pi.get("mem_available_bytes") is not None:
        yield _gauge("carwash_pi_memory_available_bytes", "MemAvailable", value=pi["mem_available_bytes"])
    if pi.get("uptime_sec") is not None:
        yield _gauge("carwash_pi_uptime_seconds", "Time since the Pi booted", value=pi["uptime_sec"])
    yield _gauge("carwash_pi_attention", "1 when under-voltage was seen or the data partition is nearly full",
                 value=float(bool(pi.get("attention"))))
    unclean = pi.get("last_unclean_stop")
    if unclean and unclean.get("detected_at") is not None:
        yield _gauge("carwash_core_last_unclean_stop_timestamp_seconds",
                     "When the core last found that its previous run had not stopped cleanly, Unix time",
                     value=unclean["detected_at"])


def exposition(app: CoreParts) -> str:
    """The core's metrics in the Prometheus text format."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(CoreCollector(app))
    return generate_latest(registry).decode()
