"""Server-sent events: the one framing and response of every SSE stream of the web.

Contract
- `frame(event, data, id=None)`: one event as `id:` (when given), `event:` and one `data:` line
  per line of `data`, ended by a blank line. `KEEPALIVE` is a comment frame: streams yield it
  after `KEEPALIVE_SEC` without events, so proxies and clients see the connection alive.
- `sse_response(frames)`: a `text/event-stream` response that sends `retry: RETRY_MS` first, then
  the frames as the generator yields them, within the request's context (the generator may use
  the database and `request`); no caching, no proxy buffering. The generator's `finally` runs
  when the client goes away (the next write fails) or the server closes the response.
"""

from __future__ import annotations

from collections.abc import Iterator

from flask import Response, stream_with_context

RETRY_MS = 2000  # how long a client waits before it reconnects after a drop
KEEPALIVE_SEC = 15.0
KEEPALIVE = ": keepalive\n\n"


def frame(event: str, data: str, id: int | str | None = None) -> str:
    """One SSE event (`data` may hold newlines: each line gets its own `data:` field)."""
    head = f"id: {id}\n" if id is not None else ""
    body = "".join(f"data: {line}\n" for line in data.split("\n"))
    return f"{head}event: {event}\n{body}\n"


def sse_response(frames: Iterator[str]) -> Response:
    def stream() -> Iterator[str]:
        yield f"retry: {RETRY_MS}\n\n"
        yield from frames

    return Response(stream_with_context(stream()), mimetype="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
