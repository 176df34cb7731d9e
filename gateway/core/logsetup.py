"""Logging: journald (JournalHandler) under systemd, stderr otherwise."""

from __future__ import annotations

import logging
import os
import sys


def under_systemd() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))


def setup_logging(level: str = "INFO", *, process: str = "core") -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler: logging.Handler | None = None
    if under_systemd():
        try:
            from systemd.journal import JournalHandler

            handler = JournalHandler(SYSLOG_IDENTIFIER=f"carwash-gateway-{process}")
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
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
