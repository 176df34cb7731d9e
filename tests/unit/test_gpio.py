"""The status LED and the service button through gpiozero's MockFactory, with the real core
in-process (the mock pins live in this process): LED patterns follow health, a short press opens
the pairing window, a long press issues a one-time recovery code that sets a technician password
once. Without GPIO the core runs and says so once. The pin-factory choice for Pi 4 and Pi 5 (lgpio
from the venv or the system, else native up to the Pi 4) with MockFactory standing in for the
hardware factories, which need a Pi."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Iterator

import pytest

from gateway.access import users
from gateway.core.app import CoreApp
from gateway.core.gpio import GpioUnavailable, board_model, import_lgpio, led_pattern, select_pin_factory
from gateway.core.sdnotify import Notifier
from tests.conftest import Site, make_site
from tests.pi_root import THROTTLED_OK, THROTTLED_UNDER_VOLTAGE, set_throttled, write_pi_root

LED, BUTTON = 17, 27
PI4 = "Raspberry Pi 4 Model B Rev 1.5"
PI5 = "Raspberry Pi 5 Model B Rev 1.0"


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
    # The Pi itself (under-voltage, a nearly full disk) wins over the cloud, not over a PLC.
    pi = {"attention": True, "warnings": ["under-voltage now"]}
    assert led_pattern({"plc": {"bay1": True}, "cloud": False, "cloud_configured": True, "pi": pi}) == "attention"
    assert led_pattern({"plc": {"bay1": False}, "cloud": True, "cloud_configured": True, "pi": pi}) == "fast"


async def _until(pred, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Wait for the core's loop to act (the mock pins call back synchronously, the core's work is
    scheduled on its loop): checked at each turn of the loop, bounded by `timeout`."""
    async with asyncio.timeout(timeout):
        while not pred():
            await asyncio.sleep(0.01)


