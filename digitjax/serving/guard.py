"""Connections that hold the server without asking anything (slow-loris, idle floods, heads
and pipelines without end): uvicorn keeps a connection open while its request head trickles
in, for as long as the client likes, and accepts as many as the process may open. This
protocol, uvicorn's h11 one with three rules added, bounds them:

- a request's line and headers must arrive within `head_timeout_s` of the connection (or, on a
  kept-alive connection, of the request's first byte); then it is answered 408 and closed;
- at most `max_connections` are open at once. A new one beyond them takes the place of the
  connection that has waited longest for a request (its head, or the next request on a
  kept-alive connection: answered 503 and closed), so a flood of slow or idle connections
  cannot lock out clients that send their requests at once; but only one of a client address
  holding as many connections as the new one's or more, so a flood cannot push out the one
  connection of another client before its head arrives. When none is waiting (every
  connection is in a request: sending its body, say, which has its own deadline), it takes
  the place of the oldest connection of the address holding the most, if that holds more
  than the new one's would: one address cannot keep the others out. Else the new connection
  is answered 503 and closed. (Clients behind one proxy share its address.)
- a connection that sends over MAX_PIPELINED requests in a row ahead of their answers is
  closed after the answer it waits for.

A connection refused with an answer is closed only after the end of its stream, once its
client has read them (`linger`): closed at once with the client's request unread, the kernel
sends a reset in place of the end of the stream, and a reset that comes before the end of the
stream discards the answer on the client's side before the client reads it (one that comes
after it does not).

h11 rather than httptools (uvicorn's faster parser): h11 refuses a head or trailer over 16 KiB
while it arrives (httptools took 1.5 GB of headers on one connection, and held it; a head that
comes whole in one read h11 takes, so that is refused here), and parses a pipelined
request only once the one before it is answered, reading nothing more meanwhile (httptools
parsed all it was sent into a queue: 2 MiB of pipelined requests cost ~200 MB). The body has
its own deadline and size limits in the application (`Limits`).
"""

import asyncio
import json
import re
from collections.abc import Callable
from typing import NamedTuple

from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.utils import get_remote_addr


class Refusal(NamedTuple):
    answer: bytes  # a whole HTTP response, which closes the connection
    reason: str  # as the rejections metric counts it


def _refusal(reason: str, status: str, detail: str, retry: bool = False) -> Refusal:
    body = json.dumps({"detail": detail}).encode()
    lines = [f"HTTP/1.1 {status}", "content-type: application/json", "connection: close"]
    lines += ["retry-after: 1"] if retry else []
    lines += [f"content-length: {len(body)}", "", ""]  # the head ends with an empty line
    return Refusal("\r\n".join(lines).encode() + body, reason)


# Requests in a row a connection may send before the answer to the one before (pipelining,
# which no browser does). More is a flood that costs its client nothing: four connections of
# it kept the event loop at 100% CPU answering them, holding the GIL from the threads that
# answer predictions (4-7 s for one, meanwhile). Such a connection is closed after an answer.
MAX_PIPELINED = 32
TOO_MANY = _refusal(
    "too_many_connections",
    "503 Service Unavailable",
    "The server has too many connections.",
    retry=True,
)
MAX_HEAD = 16 << 10  # a request's line and headers; also h11's limit while they arrive
HEAD_END = re.compile(rb"\n\r?\n")  # the blank line after the headers, as h11 finds it
NOT_HTTP = _refusal(
    "invalid_http",
    "400 Bad Request",
    "The request is not valid HTTP/1.1, or its head is over 16 KiB.",
)
# How long a refused connection stays open after its answer and the end of what the server
# sends, dropping what its client still sends, for the client to read the answer and close
# (on loopback, a fraction of a millisecond); how much it may send meanwhile (a request sent
# whole before its answer came: a head, at most 16 KiB, and a small body); and how many may
# linger at once, beside the connections' cap (the server keeps file descriptors for them:
# `process._connection_cap`; the `bodiless` flood's client closes each refused connection
# tens of milliseconds after its answer, and a loaded host held ~256 at once). Past the first
# two it is closed; past the third, the one that has lingered longest is: its end of stream
# went long ago. Reading floods of header lines for a second after their refusals took the
# normal client's p99 from 18 to 95 ms.
LINGER_S = 1.0
MAX_DROPPED = 64 << 10
MAX_LINGERING = 256


