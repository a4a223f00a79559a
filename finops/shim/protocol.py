"""The shim's HTTP/1.1 server protocol: uvicorn's httptools one, with limits on the request head.

Why: uvicorn's httptools protocol (chosen for its CPU cost, see server.py) has no
limit on the size of a request head and no timeout for receiving one. One client
sending an endless header line grew the shim's memory without bound and stalled
every other client (the parser's time grows with the square of the head), and
connections that sent nothing, or a byte now and then, were kept forever. Here:

- a head over `MAX_HEAD_BYTES` gets a 431 and the connection is closed
  (RFC 6585 5; nginx and h11 stop at 8-32 KiB, OpenAI clients send ~1 KiB);
- a head not received within the shim's `[limits] body_timeout_s` (the time a
  client has to send its request) gets a 408 and the connection is closed; a
  connection idle between requests is uvicorn's keep-alive timeout's;
- uvicorn's own refusals of malformed requests come in OpenAI's error shape;
- a request answered before its body was read (a chunked body over the size limit
  gets its 413 at once) has `body_timeout_s` more to finish sending it, then the
  connection is closed, lingering so the answer is not lost to a reset;
- a response of unknown length (an SSE stream) to an HTTP/1.0 client is sent as it
  comes and ended by closing the connection (RFC 9112 6.3): uvicorn would send it
  chunked, which HTTP/1.0 has no notion of, so the client read chunk sizes as data.

Both are counted in /metrics (`finops_shim_refused_connections_total`) and said in
one log line each; they are not request-log records (no request was read).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from finops.shim.proxy import error_body

logger = logging.getLogger("finops.shim")

MAX_HEAD_BYTES = 64 * 1024
LINGER_S = 2.0  # how long a refused connection's further bytes are read and dropped

_REASONS = {
    400: b"Bad Request",
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
}


class HeadRefused(Exception):
    """Raised in a parser callback to stop parsing a connection refused with a 431."""


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head size limit and a head timeout."""

    max_head_bytes = MAX_HEAD_BYTES
    # the current timeout, read per connection (a config reload changes it)
    head_timeout: Callable[[], float] = staticmethod(lambda: 30.0)
    on_refused: Callable[[str], None] = staticmethod(lambda reason: None)

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._in_head = True
        self._head_bytes = 0
        self._discarding = False
        self._messages = 0  # requests whose head was read on this connection
        self._body_done = True  # the current request's body has been read to its end
        # when the head being waited for began: the connection's start, then each
        # request's first bytes (a connection idle between requests is not in a head:
        # uvicorn's keep-alive timeout closes it)
        self._head_since = self.loop.time()
        self._waiting = True  # a head is due: a fresh connection, or one with bytes in
        # One timer per connection, re-armed lazily when it fires (as h1client's
        # ReadDeadline does): a timer per request cost ~10% of the shim's CPU per request.
        self._head_timer: asyncio.TimerHandle | None = self.loop.call_later(
            self.head_timeout(), self._check_head
        )

    def data_received(self, data: bytes) -> None:
        if self._discarding:  # refused: what the client still sends is dropped
            return
        if self._in_head:
            if not self._head_bytes:
                self._head_since = self.loop.time()
                self._waiting = True
            self._head_bytes += len(data)
        super().data_received(data)
        if self._in_head and self._head_bytes > self.max_head_bytes:
            self._refuse(
                431,
                "request_header_fields_too_large",
                f"The request head exceeds {self.max_head_bytes} bytes.",
            )

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._waiting = False
        if self._head_bytes > self.max_head_bytes and self._head_size() > self.max_head_bytes:
            # the head ended in the read that crossed the limit (data_received's check
            # comes after the parser, when the head is already complete)
            self._refuse(
                431,
                "request_header_fields_too_large",
                f"The request head exceeds {self.max_head_bytes} bytes.",
            )
            # stops the parser on this read: the connection is closed, no request runs
            raise HeadRefused
        self._messages += 1
        self._body_done = False
        super().on_headers_complete()
        if self.scope.get("http_version") == "1.0" and self.cycle is not None:
            # the app's task has not run yet: it will call this send
            self.cycle.send = _close_delimited_send(self.cycle)  # type: ignore[method-assign]

    def _head_size(self) -> int:
        """The parsed head's size: request line, header lines, blank line (the bytes
        received may run on into the body)."""
        return (
            len(self.url)
            + sum(len(k) + len(v) + 4 for k, v in self.headers)
            + len(self.parser.get_method())
            + 14  # " ", " HTTP/1.1\r\n", "\r\n"
        )

    def on_message_complete(self) -> None:
        super().on_message_complete()
        # what comes next on this connection is the next request's head
        self._body_done = True
        self._in_head = True
        self._head_bytes = 0

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self._body_done and not self.transport.is_closing():
            # answered before its body was read (a chunked body over max_body_bytes gets
            # its 413 at once): uvicorn drops the rest as it comes, for as long as the
            # client sends. The client has body_timeout_s to finish, then the
            # connection is closed the lingering way (what it sends is not read again)
            self.loop.call_later(self.head_timeout(), self._end_unread_body, self._messages)

    def _end_unread_body(self, message: int) -> None:
        if message == self._messages and not self._body_done and not self.transport.is_closing():
            logger.warning(
                "closed a connection still sending a request body %g s after it was answered",
                self.head_timeout(),
            )
            self.on_refused("unread_body")
            self._linger()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _answering(self) -> bool:
        """A response is still going out on this connection (the head being received is
        a pipelined next request's)."""
        return self.cycle is not None and not self.cycle.response_complete

    def _check_head(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        timeout = self.head_timeout()
        now = self.loop.time()
        due = self._head_since + timeout
        late = self._in_head and self._waiting and now >= due
        if not late or self._answering():  # a slow pipelined head waits for the answer
            self._head_timer = self.loop.call_at(
                due if self._in_head and self._waiting and now < due else now + timeout,
                self._check_head,
            )
            return
        if self._head_bytes:
            self._refuse(408, "request_timeout", f"Request head not received within {timeout:g} s.")
        else:  # connected and said nothing: nobody to answer
            self.on_refused("idle_connection")
            self.transport.close()

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request it cannot parse, in OpenAI's shape."""
        self._refuse(400, "invalid_http_request", f"{msg} (the HTTP/1.1 framing is malformed)")

    def _refuse(self, status: int, code: str, message: str) -> None:
        if self._discarding or self.transport.is_closing():
            return
        self._disarm_head_timer()
        self._in_head = False
        peer = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        logger.warning("refused a request from %s: %d %s", peer, status, message)
        self.on_refused(code)
        if self._answering():
            # an answer is mid-way on this connection: a refusal written now would land
            # inside it, so the connection just closes (the client broke it)
            self.transport.close()
            return
        body = error_body(message, "invalid_request_error", code)
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
            b"connection: close\r\n\r\n%s" % (status, _REASONS[status], len(body), body)
        )
        self._linger()

    def _linger(self) -> None:
        """Close after the answer without losing it: the write side is shut once it is
        sent, and what the client still sends is read and dropped for up to LINGER_S.

        A socket closed with bytes unread makes the kernel reset the connection, and a
        client still sending its (oversized) request then reads the reset instead of
        the answer (nginx's lingering_close does the same for the same reason).
        """
        self._discarding = True
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)


