"""The byte links under a Modbus bus: a serial line (RS485 adapter, pyserial) or a TCP connection.

A link moves bytes and nothing else: `send()` puts a frame on the wire, `receive()` returns
whatever arrived within a time limit (b"" when nothing did), `discard()` drops what was received
and not read. Any failure of the line itself (device unplugged, connection closed) raises
`LinkDown`. Constructors do no I/O; `open()` does.
"""

from __future__ import annotations

import asyncio
import os
import termios
from typing import Protocol

import serial


class LinkDown(Exception):
    """The line itself failed: every bay on it is affected. The message says why."""


class Link(Protocol):
    async def open(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...

    def send(self, data: bytes) -> None: ...

    async def receive(self, timeout: float) -> bytes: ...

    def discard(self) -> int: ...


class SerialLink:
    """A serial port read without blocking from the event loop (`add_reader`).

    `url` is a device path or a pyserial URL (`rs485gpio://...` of `plc.urlhandler`).
    `rts_direction` raises RTS while a frame is sent and lowers it once the UART has sent the last
    stop bit, for RS485 transceivers whose DE/RE is wired to RTS.
    """

    def __init__(self, url: str, *, baudrate: int, bytesize: int, parity: str, stopbits: int,
                 rts_direction: bool = False) -> None:
        self.url = url
        self.settings = {"baudrate": baudrate, "bytesize": bytesize, "parity": parity, "stopbits": stopbits}
        self.rts_direction = rts_direction
        self._ser: serial.Serial | None = None
        self._fd = -1
        self._buf = bytearray()
        self._arrived = asyncio.Event()
        self._error: str | None = None

    async def open(self) -> None:
        if "://" in self.url and "plc.urlhandler" not in serial.protocol_handler_packages:
            serial.protocol_handler_packages.append("plc.urlhandler")
        try:
            ser = serial.serial_for_url(self.url, do_not_open=True, timeout=0, write_timeout=1.0,
                                        **self.settings)
            ser.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            raise LinkDown(f"cannot open {self.url}: {exc}") from None
        if self.rts_direction:
            try:
                ser.rts = False
            except OSError as exc:
                ser.close()
                raise LinkDown(f"{self.url} cannot drive RTS for the RS485 direction ({exc.strerror}); "
                               "use an adapter with automatic direction or direction_gpio") from None
        self._ser, self._fd, self._error = ser, ser.fileno(), None
        self._buf.clear()
        asyncio.get_running_loop().add_reader(self._fd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._fd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"read: {exc.strerror or exc}")
            return
        if not data:
            self._fail("the serial device closed")
            return
        self._buf += data
        self._arrived.set()

    def _fail(self, reason: str) -> None:
        self._error = reason
        asyncio.get_running_loop().remove_reader(self._fd)
        self._arrived.set()

    def close(self) -> None:
        if self._ser is None:
            return
        try:
            asyncio.get_running_loop().remove_reader(self._fd)
        except RuntimeError:  # no running loop: the loop is gone and its reader with it
            pass
        try:
            self._ser.close()
        except Exception:  # noqa: BLE001 - closing a vanished port may raise anything
            pass
        self._ser, self._fd = None, -1

    async def wait_closed(self) -> None:
        return None  # a serial port is closed by close() itself

    def send(self, data: bytes) -> None:
        if self._ser is None or self._error is not None:
            raise LinkDown(self._error or "not open")
        try:
            if self.rts_direction:
                self._ser.rts = True
            self._ser.write(data)
            if self.rts_direction:
                self._ser.flush()  # tcdrain: the last stop bit has left before the driver turns
                self._ser.rts = False
        except (serial.SerialException, OSError, termios.error) as exc:
            self._error = f"write: {exc}"
            raise LinkDown(self._error) from None

    async def receive(self, timeout: float) -> bytes:
        if not self._buf and self._error is None:
            self._arrived.clear()
            try:
                async with asyncio.timeout(max(timeout, 0.0)):
                    await self._arrived.wait()
            except TimeoutError:
                pass
        if self._error is not None:
            raise LinkDown(self._error)
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def discard(self) -> int:
        n = len(self._buf)
        self._buf.clear()
        if self._ser is not None and self._error is None:
            try:
                self._ser.reset_input_buffer()  # what the driver holds and the loop has not read
            except (serial.SerialException, OSError, termios.error) as exc:
                # termios.error is not an OSError: a vanished adapter raises it here (EIO).
                self._error = f"flush: {exc}"
                raise LinkDown(self._error) from None
        return n


class TcpLink:
    """A Modbus TCP connection."""

    def __init__(self, host: str, port: int, *, connect_timeout: float = 3.0) -> None:
        self.host, self.port = host, port
        self.connect_timeout = connect_timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._closing: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        try:
            async with asyncio.timeout(self.connect_timeout):
                self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except (OSError, TimeoutError) as exc:
            raise LinkDown(f"cannot connect to {self.host}:{self.port}: {str(exc) or 'timeout'}") from None

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._closing = self._writer
        self._reader = self._writer = None

    async def wait_closed(self) -> None:
        """Until the socket of a closed connection is released (close() only schedules it)."""
        writer, self._closing = self._closing, None
        if writer is not None:
            try:
                await writer.wait_closed()
            except OSError:
                pass  # a connection that broke: closed all the same

    def send(self, data: bytes) -> None:
        if self._writer is None or self._writer.is_closing():
            raise LinkDown("connection lost")
        self._writer.write(data)

    async def receive(self, timeout: float) -> bytes:
        if self._reader is None:
            raise LinkDown("connection lost")
        try:
            async with asyncio.timeout(max(timeout, 0.0)):
                data = await self._reader.read(4096)
        except TimeoutError:
            return b""
        except OSError as exc:
            raise LinkDown(f"connection lost: {exc}") from None
        if not data:
            raise LinkDown("the PLC closed the connection")
        return data

    def discard(self) -> int:
        # Stale TCP replies are recognised by their transaction id: nothing to drop blindly.
        return 0
