"""The fast path: one raw ASGI endpoint per OpenAI operation.

Raw ASGI (not Starlette Request/Response objects) because every microsecond
here is added latency for every token stream: headers are scanned once,
the body is parsed once with orjson, the upstream body is re-serialized once
per attempt, and non-streaming upstream bytes are passed through untouched.

Order of work for a request: auth -> parse -> resolve model (alias ->
router, explicit name -> policy) -> context cap -> idempotency -> cache /
coalescing -> upstream attempts with fallback (before the first byte) ->
respond -> one request-log record (queued, never blocking).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
import re
import time
import uuid
from typing import TYPE_CHECKING, Any, NoReturn

import orjson

from finops.router.features import body_text, estimate_prompt_tokens
from finops.shim.auth import DUPLICATE as AUTH_DUPLICATE
from finops.shim.auth import AuthError, tenant_for
from finops.shim.cache import (
    SKIPPED,
    assemble_stream,
    cache_key,
    is_deterministic,
    replay_as_sse,
)
from finops.shim.caps import (
    CapOutcome,
    TokenCounter,
    applicable_cap,
    apply_cap,
    estimate_body_tokens,
)
from finops.shim.h1client import ConnectError, Disconnected, OutOfResources, Response
from finops.shim.requestlog import iso_utc, new_record, redact
from finops.shim.upstreams import STATE_NAMES, Pool, Upstream

if TYPE_CHECKING:
    from collections.abc import Coroutine, Iterable

    from finops.shim.app import Shim
    from finops.shim.policy import Router

JSON_CT = (b"content-type", b"application/json")
CONNECTION_CLOSE = (b"connection", b"close")
SSE_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]
DONE = b"data: [DONE]\n\n"
# a long stream yields to the event loop at least this often, so a client disconnect is seen
YIELD_EVERY_S = 0.005
# one SSE event's most bytes: a Responses stream's last event holds the whole answer; an
# upstream past this without an event's end is broken (the shim would buffer it all)
MAX_EVENT_BYTES = 16 * 1024 * 1024
# A cacheable (or Idempotency-Key) stream keeps its chunks, parsed, to rebuild the answer
# (~1 kB of memory per token); past this many bytes of events it stops and the answer is
# not cached: five 100k-token greedy streams at once held 300 MB.
MAX_COLLECT_BYTES = 4 * 1024 * 1024
# a request still waiting on its upstream after this long starts watching for its client leaving
WATCH_AFTER_S = 0.02
# a duplicate Idempotency-Key request polls the shared store this often while another
# process runs the key (first and longest interval)
CLAIM_POLL_S = 0.05
CLAIM_POLL_MAX_S = 0.25


class ClientGone(Exception):
    """The client disconnected before its answer was complete."""


class SendStallGuard:
    """Ends a stream whose client has stopped taking its bytes for `timeout` seconds, as
    nginx's `send_timeout` does: the connection is aborted, which the server reports as
    the client leaving, so the upstream request is cancelled (the GPU freed, the
    connection back in the pool) and the record written. Without it a client that stopped
    reading (a paused debugger, a phone gone to sleep) held both for as long as its socket
    lived.

    One timer per stream, re-armed only when it fires; the stream marks each write's start
    (`since`) and end (None). Works with uvicorn's connection (`send` is a method of its
    request cycle); with any other server it stays off.
    """

    __slots__ = ("_abort", "_handle", "_loop", "_timeout", "since", "stalled")

    def __init__(self, send: Any, timeout: float) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        self._abort = getattr(transport, "abort", None)
        self._timeout = timeout
        self.since: float | None = None
        self.stalled = False
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = (
            self._loop.call_later(timeout, self._check) if self._abort is not None else None
        )

    def _check(self) -> None:
        since = self.since
        waited = 0.0 if since is None else time.perf_counter() - since
        if waited >= self._timeout and self._abort is not None:
            self._handle = None
            self.stalled = True
            self._abort()
            return
        self._handle = self._loop.call_later(self._timeout - waited, self._check)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class DisconnectWatch:
    """Cancel the request's task when its client disconnects while the upstream works.

    Created once the body is read (until then `receive()` carries the body) and stopped
    before the response's last write: once a response is complete, the server answers
    every `receive()` with `http.disconnect`. The cancellation reaches whatever the request
    awaits (the upstream call, a token read): the upstream connection is closed, so vLLM
    aborts the generation, and no fallback is tried for a client that is gone.

    The watching task starts only after `WATCH_AFTER_S`: most answers of a fast upstream
    are done by then and never pay for a task, while a client leaving a generation that
    runs for seconds is still seen within that delay.
    """

    __slots__ = ("_me", "_receive", "_start", "_task", "gone")

    def __init__(self, receive: Any) -> None:
        self.gone = False
        me = self._me = asyncio.current_task()
        self._receive = receive
        self._task: asyncio.Task | None = None
        self._start: asyncio.TimerHandle | None = (
            me.get_loop().call_later(WATCH_AFTER_S, self._begin) if me is not None else None
        )

    def _begin(self) -> None:
        self._start = None
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            msg = await self._receive()
            if msg["type"] == "http.disconnect":
                self.gone = True
                if self._me is not None:
                    self._me.cancel()
                return

    def stop(self) -> None:
        if self._start is not None:
            self._start.cancel()
            self._start = None
        if self._task is not None:
            self._task.cancel()

    async def run(self, aw: Any) -> Any:
        """Await `aw` under this watch (then stopped); ClientGone if the client leaves."""
        try:
            return await aw
        except asyncio.CancelledError:
            if not self.absorb():
                raise
            raise ClientGone() from None
        finally:
            self.stop()

    def absorb(self) -> bool:
        """After a CancelledError: True (and the cancellation consumed) if it was ours."""
        if not self.gone or self._me is None:
            return False
        self._me.uncancel()
        self._me = None
        return True


class UpstreamFailure(Exception):
    def __init__(
        self,
        reason: str,
        status: int,
        message: str,
        body: bytes | None = None,
        retry_after: str | None = None,
    ) -> None:
        super().__init__(message)
        # connect | timeout | http_5xx | rate_limited | disconnect | bad_response
        self.reason = reason
        self.status = status
        self.message = message
        self.body = body
        self.retry_after = retry_after  # the upstream's Retry-After (429, 503)


class LeaderFailure:
    """What a coalescing leader's client got when the upstream failed it (a status, an
    error body, no answer to keep): its followers get the same instead of calling again."""

    __slots__ = ("body", "error_type", "headers", "status", "tier")

    def __init__(
        self,
        status: int,
        body: bytes,
        error_type: str,
        headers: list[tuple[bytes, bytes]],
        tier: str | None,
    ) -> None:
        self.status = status
        self.body = body
        self.error_type = error_type
        self.headers = list(headers)
        self.tier = tier

    def for_follower(self, ctx: Ctx) -> HTTPError:
        """The error a follower answers; its record: the leader's tier, no tokens."""
        exc = HTTPError(self.status, "", "server_error")
        exc.body = self.body
        exc.error_type = self.error_type
        exc.headers = list(self.headers)
        ctx.tier = self.tier
        rec = ctx.rec
        rec["tier"] = self.tier
        rec["input_tokens"] = 0
        rec["output_tokens"] = 0
        rec["cached_input_tokens"] = 0
        return exc


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return orjson.dumps(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}
    )


class HTTPError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str,
        code: str | None = None,
        error_type: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        # `param` names the request field at fault, as OpenAI's errors do (the SDK's `.param`)
        self.body = error_body(message, type_, code, param)
        self.error_type = error_type or code or type_
        self.headers: list[tuple[bytes, bytes]] = []  # extra response headers


