"""Stored Responses API answers through the shim: follow-ups (`previous_response_id`)
go to the replica that stored the response, retrieve/cancel/delete reach it too, and
only the tenant that made a response can use its id.

Against loopback fake upstreams that keep responses as vLLM does with
VLLM_ENABLE_RESPONSES_API_STORE=1 (`FakeUpstream(store_responses=True)`), a shared
Redis for the index across shims, and (marked `vllm`/`slow`) two real vLLM servers as
two replicas of one tier with the official openai client.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import httpx
import openai
import orjson
import pytest

from finops.shim import from_flags, serve_in_thread
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.server import run_app_in_thread
from finops.shim.testing import wait_for_records as _records
from tests.test_shim_cache_shared import redis_server  # noqa: F401 - a fixture

BODY = {"model": "auto", "input": "hello there", "max_output_tokens": 4}
# two tenants' keys, and the headers that send them
KEYS = ["k-acme-123=acme", "k-beta-456=beta"]
ACME = {"authorization": "Bearer k-acme-123"}
BETA = {"authorization": "Bearer k-beta-456"}


def _serve(tmp_path: Path, upstreams: list[str], name: str = "log", **changes):
    cfg = from_flags(upstreams, log_dir=tmp_path / name, api_keys=changes.pop("api_keys", None))
    return serve_in_thread(dataclasses.replace(cfg, **changes))


def _create(h, body=None, headers=None, stream=False) -> str:
    """POST /v1/responses; the new response's id (from the body, or the stream's
    response.created event)."""
    body = {**(body or BODY), "stream": stream}
    r = httpx.post(h.base_url + "/responses", json=body, headers=headers or {}, timeout=30)
    assert r.status_code == 200, r.text
    if not stream:
        return r.json()["id"]
    for raw in r.content.split(b"\n\n"):
        for line in raw.split(b"\n"):
            if line.startswith(b"data:"):
                ev = orjson.loads(line[5:])
                if ev.get("type") == "response.created":
                    return ev["response"]["id"]
    raise AssertionError("no response.created event")


def _sse(content: bytes) -> list[dict]:
    return [
        orjson.loads(line[5:])
        for raw in content.split(b"\n\n")
        for line in raw.split(b"\n")
        if line.startswith(b"data:")
    ]


def _final(content: bytes) -> dict:
    """A Responses stream's terminal `response` object."""
    return next(e["response"] for e in _sse(content) if e["type"] == "response.completed")


def _text(content: bytes) -> str:
    return "".join(e["delta"] for e in _sse(content) if e["type"] == "response.output_text.delta")


def _found_through(h, rids: list[str]) -> None:
    """Each of acme's ids: a follow-up and a retrieval through shim `h` find it; beta's
    retrieval is a 404."""
    for rid in rids:
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "previous_response_id": rid}, headers=ACME
        )
        assert r.status_code == 200, r.text
        assert httpx.get(f"{h.base_url}/responses/{rid}", headers=ACME).status_code == 200
        assert httpx.get(f"{h.base_url}/responses/{rid}", headers=BETA).status_code == 404


def _metric(h, prefix: str) -> float:
    text = httpx.get(h.base_url.removesuffix("/v1") + "/metrics").text
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith(prefix))


def test_follow_ups_go_to_the_replica_that_stored_the_response(tmp_path, fakes):
    """Two replicas of `small`: every follow-up (chained, streamed or not, by `auto` or
    by name) reaches the replica holding its previous response. Was: least-outstanding
    balancing sent about half to the other replica, which answered 404."""
    a, url_a = fakes(store_responses=True)
    b, url_b = fakes(store_responses=True)
    big, url_big = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url_a}", f"small={url_b}", f"large={url_big}"]) as h:
        rid = _create(h, {**BODY, "model": "small"})
        home = a if rid in a.stored else b
        other = b if home is a else a
        n_other = other.calls
        for i in range(8):
            body = {**BODY, "previous_response_id": rid}
            if i % 3 == 2:
                body["model"] = "small"
            rid = _create(h, body, stream=i % 2 == 1)  # each answer chains on the last
            assert rid in home.stored
        assert other.calls == n_other
        assert big.calls == 0  # `auto` took the tier that answered, unclassified
        recs = _records(h.shim, 9)
        assert (
            _metric(h, 'finops_shim_stored_response_calls_total{op="follow_up",status="200"}') == 8
        )
    follow = recs[1:]
    assert all(r["status_code"] == 200 and r["tier"] == "small" for r in follow)
    assert {r["upstream"] for r in recs} == {url_a if home is a else url_b}
    assert all(r["router_version"] is None for r in follow)  # pinned, not routed
    # the replica got each follow-up with its previous response's id, as sent
    prevs = [b.get("previous_response_id") for b in home.bodies]
    assert prevs[-8:] == [p for p in prevs[-8:] if p in home.stored] and None not in prevs[-8:]


