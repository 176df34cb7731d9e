"""The outbox through the real core to the cloud simulator: registrations, event logs and command
results reach the cloud once and in per-device order across a cloud outage and a kill -9 of the
core in the middle of a delivery."""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.access.signing import http_signature
from gateway.store import open_database
from gateway.store.models import OutboxEvent
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY, ensure_demo_user
from tests.clients import http_json
from tests.conftest import Proc, Site, make_site, start_process
from tests.test_commands_e2e import token_for
from web.context import STATUS_CONNECTED

KEY = "modernchabackdoor"  # the demo site's device key (the spec's test vector)


def signed_post(site: Site, path: str, body: dict[str, Any]) -> dict[str, Any]:
    raw = json.dumps(body).encode()
    code, answer = http_json(site.web_url + path, method="POST", data=raw,
                             headers={"Content-Type": "application/json", "x-signature": http_signature(raw, KEY)})
    assert code in (200, 201), answer
    return answer  # type: ignore[no-any-return]


def upload(site: Site, device: str, t0: int, n: int) -> None:
    items = [{"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": t0 + i, "total_amount": 20,
              "bank": {"20": 1}, "coin": {}} for i in range(n)]
    signed_post(site, "/api/v1/device-event-logs/uploads", {"device_id": device, "items": items})


def outbox(site: Site) -> list[OutboxEvent]:
    db = open_database(site.config.paths.database)
    try:
        return list(OutboxEvent.select().order_by(OutboxEvent.seq))
    finally:
        db.close()


def all_sent(site: Site) -> bool:
    """Checked by CloudSim.wait_for after each request it serves and at least every 0.5 s."""
    return all(r.state == "sent" for r in outbox(site))


def assert_delivered_once_in_order(site: Site, sim: CloudSim) -> None:
    rows = outbox(site)
    assert rows and all(r.state == "sent" for r in rows), {r.state for r in rows}
    ids = sim.event_ids()
    assert len(ids) == len(set(ids))  # unique as recorded by the cloud
    assert {r.event_id for r in rows} <= set(ids)
    parts = sim.partitions()
    for dev in {r.partition for r in rows if r.partition}:
        mine = [r.event_id for r in rows if r.partition == dev]
        assert [i for i in parts.get(dev, []) if i in set(mine)] == mine, dev


@dataclass
class CloudSite:
    """A site uplinked to a cloud simulator, with its core and web running (restartable)."""

    sim: CloudSim
    site: Site
    core: Proc | None = None
    web: Proc | None = None


@contextlib.contextmanager
def cloud_site(tmp_path: Path, extra_toml: str = "", mark_sent_delay_sec: float = 0.2) -> Iterator[CloudSite]:
    sim = CloudSim(DEMO_CLOUD_KEY, site_id="demo-site").start()
    cs = CloudSite(sim, make_site(tmp_path / "site", f'[cloud]\nurl = "{sim.url}"\n[outbox]\nbackoff_min_sec = 0.05\n'
                                                     f"mark_sent_delay_sec = {mark_sent_delay_sec}\n"
                                                     "backoff_max_sec = 1\n" + extra_toml))
    try:
        cs.core = start_process(cs.site, "core")
        cs.web = start_process(cs.site, "web")
        cs.web.notify.wait_for("STATUS=" + STATUS_CONNECTED, 20)
        ensure_demo_user(cs.site.config_path)
        yield cs
    finally:
        if cs.web is not None:
            cs.web.stop()
        rc = cs.core.stop() if cs.core is not None else 0
        sim.stop()
    assert rc == 0


def test_outage_and_kill_9_mid_delivery(tmp_path: Path) -> None:
    with cloud_site(tmp_path, "[devices]\ncommand_timeout_sec = 1.0\n") as cs:
        sim, site = cs.sim, cs.site
        devices = []
        for i in range(4):
            body = {"chip_id": f"C0FFEE{i:02X}", "mac_address": f"24:0A:C4:00:01:{i:02X}",
                    "firmware_version": "car_wash_v1.00"}
            devices.append(signed_post(site, "/api/v1/devices/need-register", body)["data"]["device_id"])
        t0 = int(time.time() * 1000)
        for d in devices:
            upload(site, d, t0, 5)
        sim.wait_for(lambda s: all_sent(site), 20)
        assert_delivered_once_in_order(site, sim)

        # The cloud goes away: uploads, a second round and command results pile up in the outbox.
        sim.go_away()
        for d in devices:
            upload(site, d, t0 + 100, 5)
        auth = token_for(site)
        code, body = http_json(site.web_url + "/api/v1/devices/bulk-restart", method="POST",
                               body={"device_ids": devices}, headers=auth)
        assert code == 200, body
        results = lambda: sum(1 for r in outbox(site) if r.type == "command.result")  # noqa: E731
        deadline = time.monotonic() + 15
        while results() < len(devices):  # the silent devices time out after 1 s
            assert time.monotonic() < deadline, "command results not written"
            time.sleep(0.1)
        assert any(r.state == "pending" for r in outbox(site))
        # Back, but the cloud holds its answer to the first batch it records: kill -9 of the core then.
        sim.stall(after_processing=True)
        sim.come_back()
        sim.wait_for(lambda s: s.stats()["held"] >= 1, 20)
        assert cs.core is not None
        cs.core.popen.send_signal(signal.SIGKILL)
        cs.core.popen.wait(10)
        cs.core.notify.close()
        cs.core = None
        sim.release()
        sim.clear()
        cs.core = start_process(site, "core")
        sim.wait_for(lambda s: all_sent(site), 30)
        assert_delivered_once_in_order(site, sim)
        assert sim.duplicates >= 1  # the batch in flight at the kill was sent again, and counted once
        kinds = {e["type"] for e in sim.events()}
        assert {"device.registered", "device.event_logs", "command.result"} <= kinds, kinds