def guarded_protocol(
    max_connections: int, head_timeout_s: float, refused: Callable[[str], None]
) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a cap on open connections and a deadline per head; it
    calls `refused` with the reason of each connection it refuses."""
    too_slow = _refusal(
        "head_timeout",
        "408 Request Timeout",
        f"The request head took longer than {head_timeout_s:g} s to arrive.",
    )

    class GuardedProtocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            remote = get_remote_addr(transport)  # what uvicorn's scope["client"] holds
            self.address = remote[0] if remote else ""
            if len(self.connections) >= max_connections:
                room = _room_for(self.address)
                if room is None:
                    self.transport = transport  # connection_lost closes it
                    self.linger(TOO_MANY)
                    return
                room.close_with(TOO_MANY)
            super().connection_made(transport)
            self.pipelined = 0
            by_address.setdefault(self.address, {})[self] = None
            self.await_head()

        def data_received(self, data: bytes) -> None:
            if self in lingering:  # what the client sent before it read its refusal
                self.dropped += len(data)
                if self.dropped > MAX_DROPPED:
                    self.transport.close()
                return
            if self in waiting and waiting[self] is None:  # the next request on a kept-alive one
                self.await_head()
            if self in waiting and self.head_too_long(data):
                self.close_with(NOT_HTTP)
                return
            request = self.cycle
            super().data_received(data)
            if self.cycle is not request:  # its head arrived
                self.stop_waiting()

        def on_response_complete(self) -> None:
            # Pipelined: the client sent the next request before this answer went out.
            self.pipelined = self.pipelined + 1 if self.conn.trailing_data[0] else 0
            if self.pipelined > MAX_PIPELINED:
                self.transport.close()  # after this answer: the client must connect again
            request = self.cycle
            super().on_response_complete()  # starts a pipelined request, if one is complete
            if not self.transport.is_closing() and self.cycle is request:
                # Kept alive and idle: it may make room for a new connection. No deadline:
                # uvicorn's keep-alive timeout closes it if nothing comes.
                waiting[self] = None

        def connection_lost(self, exc: Exception | None) -> None:
            deadline = lingering.pop(self, None)
            if deadline is not None:
                deadline.cancel()
            self.forget()
            super().connection_lost(exc)

        def forget(self) -> None:
            """No longer counts as a connection that holds the server."""
            self.stop_waiting()
            self.connections.discard(self)
            if self in by_address.get(self.address, {}):
                del by_address[self.address][self]
                if not by_address[self.address]:
                    del by_address[self.address]

        def send_400_response(self, msg: str) -> None:
            self.close_with(NOT_HTTP)  # as JSON, like every other refusal

        def await_head(self) -> None:
            self.stop_waiting()
            self.head_bytes, self.head_tail = 0, b""
            waiting[self] = self.loop.call_later(head_timeout_s, self.close_with, too_slow)

        def head_too_long(self, data: bytes) -> bool:
            """Counts the bytes of the head awaited, up to its end if `data` holds it (the blank
            line may begin in the last read: its last two bytes are searched again)."""
            seen = self.head_tail + data
            end = HEAD_END.search(seen)
            self.head_bytes += (end.end() if end else len(seen)) - len(self.head_tail)
            self.head_tail = seen[-2:]
            return self.head_bytes > MAX_HEAD

        def stop_waiting(self) -> None:
            deadline = waiting.pop(self, None)
            if deadline is not None:
                deadline.cancel()

        def close_with(self, refusal: Refusal) -> None:
            self.stop_waiting()
            if self.transport.is_closing() or self in lingering:
                return
            if self.cycle is not None and self.cycle.response_started:
                self.transport.abort()  # an answer half sent: the refusal cannot follow it
                return
            if self.cycle is not None:  # a request under way (its body): it ends here
                self.cycle.disconnected = True
                self.cycle.message_event.set()
            self.forget()
            self.linger(refusal)

        def linger(self, refusal: Refusal) -> None:
            """Sends the refusal's answer and the end of the stream, then drops what the
            client sends until it closes, for at most LINGER_S (see the module's docstring)."""
            refused(refusal.reason)
            self.transport.write(refusal.answer)
            if not self.transport.can_write_eof():
                self.transport.close()
                return
            self.transport.write_eof()
            self.transport.resume_reading()  # paused while a pipelined request waited
            if len(lingering) >= MAX_LINGERING:
                # The oldest makes room: its answer and end of stream went long ago, and a
                # client that has them reads them whole, even if a reset follows them.
                oldest = next(iter(lingering))
                lingering.pop(oldest).cancel()
                oldest.transport.close()
            self.dropped = 0
            lingering[self] = self.loop.call_later(LINGER_S, self.transport.close)

    def _room_for(address: str) -> GuardedProtocol | None:
        """The connection a new one from `address` takes the place of, if any (see above)."""
        held = len(by_address.get(address, {}))
        for connection in waiting:  # oldest first
            if len(by_address[connection.address]) >= held:
                return connection
        heaviest = max(by_address.values(), key=len, default={})
        return next(iter(heaviest)) if len(heaviest) > held + 1 else None

    # The connections waiting for a request, oldest first (a dict keeps insertion order), with
    # the deadlines of their heads (None: idle between requests on a kept-alive connection);
    # and every connection by client address, oldest first.
    waiting: dict[GuardedProtocol, asyncio.TimerHandle | None] = {}
    by_address: dict[str, dict[GuardedProtocol, None]] = {}
    # The refused connections still open, with the deadlines that close them.
    lingering: dict[GuardedProtocol, asyncio.TimerHandle] = {}
    return GuardedProtocol
