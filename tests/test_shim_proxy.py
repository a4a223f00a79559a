"""The shim against loopback upstreams we control: failures, caching, auth, caps, logging.

Real parts: the shim served by uvicorn on a loopback port, real HTTP clients
(httpx and the official openai client), upstreams that are real HTTP servers
(`finops.shim.fakeupstream`) told to hang, fail, refuse or die mid-stream.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import dataclasses
import socket
import threading
import time
from pathlib import Path

import httpx
import orjson
import pytest

from finops.lake import Lake
from finops.shim import from_flags, serve_in_thread
from finops.shim.config import CapRule, hash_key, parse_config
from finops.shim.server import run_app_in_thread
from finops.shim.testing import wait_for_records as _records
from finops.shim.upstreams import STATE_NAMES, CircuitBreaker

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 4}


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: connections are refused


def _same_answer(a: dict, b: dict) -> bool:
    """The same answer under another id (a hit or a coalesced follower gets its own)."""
    return a["id"] != b["id"] and {**a, "id": None} == {**b, "id": None}


def _serve(tmp_path: Path, upstreams: list[str], **changes):
    cfg = from_flags(upstreams, log_dir=tmp_path / "log")
    cfg = dataclasses.replace(cfg, **changes)
    return serve_in_thread(cfg)


def test_non_stream_headers_usage_and_log(tmp_path, fakes):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}", f"large={url}"]) as h:
        r = httpx.post(
            h.base_url + "/chat/completions", json=CHAT, headers={"X-Feature": "chat-assistant"}
        )
        assert r.status_code == 200
        assert r.headers["x-finops-tier"] == "small"
        assert r.headers["x-finops-cache"] == "bypass"
        assert float(r.headers["x-finops-overhead-ms"]) >= 0
        assert r.json()["usage"]["completion_tokens"] == 4
        assert f.bodies[-1]["model"] == "small"  # the upstream gets the tier's model name
        recs = _records(h.shim, 1)
    (rec,) = recs
    assert rec["tier"] == "small" and rec["upstream"] == url and rec["status_code"] == 200
    assert rec["feature"] == "chat-assistant" and rec["tenant"] == "default"
    assert rec["request_model"] == "auto" and rec["output_tokens"] == 4 and rec["input_tokens"] > 0
    assert rec["router_version"] == "rules-v1" and rec["route_propensity"] == 1.0
    assert rec["routed_tier"] == "small"
    assert rec["prompt_text"] is None  # prompts are off by default
    res = Lake(tmp_path / "lake").append("requests", recs, source="shim")
    assert (res.loaded, res.rejected) == (1, 0)


def test_stream_strips_injected_usage_chunk_unless_asked(tmp_path, fakes):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "stream": True}
        r = httpx.post(h.base_url + "/chat/completions", json=body)
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        objs = [orjson.loads(e[6:]) for e in events[:-1]]
        assert all(o["choices"] for o in objs), "the usage-only chunk must be stripped"
        # injected upstream, and per-chunk usage kept off (vLLM sends it when both are set)
        assert f.bodies[-1]["stream_options"] == {
            "include_usage": True,
            "continuous_usage_stats": False,
        }
        r3 = httpx.post(
            h.base_url + "/chat/completions",
            json={**body, "stream_options": {"continuous_usage_stats": True}},
        )
        objs3 = [
            orjson.loads(e[6:]) for e in r3.content.split(b"\n\n") if e and e != b"data: [DONE]"
        ]
        assert objs3 and not any("usage" in o for o in objs3)  # as vLLM answers it directly
        r2 = httpx.post(
            h.base_url + "/chat/completions",
            json={**body, "stream_options": {"include_usage": True}},
        )
        objs2 = [
            orjson.loads(e[6:]) for e in r2.content.split(b"\n\n") if e and e != b"data: [DONE]"
        ]
        assert objs2[-1]["usage"]["completion_tokens"] == 4
        recs = _records(h.shim, 3)
    assert [r["output_tokens"] for r in recs] == [4, 4, 4]
    assert all(r["stream"] and r["ttft_ms"] > 0 and r["finish_reason"] == "length" for r in recs)


@pytest.mark.parametrize("stream_first", [True, False])
def test_in_band_stream_error_is_a_failure_never_cached(tmp_path, fakes, stream_first):
    """vLLM reports a failure mid-stream as an error event then [DONE]: the client gets it
    as sent, the record says 502, and the partial answer is neither cached, stored for an
    Idempotency-Key nor handed on."""
    bad, bad_url = fakes("error_mid_stream", die_after=2)
    body = {**CHAT, "temperature": 0, "stream": True}
    with _serve(tmp_path, [f"small={bad_url}"]) as h:
        r = httpx.post(
            h.base_url + "/chat/completions", json=body, headers={"Idempotency-Key": "k-e"}
        )
        assert r.status_code == 200  # the stream had begun
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        assert orjson.loads(events[-2][6:])["error"]["message"] == "injected failure"
        assert sum(b'"error"' in e for e in events) == 1  # not a second one from the shim
        bad.mode = "ok"
        again = {**body, "stream": not stream_first}
        r2 = httpx.post(h.base_url + "/chat/completions", json=again)
        assert r2.headers["x-finops-cache"] == "miss" and bad.calls == 2
        r3 = httpx.post(
            h.base_url + "/chat/completions", json=body, headers={"Idempotency-Key": "k-e"}
        )
        assert r3.status_code == 200 and b'"error"' not in r3.content
        recs = _records(h.shim, 3)
    first = recs[0]
    assert (first["status_code"], first["error_type"]) == (502, "upstream_stream_error")
    assert first["output_tokens"] == 2 and first["finish_reason"] is None


def test_stream_ends_at_done_without_waiting_for_the_upstreams_end(tmp_path, fakes):
    """[DONE] ends the client's response at once, though the upstream ends its body 0.8 s
    later; the shim still reads that end (the connection is reused) and logs a 200."""
    f, url = fakes(linger_s=0.8)
    with _serve(tmp_path, [f"small={url}"]) as h:
        with httpx.Client(timeout=10) as c:
            for _ in range(2):
                t0 = time.perf_counter()
                with c.stream(
                    "POST", h.base_url + "/chat/completions", json={**CHAT, "stream": True}
                ) as r:
                    body = r.read()  # returns when the chunked body has ended
                took = time.perf_counter() - t0
                assert body.endswith(b"data: [DONE]\n\n")
                assert took < 0.6, f"the client waited {took:.2f} s for the upstream's end"
        recs = _records(h.shim, 2)  # written once the upstream's end was read
        pools = list(h.shim.h1._pools.values())
        # every upstream connection went back to the pool (a body not read to its end
        # would have been closed instead)
        assert [(p.open, len(p._idle)) for p in pools] in ([(1, 1)], [(2, 2)])
    assert f.completed == 2 and f.disconnects == 0  # neither upstream answer was cut short
    assert [(r["status_code"], r["output_tokens"]) for r in recs] == [(200, 4), (200, 4)]
    # the latency is the client's, not the wait for the upstream's end
    assert all(r["latency_ms"] < 600 for r in recs), [r["latency_ms"] for r in recs]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad", ["error500", "hang", "refused"])
def test_fallback_before_first_byte(tmp_path, fakes, bad, stream):
    good, good_url = fakes()
    if bad == "refused":
        bad_url = _dead_url()
    else:
        _, bad_url = fakes(bad)
    # two replicas of small: the bad one has fewer outstanding requests at the start, so it is tried first
    with _serve(
        tmp_path,
        [f"small={bad_url}", f"small={good_url}"],
        first_byte_timeout_s=0.5,
        response_timeout_s=0.5,
    ) as h:
        r = httpx.post(
            h.base_url + "/chat/completions", json={**CHAT, "stream": stream}, timeout=10
        )
        assert r.status_code == 200, r.text
        assert good.calls == 1
        if stream:
            assert r.content.endswith(b"data: [DONE]\n\n") and b'"error"' not in r.content
        metrics = httpx.get(h.url + "/metrics").text
        recs = _records(h.shim, 1)
    assert "finops_shim_fallbacks_total" in metrics
    assert recs[0]["upstream"] == good_url and recs[0]["status_code"] == 200


def test_fallback_to_next_tier_up(tmp_path, fakes):
    mid, mid_url = fakes()
    with _serve(tmp_path, [f"small={_dead_url()}", f"mid={mid_url}"]) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.status_code == 200 and r.headers["x-finops-tier"] == "mid"
        assert mid.bodies[-1]["model"] == "mid"
        # routed to small, served by mid: the record says both, and the propensity is the
        # routed tier's (what an off-policy evaluation of a new router reads)
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
        assert r.headers["x-finops-tier"] == "mid"
        explicit, routed = _records(h.shim, 2)
    assert explicit["router_version"] is None and explicit["route_propensity"] is None
    assert explicit["routed_tier"] is None
    assert routed["tier"] == "mid" and routed["routed_tier"] == "small"
    assert routed["router_version"] == "rules-v1" and routed["router_score"] is not None
    assert routed["route_propensity"] == 1.0


def test_all_upstreams_fail_gives_openai_error_and_log(tmp_path, fakes):
    _, bad = fakes("error500")
    with _serve(tmp_path, [f"small={bad}"]) as h:
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
        assert r.status_code == 500
        assert r.json()["error"]["code"] == "upstream_http_5xx"
        recs = _records(h.shim, 1)
    assert recs[0]["status_code"] == 500 and recs[0]["error_type"] == "upstream_http_5xx"


def test_stream_options_without_stream_is_refused_even_when_cached(tmp_path, fakes):
    f, url = fakes()
    body = {**CHAT, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
        bad = {**body, "stream_options": {"include_usage": True}}
        r = httpx.post(h.base_url + "/chat/completions", json=bad)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_stream_options"
        ok = {**body, "stream_options": None}  # null is "not set", as vLLM reads it
        assert httpx.post(h.base_url + "/chat/completions", json=ok).status_code == 200
    assert f.calls == 1


@pytest.mark.parametrize(
    ("stream_options", "param"),
    [
        ("yes", "stream_options"),
        ([1], "stream_options"),
        ([], "stream_options"),
        (0, "stream_options"),
        ({"include_usage": "maybe"}, "stream_options.include_usage"),
        ({"continuous_usage_stats": [1]}, "stream_options.continuous_usage_stats"),
        (
            {"include_usage": False, "continuous_usage_stats": 2},
            "stream_options.continuous_usage_stats",
        ),
    ],
)
def test_invalid_stream_options_are_refused_as_vllm_refuses_them(
    tmp_path, fakes, stream_options, param
):
    """The shim sends its own stream options upstream (it asks for usage), so vLLM never
    sees a client's invalid ones: the shim refuses them, cached answer or not."""
    f, url = fakes()
    body = {**CHAT, "temperature": 0, "stream": True}
    with _serve(tmp_path, [f"small={url}"]) as h:
        assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
        r = httpx.post(
            h.base_url + "/chat/completions", json={**body, "stream_options": stream_options}
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_stream_options" and err["param"] == param
    assert f.calls == 1


def test_stream_options_booleans_are_read_as_vllm_reads_them(tmp_path, fakes):
    """vLLM reads "yes"/"no"/1/0 as booleans: the usage chunk is kept or dropped as vLLM
    would have sent it, and the record has the upstream's usage either way."""
    f, url = fakes(tokens=3)
    body = {**CHAT, "stream": True, "max_tokens": 3}
    with _serve(tmp_path, [f"small={url}"]) as h:
        got = {}
        for value in ("yes", "no", 1, 0, "False"):
            r = httpx.post(
                h.base_url + "/chat/completions",
                json={**body, "stream_options": {"include_usage": value}},
            )
            assert r.status_code == 200
            objs = [
                orjson.loads(e[6:]) for e in r.content.split(b"\n\n") if e.startswith(b"data: {")
            ]
            got[value] = objs[-1].get("usage") is not None and objs[-1]["choices"] == []
            assert f.bodies[-1]["stream_options"]["include_usage"] in (True, "yes", 1)
        recs = _records(h.shim, 5)
    assert got == {"yes": True, "no": False, 1: True, 0: False, "False": False}
    assert [r["output_tokens"] for r in recs] == [3] * 5


def test_a_cached_answer_replayed_with_continuous_usage_has_usage_on_every_chunk(tmp_path, fakes):
    """vLLM puts usage on every chunk with include_usage and continuous_usage_stats; a
    replayed cache hit had it on none."""
    f, url = fakes(tokens=3)
    body = {**CHAT, "temperature": 0, "max_tokens": 3}
    with _serve(tmp_path, [f"small={url}"]) as h:
        assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
        for continuous in (True, False):
            so = {"include_usage": True, "continuous_usage_stats": continuous}
            r = httpx.post(
                h.base_url + "/chat/completions",
                json={**body, "stream": True, "stream_options": so},
            )
            assert r.headers["x-finops-cache"] == "hit"
            objs = [
                orjson.loads(e[6:]) for e in r.content.split(b"\n\n") if e.startswith(b"data: {")
            ]
            chunks, final = objs[:-1], objs[-1]
            assert final["choices"] == [] and final["usage"]["completion_tokens"] == 3
            if continuous:
                done = [c["usage"]["completion_tokens"] for c in chunks]
                assert done[0] == 0 and done[1:] == [3] * (len(chunks) - 1), done
                assert all(
                    c["usage"]["prompt_tokens"] == final["usage"]["prompt_tokens"] for c in chunks
                )
            else:
                assert not any("usage" in c for c in chunks)
    assert f.calls == 1


def test_idempotency_records_have_their_own_bound_and_evictions_are_counted(tmp_path, fakes):
    """Idempotency-Key records shared the response cache's LRU bound (10,000): any
    traffic, another tenant's too, dropped them long before idempotency_ttl_s, and a
    retry ran and was billed again without a word. They have their own bound now, and a
    record dropped for room is counted and logged."""
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"], cache_max_entries=2, idempotency_max_entries=3) as h:

        def post(key: str | None, content: str = "hi") -> httpx.Response:
            body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": content}]}
            hd = {"idempotency-key": key} if key else {}
            return httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)

        post("k-0", "first")
        for i in range(5):  # cache traffic past the cache's bound: no record is touched
            post(None, f"other {i}")
        assert post("k-0", "first").headers["x-finops-cache"] == "hit"
        calls = f.calls
        for i in range(1, 4):  # three more keys: k-0 is the least recently used of four
            post(f"k-{i}", f"keyed {i}")
        metrics = httpx.get(h.url + "/metrics").text
        evicted = post("k-0", "first")
    assert evicted.headers["x-finops-cache"] != "hit" and f.calls == calls + 4
    got = [
        ln
        for ln in metrics.splitlines()
        if ln.startswith("finops_shim_idempotency_evictions_total")
    ]
    assert got == ["finops_shim_idempotency_evictions_total 1.0"], got


