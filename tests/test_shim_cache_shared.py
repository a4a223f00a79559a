"""The response cache, coalescing and Idempotency-Key records when things go wrong:
shims sharing one Redis (two serve_in_thread shims are two workers: each has its own
coalescer), values under the shim's keys it did not write, a Redis that fails or comes
back, and a coalescing leader whose upstream fails."""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import logging
import shutil
import socket
import subprocess
import time
from pathlib import Path

import httpx
import orjson
import pytest

from finops.loopback import free_port
from finops.shim import from_flags, serve_in_thread
from finops.shim.app import unpack_entry
from finops.shim.cache import cache_key
from finops.shim.server import run_app_in_thread
from finops.shim.testing import wait_for_records as _records

CHAT = {"model": "small", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 1}
SAMPLED = {**CHAT, "temperature": 0.9}  # never cached: only an idempotency record dedupes
DET = {**CHAT, "temperature": 0}


class Redis:
    """A real redis-server on a loopback port that a test can stop and start again."""

    def __init__(self, tmp_path: Path) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip(
                "redis-server is not installed (Debian: apt-get install -y redis-server; "
                ".ci/run installs it)"
            )
        self.exe = exe
        self.dir = tmp_path
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.p: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.p = subprocess.Popen(
            [
                *(self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
                *("--appendonly", "no", "--dir", str(self.dir)),
            ],
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.p is not None:
            self.p.terminate()
            self.p.wait(10)
            self.p = None

    def client(self):
        import redis

        return redis.Redis(port=self.port)


@pytest.fixture
def redis_server(tmp_path):
    r = Redis(tmp_path)
    yield r
    r.stop()


@contextlib.contextmanager
def _two_shims(tmp_path: Path, cfg):
    """Two shims on one config, each with its own log: two workers sharing Redis."""
    with (
        serve_in_thread(cfg) as w1,
        serve_in_thread(dataclasses.replace(cfg, log_dir=tmp_path / "log2")) as w2,
    ):
        yield w1, w2


def _cfg(tmp_path: Path, url: str, name: str = "log", **changes):
    cfg = from_flags([f"small={url}"], log_dir=tmp_path / name)
    return dataclasses.replace(cfg, **changes)


def _keys(rc, pattern: str, n: int = 1) -> list[bytes]:
    """The Redis keys matching `pattern` (claims left out), once there are `n`: the
    shim stores an answer just after sending it."""
    deadline = time.monotonic() + 5
    while True:
        keys = sorted(k for k in rc.keys(pattern) if not k.endswith(b":claim"))
        if len(keys) >= n or time.monotonic() > deadline:
            return keys
        time.sleep(0.01)


def _until(cond, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _metric(h, prefix: str) -> float:
    text = httpx.get(h.base_url.removesuffix("/v1") + "/metrics").text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def _post(h, body, headers=None, path="/chat/completions", timeout=30):
    return httpx.post(h.base_url + path, json=body, headers=headers or {}, timeout=timeout)


# -- 1. Idempotency-Key across workers sharing Redis --


def test_idempotency_key_runs_once_across_workers(tmp_path, fakes, redis_server):
    """Two requests with one key on two workers at once: one upstream call; the other
    waits for the record and replays it as a retry (was: two calls, two answers, the
    last one stored)."""
    f, url = fakes("ok", tokens=1, delay_s=0.6)
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    hd = {"idempotency-key": "pay-1"}
    with (
        _two_shims(tmp_path, cfg) as (w1, w2),
        cf.ThreadPoolExecutor(2) as ex,
    ):
        a = ex.submit(_post, w1, SAMPLED, hd)
        time.sleep(0.2)
        b = ex.submit(_post, w2, SAMPLED, hd)
        ra, rb = a.result(), b.result()
        assert ra.status_code == rb.status_code == 200 and ra.json() == rb.json()
        assert f.calls == 1
        assert rb.headers["x-finops-cache"] == "hit"
        (orig,) = _records(w1.app.shim, 1)
        (dup,) = _records(w2.app.shim, 1)
        assert dup["retry_of"] == orig["request_id"] and dup["attempt"] == 2
        assert dup["output_tokens"] == 0 and orig["output_tokens"] == 1
        # the claim is released once the original is done
        assert _until(lambda: not redis_server.client().keys("*:claim"))


def test_concurrent_duplicates_across_workers_are_numbered_one_by_one(
    tmp_path, fakes, redis_server
):
    """Duplicates waiting on another worker's claim wake together: each read the same
    record, and all were logged as attempt 2."""
    f, url = fakes("ok", tokens=1, delay_s=0.6)
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    hd = {"idempotency-key": "pay-9"}
    with (
        _two_shims(tmp_path, cfg) as (w1, w2),
        cf.ThreadPoolExecutor(7) as ex,
    ):
        first = ex.submit(_post, w1, SAMPLED, hd)
        time.sleep(0.2)  # the original holds the claim
        dups = [ex.submit(_post, (w1, w2)[i % 2], SAMPLED, hd) for i in range(6)]
        answers = [first.result().json()] + [d.result().json() for d in dups]
        assert all(a == answers[0] for a in answers) and f.calls == 1
        recs = _records(w1.shim, 4) + _records(w2.shim, 3)
    assert sorted(r["attempt"] or 1 for r in recs) == [1, 2, 3, 4, 5, 6, 7]


def test_a_duplicate_of_a_failed_original_on_another_worker_runs_as_its_retry(
    tmp_path, fakes, redis_server
):
    f, url = fakes("hang")
    cfg = _cfg(
        tmp_path, url, redis_url=redis_server.url, first_byte_timeout_s=1.0, response_timeout_s=1.0
    )
    hd = {"idempotency-key": "pay-2"}
    with (
        _two_shims(tmp_path, cfg) as (w1, w2),
        cf.ThreadPoolExecutor(2) as ex,
    ):
        a = ex.submit(_post, w1, SAMPLED, hd)
        time.sleep(0.3)
        b = ex.submit(_post, w2, SAMPLED, hd)
        time.sleep(0.3)
        f.mode = "ok"  # the upstream recovers while the original still hangs
        assert a.result().status_code == 504
        assert b.result().status_code == 200 and b.result().headers["x-finops-cache"] == "bypass"
        assert f.calls == 2
        (orig,) = _records(w1.app.shim, 1)
        (retry,) = _records(w2.app.shim, 1)
        assert retry["retry_of"] == orig["request_id"] and retry["attempt"] == 2
        # and its answer is the key's record now
        rc = redis_server.client()
        assert _until(lambda: b'"failed"' not in rc.get(_keys(rc, "finops:shim:idem:*")[0]))
        again = _post(w1, SAMPLED, hd)
        assert again.headers["x-finops-cache"] == "hit" and again.json() == b.result().json()


def test_a_claim_left_by_a_crashed_worker_expires(tmp_path, fakes, redis_server):
    f, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    with serve_in_thread(cfg) as h:
        _post(h, SAMPLED, {"idempotency-key": "warm"})  # the shim's Redis connection is up
        import hashlib

        idem_id = "idem:" + hashlib.sha256(b"default\x00pay-3").hexdigest()
        redis_server.client().set(f"finops:shim:{idem_id}:claim", "req-dead", px=800)
        t0 = time.monotonic()
        r = _post(h, SAMPLED, {"idempotency-key": "pay-3"})
        took = time.monotonic() - t0
        assert r.status_code == 200 and 0.6 < took < 3, took
        assert f.calls == 2


# -- 2. values the shim did not write --

BAD_VALUES = [
    b"garbage",  # no meta line
    b"[1]\n{}",  # meta not an object
    b'{"tier": 5}\n{}',  # meta field of the wrong type
    b'{"tier": "small"}\nnot json',  # payload not JSON
    b'{"tier": "small"}\n[1, 2]',  # payload not an object
    b'{"tier": "small", "sse": true}\ndata: x\n\n',  # SSE is never a cache entry
]


@pytest.mark.parametrize("stream", [False, True])
def test_a_corrupt_cache_value_is_a_miss_not_a_500(tmp_path, fakes, redis_server, stream):
    f, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    rc = redis_server.client()
    body = {**DET, "stream": stream}
    with serve_in_thread(cfg) as h:
        good = _post(h, body)
        assert good.status_code == 200
        (key,) = _keys(rc, "finops:shim:resp:*")
        for i, bad in enumerate(BAD_VALUES):
            rc.set(key, bad)
            r = _post(h, body)
            assert r.status_code == 200 and r.headers["x-finops-cache"] == "miss", (bad, r.text)
            assert r.content == good.content or stream  # a stream's created/id may differ
            if stream:
                assert r.text.endswith("data: [DONE]\n\n") and '"choices"' in r.text
            assert f.calls == 2 + i
            # the answer replaced the bad value: a hit again
            assert _until(lambda bad=bad: rc.get(key) != bad)
            assert _post(h, body).headers["x-finops-cache"] == "hit"
        assert _metric(h, 'finops_shim_cache_invalid_values_total{store="cache"}') == len(
            BAD_VALUES
        )


def test_a_corrupt_idempotency_record_is_no_record(tmp_path, fakes, redis_server, caplog):
    f, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    rc = redis_server.client()
    hd = {"idempotency-key": "pay-4"}
    with serve_in_thread(cfg) as h, caplog.at_level(logging.WARNING, logger="finops.shim"):
        assert _post(h, SAMPLED, hd).status_code == 200
        (key,) = _keys(rc, "finops:shim:idem:*")
        for bad in (b"{}\n{}", b'{"request_id": "r", "fp": "x", "attempts": "2"}\n{}', b"\xff"):
            rc.set(key, bad)
            r = _post(h, SAMPLED, hd)
            assert r.status_code == 200 and r.headers["x-finops-cache"] == "bypass"
            assert _until(lambda bad=bad: rc.get(key) != bad)
            assert _post(h, SAMPLED, hd).headers["x-finops-cache"] == "hit"
        assert f.calls == 4
        # a value that stays bad is counted each time, logged once
        rc.set(key, b"garbage")
        for _ in range(3):
            assert h.call(h.app.shim.idem_get(key.decode().removeprefix("finops:shim:"))) is None
        assert caplog.text.count("is not one the shim wrote") == 1
        assert _metric(h, 'finops_shim_cache_invalid_values_total{store="idempotency"}') >= 6


def test_one_bad_key_does_not_switch_redis_off(tmp_path, fakes, redis_server):
    """WRONGTYPE on one key (a hash someone wrote there) is a miss for that key; other
    keys are still looked up (was: Redis skipped for 5 s, every request a miss)."""
    _f, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    rc = redis_server.client()
    other = {**DET, "messages": [{"role": "user", "content": "other"}]}
    with serve_in_thread(cfg) as h:
        assert _post(h, DET).status_code == 200
        assert _post(h, other).status_code == 200
        keys = set(_keys(rc, "finops:shim:resp:*", 2))
        assert len(keys) == 2
        target = "small\x00small"
        k1 = b"finops:shim:resp:" + cache_key("default", "chat", DET, target).encode()
        assert k1 in keys
        rc.delete(k1)
        rc.hset(k1, "x", "y")
        r = _post(h, DET)
        assert r.status_code == 200 and r.headers["x-finops-cache"] == "miss"
        assert _post(h, other).headers["x-finops-cache"] == "hit"
        assert _metric(h, 'finops_shim_cache_backend_errors_total{kind="key",op="get"}') == 1
        assert _metric(h, 'finops_shim_cache_total{result="skipped"}') == 0


# -- 3. coalescing when the leader fails --


def test_followers_of_a_failed_leader_get_its_answer_not_their_own_call(tmp_path, fakes):
    f, url = fakes("hang")
    cfg = _cfg(tmp_path, url, first_byte_timeout_s=1.0, response_timeout_s=1.0)
    with serve_in_thread(cfg) as h, cf.ThreadPoolExecutor(6) as ex:
        t0 = time.monotonic()
        futs = []
        for _ in range(6):
            futs.append(ex.submit(_post, h, DET))
            time.sleep(0.05)
        res = [x.result() for x in futs]
        took = time.monotonic() - t0
        assert [r.status_code for r in res] == [504] * 6
        assert len({r.content for r in res}) == 1
        assert f.calls == 1  # was 6, and the followers waited two timeouts
        assert took < 1.9, took
        recs = _records(h.app.shim, 6)
        followers = [r for r in recs if r["cache_status"] == "coalesced"]
        assert len(followers) == 5
        for r in followers:
            assert r["status_code"] == 504 and r["error_type"] == "upstream_timeout"
            assert r["output_tokens"] == 0 and r["input_tokens"] == 0 and r["tier"] == "small"


class SlowError:
    """An upstream that answers every request with `status` after `delay_s`."""

    def __init__(self, status: int, delay_s: float = 0.5) -> None:
        self.status = status
        self.delay_s = delay_s
        self.calls = 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        if scope["path"] in ("/health", "/v1/models"):  # the shim's health check
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        self.calls += 1
        import asyncio

        await asyncio.sleep(self.delay_s)
        body = orjson.dumps(
            {"error": {"message": f"injected {self.status}", "type": "x", "code": self.status}}
        )
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.mark.parametrize(
    ("status", "error_type"), [(500, "upstream_http_5xx"), (400, "upstream_400")]
)
def test_followers_of_an_upstream_error_get_the_same_error(tmp_path, status, error_type):
    up = SlowError(status)
    srv = run_app_in_thread(up)
    try:
        with serve_in_thread(_cfg(tmp_path, srv.url)) as h, cf.ThreadPoolExecutor(3) as ex:
            futs = [ex.submit(_post, h, DET)]
            time.sleep(0.15)
            futs += [ex.submit(_post, h, DET) for _ in range(2)]
            res = [x.result() for x in futs]
            assert {r.status_code for r in res} == {status} and up.calls == 1
            assert res[1].content == res[2].content == res[0].content
            recs = _records(h.app.shim, 3)
            assert [r["error_type"] for r in recs] == [error_type] * 3
            assert [r["cache_status"] for r in recs] == ["miss", "coalesced", "coalesced"]
    finally:
        srv.stop(2)


def test_a_follower_takes_over_when_the_leader_client_leaves(tmp_path, fakes):
    f, url = fakes("ok", tokens=1, delay_s=0.8)
    cfg = _cfg(tmp_path, url)
    with serve_in_thread(cfg) as h, cf.ThreadPoolExecutor(4) as ex:

        def leaver():
            with pytest.raises(httpx.ReadTimeout):
                _post(h, DET, timeout=0.4)

        lead = ex.submit(leaver)
        time.sleep(0.15)
        futs = [ex.submit(_post, h, DET) for _ in range(3)]
        lead.result()
        res = [x.result() for x in futs]
        assert [r.status_code for r in res] == [200] * 3
        # the leader's cancelled call and one new leader's; the others followed it
        assert f.calls == 2
        recs = _records(h.app.shim, 4)
        assert sorted(r["cache_status"] for r in recs) == ["coalesced", "coalesced", "miss", "miss"]


# -- 4. cache key normalization --


def test_schema_key_order_is_part_of_the_cache_key():
    def key(body):
        return cache_key("t", "chat", body, "small")

    def schema(props):
        return {
            "type": "json_schema",
            "json_schema": {"name": "x", "schema": {"type": "object", "properties": props}},
        }

    ab = {**DET, "response_format": schema({"a": {"type": "string"}, "b": {"type": "integer"}})}
    ba = {**DET, "response_format": schema({"b": {"type": "integer"}, "a": {"type": "string"}})}
    assert key(ab) != key(ba)
    for field in ("guided_json", "structured_outputs"):
        assert key({**DET, field: {"a": 1, "b": 2}}) != key({**DET, field: {"b": 2, "a": 1}})

    def tool(props):
        return [{"type": "function", "function": {"name": "f", "parameters": props}}]

    assert key({**DET, "tools": tool({"x": 1, "y": 2})}) != key(
        {**DET, "tools": tool({"y": 2, "x": 1})}
    )
    # what is order-insensitive still shares: top-level fields, message objects
    m1 = {"role": "user", "content": [{"type": "text", "text": "hi"}], "name": "u"}
    m2 = {"name": "u", "content": [{"text": "hi", "type": "text"}], "role": "user"}
    a = {"model": "x", "temperature": 0, "messages": [m1], "response_format": ab["response_format"]}
    b = {
        "response_format": ab["response_format"],
        "messages": [m2],
        "temperature": 0.0,
        "model": "x",
    }
    assert key(a) == key(b)
    assert key({**DET, "logit_bias": {"1": 2, "3": 4}}) == key(
        {**DET, "logit_bias": {"3": 4, "1": 2}}
    )


# -- 5. an Idempotency-Key on another endpoint --


def test_an_idempotency_key_reused_on_another_endpoint_is_a_422(tmp_path, fakes):
    """The same raw body (it has `messages` and `prompt`, valid on both endpoints) and
    key on /v1/completions after /v1/chat/completions: another request, as another
    body is (was: the chat.completion replayed to the completions client)."""
    f, url = fakes()
    body = {**SAMPLED, "prompt": "hello"}
    with serve_in_thread(_cfg(tmp_path, url)) as h:
        hd = {"idempotency-key": "k-ep"}
        assert _post(h, body, hd).json()["object"] == "chat.completion"
        r = _post(h, body, hd, "/completions")
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == "idempotency_key_reused"
        assert f.calls == 1
        assert _post(h, body, hd).headers["x-finops-cache"] == "hit"  # chat still replays


# -- 6. Redis trouble made visible; record lifetimes --


def test_redis_outage_is_counted_as_skipped_and_its_return_logged(
    tmp_path, fakes, redis_server, caplog
):
    _f, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    with serve_in_thread(cfg) as h, caplog.at_level(logging.INFO, logger="finops.shim"):
        h.app.shim.redis.cooldown_s = 0.3
        assert _post(h, DET).headers["x-finops-cache"] == "miss"
        redis_server.stop()
        for _ in range(3):
            assert _post(h, DET).status_code == 200
        assert _metric(h, 'finops_shim_cache_total{result="skipped"}') == 3
        assert _metric(h, 'finops_shim_cache_total{result="miss"}') == 1
        assert (
            _metric(h, 'finops_shim_cache_backend_errors_total{kind="unavailable",op="get"}') >= 1
        )
        redis_server.start()
        time.sleep(0.4)
        for _ in range(3):
            assert _post(h, DET).status_code == 200
        assert caplog.text.count("answers again") == 1


def test_a_restarted_redis_is_not_taken_for_an_outage(tmp_path, fakes, redis_server):
    """Each pooled connection to the old Redis failed on its next use after a restart,
    and each failure skipped Redis for 5 s (a worker was 15 s without shared records)."""
    _, url = fakes()
    cfg = _cfg(tmp_path, url, redis_url=redis_server.url)
    with serve_in_thread(cfg) as h, cf.ThreadPoolExecutor(8) as ex:
        # several pooled connections, all to this Redis
        list(ex.map(lambda i: _post(h, {**DET, "max_tokens": 1 + i}), range(8)))
        redis_server.stop()
        redis_server.start()
        got = list(ex.map(lambda i: _post(h, {**DET, "max_tokens": 1 + i}), range(8)))
        assert all(r.status_code == 200 for r in got)
        assert _metric(h, 'finops_shim_cache_total{result="skipped"}') == 0
        assert _metric(h, "finops_shim_cache_backend_errors_total") == 0
        # and the shared cache works at once: stored, then a hit
        _post(h, {**DET, "max_tokens": 30})
        assert _until(
            lambda: _post(h, {**DET, "max_tokens": 30}).headers["x-finops-cache"] == "hit"
        )


def test_a_replay_does_not_extend_the_records_lifetime(tmp_path, fakes, redis_server):
    _f, url = fakes()
    hd = {"idempotency-key": "k-ttl"}
    # memory: the record is gone 1.5 s after the first request, replays or not
    with serve_in_thread(_cfg(tmp_path, url, idempotency_ttl_s=1.5)) as h:
        assert _post(h, SAMPLED, hd).headers["x-finops-cache"] == "bypass"
        time.sleep(0.9)
        assert _post(h, SAMPLED, hd).headers["x-finops-cache"] == "hit"
        time.sleep(0.8)
        assert _post(h, SAMPLED, hd).headers["x-finops-cache"] == "bypass"
    # Redis: a replay keeps the remaining TTL
    cfg = _cfg(tmp_path, url, "log2", redis_url=redis_server.url, idempotency_ttl_s=100)
    rc = redis_server.client()
    with serve_in_thread(cfg) as h:
        _post(h, SAMPLED, hd)
        (key,) = _keys(rc, "finops:shim:idem:*")
        time.sleep(1.2)
        assert _post(h, SAMPLED, hd).headers["x-finops-cache"] == "hit"
        assert rc.pttl(key) < 99_000


def test_signed_redis_values_are_shared_and_others_miss(tmp_path, fakes, redis_server, monkeypatch):
    """With [cache] redis_secret_env, shims with the secret share entries and
    idempotency records; a value nobody with the secret wrote (planted unsigned, or a
    tenant's entry copied under another tenant's key) is a miss, and so is every
    entry for a shim with another secret."""
    from finops.shim.config import hash_key

    monkeypatch.setenv("FINOPS_TEST_SECRET", "s" * 32)
    f, url = fakes()
    cfg = _cfg(
        tmp_path,
        url,
        redis_url=redis_server.url,
        redis_secret_env="FINOPS_TEST_SECRET",
        api_keys={hash_key("sk-a"): "a", hash_key("sk-b"): "b"},
    )
    rc = redis_server.client()
    ka, kb = {"authorization": "Bearer sk-a"}, {"authorization": "Bearer sk-b"}
    with _two_shims(tmp_path, cfg) as (w1, w2):
        assert _post(w1, DET, ka).headers["x-finops-cache"] == "miss"
        (key_a,) = _keys(rc, "finops:shim:resp:*")
        assert _post(w2, DET, ka).headers["x-finops-cache"] == "hit"  # shared, verified
        signed = rc.get(key_a)
        assert unpack_entry(signed, "cache") is None  # the MAC is in front
        assert unpack_entry(signed[32:], "cache") is not None

        # a well-formed answer written without the secret: a miss, counted, replaced
        rc.set(key_a, signed[32:])
        r = _post(w1, DET, ka)
        assert r.status_code == 200 and r.headers["x-finops-cache"] == "miss"
        assert _until(lambda: rc.get(key_a) != signed[32:])
        assert _post(w1, DET, ka).headers["x-finops-cache"] == "hit"

        # tenant a's entry copied under tenant b's key: the key is in the MAC
        assert _post(w1, DET, kb).headers["x-finops-cache"] == "miss"
        (key_b,) = [k for k in _keys(rc, "finops:shim:resp:*", 2) if k != key_a]
        rc.set(key_b, rc.get(key_a))
        assert _post(w1, DET, kb).headers["x-finops-cache"] == "miss"
        assert _metric(w1, 'finops_shim_cache_invalid_values_total{store="cache"}') == 2
        calls = f.calls

        # an Idempotency-Key record, signed too, replays on the other worker
        hd = {**ka, "idempotency-key": "pay-9"}
        assert _post(w1, SAMPLED, hd).headers["x-finops-cache"] == "bypass"  # sampled
        assert _until(lambda: len(_keys(rc, "finops:shim:idem:*")) == 1)
        assert _post(w2, SAMPLED, hd).headers["x-finops-cache"] == "hit"
        assert f.calls == calls + 1

    # a shim with another secret serves none of them
    monkeypatch.setenv("FINOPS_TEST_SECRET", "t" * 32)
    with serve_in_thread(dataclasses.replace(cfg, log_dir=tmp_path / "log3")) as w3:
        assert _post(w3, DET, ka).headers["x-finops-cache"] == "miss"
        assert f.calls == calls + 2


def test_a_redis_refusing_every_write_is_down_and_its_password_is_never_logged(
    tmp_path, fakes, redis_server, caplog
):
    """At maxmemory (noeviction) Redis answers OOM to every write: that was taken for
    "an error about one key", logged once per request (each a new key), counted as
    `kind="key"` (an alert on `unavailable` never fired), and tried again on every
    request. It is an outage. And the recovery line printed the URL's password."""
    _f, url = fakes()
    rc = redis_server.client()
    rc.config_set("requirepass", "s3cret-pw")  # this connection stays signed in
    secret_url = f"redis://:s3cret-pw@127.0.0.1:{redis_server.port}/0"
    cfg = _cfg(tmp_path, url, redis_url=secret_url)
    with serve_in_thread(cfg) as h, caplog.at_level(logging.INFO, logger="finops.shim"):
        h.app.shim.redis.cooldown_s = 0.5
        assert _post(h, DET).status_code == 200
        rc.config_set("maxmemory", "1")
        for i in range(6):
            r = _post(h, {**DET, "max_tokens": 2 + i})
            assert r.status_code == 200
        assert _metric(h, 'finops_shim_cache_backend_errors_total{kind="key"') == 0
        assert _metric(h, 'finops_shim_cache_backend_errors_total{kind="unavailable"') >= 1
        assert _metric(h, 'finops_shim_cache_total{result="skipped"}') >= 4
        assert caplog.text.count("failed") <= 2, caplog.text
        rc.config_set("maxmemory", "0")
        time.sleep(0.6)
        assert _until(
            lambda: "answers again" in (_post(h, {**DET, "max_tokens": 40}), caplog.text)[1]
        )
    assert "s3cret-pw" not in caplog.text
    assert f"redis://:***@127.0.0.1:{redis_server.port}/0 answers again" in caplog.text


@pytest.mark.parametrize(
    ("redis_url", "message"),
    [
        ("redis://:pw1@127.0.0.1:6379/0?socket_timeout=abc", "Invalid value for 'socket_timeout'"),
        ("redis://:pw1@127.0.0.1:99999/0", "port must be a number"),
        ("redis://u:pw1@127.0.0.1:6379/db", "the path is the database number"),
    ],
)
def test_redis_url_options_are_checked_at_load_and_its_password_never_shown(redis_url, message):
    from finops.shim.config import ConfigError, parse_config

    text = {"tiers": {"small": {"upstreams": ["http://127.0.0.1:8000"]}}}
    with pytest.raises(ConfigError) as err:
        parse_config({**text, "cache": {"redis_url": redis_url}}, source="shim.toml")
    assert message in str(err.value) and "pw1" not in str(err.value)
    assert ":***@127.0.0.1" in str(err.value)
