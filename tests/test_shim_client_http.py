"""The shim against clients that stretch HTTP/1.1: huge or slow request heads, idle
connections, malformed framing, HTTP/1.0, Expect: 100-continue, compressed bodies.

Raw sockets on loopback, so each test sends exactly the bytes it means.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import socket
import threading
import time

import httpx
import orjson
import pytest

from finops.shim import from_flags, serve_in_thread
from finops.shim.config import hash_key
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.protocol import MAX_HEAD_BYTES
from finops.shim.server import run_app_in_thread

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def shim(tmp_path):
    up = run_app_in_thread(FakeUpstream("ok"))
    cfg = from_flags([f"small={up.url}"], log_dir=tmp_path / "log")
    cfg = dataclasses.replace(
        cfg, body_timeout_s=0.6, max_body_bytes=10_000, api_keys={hash_key("sk-good"): "acme"}
    )
    with serve_in_thread(cfg) as h:
        yield h
    up.stop(2)


def _connect(h) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", h.port))
    s.settimeout(5)
    return s


def _read_all(s: socket.socket) -> bytes:
    """Everything the shim sends until it closes the connection."""
    out = b""
    while True:
        data = s.recv(65536)
        if not data:
            return out
        out += data


def _split(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _refused(h) -> dict[str, float]:
    text = httpx.get(h.url + "/metrics").text
    out = {}
    for line in text.splitlines():
        if line.startswith("finops_shim_refused_connections_total{"):
            out[line.split('reason="')[1].split('"')[0]] = float(line.split()[-1])
    return out


def _post(h, headers: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(
        h.base_url + "/chat/completions",
        headers={"authorization": "Bearer sk-good", **(headers or {})},
        timeout=5,
        **kw,
    )


def test_an_oversized_request_head_gets_431_and_others_are_served(shim):
    """One client streaming an endless header line used to grow the shim's memory without
    bound and stall everyone (the parser's cost grows with the square of the head)."""
    s = _connect(shim)
    stop = threading.Event()
    latencies: list[float] = []

    def others() -> None:
        while not stop.is_set():
            t = time.perf_counter()
            assert _post(shim, json=CHAT).status_code == 200
            latencies.append(time.perf_counter() - t)

    t = threading.Thread(target=others)
    t.start()
    try:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-pad: ")
        sent = 0
        # the shim answers and closes once the head passes the limit; what we manage to
        # send before noticing depends on socket buffers (megabytes on a busy loopback)
        with contextlib.suppress(OSError):
            while sent < 256 * MAX_HEAD_BYTES:  # 16 MiB: more than loopback buffers hold
                s.sendall(b"a" * 16384)
                sent += 16384
        status, headers, body = _split(_read_all(s))
    finally:
        stop.set()
        t.join()
        s.close()
    assert status == 431 and headers["connection"] == "close"
    assert orjson.loads(body)["error"]["code"] == "request_header_fields_too_large"
    assert latencies and max(latencies) < 2
    assert _refused(shim)["request_header_fields_too_large"] == 1


@pytest.mark.parametrize("pad", [MAX_HEAD_BYTES + 4_000, 2 * MAX_HEAD_BYTES])
def test_a_whole_oversized_head_in_one_write_gets_431(shim, pad):
    """A head over the limit that arrives complete in one read (with its body) was
    parsed before the size check ran, and served."""
    body = orjson.dumps(CHAT)
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-good\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\nx-pad: %s\r\n\r\n"
        % (len(body), b"a" * pad)
    )
    with _connect(shim) as s:
        s.sendall(head + body)
        status, headers, out = _split(_read_all(s))
    assert status == 431 and headers["connection"] == "close"
    assert orjson.loads(out)["error"]["code"] == "request_header_fields_too_large"
    assert _refused(shim)["request_header_fields_too_large"] == 1
    # a head just under the limit, sent the same way, is served
    small = head.replace(b"a" * pad, b"a" * (MAX_HEAD_BYTES - 1_000))
    with _connect(shim) as s:
        s.sendall(small.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nconnection: close\r\n", 1) + body)
        status, _, out = _split(_read_all(s))
    assert status == 200, out


def test_a_slow_or_silent_head_is_cut_at_the_body_timeout(shim):
    """A head dripped byte by byte gets a 408 once the client's time to send its request
    (`body_timeout_s`) is up; a connection that says nothing is closed then too. A kept-
    alive connection idle between requests is not cut by it (uvicorn's keep-alive is)."""
    drip = _connect(shim)
    silent = _connect(shim)
    with httpx.Client(headers={"authorization": "Bearer sk-good"}, timeout=5) as c:
        assert c.post(shim.base_url + "/chat/completions", json=CHAT).status_code == 200
        t0 = time.monotonic()
        for b in b"POST /v1/chat/completions HTTP/1.1\r\n":
            try:
                drip.sendall(bytes([b]))
            except OSError:
                break
            time.sleep(0.05)
        status, _, body = _split(_read_all(drip))
        took = time.monotonic() - t0
        assert status == 408 and 0.5 < took < 2.5, took
        assert orjson.loads(body)["error"]["code"] == "request_timeout"
        assert _read_all(silent) == b""  # closed, with nothing to say
        time.sleep(0.3)  # over the head timeout since the last request on c
        assert c.post(shim.base_url + "/chat/completions", json=CHAT).status_code == 200
    drip.close()
    silent.close()
    refused = _refused(shim)
    assert refused["request_timeout"] == 1 and refused["idle_connection"] == 1


def test_malformed_framing_is_refused_in_openai_shape(shim):
    s = _connect(shim)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n"
        b"content-length: 6\r\n\r\nhello!"
    )
    status, headers, body = _split(_read_all(s))
    s.close()
    assert status == 400 and headers["content-type"] == "application/json"
    assert orjson.loads(body)["error"]["code"] == "invalid_http_request"
    assert _refused(shim)["invalid_http_request"] == 1