def test_tenants_cannot_use_each_others_response_ids(tmp_path, fakes):
    """Replicas are shared by all tenants: the shim refuses another tenant's id (404,
    the words vLLM uses for an unknown id) for follow-ups and every stored-response call,
    without asking any replica."""
    f, url = fakes(store_responses=True)
    keys, acme, beta = KEYS, ACME, BETA
    with _serve(tmp_path, [f"small={url}"], api_keys=keys) as h:
        rid = _create(h, headers=acme)
        calls = f.calls
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "previous_response_id": rid}, headers=beta
        )
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "previous_response_not_found"
        assert err["param"] == "previous_response_id"
        assert err["message"] == f"Response with id '{rid}' not found."
        for method, suffix in (("GET", ""), ("POST", "/cancel"), ("DELETE", "")):
            r = httpx.request(method, f"{h.base_url}/responses/{rid}{suffix}", headers=beta)
            assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        assert f.calls == calls and f.stored_calls == []
        r = httpx.get(f"{h.base_url}/responses/{rid}", headers={})
        assert r.status_code == 401
        # the owner gets it from the replica
        r = httpx.get(f"{h.base_url}/responses/{rid}", headers=acme)
        assert r.status_code == 200 and r.json()["id"] == rid
        assert r.headers["x-finops-tier"] == "small"
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "previous_response_id": rid}, headers=acme
        )
        assert r.status_code == 200
        recs = _records(h.shim, 3)
    assert [(r["tenant"], r["status_code"]) for r in recs] == [
        ("acme", 200),
        ("beta", 404),
        ("acme", 200),
    ]
    assert recs[1]["error_type"] == "previous_response_not_found"
    assert ("GET", f"/v1/responses/{rid}") in f.stored_calls


def test_retrieve_cancel_delete_and_input_items_are_forwarded_as_answered(tmp_path, fakes):
    """The replica's answers come back as it gave them (status, body, query string
    passed on), and the calls are counted by operation and status."""
    f, url = fakes(store_responses=True)
    g, url_g = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}", f"large={url_g}"]) as h:
        rid = _create(h, {**BODY, "model": "large"})
        base = f"{h.base_url}/responses/{rid}"
        forwarded = []  # every answer a replica gave carries the shim's headers
        r = httpx.get(base + "?stream=false")
        forwarded.append(r)
        assert r.status_code == 200 and r.json()["id"] == rid
        r = httpx.post(base + "/cancel")
        forwarded.append(r)
        assert r.status_code == 400
        assert r.json()["error"]["message"] == "Cannot cancel a synchronous response."
        # what vLLM does not serve: its framework's refusal, said in OpenAI's shape
        r = httpx.delete(base)
        forwarded.append(r)
        assert r.status_code == 405 and r.headers["allow"] == "GET"
        err = r.json()["error"]
        assert err["code"] == "unsupported_by_upstream" and "`large` replica 1" in err["message"]
        r = httpx.get(base + "/input_items")
        forwarded.append(r)
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "unsupported_by_upstream"
        for r in forwarded:
            assert r.headers["x-finops-tier"] == "large", r.request.url
            assert r.headers["x-finops-cache"] == "bypass"
            assert float(r.headers["x-finops-overhead-ms"]) >= 0
        # vLLM's own 404 (an id it no longer has) is passed on as it is
        g.stored.clear()
        r = httpx.get(base)
        assert r.status_code == 404 and r.json()["error"]["message"].startswith("Response with")
        r = httpx.put(base)
        assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "DELETE"}
        r = httpx.get(base + "/nothing")
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        assert f.stored_calls == []
        assert [c[0] for c in g.stored_calls] == ["GET", "POST", "DELETE", "GET", "GET"]
        m = 'finops_shim_stored_response_calls_total{op="retrieve",status="200"}'
        assert _metric(h, m) == 1
        assert _metric(h, 'finops_shim_stored_response_calls_total{op="cancel",status="400"}') == 1


