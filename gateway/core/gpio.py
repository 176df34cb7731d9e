"""The status LED and the service button on the Pi's GPIO (gpiozero), owned by the core.

LED (`gpio.led_pin`): on = everything fine; slow blink (1 s on, 1 s off) = the cloud is
unreachable; "attention", a short flash every 2 s (0.1 s on, 1.9 s off) = the Pi itself needs a
look: under-voltage now or since boot, or the data partition nearly full (`gateway/core/health.py`;
it wins over the cloud); fast blink (0.15 s) = a PLC bus or bay is offline (it wins over all);
off = the core is not running (the LED is released at stop, and a dead process drives nothing).
Button (`gpio.button_pin`, to ground, internal pull-up): a short press opens the device pairing
window for `PAIRING_SEC`; a press held `RECOVERY_HOLD_SEC` starts technician-access recovery (a
one-time login code written to the journal, see `gateway/access/recovery.py`).
Without GPIO (not a Pi, no pin factory) or with `gpio.enabled = false`, everything here is a no-op
logged once. gpiozero calls back on its own thread; the callbacks are handed to the event loop.

Pin factory (`select_pin_factory`, one log line names it): `GPIOZERO_PIN_FACTORY` when set; else
lgpio, from the venv or else the system's `python3-lgpio` (Raspberry Pi OS ships it; the venv does
not see dist-packages); else, on a Pi up to the 4 (BCM283x/BCM2711), gpiozero's pure-Python
`native` factory through /dev/gpiomem. A Pi 5 (RP1) works only with lgpio: without it the core
says so and runs without LED and button.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import threading
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from gateway.config import GpioConfig

log = logging.getLogger(__name__)

PAIRING_SEC = 120
RECOVERY_HOLD_SEC = 10.0
SLOW, FAST, ATTENTION = (1.0, 1.0), (0.15, 0.15), (0.1, 1.9)
CHECK_SEC = 0.5
MODEL_FILE = Path("/proc/device-tree/model")
# Where Debian-style python3-* packages (Raspberry Pi OS's python3-lgpio) put modules.
SYSTEM_DIST_PACKAGES = ("/usr/lib/python3/dist-packages",)


class GpioUnavailable(Exception):
    """No pin factory fits this machine; the message says why and what would fix it."""


def board_model(model_file: Path = MODEL_FILE) -> str | None:
    """The device tree's model string ("Raspberry Pi 5 Model B Rev 1.0"), None when absent."""
    try:
        return model_file.read_bytes().rstrip(b"\0\n").decode("utf-8", "replace") or None
    except OSError:
        return None


def import_lgpio(system_dirs: Sequence[str] = SYSTEM_DIST_PACKAGES) -> tuple[ModuleType, str]:
    """The `lgpio` module and where it came from ("venv" or the system directory).

    The system copy is loaded only when the venv has none, and only that module (with its `_lgpio`
    extension) is taken from there: the rest of dist-packages stays out of `sys.path`. Raises
    ImportError when neither exists."""
    try:
        import lgpio  # type: ignore[import-not-found,unused-ignore]

        return lgpio, "venv"
    except ImportError:
        pass
    for d in system_dirs:
        if not (Path(d) / "lgpio.py").is_file():
            continue
        sys.path.append(d)  # lgpio.py imports its _lgpio extension by name from the same directory
        try:
            spec = importlib.util.spec_from_file_location("lgpio", Path(d) / "lgpio.py")
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            sys.modules["lgpio"] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                sys.modules.pop("lgpio", None)
                raise
            return module, d
        finally:
            sys.path.remove(d)
    raise ImportError("no lgpio module in the venv nor in " + ", ".join(system_dirs))


def _lgpio_factory() -> tuple[Any, str]:
    _, origin = import_lgpio()
    from gpiozero.pins.lgpio import LGPIOFactory

    return LGPIOFactory(), f"lgpio ({'system python3-lgpio' if origin != 'venv' else 'venv'})"


def _native_factory() -> tuple[Any, str]:
    from gpiozero.pins.native import NativeFactory

    return NativeFactory(), "native (pure Python, /dev/gpiomem)"


def _named_factory(name: str) -> tuple[Any, str]:
    from importlib.metadata import entry_points

    for ep in entry_points(group="gpiozero_pin_factories"):
        if ep.name == name.lower():
            return ep.load()(), f"{ep.name} (GPIOZERO_PIN_FACTORY)"
    raise GpioUnavailable(f"GPIOZERO_PIN_FACTORY={name!r} is not one of gpiozero's pin factories")


Loader = Callable[[], tuple[Any, str]]