async def test_led_follows_health_and_the_button_acts(tmp_path, mock_pins, caplog) -> None:  # type: ignore[no-untyped-def]
    root = write_pi_root(tmp_path / "pi", THROTTLED_OK)
    site: Site = make_site(tmp_path / "site", f"[gpio]\nenabled = true\nled_pin = {LED}\nbutton_pin = {BUTTON}\n"
                                              f'[health]\nsys_root = "{root}"\n')
    app = CoreApp(site.config, site.secrets, Notifier({}))
    stop = asyncio.Event()
    task = asyncio.create_task(app.run(stop))
    try:
        await asyncio.wait_for(app.ready.wait(), 10)
        gpio = app.parts.gpio
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
        # The supply sags (recorded get_throttled of a Pi): "attention" until the flags clear.
        pi = app.parts.pi
        set_throttled(root, THROTTLED_UNDER_VOLTAGE)
        await asyncio.to_thread(pi.read)
        await _until(lambda: gpio.pattern == "attention")
        assert gpio.led._blink_thread is not None
        set_throttled(root, THROTTLED_OK)
        await asyncio.to_thread(pi.read)
        await _until(lambda: gpio.pattern == "on")

        # Short press: the pairing window opens.
        assert app.parts.pairing is not None and not app.parts.pairing.is_open
        mock_pins.pin(BUTTON).drive_low()
        mock_pins.pin(BUTTON).drive_high()
        await _until(lambda: app.parts.pairing.is_open)

        # Held 10 s (the mock's hold timer is real time; the button's hold_time is shortened here):
        # a one-time code goes to the log and sets a password once.
        gpio.button.hold_time = 0.05
        with caplog.at_level(logging.WARNING, logger="gateway.access.recovery"):
            mock_pins.pin(BUTTON).drive_low()
            await _until(lambda: gpio.long_presses == 1)
            mock_pins.pin(BUTTON).drive_high()
        assert gpio.presses == 1  # the long press is not also a short one
        code = re.search(r"one-time code (\d{8})", caplog.text).group(1)  # type: ignore[union-attr]
        redeem = app.parts.rpc._methods["recovery.redeem"]
        with pytest.raises(Exception, match="no valid recovery code"):
            await redeem({"code": "00000000" if code != "00000000" else "11111111", "username": "tech",
                          "password": "a-new-password"})
        assert await redeem({"code": code, "username": "tech", "password": "a-new-password"}) == {"username": "tech"}
        with pytest.raises(Exception, match="no valid recovery code"):  # once only
            await redeem({"code": code, "username": "tech", "password": "another-one-123"})
        assert await asyncio.to_thread(users.verify, app.parts.db, "tech", "a-new-password")
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
    with caplog.at_level(logging.WARNING, logger="gateway.core.gpio"):
        task = asyncio.create_task(app.run(stop))
        await asyncio.wait_for(app.ready.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert "GPIO not available" in caplog.text
    assert app.parts.gpio is not None and app.parts.gpio.led is None


def _loader(name: str):  # type: ignore[no-untyped-def]
    """A pin-factory loader that works: a MockFactory standing for the `name` factory."""
    from gpiozero.pins.mock import MockFactory

    return lambda: (MockFactory(), name)


def _missing() -> tuple[object, str]:
    raise ImportError("No module named 'lgpio'")


@pytest.mark.parametrize("model", [PI4, PI5, "Raspberry Pi Compute Module 5 Rev 1.0", "Raspberry Pi 3 Model B Rev 1.2"])
def test_lgpio_is_preferred_on_every_pi(model: str) -> None:
    factory, how = select_pin_factory(model, {}, lgpio=_loader("lgpio"), native=_loader("native"))
    try:
        assert how == "lgpio"
        factory.pin(LED).drive_high()  # a working factory: its pins answer
        assert factory.pin(LED).state
    finally:
        factory.close()


def test_pi4_without_lgpio_falls_back_to_native() -> None:
    factory, how = select_pin_factory(PI4, {}, lgpio=_missing, native=_loader("native"))
    factory.close()
    assert how == "native"


@pytest.mark.parametrize("model", [PI5, "Raspberry Pi Compute Module 5 Rev 1.0"])
def test_pi5_without_lgpio_says_what_to_install(model: str) -> None:
    native_used = []
    with pytest.raises(GpioUnavailable, match=r"needs lgpio \(apt install python3-lgpio.*No module named 'lgpio'"):
        select_pin_factory(model, {}, lgpio=_missing, native=lambda: native_used.append(1))  # type: ignore[arg-type,func-returns-value]
    assert not native_used  # the native factory does not know the Pi 5's RP1


@pytest.mark.parametrize("model", [None, "QEMU Virtual Machine", ""])
def test_not_a_pi_is_unavailable(model: str | None) -> None:
    with pytest.raises(GpioUnavailable, match="not a Raspberry Pi"):
        select_pin_factory(model, {}, lgpio=_loader("lgpio"), native=_loader("native"))


def test_environment_override_uses_gpiozero_factory_by_name() -> None:
    factory, how = select_pin_factory(None, {"GPIOZERO_PIN_FACTORY": "mock"})
    try:
        assert how == "mock (GPIOZERO_PIN_FACTORY)"
        assert type(factory).__name__ == "MockFactory"
    finally:
        factory.close()
    with pytest.raises(GpioUnavailable, match="'nonsense' is not one of gpiozero's pin factories"):
        select_pin_factory(PI5, {"GPIOZERO_PIN_FACTORY": "nonsense"})


def test_board_model_reads_the_device_tree(tmp_path) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "model").write_bytes(PI5.encode() + b"\0")
    assert board_model(tmp_path / "model") == PI5
    assert board_model(tmp_path / "absent") is None


def test_system_lgpio_is_imported_alone_when_the_venv_has_none(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """Raspberry Pi OS's python3-lgpio lives in dist-packages, which the venv does not see: only
    that module (and the extension it imports by name) is taken from there."""
    import sys

    monkeypatch.delitem(sys.modules, "lgpio", raising=False)
    system = tmp_path / "dist-packages"
    system.mkdir()
    (system / "_lgpio.py").write_text("LEVEL = 1\n")
    (system / "lgpio.py").write_text("from _lgpio import LEVEL\n")
    (system / "other.py").write_text("")
    try:
        module, origin = import_lgpio([str(system)])
        assert origin == str(system) and module.LEVEL == 1
        assert sys.modules["lgpio"] is module
        assert str(system) not in sys.path  # nothing else of dist-packages shadows the venv
    finally:
        sys.modules.pop("lgpio", None)
        sys.modules.pop("_lgpio", None)
    with pytest.raises(ImportError, match="no lgpio module"):
        import_lgpio([str(tmp_path / "nowhere")])


async def test_core_logs_the_factory_in_use(tmp_path, mock_pins, caplog) -> None:  # type: ignore[no-untyped-def]
    site: Site = make_site(tmp_path / "site", f"[gpio]\nenabled = true\nled_pin = {LED}\n")
    app = CoreApp(site.config, site.secrets, Notifier({}))
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="gateway.core.gpio"):
        task = asyncio.create_task(app.run(stop))
        await asyncio.wait_for(app.ready.wait(), 10)
        stop.set()
        await asyncio.wait_for(task, 10)
    assert "GPIO pin factory: MockFactory (preset)" in caplog.text
