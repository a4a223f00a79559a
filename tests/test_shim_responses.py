"""/v1/responses (OpenAI's Responses API) through the shim.

Against loopback fake upstreams (`finops.shim.fakeupstream`, answering /v1/responses
in vLLM's shape) for failures, routing and the record; and, marked `vllm`/`slow` like
tests/test_shim_vllm.py, the official openai client's `responses.create` against the
shim in front of a real vLLM server, compared with calling vLLM directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from finops.lake import Lake
from finops.shim import from_flags, serve_in_thread
from finops.shim.config import CapRule, hash_key
from finops.shim.testing import wait_for_records as _records

BODY = {"model": "small", "input": "hello there", "max_output_tokens": 4}


def _serve(tmp_path: Path, upstreams: list[str], **changes):
    cfg = from_flags(upstreams, log_dir=tmp_path / "log")
    cfg = dataclasses.replace(cfg, **changes)
    return serve_in_thread(cfg)


def _events(content: bytes) -> list[tuple[str | None, dict]]:
    """(event name, data) of each SSE event in a Responses stream."""
    out = []
    for raw in content.split(b"\n\n"):
        if not raw.strip():
            continue
        name = None
        data = None
        for line in raw.split(b"\n"):
            if line.startswith(b"event:"):
                name = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = orjson.loads(line[5:].strip())
        out.append((name, data))
    return out


def test_non_stream_answer_usage_and_record(tmp_path, fakes):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}", f"large={url}"]) as h:
        r = httpx.post(
            h.base_url + "/responses",
            json=BODY,
            headers={"X-Feature": "agent", "X-Request-Id": "c1"},
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-finops-tier"] == "small" and r.headers["x-finops-cache"] == "bypass"
        obj = r.json()
        assert obj["object"] == "response" and obj["output"][0]["content"][0]["text"]
        sent = f.bodies[-1]
        assert sent["model"] == "small" and "stream_options" not in sent
        assert sent["input"] == "hello there"
        assert f.headers[-1]["x-request-id"] == "c1"
        recs = _records(h.shim, 1)
    (rec,) = recs
    assert rec["operation"] == "responses" and rec["status_code"] == 200
    assert rec["tier"] == "small" and rec["upstream"] == url and rec["stream"] is False
    assert rec["feature"] == "agent" and rec["cache_status"] == "bypass"
    assert rec["input_tokens"] == obj["usage"]["input_tokens"] > 0
    assert rec["output_tokens"] == obj["usage"]["output_tokens"] == 4
    assert rec["cached_input_tokens"] == 2  # usage.input_tokens_details.cached_tokens
    assert rec["ttft_ms"] > 0 and rec["latency_ms"] >= rec["ttft_ms"]
    assert rec["finish_reason"] == "completed" and rec["response_model"] == "small"
    assert rec["router_version"] is None and rec["turn_count"] == 1
    res = Lake(tmp_path / "lake").append("requests", recs, source="shim")
    assert (res.loaded, res.rejected) == (1, 0)


def test_stream_is_forwarded_verbatim_and_ends_at_its_terminal_event(tmp_path, fakes, caplog):
    """A Responses stream has no [DONE]: the shim passes the events on as sent (event:
    lines included), injects nothing upstream, takes the usage from response.completed and
    ends the client's response there, without waiting for the upstream's body end."""
    f, url = fakes(linger_s=0.8)
    caplog.set_level(logging.INFO, logger="finops.shim")
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**BODY, "stream": True}
        direct = httpx.post(url + "/v1/responses", json=body).content
        t0 = time.perf_counter()
        r = httpx.post(h.base_url + "/responses", json=body, timeout=10)
        took = time.perf_counter() - t0
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert took < 0.6, f"the client waited {took:.2f} s for the upstream's end"
        assert b"[DONE]" not in r.content
        assert "stream_options" not in f.bodies[-1]

        def strip_time(b: bytes) -> bytes:  # created_at differs between the two calls
            return b"".join(
                (ln.split(b'"created_at":')[0] + ln.split(b'"created_at":')[1].split(b",", 1)[1])
                if b'"created_at":' in ln
                else ln
                for ln in b.splitlines(keepends=True)
            )

        assert strip_time(r.content) == strip_time(direct)  # byte for byte, as vLLM sent it
        evs = _events(r.content)
        assert all(name == data["type"] for name, data in evs)
        assert evs[-1][0] == "response.completed"
        usage = evs[-1][1]["response"]["usage"]
        (rec,) = _records(h.shim, 2)[-1:]  # the direct call made no record
    assert rec["operation"] == "responses" and rec["stream"] is True
    assert rec["status_code"] == 200 and rec["error_type"] is None
    assert rec["input_tokens"] == usage["input_tokens"] and rec["output_tokens"] == 4
    assert rec["cached_input_tokens"] == 2 and rec["ttft_ms"] > 0
    assert "without" not in caplog.text  # never "ended the stream without [DONE]"


def test_auto_is_routed_on_instructions_and_input(tmp_path, fakes):
    """The rules router sees the text of `instructions` and of `input` items' content
    parts: code in an input_text part takes the request to mid (code_min_tier), a plain
    greeting stays on small; tools go to mid too. The records carry the routing fields."""
    f, url = fakes()
    ups = [f"small={url}", f"mid={url}", f"large={url}"]
    with _serve(tmp_path, ups) as h:
        plain = {"model": "auto", "instructions": "Be brief.", "input": "hello"}
        code = {
            "model": "auto",
            "input": [
                {"role": "user", "content": [{"type": "input_text", "text": "fix: def f(x): ..."}]},
                {"type": "message", "role": "assistant", "content": "ok"},
                {"role": "user", "content": "and now?"},
            ],
        }
        tools = {
            "model": "auto",
            "input": "weather?",
            "tools": [{"type": "function", "name": "get_weather", "parameters": {}}],
        }
        tiers = []
        for b in (plain, code, tools):
            r = httpx.post(h.base_url + "/responses", json=b)
            assert r.status_code == 200, r.text
            tiers.append(r.headers["x-finops-tier"])
        assert tiers == ["small", "mid", "mid"]
        assert [b["model"] for b in f.bodies] == ["small", "mid", "mid"]
        recs = _records(h.shim, 3)
    for rec, tier in zip(recs, tiers, strict=True):
        assert rec["router_version"] == "rules-v1" and rec["route_propensity"] == 1.0
        assert rec["routed_tier"] == tier == rec["tier"] and rec["router_score"] is not None
        assert rec["request_model"] == "auto" and rec["prompt_tokens_est"] > 0
    assert [r["turn_count"] for r in recs] == [1, 2, 1]
    assert [r["has_tools"] for r in recs] == [False, False, True]


def test_stream_falls_back_before_the_first_byte(tmp_path, fakes):
    bad, bad_url = fakes("error500")
    good, good_url = fakes()
    # the 500 replica is tried first (equally loaded replicas take turns from the first)
    with _serve(tmp_path, [f"small={bad_url}", f"small={good_url}"]) as h:
        r = httpx.post(h.base_url + "/responses", json={**BODY, "stream": True}, timeout=10)
        assert r.status_code == 200
        evs = _events(r.content)
        assert evs[-1][0] == "response.completed" and all(n != "error" for n, _ in evs)
        assert bad.calls == 1 and good.calls == 1
        (rec,) = _records(h.shim, 1)
    assert rec["upstream"] == good_url and rec["status_code"] == 200
    assert rec["upstream_attempts"] == 2 and rec["fallback_reason"] == "http_5xx"
    assert rec["output_tokens"] == 4


def test_client_disconnect_mid_stream_cancels_the_upstream(tmp_path, fakes):
    f, url = fakes("slow", tokens=200, delay_s=0.02)
    with _serve(tmp_path, [f"small={url}"]) as h:
        with httpx.stream(
            "POST",
            h.base_url + "/responses",
            json={**BODY, "stream": True, "max_output_tokens": 200},
        ) as r:
            deltas = 0
            for line in r.iter_lines():
                if line == "event: response.output_text.delta":
                    deltas += 1
                    if deltas >= 3:
                        break
        deadline = time.monotonic() + 5
        while f.disconnects == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f.disconnects == 1, "the upstream request must be cancelled"
        assert f.completed == 0
        (rec,) = _records(h.shim, 1)
    assert rec["status_code"] == 499 and rec["error_type"] == "client_disconnected"
    assert 3 <= rec["output_tokens"] < 200  # the deltas streamed so far
    assert rec["input_tokens"] > 0  # vLLM gave no usage: the estimate


@pytest.mark.parametrize("mode", ["die_mid_stream", "error_mid_stream"])
def test_a_stream_failing_partway_ends_with_a_responses_error_event(tmp_path, fakes, mode):
    """The upstream dies after 2 deltas: the client's stream ends with the shim's `error`
    event (the Responses shape, no [DONE]); an `error` event the upstream sent itself is
    passed on as sent, with no second one from the shim. Both are logged as 502s."""
    _f, url = fakes(mode, die_after=2)
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.post(h.base_url + "/responses", json={**BODY, "stream": True}, timeout=10)
        assert r.status_code == 200  # the stream had begun
        assert b"[DONE]" not in r.content
        evs = _events(r.content)
        name, err = evs[-1]
        assert name == "error" and err["type"] == "error"
        assert sum(n == "error" for n, _ in evs) == 1
        assert err["sequence_number"] == evs[-2][1]["sequence_number"] + 1
        if mode == "die_mid_stream":
            assert err["code"] == "upstream_stream_error"
            assert "incomplete" in err["message"]
        else:
            assert err["message"] == "injected failure"  # vLLM's own, as sent
        assert [n for n, _ in evs].count("response.output_text.delta") == 2
        (rec,) = _records(h.shim, 1)
    assert (rec["status_code"], rec["error_type"]) == (502, "upstream_stream_error")
    assert rec["output_tokens"] == 2 and rec["input_tokens"] > 0


def test_refusals_unknown_model_auth_and_method(tmp_path, fakes):
    f, url = fakes()
    cfg = from_flags([f"small={url}"], api_keys=["sekret=acme"], log_dir=tmp_path / "log")
    auth = {"authorization": "Bearer sekret"}
    with serve_in_thread(cfg) as h:
        r = httpx.post(h.base_url + "/responses", json=BODY)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(h.base_url + "/responses", json=BODY, headers={"authorization": "Bearer x"})
        assert r.status_code == 401
        r = httpx.post(h.base_url + "/responses", json={**BODY, "model": "gpt-9"}, headers=auth)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"
        assert r.json()["error"]["param"] == "model"
        r = httpx.post(h.base_url + "/responses", json={**BODY, "stream": "yes"}, headers=auth)
        assert r.status_code == 400 and r.json()["error"]["param"] == "stream"
        r = httpx.get(h.base_url + "/responses", headers=auth)
        assert r.status_code == 405 and r.headers["allow"] == "POST"
        r = httpx.post(h.base_url + "/responses", json=BODY, headers=auth)
        assert r.status_code == 200
        recs = _records(h.shim, 6)
    assert f.calls == 1
    assert [r["status_code"] for r in recs] == [401, 401, 404, 400, 405, 200]
    assert all(r["operation"] == "responses" for r in recs)
    assert recs[2]["tenant"] == "acme" and recs[2]["error_type"] == "model_not_found"
    assert recs[5]["tenant"] == "acme"
    assert cfg.api_keys == {hash_key("sekret"): "acme"}


def test_explicit_policy_applies(tmp_path, fakes):
    _f, url = fakes()
    with _serve(tmp_path, [f"small={url}", f"large={url}"], explicit="deny") as h:
        r = httpx.post(h.base_url + "/responses", json={**BODY, "model": "large"})
        assert r.status_code == 403, r.text
        r = httpx.post(h.base_url + "/responses", json={**BODY, "model": "auto"})
        assert r.status_code == 200
        recs = _records(h.shim, 2)
    assert [r["status_code"] for r in recs] == [403, 200]


# --------------------------------------------------------------------------- real vLLM

MSG = "Say something about GPUs."


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_responses_create_against_vllm(tmp_path, vllm_server):
    """The official client's responses.create, sync and streaming, through the shim in
    front of real vLLM: the same text and usage as vLLM answers directly (greedy), and
    the records carry that usage."""
    url = vllm_server.root_url
    cfg = from_flags([f"small={url}", f"mid={url}", f"large={url}"], log_dir=tmp_path / "log")
    kw = {
        "input": [{"role": "user", "content": [{"type": "input_text", "text": MSG}]}],
        "instructions": "Be brief.",
        "max_output_tokens": 6,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},  # the tiny random model may sample EOS
    }
    direct_c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    direct = direct_c.responses.create(model="small", **kw)
    with serve_in_thread(cfg) as h:
        c = openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0)
        raw = c.responses.with_raw_response.create(model="auto", **kw)
        assert raw.headers["x-finops-tier"] == "small"
        r = raw.parse()
        assert r.output_text and r.output_text == direct.output_text
        assert r.usage.input_tokens == direct.usage.input_tokens
        assert r.usage.output_tokens == direct.usage.output_tokens == 6
        events = list(c.responses.create(model="large", stream=True, **kw))
        streamed = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert events[-1].type == "response.completed"
        assert streamed == direct.output_text
        su = events[-1].response.usage
        recs = _records(h.shim, 2)
    sync_rec, stream_rec = recs
    assert sync_rec["operation"] == stream_rec["operation"] == "responses"
    assert sync_rec["status_code"] == stream_rec["status_code"] == 200
    assert sync_rec["router_version"] == "rules-v1" and sync_rec["tier"] == "small"
    assert (sync_rec["input_tokens"], sync_rec["output_tokens"]) == (
        r.usage.input_tokens,
        r.usage.output_tokens,
    )
    assert sync_rec["cached_input_tokens"] == r.usage.input_tokens_details.cached_tokens
    assert stream_rec["tier"] == "large" and stream_rec["stream"] is True
    assert (stream_rec["input_tokens"], stream_rec["output_tokens"]) == (
        su.input_tokens,
        su.output_tokens,
    )
    assert stream_rec["ttft_ms"] > 0 and stream_rec["finish_reason"] == "max_output_tokens"
    assert stream_rec["error_type"] is None


def test_context_caps_apply_to_responses_requests(tmp_path, fakes):
    """A tenant capped on chat cannot send the same context through /v1/responses (was:
    caps were skipped there). `reject`: a 400 naming `input`, no upstream call;
    `truncate`: the oldest turns' items go (a tool call with its output), never the
    instructions or the last turn."""
    f, url = fakes()
    caps = (CapRule(80, "truncate", tier="small"), CapRule(50, "reject", feature="strict"))
    items: list = []
    for i in range(5):
        items += [
            {"role": "user", "content": f"question {i} " + "word " * 20},
            {"type": "function_call", "call_id": f"c{i}", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": f"c{i}", "output": "result " * 10},
            {"role": "assistant", "content": [{"type": "output_text", "text": "ok " * 10}]},
        ]
    items.append({"role": "user", "content": "last question"})
    body = {**BODY, "instructions": "be brief", "input": items}
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        r = httpx.post(h.base_url + "/responses", json=body, headers={"x-feature": "strict"})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "context_length_exceeded" and err["param"] == "input"
        assert "cap of 50" in err["message"]
        assert f.calls == 0
        r = httpx.post(h.base_url + "/responses", json=body)
        assert r.status_code == 200, r.text
        sent = f.bodies[-1]
        assert sent["instructions"] == "be brief"
        assert sent["input"][-1] == {"role": "user", "content": "last question"}
        assert len(sent["input"]) < len(items)
        # whole turns went: every call that is left has its output
        calls = {it["call_id"] for it in sent["input"] if it.get("type") == "function_call"}
        outs = {it["call_id"] for it in sent["input"] if it.get("type") == "function_call_output"}
        assert calls == outs
        assert sent["input"] == items[len(items) - len(sent["input"]) :]
        recs = _records(h.shim, 2)
    assert recs[0]["status_code"] == 400 and recs[0]["error_type"] == "context_length_exceeded"
    assert recs[1]["truncated_tokens"] > 0


def test_images_and_files_in_responses_input_count_against_a_cap(tmp_path, fakes):
    """A cap counts a Responses request's images and files as it counts a chat request's
    (765 tokens a part): counted as text alone, 20 images or a 4 kB file passed a
    100-token cap that one image sent through chat does not."""
    from finops.shim.caps import MEDIA_PART, estimate_body_tokens
    from finops.shim.responses import as_chat_body

    f, url = fakes()
    image = {"type": "input_image", "image_url": "data:image/png;base64,AAAA", "detail": "low"}
    pdf = {"type": "input_file", "filename": "a.pdf", "file_data": "data:application/pdf;AA"}
    text = {"type": "input_text", "text": "what is this?"}
    images = {**BODY, "input": [{"role": "user", "content": [text] + [image] * 20}]}
    a_file = {**BODY, "input": [{"role": "user", "content": [text, pdf]}]}
    chat = as_chat_body(images)
    assert chat["messages"][0]["content"][:2] == [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA", "detail": "low"}},
    ]
    assert estimate_body_tokens(chat) > 20 * MEDIA_PART
    # text alone keeps its plain shape (the router's and the fingerprint's view)
    assert as_chat_body({"input": [{"role": "user", "content": [text]}]})["messages"] == [
        {"role": "user", "content": "what is this?"}
    ]
    with _serve(tmp_path, [f"small={url}"], caps=(CapRule(100, "reject"),)) as h:
        out = [httpx.post(h.base_url + "/responses", json=b) for b in (images, a_file)]
        ok = httpx.post(
            h.base_url + "/responses", json={**BODY, "input": [{"role": "user", "content": [text]}]}
        )
    assert [r.status_code for r in out] == [400, 400]
    assert all(r.json()["error"]["code"] == "context_length_exceeded" for r in out)
    assert ok.status_code == 200 and f.calls == 1


def test_a_routed_responses_request_over_its_tiers_cap_goes_up_a_tier(tmp_path, fakes):
    small, small_url = fakes()
    mid, mid_url = fakes()
    items = [{"role": "user", "content": "w " * 40}] * 3 + [{"role": "user", "content": "last"}]
    body = {**BODY, "model": "auto", "input": items}
    caps = (CapRule(60, "truncate", tier="small"),)
    with _serve(tmp_path, [f"small={small_url}", f"mid={mid_url}"], caps=caps) as h:
        r = httpx.post(h.base_url + "/responses", json=body)
        (rec,) = _records(h.shim, 1)
    assert r.status_code == 200 and r.headers["x-finops-tier"] == "mid"
    assert small.calls == 0 and mid.bodies[-1]["input"] == items  # whole, not cut on small
    assert rec["routed_tier"] == "small" and rec["fallback_reason"] == "context_cap"


def _sse_events(content: bytes) -> list[dict]:
    return [d for _name, d in _events(content) if d is not None]


def test_deterministic_responses_are_cached_and_replayed_both_ways(tmp_path, fakes):
    """temperature 0: one upstream call for a plain, a streamed and a plain request (was:
    three); the streamed hit is the typed events vLLM would send, ending with the cached
    answer; the hits are logged as hits with no tokens and the same finish."""
    f, url = fakes()
    body = {**BODY, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        r1 = httpx.post(h.base_url + "/responses", json=body)
        r2 = httpx.post(h.base_url + "/responses", json={**body, "stream": True})
        r3 = httpx.post(h.base_url + "/responses", json=body)
        assert [r.headers["x-finops-cache"] for r in (r1, r2, r3)] == ["miss", "hit", "hit"]
        assert r3.content == r1.content
        events = _sse_events(r2.content)
        kinds = [e["type"] for e in events]
        assert kinds[:3] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
        ]
        assert kinds[-1] == "response.completed"
        assert [e["sequence_number"] for e in events] == list(range(len(events)))
        assert events[-1]["response"] == r1.json()
        text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
        assert text == r1.json()["output"][0]["content"][0]["text"]
        recs = _records(h.shim, 3)
    assert f.calls == 1
    assert [r["cache_status"] for r in recs] == ["miss", "hit", "hit"]
    assert recs[1]["output_tokens"] == 0 and recs[1]["finish_reason"] == recs[0]["finish_reason"]


def test_a_streamed_answer_is_cached_for_plain_requests(tmp_path, fakes):
    f, url = fakes()
    body = {**BODY, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        r1 = httpx.post(h.base_url + "/responses", json={**body, "stream": True})
        final = _sse_events(r1.content)[-1]["response"]
        r2 = httpx.post(h.base_url + "/responses", json=body)
        assert r2.headers["x-finops-cache"] == "hit" and r2.json() == final
    assert f.calls == 1


@pytest.mark.parametrize(
    "extra",
    [
        {"temperature": 0.7},
        {"temperature": 0, "background": True},
        {"temperature": 0, "include": ["message.output_text.logprobs"]},
    ],
)
def test_responses_that_must_not_be_cached(tmp_path, fakes, extra):
    f, url = fakes()
    with _serve(tmp_path, [f"small={url}"]) as h:
        for _ in range(2):
            r = httpx.post(h.base_url + "/responses", json={**BODY, **extra})
            assert r.headers["x-finops-cache"] == "bypass"
    assert f.calls == 2


def test_cached_responses_stay_with_their_tenant(tmp_path, fakes):
    f, url = fakes()
    keys = ["k-acme-123=acme", "k-beta-456=beta"]
    body = {**BODY, "temperature": 0}
    cfg = from_flags([f"small={url}"], api_keys=keys, log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        for key in ("k-acme-123", "k-beta-456", "k-acme-123"):
            httpx.post(
                h.base_url + "/responses", json=body, headers={"authorization": f"Bearer {key}"}
            )
    assert f.calls == 2


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_stream_helper_reads_a_cached_responses_replay(tmp_path, vllm_server):
    """Against real vLLM: a greedy answer cached from a plain request, then read with the
    official client's `responses.stream` helper (which rebuilds the answer from the
    events and checks their order) and as a plain hit: the same text, id and usage."""
    url = vllm_server.root_url
    kw = {
        "input": MSG,
        "max_output_tokens": 6,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    with _serve(tmp_path, [f"small={url}"]) as h:
        c = openai.OpenAI(base_url=h.base_url, api_key="x", max_retries=0)
        first = c.responses.create(model="auto", **kw)
        with c.responses.stream(model="auto", **kw) as s:
            deltas = [e.delta for e in s if e.type == "response.output_text.delta"]
            replayed = s.get_final_response()
        again = c.responses.with_raw_response.create(model="auto", **kw)
        assert again.headers["x-finops-cache"] == "hit"
        recs = _records(h.shim, 3)
    assert replayed.id == first.id and replayed.output_text == first.output_text != ""
    assert "".join(deltas) == first.output_text
    assert replayed.usage.output_tokens == first.usage.output_tokens == 6
    assert again.parse().output_text == first.output_text
    assert [r["cache_status"] for r in recs] == ["miss", "hit", "hit"]


def test_a_cap_never_drops_the_items_that_answer_a_stored_response(tmp_path, fakes):
    """With `previous_response_id`, items before the first user message (a tool call's
    output) answer the stored response: truncation that would drop them is a reject
    (was: dropped, leaving vLLM a call without its output)."""
    f, url = fakes(store_responses=True)
    caps = (CapRule(40, "truncate"),)
    with _serve(tmp_path, [f"small={url}"], caps=caps) as h:
        first = httpx.post(h.base_url + "/responses", json=BODY).json()["id"]
        items = [
            {"type": "function_call_output", "call_id": "c1", "output": "result " * 60},
            {"role": "user", "content": "and now?"},
        ]
        body = {**BODY, "input": items, "previous_response_id": first}
        r = httpx.post(h.base_url + "/responses", json=body)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "context_length_exceeded"
        assert "previous_response_id" in r.json()["error"]["message"]
        # without a stored response to answer, the same input is truncated as usual
        r = httpx.post(h.base_url + "/responses", json={**BODY, "input": items})
        assert r.status_code == 200
        assert f.bodies[-1]["input"] == items[1:]


def test_reasoning_items_count_towards_the_input():
    from finops.shim.caps import estimate_body_tokens
    from finops.shim.responses import as_chat_body

    item = {
        "type": "reasoning",
        "id": "rs_1",
        "summary": [{"type": "summary_text", "text": "short"}],
        "content": [{"type": "reasoning_text", "text": "long thinking " * 50}],
    }
    chat = as_chat_body({"input": [item, {"role": "user", "content": "hi"}]})
    assert "long thinking" in chat["messages"][0]["content"]
    assert estimate_body_tokens(chat) > 150


def test_a_stream_coalesced_on_an_answer_it_cannot_replay_runs_on_its_own(tmp_path, fakes):
    """A plain leader's answer with a reasoning item is not cached (a replay would show
    the reasoning as answer text); a streamed request coalesced on it must not be given
    that replay either (was: the reasoning as output_text deltas, or a 500): it makes its
    own call."""
    import threading

    f, url = fakes(reasoning=True, delay_s=0.1)
    body = {**BODY, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        got: dict = {}

        def plain() -> None:
            got["plain"] = httpx.post(h.base_url + "/responses", json=body, timeout=30)

        t = threading.Thread(target=plain)
        t.start()
        time.sleep(0.15)  # the leader is waiting on the upstream
        r = httpx.post(h.base_url + "/responses", json={**body, "stream": True}, timeout=30)
        t.join()
        assert got["plain"].status_code == r.status_code == 200
        kinds = [e["type"] for e in _sse_events(r.content)]
        assert kinds[-1] == "response.completed"
        deltas = [e["delta"] for e in _sse_events(r.content) if e["type"].endswith(".delta")]
        assert "let me think" not in "".join(deltas)
        assert r.headers["x-finops-cache"] != "hit"
    assert f.calls == 2


def test_responses_for_another_end_user_are_not_served_from_the_cache(tmp_path, fakes):
    """vLLM echoes `user` in a Responses answer: a hit for bob must not say alice."""
    f, url = fakes()
    body = {**BODY, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"]) as h:
        a = httpx.post(h.base_url + "/responses", json={**body, "user": "alice"}).json()
        b = httpx.post(h.base_url + "/responses", json={**body, "user": "bob"}).json()
        again = httpx.post(h.base_url + "/responses", json={**body, "user": "alice"})
    assert (a["user"], b["user"]) == ("alice", "bob")
    assert again.headers["x-finops-cache"] == "hit" and again.json()["user"] == "alice"
    assert f.calls == 2
