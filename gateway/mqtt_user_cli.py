"""`carwash-gateway mqtt-user add|passwd|remove|list [NAME] [--role ROLE] [--password-stdin]`.

Writes `mqtt_account` directly (as `user` writes technician accounts), migrating first so an
account can be made before the first start. The running core picks a change up within a second
(gateway.core.app) and closes the connections of a removed or changed account.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from gateway.config import config_path, load_config


def add_parser(sub: Any, common: argparse.ArgumentParser) -> None:
    from gateway.mqtt_accounts import ROLES

    m = sub.add_parser("mqtt-user", parents=[common], help="MQTT accounts of programs (wash backend, dashboards)")
    m.add_argument("action", choices=("add", "passwd", "remove", "list"))
    m.add_argument("username", nargs="?", help="the account (not for list)")
    m.add_argument("--role", choices=tuple(ROLES), help="add: required; passwd: change the role as well")
    m.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    m.add_argument("--json", action="store_true", help="list: JSON instead of a table")
    m.set_defaults(fn=cmd_mqtt_user)


def cmd_mqtt_user(args: argparse.Namespace) -> int:
    from gateway import mqtt_accounts
    from gateway.cli import read_password
    from gateway.store import migrate, open_database

    cfg = load_config(config_path(args.config))
    if args.action != "list" and not args.username:
        print(f"mqtt-user {args.action}: a NAME is required", file=sys.stderr)
        return 2
    if args.action == "add" and not args.role:
        print("mqtt-user add: --role is required (" + ", ".join(mqtt_accounts.ROLES) + ")", file=sys.stderr)
        return 2
    db = open_database(cfg.paths.database)
    migrate(db)  # the core's own forward migrations; harmless when current
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
    finally:
        db.close()
    print(f"mqtt-user {args.username}: {args.action} done")
    return 0
