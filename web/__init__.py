"""The web process: device HTTP API, wash REST API with live events, technician page, OpenAPI."""

from web.app import create_app

__all__ = ["create_app"]
