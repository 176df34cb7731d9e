"""WSGI entry for gunicorn: `web.wsgi:app`. Reads the config named by $CARWASH_GATEWAY_CONFIG.

Loaded in the worker after fork (no --preload), so nothing here is shared across a fork; the
database and broker connection are opened by gunicorn_conf.post_worker_init.
"""

from gateway.config import config_path, load_config, load_secrets
from web.app import create_app

_config = load_config(config_path())
app = create_app(_config, load_secrets(_config))
