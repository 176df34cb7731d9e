"""Account commands of `carwash-gateway`: `user` (technicians) and `mqtt-user` (programs on the LAN).

Both write their table directly, migrating first (the core's own forward migrations, harmless
when current), so an account can be made before the first start. The running core picks an MQTT
account change up within a second (gateway.core.app) and closes the connections of a removed or
changed account.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import peewee

from gateway.config import config_path, load_config


def add_parsers(sub: Any, common: argparse.ArgumentParser) -> None:
    from gateway.access.mqtt_accounts import ROLES

    u = sub.add_parser("user", parents=[common], help="technician accounts")
    u.add_argument("action", choices=("add", "passwd", "remove"))
    u.add_argument("username")
    u.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    u.set_defaults(fn=cmd_user)
    m = sub.add_parser("mqtt-user", parents=[common], help="MQTT accounts of programs (wash backend, dashboards)")
    m.add_argument("action", choices=("add", "passwd", "remove", "list"))
    m.add_argument("username", nargs="?", help="the account (not for list)")
    m.add_argument("--role", choices=tuple(ROLES), help="add: required; passwd: change the role as well")
    m.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    m.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    m.set_defaults(fn=cmd_mqtt_user)


def read_password(args: argparse.Namespace) -> str:
    """A new password: from standard input (`--password-stdin` or not a terminal), else typed twice."""
    if args.password_stdin or not sys.stdin.isatty():
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise SystemExit("passwords differ")
    return first


@contextmanager
def migrated_database(database: str) -> Iterator[peewee.SqliteDatabase]:
    """The store, migrated to the latest schema, closed on exit."""
    from gateway.store import migrate, open_database

    db = open_database(database)
    try:
        migrate(db)
        yield db
    finally:
        db.close()


def cmd_user(args: argparse.Namespace) -> int:
    from gateway.access import users

    cfg = load_config(config_path(args.config))
    with migrated_database(cfg.paths.database) as db:
        try:
            if args.action == "add":
                users.add_user(db, args.username, read_password(args))
            elif args.action == "passwd":
                users.set_password(db, args.username, read_password(args))
            else:
                users.remove_user(db, args.username)
        except users.UserError as exc:
            print(f"user {args.action}: {exc}", file=sys.stderr)
            return 1
    print(f"user {args.username}: {args.action} done")
    return 0


def cmd_mqtt_user(args: argparse.Namespace) -> int:
    from gateway.access import mqtt_accounts

    cfg = load_config(config_path(args.config))
    if args.action != "list" and not args.username:
        print(f"mqtt-user {args.action}: a NAME is required", file=sys.stderr)
        return 2
    if args.action == "add" and not args.role:
        print("mqtt-user add: --role is required (" + ", ".join(mqtt_accounts.ROLES) + ")", file=sys.stderr)
        return 2
    with migrated_database(cfg.paths.database) as db:
        try:
            if args.action == "list":
                rows = mqtt_accounts.listing(db)
                if args.json:
                    print(json.dumps(rows))
                else:
                    for r in rows:
                        print(f"{r['username']:<24} {r['role']:<14} changed {r['changed_at']}")
                return 0
            if args.action == "add":
                mqtt_accounts.add(db, args.username, read_password(args), args.role,
                                  internal_username=cfg.mqtt.internal_username)
            elif args.action == "passwd":
                mqtt_accounts.change(db, args.username, password=read_password(args), role=args.role)
            else:
                mqtt_accounts.remove(db, args.username)
        except mqtt_accounts.AccountError as exc:
            print(f"mqtt-user {args.action}: {exc}", file=sys.stderr)
            return 1
    print(f"mqtt-user {args.username}: {args.action} done")
    return 0
