"""The shim against upstreams that break HTTP/1.1 in the ways real servers and middleboxes do.

A scripted raw-socket upstream on loopback answers each POST with exact bytes, and
records which connection each POST arrived on, so the tests can see a request sent
twice, or a connection reused after a response that was not framed exactly.
"""

from __future__ import annotations

import dataclasses
import gzip
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest

from finops.shim import from_flags, serve_in_thread
from finops.shim.testing import wait_for_records as _records

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
ANSWER = orjson.dumps(
    {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "small",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
    }
)


def ok(body: bytes = ANSWER, extra: bytes = b"") -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        + extra
        + b"content-length: %d\r\n\r\n" % len(body)
        + body
    )


class ScriptedUpstream:
    """Answers POST number i (0-based, over all connections) with `script(i)`.

    `script` returns the bytes to send and what to do next: "keep" (read the next
    request), "close" or a float (hold that long, then close). GETs (the shim's health
    checks) get an empty 200 and are not counted.
    """

    def __init__(self, script: Callable[[int], tuple[bytes, str | float]]) -> None:
        self.script = script
        self.posts: list[tuple[int, dict]] = []  # (connection number, request headers)
        self._lock = threading.Lock()
        self._conns = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self._lock:
                self._conns += 1
                n = self._conns
            threading.Thread(target=self._serve, args=(c, n), daemon=True).start()

    def _serve(self, c: socket.socket, n: int) -> None:
        buf = b""
        with c:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = c.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (ln.partition(":") for ln in lines[1:])
                }
                length = int(headers.get("content-length", "0"))
                while len(buf) < length:
                    buf += c.recv(65536)
                buf = buf[length:]
                if lines[0].startswith("GET"):
                    c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}")
                    continue
                with self._lock:
                    i = len(self.posts)
                    self.posts.append((n, headers))
                data, then = self.script(i)
                c.sendall(data)
                if then == "keep":
                    continue
                if isinstance(then, float):
                    time.sleep(then)
                return

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def scripted():
    made: list[ScriptedUpstream] = []

    def make(script):
        u = ScriptedUpstream(script)
        made.append(u)
        return u

    yield make
    for u in made:
        u.close()


def _serve(tmp_path: Path, url: str, **changes):
    cfg = from_flags([f"small={url}"], log_dir=tmp_path / "log")
    return serve_in_thread(
        dataclasses.replace(cfg, first_byte_timeout_s=3.0, response_timeout_s=3.0, **changes)
    )


@pytest.mark.parametrize(
    "failure",
    [
        b"HTTP/1.1 200 OK\r\ncontent-type: app",  # part of a head, then the connection drops
        b"",  # nothing, after holding the request (it was generating), then the drop
    ],
    ids=["partial-head", "held-then-closed"],
)
@pytest.mark.parametrize("stream", [False, True])
def test_a_request_on_a_reused_connection_is_never_sent_twice(tmp_path, scripted, failure, stream):
    """The second POST goes out on the kept-alive connection of the first; the upstream
    had it (a partial answer, or a long hold) before dropping the connection. Sending it
    again would run the generation twice: the client gets the 502 instead, logged."""
    up = scripted(lambda i: (ok(), "keep") if i == 0 else (failure, 0.3))
    with _serve(tmp_path, up.url) as h:
        with httpx.Client(timeout=10) as c:
            assert c.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
            r = c.post(h.base_url + "/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == 502, r.text
        assert r.json()["error"]["code"] == "upstream_disconnect"
        recs = _records(h.shim, 2)
    conns = [n for n, _ in up.posts]
    assert len(conns) == 2 and conns[0] == conns[1]  # each POST once, on one connection
    assert (recs[1]["status_code"], recs[1]["upstream"]) == (502, up.url)


UNICODE = ANSWER.replace(b'"hi"', '"hé€"'.encode())
# Content-Length counted in characters, not UTF-8 bytes: 3 bytes of the body are left over
IN_CHARACTERS = ok(UNICODE).replace(
    b"content-length: %d" % len(UNICODE), b"content-length: %d" % len(UNICODE.decode())
)


@pytest.mark.parametrize(
    ("first", "status"),
    [
        (ok() + b"\r\n", 200),  # a stray CRLF after the body
        (IN_CHARACTERS, 502),  # the body read is cut: no answer, never a 200 of broken JSON
        # both framings: chunked wins (RFC 9112 6.3), and the connection is not reused
        (
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 5\r\n"
            b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n" % (len(ANSWER), ANSWER),
            200,
        ),
    ],
    ids=["stray-crlf", "length-in-characters", "te-and-cl"],
)
def test_a_connection_left_with_unread_bytes_is_not_reused(tmp_path, scripted, first, status):
    """Bytes after a response's body belong to no request: reusing the connection would
    read them as the next client's answer (or make its request fail). The next request
    goes out on a fresh connection and gets its own answer."""
    assert ok(UNICODE) != IN_CHARACTERS
    up = scripted(lambda i: (first if i == 0 else ok(), "keep"))
    with _serve(tmp_path, up.url) as h:
        with httpx.Client(timeout=10) as c:
            r1 = c.post(h.base_url + "/chat/completions", json=CHAT)
            time.sleep(0.1)  # the leftover bytes have arrived before the next request
            r2 = c.post(h.base_url + "/chat/completions", json=CHAT)
            r3 = c.post(h.base_url + "/chat/completions", json=CHAT)
        recs = _records(h.shim, 3)
    assert r1.status_code == status, r1.text
    if status == 200:
        assert r1.json() == orjson.loads(ANSWER)
    assert r2.status_code == r3.status_code == 200
    assert r2.json() == r3.json() == orjson.loads(ANSWER)
    conns = [n for n, _ in up.posts]
    # once each; the second on a fresh connection, which the third reuses
    assert len(conns) == 3 and conns[0] != conns[1] == conns[2]
    assert [r["status_code"] for r in recs] == [status, 200, 200]


def test_interim_1xx_answers_are_skipped(tmp_path, scripted):
    """103 Early Hints (or a stray 100 Continue) comes before the real answer: the shim
    waits for the final one rather than taking the 1xx as the answer (and timing out)."""
    hints = b"HTTP/1.1 103 Early Hints\r\nlink: </style.css>\r\n\r\n"
    cont = b"HTTP/1.1 100 Continue\r\n\r\n"
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "small"}
    chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": "stop"}]
    events = b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n"
    sse = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        + b"content-length: %d\r\n\r\n" % len(events)
        + events
    )
    # POST 0 is the plain request, POST 1 the stream
    up = scripted(lambda i: ((hints + ok(), cont + sse)[i % 2], "keep"))
    with _serve(tmp_path, up.url) as h:
        t0 = time.monotonic()
        for stream in (False, True):
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": stream})
            assert r.status_code == 200, r.text
        assert time.monotonic() - t0 < 2  # not the 3 s first-byte timeout
    assert len(up.posts) == 2


