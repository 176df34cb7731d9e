"""GET /metrics and the Pi's health against one real site started once for the module: the core
and gunicorn, a project PLC process on Modbus TCP (bay1 answers; bay9 sits past its registers, so
every poll gets an exception reply), a second bus with nothing behind it, and a recorded Pi tree
(under-voltage now) as `health.sys_root`. The scrape is parsed with prometheus_client's parser."""

from __future__ import annotations

import http.client
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from sim.demo import ensure_demo_user, free_port
from tests.clients import http_json
from tests.conftest import Proc, Site, make_site, start_process
from tests.pi_root import write_pi_root
from tests.plcs import ProcessPlc, make_plc
from web.context import STATUS_CONNECTED
from web.metrics import allowed

TOKEN = "scrape-token-0123456789abcdef"


@dataclass
class Rig:
    site: Site
    core: Proc
    web: Proc


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("metrics")
    root = write_pi_root(tmp / "pi")
    plc_port, dead_port = free_port(), free_port()
    extra = (f'[health]\nsys_root = "{root}"\n'
             '[metrics]\nallow = ["127.0.0.1"]\n'
             f'[[buses]]\nname = "lan"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {plc_port}\n'
             f'[[buses]]\nname = "dead"\ntype = "tcp"\nhost = "127.0.0.1"\nport = {dead_port}\n'
             '[[bays]]\nid = "bay1"\nbus = "lan"\nunit = 1\nbase = 0\n'
             '[[bays]]\nid = "bay9"\nbus = "lan"\nunit = 1\nbase = 4000\n'
             '[[bays]]\nid = "bay5"\nbus = "dead"\nunit = 1\nbase = 0\n')
    site = make_site(tmp / "site", extra)
    with (site.dir / "secrets.toml").open("a") as f:
        f.write(f'metrics_token = "{TOKEN}"\n')
    plc = make_plc("project", tmp / "plc", bays=[("bay1", 1, 0)], tcp=("127.0.0.1", plc_port), process=True)
    assert isinstance(plc, ProcessPlc)
    plc.start_blocking()
    core = start_process(site, "core")
    web = start_process(site, "web")
    try:
        web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        ensure_demo_user(site.config_path)
        yield Rig(site, core, web)
    finally:
        web.stop()
        core.stop()
        plc.stop_blocking()


def get(site: Site, path: str, *, source: str = "127.0.0.1", headers: dict[str, str] | None = None,
        ) -> tuple[int, str, str]:
    """(status, content type, body) of a GET sent from the loopback address `source`."""
    conn = http.client.HTTPConnection("127.0.0.1", site.web_port, timeout=15, source_address=(source, 0))
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
    finally:
        conn.close()


def scrape(site: Site) -> dict[str, list[Sample]]:
    status, ctype, text = get(site, "/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4"), (status, text[:300])
    types = re.findall(r"^# TYPE (\S+) ", text, re.M)
    assert len(types) == len(set(types)), "a family appears twice in one exposition"
    return {fam.name: fam.samples for fam in text_string_to_metric_families(text)}


def value(fams: dict[str, list[Sample]], name: str, **labels: str) -> float:
    for s in (s for samples in fams.values() for s in samples):
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise KeyError(f"{name}{labels}")


def scrape_until(site: Site, ready: str, timeout: float = 15.0) -> dict[str, list[Sample]]:
    """Scrape until `ready` (a sample's name and labels, as in the exposition) is above zero."""
    name, _, rest = ready.partition("{")
    labels = dict(re.findall(r'(\w+)="([^"]*)"', rest))
    deadline = time.monotonic() + timeout
    while True:
        fams = scrape(site)
        try:
            if value(fams, name, **labels) > 0:
                return fams
        except KeyError:
            pass
        assert time.monotonic() < deadline, f"{ready} stayed 0"
        time.sleep(0.2)


def test_one_scrape_target_for_core_and_web(rig: Rig) -> None:
    site = rig.site
    assert http_json(site.web_url + "/api/health")[0] == 200
    fams = scrape_until(site, 'carwash_modbus_poll_errors_total{bay="bay9",kind="exception"}')
    fams = scrape_until(site, 'carwash_modbus_poll_errors_total{bay="bay5",kind="disconnected"}')
    fams = scrape_until(site, 'carwash_modbus_polls_total{bay="bay1"}')
    assert value(fams, "carwash_core_up") == 1
    # Modbus per bus and per bay; bay states.
    assert value(fams, "carwash_modbus_transactions_total", bus="lan") > 0
    assert value(fams, "carwash_modbus_bus_connected", bus="lan") == 1
    assert value(fams, "carwash_modbus_bus_connected", bus="dead") == 0
    assert value(fams, "carwash_modbus_poll_errors_total", bus="lan", bay="bay1", kind="exception") == 0
    assert value(fams, "carwash_bay_state", bay="bay5", state="OFFLINE") == 1
    assert value(fams, "carwash_bay_state", bay="bay1", state="IDLE") == 1
    # MQTT by role (the web is the gateway's own client), commands, uplink, HTTP by route.
    assert value(fams, "carwash_mqtt_connections", role="internal") >= 1
    assert value(fams, "carwash_mqtt_messages_received_total", role="internal") >= 1  # the RPC requests
    assert value(fams, "carwash_devices_online") == 0
    assert value(fams, "carwash_mqtt_refusals_total", reason="login") == 0  # there before the first one
    assert "carwash_command_ack_latency_seconds" in fams and "carwash_outbox_backlog_events" in fams
    assert value(fams, "carwash_http_requests_total", route="/api/health", method="GET", status="200") >= 1
    assert value(fams, "carwash_http_request_duration_seconds_count", route="/api/health", method="GET") >= 1
    assert value(fams, "carwash_database_size_bytes") > 0 and "carwash_database_wal_size_bytes" in fams
    assert value(fams, "carwash_outbox_oldest_pending_age_seconds") >= 0
    # Both processes in one family; the recorded Pi.
    for process in ("core", "web"):
        assert value(fams, "carwash_process_disk_written_bytes_total", process=process) >= 0
        assert value(fams, "carwash_process_cpu_seconds_total", process=process) > 0
    assert value(fams, "carwash_pi_throttle_flag", flag="under_voltage_now") == 1
    assert value(fams, "carwash_pi_cpu_temperature_celsius") == pytest.approx(61.2)
    assert value(fams, "carwash_pi_attention") == 1
    # Bounded labels: no request, device or session ids.
    for samples in fams.values():
        for s in samples:
            for v in s.labels.values():
                assert not re.search(r"[0-9a-f]{8}-[0-9a-f]{4}|\d{8}-\d{6}", v), (s.name, v)


