"""web.sse: the one SSE framing and response of the web's streams (wash and device commands)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

from flask import Flask, request

from web.sse import KEEPALIVE, RETRY_MS, frame, sse_response


def test_frames_are_what_eventsource_parses() -> None:
    assert frame("wash:status", '{"bayId":"bay1"}') == 'event: wash:status\ndata: {"bayId":"bay1"}\n\n'
    assert frame("progress", "{}", 42) == "id: 42\nevent: progress\ndata: {}\n\n"
    # A newline inside the data must not end the event early: one data field per line.
    assert frame("x", "a\nb") == "event: x\ndata: a\ndata: b\n\n"
    assert KEEPALIVE.startswith(":") and KEEPALIVE.endswith("\n\n")


def test_response_streams_retry_first_then_frames_in_the_request_context_and_cleans_up() -> None:
    app = Flask(__name__)
    closed = threading.Event()

    @app.get("/stream")
    def stream() -> object:
        def gen() -> Iterator[str]:
            try:
                yield frame("hello", request.args["who"])  # the request is still there
                yield KEEPALIVE
                yield frame("never", "read")
            finally:
                closed.set()

        return sse_response(gen())

    resp = app.test_client().get("/stream?who=bay1", buffered=False)
    assert resp.mimetype == "text/event-stream"
    assert resp.headers["Cache-Control"] == "no-cache" and resp.headers["X-Accel-Buffering"] == "no"
    chunks = iter(resp.response)
    got = [next(chunks).decode() for _ in range(3)]
    assert got == [f"retry: {RETRY_MS}\n\n", "event: hello\ndata: bay1\n\n", KEEPALIVE]
    assert not closed.is_set()
    resp.close()  # the client went away: the generator's finally runs
    assert closed.wait(5)