def test_a_user_that_is_not_a_string_is_refused_even_when_cached(tmp_path, fakes):
    """`user` is not in the cache key: a hit answered 200 where vLLM answers 400."""
    f, url = fakes()
    body = {**CHAT, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
        r = httpx.post(h.base_url + "/chat/completions", json={**body, "user": 5})
        assert r.status_code == 400
        assert r.json()["error"]["code"] == "invalid_user" and r.json()["error"]["param"] == "user"
        ok = httpx.post(h.base_url + "/chat/completions", json={**body, "user": "u-1"})
        assert ok.headers["x-finops-cache"] == "hit"
    assert f.calls == 1


def test_a_hit_has_its_own_id_not_the_first_clients_request_id(tmp_path, fakes):
    """vLLM names an answer after the request's X-Request-Id (a client's trace id): a hit
    showed the first client's to the next. It gets its own id, as vLLM would give it; an
    Idempotency-Key replay is the same request and keeps its first id."""
    f, url = fakes()
    body = {**CHAT, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        post = lambda hd: httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)  # noqa: E731
        first = post({"x-request-id": "alice-7f3a"})
        hit = post({"x-request-id": "bob-1"})
        assert hit.headers["x-finops-cache"] == "hit"
        assert hit.json()["id"] == "cmpl-bob-1" and "alice" not in hit.text
        anon = post({})
        assert anon.json()["id"].startswith("cmpl-") and anon.json()["id"] != hit.json()["id"]
        streamed = httpx.post(
            h.base_url + "/chat/completions",
            json={**body, "stream": True},
            headers={"x-request-id": "carol-2"},
        )
        assert b'"id":"cmpl-carol-2"' in streamed.content and b"alice" not in streamed.content
        once = post({"idempotency-key": "k-7"})
        again = post({"idempotency-key": "k-7"})
        assert once.json() == again.json()
    assert f.calls == 1 and first.status_code == 200


def test_a_utf8_byte_order_mark_before_the_json_is_skipped(tmp_path, fakes):
    """Windows tools write a BOM before JSON; vLLM reads such a body, so the shim does."""
    _, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(
            h.base_url + "/chat/completions",
            content=b"\xef\xbb\xbf" + orjson.dumps(CHAT),
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 200, r.text
        bad = httpx.post(
            h.base_url + "/chat/completions",
            content=b"\xef\xbb\xbf\xef\xbb\xbf" + orjson.dumps(CHAT),
            headers={"content-type": "application/json"},
        )
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", CHAT),
        ("/completions", {"model": "auto", "prompt": "hi", "max_tokens": 2}),
        ("/embeddings", {"model": "auto", "input": "hi"}),
        ("/responses", {"model": "auto", "input": "hi"}),
    ],
)
def test_json_nested_deeper_than_the_shim_writes_is_a_400(tmp_path, fakes, path, body):
    """orjson reads 1024 levels and writes 254: a ~600-byte body nested 300 deep was a
    500 with a traceback in the log, on every endpoint."""
    _, url = fakes()

    def nested(depth: int) -> bytes:
        return orjson.dumps(body)[:-1] + b',"x":' + b"[" * depth + b"]" * depth + b"}"

    with _serve(tmp_path, [f"small={url}"]) as h:
        for depth in (300, 260):
            r = httpx.post(
                h.base_url + path,
                content=nested(depth),
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, (depth, r.text)
            err = r.json()["error"]
            assert err["code"] == "invalid_json" and "levels deep" in err["message"]
        # as deep as the shim takes (the body is one level, "x" 251 more): served
        r = httpx.post(
            h.base_url + path, content=nested(251), headers={"content-type": "application/json"}
        )
        assert r.status_code == 200, r.text
        recs = _records(h.shim, 3)
    assert [r["status_code"] for r in recs] == [400, 400, 200]


def test_a_model_that_is_not_a_string_is_named_as_such(tmp_path, fakes):
    _, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        for path, body in (
            ("/chat/completions", {**CHAT, "model": 5}),
            ("/embeddings", {"model": ["small"], "input": "hi"}),
        ):
            r = httpx.post(h.base_url + path, json=body)
            assert r.status_code == 400
            err = r.json()["error"]
            assert err["code"] == "invalid_model" and err["param"] == "model"
            assert "must be a string" in err["message"], err
        r = httpx.post(h.base_url + "/chat/completions", json={"messages": CHAT["messages"]})
        assert r.json()["error"]["code"] == "missing_model"


def test_a_message_that_is_not_an_object_is_refused_not_truncated_away(tmp_path, fakes):
    """vLLM refuses such a request; a truncate cap used to drop the bad element and send
    on a request the client never made."""
    f, url = fakes()
    caps = (CapRule(max_input_tokens=50, policy="truncate"),)
    long = " ".join(["word"] * 400)
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        body = {**CHAT, "messages": [long, {"role": "user", "content": "hi"}]}
        r = httpx.post(h.base_url + "/chat/completions", json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "invalid_messages" and err["param"] == "messages[0]"
    assert f.calls == 0


def test_all_upstreams_rate_limited_passes_on_retry_after(tmp_path, fakes):
    """Every time, not only until circuits open: a 429 is back-pressure from a server
    that answers, so it opened circuits no more (three 429s made the shim answer its own
    503 with the breaker's cooldown, and took it out of /readyz)."""
    _, url = fakes("rate_limited")
    with _serve(tmp_path, [f"small={url}"], breaker_failures=2) as h:
        for _ in range(4):
            r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
            assert r.status_code == 429 and r.headers["retry-after"] == "7"
            assert r.json()["error"]["code"] == "upstream_rate_limited"
            assert r.headers["x-finops-tier"] == "small"
        assert httpx.get(h.url + "/readyz").status_code == 200


def test_upstream_dies_mid_stream_gives_clean_sse_error(tmp_path, fakes):
    # every other token streams empty text (vLLM's token that ends mid-character): the
    # partial usage still counts it
    _f, url = fakes("die_mid_stream", die_after=3, empty_every=2)
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 8},
            timeout=10,
        )
        assert r.status_code == 200  # headers were already sent
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        err = orjson.loads(events[-2][6:])
        assert err["error"]["code"] == "upstream_stream_error"
        deltas = [orjson.loads(e[6:])["choices"][0]["delta"] for e in events[:-2]]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert [d["content"] for d in deltas[1:]] == ["t0 ", "", "t2 "]
        recs = _records(h.shim, 1)
    (rec,) = recs
    assert rec["status_code"] == 502 and rec["error_type"] == "upstream_stream_error"
    assert rec["output_tokens"] == 3 and rec["input_tokens"] > 0 and rec["latency_ms"] > 0


@pytest.mark.parametrize("counted", [False, True])
def test_client_disconnect_mid_stream_cancels_upstream_and_logs_partial(tmp_path, fakes, counted):
    f, url = fakes("slow", tokens=200, delay_s=0.02)
    # with a cap counted by vLLM's /tokenize, the record's input is that count, not a guess
    caps = (CapRule(max_input_tokens=10_000, tier="small"),) if counted else ()
    words = " ".join(f"w{i}" for i in range(40))
    body = {**CHAT, "messages": [{"role": "user", "content": words}]}
    with _serve(tmp_path, [f"small={url}"], caps=caps, token_counter="upstream") as h:
        with httpx.stream(
            "POST",
            h.base_url + "/chat/completions",
            json={**body, "stream": True, "max_tokens": 200},
        ) as r:
            for got, _ in enumerate(r.iter_raw(), 1):
                if got >= 3:
                    break
        deadline = time.monotonic() + 5
        while f.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f.disconnects == 1, "the upstream request must be cancelled"
        assert f.completed == 0
        time.sleep(0.2)
        recs = _records(h.shim, 1)
    (rec,) = recs
    assert rec["status_code"] == 499 and rec["error_type"] == "client_disconnected"
    assert 0 < rec["output_tokens"] < 200
    tokenized = 40 + 4 + 3  # the fake's /tokenize: words + 4 per message + 3
    assert (rec["input_tokens"] == tokenized) is counted, rec["input_tokens"]


def _wait_for(cond, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_before_the_first_byte_is_not_retried_and_is_logged_499(
    tmp_path, fakes, stream
):
    hang, hang_url = fakes("hang")
    large, large_url = fakes()
    with _serve(
        tmp_path,
        [f"small={hang_url}", f"large={large_url}"],
        first_byte_timeout_s=1.5,
        response_timeout_s=1.5,
    ) as h:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                h.base_url + "/chat/completions",
                json={**CHAT, "model": "small", "stream": stream},
                timeout=httpx.Timeout(5, read=0.3),
            )
        (rec,) = _records(h.shim, 1)
        time.sleep(1.5)  # past the first-byte timeout: a fallback would have happened by now
        assert large.calls == 0, "nobody is waiting: no other tier is asked"
        assert hang.calls == 1
    assert rec["status_code"] == 499 and rec["error_type"] == "client_disconnected"
    assert rec["latency_ms"] < 1000
    assert h.shim.pool.tiers["small"][0].outstanding == 0


def test_non_stream_client_abort_cancels_the_upstream_request(tmp_path, fakes):
    f, url = fakes("slow", tokens=200, delay_s=0.05)  # a 10 s answer
    with _serve(tmp_path, [f"small={url}"]) as h:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(
                h.base_url + "/chat/completions",
                json={**CHAT, "max_tokens": 200},
                timeout=httpx.Timeout(5, read=0.3),
            )
        _wait_for(lambda: f.disconnects == 1)
        assert f.disconnects == 1, "the upstream must see the abort (vLLM frees the GPU)"
        assert f.completed == 0
        (rec,) = _records(h.shim, 1)
    assert rec["status_code"] == 499 and rec["error_type"] == "client_disconnected"
    assert rec["latency_ms"] < 3000
    # vLLM had the prompt: where it went and its size (estimated) are on the record
    assert rec["upstream"] == url and rec["tier"] == "small"
    assert rec["input_tokens"] is not None and rec["input_tokens"] > 0
    assert rec["output_tokens"] is None  # not known: nothing came back


def _sse_tool_calls(content: bytes) -> tuple[list[dict], str | None]:
    """Tool calls as the openai client accumulates them from an event stream."""
    calls: dict[int, dict] = {}
    finish = None
    for e in content.split(b"\n\n"):
        if not e.startswith(b"data: {"):
            continue
        for ch in orjson.loads(e[6:])["choices"]:
            finish = ch.get("finish_reason") or finish
            for tc in ch["delta"].get("tool_calls") or ():
                c = calls.setdefault(tc["index"], {"function": {"name": "", "arguments": ""}})
                c["id"] = tc.get("id") or c.get("id")
                c["type"] = tc.get("type") or c.get("type")
                fn = tc.get("function") or {}
                c["function"]["name"] += fn.get("name") or ""
                c["function"]["arguments"] += fn.get("arguments") or ""
    return [calls[k] for k in sorted(calls)], finish


def test_cached_tool_calls_survive_stream_and_non_stream_replays(tmp_path, fakes):
    from finops.shim.fakeupstream import TOOL_CALL

    f, url = fakes(tool_calls=True)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    with _serve(tmp_path, [f"small={url}"]) as h:
        for i, first_stream in enumerate((True, False)):
            body = {
                **CHAT,
                "messages": [{"role": "user", "content": f"weather {i}?"}],
                "temperature": 0,
                "tools": tools,
            }
            answers = []
            # with tools, a stream and a plain request are cached apart (vLLM's tool
            # parsers answer them differently); each is replayed in its own shape
            for stream in (first_stream, not first_stream, first_stream, not first_stream):
                r = httpx.post(h.base_url + "/chat/completions", json={**body, "stream": stream})
                assert r.status_code == 200
                if stream:
                    answers.append(_sse_tool_calls(r.content))
                else:
                    ch = r.json()["choices"][0]
                    assert ch["message"]["content"] is None
                    answers.append((ch["message"]["tool_calls"], ch["finish_reason"]))
            assert answers == [([TOOL_CALL], "tool_calls")] * 4, (
                f"first answer streamed: {first_stream}"
            )
        assert f.calls == 4, "one upstream call per request body and mode; replays were hits"
        recs = _records(h.shim, 8)
    assert [r["cache_status"] for r in recs] == ["miss", "miss", "hit", "hit"] * 2


def test_event_stream_with_crlf_lines_is_forwarded_and_billed(tmp_path, fakes):
    _f, url = fakes(crlf=True, tokens=5)
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(
            h.base_url + "/chat/completions", json={**CHAT, "stream": True, "max_tokens": 5}
        )
        assert r.status_code == 200
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        text = "".join(
            orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "" for e in events[:-1]
        )
        assert text == "t0 t1 t2 t3 t4 "
        (rec,) = _records(h.shim, 1)
    assert (
        rec["status_code"] == 200 and rec["output_tokens"] == 5 and rec["finish_reason"] == "length"
    )