async def read_body(receive: Any, limit: int, timeout: float, declared: int | None) -> bytes:
    if declared is not None and declared > limit:
        exc = HTTPError(
            413,
            f"Request body of {declared} bytes exceeds the limit of {limit} bytes.",
            "invalid_request_error",
            "request_too_large",
        )
        # refused unread: closing spares reading (and discarding) all of it, as nginx does
        exc.headers.append(CONNECTION_CLOSE)
        raise exc
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            while True:
                msg = await receive()
                if msg["type"] == "http.disconnect":
                    raise ClientGone()
                b = msg.get("body", b"")
                if b:
                    size += len(b)
                    if size > limit:
                        # answered at once; the rest of the body is read and dropped as
                        # it comes, so the client reads the 413 rather than a reset (a
                        # connection closed under an upload loses the answer)
                        raise HTTPError(
                            413,
                            f"Request body exceeds the limit of {limit} bytes.",
                            "invalid_request_error",
                            "request_too_large",
                        )
                    chunks.append(b)
                if not msg.get("more_body", False):
                    break
    except TimeoutError:
        raise HTTPError(
            408,
            f"Request body not received within {timeout:g} s.",
            "invalid_request_error",
            "request_timeout",
        ) from None
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def _fingerprint_prompt(body: dict) -> str:
    src = body.get("messages") if "messages" in body else body.get("prompt")
    return hashlib.sha256(orjson.dumps(src, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32]


# a logged prompt is cut to about this many characters: a record must stay loadable (the
# log ingester refuses lines over 1 MiB). A cut keeps the head and the tail, which are
# what the router reads (features.clip_words), so a router trained from the log sees the
# text it is served, redaction aside; the middle of a long paste is dropped.
PROMPT_LOG_CHARS = 32_768
# of those, the tail's share: many times the router's tail window, so what a cut leaves
# hanging (trimmed below) never reaches into the part the router reads
PROMPT_LOG_TAIL_CHARS = 4096
# names a client chooses (model, feature header) are cut to this in the record
NAME_LOG_CHARS = 200


def _prompt_text(body: dict) -> str:
    """The prompt as the router reads it (features.body_text), redacted, for the log.

    The same function as `route()`: a router trained from the log must see the text it
    is served (a token-ID prompt has none: ""). Over PROMPT_LOG_CHARS it keeps the head
    and the last PROMPT_LOG_TAIL_CHARS. Only what is logged is redacted (redaction is
    linear but runs on the event loop: 0.4 s for a 1 MB prompt); see `_redacted_end`
    for why a cut never leaves part of an address or number unredacted.
    """
    text, _ = body_text(body)
    if not text:
        return ""
    if len(text) <= PROMPT_LOG_CHARS:
        return redact(text)
    red, whole = _redacted_end(text, PROMPT_LOG_CHARS, tail=False)
    if whole and len(red) <= PROMPT_LOG_CHARS:
        return red  # redacted, it fits whole
    end = red if whole else _redacted_end(text, PROMPT_LOG_TAIL_CHARS, tail=True)[0]
    head = red[: PROMPT_LOG_CHARS - PROMPT_LOG_TAIL_CHARS]
    head = head[:-_TRIM] + _CUT_TAIL.sub("", head[-_TRIM:])
    end = end[-PROMPT_LOG_TAIL_CHARS:]
    end = _CUT_HEAD.sub("", end[:_TRIM]) + end[_TRIM:]
    return (
        f"{head}\n[... the middle is not logged: the prompt has {len(text)} characters ...]\n{end}"
    )


def _redacted_end(text: str, n: int, *, tail: bool) -> tuple[str, bool]:
    """The redacted head (or tail) of `text`, at least n + PROMPT_WINDOW_SLACK long where
    the text allows, and whether it is the whole text.

    The raw window grows until its redacted text runs PROMPT_WINDOW_SLACK past the cut:
    redaction shortens text (many e-mails become [EMAIL]), and whatever the window's raw
    edge split (half an address, half a card) must stay beyond the cut.
    """
    window = n + PROMPT_WINDOW_SLACK
    while True:
        red = redact(text[-window:] if tail else text[:window])
        if window >= len(text) or len(red) >= n + PROMPT_WINDOW_SLACK:
            return red, window >= len(text)
        window *= 2


# how far past the logged length the redacted window must reach (longer than any one
# address or number, so the one the raw edge split is never kept)
PROMPT_WINDOW_SLACK = 1024
# what a cut leaves hanging: digits and separators, or part of a [PLACEHOLDER]; looked
# for only in the last (first) _TRIM characters: an unanchored run ending in `$` is
# quadratic (9 s for a head of 32k spaces and an "x")
_TRIM = 80
_CUT_TAIL = re.compile(r"(?:[\d\s().+_-]+|\[[A-Z]*)$")
_CUT_HEAD = re.compile(r"^(?:[\d\s().+_-]+|[A-Z]*\])")


class Ctx:
    """Per-request state that ends up in the request-log record."""

    __slots__ = (
        "answer",
        "answered_at",
        "body",
        "body_unsent",
        "cache_header",
        "client_request_id",
        "content_encoding",
        "continuous_usage",
        "failure",
        "feature",
        "first_byte_at",
        "include_usage",
        "input_count",
        "keep_result",
        "known_count",
        "one_tier",
        "open",
        "operation",
        "pin",
        "rec",
        "result",
        "routed",
        "sent",
        "shim",
        "stream",
        "t0",
        "tier",
        "waited",
    )

    def __init__(self, shim: Shim, operation: str) -> None:
        self.shim = shim
        self.operation = operation
        self.t0 = time.perf_counter()
        shim.open_requests += 1  # until _finish writes the record (a stop waits for it)
        self.open = True
        self.rec = new_record()
        # time spent waiting on others (the client's upload, the upstream), which the
        # overhead figure leaves out: a slow upload is not the shim's cost
        self.waited = 0.0
        self.first_byte_at: float | None = None
        self.tier: str | None = None
        self.cache_header = b"bypass"
        self.client_request_id: bytes | None = None
        self.stream = False
        self.include_usage = False
        self.continuous_usage = False  # usage on every chunk too (vLLM's stream option)
        self.sent = False  # the current attempt's request is written to its replica
        self.answered_at: float | None = None  # a stream's last byte sent (its latency)
        self.routed = None
        self.feature = ""
        self.input_count: int | None = None  # the cap step's count, once there is one
        # (body, exact count) the routing step already asked /tokenize for
        self.known_count: tuple[dict, int] | None = None
        # only the tier asked for may answer (embeddings: another tier's model gives
        # vectors of another space, often of another length)
        self.one_tier = False
        self.body: dict = {}
        self.result: tuple[dict, bytes] | None = None
        # the upstream's failure as the client got it, for coalesced followers
        self.failure: LeaderFailure | None = None
        self.answer: dict | None = None  # a non-streamed 200's body, parsed once
        self.body_unsent = False  # Expect: 100-continue, and the body not asked for yet
        self.content_encoding: bytes | None = None
        self.keep_result = False  # an Idempotency-Key stores the answer, cacheable or not
        # the one replica (URL) that may answer: the one holding what the request builds
        # on (a Responses API follow-up's stored response); None: any
        self.pin: str | None = None

    def input_tokens_known(self) -> int:
        """Input tokens of a request vLLM did not report on (cut short): the cap step's
        count when there was one (vLLM's /tokenize with that counter), else the estimate."""
        return self.input_count if self.input_count is not None else estimate_body_tokens(self.body)

    def mark_sent(self) -> None:
        self.sent = True

    def overhead_ms(self, now: float) -> float:
        return max(0.0, (now - self.t0 - self.waited) * 1000.0)

    def headers(self, now: float) -> list[tuple[bytes, bytes]]:
        ov = self.overhead_ms(now)
        self.first_byte_at = now
        out = [
            (b"x-finops-tier", (self.tier or "none").encode()),
            (b"x-finops-cache", self.cache_header),
            (b"x-finops-overhead-ms", f"{ov:.3f}".encode()),
            (b"x-request-id", self.rec["request_id"].encode()),
        ]
        # a context cap cut the prompt: said to the client, whose answer is to less
        # than it sent (only then: no header, and no cost, on the usual request)
        cut = self.rec.get("truncated_tokens")
        if cut:
            out.append((b"x-finops-truncated-tokens", str(cut).encode()))
        return out


def _start_record(rec: dict, operation: str) -> None:
    """Stamp the fields every endpoint's log record starts with (one place, same order)."""
    # 128 random bits, as uuid4 has, without its os.urandom call (2 us a request); `random`
    # is seeded from the OS in every process and reseeded in forked children
    rec["request_id"] = f"req-{random.getrandbits(128):032x}"
    rec["ts"] = iso_utc(time.time())
    rec["source"] = "shim"
    rec["operation"] = operation
    rec["attempt"] = 1
    rec["upstream_attempts"] = 0


def _scan_headers(
    headers: Iterable[tuple[bytes, bytes]], feature_header: bytes, ctx: Ctx
) -> tuple[bytes | None, int | None, bytes | None, str | None]:
    """One pass over the ASGI headers: (authorization, content-length, idempotency-key, feature).

    The idempotency key comes back undecoded so an endpoint that ignores it pays nothing for it.
    A client's X-Request-Id goes into `ctx`, to be passed on to vLLM as a direct call would
    (vLLM names its response after it).
    """
    auth = None
    declared = None
    idem = None
    feature = None
    for k, v in headers:
        if k == b"x-request-id":
            ctx.client_request_id = v
            continue
        if k == b"authorization":
            auth = v if auth is None else AUTH_DUPLICATE
        elif k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                declared = None
        elif k == b"idempotency-key":
            idem = v
        elif k == b"expect":
            ctx.body_unsent = v.lower() == b"100-continue"
        elif k == b"content-encoding":
            ctx.content_encoding = v
        elif k == feature_header:
            # UTF-8 as clients send it (a config's feature names are UTF-8: read as
            # latin-1, "féature" was logged "fÃ©ature" and matched no rule); bytes that
            # are not UTF-8 are latin-1, as HTTP has it
            try:
                feature = v.decode()
            except UnicodeDecodeError:
                feature = v.decode("latin-1")
    return auth, declared, idem, feature


def _auth_then_read_body(
    shim: Shim, ctx: Ctx, auth: bytes | None, declared: int | None, receive: Any
) -> Coroutine[Any, Any, bytes]:
    """Authenticate (tenant into the record, 401 on failure), then start reading the body.

    Returns `read_body`'s coroutine for the caller to await, so the hot path keeps a single
    await for the body rather than gaining a wrapper coroutine.
    """
    cfg = shim.cfg
    try:
        ctx.rec["tenant"] = tenant_for(auth, cfg.api_keys, cfg.default_tenant)
    except AuthError as exc:
        raise HTTPError(
            401, exc.message, "invalid_request_error", "invalid_api_key", "auth"
        ) from None
    coding = ctx.content_encoding
    if coding is not None and coding.strip().lower() != b"identity":
        raise HTTPError(
            415,
            f"Content-Encoding {coding.decode('latin-1')[:40]!r} is not supported: send the "
            "request body uncompressed.",
            "invalid_request_error",
            "unsupported_content_encoding",
        )
    return read_body(receive, cfg.max_body_bytes, cfg.body_timeout_s, declared)


MAX_JSON_DEPTH = 252  # what orjson writes (254), less the room _parse_json_body keeps


def _parse_json_body(raw: bytes) -> Any:
    """Parse the request body once with orjson; invalid JSON is a 400 in OpenAI's shape.

    A UTF-8 byte order mark before the JSON (Windows tools write one) is skipped, as
    vLLM's own parsing does.
    """
    if raw[:3] == b"\xef\xbb\xbf":
        raw = raw[3:]
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise HTTPError(
            400,
            f"Request body is not valid JSON: {exc}",
            "invalid_request_error",
            "invalid_json",
        ) from None
    # orjson reads 1024 levels but writes 254, and the shim writes the body again (to the
    # upstream, the cache key): deeper bodies were a 500. Counting brackets is C-fast; only
    # a body with that many is written once to see.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
        try:
            orjson.dumps([[body]])  # two levels of room: nothing the shim writes nests more
        except orjson.JSONEncodeError:
            raise HTTPError(
                400,
                f"Request body nests JSON more than {MAX_JSON_DEPTH} levels deep.",
                "invalid_request_error",
                "invalid_json",
            ) from None
    return body


async def _method_not_allowed(ep: ProxyEndpoint, send: Any) -> None:
    """405 in OpenAI's shape with `Allow: POST`, logged like any other request."""
    ctx = Ctx(ep.shim, ep.operation)
    _start_record(ctx.rec, ep.operation)
    try:
        exc = HTTPError(405, "Use POST.", "invalid_request_error", "method_not_allowed")
        ctx.rec["status_code"] = exc.status
        ctx.rec["error_type"] = exc.error_type
        headers = [(b"allow", b"POST"), *ctx.headers(time.perf_counter())]
        await _send_simple(send, exc.status, exc.body, headers)
    finally:
        ep._finish(ctx)


async def _answer_http_error(ctx: Ctx, exc: HTTPError, send: Any) -> None:
    """Record an OpenAI-shaped error on the log record and answer it to the client."""
    rec = ctx.rec
    rec["status_code"] = exc.status
    rec["error_type"] = exc.error_type
    headers = [*ctx.headers(time.perf_counter()), *exc.headers]
    if ctx.body_unsent and CONNECTION_CLOSE not in headers:
        # refused before asking for the body (Expect: 100-continue): the client may not
        # send it, so the next bytes on this connection are not a request (RFC 9110 10.1.1)
        headers.append(CONNECTION_CLOSE)
    await _send_simple(send, exc.status, exc.body, headers)


async def _answer_internal_error(ctx: Ctx, exc: Exception, path: str, send: Any) -> None:
    """A bug: log it with its traceback, answer 500 if nothing was sent yet, mark the record."""
    ctx.shim.logger.exception("unexpected error in %s", path)
    ctx.rec["status_code"] = 500
    ctx.rec["error_type"] = f"internal:{type(exc).__name__}"
    if ctx.first_byte_at is None:
        with contextlib.suppress(Exception):
            await _send_simple(
                send,
                500,
                error_body("Internal error in the finops shim.", "server_error", "internal_error"),
                ctx.headers(time.perf_counter()),
            )


async def _wait_for_leader(ctx: Ctx, leader: asyncio.Future, receive: Any) -> Any:
    """Wait for an identical request in flight (coalescing, or the original of an
    Idempotency-Key); its result, or ClientGone if our client leaves meanwhile, or
    TimeoutError past `_follow_limit` (a leader held back by its own slow client).

    The wait is upstream time, not the shim's overhead. The leader's future is
    shielded: the other followers still get its result when this one leaves.
    """
    t = time.perf_counter()
    try:
        async with asyncio.timeout(_follow_limit(ctx)):
            return await DisconnectWatch(receive).run(asyncio.shield(leader))
    finally:
        ctx.waited += time.perf_counter() - t


def _follow_limit(ctx: Ctx) -> float:
    """How long a request waits on an identical one in flight: as long as it would wait
    for the upstream itself (a stream's first byte, a whole plain answer). A leader
    streams at its own client's pace, and one that stopped reading held every follower
    with no limit."""
    cfg = ctx.shim.cfg
    return cfg.first_byte_timeout_s if ctx.stream else cfg.response_timeout_s


def _mark_client_gone(rec: dict) -> None:
    rec["status_code"] = 499
    rec["error_type"] = "client_disconnected"


class ProxyEndpoint:
    """ASGI app for /v1/chat/completions (operation chat) and /v1/completions (text_completion)."""

    def __init__(self, shim: Shim, operation: str) -> None:
        self.shim = shim
        self.operation = operation
        self.endpoint = "chat" if operation == "chat" else "completions"
        self.path = "/v1/chat/completions" if operation == "chat" else "/v1/completions"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        shim = self.shim
        if scope["method"] != "POST":
            await _method_not_allowed(self, send)
            return
        ctx = Ctx(shim, self.operation)
        rec = ctx.rec
        _start_record(rec, self.operation)
        rec["truncated_tokens"] = 0
        auth, declared, idem_raw, feature = _scan_headers(
            scope["headers"], shim.cfg.feature_header.encode(), ctx
        )
        feature = feature or shim.cfg.default_feature
        rec["feature"] = feature[:NAME_LOG_CHARS]  # on a 401 or 413 record too
        idem = idem_raw.decode("latin-1") if idem_raw is not None else None
        try:
            t = time.perf_counter()
            try:
                raw = await _auth_then_read_body(shim, ctx, auth, declared, receive)
                ctx.body_unsent = False
            finally:  # a 408 waited for the client too
                ctx.waited += time.perf_counter() - t
            await self._handle(ctx, raw, feature, idem, receive, send)
        except HTTPError as exc:
            await _answer_http_error(ctx, exc, send)
        except ClientGone:
            _mark_client_gone(rec)
        except asyncio.CancelledError:
            if rec["status_code"] is not None:
                raise
            # not the client (see DisconnectWatch): the shim's drain ran out
            rec["status_code"] = 503
            rec["error_type"] = "shim_shutdown"
            if ctx.first_byte_at is not None:
                raise  # mid-answer: nothing clean can be added (streams end themselves)
            # before any answer: a 503 the client can retry elsewhere, not a reset
            # connection (and no traceback from uvicorn for it)
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            err = HTTPError(
                503,
                "The finops shim is shutting down ([server] drain_timeout_s = "
                f"{shim.cfg.drain_timeout_s:g}) before this request was answered; retry it.",
                "server_error",
                "shim_shutdown",
                "shim_shutdown",
            )
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await _answer_http_error(ctx, err, send)
        except Exception as exc:  # a bug must still answer and log
            await _answer_internal_error(ctx, exc, self.path, send)
        finally:
            self._finish(ctx)

    # ------------------------------------------------------------------
    async def _handle(
        self, ctx: Ctx, raw: bytes, feature: str, idem: str | None, receive: Any, send: Any
    ) -> None:
        shim = self.shim
        cfg = shim.cfg
        rec = ctx.rec
        ctx.feature = feature
        body, model = _body_and_model(raw, rec)
        if self.operation == "chat":
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs:
                raise HTTPError(
                    400,
                    "`messages` must be a non-empty list.",
                    "invalid_request_error",
                    "invalid_messages",
                    param="messages",
                )
            turns = 0
            for i, m in enumerate(msgs):
                if not isinstance(m, dict):
                    # vLLM refuses it too; checked here so that a cap's truncation cannot
                    # drop it and send on a request the client did not make
                    raise _wrong_type(
                        f"messages[{i}]", "an object with a `role`", m, "invalid_messages"
                    )
                if m.get("role") == "user":
                    turns += 1
            rec["turn_count"] = turns
        elif "prompt" not in body and "prompt_embeds" not in body:  # the latter: vLLM's
            raise HTTPError(
                400,
                "`prompt` is required.",
                "invalid_request_error",
                "missing_prompt",
                param="prompt",
            )
        rec["has_tools"] = bool(body.get("tools") or body.get("functions"))
        rec["prompt_tokens_est"] = estimate_prompt_tokens(body)
        stream = ctx.stream = rec["stream"] = _stream_flag(body)
        so = body.get("stream_options")
        if so and not stream:
            # vLLM refuses this too; checked here so a cache hit cannot answer it 200
            raise HTTPError(
                400,
                "`stream_options` can only be set when `stream` is true.",
                "invalid_request_error",
                "invalid_stream_options",
                param="stream_options",
            )
        if stream:
            ctx.include_usage, ctx.continuous_usage = _usage_options(so)
        user = body.get("user")
        if user is not None and not isinstance(user, str):
            # vLLM refuses it too; checked here because `user` is not in the cache key,
            # so a hit would answer 200
            raise _wrong_type("user", "a string", user, "invalid_user")
        rec["prompt_fingerprint"] = _fingerprint_prompt(body)
        if cfg.log_prompts:
            rec["prompt_text"] = _prompt_text(body)

        # -- resolve the target tier --
        tier = _resolve(shim, model)
        # -- idempotency, then routing, context caps, cache / coalescing / upstream --
        # (routing after the idempotency check: a replay makes no routing decision, and a
        # failure there is an attempt a retry with the key is logged against)
        if idem:
            await self._idempotent(
                ctx,
                raw,
                idem,
                receive,
                send,
                lambda: self._answer(ctx, body, tier, feature, send, receive),
            )
        else:
            await self._answer(ctx, body, tier, feature, send, receive)

    async def _answer(
        self, ctx: Ctx, body: dict, tier: Any, feature: str, send: Any, receive: Any
    ) -> tuple[dict, bytes] | None:
        """Route (the alias), apply the context cap, then answer from the cache, an
        identical in-flight request or the upstream; the answer to keep, if any."""
        shim = self.shim
        cfg = shim.cfg
        rec = ctx.rec
        tenant = rec["tenant"]
        router = shim.router
        routed = tier == "@route"
        if routed:
            tier = _route(ctx, router, body, feature)
        ctx.tier = tier

        # -- context caps --
        rule = applicable_cap(cfg.caps, tier, feature, tenant)
        if rule is not None and routed:
            tier, rule = await self._fit_routed(ctx, tier, rule, feature, body)
            ctx.tier = tier
        if rule is not None:  # (a routed request moved to a tier without a cap has none)
            param = "messages" if self.operation == "chat" else "prompt"
            out = await self._apply_cap(ctx, rule, tier, body, param)
            if out.truncated_tokens:
                rec["truncated_tokens"] = out.truncated_tokens
                shim.metrics.truncated_tokens.labels(tier).inc(out.truncated_tokens)
                # turn_count and prompt_tokens_est stay as the client sent them: what
                # the router decided on (a router trained from the log must see that)
                body = out.body
        ctx.body = body

        # -- cache / coalescing --
        return await self._cached_or_forward(ctx, ctx.body, ctx.tier, send, receive)

    async def _fit_routed(
        self, ctx: Ctx, tier: str, rule: Any, feature: str, countable: dict
    ) -> tuple[str, Any]:
        """For the routing alias: when the request exceeds the cap of the tier it was
        routed to, the next tier up whose cap it fits (or that has none) takes it whole,
        rather than a cheap tier cutting or refusing what the client left to the shim to
        place. The tier and the rule that applies there; `tier` as is when none fits.

        The router's pick stays the logged decision (`routed_tier`, its propensity), as
        after a fallback: a new router evaluated offline gets the same redirect.
        """
        shim = self.shim
        counter = self._counter_for(tier)
        if counter is None:
            raise _tier_removed(tier)
        t = time.perf_counter()
        exact = await counter.exact(countable)
        ctx.waited += time.perf_counter() - t
        count = estimate_body_tokens(countable) if exact is None else exact
        ctx.input_count = count
        if count <= rule.max_input_tokens:
            if exact is not None:  # the cap step below is not asked to count again
                ctx.known_count = (countable, exact)
            return tier, rule
        order = shim.pool.order
        for up_tier in order[order.index(tier) + 1 :]:
            other = applicable_cap(shim.cfg.caps, up_tier, feature, ctx.rec["tenant"])
            if other is None or count <= other.max_input_tokens:
                shim.metrics.cap_reroutes.labels(tier, up_tier).inc()
                ctx.rec["fallback_reason"] = "context_cap"
                return up_tier, other
        return tier, rule

    def _counter_for(self, tier: str) -> TokenCounter | None:
        """The token counter of a replica of `tier` in rotation (None: no such tier)."""
        shim = self.shim
        if tier not in shim.pool.tiers:  # a reload removed it while this request waited
            return None
        gate = shim.tokenize_gate
        up = shim.pool.pick_for_tokenize(tier, time.monotonic(), lambda url: not gate.allows(url))
        return self._token_counter(up)

    async def _apply_cap(
        self, ctx: Ctx, rule: Any, tier: str, countable: dict, param: str
    ) -> CapOutcome:
        """Count `countable` (the request, or a view of it) against `rule` on a replica of
        `tier` in rotation; a 400 naming `param` when it is over and cannot be cut."""
        shim = self.shim
        counter = self._counter_for(tier)
        if counter is None:
            raise _tier_removed(tier)
        counter.known, ctx.known_count = ctx.known_count, None
        t = time.perf_counter()
        out = await apply_cap(rule, countable, counter)
        ctx.waited += time.perf_counter() - t
        ctx.input_count = out.input_tokens
        if out.error is not None:
            shim.metrics.cap_rejections.labels(tier).inc()
            ctx.rec["input_tokens"] = out.input_tokens
            raise HTTPError(
                400, out.error, "invalid_request_error", "context_length_exceeded", param=param
            )
        return out

    async def _idempotent(
        self, ctx: Ctx, raw: bytes, idem: str, receive: Any, send: Any, work: Any
    ) -> None:
        """Answer a request with an `Idempotency-Key` once: a retry with the key (same
        tenant, body and endpoint) replays the stored answer, logged as a retry and not
        billed again; a concurrent duplicate waits for the first (across workers with a
        shared store); an attempt that got no answer is recorded, so the next one runs as
        a retry. `work()` answers the request and returns (meta, payload) to keep."""
        shim = self.shim
        rec = ctx.rec
        tenant = rec["tenant"]
        claimed = False  # this request holds the key's claim in the shared store
        keeper: asyncio.Task | None = None
        ctx.keep_result = True
        idem_id = "idem:" + hashlib.sha256(f"{tenant}\x00{idem}".encode()).hexdigest()
        rec["idempotency_key"] = idem[:200]
        fp = hashlib.sha256(raw).hexdigest()
        shared = shim.redis is not None
        local = False  # this request holds the key in this process' coalescer
        running = False
        try:
            while True:
                prior = None  # the key's record of earlier attempts that got no answer
                stored = await shim.idem_get(idem_id)
                if stored is not None:
                    meta, payload = stored
                    # another endpoint is another request, as another body is (the
                    # record says which endpoint; records without it predate this)
                    if meta.get("fp") != fp or meta.get("endpoint", self.endpoint) != (
                        self.endpoint
                    ):
                        raise HTTPError(
                            422,
                            "This Idempotency-Key was already used with a different "
                            "request body or endpoint.",
                            "invalid_request_error",
                            "idempotency_key_reused",
                        )
                    if meta.get("failed"):
                        prior = meta  # no answer to replay: this retry runs again, as a retry
                    else:
                        meta["attempts"] = await shim.idem_next_attempt(idem_id, meta)
                        await shim.idem_put(idem_id, meta, payload)
                        rec["retry_of"] = meta["request_id"]
                        rec["attempt"] = meta["attempts"]
                        shim.metrics.idempotent_replays.inc()
                        shim.metrics.cache.labels("hit").inc()  # as the record says
                        ctx.cache_header = b"hit"
                        rec["cache_status"] = "hit"
                        await self._respond_cached(ctx, meta, payload, send)
                        return
                try:
                    if not local:
                        waiter = shim.coalescer.join(idem_id)
                        if waiter is not None:
                            # then read the original's record
                            await _wait_for_leader(ctx, waiter, receive)
                            continue
                        local = True
                    if not shared or await shim.idem_claim(idem_id, rec["request_id"]):
                        claimed = shared
                        running = True
                        break
                    # another worker or host runs this key: wait for its record, then
                    # replay it (or, if it failed, run as a retry)
                    async with asyncio.timeout(_follow_limit(ctx)):
                        await self._wait_for_claim(ctx, idem_id, receive)
                except TimeoutError:
                    # the original still runs (its client reads slowly or not at all):
                    # running this one too would bill the key twice
                    err = HTTPError(
                        409,
                        "A request with this Idempotency-Key is still in progress (for "
                        f"more than {_follow_limit(ctx):g} s); retry it later to get its "
                        "answer.",
                        "invalid_request_error",
                        "idempotency_key_in_progress",
                    )
                    err.headers.append((b"retry-after", b"5"))
                    raise err from None
        finally:
            if local and not running:
                shim.coalescer.finish(idem_id, True)
        if claimed:
            keeper = asyncio.create_task(shim.idem_keep_claim(idem_id, rec["request_id"]))
        if prior is not None:
            rec["retry_of"] = prior["request_id"]
            rec["attempt"] = int(prior.get("attempts", 1)) + 1
        created = prior.get("created") if prior is not None else None
        if created is None:
            created = time.time()

        result = None
        try:
            result = await work()
        finally:
            try:
                if result is not None:
                    entry = _idem_entry(
                        rec, raw, _meta_of(result[0]), endpoint=self.endpoint, created=created
                    )
                    current = await shim.idem_get(idem_id) if claimed else None
                    if current is None or current[0].get("failed"):
                        await shim.idem_put(idem_id, entry, result[1])
                    else:  # our claim ran out and another request answered meanwhile
                        shim.logger.warning(
                            "Idempotency-Key record %s was answered by %s while %s ran; kept",
                            idem_id,
                            current[0].get("request_id"),
                            rec["request_id"],
                        )
                else:
                    # no answer (upstream failure, client gone): the attempt is still
                    # recorded, so a retry with the key is logged as one (retry_of,
                    # attempt), but never over an answer stored meanwhile (a request
                    # that ran without a claim while the shared store was out)
                    current = await shim.idem_get(idem_id)
                    if current is None or current[0].get("failed"):
                        entry = _idem_entry(
                            rec, raw, {"failed": True}, endpoint=self.endpoint, created=created
                        )
                        await shim.idem_put(idem_id, entry, b"")
            finally:
                if keeper is not None:
                    keeper.cancel()
                if claimed:  # after the record: a waiting duplicate then finds it
                    await shim.idem_release(idem_id, rec["request_id"])
                shim.coalescer.finish(idem_id, True)

    async def _wait_for_claim(self, ctx: Ctx, idem_id: str, receive: Any) -> None:
        """Wait while another process holds the key's claim: until its record has an
        answer or the claim is gone (released after a failure, or expired after a crash).

        Polled (50 ms, growing to 250 ms): Redis has no cheap wake-up for one key, and a
        duplicate is a rare request. Our client leaving ends the wait (ClientGone).
        """
        shim = self.shim

        async def poll() -> None:
            delay = CLAIM_POLL_S
            while True:
                await asyncio.sleep(delay)
                stored = await shim.idem_get(idem_id)
                if stored is not None and not stored[0].get("failed"):
                    return
                if not await shim.idem_claimed(idem_id):
                    return
                delay = min(delay * 1.5, CLAIM_POLL_MAX_S)

        t = time.perf_counter()
        try:
            await DisconnectWatch(receive).run(poll())
        finally:
            ctx.waited += time.perf_counter() - t

    async def _cached_or_forward(
        self, ctx: Ctx, body: dict, tier: str, send: Any, receive: Any
    ) -> tuple[dict, bytes] | None:
        """Answer from the cache, an identical in-flight request, or the upstream.

        Returns the answer's (meta, payload) when there is one to keep (for an
        Idempotency-Key), whichever of the three gave it.
        """
        shim = self.shim
        cfg = shim.cfg
        rec = ctx.rec
        if not (cfg.cache_enabled and is_deterministic(body, self.operation)):
            shim.metrics.cache.labels("bypass").inc()
            rec["cache_status"] = "bypass"
            return await self._forward(ctx, send, receive, None)
        # the tier and the model it serves: a reload that changes a tier's model starts afresh
        t = cfg.tiers.get(tier)
        target = tier if t is None else f"{tier}\x00{t.model}"
        key = "resp:" + cache_key(
            rec["tenant"], self.endpoint, body, target, self.shim.cfg.cache_normalize_whitespace
        )
        hit = await shim.cache_get(key)
        if hit is not None and hit is not SKIPPED:
            shim.metrics.cache.labels("hit").inc()
            ctx.cache_header = b"hit"
            rec["cache_status"] = "hit"
            # what this client got (its own id) is what its Idempotency-Key keeps
            return hit[0], await self._respond_cached(ctx, hit[0], hit[1], send, fresh_id=True)
        leader = None
        if cfg.coalesce:
            while True:
                waiter = shim.coalescer.join(key)
                if waiter is None:
                    leader = key
                    break
                rec["cache_status"] = "coalesced"  # also if the client leaves while waiting
                try:
                    result = await _wait_for_leader(ctx, waiter, receive)
                except TimeoutError:
                    # the leader is held back (its client reads slowly or not at all):
                    # this request calls the upstream itself rather than wait on it
                    shim.metrics.coalesce_timeouts.inc()
                    shim.logger.info(
                        "request %s stopped waiting for an identical one in flight after "
                        "%g s: calling the upstream itself",
                        rec["request_id"],
                        _follow_limit(ctx),
                    )
                    break
                if isinstance(result, LeaderFailure):
                    # the upstream failed the leader: the same answer, not another call
                    # (a hanging upstream would otherwise be waited on once per follower)
                    shim.metrics.cache.labels("coalesced").inc()
                    ctx.cache_header = b"miss"
                    raise result.for_follower(ctx)
                if result is not None:
                    shim.metrics.coalesced.inc()
                    shim.metrics.cache.labels("coalesced").inc()
                    ctx.cache_header = b"hit"
                    sent = await self._respond_cached(
                        ctx, result[0], result[1], send, fresh_id=True
                    )
                    return result[0], sent
                # the leader ended without an answer (its client left, or it was
                # cancelled): the first follower to wake leads now, the others follow it
        if hit is SKIPPED:
            shim.metrics.cache.labels("skipped").inc()
        else:
            shim.metrics.cache.labels("miss").inc()
        ctx.cache_header = b"miss"
        rec["cache_status"] = "miss"
        outcome: Any = None
        try:
            answer = await self._forward(ctx, send, receive, key)
            outcome = ctx.result if ctx.result is not None else ctx.failure
            return answer
        except HTTPError as exc:
            outcome = LeaderFailure(exc.status, exc.body, exc.error_type, exc.headers, ctx.tier)
            raise
        finally:
            if leader is not None:
                shim.coalescer.finish(leader, outcome)

    # ------------------------------------------------------------------
    async def _respond_cached(
        self, ctx: Ctx, meta: dict, payload: bytes, send: Any, *, fresh_id: bool = False
    ) -> bytes:
        """Answer from a kept answer: a cache hit, a coalesced leader's, an Idempotency-Key's;
        returns the answer as given (`payload`, under its new id with `fresh_id`).

        `fresh_id` (a hit or a follower: another request than the one answered) gives the
        answer this request's own id, as vLLM would have (`chatcmpl-<X-Request-Id>`, or a
        random one): the first client's X-Request-Id, a trace id, is not another's. An
        Idempotency-Key replay is the same request again and keeps the first id.
        """
        rec = ctx.rec
        shim = self.shim
        if fresh_id and not meta.get("sse"):
            payload = _with_fresh_id(payload, ctx.client_request_id)
        rec["tier"] = meta.get("tier")
        ctx.tier = meta.get("tier") or ctx.tier
        rec["upstream"] = meta.get("upstream")
        rec["response_model"] = meta.get("response_model")
        rec["finish_reason"] = meta.get("finish_reason")
        rec["input_tokens"] = 0  # served without upstream work: nothing billed again
        rec["output_tokens"] = 0
        rec["cached_input_tokens"] = 0
        rec["status_code"] = 200
        if ctx.stream:
            if meta.get("sse"):  # the original stream as the client got it
                events = [payload]
            else:
                events = replay_as_sse(
                    orjson.loads(payload),
                    self.operation,
                    ctx.include_usage,
                    continuous=ctx.continuous_usage,
                )
            now = time.perf_counter()
            await send(_sse_start(ctx, now))
            rec["ttft_ms"] = (time.perf_counter() - ctx.t0) * 1000
            await send({"type": "http.response.body", "body": b"".join(events), "more_body": False})
        else:
            now = time.perf_counter()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [
                        JSON_CT,
                        (b"content-length", str(len(payload)).encode()),
                        *ctx.headers(now),
                    ],
                }
            )
            await send({"type": "http.response.body", "body": payload, "more_body": False})
        shim.metrics.added_latency.labels("yes" if ctx.stream else "no").observe(
            ctx.overhead_ms(now) / 1000
        )
        return payload

    # ------------------------------------------------------------------
    def _upstream_payload(self, ctx: Ctx, up: Upstream) -> bytes:
        body = ctx.body
        if ctx.stream and not ctx.include_usage:
            so = body.get("stream_options")
            so = dict(so) if isinstance(so, dict) else {}
            so["include_usage"] = True
            # vLLM adds usage to every chunk when continuous_usage_stats is set too: the
            # client did not get that without include_usage, so it must not now
            so["continuous_usage_stats"] = False
            body = {**body, "model": up.model, "stream_options": so}
        else:
            body = {**body, "model": up.model}
        return orjson.dumps(body)

    async def _attempt(self, ctx: Ctx, up: Upstream) -> tuple[Response, bytes, Any]:
        """Send to one replica; return (response, first bytes, chunk iterator or None).

        Not streaming (or an error status): the whole body is the "first bytes".
        Everything up to here may fail over to another replica; nothing has
        been sent to the client yet.
        """
        shim = self.shim
        hdrs = [
            (b"content-type", b"application/json"),
            (b"accept", b"text/event-stream" if ctx.stream else b"application/json"),
            # no compressed answers: the shim reads them (usage, the cache, SSE events)
            (b"accept-encoding", b"identity"),
        ]
        if up.api_key:
            hdrs.append((b"authorization", b"Bearer " + up.api_key.encode()))
        if ctx.client_request_id is not None:
            hdrs.append((b"x-request-id", ctx.client_request_id))
        payload = self._upstream_payload(ctx, up)
        pool = shim.h1.pool(up.url)
        # A slot under [upstream] max_connections first: waiting for one is the shim's
        # own queue, not the replica's slowness, so it neither runs down the first-byte
        # timeout nor counts against the replica's circuit.
        if not await pool.acquire(shim.cfg.first_byte_timeout_s):
            shim.metrics.pool_full.labels(up.tier, up.url).inc()
            raise UpstreamFailure(
                "pool_full",
                503,
                f"no free connection to upstream {up.url} within "
                f"{shim.cfg.first_byte_timeout_s:g} s ([upstream] max_connections = "
                f"{shim.cfg.max_connections} are all busy)",
            )
        resp: Response | None = None
        # a stream's first event comes after the prefill; a non-streamed answer comes
        # whole, after the generation (a long one is not a failure)
        limit = shim.cfg.first_byte_timeout_s if ctx.stream else shim.cfg.response_timeout_s
        up.awaiting(time.monotonic())
        waiting = True  # until the replica answers (see Upstream.silence)
        try:
            async with asyncio.timeout(limit):
                resp = await pool.request(
                    b"POST", self.path, payload, hdrs, acquired=True, on_write=ctx.mark_sent
                )
                if resp.status >= 500 or resp.status == 429:
                    data = await resp.read()
                    reason = "rate_limited" if resp.status == 429 else "http_5xx"
                    said = _error_message(data)  # vLLM's reason, for the client and the log
                    raise UpstreamFailure(
                        reason,
                        resp.status,
                        f"upstream {up.url} answered {resp.status}" + (f": {said}" if said else ""),
                        data,
                        resp.headers.get("retry-after"),
                    )
                if resp.status != 200 and resp.status < 400:
                    # vLLM answers 200, 4xx or 5xx: a 101, a 204 or a redirect (an
                    # ingress sending http to https, a login page) is no OpenAI answer,
                    # and a redirect passed on would send the client past the shim
                    where = resp.headers.get("location")
                    if where and 300 <= resp.status < 400:
                        # for the operator only: the target is another internal address
                        shim.logger.warning(
                            "upstream %s redirects to %r: point the upstream URL there",
                            up.url,
                            where[:200],
                        )
                    raise UpstreamFailure(
                        "bad_response",
                        502,
                        f"upstream {up.url} answered {resp.status}, not an OpenAI answer",
                    )
                if not ctx.stream or resp.status != 200:
                    data = await resp.read()
                    if resp.status == 200:
                        ctx.answer = _json_object(data)
                        if ctx.answer is None:
                            # vLLM answers JSON: anything else (compressed, cut, not
                            # OpenAI's) is a broken upstream, and nothing is sent yet
                            raise UpstreamFailure(
                                "bad_response",
                                502,
                                f"upstream {up.url} answered 200 with a body that is not a "
                                f"JSON object ({len(data)} bytes, content-encoding "
                                f"{resp.headers.get('content-encoding', 'none')})",
                            )
                        waiting = False
                        up.answered(time.monotonic())
                    return resp, data, None
                ctype = resp.headers.get("content-type", "text/event-stream")
                if not ctype.lower().startswith("text/event-stream"):
                    # an HTML error page, a JSON answer: not a stream, and nothing is sent
                    # yet, so it falls back as a non-JSON 200 does for a plain request
                    # (the connection is closed below, as on every failure)
                    raise UpstreamFailure(
                        "bad_response",
                        502,
                        f"upstream {up.url} answered a stream request with content-type "
                        f"{ctype[:60]!r}, not text/event-stream",
                    )
                it = resp.iter_chunks(shim.cfg.read_timeout_s).__aiter__()
                first = b""
                # the first whole event: vLLM reports a failure before any token (a dead
                # engine, a parser that cannot be built) in band, as a 200 stream whose
                # first event is an error; nothing is sent yet, so that falls back too
                while b"\n\n" not in first and b"\r\n\r\n" not in first:
                    if len(first) > MAX_EVENT_BYTES:
                        raise UpstreamFailure(
                            "bad_response",
                            502,
                            f"upstream {up.url} sent {len(first)} bytes without an SSE event's end",
                        )
                    try:
                        first += await it.__anext__()
                    except StopAsyncIteration:
                        if first and _whole_event(first):
                            break  # a stream of one unterminated event: passed on as is
                        raise UpstreamFailure(
                            "disconnect",
                            502,
                            f"upstream {up.url} ended the stream "
                            + ("inside its first event" if first else "before the first byte"),
                        ) from None
                err = _server_error_event(first)
                if err is not None:
                    raise UpstreamFailure(
                        "stream_error",
                        502,
                        f"upstream {up.url} began its stream with an error: {err}",
                    )
                waiting = False
                up.answered(time.monotonic())
                return resp, first, it
        except TimeoutError:
            what = "no first byte" if ctx.stream else "no answer"
            if resp is not None:
                resp.close()
                part = "any of its stream" if ctx.stream else "its whole body"
                what = f"a {resp.status} head but not {part}"
            raise UpstreamFailure(
                "timeout",
                504,
                f"upstream {up.url} sent {what} within {limit:g} s ([upstream] "
                f"{'first_byte_timeout_s' if ctx.stream else 'response_timeout_s'})",
            ) from None
        except OutOfResources as exc:
            # the shim's own shortage: a 503 to retry, and no mark against the replica
            raise UpstreamFailure("shim_resources", 503, f"{exc}") from None
        except ConnectError as exc:
            raise UpstreamFailure(
                "connect", 502, f"upstream {up.url} refused or unreachable: {exc}"
            ) from None
        except Disconnected as exc:
            raise UpstreamFailure(
                "disconnect",
                502,
                f"upstream {up.url} dropped the connection before the first byte: {exc}",
            ) from None
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        finally:
            if waiting:
                up.unanswered(time.monotonic())

    async def _forward(
        self, ctx: Ctx, send: Any, receive: Any, store_key: str | None
    ) -> tuple[dict, bytes] | None:
        """Try replicas/tiers until one gives a first byte; then respond. Returns (meta, payload) if cacheable."""
        pool = self.shim.pool  # one pool for all attempts, even if a reload swaps it meanwhile
        if ctx.tier not in pool.tiers:
            raise _tier_removed(ctx.tier)
        watch = DisconnectWatch(receive)
        return await watch.run(self._attempts(ctx, pool, send, watch, store_key))

    async def _over_cap(self, ctx: Ctx, up: Upstream) -> bool:
        """Whether the request is over the cap that applies to it on `up`'s tier,
        counted as the configured counter counts (once per request)."""
        cfg = self.shim.cfg
        if not cfg.caps:
            return False
        rule = applicable_cap(cfg.caps, up.tier, ctx.feature, ctx.rec["tenant"])
        if rule is None:
            return False
        if ctx.input_count is None:
            t = time.perf_counter()
            ctx.input_count = await self._token_counter(up).count(ctx.body)
            ctx.waited += time.perf_counter() - t
        return ctx.input_count > rule.max_input_tokens

    def _token_counter(self, up: Upstream) -> TokenCounter:
        """How caps count tokens against `up` (its /tokenize, or the estimate)."""
        shim = self.shim
        return TokenCounter(
            shim.cfg.token_counter,
            shim.client,
            up.url,
            up.model,
            shim.cfg.connect_timeout_s + 3,
            shim.tokenize_gate,
        )

    def _silent_too_long(self, up: Upstream) -> bool:
        """Whether a client giving up on `up` counts against its circuit: only when the
        replica has held requests for `[upstream] hung_after_s` without answering any (a
        hung engine whose /health still answers). Otherwise the client was impatient."""
        shim = self.shim
        limit = shim.cfg.hung_after_s
        silent = up.silence(time.monotonic())
        if limit <= 0 or silent < limit:
            return False
        shim.metrics.hung_abandons.labels(up.tier, up.url).inc()
        shim.logger.warning(
            "a client gave up on upstream %s, which has answered none of the requests it "
            "held for %.1f s ([upstream] hung_after_s = %g): counted against its circuit",
            up.url,
            silent,
            limit,
        )
        return True

    async def _attempts(
        self, ctx: Ctx, pool: Pool, send: Any, watch: DisconnectWatch, store_key: str | None
    ) -> tuple[dict, bytes] | None:
        shim = self.shim
        rec = ctx.rec
        tier0 = ctx.tier
        last: UpstreamFailure | None = None
        attempts = 0
        budget_refused = 0  # fallbacks a replica's retry budget did not allow
        pin = ctx.pin
        for up in pool.candidates(tier0):
            if pin is not None and up.url != pin:
                continue  # another server does not have what the request builds on
            if ctx.one_tier and up.tier != tier0:
                break
            if up.tier != tier0 and await self._over_cap(ctx, up):
                continue  # a fallback must not get round a stricter cap on another tier
            now = time.monotonic()
            if not up.breaker.allow(now):
                continue
            ticket = up.breaker.ticket()
            if attempts > 0 and not up.budget.try_retry(now):
                up.breaker.release_probe(ticket)
                shim.metrics.retry_budget_exhausted.labels(up.url).inc()
                budget_refused += 1
                continue
            if last is not None:
                shim.metrics.fallbacks.labels(ctx.tier, up.tier, last.reason).inc()
            attempts += 1
            rec["upstream_attempts"] = attempts
            up.budget.record_request(now)
            up.outstanding += 1
            t_send = time.perf_counter()
            ctx.sent = False
            try:
                try:
                    resp, first, it = await self._attempt(ctx, up)
                except UpstreamFailure as exc:
                    ctx.waited += time.perf_counter() - t_send
                    if exc.reason in ("pool_full", "shim_resources"):
                        # the shim's own limit or shortage, not the replica's fault
                        up.breaker.release_probe(ticket)
                        # no call was made: not an upstream attempt (nor a retry to budget)
                        attempts -= 1
                        rec["upstream_attempts"] = attempts
                    elif exc.reason == "rate_limited":
                        # a 429 is back-pressure from a server that answers: it falls back,
                        # but opening circuits on it turned a busy fleet's 429 + Retry-After
                        # into the shim's 503 and took the shim out of /readyz
                        up.breaker.release_probe(ticket)
                    else:
                        up.breaker.failure(time.monotonic(), ticket)
                    shim.logger.log(
                        logging.ERROR if exc.reason == "shim_resources" else logging.WARNING,
                        "upstream attempt failed (%s): %s",
                        exc.reason,
                        exc.message,
                    )
                    last = exc
                    rec["fallback_reason"] = exc.reason
                    ctx.tier = up.tier
                    rec["upstream"] = up.url  # the last one tried, if none answers
                    continue
                except BaseException:  # client gone, or a bug: a half-open probe is not left taken
                    if ctx.sent and watch.gone and self._silent_too_long(up):
                        up.breaker.failure(time.monotonic(), ticket)
                    else:
                        up.breaker.release_probe(ticket)
                    if not ctx.sent:  # no call was made
                        rec["upstream_attempts"] = attempts - 1
                    else:
                        # this replica had the request (and prefilled it) when the client
                        # left or shutdown cut it: the record names it and the prompt's
                        # tokens, not an earlier failed attempt (not when the client left while the shim waited
                        # for a connection: the replica never had the request)
                        rec["tier"] = up.tier
                        rec["upstream"] = up.url
                        if rec["input_tokens"] is None:
                            rec["input_tokens"] = ctx.input_tokens_known()
                    raise
                t_first = time.perf_counter()
                ctx.waited += t_first - t_send
                if resp.status >= 400:
                    up.breaker.release_probe(ticket)
                elif it is None:
                    up.breaker.success(ticket)
                else:
                    # a stream's verdict waits for its end (_respond_stream): a replica
                    # whose streams all fail partway must still open its circuit; but a
                    # probe's first byte closes it (others need not wait out a generation)
                    up.breaker.probe_answered(ticket)
                ctx.tier = up.tier
                rec["tier"] = up.tier
                rec["upstream"] = up.url
                # a fallback tier's answer is not cached under the key of the tier asked
                # for: that tier, once healthy again, must answer for itself
                key = store_key if up.tier == tier0 else None
                if it is None:
                    watch.stop()  # the whole answer is here: nothing left to cancel
                    shim.metrics.upstream_latency.labels(up.tier).observe(t_first - t_send)
                    return await self._respond_full(ctx, up, resp, first, send, key)
                return await self._respond_stream(
                    ctx, up, ticket, resp, first, it, t_send, send, watch, key
                )
            finally:
                up.outstanding -= 1
        # every candidate failed or was unavailable
        watch.stop()
        rec["tier"] = ctx.tier
        if last is None:
            what = (
                f"The replica {pin} holding the stored response this request builds on is"
                if pin is not None
                else f"No upstream of tier `{tier0}` or above is"
            )
            err = HTTPError(
                503,
                pool.public(f"{what} available (circuits open or retry budgets spent)."),
                "server_error",
                "upstream_unavailable",
                "upstream_unavailable",
            )
            # when the first circuit may let a probe through: clients back off that long
            wait = pool.seconds_until_probe(tier0, time.monotonic(), pin)
            err.headers.append((b"retry-after", str(max(1, math.ceil(wait))).encode()))
            raise err
        status = (
            504
            if last.reason == "timeout"
            else (last.status if last.status >= 500 or last.status == 429 else 502)
        )
        err = HTTPError(
            status,
            pool.public(
                f"All upstreams failed; last error: {last.message}"
                + (
                    f" ({budget_refused} more replica(s) not tried: their retry budget "
                    "([upstream] retry_budget_ratio) was spent)"
                    if budget_refused
                    else ""
                )
            ),
            "server_error",
            f"upstream_{last.reason}",
            f"upstream_{last.reason}",
        )
        if last.retry_after and status == last.status:
            # a rate-limited (or unavailable) upstream's hint: clients back off by it
            err.headers.append((b"retry-after", last.retry_after.encode("latin-1")))
        raise err

    async def _respond_full(
        self,
        ctx: Ctx,
        up: Upstream,
        resp: Response,
        data: bytes,
        send: Any,
        store_key: str | None,
    ) -> tuple[dict, bytes] | None:
        shim = self.shim
        rec = ctx.rec
        rec["status_code"] = resp.status
        meta = None
        if resp.status == 200:
            obj = ctx.answer  # parsed in _attempt: a 200 here is a JSON object
            if obj is not None:
                self._usage_into(rec, obj.get("usage"))
                rec["response_model"] = obj.get("model")
                ch = obj.get("choices")
                if ch and isinstance(ch, list) and isinstance(ch[0], dict):
                    rec["finish_reason"] = ch[0].get("finish_reason")
                meta = {
                    "tier": up.tier,
                    "upstream": up.url,
                    "response_model": rec["response_model"],
                    "finish_reason": rec["finish_reason"],
                }
        else:
            rec["error_type"] = f"upstream_{resp.status}"
            if resp.status >= 400:  # vLLM's refusal of this request: the same for followers
                ctx.failure = LeaderFailure(resp.status, data, rec["error_type"], [], up.tier)
        now = time.perf_counter()
        ct = resp.headers.get("content-type", "application/json").encode()
        await send(
            {
                "type": "http.response.start",
                "status": resp.status,
                # a length, not chunked framing: the body is whole already
                "headers": [
                    (b"content-type", ct),
                    (b"content-length", str(len(data)).encode()),
                    *ctx.headers(now),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data, "more_body": False})
        shim.metrics.added_latency.labels("no").observe(ctx.overhead_ms(now) / 1000)
        if meta is None:
            return None
        result = (meta, data)
        ctx.result = result
        if store_key is not None:
            await shim.cache_put(store_key, meta, data)
        return result

    # the usage object's input, output and details fields (the Responses API names its own)
    USAGE_FIELDS = ("prompt_tokens", "completion_tokens", "prompt_tokens_details")

    def _usage_into(self, rec: dict, usage: Any) -> None:
        """The upstream's token counts into the record. A count that is not a whole
        number >= 0 (a broken or non-vLLM upstream) is logged as unknown (null) with a
        warning: taken as is, it cost the whole record (a metric refused it) or made it
        one `finops ingest` refuses."""
        if not isinstance(usage, dict):
            return
        fin, fout, fdet = self.USAGE_FIELDS
        det = usage.get(fdet)
        cached = det.get("cached_tokens") if isinstance(det, dict) else None
        if cached is None:
            cached = 0
        pi, co = usage.get(fin), usage.get(fout)
        # vLLM's: plain ints (checked by type: this runs for every request)
        if (
            type(pi) is int
            and type(co) is int
            and type(cached) is int
            and pi >= 0
            and co >= 0
            and cached >= 0
        ):
            rec["input_tokens"], rec["output_tokens"] = pi, co
            rec["cached_input_tokens"] = cached
            return
        for field, name, v in (
            ("input_tokens", fin, pi),
            ("output_tokens", fout, co),
            ("cached_input_tokens", f"{fdet}.cached_tokens", cached),
        ):
            n = _token_count(v)
            if n is None and v is not None:
                self.shim.logger.warning(
                    "upstream %s sent usage.%s = %s, not a token count: logged as unknown",
                    rec.get("upstream"),
                    name,
                    orjson.dumps(v)[:80].decode("utf-8", "replace"),
                )
            rec[field] = n

    async def _respond_stream(
        self,
        ctx: Ctx,
        up: Upstream,
        ticket: int,
        resp: Response,
        first: bytes,
        it: Any,
        t_send: float,
        send: Any,
        watch: DisconnectWatch,
        store_key: str | None,
    ) -> tuple[dict, bytes] | None:
        shim = self.shim
        rec = ctx.rec
        strip_usage = not ctx.include_usage
        # the assembled answer is kept for the cache and for an Idempotency-Key's replay
        collect: list[dict] | None = [] if store_key is not None or ctx.keep_result else None
        # what the client got, verbatim: an Idempotency-Key replays it when the stream
        # cannot be rebuilt into one answer (logprobs, legacy function_call)
        sent: list[bytes] | None = [] if ctx.keep_result else None
        state = {
            "content_chunks": 0,
            "usage": None,
            "done": False,
            "delivered": False,
            "first_token": None,
            "error": None,  # an error event the upstream sent in the stream
            "collected": 0,  # bytes of the events in `collect` (None past MAX_COLLECT_BYTES)
        }
        buf = b""
        # finish chunks waiting for the usage chunk we drop (one per choice; n > 1 streams
        # have several)
        held: list[bytes] = []
        crlf = False
        eof = False
        failure: tuple[int, str, str] | None = None  # (status, error_type, message)
        failure_sent = False
        blame_upstream = True
        stopping = False  # the shim's drain ran out while this stream was going
        yielded = time.perf_counter()
        guard = SendStallGuard(send, shim.cfg.send_timeout_s)
        try:
            now = time.perf_counter()
            await send(_sse_start(ctx, now))
            shim.metrics.added_latency.labels("yes").observe(ctx.overhead_ms(now) / 1000)
            chunk = first
            while True:
                if crlf or b"\r" in chunk:
                    # SSE allows CRLF line ends (sse-starlette servers use them): events are
                    # split and forwarded with LF; a CR at a read's end meets its LF next time
                    crlf = True
                    buf = (buf + chunk).replace(b"\r\n", b"\n")
                else:
                    buf += chunk
                if eof and buf.strip():
                    buf = buf.rstrip(b"\n") + b"\n\n"  # the last event may lack its blank line
                out: list[bytes] = []
                while True:
                    i = buf.find(b"\n\n")
                    if i < 0:
                        break
                    ev = buf[: i + 2]
                    buf = buf[i + 2 :]
                    fwd = self._inspect_event(ev, state, strip_usage, collect, ctx)
                    finished = state.pop("finish_event", False)
                    choice_event = state.pop("choice_event", False)
                    if held and not (fwd and choice_event):
                        # released before whatever is not another choice's chunk: the
                        # usage chunk we drop, [DONE], an error event
                        fp = state.pop("stripped_fp", None)
                        if fp is not None:
                            held = [_with_fingerprint(h, fp) for h in held]
                        out += held
                        if sent is not None:
                            sent += held
                        held = []
                    if not fwd:
                        continue
                    if strip_usage and finished:
                        # Without the usage chunk, vLLM puts system_fingerprint on each
                        # choice's finish chunk; with the usage we asked for, only on the
                        # usage chunk we drop. So finish chunks wait for it (it follows the
                        # last one at once; other choices' chunks pass meanwhile) and take
                        # its fingerprint.
                        held.append(ev)
                        continue
                    out.append(ev)
                    if sent is not None:
                        sent.append(ev)
                if held and eof:  # the stream ended without [DONE]
                    out += held
                    if sent is not None:
                        sent += held
                    held = []
                if len(buf) > MAX_EVENT_BYTES:
                    raise Disconnected(f"{len(buf)} bytes without an SSE event's end")
                if out:
                    now = time.perf_counter()
                    if now - yielded > YIELD_EVERY_S:
                        # Reading an upstream whose bytes are already buffered never suspends,
                        # so the loop would not poll the client's socket: a client gone
                        # mid-stream would go unnoticed (GPU time spent), and one gone before
                        # [DONE] would be logged as served. Three turns: the loop sees the
                        # close, the watcher wakes, it cancels us. A stream shorter than
                        # YIELD_EVERY_S never pays them.
                        for _ in range(3):
                            await asyncio.sleep(0)
                        yielded = now
                    last = state["done"]
                    if last:
                        # [DONE] is in this batch: it ends the response (one write, and the
                        # client is not kept waiting while the upstream's end is read). The
                        # watcher goes first: once the response is complete, the server
                        # reports any receive() as a disconnect.
                        watch.stop()
                    guard.since = now
                    await send(
                        {
                            "type": "http.response.body",
                            "body": b"".join(out) if len(out) > 1 else out[0],
                            "more_body": not last,
                        }
                    )
                    guard.since = None
                    state["delivered"] = last
                    if last:
                        ctx.answered_at = time.perf_counter()
                if state["done"]:
                    # read the body's end (chunked terminator) so the connection can be reused
                    with contextlib.suppress(Exception):
                        async with asyncio.timeout(1.0):
                            async for _ in it:
                                pass
                    break
                if eof:
                    break
                try:
                    chunk = await it.__anext__()
                except StopAsyncIteration:
                    eof = True
                    chunk = b""
            if not state["done"]:
                failure = (
                    502,
                    "upstream_stream_error",
                    f"upstream {up.url} ended the stream without {self.stream_end}",
                )
            elif state["error"] is not None:
                err = state["error"]
                failure = (
                    502,
                    "upstream_stream_error",
                    f"upstream {up.url} reported an error mid-stream: "
                    f"{str(err.get('message') or err)[:300]}",
                )
                failure_sent = True  # its error event and [DONE] reached the client
                code = err.get("code")
                # vLLM labels a request's own fault 4xx: not a sign of a sick replica
                blame_upstream = not (isinstance(code, int) and 400 <= code < 500)
        except Disconnected as exc:
            failure = (502, "upstream_stream_error", f"upstream {up.url} failed mid-stream: {exc}")
        except TimeoutError:
            failure = (
                502,
                "upstream_stream_error",
                f"upstream {up.url} sent nothing for {shim.cfg.read_timeout_s:g} s mid-stream",
            )
        except asyncio.CancelledError:
            if not watch.absorb():
                # not the client: the shim is stopping (a drain past its grace period).
                # The stream still ends cleanly (below), and the cancel is taken: uvicorn
                # would log a traceback for each stream it cut.
                stopping = True
                task = asyncio.current_task()
                if task is not None:
                    task.uncancel()
            # A client that closes right after reading [DONE] (the openai client does)
            # got the whole answer: that is a served request, not an abort.
            if not stopping and not state["delivered"]:
                rec["status_code"] = 499
                if guard.stalled:
                    rec["error_type"] = "client_stalled"
                    shim.logger.info(
                        "client took no bytes for %g s ([limits] send_timeout_s): stream "
                        "ended, upstream request %s cancelled",
                        shim.cfg.send_timeout_s,
                        rec["request_id"],
                    )
                else:
                    rec["error_type"] = "client_disconnected"
                    shim.logger.info(
                        "client disconnected mid-stream; upstream request %s cancelled",
                        rec["request_id"],
                    )
        except Exception as exc:  # a bug here must still end the stream cleanly and log
            shim.logger.exception("unexpected error while streaming %s", rec["request_id"])
            failure = (500, f"internal:{type(exc).__name__}", "internal error in the finops shim")
        finally:
            watch.stop()
            guard.stop()
            resp.close()  # no-op when the body was read to its end; else vLLM sees the abort
            if failure is None or not blame_upstream:
                up.breaker.success(ticket)
            else:
                up.breaker.failure(time.monotonic(), ticket)
            elapsed = time.perf_counter() - t_send
            shim.metrics.upstream_latency.labels(up.tier).observe(elapsed)
        self._stream_usage(ctx, state)
        if state["first_token"] is not None:
            rec["ttft_ms"] = (state["first_token"] - ctx.t0) * 1000
            shim.metrics.ttft.labels(up.tier).observe(state["first_token"] - ctx.t0)
        if stopping:
            rec["status_code"] = 503
            rec["error_type"] = "shim_shutdown"
            err = error_body(
                "The finops shim is shutting down and cut this stream "
                f"([server] drain_timeout_s = {shim.cfg.drain_timeout_s:g}); the response is "
                "incomplete.",
                "server_error",
                "shim_shutdown",
            )
            # a second cancel (the loop ending) must not skip the record either
            with contextlib.suppress(Exception, asyncio.CancelledError):
                async with asyncio.timeout(1.0):
                    body = b"".join(held) + self._stream_error_end(state, err)
                    await send({"type": "http.response.body", "body": body, "more_body": False})
            return None
        if failure is not None:
            status, error_type, message = failure
            rec["status_code"] = status
            rec["error_type"] = error_type
            shim.logger.warning("%s (request %s)", message, rec["request_id"])
            message = shim.pool.public(message)  # the client's copy: no internal URLs
            if error_type == "upstream_stream_error":
                # followers got nothing yet: the failure as an error answer, not a stream
                ctx.failure = LeaderFailure(
                    502,
                    error_body(message, "server_error", error_type),
                    error_type,
                    [],
                    up.tier,
                )
            if failure_sent:
                return None
            err = orjson.dumps(
                {
                    "error": {
                        "message": message + "; the response is incomplete.",
                        "type": "server_error",
                        "param": None,
                        "code": "upstream_stream_error" if status == 502 else "internal_error",
                    }
                }
            )
            # finish chunks held for the usage chunk go first, as they came
            body = b"".join(held) + self._stream_error_end(state, err)
            with contextlib.suppress(Exception):
                await send({"type": "http.response.body", "body": body, "more_body": False})
            return None
        if rec["status_code"] == 499:
            return None
        rec["status_code"] = 200
        if not watch.gone and not state["delivered"]:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        meta = {
            "tier": up.tier,
            "upstream": up.url,
            "response_model": rec["response_model"],
            "finish_reason": rec["finish_reason"],
        }
        if collect is not None and state["collected"] is not None:
            full = assemble_stream(collect, self.operation)
            if full is not None:
                payload = orjson.dumps(full)
                ctx.result = (meta, payload)
                if store_key is not None:
                    await shim.cache_put(store_key, meta, payload)
                return meta, payload
        if sent is not None:
            # for this request's Idempotency-Key only: not ctx.result, which coalesced
            # followers (streaming or not) read
            return {**meta, "sse": True}, b"".join(sent)
        return None

    # Hooks for another stream format (the Responses API, finops.shim.responses): what
    # ends a complete stream, for the failure message (`_inspect_event` sets
    # state["done"] when it sees it), and how the shim ends a stream it must cut. Both are
    # used on failure paths only: a chat or completions stream pays nothing for them.
    stream_end = "[DONE]"

    def _stream_error_end(self, state: dict, err: bytes) -> bytes:
        """The bytes that end a stream the shim cuts: `err` (an `error_body`) as an SSE
        event, then [DONE]."""
        return b"data: " + err + b"\n\n" + DONE

    def _stream_usage(self, ctx: Ctx, state: dict) -> None:
        """Tokens of a stream into the record: the upstream's usage, else what was streamed."""
        rec = ctx.rec
        if state["usage"]:
            self._usage_into(rec, state["usage"])
        else:  # partial: count streamed content chunks (vLLM sends one token per chunk)
            rec["output_tokens"] = state["content_chunks"]
            rec["input_tokens"] = ctx.input_tokens_known()
            rec["cached_input_tokens"] = 0

    def _inspect_event(
        self, ev: bytes, state: dict, strip_usage: bool, collect: list | None, ctx: Ctx
    ) -> bool:
        """Read one SSE event; return False to drop it (the injected usage chunk)."""
        j = ev.find(b"data:")
        if j < 0:
            return True
        data = ev[j + 5 :].strip()
        if data == b"[DONE]":
            state["done"] = True
            return True
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(obj, dict):
            return True
        rec = ctx.rec
        if rec["response_model"] is None:
            rec["response_model"] = obj.get("model")
        choices = obj.get("choices")
        usage = obj.get("usage")
        if usage:
            state["usage"] = usage
        if collect is not None and state["collected"] is not None:
            state["collected"] += len(ev)
            if state["collected"] > MAX_COLLECT_BYTES:
                collect.clear()  # too big to keep: not cached (an Idempotency-Key keeps `sent`)
                state["collected"] = None
            else:
                collect.append(obj)
        if choices and isinstance(choices, list):
            state["choice_event"] = True
            for ch in choices:
                if not isinstance(ch, dict):
                    continue
                # vLLM sends one chunk per generated token, and its content can be empty (a
                # token that ends mid-UTF-8 character): count the chunk, not the text. The
                # chat stream's first chunk may only announce the role (empty content).
                if ctx.operation == "chat":
                    d = ch.get("delta")
                    if not isinstance(d, dict):
                        d = {}
                    if d.get("role"):
                        has = bool(
                            d.get("content")
                            or d.get("tool_calls")
                            or d.get("reasoning_content")
                            or d.get("reasoning")
                        )
                    else:
                        has = (
                            "content" in d
                            or "tool_calls" in d
                            or "reasoning_content" in d
                            or "reasoning" in d
                        )
                else:
                    has = "text" in ch
                if has:
                    state["content_chunks"] += 1
                    if state["first_token"] is None:
                        state["first_token"] = time.perf_counter()
                fr = ch.get("finish_reason")
                if fr:
                    # the record keeps choice 0's, as a full answer's does: with n > 1 (or a
                    # prompt list) it was whichever choice finished last, so the same answer
                    # logged `stop` unstreamed and `length` streamed
                    if ch.get("index", 0) == 0:
                        rec["finish_reason"] = fr
                    state["finish_event"] = True
            return True
        if "error" in obj or obj.get("object") == "error":
            # vLLM reports a failure mid-stream in band: an error event, then [DONE]. The
            # client gets it as sent; the request is a failure, not an answer to keep.
            state["error"] = obj.get("error") if isinstance(obj.get("error"), dict) else obj
            return True
        # no choices: the usage-only chunk we injected
        if usage and strip_usage:
            if obj.get("system_fingerprint"):
                state["stripped_fp"] = obj["system_fingerprint"]
            return False
        return True

    def _finish(self, ctx: Ctx) -> None:
        """Log the record and the per-request metrics (never raises)."""
        shim = self.shim
        rec = ctx.rec
        if ctx.open:
            ctx.open = False
            shim.open_requests -= 1
        try:
            # a stream's ends when the client has its last byte, not when the upstream's
            # body ends (read afterwards, up to 1 s, to keep the connection)
            end = ctx.answered_at or time.perf_counter()
            rec["latency_ms"] = (end - ctx.t0) * 1000
            if rec["tier"] is None:
                rec["tier"] = ctx.tier
            if rec["status_code"] is None:
                rec["status_code"] = 499 if ctx.first_byte_at is None else 200
                if ctx.first_byte_at is None:
                    rec["error_type"] = rec["error_type"] or "client_disconnected"
            if (
                not ctx.stream
                and ctx.operation != "embeddings"  # no token is generated
                and rec["ttft_ms"] is None
                and rec["status_code"] == 200
                and ctx.first_byte_at is not None
            ):
                rec["ttft_ms"] = (ctx.first_byte_at - ctx.t0) * 1000
            # the record first: it is the bill, a metric must never cost it
            shim.log.write(rec)
        except Exception:
            shim.logger.exception("could not log request %s", rec.get("request_id"))
        try:
            m = shim.metrics
            tier = rec["tier"] or "none"
            m.requests.labels(
                tier, str(rec["status_code"]), rec["tenant"] or "unauthenticated"
            ).inc()
            if rec["upstream"] is not None:  # tokens an upstream processed (a cap's count is not)
                if rec["input_tokens"]:
                    m.tokens.labels(tier, "input").inc(rec["input_tokens"])
                if rec["output_tokens"]:
                    m.tokens.labels(tier, "output").inc(rec["output_tokens"])
                if rec["cached_input_tokens"]:
                    m.tokens.labels(tier, "cached_input").inc(rec["cached_input_tokens"])
        except Exception:
            shim.logger.exception("could not count request %s", rec.get("request_id"))


def _token_count(v: Any) -> int | None:
    """`v` as a token count (a whole number >= 0; 5.0 is 5), else None."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    if isinstance(v, float) and not v.is_integer():
        return None
    return int(v) if v >= 0 else None


def _whole_event(ev: bytes) -> bool:
    """An SSE event lacking only its blank line: its data is [DONE] or whole JSON (not an
    event cut inside its JSON)."""
    j = ev.find(b"data:")
    return j >= 0 and (ev[j + 5 :].strip() == b"[DONE]" or sse_json(ev) is not None)


def _with_fresh_id(payload: bytes, client_request_id: bytes | None) -> bytes:
    """A chat/completions answer under a new id: `<its prefix>-<X-Request-Id>`, as vLLM
    names answers, or a random one."""
    obj = _json_object(payload)
    old = obj.get("id") if obj is not None else None
    if not isinstance(old, str):
        return payload
    prefix = old.split("-", 1)[0] + "-" if "-" in old else ""
    rid = client_request_id.decode("latin-1") if client_request_id else uuid.uuid4().hex
    obj["id"] = prefix + rid
    return orjson.dumps(obj)


def _sse_start(ctx: Ctx, now: float) -> dict:
    """The 200 `http.response.start` of an event stream, with the finops headers as of `now`."""
    return {
        "type": "http.response.start",
        "status": 200,
        "headers": SSE_HEADERS + ctx.headers(now),
    }


def _with_fingerprint(ev: bytes, fp: Any) -> bytes:
    """An SSE chunk event with `system_fingerprint` set (kept as is if it has one)."""
    j = ev.find(b"data:")
    try:
        obj = orjson.loads(ev[j + 5 :].strip())
    except orjson.JSONDecodeError:
        return ev
    if not isinstance(obj, dict) or obj.get("system_fingerprint"):
        return ev
    obj["system_fingerprint"] = fp
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def _meta_of(meta: dict) -> dict:
    return {k: meta.get(k) for k in ("tier", "upstream", "response_model", "finish_reason", "sse")}


def _idem_entry(
    rec: dict,
    raw: bytes,
    meta: dict,
    *,
    endpoint: str | None = None,
    created: float | None = None,
) -> dict:
    """What an Idempotency-Key stores: the first request's id, the body's fingerprint
    and endpoint (a reuse with another body or endpoint is a 422), the attempt count,
    when the first attempt came (the record's lifetime counts from it) and the response
    meta (`failed` when no attempt got an answer yet)."""
    entry = {
        "request_id": rec["retry_of"] or rec["request_id"],
        "fp": hashlib.sha256(raw).hexdigest(),
        "attempts": rec["attempt"] or 1,
        "created": created if created is not None else time.time(),
        **meta,
    }
    if endpoint is not None:
        entry["endpoint"] = endpoint
    return entry


def _bad_model(model: Any) -> NoReturn:
    """The 400 for a `model` that is missing, empty or not a string."""
    if model is None or model == "":
        raise HTTPError(
            400,
            "`model` is required (a tier name or the routing alias).",
            "invalid_request_error",
            "missing_model",
            param="model",
        )
    raise _wrong_type(
        "model", "a string (a tier name or the routing alias)", model, "invalid_model"
    )


def _body_and_model(raw: bytes, rec: dict) -> tuple[dict, str]:
    """The request body (a JSON object) and its `model`, recorded; 400 otherwise."""
    body = _parse_json_body(raw)
    if not isinstance(body, dict):
        raise HTTPError(
            400, "Request body must be a JSON object.", "invalid_request_error", "invalid_json"
        )
    model = body.get("model")
    if not isinstance(model, str) or not model:
        _bad_model(model)
    rec["request_model"] = model[:NAME_LOG_CHARS]
    return body, model


def _stream_flag(body: dict) -> bool:
    """`stream`, which must be a boolean: vLLM would read "yes" or 1 as true and stream
    to a shim that expects JSON."""
    stream = body.get("stream")
    if stream is None:
        return False
    if not isinstance(stream, bool):
        raise _wrong_type("stream", "true or false", stream, "invalid_stream")
    return stream


def _wrong_type(param: str, expected: str, value: Any, code: str) -> HTTPError:
    """The 400 for a field that is not what vLLM takes there: names it, shows what came."""
    return HTTPError(
        400,
        f"`{param}` must be {expected}, not {orjson.dumps(value).decode()[:40]}.",
        "invalid_request_error",
        code,
        param=param,
    )


# what vLLM's request models (pydantic, lax mode) read as a boolean
_LAX_TRUE = frozenset(("1", "on", "t", "true", "y", "yes"))
_LAX_FALSE = frozenset(("0", "off", "f", "false", "n", "no"))


def _lax_bool(v: Any) -> bool | None:
    """`v` as vLLM reads a boolean field; None when it is not one (vLLM answers 400)."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int | float) and v in (0, 1):
        return bool(v)
    if isinstance(v, str):
        low = v.lower()
        if low in _LAX_TRUE:
            return True
        if low in _LAX_FALSE:
            return False
    return None


def _usage_options(so: Any) -> tuple[bool, bool]:
    """Whether a stream's `stream_options` ask for the usage chunk, and for usage on every
    chunk too (vLLM's `continuous_usage_stats`, only with the first); 400 when they are
    not valid stream options.

    Checked here, not left to vLLM: the shim sends its own stream options upstream (it
    always asks for usage), so vLLM never sees the client's, and a cache hit never asks
    vLLM at all. Booleans are read as vLLM reads them ("no" is false), so the shim
    strips the usage chunk exactly when vLLM would not have sent it.
    """
    if so is None:
        return False, False
    if not isinstance(so, dict):
        raise _wrong_type("stream_options", "an object", so, "invalid_stream_options")
    flags = []
    for key in ("include_usage", "continuous_usage_stats"):
        v = so.get(key)
        flag = False if v is None else _lax_bool(v)
        if flag is None:
            raise _wrong_type(f"stream_options.{key}", "true or false", v, "invalid_stream_options")
        flags.append(flag)
    return flags[0], flags[0] and flags[1]


_NAMES_SHOWN = 20  # a 404 lists this many names; /v1/models has them all


def _model_not_found(shim: Shim, model: str) -> HTTPError:
    """The 404 for a name the shim does not take, listing the names it does: the
    aliases, tiers, the model names they serve and `model_aliases` (a denied name is
    not one to use: under `explicit = "deny"` only the routed ones are listed)."""
    aliases = set(shim.cfg.aliases)
    usable = [n for n, v in shim._names.items() if not isinstance(v, HTTPError)]
    usable.sort(key=lambda n: n not in aliases)  # stable: aliases first, then config order
    shown = ", ".join(f"`{n}`" for n in usable[:_NAMES_SHOWN])
    if len(usable) > _NAMES_SHOWN:
        shown += f" and {len(usable) - _NAMES_SHOWN} more (GET /v1/models lists them)"
    return HTTPError(
        404,
        f"The model `{model}` does not exist here; use one of {shown}.",
        "invalid_request_error",
        "model_not_found",
        param="model",
    )


def _resolve(shim: Shim, model: str) -> Any:
    """The tier or "@route" a `model` name resolves to; 404 for an unknown name, the
    explicit policy's error (403) for a denied one."""
    tier = shim.resolve_model(model)
    if tier is None:
        raise _model_not_found(shim, model)
    if isinstance(tier, HTTPError):
        raise tier
    return tier


def _route(ctx: Ctx, router: Router, body: dict, feature: str) -> str:
    """Classify a request for the routing alias: its tier, with the decision in the
    record (routed requests only) and the metrics."""
    rec = ctx.rec
    routed = ctx.routed = router.route(body, feature, rec["tenant"])
    tier = routed.tier
    rec["router_version"] = routed.version
    rec["router_score"] = routed.score
    rec["route_propensity"] = routed.propensity
    rec["routed_tier"] = tier
    m = ctx.shim.metrics
    m.router_decisions.labels(tier, routed.version, "yes" if routed.explored else "no").inc()
    if routed.score is not None:
        m.router_score.labels(routed.version).observe(routed.score)
    return tier


def sse_json(ev: bytes) -> Any:
    """The JSON in an SSE event's `data:` field; None when it has none or it is not JSON."""
    j = ev.find(b"data:")
    if j < 0:
        return None
    try:
        return orjson.loads(ev[j + 5 :].strip())
    except orjson.JSONDecodeError:
        return None


def _tier_removed(tier: Any) -> HTTPError:
    return HTTPError(
        503,
        f"Tier `{tier}` was removed by a config reload; retry the request.",
        "server_error",
        "tier_unavailable",
        "tier_unavailable",
    )


def _server_error_event(first: bytes) -> str | None:
    """The message of a server-side error (code >= 500, or none) if the stream's first
    event is vLLM's in-band error event; None otherwise. A 4xx there is the request's
    fault: another replica would answer the same, so it is passed on as sent."""
    if b'"error"' not in first:
        return None
    obj = sse_json(first.split(b"\n\n", 1)[0].split(b"\r\n\r\n", 1)[0])
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict) or "choices" in obj:
        return None
    code = err.get("code")
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code < 500:
        return None
    return f"{err.get('type') or 'error'} {code}: {str(err.get('message'))[:200]}"


def _error_message(data: bytes) -> str | None:
    """The message of an OpenAI- or FastAPI-shaped error body (`error.message`,
    `message`, `detail`), cut to 300 characters; None when it has none."""
    obj = _json_object(data)
    if obj is None:
        return None
    err = obj.get("error")
    said = err.get("message") if isinstance(err, dict) else err
    if not isinstance(said, str) or not said:
        said = obj.get("message") or obj.get("detail")
    if not isinstance(said, str) or not said:
        return None
    return said[:300] + ("..." if len(said) > 300 else "")


def _json_object(data: bytes) -> dict | None:
    try:
        obj = orjson.loads(data)
    except orjson.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) else None


