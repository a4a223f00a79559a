"""A /metrics body cut off in transit must not load as complete.

An HTTP/1.0 close-delimited response (no Content-Length) whose connection drops
mid-write ends wherever the bytes stopped: `... 1050.0` cut to `... 10` would
load as 10, and a counter that drops reads as a reset (1,100 generated tokens
instead of 100). The text format ends every line with a line feed and
OpenMetrics ends every body with `# EOF`; the parser holds bodies to that.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import finops
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.exposition import ExpositionError, parse

TEXT = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"
LABELS = '{engine="0",model_name="m"}'
BODY = (
    "# HELP vllm:generation_tokens Generated tokens.\n"
    "# TYPE vllm:generation_tokens counter\n"
    f"vllm:generation_tokens_total{LABELS} 1000.0\n"
    f"vllm:prompt_tokens_total{LABELS} 500.0\n"
    f"vllm:num_requests_running{LABELS} 3.0\n"
)


# --------------------------------------------------------------------------- parse()


def test_text_last_line_without_line_feed_is_rejected_and_the_rest_loads() -> None:
    cut = BODY[: BODY.rindex(" 3.0") + 2]  # '... num_requests_running{...} 3' (was 3.0)
    r = parse(cut)
    assert r.samples["name"].to_list() == [
        "vllm:generation_tokens_total",
        "vllm:prompt_tokens_total",
    ]  # the value 3 is not loaded; every complete line before it is
    assert r.samples["value"].to_list() == [1000.0, 500.0]
    (rej,) = r.rejects.to_dicts()
    assert rej["line"] == 5
    assert rej["raw"] == f"vllm:num_requests_running{LABELS} 3"
    assert "line 5" in rej["reason"] and "without a line feed" in rej["reason"]
    assert "truncated" in rej["reason"]


@pytest.mark.parametrize("as_bytes", [False, True])
def test_text_cut_between_cr_and_lf_and_bytes_payloads(as_bytes: bool) -> None:
    crlf = BODY.replace("\n", "\r\n")[:-1]  # the final '\n' of the last '\r\n' never came
    r = parse(crlf.encode() if as_bytes else crlf)
    assert r.samples.height == 2
    assert r.rejects["line"].to_list() == [5]


def test_a_cut_comment_line_is_not_trusted_either() -> None:
    r = parse("a 1\n# HELP a some hel")
    assert r.samples["name"].to_list() == ["a"]
    assert r.rejects["line"].to_list() == [2]
    assert r.metadata.filter(r.metadata["name"] == "a")["help"].to_list() in ([], [None])


@pytest.mark.parametrize(
    "payload",
    ["", "\n", BODY, BODY.encode(), BODY.replace("\n", "\r\n"), "a 1\n   "],
    ids=["empty", "newline", "text", "bytes", "crlf", "trailing-blanks"],
)
def test_complete_bodies_are_unaffected(payload: str | bytes) -> None:
    r = parse(payload)
    assert r.rejects.height == 0, r.rejects.to_dicts()


def test_openmetrics_without_eof_fails_the_whole_body() -> None:
    cut = BODY[: BODY.rindex("1000.0") + 2]  # generation_tokens_total '... 10'
    with pytest.raises(ExpositionError, match=r"no '# EOF' line after 3 lines.*cut off"):
        parse(cut, openmetrics=True)
    with pytest.raises(ExpositionError, match="no '# EOF'"):
        parse(BODY, openmetrics=True)  # every line complete, but the end marker never came


def test_openmetrics_eof_without_final_line_feed_is_complete() -> None:
    """OpenMetrics' grammar makes the line feed after `# EOF` optional."""
    for kw in ({"openmetrics": True}, {}, {"openmetrics": False}):
        r = parse(BODY + "# EOF", **kw)
        assert r.samples.height == 3 and r.rejects.height == 0, (kw, r.rejects.to_dicts())


# --------------------------------------------------------------------------- end to end


@contextlib.contextmanager
def close_delimited(ctype: str, bodies: list[str]) -> Iterator[str]:
    """An HTTP/1.0 server that ends each body by closing the connection (no Content-Length)."""
    answers = iter(bodies)

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.0"

        def do_GET(self) -> None:
            body = next(answers).encode()
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.end_headers()
            self.wfile.write(body)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/metrics"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_a_body_cut_mid_value_does_not_reach_the_lake(tmp_path: Path, openmetrics: bool) -> None:
    def body(v: int) -> str:
        text = (
            f"# TYPE vllm:generation_tokens counter\nvllm:generation_tokens_total{LABELS} {v}.0\n"
        )
        return text + "# EOF\n" if openmetrics else text

    second = body(1050)
    second = second[: second.index("1050.0") + 2]  # vLLM died mid-write: '... 10'
    lake = tmp_path / "lake"
    with close_delimited(
        OPENMETRICS if openmetrics else TEXT, [body(1000), second, body(1100)]
    ) as url:
        cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state")
        cfg.targets.append(make_target({"kind": "vllm", "url": url, "name": "v"}, "t"))
        c = Collector(cfg, status=None)

        async def three() -> list:
            await c._open()
            try:
                return [await c.run_attempt(c.targets[0]) for _ in range(3)]
            finally:
                await c._close()

        outs = asyncio.run(three())

    cut = outs[1]
    if openmetrics:
        assert (cut.up, cut.samples, cut.rejected) == (False, 0, 0)
        assert "no '# EOF'" in (cut.error or "") and "after 2 lines" in (cut.error or "")
    else:
        assert (cut.up, cut.samples, cut.rejected) == (True, 0, 1)
    db = finops.connect(str(lake))
    values = db.sql("SELECT value FROM clean.serving_samples ORDER BY ts").fetchall()
    assert [v for (v,) in values] == [1000.0, 1100.0]  # the cut 10 never landed
    increase = db.sql("SELECT sum(increase), bool_or(reset) FROM clean.serving_increase")
    assert increase.fetchall() == [(100.0, False)]  # no phantom counter reset
    health = db.sql("SELECT up, error FROM scrape_health ORDER BY ts").fetchall()
    assert [up for up, _ in health] == [True, not openmetrics, True]
    if not openmetrics:
        (rej,) = db.sql("SELECT location, raw, reason FROM rejects").fetchall()
        assert rej[0] == f"{url}:2"
        assert rej[1] == f"vllm:generation_tokens_total{LABELS} 10"
        assert "without a line feed" in rej[2]