def test_idempotency_key_replays_a_streamed_sampled_answer(tmp_path, fakes):
    f, url = fakes(tokens=6)
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "stream": True, "temperature": 0.8, "max_tokens": 6}
        hdr = {"idempotency-key": "job-7"}
        r1 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        r2 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        assert r1.headers["x-finops-cache"] == "bypass" and r2.headers["x-finops-cache"] == "hit"

        def text(r):
            return "".join(
                orjson.loads(e[6:])["choices"][0]["delta"].get("content") or ""
                for e in r.content.split(b"\n\n")
                if e.startswith(b"data: {") and b'"choices":[]' not in e
            )

        assert text(r2) == text(r1) == "t0 t1 t2 t3 t4 t5 "
        assert f.calls == 1, "a retried sampled request is not sent (or billed) again"
        recs = _records(h.shim, 2)
    assert recs[1]["retry_of"] == recs[0]["request_id"] and recs[1]["attempt"] == 2
    assert recs[1]["output_tokens"] == 0


def test_idempotency_key_replays_a_stream_with_logprobs_verbatim(tmp_path, fakes):
    """A stream that cannot be rebuilt into one answer (logprobs) is replayed as sent."""
    f, url = fakes(tokens=3)
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "stream": True, "logprobs": True, "top_logprobs": 0}
        hdr = {"idempotency-key": "lp-1"}
        r1 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        r2 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        assert b'"logprobs":{"content"' in r1.content
        assert r2.content == r1.content and r2.headers["x-finops-cache"] == "hit"
        assert f.calls == 1
        recs = _records(h.shim, 2)
    assert recs[1]["retry_of"] == recs[0]["request_id"] and recs[1]["attempt"] == 2
    assert recs[1]["output_tokens"] == 0 and recs[0]["output_tokens"] == 3


@pytest.mark.parametrize("stream", [False, True])
def test_idempotency_key_retry_after_a_failure_is_logged_as_a_retry(tmp_path, fakes, stream):
    """The first attempt fails: the retry runs again (it must), says it is attempt 2 of
    the first request, and a third is a replay of the second's answer."""
    f, url = fakes("error500")
    body = {**CHAT, "temperature": 0.7, "stream": stream}
    hdr = {"idempotency-key": "pay-9"}
    with _serve(tmp_path, [f"small={url}"]) as h:
        r1 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        assert r1.status_code == 500
        f.mode = "ok"
        r2 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        r3 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hdr)
        assert r2.status_code == r3.status_code == 200 and f.calls == 2
        assert r3.headers["x-finops-cache"] == "hit"
        r4 = httpx.post(
            h.base_url + "/chat/completions", json={**body, "max_tokens": 1}, headers=hdr
        )
        assert r4.status_code == 422  # still bound to the first body
        recs = _records(h.shim, 4)
    first = recs[0]["request_id"]
    assert [(r["status_code"], r["retry_of"], r["attempt"]) for r in recs[:3]] == [
        (500, None, 1),
        (200, first, 2),
        (200, first, 3),
    ]
    assert recs[1]["output_tokens"] == 4 and recs[2]["output_tokens"] == 0


def test_a_failed_attempt_never_overwrites_an_answer_stored_meanwhile(tmp_path, fakes):
    """Workers share Idempotency-Key records through Redis but wait on a key only within
    their own process: a retry on another worker may store its answer while the first
    attempt still hangs. The first attempt's failure must not replace that answer."""
    import concurrent.futures as cf
    import hashlib

    from finops.shim.proxy import _idem_entry

    _f, url = fakes("hang")
    raw = orjson.dumps({**CHAT, "temperature": 0.9})
    hdr = {"idempotency-key": "ord-1", "content-type": "application/json"}
    with (
        _serve(tmp_path, [f"small={url}"], first_byte_timeout_s=1.0, response_timeout_s=1.0) as h,
        cf.ThreadPoolExecutor(1) as ex,
    ):
        first = ex.submit(
            httpx.post, h.base_url + "/chat/completions", content=raw, headers=hdr, timeout=10
        )
        time.sleep(0.3)
        # what the other worker's successful retry stores
        rec = {"request_id": "req-other", "retry_of": None, "attempt": 2}
        meta = {
            "tier": "small",
            "upstream": url,
            "response_model": "small",
            "finish_reason": "stop",
        }
        answer = orjson.dumps({"id": "other", "choices": [], "object": "chat.completion"})
        key = "idem:" + hashlib.sha256(b"default\x00ord-1").hexdigest()
        h.call(h.shim.idem_put(key, _idem_entry(rec, raw, meta), answer))
        assert first.result().status_code == 504
        again = httpx.post(h.base_url + "/chat/completions", content=raw, headers=hdr)
        assert again.headers["x-finops-cache"] == "hit" and again.json()["id"] == "other"


def test_idempotency_key_is_kept_when_the_answer_came_from_a_coalesced_call(tmp_path, fakes):
    f, url = fakes("slow", tokens=4, delay_s=0.1)
    with _serve(tmp_path, [f"small={url}"], cache_ttl_s=0.5) as h:
        body = {**CHAT, "temperature": 0}

        def post(headers):
            return httpx.post(h.base_url + "/chat/completions", json=body, headers=headers)

        with cf.ThreadPoolExecutor(2) as ex:
            lead = ex.submit(post, {})
            time.sleep(0.1)  # the first one is in flight
            follower = ex.submit(post, {"idempotency-key": "k-1"})
            assert lead.result().status_code == follower.result().status_code == 200
        assert follower.result().headers["x-finops-cache"] == "hit"
        time.sleep(0.7)  # the cache entry expires; the idempotency record must not
        again = post({"idempotency-key": "k-1"})
        assert again.json() == follower.result().json()
        assert f.calls == 1
        recs = _records(h.shim, 3)
    assert [r["cache_status"] for r in recs] == ["miss", "coalesced", "hit"]
    assert [r["upstream_attempts"] for r in recs] == [1, 0, 0]  # one upstream call in all
    assert recs[2]["retry_of"] == recs[1]["request_id"]


def test_broken_chunked_framing_fails_over_to_another_replica(tmp_path, fakes):
    """An upstream whose chunked body is not HTTP (a chunk size that is not hex)."""
    good, good_url = fakes()
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    bad_url = f"http://127.0.0.1:{srv.getsockname()[1]}"
    stop = threading.Event()

    def serve_bad() -> None:
        srv.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                continue
            with conn:
                conn.recv(65536)
                conn.sendall(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"transfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n"
                )
                time.sleep(0.2)

    t = threading.Thread(target=serve_bad, daemon=True)
    t.start()
    try:
        with _serve(tmp_path, [f"small={bad_url}", f"small={good_url}"]) as h:
            # least-outstanding puts the bad replica first on an idle pool
            for path, body in (
                ("/chat/completions", CHAT),
                ("/embeddings", {"model": "small", "input": "hi"}),
            ):
                r = httpx.post(h.base_url + path, json=body)
                assert r.status_code == 200, r.text
                assert "x-finops-tier" in r.headers
            recs = _records(h.shim, 2)
    finally:
        stop.set()
        t.join(2)
        srv.close()
    assert [r["status_code"] for r in recs] == [200, 200]
    assert all(r["upstream"] == good_url for r in recs)
    assert good.calls == 2


def test_a_follower_that_leaves_is_499_and_the_others_still_get_the_answer(tmp_path, fakes):
    f, url = fakes("slow", tokens=5, delay_s=0.1)  # a 0.5 s answer
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "temperature": 0, "max_tokens": 5}

        def post(read_timeout: float) -> httpx.Response:
            return httpx.post(
                h.base_url + "/chat/completions",
                json=body,
                timeout=httpx.Timeout(5, read=read_timeout),
            )

        with cf.ThreadPoolExecutor(3) as ex:
            lead = ex.submit(post, 5)
            time.sleep(0.1)
            quitter = ex.submit(post, 0.15)
            stayer = ex.submit(post, 5)
            with pytest.raises(httpx.ReadTimeout):
                quitter.result()
            assert _same_answer(lead.result().json(), stayer.result().json())
        assert stayer.result().headers["x-finops-cache"] == "hit"
        # waiting on the leader is upstream time, not the shim's overhead
        assert float(stayer.result().headers["x-finops-overhead-ms"]) < 100
        assert f.calls == 1
        recs = _records(h.shim, 3)
    by_status = sorted((r["status_code"], r["cache_status"]) for r in recs)
    assert by_status == [(200, "coalesced"), (200, "miss"), (499, "coalesced")]


def test_cap_rejections_and_cache_hits_add_no_tokens_to_metrics(tmp_path, fakes):
    f, url = fakes(tokens=4)
    with _serve(tmp_path, [f"small={url}"], caps=(CapRule(50, "reject"),)) as h:
        big = {**CHAT, "messages": [{"role": "user", "content": "word " * 400}]}
        assert httpx.post(h.base_url + "/chat/completions", json=big).status_code == 400
        det = {**CHAT, "temperature": 0}
        for _ in range(2):
            assert httpx.post(h.base_url + "/chat/completions", json=det).status_code == 200
        recs = _records(h.shim, 3)
        text = httpx.get(h.url + "/metrics").text
    assert recs[0]["input_tokens"] > 50, "the record keeps the size that was refused"

    def tokens(kind: str) -> float:
        return sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("finops_shim_tokens_total{") and f'kind="{kind}"' in line
        )

    assert tokens("input") == recs[1]["input_tokens"] > 0, "only the upstream call's tokens"
    assert tokens("output") == 4
    assert f.calls == 1


def test_logged_prompts_and_client_names_are_cut_to_size(tmp_path, fakes):
    _f, url = fakes()
    with _serve(tmp_path, [f"small={url}"], log_prompts=True) as h:
        huge = "call me at 555-123-4567 " + "lorem " * 200_000  # 1.2 MB, under the body limit
        r = httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "messages": [{"role": "user", "content": huge}]},
            headers={"x-feature": "f" * 5000},
        )
        assert r.status_code == 200
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "m" * 5000})
        assert r.status_code == 404
        recs = _records(h.shim, 2)
    line = orjson.dumps(recs[0])
    assert len(line) < 40_000, "a record stays far below the ingester's 1 MiB line limit"
    text = recs[0]["prompt_text"]
    assert "\n[... the middle is not logged: the prompt has " in text and text.endswith("lorem ")
    assert "555-123-4567" not in recs[0]["prompt_text"]
    assert len(recs[0]["feature"]) == 200 and len(recs[1]["request_model"]) == 200


def test_requests_cut_by_shutdown_end_cleanly_and_are_not_logged_as_served(tmp_path, fakes, caplog):
    """Past [server] drain_timeout_s, a stream still going ends with an SSE error event
    and [DONE] (it was a cut chunked body, and a traceback in the log), and a request
    not answered yet gets a 503 to retry elsewhere; both are logged 503 shim_shutdown."""
    _f, url = fakes("slow", tokens=200, delay_s=0.02)  # a 4 s answer
    h = _serve(tmp_path, [f"small={url}"], drain_timeout_s=0.5)
    got: list = []
    plain: list = []

    def client() -> None:
        with httpx.stream(
            "POST",
            h.base_url + "/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 200},
        ) as r:
            for chunk in r.iter_raw():
                got.append(chunk)

    def non_stream() -> None:
        body = {**CHAT, "max_tokens": 200}
        plain.append(httpx.post(h.base_url + "/chat/completions", json=body, timeout=30))

    threads = [threading.Thread(target=client), threading.Thread(target=non_stream)]
    for t in threads:
        t.start()
    _wait_for(lambda: len(got) >= 3)
    h.stop()
    for t in threads:
        t.join(10)
    sse = b"".join(got)
    assert sse.endswith(b"data: [DONE]\n\n"), sse[-300:]
    err = orjson.loads(sse.split(b"data: ")[-2])["error"]
    assert err["code"] == "shim_shutdown" and "drain_timeout_s" in err["message"]
    (r,) = plain
    assert r.status_code == 503 and r.json()["error"]["code"] == "shim_shutdown"
    recs = []
    for p in sorted((tmp_path / "log").glob("requests-*.jsonl")):
        recs += [orjson.loads(x) for x in p.read_bytes().splitlines()]
    assert sorted((x["stream"], x["status_code"], x["error_type"]) for x in recs) == [
        (False, 503, "shim_shutdown"),
        (True, 503, "shim_shutdown"),
    ]
    streamed = next(x for x in recs if x["stream"])
    assert 0 < streamed["output_tokens"] < 200
    assert not [r for r in caplog.records if "Exception in ASGI" in r.getMessage()]


def test_a_stream_cut_by_shutdown_is_logged_when_its_client_reads_nothing(tmp_path, fakes):
    """A client that stopped reading (its window full) when the drain ran out: the cut
    stream's end could not be sent, the log was closed under the request meanwhile, and
    its record (the tokens streamed, unbilled) was lost."""
    import socket

    _f, url = fakes(tokens=200_000)
    h = _serve(tmp_path, [f"small={url}"], drain_timeout_s=0.3)
    body = orjson.dumps({**CHAT, "stream": True, "max_tokens": 200_000})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", h.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n" % len(body) + body
    )
    assert s.recv(200).startswith(b"HTTP/1.1 200")  # then it reads no more
    time.sleep(0.5)
    try:
        h.stop()
    finally:
        s.close()
    recs = [
        orjson.loads(x)
        for p in sorted((tmp_path / "log").glob("requests-*.jsonl"))
        for x in p.read_bytes().splitlines()
    ]
    assert [(r["status_code"], r["error_type"]) for r in recs] == [(503, "shim_shutdown")]
    assert recs[0]["output_tokens"] > 0


