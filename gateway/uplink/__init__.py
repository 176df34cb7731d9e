"""Uplink to the cloud (uplink.md).

`gateway.uplink.drainer.OutboxDrainer` delivers the outbox over HTTP (store and forward). It is
re-exported here lazily, so that `python -m gateway.uplink.drainer` does not import the module
twice (runpy warns when a package imports the submodule it is about to run).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from gateway.uplink.drainer import OutboxDrainer

__all__ = ["OutboxDrainer"]


def __getattr__(name: str) -> Any:
    if name == "OutboxDrainer":
        from gateway.uplink.drainer import OutboxDrainer

        return OutboxDrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
