"""Shim parts on their own: request-log rotation, explicit-model policy, Redis-shared cache, file watch."""

from __future__ import annotations

import dataclasses
import errno
import os
import shutil
import socket
import subprocess
import time

import httpx
import orjson
import pytest

from finops.lake import Lake
from finops.loopback import free_port
from finops.shim import from_flags, serve_in_thread
from finops.shim.cache import (
    MemoryCache,
    assemble_stream,
    cache_key,
    is_deterministic,
    replay_as_sse,
)
from finops.shim.config import load_config
from finops.shim.fakeupstream import FakeUpstream
from finops.shim.requestlog import RequestLog, iso_utc, new_record, redact
from finops.shim.server import run_app_in_thread

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}


def _rec(i: int) -> dict:
    r = new_record()
    r.update(
        request_id=f"r{i}",
        ts="2026-11-28T10:00:00.000001Z",
        source="shim",
        status_code=200,
        input_tokens=i,
    )
    return r


def test_requestlog_rotates_by_size_and_time_and_closes_cleanly(tmp_path):
    log = RequestLog(tmp_path, rotate_bytes=2000, rotate_s=3600, interval=0.01)
    for i in range(60):
        log.write(_rec(i))
        if i % 10 == 9:
            log.flush()
    for i in range(60, 100):  # one batch far larger than a file: split at record boundaries
        log.write(_rec(i))
    log.close()
    files = sorted(tmp_path.iterdir(), key=lambda p: int(p.name.split("-")[3]))  # by sequence
    assert len(files) > 4 and all(p.name.endswith(".jsonl") for p in files)
    one = len(orjson.dumps(_rec(99))) + 1
    assert max(p.stat().st_size for p in files) <= 2000 + one
    rows = [orjson.loads(x) for p in files for x in p.read_bytes().splitlines()]
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(100)]
    res = Lake(tmp_path.parent / "lake").append("requests", rows, source="shim")
    assert (res.loaded, res.rejected) == (100, 0)
    # time rotation: an idle open file is closed (renamed) once it is older than rotate_s
    t = tmp_path / "t"
    log = RequestLog(t, rotate_s=0.2, interval=0.05)
    log.write(_rec(1))
    log.flush()
    deadline = time.monotonic() + 5
    while not list(t.glob("*.jsonl")) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(t.glob("*.jsonl")) and not list(t.glob("*.open"))
    log.close()


def test_requestlog_survives_write_errors(tmp_path):
    d = tmp_path / "gone"
    log = RequestLog(d, interval=0.01)
    log.write(_rec(1))
    assert log.flush()
    log._close_file()  # the folder vanishes (a clean-up job, disk unmounted) between files
    shutil.rmtree(d)
    log.write(_rec(2))
    assert log.flush()  # the folder is made again: nothing lost
    log.write(_rec(3))
    assert log.flush()
    log.close()
    assert (log.written, log.errors) == (3, 0)
    assert sorted(r["request_id"] for r in _lines(d)) == ["r2", "r3"]  # r1 left with the folder


def test_requestlog_backlog_is_measured_and_warned_about(tmp_path, upstream, monkeypatch, caplog):
    """A stuck disk: records wait in memory (none dropped), the gauge and a warning say so."""
    import threading

    from finops.shim import app as shim_app

    _, url = upstream
    monkeypatch.setattr(shim_app, "LOG_BACKLOG_WARN", 5)
    with serve_in_thread(from_flags([f"small={url}"], log_dir=tmp_path / "log")) as h:
        log = h.shim.log
        stuck = threading.Event()
        real = log._write_batch
        monkeypatch.setattr(log, "_write_batch", lambda lines: stuck.wait(20) and real(lines))
        for _ in range(8):
            assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
        deadline = time.monotonic() + 5
        while log.backlog < 7 and time.monotonic() < deadline:  # one batch may be in the writer
            time.sleep(0.02)
        with caplog.at_level("WARNING", logger="finops.shim"):
            h.shim.refresh_gauges()
        m = httpx.get(h.url + "/metrics").text
        value = float(m.split("\nfinops_shim_log_backlog ")[1].split()[0])
        assert value >= 7
        assert "records waiting for the disk" in caplog.text
        stuck.set()
        assert log.flush()
        h.shim.refresh_gauges()
        assert log.backlog == 0 and log.written == 8
        m = httpx.get(h.url + "/metrics").text
        assert "\nfinops_shim_log_backlog 0.0" in m


class _FailingFile:
    """Wraps a real file; once `budget` is set, lets that many more bytes in, then ENOSPC."""

    budget: int | None = None

    def __init__(self, fh):
        self._fh = fh

    def write(self, data):
        budget = _FailingFile.budget
        if budget is None:
            return self._fh.write(data)
        if budget == 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        part = bytes(data[:budget])
        _FailingFile.budget = budget - len(part)
        self._fh.write(part)
        if hasattr(self._fh, "flush"):
            self._fh.flush()
        return len(part)

    def __getattr__(self, name):
        return getattr(self._fh, name)


def _lines(folder, pattern="*.jsonl"):
    return [
        orjson.loads(x) for p in sorted(folder.glob(pattern)) for x in p.read_bytes().splitlines()
    ]


