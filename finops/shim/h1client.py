"""A lean HTTP/1.1 keep-alive client for the proxy's upstream calls.

Why not httpx on this path: profiling the shim against a fast loopback
upstream showed httpx/httpcore spending ~1 ms of CPU per request at
concurrency 1 (request building, anyio wrappers, per-request pool scans of
every connection's socket state), and the pool scan grows with the number of
connections, so at concurrency 32+ the proxy collapsed to a few hundred
requests/s. This client does only what talking to vLLM needs: one write per
request, `Content-Length` or `chunked` bodies, a LIFO pool of idle
keep-alive connections per upstream with an expiry, and a bounded number of
connections per upstream. httpx is still used for the control plane (health
checks, /tokenize).

Errors are mapped by the caller: `ConnectError` (refused / unreachable /
connect timeout), `Disconnected` (the upstream closed or reset the
connection); timeouts are the caller's `asyncio.timeout`.

A POST is never sent twice here, even when a reused keep-alive connection turns
out dead: once written, the upstream may have it (and be generating), so the
failure goes to the caller, whose fallback policy counts and logs it (as nginx
and Go's transport do for non-idempotent requests). Idle connections are dropped
before the upstream's own keep-alive timeout (uvicorn's, under vLLM, is 5 s) so
that race stays rare. A connection is only reused when its response was framed
exactly: bytes left over after a body, or framing RFC 9112 says to distrust
(Transfer-Encoding with Content-Length), close it instead, so one response can
never be read as the start of another.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import re
import socket
import time
from collections.abc import AsyncIterator, Callable
from typing import Any
from urllib.parse import urlsplit

# below uvicorn's default keep-alive (5 s, what vLLM's server runs with): the shim lets
# go of an idle connection before the upstream can close it under a request being sent
KEEPALIVE_EXPIRY_S = 4.0
_STREAM_LIMIT = 1 << 20
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: [^\r\n]*)?")


class ConnectError(OSError):
    pass


class Disconnected(OSError):
    pass


class OutOfResources(ConnectError):
    """The shim's own process or host ran out (file descriptors, buffers, memory) making
    a connection: not the upstream's failure, so not held against its circuit."""


# errno values of socket()/connect() that say this host is short of something
_LOCAL_SHORTAGE = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class _Conn:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < KEEPALIVE_EXPIRY_S
            # bytes that arrived after the last response ended belong to no request
            and not _buffered(self.reader)
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


def _buffered(reader: asyncio.StreamReader) -> int:
    """Bytes read from the socket and not yet consumed (StreamReader keeps them in `_buffer`)."""
    return len(getattr(reader, "_buffer", b""))


def _content_length(value: str) -> int:
    """A Content-Length as RFC 9110 has it (digits only); ValueError otherwise."""
    if not value.isdigit() or not value.isascii():
        raise ValueError(f"bad Content-Length {value[:40]!r}")
    return int(value)