def test_errors_to_http_1_0_clients_are_not_chunked(shim):
    """HTTP/1.0 has no chunked encoding (RFC 9112 6.1): the shim's own answers carry a
    length, so an HTTP/1.0 client can read them."""
    for req in (
        b"POST /v1/chat/completions HTTP/1.0\r\ncontent-length: 2\r\n\r\n{}",  # 401
        b"GET /v1/chat/completions HTTP/1.0\r\n\r\n",  # 405
    ):
        s = _connect(shim)
        s.sendall(req)
        status, headers, body = _split(_read_all(s))
        s.close()
        assert status in (401, 405) and "transfer-encoding" not in headers
        assert int(headers["content-length"]) == len(body) and orjson.loads(body)["error"]


def test_a_stream_to_an_http_1_0_client_is_ended_by_close_not_chunked(shim):
    """An SSE stream has no length: to an HTTP/1.0 client it goes out as it comes and
    the connection's close ends it (uvicorn wrote chunk sizes the client read as data).
    An HTTP/1.1 client on the same shim still gets it chunked and kept alive."""
    body = orjson.dumps({**CHAT, "stream": True, "max_tokens": 3})
    head = (
        b"POST /v1/chat/completions %s\r\nauthorization: Bearer sk-good\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
    )
    s = _connect(shim)
    s.sendall(head % (b"HTTP/1.0", len(body)) + body)
    status, headers, sse = _split(_read_all(s))  # returns: the shim closed
    s.close()
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert "transfer-encoding" not in headers and "content-length" not in headers
    assert headers["connection"] == "close"
    events = [e for e in sse.split(b"\n\n") if e]
    assert all(e.startswith(b"data: ") for e in events), sse[:200]
    assert events[-1] == b"data: [DONE]" and len(events) >= 4

    s = _connect(shim)
    s.sendall(head % (b"HTTP/1.1", len(body)) + body)
    out = b""
    while not out.endswith(b"0\r\n\r\n"):
        data = s.recv(65536)
        assert data, out
        out += data
    s.close()
    status, headers, _ = _split(out)
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert headers.get("connection") != "close"


