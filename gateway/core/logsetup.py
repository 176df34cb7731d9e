"""Logging: journald (JournalHandler) under systemd, stderr otherwise.

Structured fields: a log call names what it is about with `extra=`, e.g.
`log.warning("bus %s: %s: %s", bus, bay, err, extra={"bus": bus, "bay_id": bay})`; under
journald these become the entry's fields `BUS=`, `BAY_ID=`, `DEVICE_ID=`, `COMMAND_ID=`
(`journalctl -u carwash-gateway-core BAY_ID=bay2`). journald drops lower-case field names, so
`StructuredFields` copies the known extras to their upper-case names (docs/operations.md).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

# extra= key -> journald field
FIELDS = {"bay_id": "BAY_ID", "device_id": "DEVICE_ID", "command_id": "COMMAND_ID", "bus": "BUS"}


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


class StructuredFields(logging.Filter):
    """Copy the known `extra=` keys of a record to their journald field names (never drops)."""

    def filter(self, record: logging.LogRecord) -> bool:
        for key, field in FIELDS.items():
            value = record.__dict__.get(key)
            if value is not None:
                setattr(record, field, str(value))
        return True


def journal_handler(process: str, sender: Callable[..., Any] | None = None) -> logging.Handler:
    """systemd-python's JournalHandler with the structured fields; ImportError without it.
    `sender` replaces `systemd.journal.send` (tests)."""
    from systemd.journal import JournalHandler, send

    handler: logging.Handler = JournalHandler(sender_function=sender or send,
                                              SYSLOG_IDENTIFIER=f"carwash-gateway-{process}")
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    handler.addFilter(StructuredFields())
    return handler


def setup_logging(level: str = "INFO", *, process: str = "core") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler | None = None
    if under_systemd():
        try:
            handler = journal_handler(process)
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level)
    # amqtt logs every connection and packet at INFO; its warnings are what an operator needs.
    logging.getLogger("amqtt").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("transitions").setLevel(logging.WARNING)
    # pymodbus logs every timeout it sees; plc.bus reports bus and bay failures itself.
    logging.getLogger("pymodbus").setLevel(logging.CRITICAL)
