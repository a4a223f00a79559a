"""With `[log] prompts = true` the shim logs the text the router reads, redacted.

A router trained from the shim's log (`finops router train --lake`) must see the text
`route()` sees when serving: the same joining of messages and content parts
(`features.body_text`), and, for a prompt too long to log whole, the head and the tail
the router reads. Real shim on loopback, fake upstream; the record is read back from
the request log, and once through the lake and `load_lake`.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import httpx
import orjson

from finops.lake import Lake
from finops.router import data as D
from finops.router import features as F
from finops.shim import from_flags, serve_in_thread
from finops.shim.proxy import PROMPT_LOG_CHARS, PROMPT_LOG_TAIL_CHARS, _prompt_text
from finops.shim.requestlog import redact
from finops.shim.responses import as_chat_body
from finops.shim.testing import wait_for_records as _records

CHAT = {
    "model": "auto",
    "max_tokens": 2,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Fix invoice 12345678 for bob@x.io"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                {"type": "text", "text": "Think step by step."},
            ],
        },
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "and the total?"},
    ],
}


def _serve(tmp_path: Path, url: str):
    cfg = from_flags([f"small={url}", f"large={url}"], log_dir=tmp_path / "log")
    return serve_in_thread(dataclasses.replace(cfg, log_prompts=True))


def _post(h, path: str, bodies: list[dict]) -> list[dict]:
    """Send each body; the records, in the order sent."""
    ids = []
    for b in bodies:
        r = httpx.post(h.base_url + path, json=b)
        assert r.status_code == 200, f"{path}: {r.status_code} {r.text}"
        ids.append(r.headers["x-request-id"])
    by_id = {r["request_id"]: r for r in _records(h.shim, len(bodies))}
    return [by_id[i] for i in ids]


def _router_text(body: dict) -> str:
    text, _ = F.body_text(body)
    return text or ""


def test_chat_logs_the_router_text_redacted(tmp_path, fakes):
    _f, url = fakes()
    with _serve(tmp_path, url) as h:
        (rec,) = _post(h, "/chat/completions", [CHAT])
    assert rec["prompt_text"] == redact(_router_text(CHAT))
    # no role prefixes, parts joined by a newline, the tool-call turn adds nothing
    want = "You are terse.\nFix invoice [NUMBER] for [EMAIL]\nThink step by step.\nand the total?"
    assert rec["prompt_text"] == want


def test_completions_log_the_router_text_redacted(tmp_path, fakes):
    _f, url = fakes()
    bodies = [
        {"model": "auto", "max_tokens": 2, "prompt": "Call 415-555-0100\tabout 4111111111111111"},
        {"model": "auto", "max_tokens": 2, "prompt": ["first a@b.io", "second\tprompt"]},
        {"model": "auto", "max_tokens": 2, "prompt": [1, 2, 3]},  # token IDs: no text
    ]
    with _serve(tmp_path, url) as h:
        recs = _post(h, "/completions", bodies)
    for i, (rec, body) in enumerate(zip(recs, bodies, strict=True)):
        assert rec["prompt_text"] == redact(_router_text(body)), f"body {i}: {body['prompt']!r}"
    assert recs[1]["prompt_text"] == "first [EMAIL]\nsecond\tprompt"
    assert recs[2]["prompt_text"] == "", "the router reads no text in a token-ID prompt"


def test_responses_log_the_text_the_router_reads(tmp_path, fakes):
    """The Responses API routes on its chat-shaped view; the log holds that view's text."""
    _f, url = fakes()
    body = {
        "model": "small",
        "instructions": "Answer in French.",
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Mail eve@x.io"}]},
            {"role": "user", "content": "now"},
        ],
        "max_output_tokens": 4,
    }
    with _serve(tmp_path, url) as h:
        (rec,) = _post(h, "/responses", [body])
    want = redact(_router_text(as_chat_body(body)))
    assert rec["prompt_text"] == want == "Answer in French.\nMail [EMAIL]\nnow"