def test_requestlog_write_error_closes_the_file_out_and_keeps_whole_records(tmp_path, monkeypatch):
    """Disk full mid-batch: the whole lines stay (renamed to .jsonl), the rest wait for space."""
    import builtins

    from finops.shim import requestlog as rl

    def failing_open(*a, **k):
        return _FailingFile(builtins.open(*a, **k))

    monkeypatch.setattr(rl, "open", failing_open, raising=False)
    monkeypatch.setattr(_FailingFile, "budget", None)
    log = RequestLog(tmp_path, rotate_bytes=1 << 30, rotate_s=3600, fsync=False, interval=0.01)
    for i in range(5):
        log.write(_rec(i))
    assert log.flush()
    one = len(orjson.dumps(_rec(5))) + 1
    _FailingFile.budget = one + 10  # r5 whole, r6 cut short, r7 not at all
    for i in range(5, 8):
        log.write(_rec(i))
    assert not log.flush(timeout=0.3)  # r6 and r7 wait in memory for the disk
    # closed out right away, not only at exit: an ingester of *.jsonl sees every whole record
    assert not list(tmp_path.glob("*.open"))
    assert [r["request_id"] for r in _lines(tmp_path)] == [f"r{i}" for i in range(6)]
    assert (log.written, log.errors, log.backlog) == (6, 0, 2)
    assert "No space left" in (log.last_error or "")
    _FailingFile.budget = None  # space again: a new file, the held records first
    for i in range(8, 11):
        log.write(_rec(i))
    assert log.flush()
    log.close()
    rows = _lines(tmp_path)
    assert [r["request_id"] for r in rows] == [f"r{i}" for i in range(11)]
    assert (log.written, log.errors) == (11, 0) and len(rows) == log.written
    assert sorted(tmp_path.iterdir()) == sorted(log.files) and len(log.files) == 2


def test_requestlog_failed_rotation_keeps_the_records_and_renames_later(tmp_path, monkeypatch):
    """A batch that was written counts as written even if the rename fails; it is retried."""
    real = {name: getattr(os, name) for name in ("link", "rename", "replace")}
    broken = {"on": True}

    def failing(name):
        def call(*a, **k):
            if broken["on"]:
                raise OSError(errno.EIO, "Input/output error")
            return real[name](*a, **k)

        return call

    for name in real:
        monkeypatch.setattr(os, name, failing(name))
    log = RequestLog(tmp_path, rotate_bytes=1, rotate_s=3600, fsync=False, interval=0.01)
    log.write(_rec(1))
    assert log.flush()
    assert (log.written, log.errors) == (1, 0)
    assert "Input/output" in (log.last_error or "")
    assert len(list(tmp_path.glob("*.jsonl.open"))) == 1  # closed, waiting for its rename
    broken["on"] = False
    log.write(_rec(2))
    assert log.flush()
    log.close()
    assert not list(tmp_path.glob("*.open"))
    assert sorted(r["request_id"] for r in _lines(tmp_path)) == ["r1", "r2"]
    assert (log.written, log.errors) == (2, 0)


def test_requestlog_names_are_unique_and_never_overwritten(tmp_path, monkeypatch):
    """Two writers of one pid in one second (or pid 1 restarted) keep every record."""
    import datetime as dt
    import types

    from finops.shim import requestlog as rl

    class Frozen(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime(2026, 11, 28, 10, 0, 0, tzinfo=tz)

    monkeypatch.setattr(rl, "dt", types.SimpleNamespace(datetime=Frozen, UTC=dt.UTC))
    tokens = iter(["same", "same"] + [f"t{i}" for i in range(100)])  # 2nd writer: taken name
    monkeypatch.setattr(rl, "_token", lambda: next(tokens), raising=False)
    a = RequestLog(tmp_path, fsync=False, interval=0.01)
    for i in range(3):
        a.write(_rec(i))
    a.close()
    b = RequestLog(tmp_path, fsync=False, interval=0.01)
    for i in range(3, 5):
        b.write(_rec(i))
    b.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2 and sorted(a.files + b.files) == files
    assert sorted(r["request_id"] for r in _lines(tmp_path)) == [f"r{i}" for i in range(5)]
    assert {f.name.split("-")[2] for f in files} == {str(os.getpid())}  # the pid field
    # recovery of a dead pid touches only that pid's files, not a seq that equals it
    other = tmp_path / "o"
    other.mkdir()
    (other / "requests-20261128T100000Z-999-1234-abcd.jsonl.open").write_bytes(b"{}\n")
    (other / "requests-20261128T100000Z-1234-0001-abcd.jsonl.open").write_bytes(b"{}\n{")
    (other / "requests-20261128T100000Z-1234-0001-abcd.jsonl").write_bytes(b"{}\n")
    (done,) = rl.recover_open_files(other, 1234)
    assert done.name.split("-")[2] == "1234" and done.read_bytes() == b"{}\n"
    assert sorted(p.name for p in other.iterdir()) == [
        "requests-20261128T100000Z-1234-0001-abcd.jsonl",  # kept, not overwritten
        done.name,
        "requests-20261128T100000Z-999-1234-abcd.jsonl.open",
    ]


def test_iso_utc_matches_datetime_including_rounding_carries():
    """The per-second cached stamp equals datetime's own text, microsecond rounding too."""
    import datetime as dt
    import random

    def ref(ts: float) -> str:
        d = dt.datetime.fromtimestamp(ts, dt.UTC)
        return d.isoformat(timespec="microseconds").replace("+00:00", "Z")

    rng = random.Random(7)
    edges = [0.0, 1.9999995, 1.9999994999, 1700000000.4999995, 86399.9999996, -1.5, -4e-7]
    stamps = edges + [rng.uniform(-1e9, 4e9) for _ in range(20_000)]
    stamps += [round(rng.uniform(1e9, 2e9), 6) + 5e-7 for _ in range(20_000)]  # half-way cases
    stamps += [1764000000 + i / 7 for i in range(2_000)]  # runs within one second (cache hits)
    assert [iso_utc(t) for t in stamps] == [ref(t) for t in stamps]


def test_redaction():
    s = redact(
        "Reach me at a.b-c@corp.example.org, +44 20 7946 0958 or (415) 555-0100; acct 0012345678."
    )
    assert "corp.example" not in s and "7946" not in s and "555" not in s and "12345678" not in s
    assert s.count("[EMAIL]") == 1 and s.count("[PHONE]") == 2 and s.count("[NUMBER]") == 1
    assert redact("order 42 shipped in 2026") == "order 42 shipped in 2026"
    assert redact("mail john.doe+work@example.co.uk now") == "mail [EMAIL] now"
    phones = [
        "+44 20 7946 0958",
        "+33 1 23 45 67 89",
        "+91 98765 43210",
        "+49 30 1234567",
        "+1 (555) 123-4567",
        "(555) 123-4567",
        "555-123-4567",
        "020 7946 0958",
    ]
    for phone in phones:
        assert redact(f"call {phone} today") == "call [PHONE] today", phone
    more_phones = [
        "0033 1 23 45 67 89",  # 00 instead of +
        "0044 20 7946 0958",
        "+33 (0)6 12 34 56 78",  # trunk 0 in brackets
        "01 23 45 67 89",  # French national, spaces or dots
        "06.12.34.56.78",
        "8 (495) 123-45-67",  # Russian
        "(11) 91234-5678",  # Brazilian
        "555 0100",
        # extensions, Unicode dashes and no-break separators (word processors), India's 5-5
        "202-555-0143x123",
        "(415) 555-0100 ext. 12",
        "+1 415 555 0100 x2",
        "415\u2013555\u20130199",
        "415\u2011555\u20110188",
        "415\u2212555\u22120188",
        "415\xa0555\xa00100",
        "91-98765-43210",
    ]
    for phone in more_phones:
        assert redact(f"call {phone} today") == "call [PHONE] today", phone
    # a label's dot before the number (not a number's: 1.555-0100 is no phone)
    assert redact("Tel.415.555.0100 or Ph.415-555-0100") == "Tel.[PHONE] or Ph.[PHONE]"
    assert redact("card 4111\xa01111\u202f1111\u20091111 ok") == "card [NUMBER] ok"
    cards = ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "3782 822463 10005"]
    cards += [
        "4111.1111.1111.1111",
        "4111 1111  1111 1111",
        "4111 - 1111 - 1111 - 1111",
        "4111_1111_1111_1111",
        "123-45-6789",  # US SSN
        "123 45 6789",
    ]
    for card in cards:
        assert redact(f"card {card} ok") == "card [NUMBER] ok", card
    for email in ["josé@exemple.fr", "bob@例え.jp", "john.o'brien@example.com"]:
        assert redact(f"mail {email} now") == "mail [EMAIL] now", email
    assert redact("say 'bob@x.io' ok") == "say '[EMAIL]' ok"
    for text in [
        "in 2023 1500 people came",
        "ip 192.168.100.200 and 10.0.0.1",
        "between 1990 and 2000 years",
        "meeting 2024-01-15 at 10:30",
        "version 1.2.3 and 3.11.4",
        "price 1,234,567 dollars, code 12345",
        "at 2026-12-03 10:30:00, and 03.12.2026",
        "scores 10 20 30 40 50",
        "temperature 273.1500 K, ratio 123.4567",
        "version 1.555.1234 and 2.555-0100, 10 x 20 mm",
    ]:
        assert redact(text) == text


