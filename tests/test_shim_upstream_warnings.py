"""A replica that is down, or serves another model than its tier's, is named in a WARNING
at start and after a reload (the first probe), not found at the first failed request."""

from __future__ import annotations

import dataclasses
import logging
import socket
import time

import httpx

from finops.shim import serve_in_thread
from finops.shim.config import load_config

CHAT = {"model": "mid", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # closed again: refused


def _checks(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.getMessage().startswith("upstream check:")
    ]


def _wait(caplog, n: int) -> list[str]:
    deadline = time.monotonic() + 10
    while len(_checks(caplog)) < n and time.monotonic() < deadline:
        time.sleep(0.05)
    return _checks(caplog)


def test_dead_and_wrong_model_replicas_are_warned_at_start_and_reload(tmp_path, fakes, caplog):
    caplog.set_level(logging.WARNING, logger="finops.shim")
    _ok, ok_url = fakes(name="llama-8b")
    _other, other_url = fakes(name="llama-8b")  # serves the small model, not the large
    dead = _dead_url()
    conf = tmp_path / "shim.toml"

    def write(mid: str) -> None:
        conf.write_text(
            f'[tiers.small]\nupstreams = ["{ok_url}"]\nmodel = "llama-8b"\n'
            f'[tiers.mid]\nupstreams = ["{ok_url}", "{mid}"]\nmodel = "llama-8b-ft"\n'
            f'[tiers.large]\nupstreams = ["{other_url}"]\nmodel = "llama-70b"\n'
        )

    write(dead)
    cfg = dataclasses.replace(load_config(conf), log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        got = _wait(caplog, 3)
        assert sorted(got) == sorted(
            [
                f"upstream check: tier `mid` replica 1 ({ok_url}) serves models ['llama-8b'], "
                "not `llama-8b-ft`: requests for this tier will fail",
                f"upstream check: tier `mid` replica 2 ({dead}) is unreachable (its /health "
                "did not answer)",
                f"upstream check: tier `large` replica 1 ({other_url}) serves models "
                "['llama-8b'], not `llama-70b`: requests for this tier will fail",
            ]
        ), got
        # start did not fail: the tier that is right serves
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "small"})
        assert r.status_code == 200
        caplog.clear()
        write(ok_url.replace("127.0.0.1", "localhost"))  # the dead replica replaced
        ok, msg = h.call(h.shim.areload())
        assert ok, msg
        got = _checks(caplog)
        assert len(got) == 3, got
        assert not any(dead in m or "unreachable" in m for m in got), got
        assert sum("`mid` replica 2" in m and "not `llama-8b-ft`" in m for m in got) == 1