def test_a_request_cut_by_shutdown_after_a_fallback_names_the_upstream_that_had_it(tmp_path, fakes):
    """The first tier fails, the next one is generating when shutdown cuts the request:
    the record named the failed replica (and the tier asked for), not the one that had
    the prompt and spent GPU time on it."""
    _bad, bad_url = fakes("error500")
    _slow, slow_url = fakes("slow", tokens=200, delay_s=0.02)
    h = _serve(tmp_path, [f"small={bad_url}", f"mid={slow_url}"], drain_timeout_s=0.3)
    out: list = []
    t = threading.Thread(
        target=lambda: out.append(
            httpx.post(h.base_url + "/chat/completions", json={**CHAT, "max_tokens": 200})
        )
    )
    t.start()
    _wait_for(lambda: _slow.calls >= 1)
    h.stop()
    t.join(10)
    assert out[0].status_code == 503
    (rec,) = [
        orjson.loads(x)
        for p in sorted((tmp_path / "log").glob("requests-*.jsonl"))
        for x in p.read_bytes().splitlines()
    ]
    assert rec["error_type"] == "shim_shutdown" and rec["upstream_attempts"] == 2
    assert rec["upstream"] == slow_url and rec["tier"] == "mid"
    assert rec["fallback_reason"] == "http_5xx" and rec["input_tokens"] > 0


def test_errors_clients_get_name_replicas_not_internal_urls(tmp_path, fakes, caplog):
    """Any tenant could read the upstreams' internal addresses from the shim's errors
    (after fallback, mid-stream); they name the tier's replica now, and the shim's log
    keeps the URL."""
    _bad, bad_url = fakes("error500")
    _dying, dying_url = fakes("die_mid_stream", die_after=2)
    with _serve(tmp_path, [f"small={dying_url}", f"mid={bad_url}"]) as h:
        plain = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "mid"})
        stream = httpx.post(
            h.base_url + "/chat/completions", json={**CHAT, "model": "small", "stream": True}
        )
    msg = plain.json()["error"]["message"]
    # vLLM's own reason is kept (it was dropped for the shim's summary)
    assert plain.status_code == 500 and "`mid` replica 1 answered 500: injected failure" in msg
    assert "`small` replica 1" in stream.text and "failed mid-stream" in stream.text
    for text in (msg, stream.text):
        assert bad_url not in text and dying_url not in text and "127.0.0.1" not in text
    assert bad_url in caplog.text and dying_url in caplog.text


def test_a_fallback_refused_by_a_retry_budget_is_said(tmp_path, fakes):
    """The next tier was never tried because its retry budget was spent: the client's
    error said only that all upstreams failed."""
    _bad, bad_url = fakes("error500")
    good, good_url = fakes()
    ups = [f"small={bad_url}", f"mid={good_url}"]
    with _serve(tmp_path, ups, retry_budget_min=0, retry_budget_ratio=0.0) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
    assert r.status_code == 500 and good.calls == 0
    assert "1 more replica(s) not tried: their retry budget" in r.json()["error"]["message"]


def test_breaker_opens_and_half_open_probe_closes(tmp_path, fakes):
    bad, bad_url = fakes("error500")
    _good, good_url = fakes()
    with _serve(
        tmp_path,
        [f"small={bad_url}", f"small={good_url}"],
        breaker_failures=2,
        breaker_cooldown_s=30,
    ) as h:
        for _ in range(6):
            assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert bad.calls == 2, "after 2 failures the circuit is open and the replica is skipped"
        state = {
            c["upstream"]: c["circuit"] for c in httpx.get(h.url + "/readyz").json()["circuits"]
        }
        assert state[bad_url] == "open"
        bad.mode = "ok"
        rep = next(u for u in h.shim.pool.all() if u.url == bad_url)
        rep.breaker.opened_at -= 30  # the cooldown has passed (no sleeping on a busy machine)
        for _ in range(4):
            assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        # the probe succeeded, so the replica is back in rotation: it takes turns again
        assert bad.calls == 4, "the half-open probe succeeded, so the replica is back in rotation"
        state = {
            c["upstream"]: c["circuit"] for c in httpx.get(h.url + "/readyz").json()["circuits"]
        }
        assert state[bad_url] == "closed"


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("hung_after_s", [0.5, 0.0])
def test_a_hung_replica_behind_impatient_clients_leaves_rotation(
    tmp_path, fakes, stream, hung_after_s
):
    """A hung engine whose /health answers, behind clients that give up before the shim's
    own timeouts: each give-up said nothing of the replica, and with nothing outstanding
    there it won every least-outstanding turn, so it kept about half the traffic for good.
    Once it has held requests for `hung_after_s` without answering any, give-ups count
    against its circuit; a replica that answers others is not blamed (0: never)."""
    hung, hung_url = fakes("hang")
    good, good_url = fakes()
    with _serve(
        tmp_path,
        [f"small={hung_url}", f"small={good_url}"],
        breaker_failures=2,
        breaker_cooldown_s=60,
        hung_after_s=hung_after_s,
    ) as h:
        gave_up = 0
        for _ in range(12):
            try:
                r = httpx.post(
                    h.base_url + "/chat/completions", json={**CHAT, "stream": stream}, timeout=0.3
                )
                assert r.status_code == 200, r.text
            except httpx.TimeoutException:
                gave_up += 1
        metrics = httpx.get(h.url + "/metrics").text
        state = _circuit(h, hung_url)
        recs = _records(h.shim, 12)
    assert good.calls == 12 - gave_up
    abandoned = [r for r in recs if r["upstream"] == hung_url]
    assert len(abandoned) == gave_up == hung.calls
    assert all(r["status_code"] == 499 for r in abandoned)
    if hung_after_s:
        # 0.3 s a give-up: silent 0.6 s after the second, so the 2nd and 3rd count
        assert state == "open" and gave_up == 3, (state, gave_up)
        assert (
            f'finops_shim_upstream_hung_abandons_total{{tier="small",upstream="{hung_url}"}} 2.0'
            in metrics
        )
    else:
        assert state == "closed" and gave_up == 6, (state, gave_up)  # every other turn
        assert "finops_shim_upstream_hung_abandons_total{" not in metrics