def select_pin_factory(model: str | None, environ: Mapping[str, str] | None = None,
                       lgpio: Loader = _lgpio_factory, native: Loader = _native_factory,
                       named: Callable[[str], tuple[Any, str]] = _named_factory) -> tuple[Any, str]:
    """(factory, description) for this board, or GpioUnavailable with the reason.

    `model` is `board_model()`; the loaders build a factory or raise (a missing module, no GPIO
    device); they are parameters so that the choice can be tested off a Pi."""
    env = os.environ if environ is None else environ
    if env.get("GPIOZERO_PIN_FACTORY"):
        return named(env["GPIOZERO_PIN_FACTORY"])
    if model is None or not model.startswith("Raspberry Pi"):
        raise GpioUnavailable(f"not a Raspberry Pi (board model: {model or 'unknown'})")
    try:
        return lgpio()
    except Exception as exc:  # ImportError, or lgpio's own error when /dev/gpiochip* is not usable
        lgpio_error = f"{type(exc).__name__}: {exc}"
    if model.startswith("Raspberry Pi 5") or "Compute Module 5" in model:
        # RP1 has no /dev/gpiomem registers that the native factory knows.
        raise GpioUnavailable(f"{model} needs lgpio (apt install python3-lgpio on Raspberry Pi OS): {lgpio_error}")
    try:
        return native()
    except Exception as exc:
        raise GpioUnavailable(
            f"{model}: lgpio failed ({lgpio_error}), native failed ({type(exc).__name__}: {exc})") from exc


_factory_lock = threading.Lock()


def ensure_pin_factory() -> str:
    """Give gpiozero this board's pin factory (`select_pin_factory`) unless one is set already
    (tests' MockFactory), log which one once, and return its description. Raises GpioUnavailable.
    Used by everything in the core that drives a pin (LED, button, RS485 direction)."""
    from gpiozero import Device

    with _factory_lock:  # the LED at start and a serial port opened on a bus thread may race
        if Device.pin_factory is not None:
            return f"{type(Device.pin_factory).__name__} (preset)"
        Device.pin_factory, how = select_pin_factory(board_model())
        log.info("GPIO pin factory: %s", how)
        return how


def led_pattern(health: dict[str, Any]) -> str:
    """`on`, `slow`, `attention` or `fast` for a health snapshot (`gateway/health`)."""
    if not all(health.get("plc", {}).values()):
        return "fast"
    if (health.get("pi") or {}).get("attention"):
        return "attention"
    if health.get("cloud_configured") and not health.get("cloud"):
        return "slow"
    return "on"


class GpioService:
    """`start()` claims the pins (or logs why it cannot); `run()` keeps the LED in step with
    `health()`; `stop()` releases the pins (LED off)."""

    def __init__(self, config: GpioConfig, health: Callable[[], dict[str, Any]],
                 on_short_press: Callable[[], Awaitable[None]], on_long_press: Callable[[], Awaitable[None]]) -> None:
        self.config = config
        self.health = health
        self.on_short_press = on_short_press
        self.on_long_press = on_long_press
        self.led: Any = None
        self.button: Any = None
        self.pattern = "off"
        self.presses = 0
        self.long_presses = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held = False
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self) -> None:
        if not self.config.enabled:
            return
        self._loop = asyncio.get_running_loop()
        try:
            from gpiozero import LED, Button

            how = ensure_pin_factory()
            if how.endswith("(preset)"):
                log.info("GPIO pin factory: %s", how)
            if self.config.led_pin is not None:
                self.led = LED(self.config.led_pin)
            if self.config.button_pin is not None:
                self.button = Button(self.config.button_pin, pull_up=True, hold_time=RECOVERY_HOLD_SEC)
                self.button.when_held = self._held_cb
                self.button.when_released = self._released_cb
        except Exception as exc:  # gpiozero raises many kinds when there is no usable GPIO
            log.warning("GPIO not available (%s: %s): no status LED, no service button", type(exc).__name__, exc)
            self.stop()

    def stop(self) -> None:
        if self.led is not None:
            try:
                self.led.off()  # a stopped core shows a dark LED, whatever the pin does once released
            except Exception:
                log.debug("LED off failed", exc_info=True)
        for dev in (self.led, self.button):
            if dev is not None:
                try:
                    dev.close()
                except Exception:  # closing a half-opened device must not stop the shutdown
                    log.debug("GPIO close failed", exc_info=True)
        self.led = self.button = None
        self.pattern = "off"

    def services(self) -> list[tuple[str, Any]]:
        return [("gpio-led", self._run)] if self.led is not None else []

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # gpiozero's thread -> the loop
    def _held_cb(self) -> None:
        self._held = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._long)

    def _released_cb(self) -> None:
        if self._held:
            self._held = False
            return
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._short)

    def _short(self) -> None:
        self.presses += 1
        log.info("service button: short press, opening the pairing window")
        self._spawn(self.on_short_press())

    def _long(self) -> None:
        self.long_presses += 1
        log.warning("service button: held %g s, starting technician-access recovery", RECOVERY_HOLD_SEC)
        self._spawn(self.on_long_press())

    def apply(self, pattern: str) -> None:
        if self.led is None or pattern == self.pattern:
            return
        self.pattern = pattern
        if pattern == "on":
            self.led.on()
        elif pattern == "slow":
            self.led.blink(*SLOW)
        elif pattern == "attention":
            self.led.blink(*ATTENTION)
        else:
            self.led.blink(*FAST)

    async def _run(self) -> None:
        while True:
            self.apply(led_pattern(self.health()))
            await asyncio.sleep(CHECK_SEC)
