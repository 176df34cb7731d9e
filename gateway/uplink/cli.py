"""`python -m gateway.uplink.drainer`: a drainer alone, for tests, benchmarks and diagnostics.

Contract: `main(argv)` drains the outbox of `--database` to `--url` as site `--site-id` (the key in
`$CARWASH_UPLINK_KEY`) until SIGTERM or SIGINT, then returns 0; 2 when the schema is not current
(the core migrates, not this tool). The batch and backoff options default to `[outbox]`'s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import time

from gateway.config import CloudConfig, Config, OutboxConfig, SiteConfig
from gateway.uplink.drainer import KEY_ENV, OutboxDrainer

log = logging.getLogger("gateway.uplink.drainer")


def main(argv: list[str] | None = None) -> int:
    from gateway.store import open_database, schema_status

    defaults = OutboxConfig()
    ap = argparse.ArgumentParser(prog="python -m gateway.uplink.drainer",
                                 description=f"Drain an outbox to a cloud until SIGTERM (key in ${KEY_ENV}).")
    ap.add_argument("--database", required=True)
    ap.add_argument("--url", required=True)
    ap.add_argument("--site-id", required=True)
    ap.add_argument("--timeout", type=float, default=CloudConfig().timeout_sec)
    ap.add_argument("--batch-max-events", type=int, default=defaults.batch_max_events)
    ap.add_argument("--batch-max-bytes", type=int, default=defaults.batch_max_bytes)
    ap.add_argument("--max-bytes", type=int, default=defaults.max_bytes)
    ap.add_argument("--backoff-min", type=float, default=defaults.backoff_min_sec)
    ap.add_argument("--backoff-max", type=float, default=defaults.backoff_max_sec)
    ap.add_argument("--mark-sent-delay", type=float, default=defaults.mark_sent_delay_sec)
    ap.add_argument("--poll-interval", type=float, default=5.0)
    ap.add_argument("--log-level", default="WARNING")
    args = ap.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s drainer %(levelname)s %(message)s")
    key = os.environ.get(KEY_ENV)
    if not key:
        ap.error(f"${KEY_ENV} must hold the site key")
    config = Config(
        site=SiteConfig(id=args.site_id),
        cloud=CloudConfig(url=args.url, timeout_sec=args.timeout),
        outbox=OutboxConfig(batch_max_events=args.batch_max_events, batch_max_bytes=args.batch_max_bytes,
                            max_bytes=args.max_bytes, backoff_min_sec=args.backoff_min,
                            backoff_max_sec=args.backoff_max, mark_sent_delay_sec=args.mark_sent_delay),
    )
    db = open_database(args.database)
    current, version = schema_status(db)
    if not current:
        print(f"database schema version {version} is not current: start the core once to migrate", flush=True)
        return 2

    async def amain() -> None:
        drainer = OutboxDrainer(config, key, db, poll_interval_sec=args.poll_interval)
        task = asyncio.create_task(drainer.run(), name="uplink-drainer")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    t0 = time.monotonic()
    asyncio.run(amain())
    db.close()
    log.info("drainer stopped after %.1f s", time.monotonic() - t0)
    return 0
