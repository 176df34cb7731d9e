"""The technician page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against the demo site started by the test: log in, watch a bay wash to DONE, claim a pending device
by its PIN, apply a config to several simulated devices and see the progress reach 100 % with the
simulated failure shown, read the Money charts (data drawn, axis values and units in Thai and
English, hover values, range picker) and an export, switch to English. With CARWASH_SCREENSHOTS=DIR
the screenshots (the README's pictures: docs/screenshots) go to DIR; a plain run leaves tracked
files alone."""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shutil
import signal
import subprocess
import zoneinfo
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sim.procs import stop_process
from tests.clients import http_json
from tests.conftest import start_demo

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver")
SHOTS_ENV = "CARWASH_SCREENSHOTS"
BY_CSS = "css selector"  # selenium's By.CSS_SELECTOR, for the helpers below (selenium is imported lazily)
WAIT = 60  # a demo wash lasts 30 s


@dataclass
class Demo:
    url: str
    proc: subprocess.Popen[str]


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    data = tmp_path / "site"
    proc, text = start_demo(data)
    try:
        m = re.search(r"^web: (http://127\.0\.0\.1:\d+)/$", text, re.M)
        assert m, text
        yield Demo(m.group(1), proc)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    finally:
        stop_process(proc)
        if proc.stdout:
            proc.stdout.close()


@pytest.fixture
def browser() -> Iterator[object]:
    from selenium import webdriver

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # type: ignore[assignment]
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,1000", "--lang=th"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def shot(driver, name: str) -> None:  # type: ignore[no-untyped-def]
    if not (where := os.environ.get(SHOTS_ENV)):
        return
    Path(where).mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(Path(where) / f"{name}.png"))