def test_explicit_model_must_be_served_by_the_replica_that_stored_it(tmp_path, fakes):
    _f, url = fakes(store_responses=True)
    g, url_g = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}", f"large={url_g}"]) as h:
        rid = _create(h, {**BODY, "model": "small"})
        r = httpx.post(
            h.base_url + "/responses",
            json={**BODY, "model": "large", "previous_response_id": rid},
        )
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["code"] == "previous_response_elsewhere" and err["param"] == "model"
        assert "`small`" in err["message"]
        r = httpx.post(h.base_url + "/responses", json={**BODY, "previous_response_id": 7})
        assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"
        assert g.calls == 0


def test_one_server_for_several_tiers_keeps_the_tier_asked_for(tmp_path, fakes):
    """A vLLM serving several tiers' model names holds their responses in one store: a
    follow-up by another of its tiers' names is allowed and goes there."""
    _f, url = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}", f"large={url}"]) as h:
        rid = _create(h, {**BODY, "model": "small"})
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "model": "large", "previous_response_id": rid}
        )
        assert r.status_code == 200, r.text
        assert r.headers["x-finops-tier"] == "large"


def test_store_false_is_not_indexed(tmp_path, fakes):
    f, url = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}"], api_keys=["k-acme-123=acme"]) as h:
        auth = {"authorization": "Bearer k-acme-123"}
        rid = _create(h, {**BODY, "store": False}, headers=auth)
        assert rid not in f.stored
        r = httpx.get(f"{h.base_url}/responses/{rid}", headers=auth)
        assert r.status_code == 404
        assert len(h.shim.responses) == 0


def test_without_auth_an_id_the_shim_never_saw_is_found_on_its_replica(tmp_path, fakes):
    """Auth off (one tenant): ids made before the shim started (or through another
    worker) are looked for on every replica and then remembered."""
    f, url = fakes(store_responses=True)
    _g, url_g = fakes(store_responses=True)
    # made on g directly, not through the shim
    r = httpx.post(url_g + "/v1/responses", json={**BODY, "model": "large"})
    rid = r.json()["id"]
    with _serve(tmp_path, [f"small={url}", f"large={url_g}"]) as h:
        r = httpx.get(f"{h.base_url}/responses/{rid}")
        assert r.status_code == 200 and r.json()["id"] == rid
        assert r.headers["x-finops-tier"] == "large"
        r = httpx.post(h.base_url + "/responses", json={**BODY, "previous_response_id": rid})
        assert r.status_code == 200 and r.headers["x-finops-tier"] == "large"
        assert f.calls == 0
        r = httpx.get(f"{h.base_url}/responses/resp_unknown")
        assert r.status_code == 404
        assert r.json()["error"]["message"] == "Response with id 'resp_unknown' not found."


def test_the_pinned_replica_down_is_an_error_not_a_fallback(tmp_path):
    """The other replica does not have the conversation: the follow-up fails (502,
    naming the cause) rather than being sent where it would 404."""
    a, b = FakeUpstream(store_responses=True), FakeUpstream(store_responses=True)
    ha, hb = run_app_in_thread(a), run_app_in_thread(b)
    try:
        with _serve(tmp_path, [f"small={ha.url}", f"small={hb.url}"], connect_timeout_s=0.5) as h:
            rid = _create(h)
            home, other = (ha, b) if rid in a.stored else (hb, a)
            calls = other.calls
            home.stop(2)
            r = httpx.post(h.base_url + "/responses", json={**BODY, "previous_response_id": rid})
            assert r.status_code == 502, r.text
            assert r.json()["error"]["code"] == "upstream_connect"
            r = httpx.get(f"{h.base_url}/responses/{rid}")
            name = f"`small` replica {1 if home is ha else 2}"  # not its internal URL
            assert r.status_code == 502 and name in r.json()["error"]["message"]
            assert home.url not in r.text
            assert other.calls == calls and other.stored_calls == []
    finally:
        ha.stop(2)
        hb.stop(2)


