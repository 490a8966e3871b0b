"""Connections that hold the server without asking anything (slow-loris): uvicorn keeps a
connection open while its request head trickles in, for as long as the client likes, and
accepts as many as the process may open. This protocol, uvicorn's own with two rules added,
bounds both:

- a request's line and headers must arrive within `head_timeout_s` of the connection (or, on a
  kept-alive connection, of the request's first byte); then it is answered 408 and closed;
- at most `max_connections` are open at once. A new one beyond them takes the place of the
  connection that has waited longest for its head (answered 503 and closed), so a flood of
  slow connections cannot lock out clients that send their requests at once; when none is
  waiting, the new connection is answered 503 and closed instead.

The body has its own deadline in the application (`Limits.timeout_s`).
"""

import asyncio
import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def _closing_response(status: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
        f"connection: close\r\ncontent-length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


TOO_MANY = _closing_response("503 Service Unavailable", "The server has too many connections.")


def guarded_protocol(max_connections: int, head_timeout_s: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools protocol with a cap on open connections and a deadline per head."""
    too_slow = _closing_response(
        "408 Request Timeout", f"The request head took longer than {head_timeout_s:g} s to arrive."
    )

    class GuardedProtocol(HttpToolsProtocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            if len(self.connections) >= max_connections:
                if not waiting:
                    self.transport = transport  # connection_lost closes it
                    transport.write(TOO_MANY)
                    transport.close()
                    return
                next(iter(waiting)).close_with(TOO_MANY)
            super().connection_made(transport)
            self.await_head()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            if self not in waiting:  # the next request on a kept-alive connection
                self.await_head()

        def on_headers_complete(self) -> None:
            self.stop_waiting()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.stop_waiting()
            super().connection_lost(exc)

        def await_head(self) -> None:
            waiting[self] = self.loop.call_later(head_timeout_s, self.close_with, too_slow)

        def stop_waiting(self) -> None:
            deadline = waiting.pop(self, None)
            if deadline is not None:
                deadline.cancel()

        def close_with(self, response: bytes) -> None:
            self.stop_waiting()
            if not self.transport.is_closing():
                self.transport.write(response)
                self.transport.close()

    # The connections waiting for a request head, oldest first (a dict keeps insertion order),
    # with their deadlines.
    waiting: dict[GuardedProtocol, asyncio.TimerHandle] = {}
    return GuardedProtocol