def test_an_open_circuit_past_its_cooldown_is_reported_half_open(tmp_path, fakes):
    """With no traffic to move it, an open circuit whose cooldown has passed stayed `open`
    in /readyz and the gauge while /readyz listed the replica as serving: a rarely used
    tier's alert stayed up for hours after its replica recovered."""
    _bad, bad_url = fakes("error500")
    with _serve(tmp_path, [f"small={bad_url}"], breaker_failures=1, breaker_cooldown_s=30) as h:
        httpx.post(h.base_url + "/chat/completions", json=CHAT)
        assert _circuit(h, bad_url) == "open"
        rep = next(iter(h.shim.pool.all()))
        rep.breaker.opened_at -= 30  # the cooldown has passed, and no request came
        assert _circuit(h, bad_url) == "half_open"
        h.shim.refresh_gauges()  # (the health loop does it every interval)
        metrics = httpx.get(h.url + "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith("finops_shim_circuit_state{"))
    assert line.endswith(" 2.0"), line


def test_the_shim_out_of_file_descriptors_blames_itself_not_the_upstream(
    tmp_path, fakes, monkeypatch, caplog
):
    """EMFILE making an upstream connection was the replica's "connect" failure: five of
    them opened a healthy replica's circuit. It is the shim's own shortage: a 503 to
    retry, logged as an error that says what to raise, and no mark against the replica."""
    import asyncio
    import errno

    from finops.shim import h1client

    _f, url = fakes()

    async def out_of_fds(*_a, **_k):
        raise OSError(errno.EMFILE, "Too many open files")

    with _serve(tmp_path, [f"small={url}"], breaker_failures=2) as h:
        monkeypatch.setattr(h1client.asyncio, "open_connection", out_of_fds)
        out = [httpx.post(h.base_url + "/chat/completions", json=CHAT) for _ in range(4)]
        monkeypatch.setattr(h1client.asyncio, "open_connection", asyncio.open_connection)
        circuit = _circuit(h, url)
        recs = _records(h.shim, 4)
    assert [r.status_code for r in out] == [503] * 4
    err = out[0].json()["error"]
    assert err["code"] == "upstream_shim_resources" and "ulimit -n" in err["message"]
    assert circuit == "closed"
    assert all(r["upstream_attempts"] == 0 for r in recs)
    assert any(
        r.levelname == "ERROR" and "Too many open files" in r.getMessage() for r in caplog.records
    )


def _circuit(h, url: str) -> str:
    return next(
        c["circuit"]
        for c in httpx.get(h.url + "/readyz").json()["circuits"]
        if c["upstream"] == url
    )


def _stream_in_thread(h, body: dict, got: list) -> threading.Thread:
    """A streaming request in a thread; `got` collects its raw chunks, then "end"."""

    def run() -> None:
        with httpx.stream("POST", h.base_url + "/chat/completions", json=body, timeout=30) as r:
            for chunk in r.iter_raw():
                got.append(chunk)
        got.append("end")

    t = threading.Thread(target=run)
    t.start()
    return t


def test_a_stream_probe_closes_the_circuit_at_its_first_byte(tmp_path, fakes):
    """The half-open probe is a long stream: its first byte shows the replica answers,
    so others are let in at once (they were refused with 503 for the whole generation)."""
    f, url = fakes("error500", tokens=40, delay_s=0.05)  # streams take 2 s
    with _serve(tmp_path, [f"small={url}"], breaker_failures=2, breaker_cooldown_s=30) as h:
        for _ in range(2):
            assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 500
        assert _circuit(h, url) == "open"
        f.mode = "slow"
        next(h.shim.pool.all()).breaker.opened_at -= 30  # the cooldown has passed
        got: list = []
        t = _stream_in_thread(h, {**CHAT, "stream": True, "max_tokens": 40}, got)
        _wait_for(lambda: len(got) >= 2)
        codes = [
            httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code for _ in range(3)
        ]
        assert "end" not in got, "the probe stream is still going"
        assert codes == [200, 200, 200] and _circuit(h, url) == "closed"
        t.join(10)


def test_a_stream_begun_before_the_circuit_opened_does_not_close_it(tmp_path, fakes):
    """A stream let through while the replica was healthy ends fine after the replica
    began failing and its circuit opened: that says nothing about the replica now."""
    f, url = fakes("slow", tokens=30, delay_s=0.05)
    _good, good_url = fakes()
    with _serve(
        tmp_path, [f"small={url}", f"mid={good_url}"], breaker_failures=2, breaker_cooldown_s=60
    ) as h:
        got: list = []
        t = _stream_in_thread(h, {**CHAT, "model": "small", "stream": True, "max_tokens": 30}, got)
        _wait_for(lambda: len(got) >= 2)
        f.mode = "error500"
        for _ in range(2):  # fall back to mid, and open small's circuit
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
            assert r.status_code == 200 and r.headers["x-finops-tier"] == "mid"
        assert _circuit(h, url) == "open"
        t.join(10)
        assert got[-1] == "end" and b"[DONE]" in b"".join(got[:-1])
        assert _circuit(h, url) == "open"  # was: closed again by the old stream's success
        calls = f.calls
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.headers["x-finops-tier"] == "mid" and f.calls == calls


def test_a_stream_that_begins_with_a_server_error_event_falls_back(tmp_path, fakes):
    """vLLM reports an engine failure before any token in band: a 200 stream whose first
    event is an error. Nothing has reached the client, so it falls back to a healthy
    replica and counts against the failing one (clients got 200 + the error)."""
    bad, bad_url = fakes("error_mid_stream", die_after=0)
    good, good_url = fakes()
    with _serve(tmp_path, [f"small={bad_url}", f"small={good_url}"], breaker_failures=2) as h:
        for _ in range(6):
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
            assert r.status_code == 200 and b'"error"' not in r.content
            assert r.text.endswith("data: [DONE]\n\n") and '"delta"' in r.text
        assert bad.calls == 2 and good.calls == 6 and _circuit(h, bad_url) == "open"
        recs = _records(h.shim, 6)
        assert all(x["status_code"] == 200 and x["upstream"] == good_url for x in recs)
        # the log says what each request cost upstream, fallbacks included
        tries = sorted((x["upstream_attempts"], x["fallback_reason"] or "") for x in recs)
        assert tries == [(1, "")] * 4 + [(2, "stream_error")] * 2
        m = httpx.get(h.url + "/metrics").text
        assert 'reason="stream_error"' in m
        # a 4xx in band is the request's fault: passed on as sent, no fallback
        for f in (bad, good):
            f.mode, f.die_after, f.error_code, f.calls = "error_mid_stream", 0, 400, 0
        for u in h.shim.pool.all():
            u.breaker = CircuitBreaker(2, 10)
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 200
        assert orjson.loads(r.text.split("data: ")[1])["error"]["code"] == 400
        assert bad.calls + good.calls == 1
        # every replica failing so with a server error: a plain 502 (nothing sent yet)
        bad.error_code = good.error_code = 503
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_stream_error"
        assert "injected failure" in r.json()["error"]["message"]
        assert bad.calls + good.calls == 3


def test_token_counts_are_asked_of_a_replica_that_is_up(tmp_path, fakes):
    """Caps counted by vLLM's /tokenize ask a replica in rotation whose /tokenize works:
    one with an open circuit has no requests in flight, so it won every
    least-outstanding choice (a dead one cost each capped request the timeout), and
    one whose /tokenize is skipped after failing left requests to the estimate."""
    down, down_url = fakes("error500")
    no_tok, no_tok_url = fakes(tokenize_fails=True)
    good, good_url = fakes()
    cap = CapRule(tier="small", feature="*", tenant="*", max_input_tokens=1000, policy="reject")
    ups = [f"small={down_url}", f"small={no_tok_url}", f"small={good_url}"]
    with _serve(tmp_path, ups, caps=(cap,), token_counter="upstream", breaker_failures=1) as h:
        body = {**CHAT, "model": "small"}
        for _ in range(6):
            assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
        assert _circuit(h, down_url) == "open"
        # at most: the first count (all up, the first listed), then none
        assert down.tokenize_calls <= 1
        assert no_tok.tokenize_calls == 1  # failed once, then skipped by the gate
        assert good.tokenize_calls >= 4


def test_models_pass_on_vllm_max_model_len(tmp_path, fakes):
    """vLLM-aware clients size prompts by /v1/models' max_model_len: each tier's is taken
    from its replica's vLLM, and a routed name gets the smallest (a prompt under it fits
    any tier)."""
    _s, small_url = fakes(name="llama-8b", max_model_len=2048)
    _l, large_url = fakes(name="llama-70b", max_model_len=8192)
    cfg = from_flags(
        [f"small={small_url}", f"large={large_url}"],
        models=["small=llama-8b", "large=llama-70b"],
        log_dir=tmp_path / "log",
    )
    with serve_in_thread(cfg) as h:
        _wait_for(lambda: all(u.max_model_len for u in h.shim.pool.all()))
        got = {
            m["id"]: m.get("max_model_len")
            for m in httpx.get(h.base_url + "/models").json()["data"]
        }
    assert got == {"auto": 2048, "small": 2048, "large": 8192, "llama-8b": 2048, "llama-70b": 8192}


@pytest.mark.parametrize("normalize", [True, False])
def test_cache_whitespace_normalization_can_be_switched_off(tmp_path, fakes, normalize):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"], cache_normalize_whitespace=normalize) as h:
        for text in ("hi", "hi\n", "  hi"):
            body = {**CHAT, "temperature": 0, "messages": [{"role": "user", "content": text}]}
            assert httpx.post(h.base_url + "/chat/completions", json=body).status_code == 200
    assert f.calls == (1 if normalize else 3)


def test_a_long_non_streamed_generation_is_not_a_first_byte_timeout(tmp_path, fakes):
    """vLLM sends a non-streamed answer's head only once it is all generated: its limit
    is [upstream] response_timeout_s, not the stream's first-byte one (a generation
    longer than that was a 504, generated again on the next tier, and opened both
    tiers' circuits)."""
    slow, slow_url = fakes("slow", delay_s=0.1)  # 4 tokens: a 0.4 s generation
    large, large_url = fakes()
    with _serve(
        tmp_path,
        [f"small={slow_url}", f"large={large_url}"],
        first_byte_timeout_s=0.3,
        breaker_failures=1,
    ) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.status_code == 200 and r.headers["x-finops-tier"] == "small"
        assert (slow.calls, large.calls) == (1, 0) and _circuit(h, slow_url) == "closed"
    with _serve(
        tmp_path,
        [f"small={slow_url}", f"large={large_url}"],
        response_timeout_s=0.2,
        log_dir=tmp_path / "log2",
    ) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.headers["x-finops-tier"] == "large"  # past its own limit: a failure
        (rec,) = _records(h.shim, 1)
        assert rec["fallback_reason"] == "timeout"


def test_a_full_connection_pool_falls_back_without_blaming_the_replica(tmp_path, fakes):
    """Every connection the shim allows to a replica ([upstream] max_connections) is
    busy: the queued request waits up to the first-byte timeout for one, then falls back.
    It never reached the replica, so its circuit stays closed (it was a 504 "upstream
    timeout" that opened the healthy replica's circuit)."""
    f, url = fakes("slow", tokens=40, delay_s=0.05)  # 2 s streams hold both connections
    _g, good_url = fakes()
    with _serve(
        tmp_path,
        [f"small={url}", f"mid={good_url}"],
        max_connections=2,
        first_byte_timeout_s=0.8,
        response_timeout_s=0.8,
        breaker_failures=1,
    ) as h:
        body = {**CHAT, "model": "small", "stream": True, "max_tokens": 40}
        streams = [(got := [], _stream_in_thread(h, body, got)) for _ in range(2)]
        _wait_for(lambda: all(len(g) >= 2 for g, _ in streams))
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.status_code == 200 and r.headers["x-finops-tier"] == "mid"
        assert f.calls == 2 and _circuit(h, url) == "closed"
        m = httpx.get(h.url + "/metrics").text
        assert f'finops_shim_upstream_pool_full_total{{tier="small",upstream="{url}"}} 1.0' in m
        assert 'reason="pool_full",to_tier="mid"' in m
        for _, t in streams:
            t.join(10)
        # a slot is free again: small serves
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.headers["x-finops-tier"] == "small"
        (rec,) = [x for x in _records(h.shim, 4) if x["tier"] == "mid"]
        assert rec["status_code"] == 200
        # the queued attempt made no call: only mid's counts
        assert (rec["upstream_attempts"], rec["fallback_reason"]) == (1, "pool_full")


def test_a_client_gone_while_waiting_for_a_connection_is_not_billed_input(tmp_path, fakes):
    """The request never reached the replica: the record used to say it had (its
    upstream, one attempt, the prompt's tokens) and the token metric counted them."""
    f, url = fakes("slow", tokens=40, delay_s=0.05)  # a 2 s stream holds the connection
    with _serve(tmp_path, [f"small={url}"], max_connections=1, first_byte_timeout_s=5.0) as h:
        body = {**CHAT, "model": "small", "stream": True, "max_tokens": 40}
        got: list = []
        t = _stream_in_thread(h, body, got)
        _wait_for(lambda: len(got) >= 2)
        big = {**body, "messages": [{"role": "user", "content": "word " * 800}]}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(h.base_url + "/chat/completions", json=big, timeout=0.6)
        t.join(10)
        recs = _records(h.shim, 2)
        m = httpx.get(h.url + "/metrics").text
    (gone,) = [r for r in recs if r["status_code"] == 499]
    assert gone["input_tokens"] in (None, 0) and gone["upstream_attempts"] == 0
    assert f.calls == 1
    (served,) = [r for r in recs if r["status_code"] == 200]
    line = 'finops_shim_tokens_total{kind="input",tier="small"}'
    assert f"{line} {float(served['input_tokens'])}" in m


@pytest.mark.parametrize("mode", ["die_mid_stream", "error_mid_stream"])
def test_streams_failing_partway_open_the_circuit(tmp_path, fakes, mode):
    """A replica whose streams all break after the first byte: the first byte is not a
    verdict, the end is, so its circuit opens and traffic moves to the healthy one."""
    bad, bad_url = fakes(mode, die_after=2)
    good, good_url = fakes()
    ups = [f"small={bad_url}", f"small={good_url}"]
    with _serve(tmp_path, ups, breaker_failures=3, breaker_cooldown_s=60) as h:
        for _ in range(12):
            httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
        rep = next(u for u in h.shim.pool.all() if u.url == bad_url)
        assert STATE_NAMES[rep.breaker.state] == "open"
    assert bad.calls == 3 and good.calls == 9  # turns taken until the circuit opened


def test_retry_budget_limits_fallbacks(tmp_path, fakes):
    bad, bad_url = fakes("error500")
    good, good_url = fakes()
    # breaker off (0 = never opens) so every request tries the bad small replica first and
    # falls back to mid
    cfg_changes = {"breaker_failures": 0, "retry_budget_min": 2, "retry_budget_ratio": 0.0}
    with _serve(tmp_path, [f"small={bad_url}", f"mid={good_url}"], **cfg_changes) as h:
        codes = []
        for _ in range(6):
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
            codes.append(r.status_code)
        m = httpx.get(h.url + "/metrics").text
    fallbacks = sum(
        float(ln.split()[-1])
        for ln in m.splitlines()
        if ln.startswith("finops_shim_fallbacks_total")
    )
    # mid takes 2 retries, then its budget refuses
    assert codes == [200, 200, 500, 500, 500, 500]
    assert fallbacks == 2 and good.calls == 2 and bad.calls == 6
    assert f'finops_shim_retry_budget_exhausted_total{{upstream="{good_url}"}} 4.0' in m


def test_cache_hit_replay_stream_and_tenant_isolation(tmp_path, fakes):
    f, url = fakes()
    keys = ["--", "k1=acme", "k2=globex"][1:]
    cfg = from_flags([f"small={url}"], api_keys=keys, log_dir=tmp_path / "log")
    det = {**CHAT, "temperature": 0}
    with serve_in_thread(cfg) as h:
        a = {"authorization": "Bearer k1"}
        b = {"authorization": "Bearer k2"}
        r1 = httpx.post(h.base_url + "/chat/completions", json=det, headers=a)
        assert r1.headers["x-finops-cache"] == "miss"
        # same request, different whitespace and key order: a hit
        det2 = {
            "temperature": 0.0,
            "max_tokens": 4,
            "messages": [{"content": "  hello there\n", "role": "user"}],
            "model": "auto",
        }
        r2 = httpx.post(h.base_url + "/chat/completions", json=det2, headers=a)
        assert r2.headers["x-finops-cache"] == "hit" and _same_answer(r2.json(), r1.json())
        # streaming hit is replayed as SSE with the same text
        r3 = httpx.post(h.base_url + "/chat/completions", json={**det, "stream": True}, headers=a)
        assert r3.headers["x-finops-cache"] == "hit"
        text = "".join(
            (orjson.loads(e[6:])["choices"][0]["delta"].get("content") or "")
            for e in r3.content.split(b"\n\n")
            if e.startswith(b"data: {")
        )
        assert text == r1.json()["choices"][0]["message"]["content"]
        # the other tenant never gets acme's entry
        r4 = httpx.post(h.base_url + "/chat/completions", json=det, headers=b)
        assert r4.headers["x-finops-cache"] == "miss"
        # non-deterministic requests bypass
        r5 = httpx.post(
            h.base_url + "/chat/completions", json={**CHAT, "temperature": 0.7}, headers=a
        )
        assert r5.headers["x-finops-cache"] == "bypass"
        assert f.calls == 3
        assert all("authorization" not in hd for hd in f.headers), "client keys are never forwarded"
        recs = _records(h.shim, 5)
    assert [r["cache_status"] for r in recs] == ["miss", "hit", "hit", "miss", "bypass"]
    assert recs[1]["input_tokens"] == 0 and recs[1]["output_tokens"] == 0  # not billed twice
    assert [r["tenant"] for r in recs] == ["acme", "acme", "acme", "globex", "acme"]
    logged = b"".join(p.read_bytes() for p in (tmp_path / "log").iterdir())
    assert b"k1" not in logged.replace(b"k1=", b"") and b"Bearer" not in logged


def test_auth_missing_and_unknown_key_401(tmp_path, fakes):
    _, url = fakes()
    cfg = from_flags([f"small={url}"], api_keys=["sekret=acme"], log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 401
        r = httpx.post(
            h.base_url + "/chat/completions", json=CHAT, headers={"authorization": "Bearer nope"}
        )
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(h.base_url + "/models").status_code == 401
        assert (
            httpx.get(
                h.base_url + "/models", headers={"authorization": "Bearer sekret"}
            ).status_code
            == 200
        )
        recs = _records(h.shim, 2)
    assert [r["status_code"] for r in recs] == [401, 401]
    assert b"sekret" not in b"".join(p.read_bytes() for p in (tmp_path / "log").iterdir())
    assert cfg.api_keys == {hash_key("sekret"): "acme"}


def test_two_authorization_headers_are_refused_and_every_endpoint_reads_keys_alike(tmp_path, fakes):
    """Authorization is no list header: with two, inference billed the last key and
    /v1/models checked the first (a gateway checking one could be walked past). And
    /v1/models re-encoded the header, refusing a non-ASCII key the others accept."""
    _, url = fakes()
    keys = ["sk-alice=alice", "sk-bob=bob", "sk-\u00e9=eve"]
    cfg = from_flags([f"small={url}"], api_keys=keys, log_dir=tmp_path / "log")
    two = [(b"authorization", b"Bearer sk-alice"), (b"authorization", b"Bearer sk-bob")]
    with serve_in_thread(cfg) as h, httpx.Client() as c:
        for method, path in (("POST", "/chat/completions"), ("GET", "/models")):
            r = c.request(method, h.base_url + path, json=CHAT, headers=two)
            assert r.status_code == 401, path
            assert "More than one Authorization header" in r.json()["error"]["message"]
        r = c.get(f"{h.base_url}/responses/resp_x", headers=two)
        assert r.status_code == 401
        eve = {"authorization": "Bearer sk-\u00e9".encode()}
        assert c.post(h.base_url + "/chat/completions", json=CHAT, headers=eve).status_code == 200
        assert c.get(h.base_url + "/models", headers=eve).status_code == 200


def test_coalescing_identical_in_flight_requests(tmp_path, fakes):
    f, url = fakes("slow", tokens=5, delay_s=0.05)
    with _serve(tmp_path, [f"small={url}"]) as h:
        det = {**CHAT, "temperature": 0, "max_tokens": 5}
        with cf.ThreadPoolExecutor(8) as ex:
            rs = list(
                ex.map(
                    lambda _: httpx.post(h.base_url + "/chat/completions", json=det, timeout=10),
                    range(8),
                )
            )
        assert all(r.status_code == 200 for r in rs)
        assert len({r.json()["choices"][0]["message"]["content"] for r in rs}) == 1
        assert f.calls == 1, "identical in-flight requests make one upstream call"
        recs = _records(h.shim, 8)
        m = httpx.get(h.url + "/metrics").text
    statuses = sorted(r["cache_status"] for r in recs)
    assert statuses.count("miss") == 1 and set(statuses) <= {"miss", "coalesced", "hit"}
    assert "finops_shim_coalesced_total" in m


def test_cache_metric_counts_what_the_log_says(tmp_path, fakes):
    """A hit rate from /metrics was not the log's: an Idempotency-Key replay is logged
    `hit` and coalesced followers `coalesced`, but neither was in
    finops_shim_cache_total."""
    _f, url = fakes("slow", tokens=5, delay_s=0.05)
    with _serve(tmp_path, [f"small={url}"]) as h:
        post = h.base_url + "/chat/completions"
        det = {**CHAT, "temperature": 0, "max_tokens": 5}
        with cf.ThreadPoolExecutor(4) as ex:
            rs = list(ex.map(lambda _: httpx.post(post, json=det, timeout=10), range(4)))
        assert all(r.status_code == 200 for r in rs)
        sampled = {**CHAT, "temperature": 0.9}
        for _ in range(2):
            r = httpx.post(post, json=sampled, headers={"Idempotency-Key": "k-1"})
            assert r.status_code == 200
        httpx.post(post, json=det)  # a cache hit
        recs = _records(h.shim, 7)
        text = httpx.get(h.url + "/metrics").text
    counted = {
        ln.split('"')[1]: float(ln.rsplit(" ", 1)[1])
        for ln in text.splitlines()
        if ln.startswith("finops_shim_cache_total{")
    }
    logged: dict[str, float] = {}
    for r in recs:
        logged[r["cache_status"]] = logged.get(r["cache_status"], 0) + 1
    assert {k: v for k, v in counted.items() if v} == logged
    assert logged["hit"] >= 2 and logged["bypass"] == 1


def _stalled_stream(h, body: dict, headers: bytes = b"") -> socket.socket:
    """A raw-socket streaming client that reads the head and then nothing more."""
    raw = orjson.dumps({**body, "stream": True})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", h.port))
    s.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        + headers
        + b"content-length: %d\r\n\r\n" % len(raw)
        + raw
    )
    assert s.recv(200).startswith(b"HTTP/1.1 200")
    return s


def test_a_leader_held_back_by_its_stalled_client_holds_followers_only_so_long(tmp_path, fakes):
    """An identical deterministic request waited on a leader whose client had stopped
    reading, with no limit (no byte after 80 s). It waits as long as it would wait for
    the upstream itself, then calls it; a duplicate Idempotency-Key gets a 409 to retry
    rather than a second, billed run."""
    _f, url = fakes(tokens=200_000)
    det = {**CHAT, "temperature": 0, "max_tokens": 200_000}
    limits = {"response_timeout_s": 1.0, "first_byte_timeout_s": 1.0}
    with _serve(tmp_path, [f"small={url}"], **limits) as h:
        leader = _stalled_stream(h, det)
        try:
            t0 = time.monotonic()
            r = httpx.post(h.base_url + "/chat/completions", json=det, timeout=30)
            assert r.status_code == 200 and time.monotonic() - t0 < 10
        finally:
            leader.close()
        other = {**det, "max_tokens": 199_999}  # not answered from the cache meanwhile
        idem = _stalled_stream(h, other, b"idempotency-key: k1\r\n")
        try:
            r2 = httpx.post(
                h.base_url + "/chat/completions",
                content=orjson.dumps({**other, "stream": True}),  # the same request again
                headers={"idempotency-key": "k1", "content-type": "application/json"},
            )
        finally:
            idem.close()
        metrics = httpx.get(h.url + "/metrics").text
    assert r.headers["x-finops-cache"] == "miss"
    assert "finops_shim_coalesce_timeouts_total 1.0" in metrics
    assert r2.status_code == 409 and r2.headers["retry-after"] == "5"
    assert r2.json()["error"]["code"] == "idempotency_key_in_progress"


def test_a_stream_whose_client_takes_no_bytes_ends_at_the_send_timeout(tmp_path, fakes):
    """A client that stopped reading held its upstream request (the GPU generating into a
    full buffer, a pooled connection) and kept its record back for as long as its socket
    lived. Past [limits] send_timeout_s the stream ends as if the client had left: the
    upstream request is cancelled and the record says client_stalled."""
    f, url = fakes(tokens=200_000)
    body = {**CHAT, "max_tokens": 200_000}
    with _serve(tmp_path, [f"small={url}"], send_timeout_s=1.0) as h:
        s = _stalled_stream(h, body)
        try:
            (rec,) = _records(h.shim, 1, timeout=15)
        finally:
            s.close()
        _wait_for(lambda: f.disconnects == 1)
        assert h.shim.pool.tiers["small"][0].outstanding == 0
    assert (rec["status_code"], rec["error_type"]) == (499, "client_stalled")
    assert 0 < rec["output_tokens"] < 200_000


def test_a_stream_too_big_to_keep_is_not_collected_but_still_replays_its_key(
    tmp_path, fakes, monkeypatch
):
    """A cacheable stream kept every chunk parsed (~1 kB a token: 300 MB for five greedy
    100k-token streams at once). Past MAX_COLLECT_BYTES it stops: the answer is not
    cached, and an Idempotency-Key still replays the stream as it was sent."""
    from finops.shim import proxy

    monkeypatch.setattr(proxy, "MAX_COLLECT_BYTES", 2_000)
    f, url = fakes(tokens=50)
    big = {**CHAT, "temperature": 0, "max_tokens": 50, "stream": True}
    small = {**big, "max_tokens": 5}
    with _serve(tmp_path, [f"small={url}"]) as h:
        post = lambda body, **kw: httpx.post(h.base_url + "/chat/completions", json=body, **kw)  # noqa: E731
        caches = [post(b).headers["x-finops-cache"] for b in (big, big, small, small)]
        first = post(big, headers={"idempotency-key": "k"})
        again = post(big, headers={"idempotency-key": "k"})
    assert caches == ["miss", "miss", "miss", "hit"]
    assert again.headers["x-finops-cache"] == "hit" and again.content == first.content
    assert f.calls == 4


def test_idempotency_key_replays_and_logs_retry(tmp_path, fakes):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "temperature": 0.9}
        hd = {"idempotency-key": "order-42"}
        r1 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)
        r2 = httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)
        r3 = httpx.post(
            h.base_url + "/chat/completions", json={**body, "max_tokens": 2}, headers=hd
        )
        assert r1.json() == r2.json() and f.calls == 1
        assert r2.headers["x-finops-cache"] == "hit"
        assert r3.status_code == 422
        recs = _records(h.shim, 3)
    assert recs[1]["retry_of"] == recs[0]["request_id"] and recs[1]["attempt"] == 2
    assert recs[1]["output_tokens"] == 0 and recs[0]["output_tokens"] == 4
    assert recs[0]["idempotency_key"] == "order-42"