class ReadDeadline:
    """Cancel the task when one read waits longer than `timeout` s, for a whole stream.

    `asyncio.timeout` around every chunk of a token stream costs a timer per chunk
    (about 6 us each, hundreds of chunks per answer); this keeps one timer per stream
    and re-arms it lazily when it fires: marking a read's start and end is two stores.
    Time the consumer spends between reads (a slow client) does not count.
    """

    __slots__ = ("_cancelling", "_handle", "_loop", "_task", "active", "fired", "since", "timeout")

    def __init__(self, timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._cancelling = task.cancelling()
        self.timeout = timeout
        self.since = 0.0
        self.active = False
        self.fired = False
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def _check(self) -> None:
        now = self._loop.time()
        if self.active and now - self.since >= self.timeout:
            self.fired = True
            self._handle = None
            self._task.cancel()
            return
        due = self.since + self.timeout if self.active else now + self.timeout
        self._handle = self._loop.call_at(due, self._check)

    async def read(self, aw: Any) -> Any:
        """Await one read under the deadline; TimeoutError when it waited too long."""
        self.since = self._loop.time()
        self.active = True
        try:
            return await aw
        except asyncio.CancelledError:
            if self.expired():
                raise TimeoutError(f"no data for {self.timeout:g} s") from None
            raise
        finally:
            self.active = False

    def expired(self) -> bool:
        """After a CancelledError: was it this deadline's (then it is consumed)?"""
        return self.fired and self._task.uncancel() <= self._cancelling

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Response:
    """Status and headers are read; the body is read with `read()` or `iter_chunks()`."""

    __slots__ = ("_done", "_host", "_pool", "conn", "headers", "reusable", "status")

    def __init__(
        self, pool: HostPool, conn: _Conn, status: int, headers: dict[str, str], reusable: bool
    ) -> None:
        self._pool = pool
        self.conn = conn
        self.status = status
        self.headers = headers
        self.reusable = reusable
        self._done = False

    def _framing(self) -> tuple[bool, int | None]:
        """(chunked, content length or None = read to the end), per RFC 9112 6.3.

        Transfer-Encoding overrides Content-Length (and such a response's connection is
        not reused); a coding other than a final `chunked` is read until the upstream
        closes. 1xx, 204 and 304 answers have no body.
        """
        if self.status in (204, 304) or self.status < 200:
            return False, 0
        te = self.headers.get("transfer-encoding")
        if te is not None:
            if "content-length" in self.headers:
                self.reusable = False
            if te.rsplit(",", 1)[-1].strip().lower() == "chunked":
                return True, None
            self.reusable = False
            return False, None
        cl = self.headers.get("content-length")
        if cl is not None:
            return False, _content_length(cl)
        self.reusable = False
        return False, None

    async def read(self) -> bytes:
        r = self.conn.reader
        try:
            chunked, length = self._framing()
            if chunked:
                parts = [c async for c in self._chunked()]
                data = b"".join(parts)
            elif length is not None:
                data = await r.readexactly(length)
            else:
                data = await r.read()
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,  # a chunk size or Content-Length that is not a number
        ) as exc:
            self.close()
            raise Disconnected(
                f"upstream closed the connection or broke HTTP framing mid-body: "
                f"{type(exc).__name__}"
            ) from None
        self.release()
        return data

    async def _chunked(self) -> AsyncIterator[bytes]:
        r = self.conn.reader
        while True:
            line = await r.readuntil(b"\r\n")
            token = line.split(b";", 1)[0].strip()
            if not token or token.strip(b"0123456789abcdefABCDEF"):
                raise ValueError(f"bad chunk size {line[:40]!r}")
            size = int(token, 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return
            data = await r.readexactly(size + 2)
            if data[-2:] != b"\r\n":
                raise ValueError("chunk data not followed by CRLF")
            yield data[:-2]

    async def iter_chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (de-chunked); a wait over `idle_timeout` raises
        TimeoutError."""
        r = self.conn.reader
        dl = ReadDeadline(idle_timeout)
        try:
            chunked, left = self._framing()
            if chunked:
                it = self._chunked().__aiter__()
                while True:
                    try:
                        piece = await dl.read(it.__anext__())
                    except StopAsyncIteration:
                        break
                    yield piece
            else:
                while left is None or left > 0:
                    piece = await dl.read(r.read(65536 if left is None else min(65536, left)))
                    if not piece:
                        if left:
                            raise asyncio.IncompleteReadError(b"", left)
                        break
                    if left is not None:
                        left -= len(piece)
                    yield piece
        except (
            asyncio.IncompleteReadError,
            asyncio.LimitOverrunError,
            ConnectionError,
            ValueError,
        ) as exc:
            self.close()
            raise Disconnected(
                f"upstream closed the connection or broke HTTP framing mid-stream: "
                f"{type(exc).__name__}"
            ) from None
        finally:
            dl.close()
        self.release()

    def release(self) -> None:
        """Body fully read: the connection goes back to the pool (or is closed)."""
        if self._done:
            return
        self._done = True
        if self.reusable and not _buffered(self.conn.reader):
            self._pool.put(self.conn)
        else:
            self.conn.close()
            self._pool.forget()

    def close(self) -> None:
        """Abort: close the connection (the upstream sees the client go away)."""
        if self._done:
            return
        self._done = True
        self.conn.close()
        self._pool.forget()


def _reason(exc: OSError) -> str:
    """The OS's reason, without the address asyncio puts in its `strerror` ("Connect
    call failed ('10.0.0.1', 8000)"): the caller names the replica its own way."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        # a name lookup's errno is an EAI_* code (negative): os.strerror reads
        # "Unknown error -2"; its own text ("Name or service not known") names no host
        if exc.errno is None and "Multiple exceptions" in str(exc):
            # asyncio tried each address the name resolves to and lists them all
            # ("('10.1.2.3', 8000)"): pod IPs are not for tenants
            return "connect failed to every address the name resolves to"
        return exc.strerror or str(exc)
    with contextlib.suppress(ValueError):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


class HostPool:
    """Keep-alive connections to one upstream, at most `max_connections` at a time."""

    def __init__(self, root_url: str, max_connections: int, connect_timeout: float) -> None:
        u = urlsplit(root_url)
        if u.scheme not in ("http", "https"):
            raise ValueError(f"unsupported upstream URL {root_url!r}")
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or (443 if u.scheme == "https" else 80)
        self.ssl = u.scheme == "https"
        self.prefix = u.path.rstrip("/")
        self.host_header = f"{self.host}:{self.port}".encode()
        self.connect_timeout = connect_timeout
        self._idle: list[_Conn] = []
        self._sem = asyncio.Semaphore(max_connections)
        self.open = 0

    def put(self, conn: _Conn) -> None:
        conn.idle_since = time.monotonic()
        self._idle.append(conn)
        self._sem.release()

    def forget(self) -> None:
        self.open -= 1
        self._sem.release()

    async def _connect(self) -> _Conn:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, ssl=self.ssl or None, limit=_STREAM_LIMIT
                )
        except TimeoutError:
            # the caller names the replica (its URL in the log, its name to clients)
            raise ConnectError(f"connect timed out after {self.connect_timeout:g} s") from None
        except OSError as exc:
            if exc.errno in _LOCAL_SHORTAGE:
                raise OutOfResources(
                    f"connect to {self.host}:{self.port} failed in the shim itself: "
                    f"{_reason(exc)} (raise `ulimit -n`, or fewer connections)"
                ) from None
            raise ConnectError(f"connect failed: {_reason(exc)}") from None
        self.open += 1
        return _Conn(reader, writer)

    def _take_idle(self) -> _Conn | None:
        now = time.monotonic()
        while self._idle:
            c = self._idle.pop()
            if c.usable(now):
                return c
            c.close()
            self.open -= 1
        return None

    async def acquire(self, timeout: float) -> bool:
        """Take a connection slot for `request(..., acquired=True)`; False if none
        frees up within `timeout` s. (Free slots cost no timer.)"""
        if not self._sem.locked():
            await self._sem.acquire()  # returns at once
            return True
        try:
            async with asyncio.timeout(timeout):
                await self._sem.acquire()
        except TimeoutError:
            return False
        return True

    async def request(
        self,
        method: bytes,
        path: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        *,
        acquired: bool = False,
        on_write: Callable[[], None] | None = None,
    ) -> Response:
        """Send one request; returns once status and headers are in.

        `acquired`: the caller holds a slot from `acquire`, which this takes over (and
        gives back on failure, as the Response does once done). `on_write` is called
        once the request is written: from then on the upstream may be working on it.
        """
        head = [
            method,
            b" ",
            (self.prefix + path).encode(),
            b" HTTP/1.1\r\nhost: ",
            self.host_header,
            b"\r\ncontent-length: ",
            str(len(body)).encode(),
            b"\r\n",
        ]
        for k, v in headers:
            head += [k, b": ", v, b"\r\n"]
        head.append(b"\r\n")
        payload = b"".join(head) + body
        if not acquired:
            await self._sem.acquire()
        try:
            conn = self._take_idle()
            if conn is None:
                conn = await self._connect()
            # once written, the request is the upstream's: no second send from here
            return await self._exchange(conn, payload, on_write)
        except BaseException:
            self._sem.release()
            raise

    async def _exchange(
        self, conn: _Conn, payload: bytes, on_write: Callable[[], None] | None = None
    ) -> Response:
        try:
            conn.writer.write(payload)
            if on_write is not None:
                on_write()
            while True:
                head = await conn.reader.readuntil(b"\r\n\r\n")
                lines = head[:-4].split(b"\r\n")
                m = _STATUS_LINE.fullmatch(lines[0])
                if m is None:
                    raise ValueError(f"a malformed status line {lines[0][:80]!r}")
                status = int(m[2])
                # 1xx (100 Continue, 103 Early Hints) are interim: the answer follows
                if status >= 200 or status == 101:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as exc:
            conn.close()
            self.open -= 1
            raise Disconnected(
                f"upstream {self.host}:{self.port} closed the connection before answering: {type(exc).__name__}"
            ) from None
        except ValueError as exc:
            conn.close()
            self.open -= 1
            raise Disconnected(f"upstream {self.host}:{self.port} sent {exc}") from None
        except BaseException:
            conn.close()
            self.open -= 1
            raise
        headers: dict[str, str] = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            name = k.strip().lower().decode("latin-1")
            value = v.strip().decode("latin-1")
            if name in headers and name in ("content-length", "transfer-encoding"):
                # repeated framing headers: equal lengths are one length (RFC 9110 8.6),
                # anything else is refused when the body is read
                if name == "content-length" and value != headers[name]:
                    value = "conflicting"
                elif name == "transfer-encoding":
                    value = headers[name] + ", " + value
            headers[name] = value
        reusable = headers.get("connection", "").lower() != "close" and m[1] == b"1"
        # hand over: the Response now owns the semaphore slot and the connection
        return Response(self, conn, status, headers, reusable)

    def close(self) -> None:
        for c in self._idle:
            c.close()
        self._idle.clear()


class Client:
    """One HostPool per upstream root URL."""

    def __init__(self, max_connections: int, connect_timeout: float) -> None:
        self.max_connections = max_connections
        self.connect_timeout = connect_timeout
        self._pools: dict[str, HostPool] = {}

    def pool(self, root_url: str) -> HostPool:
        p = self._pools.get(root_url)
        if p is None:
            p = self._pools[root_url] = HostPool(
                root_url, self.max_connections, self.connect_timeout
            )
        return p

    def close(self) -> None:
        for p in self._pools.values():
            p.close()