def test_scrape_access_allow_list_and_token(rig: Rig) -> None:
    site = rig.site
    status, _, body = get(site, "/metrics", source="127.0.0.2")  # loopback, but not in metrics.allow
    assert status == 403 and "metrics.allow" in body
    assert get(site, "/metrics", source="127.0.0.2", headers={"Authorization": "Bearer wrong-token-0123456"})[0] == 403
    assert get(site, "/metrics", source="127.0.0.2", headers={"Authorization": f"Bearer {TOKEN}"})[0] == 200
    assert allowed("10.8.3.4", "", ("127.0.0.1", "10.8.0.0/16"), "")
    assert allowed("::ffff:127.0.0.1", "", ("127.0.0.1",), "")
    assert not allowed("10.9.0.1", "", ("10.8.0.0/16",), "")
    assert not allowed("10.9.0.1", "Bearer ", ("10.8.0.0/16",), "")  # no token configured: none accepted


def test_pi_health_on_the_api_the_overview_and_status(rig: Rig) -> None:
    site = rig.site
    code, body = http_json(site.web_url + "/api/v1/auth/login", method="POST",
                           body={"username": "demo", "password": "demo"})
    assert code == 200, body
    auth = {"Authorization": "Bearer " + body["data"]["token"]}
    assert http_json(site.web_url + "/api/v1/health/pi")[0] == 401
    code, pi = http_json(site.web_url + "/api/v1/health/pi", headers=auth)
    assert code == 200 and pi["available"] and pi["attention"] and pi["flags"]["under_voltage_now"], pi
    assert pi["cpu_temp_c"] == 61.2 and pi["mem_total_bytes"] == 3884084 * 1024
    assert pi["last_unclean_stop"] is None  # a fresh site
    assert (site.dir / "core.running").is_file()  # the running core's marker (an unclean stop leaves it)
    assert any("under-voltage now" in w for w in pi["warnings"])
    # The overview (the page's session cookie) warns.
    status, _, html = get(site, "/", headers={"Cookie": f"cw_token={body['data']['token']}; lang=en"})
    assert status == 200 and "under-voltage now" in html and "UNDER-VOLTAGE NOW" in html and "61.2 °C" in html, \
        html[:500]


def test_a_silent_core_still_gives_the_web_metrics(rig: Rig) -> None:
    assert rig.core.stop() == 0  # the last test using the rig: its stop is then a no-op
    assert not (rig.site.dir / "core.running").exists()  # an orderly stop removes the marker
    fams = scrape(rig.site)
    assert value(fams, "carwash_core_up") == 0
    assert value(fams, "carwash_process_cpu_seconds_total", process="web") > 0
    assert "carwash_modbus_polls" not in fams


def test_command_outcomes_and_ack_latency_as_families() -> None:
    """The counters the command tracker keeps for the collector (no devices on the module's site)."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.registry import Collector

    from gateway.commands.tracker import Ack, DeviceResult, Tracked, Tracker
    from gateway.core.metrics import histogram
    from gateway.metrics_hist import Buckets

    tr = Tracker()
    t = Tracked("cmd-x", "APPLY_CONFIG", True, {}, 30.0, results={d: DeviceResult() for d in ("d1", "d2", "d3")})
    tr.add(t)
    tr.arm("cmd-x", 100.0)
    tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 1000)
    tr.ack(Ack("cmd-x", "d1", "APPLY_CONFIG", "SUCCESS"), 1001)  # a duplicate: ignored, not an outcome
    tr.ack(Ack("cmd-x", "d2", "APPLY_CONFIG", "FAILED", error="bad"), 2000)
    tr.expire(100.0, 3000)
    assert tr.outcomes == {("APPLY_CONFIG", "SUCCESS"): 1, ("APPLY_CONFIG", "FAILED"): 1,
                           ("APPLY_CONFIG", "TIMEOUT"): 1}
    b = Buckets((0.1, 1.0))
    for v in (0.05, 0.1, 0.7, 5.0):
        b.observe(v)

    class One(Collector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield histogram("carwash_command_ack_latency_seconds", "test", b)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(One())
    (fam,) = text_string_to_metric_families(generate_latest(registry).decode())
    got = {s.labels.get("le", s.name): s.value for s in fam.samples}
    assert got == {"0.1": 2, "1.0": 3, "+Inf": 4, "carwash_command_ack_latency_seconds_count": 4,
                   "carwash_command_ack_latency_seconds_sum": pytest.approx(5.85)}