def test_upstream_answers_are_asked_uncompressed_and_a_broken_200_is_a_502(tmp_path, scripted):
    """The shim reads answers (usage, cache, SSE events): it asks for identity encoding,
    and a 200 whose body is not a JSON object (compressed anyway, cut short) is the
    upstream's failure, answered 502 like one, never passed on as a success."""
    zipped = gzip.compress(ANSWER)
    bodies = [
        ok(zipped, b"content-encoding: gzip\r\n"),
        ok(ANSWER[: len(ANSWER) // 2]),
        ok(b"[1, 2]"),
        ok(),
    ]
    up = scripted(lambda i: (bodies[i], "keep"))
    with _serve(tmp_path, up.url) as h:
        out = [httpx.post(h.base_url + "/chat/completions", json=CHAT) for _ in bodies]
        recs = _records(h.shim, 4)
    assert [r.status_code for r in out] == [502, 502, 502, 200]
    assert "content-encoding gzip" in out[0].json()["error"]["message"]
    assert all(r.json()["error"]["code"] == "upstream_bad_response" for r in out[:3])
    assert [r["error_type"] for r in recs[:3]] == ["upstream_bad_response"] * 3
    assert all(hdrs.get("accept-encoding") == "identity" for _, hdrs in up.posts)


@pytest.mark.parametrize("stream", [False, True])
def test_a_101_204_or_redirect_is_no_answer_and_falls_back(tmp_path, scripted, fakes, stream):
    """vLLM answers 200, 4xx or 5xx. A 101, a 204 or a redirect (an ingress moving http to
    https) used to reach the client as the answer: an empty 204, a 101 to a client that
    asked for no upgrade, a 308 that sends the client (and its key) past the shim."""
    answers = [
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n",
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 308 Permanent Redirect\r\nlocation: https://vllm.internal/v1/chat/"
        b"completions\r\ncontent-length: 0\r\n\r\n",
    ]
    bad = scripted(lambda i: (answers[i], "close"))
    _, good = fakes()
    with _serve(tmp_path, bad.url) as h:  # one tier: the failure is the client's answer
        alone = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": stream})
    cfg = from_flags([f"small={bad.url}", f"mid={good}"], log_dir=tmp_path / "log2")
    with serve_in_thread(cfg) as h:
        out = [
            httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": stream})
            for _ in answers[1:]
        ]
        recs = _records(h.shim, 2)
    assert alone.status_code == 502 and "answered 101" in alone.json()["error"]["message"]
    assert alone.json()["error"]["code"] == "upstream_bad_response"
    assert [r.status_code for r in out] == [200, 200]
    assert all(r.headers["x-finops-tier"] == "mid" for r in out)
    assert all(r["fallback_reason"] == "bad_response" for r in recs)
    assert [r["upstream_attempts"] for r in recs] == [2, 2]
    assert len(bad.posts) == 3


def test_a_redirect_names_where_to_point_the_upstream_in_the_log_only(tmp_path, scripted, caplog):
    where = b"https://vllm.internal/v1/chat/completions"
    up = scripted(
        lambda i: (
            b"HTTP/1.1 301 Moved\r\nlocation: " + where + b"\r\ncontent-length: 0\r\n\r\n",
            "keep",
        )
    )
    with _serve(tmp_path, up.url) as h:
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
    assert r.status_code == 502 and "location" not in r.headers
    # the target is another internal address: the operator's log has it, the client not
    assert "vllm.internal" not in r.text and "answered 301" in r.json()["error"]["message"]
    assert "redirects to 'https://vllm.internal/v1/chat/completions'" in caplog.text


def test_usage_that_is_no_token_count_is_logged_unknown_and_no_record_is_lost(
    tmp_path, scripted, caplog
):
    """A broken or non-vLLM upstream's usage ("5", -1, 5.5, true): taken as is, a string
    or a negative count made a metric raise and the whole record was lost, and 5.5 made a
    record `finops ingest` refuses. Now each such count is null (unknown), with a warning;
    7.0 is 7."""
    from finops.lake import Lake

    usages = [
        {"prompt_tokens": "5", "completion_tokens": 2},
        {"prompt_tokens": 5, "completion_tokens": -1},
        {"prompt_tokens": 5.5, "completion_tokens": True},
        {
            "prompt_tokens": 7.0,
            "completion_tokens": 2,
            "prompt_tokens_details": {"cached_tokens": "x"},
        },
    ]
    bodies = [ok(orjson.dumps({**orjson.loads(ANSWER), "usage": u})) for u in usages]
    up = scripted(lambda i: (bodies[i], "keep"))
    with _serve(tmp_path, up.url) as h:
        out = [httpx.post(h.base_url + "/chat/completions", json=CHAT) for _ in bodies]
        recs = _records(h.shim, 4)
        metrics = httpx.get(h.url + "/metrics").text
    assert [r.status_code for r in out] == [200] * 4
    got = [(r["input_tokens"], r["output_tokens"], r["cached_input_tokens"]) for r in recs]
    assert got == [(None, 2, 0), (5, None, 0), (None, None, 0), (7, 2, None)]
    assert 'usage.prompt_tokens = "5", not a token count' in caplog.text
    assert "usage.prompt_tokens_details.cached_tokens" in caplog.text
    assert 'finops_shim_requests_total{status="200",tenant="default",tier="small"} 4.0' in metrics
    res = Lake(tmp_path / "lake").append("requests", recs, source="shim")
    assert (res.loaded, res.rejected) == (4, 0)


def _sse_head(ctype: bytes = b"text/event-stream") -> bytes:
    """A 200 head without a length: the body runs until the connection closes."""
    return b"HTTP/1.1 200 OK\r\ncontent-type: " + ctype + b"\r\nconnection: close\r\n\r\n"


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        (_sse_head(b"text/html") + b"<html>502 from the gateway</html>", "bad_response"),
        (_sse_head(b"application/json") + ANSWER, "bad_response"),
        (_sse_head() + b'data: {"id": "c1", "object": "chat.compl', "disconnect"),
    ],
    ids=["html", "json", "cut-first-event"],
)
def test_a_stream_whose_200_is_no_event_stream_falls_back(
    tmp_path, scripted, fakes, answer, reason
):
    """A stream request answered 200 with an HTML page, a JSON answer or a first event cut
    short: nothing was sent to the client, so it falls back (the shim used to send those
    bytes as an "event" of a 200 stream)."""
    bad = scripted(lambda i: (answer, "close"))
    _, good = fakes()
    cfg = from_flags([f"small={bad.url}", f"mid={good}"], log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
        recs = _records(h.shim, 1)
    assert r.status_code == 200 and r.headers["x-finops-tier"] == "mid"
    events = [e for e in r.content.split(b"\n\n") if e]
    assert events[-1] == b"data: [DONE]" and all(e.startswith(b"data: ") for e in events)
    assert b"html" not in r.content and b"chat.compl\n" not in r.content
    assert recs[0]["upstream_attempts"] == 2 and recs[0]["fallback_reason"] == reason
    assert recs[0]["status_code"] == 200 and recs[0]["tier"] == "mid"


def test_an_sse_event_that_never_ends_is_cut_not_buffered_without_bound(tmp_path, scripted):
    """An upstream sending bytes without an event's end after its first event: the shim
    buffered all of them (memory without bound, quadratic copying) while the client got
    nothing. Past MAX_EVENT_BYTES the stream is cut with an SSE error."""
    from finops.shim.proxy import MAX_EVENT_BYTES

    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "small"}
    chunk["choices"] = [{"index": 0, "delta": {"content": "hi"}, "finish_reason": None}]
    first = b"data: " + orjson.dumps(chunk) + b"\n\n"
    endless = first + b"data: " + b"x" * (MAX_EVENT_BYTES + 1_000_000)
    up = scripted(lambda i: (_sse_head() + endless, 5.0))
    with _serve(tmp_path, up.url) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True}, timeout=30)
        recs = _records(h.shim, 1)
    events = [e for e in r.content.split(b"\n\n") if e]
    assert events[0] == first.strip() and events[-1] == b"data: [DONE]"
    assert orjson.loads(events[-2][6:])["error"]["code"] == "upstream_stream_error"
    assert len(r.content) < 10_000
    assert recs[0]["status_code"] == 502 and recs[0]["error_type"] == "upstream_stream_error"