def test_redaction_is_linear_on_long_runs():
    """Runs the patterns can start anywhere in (no @, no separators to stop at) once took
    seconds for 40 kB (quadratic): the log redacts prompts on the event loop."""
    import time

    small, big = 4_000, 40_000
    for unit in ("1-", "a.", "a", "0", "1.2.", "a'"):
        t0 = time.perf_counter()
        redact(unit * (small // len(unit)))
        t_small = time.perf_counter() - t0
        t0 = time.perf_counter()
        redact(unit * (big // len(unit)))
        t_big = time.perf_counter() - t0
        # 10x the text: linear is ~10x, quadratic ~100x; generous for noisy machines
        assert t_big < 40 * t_small + 0.05, (unit, t_small, t_big)


def test_prompt_log_text_redacts_every_prompt_and_the_cut():
    from finops.shim.proxy import PROMPT_LOG_CHARS, PROMPT_WINDOW_SLACK, _prompt_text

    got = _prompt_text(
        {"prompt": ["Card:\n4111 1111 1111 1111", "tab\t415-555-0100", "x\tbob@x.io"]}
    )
    assert got == "Card:\n[NUMBER]\ntab\t[PHONE]\nx\t[EMAIL]"
    # the text the router reads: a token-ID prompt and a tool-call-only turn have none
    assert _prompt_text({"prompt": [[1, 2], [3]]}) == ""
    tool_turn = {"role": "assistant", "content": None, "tool_calls": []}
    assert _prompt_text({"messages": [tool_turn]}) == ""
    # redaction shortens the text (e-mails become [EMAIL]): an address the raw window's
    # edge split must not be kept either
    edge = PROMPT_LOG_CHARS + PROMPT_WINDOW_SLACK - 10  # john's address across the edge
    many = ("someone.longname.here@example-company.com " * 1000)[:edge]
    got = _prompt_text({"prompt": many + "john.smith@example.com and more text " * 2000})
    assert "john" not in got and "smith" not in got and "@" not in got
    assert len(got) > PROMPT_LOG_CHARS, "the whole logged length, not what the window held"
    assert "[EMA " not in got and "\n[... the middle is not logged: the prompt has " in got
    assert got.endswith("text ")
    # shortened by redaction to fit: kept whole, no cut
    fits = many + "john.smith@example.com"
    assert _prompt_text({"prompt": fits}) == " ".join(["[EMAIL]"] * fits.count("@"))
    # a card across the cut: no part of it is kept, wherever the cut falls
    for offset in range(-20, 300, 7):
        text = "x" * (PROMPT_LOG_CHARS + offset) + " 4111 1111 1111 1111 " + "y" * 500
        got = _prompt_text({"prompt": text})
        assert "4111" not in got and "1111" not in got, offset
        assert "[... the middle is not logged" in got and got.endswith("y" * 500), offset
        assert len(got) < PROMPT_LOG_CHARS + 100


def test_cache_key_normalization_and_determinism():
    a = {"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": "hi\r\n"}]}
    b = {
        "messages": [{"content": "  hi", "role": "user"}],
        "temperature": 0.0,
        "n": 1,
        "top_p": 1,
        "stream": True,
        "model": "x",
    }
    assert cache_key("t", "chat", a, "small") == cache_key("t", "chat", b, "small")
    assert cache_key("t", "chat", a, "small") != cache_key("u", "chat", a, "small")
    # seeded sampling: a missing top_p is the model's generation-config default, not 1.0
    s1 = {**a, "temperature": 0.7, "seed": 1}
    assert cache_key("t", "chat", s1, "small") != cache_key(
        "t", "chat", {**s1, "top_p": 1}, "small"
    )
    assert cache_key("t", "chat", a, "small") != cache_key(
        "t", "chat", {**a, "max_tokens": 5}, "small"
    )
    assert (
        is_deterministic(a)
        and is_deterministic({"seed": 3})
        and not is_deterministic({"temperature": 0.2})
    )
    assert not is_deterministic({"temperature": 0, "n": 2}) and not is_deterministic({})
    # a replay cannot rebuild logprobs: such requests are not cached
    assert not is_deterministic({"temperature": 0, "logprobs": True, "top_logprobs": 2})
    assert not is_deterministic({"temperature": 0, "logprobs": 3})
    # logprobs 0 still returns the sampled token's logprob; prompt_logprobs is vLLM's
    assert not is_deterministic({"temperature": 0, "logprobs": 0})
    assert not is_deterministic({"temperature": 0, "prompt_logprobs": 0})
    assert is_deterministic({"temperature": 0, "logprobs": False, "logprobs_x": 1})
    assert is_deterministic({"temperature": 0, "logprobs": None})


def test_cache_key_shares_no_answer_vllm_would_give_differently():
    """Each pair below gets different answers from vLLM, so different keys."""
    a = {"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    key = lambda b, op="chat": cache_key("t", op, b, "small")  # noqa: E731
    # vLLM fills a missing penalty from the model's generation_config, not with 0
    for pen in ("presence_penalty", "frequency_penalty"):
        assert key({**a, pen: 0}) != key(a), pen
    # several text parts are joined with a newline: a space inside stays in the prompt
    parts = lambda *t: {  # noqa: E731
        **a,
        "messages": [{"role": "user", "content": [{"type": "text", "text": x} for x in t]}],
    }
    assert key(parts("Hello ", "world")) != key(parts("Hello", "world"))
    assert key(parts(" hi ")) == key(parts("hi"))  # one part: trimmed as a string is
    # a tool's or a schema's 2.0 is rendered "2.0" (tojson), another prompt than 2
    tool = {"type": "function", "function": {"name": "f", "parameters": {"maximum": 2.0}}}
    tool2 = {"type": "function", "function": {"name": "f", "parameters": {"maximum": 2}}}
    assert key({**a, "tools": [tool]}) != key({**a, "tools": [tool2]})
    assert key({**a, "max_tokens": 5.0}) == key({**a, "max_tokens": 5})  # a scalar is a count
    # a number past 64 bits is keyed (it was a 500: orjson writes no such int)
    assert key({**a, "max_tokens": 1e20}) == key({**a, "max_tokens": 1e20})
    assert key({**a, "logit_bias": {"5": 1e30}}) != key(a)
    # completions' logprobs is a count: vLLM reads false as 0 (logprobs asked for)
    comp = {"model": "auto", "temperature": 0, "prompt": "hi"}
    assert not is_deterministic({**comp, "logprobs": False}, "text_completion")
    assert is_deterministic({**comp, "logprobs": None}, "text_completion")
    assert is_deterministic({**a, "logprobs": False}, "chat")  # chat's is a flag
    assert key({**a, "logprobs": False}) == key(a)  # and false is what a missing one means
    assert not is_deterministic({**a, "prompt_logprobs": False}, "chat")  # a count


def test_cache_key_keeps_invalid_sampling_knobs_and_optionally_whitespace():
    """Greedy requests drop top_p/top_k/min_p from the key only when vLLM would accept
    them: an invalid one must miss and get vLLM's 400, not a warm cache's 200. With
    normalize_whitespace off, message text is keyed as sent."""
    a = {"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    plain = cache_key("t", "chat", a, "small")
    for k, ok, bad in (("top_p", 0.5, 5), ("top_k", -1, -7), ("min_p", 0.1, 3), ("top_k", 5, 1.5)):
        assert cache_key("t", "chat", {**a, k: ok}, "small") == plain, (k, ok)
        assert cache_key("t", "chat", {**a, k: bad}, "small") != plain, (k, bad)
    assert cache_key("t", "chat", {**a, "top_p": None}, "small") == plain
    spaced = {**a, "messages": [{"role": "user", "content": "hi\n"}]}
    assert cache_key("t", "chat", spaced, "small") == plain
    assert cache_key("t", "chat", spaced, "small", whitespace=False) != cache_key(
        "t", "chat", a, "small", whitespace=False
    )


def test_cache_key_keeps_every_string_but_message_text_as_sent():
    chat = {"model": "auto", "temperature": 0, "messages": [{"role": "user", "content": "hi"}]}
    stops = [cache_key("t", "chat", {**chat, "stop": s}, "small") for s in ("\n", "\n\n", " ", "")]
    assert len(set(stops)) == 4, "a stop sequence is not text to tidy"
    tool = {"type": "function", "function": {"name": "f", "description": "x "}}
    assert cache_key("t", "chat", {**chat, "tools": [tool]}, "small") != cache_key(
        "t",
        "chat",
        {**chat, "tools": [{**tool, "function": {"name": "f", "description": "x"}}]},
        "small",
    )
    comp = {"model": "auto", "temperature": 0, "prompt": "Hello "}
    assert cache_key("t", "completions", comp, "small") != cache_key(
        "t", "completions", {**comp, "prompt": "Hello"}, "small"
    ), "a trailing space in a prompt changes the tokens"
    parts = {
        **chat,
        "messages": [{"role": "user", "content": [{"type": "text", "text": " hi\r\n"}]}],
    }
    same = {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}
    assert cache_key("t", "chat", parts, "small") == cache_key("t", "chat", same, "small")
    # the tier's model is part of the target: another model is another entry
    assert cache_key("t", "chat", chat, "small\x00llama-8b") != cache_key(
        "t", "chat", chat, "small\x00qwen-7b"
    )


def test_assembled_stream_rebuilds_text_tool_calls_and_refuses_what_it_cannot():
    base = {"id": "c1", "object": "chat.completion.chunk", "created": 5, "model": "m"}

    def ev(delta, finish=None, **extra):
        return {**base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish, **extra}]}

    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    events = [
        ev({"role": "assistant", "content": "", "reasoning_content": None}),
        ev({"reasoning_content": "think"}),
        ev(
            {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": "a",
                        "type": "function",
                        "function": {"name": "f", "arguments": ""},
                    }
                ]
            }
        ),
        ev({"tool_calls": [{"index": 0, "function": {"arguments": '{"x": '}}]}),
        ev(
            {
                "tool_calls": [
                    {
                        "index": 1,
                        "id": "b",
                        "type": "function",
                        "function": {"name": "g", "arguments": "{}"},
                    }
                ]
            }
        ),
        ev({"tool_calls": [{"index": 0, "function": {"arguments": "1}"}}]}),
        ev({}, "tool_calls", stop_reason=None),
        {**base, "choices": [], "usage": usage},
    ]
    full = assemble_stream(events, "chat")
    assert full is not None
    msg = full["choices"][0]["message"]
    assert msg["content"] is None and msg["reasoning_content"] == "think"
    assert [c["function"] for c in msg["tool_calls"]] == [
        {"name": "f", "arguments": '{"x": 1}'},
        {"name": "g", "arguments": "{}"},
    ]
    assert [c["id"] for c in msg["tool_calls"]] == ["a", "b"] and full["usage"] == usage
    # the replay of the rebuilt answer streams the same calls back
    replayed = [orjson.loads(e[6:]) for e in replay_as_sse(full, "chat", True) if e[6:7] == b"{"]
    assert assemble_stream(replayed, "chat") == full
    # what a replay could not give back is not cached at all
    assert assemble_stream([ev({"content": "a"}, logprobs={"content": []})], "chat") is None
    assert assemble_stream([ev({"function_call": {"name": "f"}})], "chat") is None
    assert assemble_stream([{**base, "choices": [None]}], "chat") is None
    done = {"index": 0, "text": "a ", "finish_reason": "stop"}
    assert (
        assemble_stream([{**base, "choices": [done]}], "completions")["choices"][0]["text"] == "a "
    )
    # an answer cut short: a choice that never finished, or an in-band error event
    unfinished = {"index": 0, "text": "a "}
    assert assemble_stream([{**base, "choices": [unfinished]}], "completions") is None
    err = {"error": {"message": "engine died", "code": 500}}
    assert assemble_stream([{**base, "choices": [done]}, err], "completions") is None


