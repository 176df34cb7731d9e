"""`rs485gpio:///dev/ttyUSB0?pin=17`: a serial port whose RS485 driver (DE/RE) is switched by a
GPIO pin, for HATs without automatic direction control.

The pin is raised before the first byte of a frame and lowered once the UART has sent the last
stop bit (`tcdrain`), so the PLC's answer is not talked over. pymodbus writes without blocking;
a frame written only in part keeps the driver on until its end is written. The pin is a gpiozero
`DigitalOutputDevice` on the pin factory the core chooses (`gateway.core.gpio.ensure_pin_factory`: lgpio,
or native up to the Pi 4); without one the port cannot open, with the reason.
"""

from __future__ import annotations

import urllib.parse
from typing import Any

import serial


class Serial(serial.Serial):
    _de: Any = None

    @serial.Serial.port.setter
    def port(self, value: Any) -> None:
        if isinstance(value, str) and value.startswith("rs485gpio://"):
            value = self._from_url(value)
        serial.Serial.port.__set__(self, value)

    def _from_url(self, url: str) -> str:
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query)
        try:
            pin = int(query["pin"][0])
        except (KeyError, ValueError, IndexError):
            raise serial.SerialException(f"{url}: needs ?pin=N (BCM number of the DE/RE pin)") from None
        from gpiozero import DigitalOutputDevice

        from gateway.core.gpio import ensure_pin_factory

        if self._de is not None:
            self._de.close()
        try:
            ensure_pin_factory()
            self._de = DigitalOutputDevice(pin, initial_value=False)
        except Exception as exc:  # gpiozero's many "no GPIO here" errors
            raise serial.SerialException(f"cannot drive the RS485 direction pin {pin}: {exc}") from None
        return parts.path

    def write(self, data: bytes) -> int:
        self._de.on()
        n: int = super().write(data)
        if n == len(data):
            self.flush()  # tcdrain: wait until the last stop bit has left the UART
            self._de.off()
        return n

    def close(self) -> None:
        super().close()
        if self._de is not None:
            self._de.close()
            self._de = None
