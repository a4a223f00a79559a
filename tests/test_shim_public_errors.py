"""Errors tenants get never map the internal network: no replica URL, host or port.

Real parts: the shim on loopback, a closed loopback port (refused), a listening socket
whose accept queue is full (connects hang until the connect timeout) and a fake upstream
that accepts requests and never answers.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from finops.shim import from_flags, serve_in_thread
from finops.shim.config import parse_config
from finops.shim.upstreams import Pool

CHAT = {"model": "large", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
REQUESTS = [
    ("/chat/completions", CHAT),
    ("/completions", {"model": "large", "prompt": "hello", "max_tokens": 4}),
    ("/responses", {"model": "large", "input": "hello", "max_output_tokens": 4}),
]


def _refusing() -> tuple[str, int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "127.0.0.1", s.getsockname()[1]  # closed again: connections are refused


@pytest.fixture
def hung_listener() -> Iterator[tuple[str, int]]:
    """A port whose connects neither succeed nor fail: its accept queue is full (Linux
    drops further SYNs), so a client's connect runs into its timeout."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    for _ in range(4):  # fill the queue; later connects hang
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield "127.0.0.1", port
    finally:
        for c in fillers:
            c.close()
        srv.close()


def _leaks(text: str, host: str, port: int) -> list[str]:
    return [s for s in (f"{host}:{port}", host, str(port)) if s in text]


def _check(tmp_path: Path, small_url: str, host: str, port: int, said: str = "", **changes) -> None:
    cfg = from_flags([f"small={small_url}", f"large=http://{host}:{port}"], log_dir=tmp_path)
    cfg = dataclasses.replace(cfg, breaker_failures=100, **changes)  # each request tries it
    with serve_in_thread(cfg) as h:
        for path, body in REQUESTS:
            for stream in (False, True):
                r = httpx.post(h.base_url + path, json={**body, "stream": stream}, timeout=30)
                assert r.status_code >= 500, (path, stream, r.text)
                assert f"upstream `large` replica 1 {said}" in r.text, (path, stream, r.text)
                assert not _leaks(r.text, host, port), (path, stream, r.text)
        r = httpx.post(
            h.base_url + "/embeddings", json={"model": "large", "input": "hello"}, timeout=30
        )
        assert r.status_code >= 500 and not _leaks(r.text, host, port), r.text


def test_a_refused_replica_is_named_not_addressed(tmp_path, fakes, caplog):
    _ok, ok_url = fakes()
    host, port = _refusing()
    _check(
        tmp_path, ok_url, host, port, "refused or unreachable: connect failed: Connection refused"
    )
    assert f"{host}:{port}" in caplog.text  # the operators' log keeps the address


def test_a_replica_whose_connect_hangs_is_named_not_addressed(tmp_path, fakes, hung_listener):
    _ok, ok_url = fakes()
    host, port = hung_listener
    _check(
        tmp_path,
        ok_url,
        host,
        port,
        "refused or unreachable: connect timed out after 0.3 s",
        connect_timeout_s=0.3,
    )


def test_a_replica_that_never_answers_is_named_not_addressed(tmp_path, fakes):
    _ok, ok_url = fakes()
    _hung, hung_url = fakes("hang")
    host, port = hung_url.removeprefix("http://").rsplit(":", 1)
    _check(
        tmp_path,
        ok_url,
        host,
        int(port),
        "sent no",  # answer / first byte
        first_byte_timeout_s=0.3,
        response_timeout_s=0.3,
    )


def test_public_names_every_form_of_an_address_but_not_lookalikes():
    cfg = parse_config(
        {
            "tiers": {
                "small": {
                    "upstreams": ["http://10.0.0.1:8000", "https://vllm.internal/v1"],
                    "model": "m",
                }
            }
        }
    )
    pool = Pool(cfg)
    text = (
        "connect to 10.0.0.1:8000 failed; http://10.0.0.1:8000/v1/chat; host 10.0.0.1; "
        "TLS: not valid for 'vllm.internal'; vllm.internal:443 reset; "
        "10.0.0.12:8000 and 10.0.0.1.5 are someone else"
    )
    got = pool.public(text)
    assert got == (
        "connect to `small` replica 1 failed; `small` replica 1/v1/chat; host `small` replica 1; "
        "TLS: not valid for '`small` replica 2'; `small` replica 2 reset; "
        "10.0.0.12:8000 and 10.0.0.1.5 are someone else"
    )
