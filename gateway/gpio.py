"""The status LED and the service button on the Pi's GPIO (gpiozero), owned by the core.

LED (`gpio.led_pin`): on = everything fine; slow blink (1 s on, 1 s off) = the cloud is
unreachable; fast blink (0.15 s) = a PLC bus or bay is offline (it wins over the cloud); off = the
core is not running (the LED is released at stop, and a dead process drives nothing).
Button (`gpio.button_pin`, to ground, internal pull-up): a short press opens the device pairing
window for `PAIRING_SEC`; a press held `RECOVERY_HOLD_SEC` starts technician-access recovery (a
one-time login code written to the journal, see `gateway/recovery.py`).
Without GPIO (not a Pi, no pin factory) or with `gpio.enabled = false`, everything here is a no-op
logged once. gpiozero calls back on its own thread; the callbacks are handed to the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from gateway.config import GpioConfig

log = logging.getLogger(__name__)

PAIRING_SEC = 120
RECOVERY_HOLD_SEC = 10.0
SLOW, FAST = (1.0, 1.0), (0.15, 0.15)
CHECK_SEC = 0.5


def led_pattern(health: dict[str, Any]) -> str:
    """`on`, `slow` or `fast` for a health snapshot (`gateway/health`)."""
    if not all(health.get("plc", {}).values()):
        return "fast"
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
        else:
            self.led.blink(*FAST)

    async def _run(self) -> None:
        while True:
            self.apply(led_pattern(self.health()))
            await asyncio.sleep(CHECK_SEC)