def test_a_long_prompt_keeps_the_head_and_tail_the_router_reads(tmp_path, fakes):
    _f, url = fakes()
    words = " ".join(f"w{i}" for i in range(30_000))  # ~200k characters, no personal data
    body = {
        "model": "auto",
        "max_tokens": 2,
        "messages": [
            {"role": "system", "content": "Summarise the paste."},
            {"role": "user", "content": words + "\nWhat is the LAST word?"},
        ],
    }
    with _serve(tmp_path, url) as h:
        (rec,) = _post(h, "/chat/completions", [body])
    logged = rec["prompt_text"]
    assert len(orjson.dumps(rec)) < 40_000, "the record stays far below the 1 MiB line limit"
    assert len(logged) < len(_router_text(body)), "the middle is cut"
    served = F.from_body(body)
    trained = F.extract(text=logged)
    assert trained["text"] == served["text"], "the router's head and tail windows survive the cut"
    assert trained["text_head"] == served["text_head"]
    assert logged.endswith("\nWhat is the LAST word?")


def test_a_router_trained_from_the_lake_sees_the_served_text(tmp_path, fakes):
    """Through the lake and `load_lake`: the training rows' text is the live one."""
    _f, url = fakes()
    bodies = [
        {**CHAT, "messages": [*CHAT["messages"][:1], {"role": "user", "content": f"q{i}"}]}
        for i in range(3)
    ]
    bodies.append(
        {
            "model": "auto",
            "max_tokens": 2,
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "part one"}, "two"]},
            ],
        }
    )
    # a prompt with no text (an image only) is logged as "" and trains as text "", not as
    # a capture-off row: one such row used to turn the whole lake to metadata-only
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    bodies.append(
        {"model": "auto", "max_tokens": 2, "messages": [{"role": "user", "content": [image]}]}
    )
    with _serve(tmp_path, url) as h:
        recs = _post(h, "/chat/completions", bodies)
    assert recs[-1]["prompt_text"] == ""
    res = Lake(tmp_path / "lake").append("requests", recs, source="shim")
    assert (res.loaded, res.rejected) == (len(recs), 0)
    labels = tmp_path / "labels.jsonl"
    labels.write_text(
        "".join(json.dumps({"request_id": r["request_id"], "label": "small"}) + "\n" for r in recs)
    )
    ds = D.load_lake(tmp_path / "lake", labels)
    assert ds.frame.height == len(bodies), ds.bad_rows
    assert ds.has_text and not any("no prompt text" in n for n in ds.notes), ds.notes
    for i, (row, body) in enumerate(zip(ds.frame.iter_rows(named=True), bodies, strict=True)):
        live = F.from_body(body, feature="default", tenant="default")
        assert row["text"] == live["text"], f"row {i}: trained {row['text']!r}"
        assert row["text_head"] == live["text_head"], f"row {i}"


def test_no_part_of_a_card_is_kept_wherever_the_tail_cut_falls():
    """The kept tail is cut from a redacted window reaching past it, as the head is."""
    for offset in range(-40, 40, 3):
        text = "x" * 50_000 + " 4111 1111 1111 1111 " + "y" * (PROMPT_LOG_TAIL_CHARS + offset)
        got = _prompt_text({"prompt": text})
        head, marker, tail = got.split("\n")
        assert marker.startswith("[... ") and marker.endswith(" ...]"), marker
        assert "1111" not in head + tail and "4111" not in head + tail, offset
        assert not tail.startswith(("]", "R]", "ER]", "BER]")), f"offset {offset}: {tail[:20]!r}"


def test_cutting_a_long_run_of_spaces_is_fast():
    """What a cut leaves hanging is looked for near the cut only (the whole head took 9 s)."""
    t0 = time.perf_counter()
    got = _prompt_text({"prompt": " " * (PROMPT_LOG_CHARS - 1) + "x" * 2000})
    assert time.perf_counter() - t0 < 0.5
    assert got.endswith("x" * 100)