async def _send_simple(
    send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]
) -> None:
    # a length, not chunked framing: HTTP/1.0 clients cannot read chunked (RFC 9112 6.1)
    length = (b"content-length", str(len(body)).encode())
    await send(
        {"type": "http.response.start", "status": status, "headers": [JSON_CT, length, *headers]}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


class EmbeddingsEndpoint:
    """Pass-through for /v1/embeddings: auth, model -> tier, fallback, one log record."""

    def __init__(self, shim: Shim) -> None:
        self.shim = shim

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        shim = self.shim
        ep = ProxyEndpoint(shim, "embeddings")
        ep.path = "/v1/embeddings"
        if scope["method"] != "POST":
            await _method_not_allowed(ep, send)
            return
        ctx = Ctx(shim, "embeddings")
        rec = ctx.rec
        _start_record(rec, "embeddings")
        rec["stream"] = False
        auth, declared, _idem, feature = _scan_headers(
            scope["headers"], shim.cfg.feature_header.encode(), ctx
        )
        rec["feature"] = (feature or shim.cfg.default_feature)[:NAME_LOG_CHARS]
        try:
            t = time.perf_counter()
            try:
                raw = await _auth_then_read_body(shim, ctx, auth, declared, receive)
                ctx.body_unsent = False
            finally:  # a 408 waited for the client too
                ctx.waited += time.perf_counter() - t
            body = _parse_json_body(raw)
            if not isinstance(body, dict):
                raise HTTPError(
                    400,
                    "Request body must be a JSON object.",
                    "invalid_request_error",
                    "invalid_json",
                )
            model = body.get("model")
            if not isinstance(model, str) or not model:
                _bad_model(model)
            rec["request_model"] = model[:NAME_LOG_CHARS]
            tier = shim.resolve_model(model)
            if tier == "@route":
                tier = shim.cfg.tier_names[0]  # embeddings are not classified: cheapest tier
            ctx.one_tier = True  # another replica of its tier, never another tier's model
            if tier is None:
                raise _model_not_found(shim, model)
            if isinstance(tier, HTTPError):
                raise tier
            ctx.tier = tier
            ctx.body = body
            # counted where chat counts it: at the cache step, which rejected requests
            # never reach (embeddings are never cached)
            rec["cache_status"] = "bypass"
            shim.metrics.cache.labels("bypass").inc()
            await ep._forward(ctx, send, receive, None)
        except HTTPError as exc:
            await _answer_http_error(ctx, exc, send)
        except ClientGone:
            _mark_client_gone(rec)
        except Exception as exc:  # a bug must still answer and log
            await _answer_internal_error(ctx, exc, ep.path, send)
        finally:
            ep._finish(ctx)


def circuit_snapshot(shim: Shim) -> list[dict]:
    now = time.monotonic()
    return [
        {
            "tier": u.tier,
            "upstream": u.url,
            "circuit": STATE_NAMES[u.breaker.shown_state(now)],
            "outstanding": u.outstanding,
            "reachable": u.reachable,
        }
        for u in shim.pool.all()
    ]