def test_technician_flows(demo: Demo, browser) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    d = browser
    from selenium.common.exceptions import StaleElementReferenceException

    # A page that reloads itself after an action (location.reload) can swap an element under a
    # waiting condition: look again instead of failing.
    wait = WebDriverWait(d, WAIT, ignored_exceptions=(StaleElementReferenceException,))

    # Not logged in: the login form; a wrong password says so; then log in.
    d.get(demo.url + "/")
    assert "/login" in d.current_url
    d.find_element(By.ID, "username").send_keys("demo")
    d.find_element(By.ID, "password").send_keys("wrong")
    d.find_element(By.ID, "login-button").click()
    # The form posts and the page reloads: wait for the answer, not for click() to return.
    error = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".error")))
    assert error.text  # Thai message, the default language
    d.find_element(By.ID, "username").clear()
    d.find_element(By.ID, "username").send_keys("demo")
    d.find_element(By.ID, "password").send_keys("demo")
    shot(d, "login")
    d.find_element(By.ID, "login-button").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".tile")))

    # A bay washes to DONE, watched live on its tile.
    tile = d.find_element(By.CSS_SELECTOR, '.tile[data-bay="bay1"]')
    wait.until(lambda _: tile.find_element(By.CSS_SELECTOR, ".bay-state").text == "IDLE")
    tile.find_element(By.CSS_SELECTOR, ".bay-start").click()
    wait.until(ec.alert_is_present()).accept()
    wait.until(lambda _: tile.find_element(By.CSS_SELECTOR, ".bay-state").text == "WASHING")
    shot(d, "overview")
    wait.until(lambda _: tile.find_element(By.CSS_SELECTOR, ".bay-state").text == "DONE")
    assert tile.find_element(By.CSS_SELECTOR, ".bay-progress").get_attribute("value") == "100"

    # Claim a pending device by the PIN it shows.
    d.get(demo.url + "/devices")
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "tr[data-device]")))
    device_id, pin = row.get_attribute("data-device"), row.find_element(By.CSS_SELECTOR, ".pin").text
    assert re.fullmatch(r"\d{4}", pin)
    row.find_element(By.CSS_SELECTOR, ".claim-name").clear()
    row.find_element(By.CSS_SELECTOR, ".claim-name").send_keys("Box A")
    row.find_element(By.CSS_SELECTOR, ".claim-pin").send_keys(pin)
    shot(d, "devices")
    row.find_element(By.CSS_SELECTOR, ".claim").click()
    wait.until(lambda drv: any(a.text == "Box A" for a in drv.find_elements(By.CSS_SELECTOR, "a[href^='/devices/']")))
    assert not d.find_elements(By.CSS_SELECTOR, f'tr[data-device="{device_id}"]')

    # One config to every car-wash box (one in three of the demo's devices answers FAILED).
    d.get(demo.url + "/bulk")
    from selenium.webdriver.support.ui import Select

    Select(d.find_element(By.ID, "type-filter")).select_by_value("CAR_WASH")
    d.find_element(By.ID, "select-all").click()
    picked = int(d.find_element(By.ID, "picked-count").text)
    assert picked >= 3
    form = d.find_element(By.CSS_SELECTOR, '.bulk-config[data-type="CAR_WASH"]')
    foam = form.find_element(By.ID, "configs.function.sec_per_baht.FOAM")
    foam.clear()
    foam.send_keys("12")
    form.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    op = d.find_element(By.ID, "bulk-op")
    wait.until(lambda _: op.get_attribute("data-complete") == "1")
    assert op.get_attribute("data-progress") == "100"
    assert op.find_element(By.CSS_SELECTOR, ".op-progress").get_attribute("value") == "100"
    results = op.find_elements(By.CSS_SELECTOR, ".op-results li")
    assert len(results) == picked
    failed = [r for r in results if "s-FAILED" in (r.get_attribute("class") or "")]
    assert failed and "simulated failure" in failed[0].text
    assert any("s-SUCCESS" in (r.get_attribute("class") or "") for r in results)
    d.execute_script("arguments[0].scrollIntoView()", op)
    shot(d, "bulk")

    # A config the schema refuses: the message sits next to the field.
    d.get(demo.url + f"/devices/{device_id}")
    on_time = d.find_element(By.ID, "configs.machine.ON_TIME")
    d.execute_script("arguments[0].removeAttribute('pattern'); arguments[0].value = '25:99';", on_time)
    d.find_element(By.CSS_SELECTOR, "#config-form button[type=submit]").click()
    err = d.find_element(By.CSS_SELECTOR, '.field-error[data-for="configs.machine.ON_TIME"]')
    wait.until(lambda _: "ON_TIME" in err.text)
    shot(d, "device")

    # Money (issue 21): payments of the past week uploaded as the claimed device would, then the
    # charts read back from the page: data drawn, axis values and units readable, hover values.
    uploaded = upload_week(demo.url, device_id)
    d.get(demo.url + "/money")
    figs = {k: d.find_element(By.ID, f"chart-{k}") for k in ("revenue", "sessions", "errors")}
    shown = read_charts(d, wait, figs, "7d")
    api_sums = d.execute_async_script(
        "fetch('/api/v1/reports/money?range=7d').then(r => r.json()).then(j => arguments[0]("
        "{cash: j.data.revenue.cash.reduce((a, b) => a + b, 0), qr: j.data.revenue.qr.reduce((a, b) => a + b, 0)}))")
    assert shown["revenue"]["sums"] == api_sums  # the page draws what the API answers...
    assert api_sums["cash"] >= uploaded["cash"] and api_sums["qr"] >= uploaded["qr"]  # ...which holds the uploads
    assert shown["revenue"]["y_label"] == "บาท" and shown["sessions"]["y_label"] == "ครั้ง"
    assert all(THAI.search(x) for x in shown["revenue"]["x_ticks"]), shown["revenue"]["x_ticks"]  # "7 ธ.ค."
    assert colour_pixels(d, figs["revenue"], (46, 125, 50)) > 20  # the cash series (PALETTE[0]) is on the canvas
    hover_value(d, figs["revenue"])
    shot(d, "money")
    d.find_element(By.CSS_SELECTOR, '.range-picker [data-range="today"]').click()
    shown = read_charts(d, wait, figs, "today")
    assert shown["sessions"]["sums"]["bay1"] >= 1  # the wash watched above, in today's hours
    assert any(re.fullmatch(r"\d\d:00", x) for x in shown["sessions"]["x_ticks"]), shown["sessions"]["x_ticks"]
    csv_file = d.execute_async_script(  # the export as the browser downloads it: bytes, then text
        "fetch('/api/v1/exports/payments.csv?from=' + arguments[0]).then(r => r.arrayBuffer()).then(b => arguments[1]("
        "{head: Array.from(new Uint8Array(b, 0, 3)), text: new TextDecoder().decode(b)}))", uploaded["first_day"])
    assert csv_file["head"] == [0xEF, 0xBB, 0xBF]  # the UTF-8 BOM Excel needs for Thai
    assert csv_file["text"].startswith("time,device_id,device_name")
    assert csv_file["text"].count(",Box A,") >= uploaded["items"]
    d.get(demo.url + "/commands")
    assert "APPLY_CONFIG" in d.find_element(By.TAG_NAME, "main").text

    # Bus diagnostics: every bay polled, from the core.
    d.get(demo.url + "/diagnostics")
    text = d.find_element(By.TAG_NAME, "main").text
    assert "rs485" in text and "lan" in text and "Bay #1" in text
    last = d.find_element(By.ID, "scan-last")
    last.clear()
    last.send_keys("5")
    d.find_element(By.CSS_SELECTOR, "#scan-form button[type=submit]").click()
    wait.until(lambda drv: len(drv.find_elements(By.CSS_SELECTOR, "#scan-results tr")) == 5)
    answered = d.find_elements(By.CSS_SELECTOR, "#scan-results tr.s-SUCCESS")
    assert len(answered) == 4  # the demo's four RS485 bays; unit 5 is absent
    assert all(any(state in r.text for state in ("IDLE", "DONE", "WASHING")) for r in answered)
    shot(d, "diagnostics")

    # An MQTT account for a dashboard: added, its password changed, removed (issue 17).
    d.get(demo.url + "/mqtt-accounts")
    d.find_element(By.ID, "acct-name").send_keys("lobby-screen")
    d.find_element(By.ID, "acct-pw").send_keys("lobby-screen-pass-1")
    Select(d.find_element(By.ID, "acct-role")).select_by_value("monitor")
    d.find_element(By.CSS_SELECTOR, "#mqtt-account-add button[type=submit]").click()
    row = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, 'tr[data-account="lobby-screen"]')))
    assert "monitor" in row.text
    shot(d, "mqtt_accounts")
    changed_at = row.find_elements(By.TAG_NAME, "td")[2].text
    row.find_element(By.CSS_SELECTOR, ".acct-password").send_keys("lobby-screen-pass-2")
    row.find_element(By.CSS_SELECTOR, ".acct-passwd").click()
    wait.until(lambda drv: drv.find_element(By.CSS_SELECTOR, 'tr[data-account="lobby-screen"]')
               .find_elements(By.TAG_NAME, "td")[2].text != changed_at)
    d.find_element(By.CSS_SELECTOR, 'tr[data-account="lobby-screen"] .acct-remove').click()
    wait.until(lambda drv: not drv.find_elements(By.CSS_SELECTOR, 'tr[data-account="lobby-screen"]'))

    # English on request.
    d.find_element(By.CSS_SELECTOR, "a.lang").click()
    wait.until(lambda drv: drv.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en")
    assert "Command history" in d.find_element(By.TAG_NAME, "nav").text
    d.get(demo.url + "/money")
    figs = {k: d.find_element(By.ID, f"chart-{k}") for k in ("revenue", "sessions", "errors")}
    shown = read_charts(d, wait, figs, "7d")
    assert shown["revenue"]["y_label"] == "baht" and shown["errors"]["y_label"] == "sessions"
    assert all(re.fullmatch(r"\d{1,2} [A-Z][a-z]{2}", x) for x in shown["revenue"]["x_ticks"]), shown["revenue"]
    hover_value(d, figs["sessions"])


THAI = re.compile("[\u0e00-\u0e7f]")


def upload_week(url: str, device_id: str) -> dict[str, Any]:
    """Signed event-log upload for `device_id` (the demo signs with the spec's test key): a cash
    and a QR payment on each of the last seven days of the site (Asia/Bangkok). Returns the totals."""
    from gateway.access.signing import http_signature
    from sim.demo import spec_test_key

    zone = zoneinfo.ZoneInfo("Asia/Bangkok")
    now = dt.datetime.now(zone)
    items: list[dict[str, Any]] = []
    for ago in range(7):
        day = now.date() - dt.timedelta(days=ago)
        at = dt.datetime.combine(day, dt.time(12), zone)
        if ago == 0:
            at = min(at, now - dt.timedelta(minutes=1))  # today's noon may be still to come
        ms = int(at.timestamp() * 1000)
        items.append({"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": ms, "total_amount": 100 * (ago + 1) + 10,
                      "bank": {"20": 0, "50": 0, "100": ago + 1, "500": 0, "1000": 0},
                      "coin": {"1": 0, "2": 0, "5": 0, "10": 1}, "qr": {"chargeId": None, "net_amount": 0}})
        items.append({"type": "PAYMENT", "status": "SUCCEEDED", "timestamp": ms + 1, "total_amount": 40 + ago,
                      "bank": {"20": 0, "50": 0, "100": 0, "500": 0, "1000": 0},
                      "coin": {"1": 0, "2": 0, "5": 0, "10": 0},
                      "qr": {"chargeId": f"CHG-{ago}", "net_amount": 40 + ago}})
    raw = json.dumps({"device_id": device_id, "items": items}).encode()
    headers = {"Content-Type": "application/json", "x-signature": http_signature(raw, spec_test_key())}
    code, body = http_json(url + "/api/v1/device-event-logs/uploads", method="POST", data=raw, headers=headers)
    assert code == 201, body
    return {"cash": sum(100 * (a + 1) + 10 for a in range(7)), "qr": sum(40 + a for a in range(7)), "items": len(items),
            "first_day": (now.date() - dt.timedelta(days=6)).isoformat()}


def read_charts(d, wait, figs: dict[str, Any], range_name: str) -> dict[str, dict[str, Any]]:  # type: ignore[no-untyped-def]
    """What each chart drew for `range_name` (recorded by app.js after each draw): it has points."""
    wait.until(lambda _: all(f.get_attribute("data-range") == range_name for f in figs.values()))
    shown = {}
    for kind, f in figs.items():
        shown[kind] = {"points": int(f.get_attribute("data-points")),
                       "sums": json.loads(f.get_attribute("data-sums")),
                       "x_ticks": json.loads(f.get_attribute("data-x-ticks")),
                       "y_ticks": json.loads(f.get_attribute("data-y-ticks")),
                       "y_label": f.get_attribute("data-y-label")}
        got = shown[kind]
        assert got["points"] > 0 and len(got["x_ticks"]) >= 3 and got["y_ticks"], (kind, got)
        assert f.find_elements(BY_CSS, "canvas"), kind
    return shown


def colour_pixels(d, fig, rgb: tuple[int, int, int]) -> int:  # type: ignore[no-untyped-def]
    """Pixels of exactly `rgb` on the chart's canvas."""
    return int(d.execute_script(
        "const c = arguments[0].querySelector('canvas');"
        "const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;"
        "let n = 0; for (let i = 0; i < px.length; i += 4) if (px[i] === arguments[1] && px[i + 1] === arguments[2]"
        " && px[i + 2] === arguments[3]) n++; return n;", fig, *rgb))


def hover_value(d, fig) -> None:  # type: ignore[no-untyped-def]
    """Over the plot, the legend shows the hovered bucket's date and values."""
    from selenium.webdriver.common.action_chains import ActionChains

    over = fig.find_element(BY_CSS, ".u-over")
    ActionChains(d).move_to_element(over).move_by_offset(over.size["width"] // 2 - 4, 0).perform()
    values = [v.text for v in fig.find_elements(BY_CSS, ".u-legend .u-value")]
    assert values[0] not in ("", "–") and any(re.search(r"\d", v) for v in values[1:]), values