def test_a_chunked_body_over_the_limit_is_answered_then_cut_off_after_body_timeout(shim):
    """A chunked body over max_body_bytes gets its 413 at once, and the rest was read and
    dropped for as long as the client sent (252 MB in 20 s, without end). The client
    now has body_timeout_s (0.6 s here) to finish, then the connection is closed after
    a lingering wait: the 413 is read, not lost to a reset. A client that finishes its
    body in time keeps its connection."""
    s = _connect(shim)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-good\r\n"
        b"content-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    chunk = b"%x\r\n%s\r\n" % (4096, b"x" * 4096)
    s.sendall(chunk * 4)  # over the 10,000-byte limit
    t0 = time.monotonic()
    got = b""
    sent_after = 0
    s.setblocking(False)
    while time.monotonic() - t0 < 8:
        try:
            data = s.recv(65536)
            if not data:
                break
            got += data
        except BlockingIOError:
            pass
        except ConnectionResetError:
            break
        try:
            s.sendall(chunk)
            sent_after += 1
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            pass
        time.sleep(0.01)
    closed_after = time.monotonic() - t0
    s.close()
    assert got.startswith(b"HTTP/1.1 413"), got[:100]
    assert closed_after < 5, "the connection stayed open while the client kept sending"
    assert sent_after > 20  # it was still sending when it was cut off
    assert _refused(shim).get("unread_body") == 1
    # in time: the body ends, the next request on the connection is served
    s = _connect(shim)
    big = b"x" * 20_000
    body = orjson.dumps(CHAT)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-good\r\n"
        b"transfer-encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(big), big)
        + b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-good\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )
    time.sleep(1.5)  # past body_timeout_s: the first request's timer has fired
    s.settimeout(5)
    data = b""
    while data.count(b"HTTP/1.1 ") < 2:
        chunk_in = s.recv(65536)
        assert chunk_in, data
        data += chunk_in
    s.close()
    assert data.startswith(b"HTTP/1.1 413") and b"HTTP/1.1 200" in data
    assert _refused(shim).get("unread_body") == 1


def test_a_refusal_before_the_body_closes_the_connection(shim):
    """Expect: 100-continue, refused (401) before the shim asks for the body: the client
    need not send it, so the shim must not read its next bytes as a request. A 413 for a
    declared length closes too: nothing of a huge body is read."""
    s = _connect(shim)
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nauthorization: Bearer sk-bad\r\n"
        b"content-type: application/json\r\ncontent-length: 2\r\nexpect: 100-continue\r\n\r\n"
    )
    status, headers, _ = _split(_read_all(s))  # returns: the shim closed the connection
    s.close()
    assert status == 401 and headers["connection"] == "close"
    r = _post(shim, content=b"x" * 20_000)
    assert r.status_code == 413 and r.headers["connection"] == "close"
    # an Expect: 100-continue the shim accepts is answered on a connection kept alive
    with httpx.Client(headers={"authorization": "Bearer sk-good"}, timeout=5) as c:
        for _ in range(2):
            r = c.post(
                shim.base_url + "/chat/completions",
                json=CHAT,
                headers={"expect": "100-continue"},
            )
            assert r.status_code == 200 and r.headers.get("connection") != "close"


def test_a_compressed_request_body_is_a_415_that_says_so(shim):
    r = _post(
        shim,
        content=gzip.compress(orjson.dumps(CHAT)),
        headers={"content-encoding": "gzip", "content-type": "application/json"},
    )
    assert r.status_code == 415
    err = r.json()["error"]
    assert err["code"] == "unsupported_content_encoding" and "uncompressed" in err["message"]
    ok = _post(shim, json=CHAT, headers={"content-encoding": "identity"})
    assert ok.status_code == 200


def test_a_pipelined_head_during_a_long_stream_does_not_cut_the_stream(tmp_path):
    """The next request's head, sent (slowly) while a stream longer than the head timeout
    is still going out, must not get a 408 written into the middle of that stream."""
    up = run_app_in_thread(FakeUpstream("slow", tokens=8, delay_s=0.15))  # ~1.2 s stream
    cfg = dataclasses.replace(
        from_flags([f"small={up.url}"], log_dir=tmp_path / "log"), body_timeout_s=0.4
    )
    try:
        with serve_in_thread(cfg) as h:
            s = socket.create_connection(("127.0.0.1", h.port))
            s.settimeout(10)
            body = orjson.dumps({**CHAT, "stream": True, "max_tokens": 8})
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
            )
            time.sleep(0.2)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")  # the next head, begun
            out = b""
            while b"data: [DONE]" not in out:
                data = s.recv(65536)
                assert data, f"connection closed mid-stream: {out[-200:]!r}"
                out += data
            s.close()
    finally:
        up.stop(2)
    assert out.startswith(b"HTTP/1.1 200") and b"408" not in out
    assert out.count(b'"delta"') >= 8
