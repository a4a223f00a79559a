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
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

KEEPALIVE_EXPIRY_S = 30.0
_STREAM_LIMIT = 1 << 20


class ConnectError(OSError):
    pass


class Disconnected(OSError):
    pass


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
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()


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

    async def read(self) -> bytes:
        r = self.conn.reader
        try:
            cl = self.headers.get("content-length")
            if cl is not None:
                data = await r.readexactly(int(cl))
            elif self.headers.get("transfer-encoding", "").lower() == "chunked":
                parts = [c async for c in self._chunked()]
                data = b"".join(parts)
            else:
                data = await r.read()
                self.reusable = False
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
            size = int(line.split(b";", 1)[0], 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers
                    pass
                return
            data = await r.readexactly(size + 2)
            yield data[:-2]

    async def iter_chunks(self, idle_timeout: float) -> AsyncIterator[bytes]:
        """Body pieces as they arrive (de-chunked); a wait over `idle_timeout` raises
        TimeoutError."""
        r = self.conn.reader
        dl = ReadDeadline(idle_timeout)
        try:
            if self.headers.get("transfer-encoding", "").lower() == "chunked":
                it = self._chunked().__aiter__()
                while True:
                    try:
                        piece = await dl.read(it.__anext__())
                    except StopAsyncIteration:
                        break
                    yield piece
            else:
                left = (
                    int(self.headers["content-length"])
                    if "content-length" in self.headers
                    else None
                )
                if left is None:
                    self.reusable = False
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
        if self.reusable:
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
            raise ConnectError(
                f"connect to {self.host}:{self.port} timed out after {self.connect_timeout:g} s"
            ) from None
        except OSError as exc:
            raise ConnectError(
                f"connect to {self.host}:{self.port} failed: {exc.strerror or exc}"
            ) from None
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

    async def request(
        self, method: bytes, path: str, body: bytes, headers: list[tuple[bytes, bytes]]
    ) -> Response:
        """Send one request; returns once status and headers are in."""
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
        await self._sem.acquire()
        try:
            conn = self._take_idle()
            reused = conn is not None
            if conn is None:
                conn = await self._connect()
            try:
                return await self._exchange(conn, payload)
            except Disconnected:
                if not reused:
                    raise
                # a kept-alive connection the upstream had already closed: one fresh try
                conn = await self._connect()
                return await self._exchange(conn, payload)
        except BaseException:
            self._sem.release()
            raise

    async def _exchange(self, conn: _Conn, payload: bytes) -> Response:
        try:
            conn.writer.write(payload)
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError) as exc:
            conn.close()
            self.open -= 1
            raise Disconnected(
                f"upstream {self.host}:{self.port} closed the connection before answering: {type(exc).__name__}"
            ) from None
        except BaseException:
            conn.close()
            self.open -= 1
            raise
        lines = head[:-4].split(b"\r\n")
        parts = lines[0].split(b" ", 2)
        try:
            status = int(parts[1])
        except (IndexError, ValueError):
            conn.close()
            self.open -= 1
            raise Disconnected(
                f"upstream {self.host}:{self.port} sent a malformed status line {lines[0][:80]!r}"
            ) from None
        headers: dict[str, str] = {}
        for ln in lines[1:]:
            k, _, v = ln.partition(b":")
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
        reusable = headers.get("connection", "").lower() != "close" and parts[0] == b"HTTP/1.1"
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
