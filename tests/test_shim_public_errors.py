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
from finops.shim.h1client import _reason
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


def test_a_replica_whose_name_does_not_resolve_gets_the_resolvers_reason(tmp_path, fakes):
    """A lookup's errno is a negative EAI_* code: os.strerror read "Unknown error -2"."""
    _ok, ok_url = fakes()
    cfg = from_flags(
        [f"small={ok_url}", "large=http://no-such-host.invalid:8000"], log_dir=tmp_path
    )
    with serve_in_thread(dataclasses.replace(cfg, breaker_failures=100)) as h:
        r = httpx.post(h.base_url + "/chat/completions", json=CHAT, timeout=30)
    assert r.status_code >= 500, r.text
    assert "upstream `large` replica 1 refused or unreachable: connect failed: " in r.text
    assert "Unknown error" not in r.text and "no-such-host" not in r.text, r.text
    reason = r.text.split("connect failed: ", 1)[1]
    # glibc: "Name or service not known"; no resolver at all: "Temporary failure ..."
    assert reason[:1].isalpha(), r.text


def test_reason_of_a_connect_to_several_addresses_names_none():
    """asyncio's error when each address a name resolves to failed lists them (pod IPs)."""
    exc = OSError(
        "Multiple exceptions: [Errno 111] Connect call failed ('10.1.2.3', 8000), "
        "[Errno 113] Connect call failed ('10.1.2.4', 8000)"
    )
    assert _reason(exc) == "connect failed to every address the name resolves to"
    assert _reason(socket.gaierror(-2, "Name or service not known")) == (
        "Name or service not known"
    )
    assert _reason(ConnectionRefusedError(111, "Connect call failed ('10.1.2.3', 8000)")) == (
        "Connection refused"
    )


@pytest.mark.parametrize("host", ["small", "server", "model"])
def test_public_leaves_words_alone_when_a_host_is_a_plain_word(host):
    """A bare host is replaced only as an FQDN or IP: `small` is also the tier's name,
    and `server` or `model` words of vLLM's prose; the URL and host:port still are."""
    cfg = parse_config(
        {
            "tiers": {
                "small": {"upstreams": [f"http://{host}:8000"]},
                "large": {"upstreams": ["http://10.0.0.1:8000"]},
            }
        }
    )
    pool = Pool(cfg)
    text = (
        "No upstream of tier `small` or above; the model server said no; "
        f"connect to {host}:8000 failed; http://{host}:8000/v1 reset"
    )
    assert pool.public(text) == (
        "No upstream of tier `small` or above; the model server said no; "
        "connect to `small` replica 1 failed; `small` replica 1/v1 reset"
    )


def test_public_skips_the_regex_for_a_text_without_any_host():
    """Most tenant errors name no address: they come back unchanged, and quickly."""
    cfg = parse_config(
        {"tiers": {"small": {"upstreams": [f"http://10.0.0.{i}:8000" for i in range(1, 61)]}}}
    )
    pool = Pool(cfg)
    text = "upstream `small` replica 3 sent no answer within 30 s " * 20
    assert pool.public(text) is text
    assert pool.public(f"{text} 10.0.0.7:8000") == f"{text} `small` replica 7"