async def test_memory_cache_ttl_and_bounds():
    c = MemoryCache(max_entries=3, max_bytes=100)
    for i in range(4):
        await c.set(f"k{i}", b"x" * 10, 60)
    assert await c.get("k0") is None and len(c) == 3  # LRU entry bound
    await c.set("big", b"x" * 90, 60)
    assert c.bytes <= 100
    await c.set("short", b"y", 0.01)
    time.sleep(0.02)
    assert await c.get("short") is None


def test_explicit_model_policies(tmp_path, upstream):
    f, url = upstream
    base = from_flags([f"small={url}", f"large={url}"], log_dir=tmp_path / "log")
    deny = dataclasses.replace(base, explicit="deny")
    with serve_in_thread(deny) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "large"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        assert httpx.post(h.base_url + "/chat/completions", json=CHAT).status_code == 200
    rr = dataclasses.replace(base, explicit="reroute", reroute={"large": "auto", "gpt-4o": "small"})
    with serve_in_thread(rr) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "large"})
        assert r.headers["x-finops-tier"] == "small"  # classified by the router instead
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": "gpt-4o"})
        assert r.status_code == 200 and f.bodies[-1]["model"] == "small"


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip(
            "redis-server is not installed (Debian: apt-get install -y redis-server; .ci/run installs it)"
        )
    port = free_port()
    p = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    p.terminate()
    p.wait(10)


