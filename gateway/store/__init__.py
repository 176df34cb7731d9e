"""Durable state: SQLite through Peewee (WAL, synchronous=FULL, IMMEDIATE writes)."""

from gateway.store.db import open_database, write_tx
from gateway.store.migrations import LATEST, SchemaError, current_version, migrate, schema_status

__all__ = ["LATEST", "SchemaError", "current_version", "migrate", "open_database", "schema_status", "write_tx"]