def test_the_index_is_shared_through_redis(tmp_path, fakes, redis_server):  # noqa: F811
    """Two shims (workers or hosts) with one Redis: a follow-up and a retrieval through
    the second reach the replica the first indexed, for the same tenant only."""
    _a, url_a = fakes(store_responses=True)
    _b, url_b = fakes(store_responses=True)
    ups = [f"small={url_a}", f"small={url_b}"]
    with (
        _serve(tmp_path, ups, "l1", api_keys=KEYS, redis_url=redis_server.url) as h1,
        _serve(tmp_path, ups, "l2", api_keys=KEYS, redis_url=redis_server.url) as h2,
    ):
        rids = [_create(h1, headers=ACME, stream=i % 2 == 1) for i in range(4)]
        deadline = time.monotonic() + 5
        while len(redis_server.client().keys("respidx:*")) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
        _found_through(h2, rids)


# --------------------------------------------------------------------------- real vLLM


@pytest.mark.vllm
@pytest.mark.slow
def test_openai_follow_ups_across_two_vllm_replicas(tmp_path, vllm_server, vllm_server_2):
    """Two real vLLM servers as replicas of one tier, the official client: every
    follow-up and retrieval finds its stored response (each replica has only its own)."""
    u1, u2 = vllm_server.root_url, vllm_server_2.root_url
    probe = httpx.post(
        u1 + "/v1/responses", json={"model": "small", "input": "hi", "max_output_tokens": 2}
    ).json()
    if httpx.get(f"{u1}/v1/responses/{probe['id']}").status_code != 200:
        pytest.skip("this vLLM runs without VLLM_ENABLE_RESPONSES_API_STORE=1")
    with _serve(tmp_path, [f"small={u1}", f"small={u2}"]) as h:
        client = openai.OpenAI(base_url=h.base_url, api_key="unused", max_retries=0)
        r = client.responses.create(model="auto", input="Name a GPU.", max_output_tokens=4)
        ids = [r.id]
        for i in range(5):
            kw = {"model": "auto", "input": "And another?", "max_output_tokens": 4}
            if i % 2:
                with client.responses.stream(previous_response_id=ids[-1], **kw) as s:
                    r = s.get_final_response()
            else:
                r = client.responses.create(previous_response_id=ids[-1], **kw)
            assert r.previous_response_id == ids[-1]
            ids.append(r.id)
        for rid in ids:
            assert client.responses.retrieve(rid).id == rid
        recs = _records(h.shim, 6)
    assert {rec["upstream"] for rec in recs} == {recs[0]["upstream"]}
    assert all(rec["status_code"] == 200 for rec in recs)