def test_redis_backend_shares_cache_and_idempotency_across_replicas(tmp_path, upstream, redis_url):
    f, url = upstream
    cfg = from_flags([f"small={url}"], api_keys=["k1=acme", "k2=globex"], log_dir=tmp_path / "log")
    cfg = dataclasses.replace(cfg, redis_url=redis_url)
    a = {"authorization": "Bearer k1"}
    det = {**CHAT, "temperature": 0}
    with (
        serve_in_thread(cfg) as r1,
        serve_in_thread(dataclasses.replace(cfg, log_dir=tmp_path / "log2")) as r2,
    ):
        x = httpx.post(r1.base_url + "/chat/completions", json=det, headers=a)
        y = httpx.post(r2.base_url + "/chat/completions", json=det, headers=a)
        assert (x.headers["x-finops-cache"], y.headers["x-finops-cache"]) == ("miss", "hit")
        assert x.json()["id"] != y.json()["id"]  # a hit has its own id
        assert {**x.json(), "id": None} == {**y.json(), "id": None} and f.calls == 1
        z = httpx.post(
            r2.base_url + "/chat/completions", json=det, headers={"authorization": "Bearer k2"}
        )
        assert z.headers["x-finops-cache"] == "miss"  # another tenant never shares the entry
        hd = {**a, "idempotency-key": "pay-1"}
        i1 = httpx.post(
            r1.base_url + "/chat/completions", json={**CHAT, "temperature": 1}, headers=hd
        )
        i2 = httpx.post(
            r2.base_url + "/chat/completions", json={**CHAT, "temperature": 1}, headers=hd
        )
        assert i1.json() == i2.json() and i2.headers["x-finops-cache"] == "hit" and f.calls == 3


