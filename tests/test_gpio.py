"""The status LED and the service button through gpiozero's MockFactory, with the real core
in-process (the mock pins live in this process): LED patterns follow health, a short press opens
the pairing window, a long press issues a one-time recovery code that sets a technician password
once. Without GPIO the core runs and says so once."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import pytest

from gateway import users
from gateway.core.app import CoreApp
from gateway.gpio import led_pattern
from gateway.sdnotify import Notifier
from tests.conftest import Site, make_site

LED, BUTTON = 17, 27


@pytest.fixture
def mock_pins() -> Iterator[object]:
    from gpiozero import Device
    from gpiozero.pins.mock import MockFactory

    Device.pin_factory = MockFactory()
    try:
        yield Device.pin_factory
    finally:
        Device.pin_factory.reset()
        Device.pin_factory.close()
        Device.pin_factory = None


def test_led_pattern_rules() -> None:
    assert led_pattern({"plc": {"bay1": True}, "cloud": True, "cloud_configured": True}) == "on"
    assert led_pattern({"plc": {"bay1": True}, "cloud": False, "cloud_configured": False}) == "on"
    assert led_pattern({"plc": {"bay1": True}, "cloud": False, "cloud_configured": True}) == "slow"
    assert led_pattern({"plc": {"bay1": False}, "cloud": False, "cloud_configured": True}) == "fast"


async def _until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for the core's loop to act (the mock pins call back synchronously, the core's work is
    scheduled on its loop): checked at each turn of the loop, bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def test_led_follows_health_and_the_button_acts(tmp_path, mock_pins, caplog) -> None:  # type: ignore[no-untyped-def]
    site: Site = make_site(tmp_path / "site", f"[gpio]\nenabled = true\nled_pin = {LED}\nbutton_pin = {BUTTON}\n")
    app = CoreApp(site.config, site.secrets, Notifier({}))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        gpio = app.gpio
        assert gpio is not None and gpio.led is not None
        await _until(lambda: gpio.pattern == "on")
        assert mock_pins.pin(LED).state  # lit
        # A bay goes offline: fast blink; the cloud is down instead: slow blink.
        app._on_plc_health({"bay1": False})
        await _until(lambda: gpio.pattern == "fast")
        assert gpio.led._blink_thread is not None  # gpiozero blinks on a thread of its own
        app._on_plc_health({"bay1": True})
        app.health.cloud_configured, app.health.cloud = True, False
        await _until(lambda: gpio.pattern == "slow")
        app.health.cloud_configured = False
        await _until(lambda: gpio.pattern == "on")

        # Short press: the pairing window opens.
        assert app.pairing is not None and not app.pairing.is_open
        mock_pins.pin(BUTTON).drive_low()
        mock_pins.pin(BUTTON).drive_high()
        await _until(lambda: app.pairing.is_open)

        # Held 10 s (the mock's hold timer is real time; the button's hold_time is shortened here):
        # a one-time code goes to the log and sets a password once.
        gpio.button.hold_time = 0.05
        with caplog.at_level(logging.WARNING, logger="gateway.recovery"):
            mock_pins.pin(BUTTON).drive_low()
            await _until(lambda: gpio.long_presses == 1)
            mock_pins.pin(BUTTON).drive_high()
        assert gpio.presses == 1  # the long press is not also a short one
        code = re.search(r"one-time code (\d{8})", caplog.text).group(1)  # type: ignore[union-attr]
        redeem = app.rpc._methods["recovery.redeem"]
        with pytest.raises(Exception, match="no valid recovery code"):
            await redeem({"code": "00000000" if code != "00000000" else "11111111", "username": "tech",
                          "password": "a-new-password"})
        assert await redeem({"code": code, "username": "tech", "password": "a-new-password"}) == {"username": "tech"}
        with pytest.raises(Exception, match="no valid recovery code"):  # once only
            await redeem({"code": code, "username": "tech", "password": "another-one-123"})
        assert await asyncio.to_thread(users.verify, app.db, "tech", "a-new-password")
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
    assert mock_pins.pin(LED).state == 0  # released at stop: off


async def test_no_gpio_is_a_logged_no_op(tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    from gpiozero import Device

    site = make_site(tmp_path / "site", f"[gpio]\nenabled = true\nled_pin = {LED}\n")
    Device.pin_factory = None
    app = CoreApp(site.config, site.secrets, Notifier({}))
    stop = asyncio.Event()
    with caplog.at_level(logging.WARNING, logger="gateway.gpio"):
        task = asyncio.create_task(app.run(stop))
        await asyncio.wait_for(app.ready.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert "GPIO not available" in caplog.text
    assert app.gpio is not None and app.gpio.led is None
