"""`carwash-gateway` command line: one entry point, one subcommand per job.

Every subcommand takes `--config PATH` (default /etc/carwash-gateway/gateway.toml; the
CARWASH_GATEWAY_CONFIG environment variable overrides the default). A configuration problem
prints one line naming the file and key and exits with 78 (EX_CONFIG), which the systemd units
list in RestartPreventExitStatus.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets as pysecrets
import signal
import sys
from pathlib import Path

from gateway import __version__
from gateway.access import cli as access_cli
from gateway.config import Config, ConfigError, Secrets, config_path, load_config, load_secrets, write_secrets

EX_CONFIG = 78


def _load(args: argparse.Namespace) -> tuple[Config, Secrets]:
    cfg = load_config(config_path(args.config))
    return cfg, load_secrets(cfg)


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"carwash-gateway {__version__}")
    return 0


def cmd_check_config(args: argparse.Namespace) -> int:
    from gateway.wash.tools import serial_device_warnings

    cfg, _ = _load(args)
    for warning in serial_device_warnings(cfg):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"{cfg.source}: OK (site {cfg.site.id}, {len(cfg.buses)} bus(es), {len(cfg.bays)} bay(s))")
    return 0


EXIT_GRACE_SEC = 1.0


def cmd_core(args: argparse.Namespace) -> int:
    from gateway.core.app import CoreApp
    from gateway.core.logsetup import setup_logging

    cfg, sec = _load(args)
    setup_logging(cfg.logging.level, process="core")

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await CoreApp(cfg, sec).run(stop)
        # CoreApp has stored everything, closed the database and logged any task that did not
        # stop. asyncio.run() would then wait without end for such a task; give it a second.
        me = asyncio.current_task()
        leftovers = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
        for t in leftovers:
            t.cancel()
        if leftovers:
            _, pending = await asyncio.wait(leftovers, timeout=EXIT_GRACE_SEC)
            if pending:
                logging.getLogger("gateway.core").error("exiting with %d task(s) that ignored cancellation",
                                                        len(pending))
                logging.shutdown()
                os._exit(0)

    asyncio.run(main())
    return 0


def cmd_web(args: argparse.Namespace) -> int:
    cfg, _ = _load(args)  # fail here, with the one-line message, rather than inside gunicorn
    conf = Path(__file__).resolve().parent.parent / "web" / "gunicorn_conf.py"
    os.environ["CARWASH_GATEWAY_CONFIG"] = str(Path(cfg.source).resolve())
    argv = [sys.executable, "-m", "gunicorn", "--config", str(conf), "web.wsgi:app"]
    sys.stdout.flush()
    sys.stderr.flush()
    # exec keeps the PID, so systemd's Type=notify sees gunicorn's own READY=1.
    os.execv(sys.executable, argv)


def cmd_demo(args: argparse.Namespace) -> int:
    from sim.demo import run_demo

    return run_demo(data_dir=args.data_dir, log_every=args.log_every, payment_every=args.payment_every)


def cmd_simulate_plc(args: argparse.Namespace) -> int:
    from sim.plc import simulate_plc_main

    return simulate_plc_main(args.sim_args)


def cmd_simulate_devices(args: argparse.Namespace) -> int:
    from sim.fleet import simulate_devices_main

    extra = ["--config", args.config] if args.config else []
    return simulate_devices_main(extra + args.sim_args)


def cmd_init_secrets(args: argparse.Namespace) -> int:
    path = Path(args.path)
    if path.exists() and not args.force:
        print(f"{path}: exists, left unchanged (use --force to replace)", file=sys.stderr)
        return 1
    write_secrets(path, device_signing_key=pysecrets.token_hex(16))
    print(f"{path}: written (mode 0640)")
    return 0


def cmd_ops(args: argparse.Namespace) -> int:
    from gateway import ops

    cfg = load_config(config_path(args.config))
    if args.command == "backup":
        return ops.backup(cfg, Path(args.file))
    if args.command == "restore":
        return ops.restore(cfg, Path(args.file))
    if args.command == "outbox":
        return ops.outbox(cfg)
    return ops.status(cfg, load_secrets(cfg))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carwash-gateway", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="PATH", help="configuration file (default: $CARWASH_GATEWAY_CONFIG "
                        "or /etc/carwash-gateway/gateway.toml)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("core", parents=[common], help="run the core process").set_defaults(fn=cmd_core)
    sub.add_parser("web", parents=[common], help="run the web process (gunicorn)").set_defaults(fn=cmd_web)
    d = sub.add_parser("demo", parents=[common], help="run a demo site on 127.0.0.1")
    d.add_argument("--data-dir", metavar="DIR", help="keep the demo's data here (default: a temporary directory)")
    d.add_argument("--payment-every", metavar="SEC", type=float,
                   help="a customer pays at each simulated device about this often (default 600; 0: never); "
                        "the device uploads its payments after a restart, as firmware does")
    d.add_argument("--log-every", metavar="SEC", type=float,
                   help="a load: each simulated device also uploads 10 event-log items about this often "
                        "(default 0: never)")
    d.set_defaults(fn=cmd_demo)
    sub.add_parser("check-config", parents=[common], help="validate the configuration and secrets").set_defaults(
        fn=cmd_check_config)
    sub.add_parser("version", parents=[common], help="print the version").set_defaults(fn=cmd_version)
    sim = sub.add_parser("simulate-plc", parents=[common], add_help=False,
                         help="run the washbay-v1 PLC simulator (see --help after it)")
    sim.add_argument("sim_args", nargs=argparse.REMAINDER)
    sim.set_defaults(fn=cmd_simulate_plc)
    dev = sub.add_parser("simulate-devices", parents=[common], add_help=False,
                         help="run a fleet of simulated devices against this gateway (see --help after it)")
    dev.add_argument("sim_args", nargs=argparse.REMAINDER)
    dev.set_defaults(fn=cmd_simulate_devices)
    s = sub.add_parser("init-secrets", parents=[common], help="write a new secrets file (0640)")
    s.add_argument("path")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=cmd_init_secrets)
    from gateway.wash.tools import cmd_reset_bay, cmd_scan_bus

    sb = sub.add_parser("scan-bus", parents=[common],
                        help="probe unit ids x base addresses on a PLC bus (through the running core)")
    sb.add_argument("bus", help="bus name from the config")
    sb.add_argument("--first", type=int, default=1)
    sb.add_argument("--last", type=int, default=16)
    sb.add_argument("--base", type=int, action="append", metavar="ADDR",
                    help="base address to probe (repeat; default: 0 and the bases configured on that bus)")
    sb.add_argument("--profile", default="washbay-v1")
    sb.set_defaults(fn=cmd_scan_bus)
    rb = sub.add_parser("reset-bay", parents=[common],
                        help="clear a bay's latched PLC error (RESET_ERROR, through the running core; recorded)")
    rb.add_argument("bay", help="bay id from the config")
    rb.set_defaults(fn=cmd_reset_bay)
    b = sub.add_parser("backup", parents=[common], help="online backup of the database to a new file")
    b.add_argument("file")
    b.set_defaults(fn=cmd_ops)
    r = sub.add_parser("restore", parents=[common], help="replace the database with a backup (services stopped)")
    r.add_argument("file")
    r.set_defaults(fn=cmd_ops)
    sub.add_parser("outbox", parents=[common], help="what waits for the cloud, and the dead letters").set_defaults(
        fn=cmd_ops)
    sub.add_parser("status", parents=[common], help="one-screen summary: core, bays, devices, cloud").set_defaults(
        fn=cmd_ops)
    access_cli.add_parsers(sub, common)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command in ("simulate-plc", "simulate-devices"):
        args.sim_args = extra + list(args.sim_args)  # its options are the simulator's own
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.fn(args))
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return EX_CONFIG