def _close_delimited_send(cycle: Any) -> Callable[[dict], Any]:
    """uvicorn's `send` for an HTTP/1.0 request: a response with neither a length nor
    a transfer coding goes out as a body ended by the connection's close.

    uvicorn (0.3x) has no such mode; its length-delimited one does it when told, per
    body message, that the length is that message's (HTTP/1.0 connections are never
    kept alive, so uvicorn closes the connection at the end).
    """
    send = cycle.send
    close_delimited = False

    async def send_10(message: dict) -> None:
        nonlocal close_delimited
        if message["type"] == "http.response.start":
            names = {bytes(k).lower() for k, _ in message.get("headers", ())}
            if b"content-length" not in names and b"transfer-encoding" not in names:
                close_delimited = True
                cycle.chunked_encoding = False
        elif close_delimited and message["type"] == "http.response.body":
            cycle.expected_content_length = len(message.get("body", b""))
        await send(message)

    return send_10


def guarded_protocol(
    head_timeout: Callable[[], float], on_refused: Callable[[str], None] | None = None
) -> type[GuardedHttpToolsProtocol]:
    """The protocol class for one server: `head_timeout()` gives the current limit."""
    attrs: dict[str, Any] = {"head_timeout": staticmethod(head_timeout)}
    if on_refused is not None:
        attrs["on_refused"] = staticmethod(on_refused)
    return type("GuardedHttpToolsProtocol", (GuardedHttpToolsProtocol,), attrs)