def test_bad_requests_400_404_413_405(tmp_path, fakes):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"], max_body_bytes=10_000) as h:
        r = httpx.post(
            h.base_url + "/chat/completions",
            content=b"{not json",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "gpt-17"})
        assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"  # the field at fault, as OpenAI names it
        r = httpx.post(h.base_url + "/chat/completions", json={"model": "auto"})
        assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 20_000}]}
        r = httpx.post(h.base_url + "/chat/completions", json=big)
        assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

        def chunks():  # no content-length: the limit is enforced while reading
            for _ in range(20):
                yield b"x" * 1000

        r = httpx.post(h.base_url + "/chat/completions", content=chunks())
        assert r.status_code == 413
        assert "x-finops-overhead-ms" in r.headers
        for v in ("yes", 1, "true"):  # vLLM would take these for true and stream to us
            r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": v})
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_stream"
            assert r.json()["error"]["param"] == "stream"
        r = httpx.get(h.base_url + "/chat/completions")
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        assert r.json()["error"]["code"] == "method_not_allowed"
        assert "x-finops-overhead-ms" in r.headers
        assert f.calls == 0
        recs = _records(h.shim, 9)
    # every request is logged, the refused ones included
    assert [r["status_code"] for r in recs] == [400, 404, 400, 413, 413, 400, 400, 400, 405]
    assert recs[-1]["error_type"] == "method_not_allowed"
    Lake(tmp_path / "lake").append("requests", recs, source="shim")


def test_caps_reject_and_truncate(tmp_path, fakes):
    f, url = fakes()
    caps = (CapRule(60, "truncate", tier="small"), CapRule(50, "reject", feature="strict"))
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        msgs = [{"role": "system", "content": "be brief"}]
        for i in range(6):
            msgs += [
                {"role": "user", "content": f"question {i} " + "word " * 20},
                {"role": "assistant", "content": "answer " * 10},
            ]
        msgs.append({"role": "user", "content": "last question"})
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "messages": msgs})
        assert r.status_code == 200
        sent = f.bodies[-1]["messages"]
        assert sent[0]["content"] == "be brief" and sent[-1]["content"] == "last question"
        assert len(sent) < len(msgs)
        r = httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "messages": msgs},
            headers={"x-feature": "strict"},
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
        assert "cap of 50" in r.json()["error"]["message"]
        assert r.json()["error"]["param"] == "messages"
        recs = _records(h.shim, 2)
    assert recs[0]["truncated_tokens"] > 0 and recs[1]["status_code"] == 400


def test_cap_counts_token_id_batches_and_media_parts(tmp_path, fakes):
    _f, url = fakes()
    caps = (CapRule(50, "reject"),)
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        for prompt in ([list(range(5000))], list(range(5000)), [[1, 2], list(range(60))]):
            r = httpx.post(h.base_url + "/completions", json={"model": "small", "prompt": prompt})
            assert r.status_code == 400, prompt[:1]
            assert r.json()["error"]["code"] == "context_length_exceeded"
            assert r.json()["error"]["param"] == "prompt"
        image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 400}}
        content = [{"type": "text", "text": "what is this?"}, image]
        r = httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "messages": [{"role": "user", "content": content}]},
        )
        assert r.status_code == 400  # the image counts (765), not just its 13 characters
        text_only = [{"role": "user", "content": content[:1]}]
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "messages": text_only})
        assert r.status_code == 200
        ok = httpx.post(h.base_url + "/completions", json={"model": "small", "prompt": [[1, 2]]})
        assert ok.status_code == 200
        # vLLM's prompt_embeds cannot be counted: refused under a cap, served without one
        embeds = {"model": "small", "prompt_embeds": "AAAA"}
        r = httpx.post(h.base_url + "/completions", json=embeds)
        assert r.status_code == 400 and "prompt_embeds" in r.json()["error"]["message"]
        r = httpx.post(h.base_url + "/completions", json={"model": "small"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "missing_prompt"
        assert r.json()["error"]["param"] == "prompt"
    with _serve(tmp_path / "nocap", [f"small={url}"]) as h:
        assert httpx.post(h.base_url + "/completions", json=embeds).status_code == 200


def test_a_utf8_feature_header_matches_its_rule_and_is_logged_as_sent(tmp_path, fakes):
    _f, url = fakes()
    caps = (CapRule(1, "reject", feature="réservation"),)
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        post = lambda value: httpx.post(  # noqa: E731
            h.base_url + "/chat/completions", json=CHAT, headers={"x-feature": value}
        )
        out = [post("réservation".encode()), post(b"caf\xe9")]  # the second: not UTF-8
        recs = _records(h.shim, 2)
    assert [r.status_code for r in out] == [400, 200]
    assert [r["feature"] for r in recs] == ["réservation", "café"]


def test_an_exact_counter_counts_a_prompt_list_string_by_string(tmp_path, fakes):
    """With /tokenize counting, a completions prompt sent as a list (one string in a list,
    as LangChain sends it, or a batch) was counted by the byte estimate: 100 one-letter
    words are ~50 tokens to it and 100 to the (fake) tokenizer, so the list got past a
    cap of 80 that the same text as a string did not."""
    f, url = fakes()
    words = "a " * 100
    with _serve(
        tmp_path, [f"small={url}"], caps=(CapRule(80, "reject"),), token_counter="upstream"
    ) as h:
        post = lambda prompt: httpx.post(  # noqa: E731
            h.base_url + "/completions", json={"model": "small", "prompt": prompt}
        )
        out = [post(p) for p in (words, [words], ["a " * 50, "a " * 50], [[1, 2, 3], "a b"])]
    assert [r.status_code for r in out] == [400, 400, 400, 200]
    assert all("upstream tokenizer" in r.json()["error"]["message"] for r in out[:3])
    assert "100 input tokens" in out[1].json()["error"]["message"]
    assert f.tokenize_calls == 1 + 1 + 2 + 1


def test_truncate_with_exact_counter_drops_more_when_the_recount_is_over(tmp_path, fakes):
    """The first turn looks big to the byte estimate (long words) and is small to the
    tokenizer; the second is the reverse. Dropping the first is not enough by the exact
    recount: the shim drops the second too rather than refusing a request that fits."""
    f, url = fakes()
    msgs = [
        {"role": "user", "content": " ".join(["x" * 40] * 10)},
        {"role": "user", "content": "a " * 60},
        {"role": "user", "content": "last question"},
    ]
    caps = (CapRule(50, "truncate"),)
    with _serve(tmp_path, [f"small={url}"], caps=caps, token_counter="upstream") as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "messages": msgs})
        assert r.status_code == 200, r.text
        assert f.bodies[-1]["messages"] == [msgs[-1]]
        (rec,) = _records(h.shim, 1)
    assert rec["truncated_tokens"] == 87 - 9  # exact counts before and after (fake tokenizer)


def test_a_failing_tokenizer_is_skipped_for_a_while(tmp_path, fakes):
    """/tokenize broken: the estimate counts, and the endpoint is not asked again for
    every capped request (a hung one would cost each its timeout)."""
    f, url = fakes(tokenize_fails=True)
    caps = (CapRule(1000, "reject"),)
    with _serve(tmp_path, [f"small={url}"], caps=caps, token_counter="upstream") as h:
        for _ in range(3):
            assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert f.tokenize_calls == 1 and f.calls == 3
        h.shim.tokenize_gate.cooldown_s = 0.0  # the cool-down over: asked again
        h.shim.tokenize_gate._until.clear()
        f.tokenize_fails = False
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        assert f.tokenize_calls == 2


@pytest.mark.parametrize("counter", ["estimate", "upstream"])
def test_fallback_skips_a_tier_whose_cap_the_request_exceeds(tmp_path, fakes, counter):
    """small (no cap) fails; large's cap is 80. 100 one-letter words are ~57 tokens to the
    byte estimate and 107 to the (fake) tokenizer: with the exact counter the fallback
    must count as large's own cap would."""
    _bad, bad_url = fakes("error500")
    large, large_url = fakes()
    limit = 20 if counter == "estimate" else 80
    caps = (CapRule(limit, "reject", tier="large"),)
    ups = [f"small={bad_url}", f"large={large_url}"]
    with _serve(tmp_path, ups, caps=caps, token_counter=counter) as h:
        long = {**CHAT, "model": "small", "messages": [{"role": "user", "content": "w " * 100}]}
        r = httpx.post(h.base_url + "/chat/completions", json=long)
        assert r.status_code == 500 and large.calls == 0  # small's own failure, not large
        short = {**CHAT, "model": "small"}
        r = httpx.post(h.base_url + "/chat/completions", json=short)
        assert r.status_code == 200 and r.headers["x-finops-tier"] == "large"


