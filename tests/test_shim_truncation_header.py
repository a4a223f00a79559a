"""A context cap that cuts a request says so to the client: `x-finops-truncated-tokens`
on the answer (streamed or not), and no such header when nothing was cut."""

from __future__ import annotations

import dataclasses

import httpx

from finops.shim import from_flags, serve_in_thread
from finops.shim.config import CapRule
from finops.shim.testing import wait_for_records


def _long_chat() -> list[dict]:
    msgs = [{"role": "system", "content": "be brief"}]
    for i in range(6):
        msgs += [
            {"role": "user", "content": f"question {i} " + "word " * 20},
            {"role": "assistant", "content": "answer " * 10},
        ]
    return [*msgs, {"role": "user", "content": "last question"}]


def test_truncated_requests_carry_the_count_and_others_do_not(tmp_path, fakes):
    _f, url = fakes()
    cfg = from_flags([f"small={url}"], log_dir=tmp_path / "log")
    cfg = dataclasses.replace(cfg, caps=(CapRule(60, "truncate", tier="small"),))
    msgs = _long_chat()
    with serve_in_thread(cfg) as h:
        got = []
        for stream in (False, True):
            r = httpx.post(
                h.base_url + "/chat/completions",
                json={"model": "small", "messages": msgs, "max_tokens": 3, "stream": stream},
            )
            assert r.status_code == 200, r.text
            got.append(r.headers.get("x-finops-truncated-tokens"))
        items = [{"role": m["role"], "content": m["content"]} for m in msgs]
        r = httpx.post(
            h.base_url + "/responses",
            json={"model": "small", "input": items, "max_output_tokens": 3, "store": False},
        )
        assert r.status_code == 200, r.text
        got.append(r.headers.get("x-finops-truncated-tokens"))
        short = httpx.post(
            h.base_url + "/chat/completions",
            json={"model": "small", "messages": msgs[-1:], "max_tokens": 3},
        )
        assert short.status_code == 200
        assert "x-finops-truncated-tokens" not in short.headers
        recs = wait_for_records(h.shim, 4)
    cut = [r["truncated_tokens"] for r in recs[:3]]
    assert all(n > 0 for n in cut), cut
    assert got == [str(n) for n in cut]  # the same count the log keeps
