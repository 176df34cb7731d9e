"""Payment figures (the cloud issue): create latency through the gateway minus the cloud's own.

The cloud simulator runs in this process; a real core and gunicorn. The same signed request is
sent N times to the simulator directly (with the site's key) and through the gateway (with the
device key: signature check, validation, the forwarded call, the EMV check, the stored charge
with its outbox event, the RPC telling the core). The difference of the medians is what the
gateway adds.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import time
from pathlib import Path

from bench.common import Result, start_notified
from gateway.access.signing import http_signature
from sim.cloud import CloudSim
from sim.demo import DEMO_CLOUD_KEY, free_port, write_demo_site
from sim.procs import gateway_command, stop_process

NAME = "payments"
DEVICE_KEY = "modernchabackdoor"


def _timed_posts(port: int, path: str, body: bytes, key: str, n: int) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    out = []
    headers = {"Content-Type": "application/json", "x-signature": http_signature(body, key)}
    try:
        for _ in range(n):
            t0 = time.perf_counter()
            conn.request("POST", path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            out.append((time.perf_counter() - t0) * 1000)
            if r.status != 200:
                raise RuntimeError(f"{path}: {r.status} {data[:200]!r}")
    finally:
        conn.close()
    return out


def run(quick: bool) -> list[Result]:
    n = 100 if quick else 500
    sim = CloudSim(DEMO_CLOUD_KEY, site_id="demo-site").start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-payments-") as d:
            tmp = Path(d)
            web_port, mqtt_port = free_port(), free_port()
            cfg = write_demo_site(tmp / "site", web_port=web_port, mqtt_port=mqtt_port,
                                  extra_toml=f'[cloud]\nurl = "{sim.url}"\n')
            core, cn = start_notified(gateway_command("core", "--config", str(cfg)), tmp, "core")
            web, wn = start_notified(gateway_command("web", "--config", str(cfg)), tmp, "web", wait_connected=True)
            try:
                reg = json.dumps({"chip_id": "BE7C0001", "mac_address": "24:0A:C4:00:04:01",
                                  "firmware_version": "car_wash_v1.00"}).encode()
                c = http.client.HTTPConnection("127.0.0.1", web_port, timeout=30)
                c.request("POST", "/api/v1/devices/need-register", body=reg,
                          headers={"Content-Type": "application/json", "x-signature": http_signature(reg, DEVICE_KEY)})
                device = json.loads(c.getresponse().read())["data"]["device_id"]
                c.close()
                body = json.dumps({"device_id": device, "amount": 2000, "payment_method": "QR_PROMPT_PAY",
                                   "description": "bench"}).encode()
                path = "/api/v1/payment-gateway/payments"
                direct = _timed_posts(sim.port, path, body, DEMO_CLOUD_KEY, n)
                through = _timed_posts(web_port, path, body, DEVICE_KEY, n)
            finally:
                stop_process(web)  # type: ignore[arg-type]
                stop_process(core)  # type: ignore[arg-type]
                wn.close()
                cn.close()
    finally:
        sim.stop()
    direct_r = Result(NAME, "payment create: cloud simulator alone", "ms", direct, notes=f"{n} sequential requests")
    through_r = Result(NAME, "payment create: through the gateway", "ms", through, notes=f"{n} sequential requests")
    added = through_r.median - direct_r.median
    return [direct_r, through_r,
            Result(NAME, "payment create: added by the gateway (median difference)", "ms", [added], median=added)]


if __name__ == "__main__":
    from bench.common import table

    print(table(run(quick=True)))