@pytest.mark.parametrize("stream", [False, True])
def test_idempotency_key_replays_a_responses_answer(tmp_path, fakes, stream):
    """An agent's retry with the same Idempotency-Key gets the first answer (the same
    response id; a stream as it was sent), one upstream call, the retry logged as one
    and not billed; the key with another body is a 422. Was: every retry generated and
    stored a new response."""
    f, url = fakes(store_responses=True)
    key = {"idempotency-key": "agent-step-7"}
    with _serve(tmp_path, [f"small={url}"]) as h:
        body = {**BODY, "stream": stream}
        r1 = httpx.post(h.base_url + "/responses", json=body, headers=key)
        r2 = httpx.post(h.base_url + "/responses", json=body, headers=key)
        assert r1.status_code == r2.status_code == 200
        if stream:  # the same answer, its text streamed in one delta
            assert _final(r1.content) == _final(r2.content)
            assert _text(r1.content) == _text(r2.content) != ""
        else:
            assert r1.content == r2.content
        assert r2.headers["x-finops-cache"] == "hit"
        r3 = httpx.post(h.base_url + "/responses", json={**body, "input": "other"}, headers=key)
        assert r3.status_code == 422
        assert r3.json()["error"]["code"] == "idempotency_key_reused"
        r4 = httpx.post(
            h.base_url + "/chat/completions",
            json={"model": "small", "messages": [{"role": "user", "content": "hi"}]},
            headers=key,
        )
        assert r4.status_code == 422  # another endpoint is another request
        recs = _records(h.shim, 4)
    assert f.calls == 1 and len(f.stored) == 1
    first, retry = recs[0], recs[1]
    assert retry["retry_of"] == first["request_id"] and retry["attempt"] == 2
    assert retry["input_tokens"] == 0 and retry["output_tokens"] == 0
    assert first["input_tokens"] > 0 and first["idempotency_key"] == "agent-step-7"


@pytest.mark.vllm
@pytest.mark.slow
def test_background_responses_through_the_shim_against_vllm(tmp_path, vllm_server):
    """Background mode with the official client against real vLLM: create, poll with
    retrieve until done, replay its events (`?stream=true`, streamed through), cancel a
    running one; another tenant sees none of it."""
    keys = ["k-acme-123=acme", "k-beta-456=beta"]
    with _serve(tmp_path, [f"small={vllm_server.root_url}"], api_keys=keys) as h:
        client = openai.OpenAI(base_url=h.base_url, api_key="k-acme-123", max_retries=0)
        other = openai.OpenAI(base_url=h.base_url, api_key="k-beta-456", max_retries=0)
        rid = None
        with client.responses.create(
            model="auto", input="Count to five.", max_output_tokens=8, background=True, stream=True
        ) as events:
            for ev in events:
                if ev.type == "response.created":
                    rid = ev.response.id
                    break  # leaving the stream does not stop a background response
        assert rid is not None
        deadline = time.monotonic() + 60
        while (r := client.responses.retrieve(rid)).status in ("queued", "in_progress"):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert r.status in ("completed", "incomplete") and r.usage.output_tokens > 0
        replay = httpx.get(
            f"{h.base_url}/responses/{rid}?stream=true&starting_after=1",
            headers={"authorization": "Bearer k-acme-123"},
            timeout=30,
        )
        assert replay.status_code == 200
        assert replay.headers["content-type"].startswith("text/event-stream")
        assert "event: response.completed" in replay.text or "response.incomplete" in replay.text
        with pytest.raises(openai.NotFoundError):
            other.responses.retrieve(rid)
        with pytest.raises(openai.NotFoundError):
            other.responses.cancel(rid)
        # the tiny CPU model may stop (EOS) before the cancel arrives; vLLM then refuses it
        # ("Cannot cancel a synchronous response"): try again, and each such refusal must be
        # for a response the replica has indeed finished
        for _attempt in range(4):
            running = client.responses.create(
                model="auto",
                input="Count to fifty.",
                max_output_tokens=200,
                background=True,
                extra_headers={"X-Request-Id": rid},  # passed on: it must not name the response
            )
            assert running.id != rid
            try:
                assert client.responses.cancel(running.id).status == "cancelled"
                break
            except openai.BadRequestError:
                assert client.responses.retrieve(running.id).status in ("completed", "incomplete")
        else:
            pytest.fail("every background response finished before its cancel reached vLLM")


def test_a_client_chosen_request_id_is_refused(tmp_path, fakes):
    """vLLM makes a body's `request_id` the response id: through a shared replica, tenant
    B could take over (overwrite, read, continue) tenant A's stored response by sending
    A's id. Was: passed on, and the index re-assigned the id to B."""
    f, url = fakes(store_responses=True)
    keys, acme, beta = KEYS, ACME, BETA
    with _serve(tmp_path, [f"small={url}"], api_keys=keys) as h:
        rid = _create(h, headers=acme)
        calls = f.calls
        for stream in (False, True):
            r = httpx.post(
                h.base_url + "/responses",
                json={**BODY, "request_id": rid, "stream": stream},
                headers=beta,
            )
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "request_id_not_allowed"
            assert r.json()["error"]["param"] == "request_id"
        assert f.calls == calls
        assert httpx.get(f"{h.base_url}/responses/{rid}", headers=acme).status_code == 200
        assert httpx.get(f"{h.base_url}/responses/{rid}", headers=beta).status_code == 404