def test_dead_letters_are_listed_requeued_and_discarded(tmp_path: Path) -> None:
    with cloud_site(tmp_path) as cs:
        sim, site = cs.sim, cs.site
        auth = token_for(site)
        sim.stall()  # hold deliveries until the poison is set
        devices = []
        for i in range(2):
            body = {"chip_id": f"DEAD00{i:02X}", "mac_address": f"24:0A:C4:00:05:{i:02X}",
                    "firmware_version": "car_wash_v1.00"}
            devices.append(signed_post(site, "/api/v1/devices/need-register", body)["data"]["device_id"])
        rows = outbox(site)
        sim.poison([r.event_id for r in rows])
        sim.release()
        sim.wait_for(lambda s: all(r.state == "dead" for r in outbox(site)), 20)
        code, st = http_json(site.web_url + "/api/v1/outbox/state", headers=auth)
        assert code == 200 and st["data"]["dead_total"] >= len(rows)
        # The first is sent again (the cloud accepts it now), the second discarded.
        sim.clear()
        code, body = http_json(site.web_url + "/api/v1/outbox/requeue", method="POST", body={"seq": [rows[0].seq]},
                               headers=auth)
        assert code == 200 and body["data"]["changed"] == 1
        code, body = http_json(site.web_url + "/api/v1/outbox/discard", method="POST", body={"seq": [rows[1].seq]},
                               headers=auth)
        assert code == 200 and body["data"]["changed"] == 1
        sim.wait_for(lambda s: rows[0].event_id in s.event_ids(), 20)
        # Marked sent shortly after delivery (mark_sent_delay_sec).
        sim.wait_for(lambda s: {r.seq: r.state for r in outbox(site)}.get(rows[0].seq) == "sent", 20)
        assert rows[1].seq not in {r.seq for r in outbox(site)}
        code, body = http_json(site.web_url + "/api/v1/outbox/requeue", method="POST", body={"seq": "all"},
                               headers=auth)
        assert code == 400


def test_delivered_events_are_not_shown_as_waiting_before_their_marks(tmp_path: Path) -> None:
    """With sent marks deferred (here 600 s), what the technician and `status` call waiting is the
    drainer's backlog, not the rows still unmarked in the database."""
    import re

    import requests

    from tests.test_ops_cli import run

    with cloud_site(tmp_path, mark_sent_delay_sec=600) as cs:
        sim, site = cs.sim, cs.site
        for i in range(3):
            body = {"chip_id": f"AB1E00{i:02X}", "mac_address": f"24:0A:C4:00:07:{i:02X}",
                    "firmware_version": "car_wash_v1.00"}
            signed_post(site, "/api/v1/devices/need-register", body)
        ids = {r.event_id for r in outbox(site)}
        sim.wait_for(lambda s: ids <= set(s.event_ids()), 20)
        assert {r.state for r in outbox(site)} == {"pending"}  # delivered, not yet marked
        page = requests.Session()
        page.cookies.set("lang", "en")
        page.get(site.web_url + "/login", timeout=10)
        page.post(site.web_url + "/login", timeout=10, data={
            "username": "demo", "password": "demo", "csrf": page.cookies["cw_csrf"], "next": "/cloud"})
        waiting = lambda: re.search(r"Events waiting: (\d+)", page.get(site.web_url + "/cloud", timeout=10).text)  # noqa: E731
        deadline = time.monotonic() + 15  # the core republishes its health every 2 s when it changed
        while (m := waiting()) is None or m.group(1) != "0":
            assert time.monotonic() < deadline, m and m.group(0)
            time.sleep(0.2)
        st = run(site, "status")
        assert "backlog 0" in st.stdout and f"outbox: {len(ids)} events not marked sent" in st.stdout, st.stdout
    assert {r.state for r in outbox(site)} == {"sent"}  # marked at the orderly stop