@pytest.mark.parametrize("counter", ["estimate", "upstream"])
def test_a_routed_request_over_its_tiers_cap_goes_up_to_a_tier_that_takes_it(
    tmp_path, fakes, counter
):
    """`auto` leaves the tier to the shim: a request the router (or exploration) puts on
    a tier whose cap it exceeds goes to the next tier up whose cap it fits, whole; it used
    to be cut (truncate) or refused (reject) on the cheap tier. An explicit tier keeps its
    cap. The router's pick stays the logged decision."""
    fs = {t: fakes() for t in ("small", "mid", "large")}
    caps = (CapRule(60, "truncate", tier="small"), CapRule(150, "reject", tier="mid"))
    ups = [f"{t}={url}" for t, (_f, url) in fs.items()]
    turns = [{"role": "user", "content": "w " * 40}, {"role": "assistant", "content": "ok"}]

    def msgs(n: int) -> list:
        return turns * n + [{"role": "user", "content": "last question"}]

    with _serve(tmp_path, ups, caps=caps, token_counter=counter) as h:
        post = lambda model, m: httpx.post(  # noqa: E731
            h.base_url + "/chat/completions", json={**CHAT, "model": model, "messages": m}
        )
        short = post("auto", [{"role": "user", "content": "hi"}])
        medium = post("auto", msgs(2))  # over small's 60, under mid's 150
        long = post("auto", msgs(6))  # over both: large has no cap
        pinned = post("small", msgs(2))  # an explicit tier keeps its cap (truncated)
        metrics = httpx.get(h.url + "/metrics").text
        recs = _records(h.shim, 4)
    tiers = [r.headers["x-finops-tier"] for r in (short, medium, long, pinned)]
    assert tiers == ["small", "mid", "large", "small"]
    assert fs["mid"][0].bodies[-1]["messages"] == msgs(2)  # whole
    assert fs["large"][0].bodies[-1]["messages"] == msgs(6)
    assert len(fs["small"][0].bodies[-1]["messages"]) < len(msgs(2))
    assert [r["routed_tier"] for r in recs] == ["small", "small", "small", None]
    assert [r["tier"] for r in recs] == tiers
    assert [r["fallback_reason"] for r in recs] == [None, "context_cap", "context_cap", None]
    assert not recs[1]["truncated_tokens"] and recs[3]["truncated_tokens"] > 0
    assert 'finops_shim_cap_reroutes_total{from_tier="small",to_tier="mid"} 1.0' in metrics
    assert 'finops_shim_cap_reroutes_total{from_tier="small",to_tier="large"} 1.0' in metrics
    if counter == "upstream":
        # the routed tier's count is not asked twice when it fits there; a request moved
        # up is counted again by the tier that takes it (its own tokenizer)
        # short, medium, long once each; pinned: its count and the recount after the cut
        assert fs["small"][0].tokenize_calls == 1 + 1 + 1 + 2
        assert (fs["mid"][0].tokenize_calls, fs["large"][0].tokenize_calls) == (1, 0)


def test_a_fallback_answer_is_not_cached_for_the_tier_asked_for(tmp_path, fakes):
    small, small_url = fakes("error500")
    _large, large_url = fakes()
    body = {**CHAT, "model": "small", "temperature": 0}
    with _serve(tmp_path, [f"small={small_url}", f"large={large_url}"]) as h:
        r = httpx.post(h.base_url + "/chat/completions", json=body)
        assert r.headers["x-finops-tier"] == "large"
        small.mode = "ok"
        calls = small.calls
        r = httpx.post(h.base_url + "/chat/completions", json=body)
        assert r.headers["x-finops-tier"] == "small" and r.headers["x-finops-cache"] == "miss"
        assert small.calls == calls + 1
        r = httpx.post(h.base_url + "/chat/completions", json=body)
        assert r.headers["x-finops-tier"] == "small" and r.headers["x-finops-cache"] == "hit"


def test_prompt_capture_is_redacted(tmp_path, fakes):
    _, url = fakes()
    with _serve(tmp_path, [f"small={url}"], log_prompts=True) as h:
        msg = "mail jane.doe@example.com or call +1 415-555-0100, card 4111111111111111"
        httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "messages": [{"role": "user", "content": msg}]},
        )
        (rec,) = _records(h.shim, 1)
    t = rec["prompt_text"]
    assert "[EMAIL]" in t and "[PHONE]" in t and "[NUMBER]" in t
    assert "example.com" not in t and "4111" not in t and "555" not in t


def test_embeddings_pass_through(tmp_path, fakes):
    _f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(h.base_url + "/embeddings", json={"model": "small", "input": ["a", "b"]})
        assert r.status_code == 200 and len(r.json()["data"]) == 2
        assert r.headers["x-finops-tier"] == "small"
        (rec,) = _records(h.shim, 1)
    assert rec["operation"] == "embeddings" and rec["input_tokens"] == 6
    assert rec["ttft_ms"] is None  # nothing is generated: no time to a first token


def test_slow_client_does_not_stall_others(tmp_path, fakes):
    _f, url = fakes(tokens=2000)
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**CHAT, "stream": True, "max_tokens": 2000}
        s = socket.create_connection(("127.0.0.1", h.port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        payload = orjson.dumps(body)
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: "
            + str(len(payload)).encode()
            + b"\r\n\r\n"
            + payload
        )
        s.recv(100)  # read a little, then stall
        t0 = time.monotonic()
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT, timeout=5)
        assert r.status_code == 200 and time.monotonic() - t0 < 2
        s.close()
        time.sleep(0.5)
        recs = _records(h.shim, 2)
    assert len(recs) == 2


def test_openai_client_sync_async_stream(tmp_path, fakes):
    import asyncio

    import openai

    _, url = fakes()
    with _serve(tmp_path, [f"small={url}", f"large={url}"]) as h:
        c = openai.OpenAI(base_url=h.base_url, api_key="unused", max_retries=0)
        out = c.chat.completions.create(
            model="auto", messages=[{"role": "user", "content": "hi"}], max_tokens=3
        )
        assert out.usage.completion_tokens == 3
        ids = [m.id for m in c.models.list()]
        assert ids[:3] == ["auto", "small", "large"]
        chunks = list(c.completions.create(model="large", prompt="hi", max_tokens=3, stream=True))
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == "t0 t1 t2 "

        async def go():
            ac = openai.AsyncOpenAI(base_url=h.base_url, api_key="unused", max_retries=0)
            stream = await ac.chat.completions.create(
                model="auto",
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=3,
                stream=True,
                stream_options={"include_usage": True},
            )
            last = None
            async for ch in stream:
                last = ch
            await ac.close()
            return last

        last = asyncio.run(go())
        assert last.usage.completion_tokens == 3
        with pytest.raises(openai.NotFoundError) as err:
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
        # the SDK reads the shim's own errors like OpenAI's: code and the field at fault
        assert (err.value.code, err.value.param) == ("model_not_found", "model")


def test_reload_refuses_bad_config_and_keeps_serving(tmp_path, fakes):
    _, url = fakes()
    conf = tmp_path / "shim.toml"
    conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\n[routing]\nalias = "auto"\n')
    from finops.shim.config import load_config

    cfg = dataclasses.replace(load_config(conf), log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        conf.write_text(f'[tiers.small]\nupstreams = ["{url}"]\n[routing]\nalias = "router"\n')
        ok, msg = h.shim.reload()
        assert (
            ok
            and httpx.post(
                h.base_url + "/chat/completions", json={**CHAT, "model": "router"}
            ).status_code
            == 200
        )
        conf.write_text("[tiers.small]\nupstreams = []\n")
        ok, msg = h.shim.reload()
        assert not ok and "upstreams" in msg
        assert (
            httpx.post(
                h.base_url + "/chat/completions", json={**CHAT, "model": "router"}
            ).status_code
            == 200
        )
        assert (
            'finops_shim_reloads_total{result="refused"} 1.0' in httpx.get(h.url + "/metrics").text
        )


def test_config_errors_name_file_and_key(tmp_path):
    from finops.shim.config import ConfigError, load_config

    p = tmp_path / "bad.toml"
    p.write_text('[tiers.small]\nupstreams = ["ftp://x"]\n')
    with pytest.raises(ConfigError, match=r"bad.toml: \[tiers.small\] upstreams: expected an http"):
        load_config(p)
    with pytest.raises(ConfigError, match=r"max_input_tokens: expected a positive integer"):
        parse_config(
            {
                "tiers": {"s": {"upstreams": ["http://a"]}},
                "caps": {"rule": [{"max_input_tokens": 0}]},
            }
        )
    with pytest.raises(ConfigError, match="sha256"):
        parse_config(
            {
                "tiers": {"s": {"upstreams": ["http://a"]}},
                "auth": {"keys": [{"sha256": "plainkey", "tenant": "t"}]},
            }
        )
    with pytest.raises(ConfigError, match="unknown sections"):
        parse_config({"tiers": {"s": {"upstreams": ["http://a"]}}, "cahce": {}})


def test_concurrent_load_logs_every_request(tmp_path, fakes):
    _, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        with httpx.Client() as c, cf.ThreadPoolExecutor(16) as ex:
            codes = list(
                ex.map(
                    lambda i: (
                        c.post(
                            h.base_url + "/chat/completions", json={**CHAT, "stream": i % 2 == 0}
                        ).status_code
                    ),
                    range(200),
                )
            )
        assert codes.count(200) == 200
        recs = _records(h.shim, 200)
    assert len(recs) == 200 and len({r["request_id"] for r in recs}) == 200
    assert threading.active_count() < 200


def test_upstream_silent_mid_stream_times_out_cleanly(tmp_path, fakes):
    """A stream whose upstream stops sending for longer than read_timeout_s ends with
    a clean SSE error; the upstream request is dropped."""
    f, url = fakes("slow", tokens=5, delay_s=1.5)
    with _serve(tmp_path, [f"small={url}"], read_timeout_s=0.3) as h:
        t0 = time.monotonic()
        r = httpx.post(
            h.base_url + "/chat/completions",
            json={**CHAT, "stream": True, "max_tokens": 5},
            timeout=10,
        )
        assert time.monotonic() - t0 < 1.4, "gave up after 0.3 s, not at the next token"
        events = [e for e in r.content.split(b"\n\n") if e]
        assert events[-1] == b"data: [DONE]"
        err = orjson.loads(events[-2][6:])["error"]
        assert err["code"] == "upstream_stream_error" and "0.3 s mid-stream" in err["message"]
        recs = _records(h.shim, 1)
        deadline = time.monotonic() + 5
        while f.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f.disconnects == 1 and f.completed == 0
    assert recs[0]["status_code"] == 502 and recs[0]["output_tokens"] == 1


def test_whole_responses_carry_their_length(tmp_path, fakes):
    """A non-streaming answer is sent with Content-Length, not chunked framing."""
    _f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
    assert r.status_code == 200 and "transfer-encoding" not in r.headers
    assert int(r.headers["content-length"]) == len(r.content)


def _slow_upload(port: int, body: bytes, pause: float) -> bytes:
    """POST whose headers come first and body `pause` seconds later; the raw response."""
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {len(body)}\r\n\r\n".encode()
        )
        time.sleep(pause)
        with contextlib.suppress(OSError):  # a 408 may have closed the connection
            s.sendall(body)
        s.settimeout(10)
        out = b""
        while b"\r\n\r\n" not in out:
            chunk = s.recv(65536)
            if not chunk:
                break
            out += chunk
        return out


def test_a_slow_upload_is_not_the_shims_overhead(tmp_path, fakes):
    """The added-latency figure is the shim's own cost: a client that takes 0.6 s to send
    its body (or never does: 408) must not show up as 600 ms of shim overhead."""
    _, url = fakes()
    with _serve(tmp_path, [f"small={url}"], body_timeout_s=0.8) as h:
        body = orjson.dumps(CHAT)
        slow = _slow_upload(h.port, body, 0.6)
        assert slow.startswith(b"HTTP/1.1 200"), slow[:200]
        never = _slow_upload(h.port, body, 1.5)
        assert never.startswith(b"HTTP/1.1 408"), never[:200]
        for raw in (slow, never):
            head = dict(
                line.split(b": ", 1) for line in raw.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]
            )
            assert float(head[b"x-finops-overhead-ms"]) < 300, head
        m = httpx.get(h.url + "/metrics").text
        total = sum(
            float(line.split()[-1])
            for line in m.splitlines()
            if line.startswith("finops_shim_added_latency_seconds_sum")
        )
        assert total < 0.3, total
        recs = _records(h.shim, 2)
        assert sorted(r["status_code"] for r in recs) == [200, 408]


def test_embeddings_never_fall_back_to_another_tiers_model(tmp_path, fakes):
    """Another tier serves another embedding model: its vectors live in another space,
    often of another length, and written to an index they corrupt it silently. A failed
    tier's embeddings were answered 200 by the next tier's model; only the tier's own
    replicas may answer now."""
    _bad, bad_url = fakes("error500")
    good, good_url = fakes()
    _ok, ok_url = fakes()
    ups = [f"small={bad_url}", f"small={ok_url}", f"large={good_url}"]
    body = {"model": "small", "input": "hello"}
    with _serve(tmp_path, ups, breaker_failures=100) as h:
        out = [httpx.post(h.base_url + "/embeddings", json=body) for _ in range(4)]
    assert [r.status_code for r in out] == [200] * 4  # the tier's other replica answers
    assert all(r.headers["x-finops-tier"] == "small" for r in out)
    with _serve(tmp_path / "alone", [f"small={bad_url}", f"large={good_url}"]) as h:
        r = httpx.post(h.base_url + "/embeddings", json=body)
    assert r.status_code == 500 and good.calls == 0


