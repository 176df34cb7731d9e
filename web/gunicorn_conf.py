"""gunicorn settings of the web process (`carwash-gateway web` runs gunicorn with this file).

One worker, gthread: Socket.IO needs a single worker (its sessions live in that process), and
threads rather than gevent keep paho's network thread, SQLite and Flask free of monkey-patching.
Each open SSE or WebSocket stream holds a thread, so `web.threads` is sized above the peak number
of streams plus ordinary requests (docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

from gateway.config import config_path, load_config
from gateway.core.logsetup import setup_logging

_cfg = load_config(config_path())

_host = f"[{_cfg.web.bind}]" if ":" in _cfg.web.bind else _cfg.web.bind
bind = [f"{_host}:{_cfg.web.port}"]
workers = 1
worker_class = "gthread"
threads = _cfg.web.threads
timeout = 30
graceful_timeout = 5
keepalive = 5
accesslog = None
proc_name = "carwash-gateway-web"
# gunicorn 27's runtime control socket is not used, and would write under $HOME.
control_socket_disable = True
# Let systemd/our own logging own the output.
errorlog = "-"
loglevel = _cfg.logging.level.lower()


def post_worker_init(worker: Any) -> None:
    setup_logging(_cfg.logging.level, process="web")
    web_ctx = getattr(worker.wsgi, "extensions", {}).get("carwash")
    if web_ctx is not None:  # absent for bench/bare_app.py, the benchmark's baseline
        web_ctx.start()


def worker_exit(server: Any, worker: Any) -> None:
    web_ctx = getattr(getattr(worker, "wsgi", None), "extensions", {}).get("carwash")
    if web_ctx is not None:
        web_ctx.stop()
