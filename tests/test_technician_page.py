"""The technician page in headless Chromium (Debian's chromium + chromedriver, driven by Selenium)
against the demo site started by the test: log in, watch a bay wash to DONE, claim a pending device
by its PIN, apply a config to several simulated devices and see the progress reach 100 % with the
simulated failure shown, see a plot, switch to English. With CARWASH_SCREENSHOTS=DIR the screenshots
(the README's pictures: docs/screenshots) go to DIR; a plain run leaves tracked files alone."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sim.procs import stop_process
from tests.conftest import start_demo

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="Debian's chromium and chromium-driver")
SHOTS_ENV = "CARWASH_SCREENSHOTS"
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
    wait = WebDriverWait(d, WAIT)

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

    # The sessions plot has the wash above; the history lists the bulk command.
    d.get(demo.url + "/money")
    charts = d.find_elements(By.CSS_SELECTOR, "svg.chart")
    assert len(charts) == 3 and charts[1].find_elements(By.CSS_SELECTOR, "rect")
    shot(d, "money")
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