def test_embeddings_refused_before_forwarding_have_no_cache_status(tmp_path, fakes):
    """Counted like chat: the cache counter and cache_status are the cache step's, which a
    request refused before it (401, unknown model) never reaches."""
    _, url = fakes()
    cfg = dataclasses.replace(
        from_flags([f"small={url}"], log_dir=tmp_path / "log", api_keys=["sk-a=acme"])
    )
    with serve_in_thread(cfg) as h:
        emb = {"model": "small", "input": "hi"}
        assert httpx.post(h.base_url + "/embeddings", json=emb).status_code == 401
        auth = {"authorization": "Bearer sk-a"}
        nope = {**emb, "model": "nope"}
        assert httpx.post(h.base_url + "/embeddings", json=nope, headers=auth).status_code == 404
        assert httpx.post(h.base_url + "/embeddings", json=emb, headers=auth).status_code == 200
        m = httpx.get(h.url + "/metrics").text
        bypass = [
            line
            for line in m.splitlines()
            if line.startswith('finops_shim_cache_total{result="bypass"')
        ]
        assert [float(line.split()[-1]) for line in bypass] == [1.0], bypass
        recs = _records(h.shim, 3)
        assert sorted((r["status_code"], r["cache_status"]) for r in recs) == [
            (200, "bypass"),
            (401, None),
            (404, None),
        ]


def test_a_clients_request_id_reaches_vllm(tmp_path, fakes):
    """vLLM names its response after X-Request-Id; through the shim it must see it too."""
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        httpx.post(h.base_url + "/chat/completions", json=CHAT, headers={"x-request-id": "t-1"})
        httpx.post(
            h.base_url + "/embeddings",
            json={"model": "small", "input": "x"},
            headers={"x-request-id": "t-2"},
        )
        httpx.post(h.base_url + "/chat/completions", json={**CHAT, "max_tokens": 5})
    assert [hd.get("x-request-id") for hd in f.headers] == [
        "t-1",
        "t-2",
        None,
    ]


def test_an_idempotent_replay_makes_no_routing_decision(tmp_path, fakes):
    """A replay re-ran the router (a fresh random draw with exploration on): its record
    said routed_tier=small beside tier=large, as if a fallback had served it."""
    _, url = fakes()
    ups = [f"small={url}", f"mid={url}", f"large={url}"]
    with _serve(tmp_path, ups, exploration_rate=0.9, exploration_seed=1) as h:
        hd = {"idempotency-key": "job-1"}
        body = {**CHAT, "temperature": 0.9}
        first = httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)
        tier = first.headers["x-finops-tier"]
        for _ in range(5):
            r = httpx.post(h.base_url + "/chat/completions", json=body, headers=hd)
            assert r.headers["x-finops-cache"] == "hit" and r.headers["x-finops-tier"] == tier
        decisions = sum(
            float(line.split()[-1])
            for line in httpx.get(h.url + "/metrics").text.splitlines()
            if line.startswith("finops_shim_router_decisions_total{")
        )
        recs = _records(h.shim, 6)
    assert decisions == 1
    assert recs[0]["routed_tier"] == tier and recs[0]["route_propensity"] is not None
    for rec in recs[1:]:
        assert rec["tier"] == tier and rec["retry_of"] == recs[0]["request_id"]
        assert rec["routed_tier"] is rec["route_propensity"] is rec["router_version"] is None


def test_all_circuits_open_says_when_to_retry(tmp_path, fakes):
    _bad, bad_url = fakes("error500")
    with _serve(tmp_path, [f"small={bad_url}"], breaker_failures=2, breaker_cooldown_s=30) as h:
        codes = [
            httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code for _ in range(3)
        ]
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT)
    assert codes == [500, 500, 503] and r.status_code == 503
    assert r.json()["error"]["code"] == "upstream_unavailable"
    assert 25 <= int(r.headers["retry-after"]) <= 30


def test_a_refused_request_keeps_its_feature(tmp_path, fakes):
    _, url = fakes()
    cfg = from_flags([f"small={url}"], log_dir=tmp_path / "log", api_keys=["sk-a=acme"])
    with serve_in_thread(dataclasses.replace(cfg, max_body_bytes=1000)) as h:
        hd = {"x-feature": "search"}
        assert (
            httpx.post(h.base_url + "/chat/completions", json=CHAT, headers=hd).status_code == 401
        )
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 2000}]}
        hd["authorization"] = "Bearer sk-a"
        assert httpx.post(h.base_url + "/chat/completions", json=big, headers=hd).status_code == 413
        recs = _records(h.shim, 2)
    assert [r["feature"] for r in recs] == ["search", "search"]


@pytest.mark.parametrize("operation", ["chat", "completions"])
def test_a_stream_keeps_vllms_fingerprint_when_the_usage_chunk_is_dropped(
    tmp_path, fakes, operation
):
    """vLLM sends system_fingerprint on a stream's last chunk. The shim asks for the usage
    chunk, which then is the last one, and drops it for a client that did not ask: the
    fingerprint moves to the finish chunk, where vLLM would have put it."""
    from finops.shim.fakeupstream import FINGERPRINT

    _, url = fakes(tokens=3)
    if operation == "chat":
        body = {**CHAT, "stream": True, "max_tokens": 3}
    else:
        body = {"model": "auto", "prompt": "hi", "stream": True, "max_tokens": 3}
    with _serve(tmp_path, [f"small={url}"]) as h:
        for include_usage in (False, True):
            req = {**body, "stream_options": {"include_usage": True}} if include_usage else body
            r = httpx.post(
                f"{h.base_url}/{operation.replace('chat', 'chat/completions')}", json=req
            )
            events = [
                orjson.loads(e[6:]) for e in r.content.split(b"\n\n") if e.startswith(b"data: {")
            ]
            last = events[-1]
            assert last["system_fingerprint"] == FINGERPRINT, events
            if include_usage:
                assert last["choices"] == [] and last["usage"]["completion_tokens"] == 3
            else:
                assert last["choices"][0]["finish_reason"] == "length" and "usage" not in last
            assert sum("system_fingerprint" in e for e in events) == 1
            assert r.content.endswith(b"data: [DONE]\n\n")


class _TwoChoiceStream:
    """An upstream streaming two choices as vLLM does when asked for the usage chunk:
    choice 0 finishes first, choice 1 goes on, and system_fingerprint is on the usage
    chunk only (without it, vLLM puts it on each choice's finish chunk)."""

    def __init__(self) -> None:
        self.bodies: list[dict] = []

    async def __call__(self, scope: dict, receive, send) -> None:
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        if scope["type"] != "http" or not body:
            # the shim's health probe (GET, no body) is not a completion request
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        self.bodies.append(orjson.loads(body))
        base = {"id": "chatcmpl-2", "object": "chat.completion.chunk", "created": 1, "model": "m"}

        def ev(choices: list, **extra) -> bytes:
            return b"data: " + orjson.dumps({**base, "choices": choices, **extra}) + b"\n\n"

        def ch(i: int, text: str, finish: str | None = None) -> dict:
            return {"index": i, "delta": {"content": text}, "finish_reason": finish}

        usage = {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
        events = [
            ev([ch(0, "a")]),
            ev([ch(1, "b")]),
            ev([ch(0, "c", "stop")]),
            ev([ch(1, "d")]),
            ev([ch(1, "e", "length")]),
            ev([], usage=usage, system_fingerprint="vllm-fp"),
            b"data: [DONE]\n\n",
        ]
        headers = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for e in events:
            await send({"type": "http.response.body", "body": e, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def test_every_choices_finish_chunk_gets_the_fingerprint_of_the_dropped_usage_chunk(tmp_path):
    """With n > 1, each choice's finish chunk carries system_fingerprint when vLLM streams
    without the usage chunk; the shim asks for that chunk and drops it, so every finish
    chunk must take its fingerprint, not only the last one."""
    up = run_app_in_thread(_TwoChoiceStream())
    try:
        with _serve(tmp_path, [f"small={up.url}"]) as h:
            body = {**CHAT, "stream": True, "n": 2}
            r = httpx.post(h.base_url + "/chat/completions", json=body)
            recs = _records(h.shim, 1)
    finally:
        up.stop(2)
    assert r.status_code == 200 and r.content.endswith(b"data: [DONE]\n\n")
    objs = [orjson.loads(e[6:]) for e in r.content.split(b"\n\n") if e.startswith(b"data: {")]
    assert all(o["choices"] for o in objs), "the usage chunk is dropped"
    finish = {o["choices"][0]["index"]: o for o in objs if o["choices"][0].get("finish_reason")}
    assert sorted(finish) == [0, 1]
    assert [finish[i].get("system_fingerprint") for i in (0, 1)] == ["vllm-fp", "vllm-fp"]
    # every chunk reached the client, each choice's text in order
    text = {
        i: "".join(
            o["choices"][0]["delta"]["content"] for o in objs if o["choices"][0]["index"] == i
        )
        for i in (0, 1)
    }
    assert text == {0: "ac", 1: "bde"}
    # the record logs choice 0's finish reason, as the non-streamed record does
    assert recs[0]["output_tokens"] == 5 and recs[0]["finish_reason"] == "stop"


def test_a_finish_chunk_held_for_the_usage_chunk_is_sent_when_the_upstream_dies(tmp_path, fakes):
    """The finish chunk waits for the usage chunk (whose fingerprint it takes); an upstream
    gone in between must not take the finish chunk with it."""
    _, url = fakes("die_mid_stream", tokens=3, die_after=3)
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "stream": True})
    events = [e for e in r.content.split(b"\n\n") if e]
    parsed = [orjson.loads(e[6:]) for e in events[:-1]]
    finish = [p for p in parsed if p.get("choices") and p["choices"][0].get("finish_reason")]
    assert [p["choices"][0]["finish_reason"] for p in finish] == ["length"]
    assert parsed.index(finish[0]) == len(parsed) - 2, "before the error event"
    assert parsed[-1]["error"]["code"] == "upstream_stream_error"
    assert events[-1] == b"data: [DONE]"


def test_a_replica_failing_its_health_check_comes_last_in_its_tier(tmp_path, fakes):
    """A frozen replica (its kernel still accepts connections, nothing answers) kept its
    turns after /health timed out: every other request waited for the first-byte timeout
    until five of them opened its circuit. It now comes after the replicas that passed."""
    good, good_url = fakes()
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)  # never accepted: connects succeed, no byte ever comes back
    frozen_url = f"http://127.0.0.1:{frozen.getsockname()[1]}"
    try:
        with _serve(
            tmp_path,
            [f"small={frozen_url}", f"small={good_url}"],
            health_interval_s=0.2,
            connect_timeout_s=0.3,
            first_byte_timeout_s=30,
            response_timeout_s=30,
        ) as h:
            deadline = time.monotonic() + 10
            seen: dict = {}
            while time.monotonic() < deadline:
                seen = {u.url: u.reachable for u in h.shim.pool.all()}
                if seen == {frozen_url: False, good_url: True}:
                    break
                time.sleep(0.1)
            else:
                pytest.fail(f"the frozen replica was never found unreachable: {seen}")
            for _ in range(6):
                body = {**CHAT, "stream": _ % 2 == 1}
                r = httpx.post(h.base_url + "/chat/completions", json=body, timeout=5)
                assert r.status_code == 200, r.text
            recs = _records(h.shim, 6)
    finally:
        frozen.close()
    assert good.calls == 6
    assert {r["upstream"] for r in recs} == {good_url}


class _TwoChoices:
    """An upstream answering n=2: choice 0 ends `stop`, choice 1 (finishing last) `length`."""

    async def __call__(self, scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        body = b""
        while True:
            m = await receive()
            body += m.get("body", b"")
            if not m.get("more_body"):
                break
        req = orjson.loads(body) if body else {}
        usage = {"prompt_tokens": 5, "completion_tokens": 4, "total_tokens": 9}
        base = {"id": "x", "created": 1, "model": req.get("model")}
        ends = [("stop", "a"), ("length", "b")]
        if not req.get("stream"):
            choices = [
                {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": f}
                for i, (f, t) in enumerate(ends)
            ]
            out = {**base, "object": "chat.completion", "choices": choices, "usage": usage}
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": orjson.dumps(out)})
            return
        sse = [(b"content-type", b"text/event-stream")]
        await send({"type": "http.response.start", "status": 200, "headers": sse})
        events = [
            {"index": i, "delta": {"role": "assistant", "content": t}, "finish_reason": None}
            for i, (_, t) in enumerate(ends)
        ] + [{"index": i, "delta": {}, "finish_reason": f} for i, (f, _) in enumerate(ends)]
        chunks = [{**base, "object": "chat.completion.chunk", "choices": [c]} for c in events]
        if (req.get("stream_options") or {}).get("include_usage"):
            chunks.append(
                {**base, "object": "chat.completion.chunk", "choices": [], "usage": usage}
            )
        for c in chunks:
            ev = b"data: " + orjson.dumps(c) + b"\n\n"
            await send({"type": "http.response.body", "body": ev, "more_body": True})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})


def test_n_choices_log_choice_zeros_finish_reason_streamed_or_not(tmp_path):
    """With n > 1 a stream's record took the finish reason of whichever choice finished
    last, a full answer's that of choice 0: the same answer was logged `stop` unstreamed
    and `length` streamed. Both now log choice 0's."""
    up = run_app_in_thread(_TwoChoices())
    try:
        with _serve(tmp_path, [f"small={up.url}"]) as h:
            for stream in (False, True):
                body = {**CHAT, "n": 2, "stream": stream}
                r = httpx.post(h.base_url + "/chat/completions", json=body, timeout=10)
                assert r.status_code == 200, r.text
            recs = _records(h.shim, 2)
    finally:
        up.stop(2)
    assert [(r["stream"], r["finish_reason"]) for r in recs] == [(False, "stop"), (True, "stop")]