def test_redis_outage_does_not_fail_requests(tmp_path, upstream):
    _, url = upstream
    cfg = dataclasses.replace(
        from_flags([f"small={url}"], log_dir=tmp_path / "log"),
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    with serve_in_thread(cfg) as h:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "temperature": 0})
        assert r.status_code == 200


def test_a_redis_that_stops_answering_costs_requests_little(tmp_path, upstream, caplog):
    """A Redis that accepts connections and never answers (hung, or a black-holed route):
    one call waits out a short timeout, then Redis is skipped for a cool-down."""
    _, url = upstream
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)  # accepted by the kernel, never read or answered
    cfg = dataclasses.replace(
        from_flags([f"small={url}"], log_dir=tmp_path / "log"),
        redis_url=f"redis://127.0.0.1:{hole.getsockname()[1]}/0",
    )
    try:
        with serve_in_thread(cfg) as h:
            took = []
            for i in range(6):
                t0 = time.perf_counter()
                r = httpx.post(
                    h.base_url + "/chat/completions",
                    json={**CHAT, "temperature": 0},
                    headers={"idempotency-key": f"k{i}"},
                    timeout=30,
                )
                took.append(time.perf_counter() - t0)
                assert r.status_code == 200
            # one short timeout (0.25 s a call, was 2 s), then skipped, not waited on again
            assert took[0] < 1.5 and max(took[1:]) < 1.0, took
            assert caplog.text.count("cache get failed") == 1
    finally:
        hole.close()


def test_file_watch_reloads_config(tmp_path, upstream):
    _, url = upstream
    conf = tmp_path / "shim.toml"
    conf.write_text(f'[server]\nwatch = true\n[tiers.small]\nupstreams = ["{url}"]\n')
    with serve_in_thread(load_config(conf)) as h:
        time.sleep(0.3)
        conf.write_text(
            f'[server]\nwatch = true\n[tiers.small]\nupstreams = ["{url}"]\n[routing]\nextra_aliases = ["cheap"]\n'
        )
        assert _status_once_served(h, "cheap") == 200
        # an editor's save: a new file renamed over the old one (the old file's watch dies)
        tmp = tmp_path / ".shim.toml.swp"
        tmp.write_text(
            f'[server]\nwatch = true\n[tiers.small]\nupstreams = ["{url}"]\n[routing]\nextra_aliases = ["thrifty"]\n'
        )
        tmp.replace(conf)
        assert _status_once_served(h, "thrifty") == 200


def _status_once_served(h, model: str, timeout: float = 10.0) -> int | None:
    """Ask for `model` until it is served (a reload picked it up) or time runs out."""
    deadline = time.monotonic() + timeout
    code = None
    while time.monotonic() < deadline:
        r = httpx.post(h.base_url + "/chat/completions", json={**CHAT, "model": model})
        code = r.status_code
        if code == 200:
            break
        time.sleep(0.2)
    return code


def test_least_outstanding_spreads_concurrent_load(tmp_path):
    import concurrent.futures as cf

    fa, fb = (
        FakeUpstream("slow", tokens=5, delay_s=0.05),
        FakeUpstream("slow", tokens=5, delay_s=0.05),
    )
    ha, hb = run_app_in_thread(fa), run_app_in_thread(fb)
    try:
        cfg = from_flags([f"small={ha.url}", f"small={hb.url}"], log_dir=tmp_path / "log")
        with serve_in_thread(cfg) as h, cf.ThreadPoolExecutor(8) as ex:
            codes = list(
                ex.map(
                    lambda _: (
                        httpx.post(
                            h.base_url + "/chat/completions",
                            json={**CHAT, "max_tokens": 5},
                            timeout=10,
                        ).status_code
                    ),
                    range(16),
                )
            )
        assert codes == [200] * 16
        assert fa.calls + fb.calls == 16 and min(fa.calls, fb.calls) >= 5, (fa.calls, fb.calls)
    finally:
        ha.stop(2)
        hb.stop(2)