def test_the_index_never_hands_an_id_to_another_tenant():
    from finops.shim.stored import ResponseIndex, StoredResponse

    idx = ResponseIndex(60.0, max_entries=2)
    a = StoredResponse("acme", "small", "http://a")
    assert idx.put("resp_1", a)
    assert not idx.put("resp_1", StoredResponse("beta", "small", "http://a"))
    assert idx.get("resp_1") == a
    assert idx.put("resp_1", StoredResponse("acme", "large", "http://b"))  # its own: updated
    idx.put("resp_2", a)
    idx.put("resp_3", a)
    assert idx.get("resp_1") is None and len(idx) == 2  # least recently used dropped
    short = ResponseIndex(0.01)
    short.put("resp_1", a)
    time.sleep(0.03)
    assert short.get("resp_1") is None
    assert short.put("resp_1", StoredResponse("beta", "small", "http://a"))  # expired: free


def test_a_pinned_replica_with_an_open_circuit_gives_its_own_retry_after(tmp_path):
    """Once the home replica's circuit opens, follow-ups get 503 with the wait of that
    replica's circuit (was: 1 s, from the healthy sibling, so clients came back to
    another 503); the follow-up metric counts them by how they ended (was: 200 each)."""
    a, b = FakeUpstream(store_responses=True), FakeUpstream(store_responses=True)
    ha, hb = run_app_in_thread(a), run_app_in_thread(b)
    try:
        with _serve(
            tmp_path,
            [f"small={ha.url}", f"small={hb.url}"],
            connect_timeout_s=0.5,
            breaker_failures=1,
            breaker_cooldown_s=30.0,
        ) as h:
            rid = _create(h)
            home = ha if rid in a.stored else hb
            home.stop(2)
            body = {**BODY, "previous_response_id": rid}
            r = httpx.post(h.base_url + "/responses", json=body)
            assert r.status_code == 502
            r = httpx.post(h.base_url + "/responses", json=body)
            assert r.status_code == 503, r.text
            assert int(r.headers["retry-after"]) >= 29
            assert "holding the stored response" in r.json()["error"]["message"]
            m = "finops_shim_stored_response_calls_total"
            assert _metric(h, f'{m}{{op="follow_up",status="200"}}') == 0
            assert _metric(h, f'{m}{{op="follow_up",status="502"}}') == 1
            assert _metric(h, f'{m}{{op="follow_up",status="503"}}') == 1
    finally:
        ha.stop(2)
        hb.stop(2)


def test_without_auth_an_unknown_id_is_not_looked_for_on_every_request(tmp_path, fakes):
    """Auth off: an id no replica has costs one GET per replica, then 404s from the shim
    for a while (was: a GET to every replica on each request, for a client polling it)."""
    f, url = fakes(store_responses=True)
    g, url_g = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}", f"large={url_g}"]) as h:
        for _ in range(5):
            r = httpx.get(f"{h.base_url}/responses/resp_nowhere")
            assert r.status_code == 404
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "previous_response_id": "resp_nowhere"}
        )
        assert r.status_code == 404
    assert len(f.stored_calls) == len(g.stored_calls) == 1


def test_unknown_ids_are_remembered_within_bounds(tmp_path, fakes):
    """A client choosing ids (auth off): ids of 60 kB were each asked of every replica and
    kept as unknown (~700 MB for 10,000), and expired ones only went by count. An id no
    server would make is not looked up at all, and the expired go first."""
    from finops.shim.app import MAX_RESPONSE_ID_CHARS, MISSING_ID_S

    f, url = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}"]) as h:
        r = httpx.get(f"{h.base_url}/responses/resp_{'x' * MAX_RESPONSE_ID_CHARS}")
        assert r.status_code == 404 and r.json()["error"]["code"] == "response_not_found"
        assert f.stored_calls == [] and len(h.shim._missing_ids) == 0
        for i in range(3):
            assert httpx.get(f"{h.base_url}/responses/resp_old{i}").status_code == 404
        for k in h.shim._missing_ids:  # their lifetime has passed
            h.shim._missing_ids[k] -= MISSING_ID_S + 1
        assert httpx.get(f"{h.base_url}/responses/resp_new").status_code == 404
        assert list(h.shim._missing_ids) == ["resp_new"]


def test_a_cache_hit_indexes_its_id_again(tmp_path, fakes):
    """A cached answer outlives its index entry (other TTLs, the LRU bound): the hit
    indexes the id again, so its follow-ups still find the replica (was: 404 with auth on)."""
    f, url = fakes(store_responses=True)
    body = {**BODY, "temperature": 0}
    with _serve(tmp_path, [f"small={url}"], api_keys=KEYS) as h:
        rid = _create(h, body, headers=ACME)
        h.shim.responses._d.clear()  # the index let it go
        assert _create(h, body, headers=ACME) == rid  # a hit: the same id
        r = httpx.post(
            h.base_url + "/responses", json={**BODY, "previous_response_id": rid}, headers=ACME
        )
        assert r.status_code == 200, r.text
        # and only for its tenant: beta's identical request misses, and gets its own id
        assert _create(h, body, headers=BETA) != rid
    assert f.calls == 3


def test_workers_share_the_index_through_a_file_without_redis(tmp_path, fakes, monkeypatch):
    """Two shims given one state folder, as `--workers` gives its workers (no Redis): a
    follow-up or retrieval through the other finds the replica, for its tenant only
    (was: 404 on a worker that had not answered the id itself)."""
    from finops.shim.stored import STATE_DIR_ENV

    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path))
    _a, url_a = fakes(store_responses=True)
    _b, url_b = fakes(store_responses=True)
    ups = [f"small={url_a}", f"small={url_b}"]
    with (
        _serve(tmp_path, ups, "l1", api_keys=KEYS) as h1,
        _serve(tmp_path, ups, "l2", api_keys=KEYS) as h2,
    ):
        rids = [_create(h1, headers=ACME, stream=i % 2 == 1) for i in range(4)]
        _found_through(h2, rids)
    assert (tmp_path / "responses.sqlite3").exists()


def test_the_shared_file_index_never_hands_an_id_to_another_tenant(tmp_path):
    from finops.shim.stored import SharedFileIndex, StoredResponse

    one = SharedFileIndex(tmp_path / "i.sqlite3", 60.0)
    two = SharedFileIndex(tmp_path / "i.sqlite3", 60.0)  # another worker
    a = StoredResponse("acme", "small", "http://a")
    assert one.put("resp_1", a) and two.get("resp_1") == a
    assert not two.put("resp_1", StoredResponse("beta", "small", "http://b"))
    assert one.get("resp_1") == a
    two.forget("resp_1")
    assert one.get("resp_1") is None
    short = SharedFileIndex(tmp_path / "s.sqlite3", 0.01)
    short.put("resp_2", a)
    time.sleep(0.03)
    assert short.get("resp_2") is None
    assert short.put("resp_2", StoredResponse("beta", "small", "http://b"))  # expired: free
    for ix in (one, two, short):
        ix.close()


def test_a_worker_that_cannot_open_the_shared_index_still_serves(tmp_path, fakes, monkeypatch):
    from finops.shim.stored import STATE_DIR_ENV

    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "responses.sqlite3").mkdir()  # not a file: cannot be opened
    monkeypatch.setenv(STATE_DIR_ENV, str(tmp_path / "state"))
    _f, url = fakes(store_responses=True)
    with _serve(tmp_path, [f"small={url}"], api_keys=KEYS) as h:
        assert h.shim.shared_index is None
        rid = _create(h, headers=ACME)
        assert httpx.get(f"{h.base_url}/responses/{rid}", headers=ACME).status_code == 200