def test_readyz_reports_unreachable_tiers(tmp_path, upstream):
    _, url = upstream
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_in_thread(
        from_flags([f"small={url}", f"large={dead}"], log_dir=tmp_path / "log")
    ) as h:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            r = httpx.get(h.url + "/readyz")
            if (
                r.json()["tiers"]["large"]["reachable"] == []
                and r.json()["tiers"]["small"]["reachable"]
            ):
                break
            time.sleep(0.1)
        assert r.status_code == 503 and r.json()["ready"] is False
        assert r.json()["router_version"] == "rules-v1"
        assert httpx.get(h.url + "/healthz").status_code == 200
        # vLLM's liveness path answers the same (probes written for vLLM keep working)
        health = httpx.get(h.url + "/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
    with serve_in_thread(from_flags([f"small={url}"], log_dir=tmp_path / "log2")) as h:
        deadline = time.monotonic() + 10
        while httpx.get(h.url + "/readyz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert httpx.get(h.url + "/readyz").status_code == 200


def test_readyz_is_ready_while_fallback_serves_and_not_when_nothing_does(tmp_path, upstream):
    """A cheap tier down is served by the tier above it (ready, listed as degraded: a
    readiness probe took every shim out over one tier); every circuit open is not
    ready (it said ready with nothing serving)."""
    _, url = upstream
    dead = f"http://127.0.0.1:{free_port()}"
    cfg = from_flags([f"small={dead}", f"large={url}"], log_dir=tmp_path / "log")
    with serve_in_thread(cfg) as h:
        deadline = time.monotonic() + 10
        while httpx.get(h.url + "/readyz").status_code != 200:
            assert time.monotonic() < deadline, httpx.get(h.url + "/readyz").text
            time.sleep(0.05)
        r = httpx.get(h.url + "/readyz").json()
        assert r["degraded"] == ["small"] and r["tiers"]["small"]["served_by"] == "large"
        for u in h.shim.pool.all():
            u.breaker.failures_to_open = 1
            u.breaker.failure(time.monotonic(), u.breaker.ticket())  # every circuit open
        r = httpx.get(h.url + "/readyz")
        assert r.status_code == 503 and r.json()["tiers"]["large"]["serving"] == []
        assert r.json()["tiers"]["large"]["reachable"] == [url]


def test_read_deadline_counts_only_time_spent_reading():
    """One lazy timer per stream: a slow reader times out, a slow consumer does not, and
    a cancel from elsewhere stays a cancel."""
    import asyncio

    from finops.shim.h1client import ReadDeadline

    async def reads(dl: ReadDeadline, waits: list[float]) -> int:
        done = 0
        for w in waits:
            await dl.read(asyncio.sleep(w))
            done += 1
            await asyncio.sleep(0.15)  # the consumer's own time (a slow client)
        return done

    async def main() -> None:
        dl = ReadDeadline(0.1)
        assert await reads(dl, [0.01, 0.01, 0.01]) == 3  # 0.45 s in all, reads are quick
        dl.close()
        dl = ReadDeadline(0.1)
        with pytest.raises(TimeoutError):
            await reads(dl, [0.01, 0.5])
        dl.close()

        async def cancelled_from_outside() -> None:
            dl = ReadDeadline(0.2)
            try:
                await reads(dl, [5.0])
            finally:
                dl.close()

        t = asyncio.create_task(cancelled_from_outside())
        await asyncio.sleep(0.05)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t

    asyncio.run(main())


def test_cache_fidelity_to_vllm():
    """Found against a real vLLM: ids asked for per token cannot be replayed; with tools a
    stream and a plain request get different answers; a hit keeps vLLM's fingerprint and
    stop_reason, and chat chunks carry `logprobs: null` as vLLM's do."""
    greedy = {"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 0}
    assert is_deterministic(greedy)
    assert not is_deterministic({**greedy, "return_token_ids": True})
    assert is_deterministic({**greedy, "return_token_ids": False})
    key = lambda b: cache_key("t", "chat", b, "small")  # noqa: E731
    assert key({**greedy, "stream": True}) == key(greedy)
    tools = {**greedy, "tools": [{"type": "function", "function": {"name": "f"}}]}
    assert key({**tools, "stream": True}) != key(tools)
    assert key({**tools, "stream": False}) == key(tools)

    base = {"id": "c1", "created": 1, "model": "m", "object": "chat.completion.chunk"}
    events = [
        {**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
        {
            **base,
            "choices": [{"index": 0, "delta": {}, "finish_reason": "stop", "stop_reason": "###"}],
        },
        {**base, "choices": [], "usage": {"prompt_tokens": 2}, "system_fingerprint": "vllm-0.32"},
    ]
    resp = assemble_stream(events, "chat")
    assert resp["system_fingerprint"] == "vllm-0.32"
    assert resp["choices"][0]["stop_reason"] == "###"
    replay = [orjson.loads(e[6:]) for e in replay_as_sse(resp, "chat", True)[:-1]]
    assert all(e["system_fingerprint"] == "vllm-0.32" for e in replay)
    assert all(c["logprobs"] is None for e in replay for c in e["choices"])
    finish = [c for e in replay for c in e["choices"] if c.get("finish_reason")]
    assert finish == [
        {"index": 0, "delta": {}, "finish_reason": "stop", "logprobs": None, "stop_reason": "###"}
    ]
    # replayed plain, a rebuilt answer has the null fields vLLM's own plain answer has
    length = {**events[1], "choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}
    plain = assemble_stream([events[0], length], "chat")
    choice, msg = plain["choices"][0], plain["choices"][0]["message"]
    assert choice["stop_reason"] is None and choice["logprobs"] is None
    assert msg["refusal"] is None and "tool_calls" not in msg
    assert plain["system_fingerprint"] is None and plain["kv_transfer_params"] is None
    done = {"index": 0, "text": "a", "finish_reason": "stop"}
    text = assemble_stream(
        [{**base, "object": "text_completion", "choices": [done]}], "completions"
    )
    assert text["choices"][0]["stop_reason"] is None and text["choices"][0]["logprobs"] is None
    assert text["service_tier"] is None and "prompt_text" not in text


def test_circuit_breaker_ignores_verdicts_from_before_its_last_change():
    """A request reports with the epoch it was let through in: a stale verdict neither
    closes an open circuit, nor frees (or fails) a probe it is not, nor counts against
    a replica that recovered since."""
    from finops.shim.upstreams import CLOSED, HALF_OPEN, OPEN, CircuitBreaker

    b = CircuitBreaker(failures_to_open=2, cooldown_s=10)
    assert b.allow(0)
    old = b.ticket()  # a long stream, let through while closed
    assert b.allow(0)
    t = b.ticket()
    b.failure(1, t)
    b.failure(1, t)
    assert b.state == OPEN and b.opened_at == 1
    b.success(old)  # the old stream ends fine: says nothing of now
    b.failure(5, old)  # nor does an old failure push the cooldown on
    assert b.state == OPEN and b.opened_at == 1
    assert not b.allow(5) and b.allow(11)  # the probe
    probe = b.ticket()
    assert b.state == HALF_OPEN and not b.allow(11)
    b.release_probe(old)  # not the probe: it stays taken
    b.failure(11, old)
    assert b.state == HALF_OPEN and not b.allow(11)
    b.probe_answered(probe)  # a stream probe's first byte
    assert b.state == CLOSED and b.allow(12)
    b.failure(12, probe)  # ... its failure at the end is from the half-open epoch
    b.failure(12, old)
    assert b.state == CLOSED and b.consecutive_failures == 0
    now = b.ticket()
    b.failure(13, now)
    b.success(old)  # a stream from two epochs ago ending fine resets no count
    assert b.consecutive_failures == 1
    b.failure(13, now)
    assert b.state == OPEN


def test_responses_replay_rebuilds_calls_and_text_and_refuses_what_it_cannot():
    """A cached Responses answer with a function call and a message streams back as the
    typed events a client accumulates into the same answer; reasoning items, logprobs or
    an unfinished answer are not replayable (not cached)."""
    from finops.shim.cache import replay_responses, responses_replayable

    call = {
        "id": "fc_1",
        "type": "function_call",
        "call_id": "call_1",
        "name": "lookup",
        "arguments": '{"q": "gpu"}',
        "status": "completed",
    }
    part = {"type": "output_text", "text": "Done.", "annotations": [], "logprobs": None}
    msg = {"id": "msg_1", "type": "message", "role": "assistant", "status": "completed",
           "content": [part]}  # fmt: skip
    resp = {"id": "resp_1", "object": "response", "status": "completed", "output": [call, msg],
            "usage": {"input_tokens": 3, "output_tokens": 4}}  # fmt: skip
    assert responses_replayable(resp)
    raw = replay_responses(resp)
    evs = [orjson.loads(e.split(b"\ndata: ", 1)[1]) for e in raw]
    assert all(
        e.startswith(b"event: " + ev["type"].encode()) for e, ev in zip(raw, evs, strict=True)
    )
    assert [e["sequence_number"] for e in evs] == list(range(len(evs)))
    assert evs[0]["type"] == "response.created" and evs[0]["response"]["output"] == []
    assert evs[-1] == {
        "type": "response.completed",
        "response": resp,
        "sequence_number": len(evs) - 1,
    }
    args = "".join(e["delta"] for e in evs if e["type"] == "response.function_call_arguments.delta")
    text = "".join(e["delta"] for e in evs if e["type"] == "response.output_text.delta")
    assert args == call["arguments"] and text == "Done."
    done = [e["item"] for e in evs if e["type"] == "response.output_item.done"]
    assert done == [call, msg]
    assert not responses_replayable({**resp, "status": "in_progress"})
    assert not responses_replayable({**resp, "output": [{"id": "rs_1", "type": "reasoning"}]})
    with_lp = {**msg, "content": [{**part, "logprobs": [{"token": "D", "logprob": -0.1}]}]}
    assert not responses_replayable({**resp, "output": [with_lp]})


def test_each_tier_takes_turns_of_its_own():
    """Idle replicas take turns. The turn counter was one for all tiers and moved on every
    request, so traffic alternating between two tiers (an embedding, then a chat) kept
    each tier on one of its replicas: 20/0 and 0/20."""
    from collections import Counter

    from finops.shim.upstreams import Pool

    cfg = from_flags(
        ["small=http://a:1", "small=http://b:1", "large=http://c:1", "large=http://d:1"]
    )
    pool = Pool(cfg)
    got = Counter()
    for _ in range(20):
        for tier in ("small", "large"):
            got[next(pool.candidates(tier)).url] += 1
    assert got == {"http://a:1": 10, "http://b:1": 10, "http://c:1": 10, "http://d:1": 10}


def test_the_open_files_limit_is_raised_to_the_hard_limit_and_a_low_one_is_said():
    """A service manager's default soft limit (1024) is reached by ~500 concurrent
    requests; the shim raises it to the hard limit, and warns when that is low."""
    code = (
        "import resource, logging; logging.basicConfig();"
        "from finops.shim.server import raise_open_files_limit;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 8192));"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE)[0]);"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
        "print(raise_open_files_limit())"
    )
    import sys

    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["8192", "8192", "256"]
    assert "open files limited to 256" in p.stderr and "ulimit -n" in p.stderr


def test_replica_silence_counts_only_time_holding_requests_since_the_last_answer():
    """`Upstream.silence`: what says a replica is hung rather than its clients impatient."""
    from finops.shim.config import ShimConfig
    from finops.shim.upstreams import Upstream

    up = Upstream("small", "http://127.0.0.1:1", "small", ShimConfig(tiers={}), None)
    assert up.silence(100.0) == 0.0
    up.awaiting(100.0)
    up.unanswered(102.0)  # a client gave up after 2 s
    assert up.silence(5000.0) == 2.0  # idle time does not count
    up.awaiting(5000.0)
    up.awaiting(5001.0)
    assert up.silence(5003.0) == 5.0  # 2 s before, 3 s now (held requests, no answer)
    up.answered(5003.0)  # one of them answered: the replica works
    assert up.silence(5003.0) == 0.0
    assert up.silence(5004.5) == 1.5  # the other still waits, counted from that answer
    up.unanswered(5004.5)
    assert up.silence(9000.0) == 1.5
    up.awaiting(9000.0)
    up.answered(9000.25)
    assert up.silence(9999.0) == 0.0


def test_errors_name_a_server_shared_by_tiers_for_all_of_them():
    """One vLLM serving two tiers' models: a `mid` request's failure was reported as
    "`small` replica 1" (the URL was named for the first tier that listed it)."""
    from finops.shim.upstreams import Pool

    cfg = from_flags(["small=http://a:1", "mid=http://a:1", "large=http://b:2"])
    pool = Pool(cfg)
    said = pool.public("upstream http://a:1 answered 500; http://b:2 refused")
    assert (
        said
        == "upstream `small` replica 1 = `mid` replica 1 answered 500; `large` replica 1 refused"
    )
