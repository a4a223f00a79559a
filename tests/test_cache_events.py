"""Cache hits into `cache_events`: shim response-cache hits and generic cache-event logs."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.cache_events import ingest_cache_events, shim_cache_events
from collectors.logs import ingest_file
from collectors.mapping import MappingError
from finops.cli import app
from finops.lake import Lake


def q(lake: Lake, sql: str) -> pl.DataFrame:
    return finops.connect(lake.path).sql(sql).pl()


def write_jsonl(path: Path, recs: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))


def _req(i: int, status: str, **over: object) -> dict:
    rec = {
        "request_id": f"r{i}",
        "ts": f"2026-11-16T10:{i:02d}:00Z",
        "tenant": "acme" if i % 2 else "globex",
        "tier": "mid",
        "response_model": "llama-3.1-8b-instruct",
        "input_tokens": 100 + i,
        "output_tokens": 20 + i,
        "cache_status": status,
    }
    rec.update(over)
    return rec


def test_shim_hits_become_events_with_avoided_tokens(lake: Lake, tmp_path: Path) -> None:
    recs = [
        _req(1, "hit"),
        _req(2, "miss"),
        _req(3, "coalesced"),
        _req(4, "bypass"),
        _req(5, "HIT", output_tokens=None),
        _req(6, "hit", ts="not a time"),  # the request is rejected: no event either
        _req(7, None),
    ]
    log = tmp_path / "shim.jsonl"
    write_jsonl(log, recs)
    report = ingest_file(log, lake)
    assert (report.read, report.loaded, report.rejected) == (7, 6, 1)
    assert report.cache_events == 3
    ev = q(lake, "SELECT * FROM cache_events ORDER BY request_id").to_dicts()
    assert [e["request_id"] for e in ev] == ["r1", "r3", "r5"]
    assert [e["tokens"] for e in ev] == [101 + 21, 103 + 23, 105]
    e1 = ev[0]
    assert e1["event_id"] == "shim_response:r1" and e1["layer"] == "shim_response"
    assert (e1["event"], e1["requests"], e1["source"]) == ("hit", 1, "shim")
    assert (e1["tenant"], e1["tier"], e1["model"]) == ("acme", "mid", "llama-3.1-8b-instruct")
    assert str(e1["ts"]) == "2026-11-16 10:01:00+00:00"
    # the same log again adds nothing
    ingest_file(log, lake)
    assert q(lake, "SELECT count(*) FROM cache_events").item() == 3
    assert q(lake, "SELECT count(*) FROM raw.cache_events").item() == 3


def test_shim_cache_events_frame_without_cache_column() -> None:
    frame = pl.DataFrame({"request_id": ["a"], "ts": ["2026-11-16T00:00:00Z"]})
    assert shim_cache_events(frame, "shim").height == 0


def test_generic_cache_log_native_columns(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "cache.jsonl"
    recs = [
        {
            "ts": "2026-11-16T10:00:00Z",
            "layer": "redis",
            "event": "hit",
            "tokens": 512,
            "key": "k1",
        },
        {"ts": "2026-11-16T10:00:01Z", "event": "miss", "tokens": 0, "tenant": "acme"},
        {"ts": "2026-11-16T10:00:02Z", "layer": "redis", "event": "hit", "tokens": -3},
        {"ts": "2026-11-16T10:00:03Z", "layer": "redis", "tokens": 7, "event": None},
        # a typo'd event kind loaded and was never counted: refused, naming the kinds
        {"ts": "2026-11-16T10:00:03.5Z", "layer": "redis", "tokens": 7, "event": "hitt"},
        {
            "ts": "2026-11-16T10:00:04Z",
            "layer": "redis",
            "event": "hit",
            "tokens": 64,
            "requests": 4,
        },
    ]
    write_jsonl(log, recs)
    report = ingest_cache_events(log, lake)
    assert (report.read, report.loaded, report.rejected) == (6, 3, 3)
    got = q(lake, "SELECT * FROM cache_events ORDER BY ts").to_dicts()
    assert [g["layer"] for g in got] == ["redis", "generic", "redis"]
    assert [g["tokens"] for g in got] == [512, 0, 64]
    assert got[2]["requests"] == 4 and got[1]["tenant"] == "acme"
    assert all(g["event_id"].startswith("cache_events-") for g in got)
    reasons = q(lake, "SELECT location, reason FROM rejects ORDER BY location").to_dicts()
    assert reasons[0]["location"] == f"{log}:3" and "tokens" in reasons[0]["reason"]
    assert reasons[1]["location"] == f"{log}:4" and "'event'" in reasons[1]["reason"]
    assert reasons[2]["location"] == f"{log}:5"
    assert (
        reasons[2]["reason"] == "field 'event': expected one of hit, miss, store, evict, got 'hitt'"
    )
    ids = [g["event_id"] for g in got]
    ingest_cache_events(log, lake)
    assert q(lake, "SELECT event_id FROM cache_events ORDER BY ts")["event_id"].to_list() == ids


def test_generic_cache_log_with_mapping(lake: Lake, tmp_path: Path) -> None:
    mapping = tmp_path / "gateway-cache.toml"
    mapping.write_text(
        """
[mapping]
name = "gateway-cache"
table = "cache_events"
source = "gateway"
[key]
hash = ["time", "cache_key", "op"]
prefix = "gw-"
[columns]
ts = { from = "time", unit = "s" }
layer = { value = "gateway_semantic" }
event = { from = "op", map = { "GET_HIT" = "hit", "GET_MISS" = "miss", "SET" = "store" } }
tokens = "saved_tokens"
tenant = "team"
requests = { value = 1 }
"""
    )
    csv_path = tmp_path / "gw-cache.csv"
    csv_path.write_text(
        "time,op,cache_key,saved_tokens,team\n"
        "1763287200,GET_HIT,abc,300,acme\n"
        "1763287201,GET_MISS,abd,0,acme\n"
        "1763287202,SET,abd,0,acme\n"
        "1763287203,GET_HIT,abd,lots,acme\n"
    )
    report = ingest_cache_events(csv_path, lake, mapping=str(mapping))
    assert (report.read, report.loaded, report.rejected) == (4, 3, 1)
    got = q(lake, "SELECT * FROM cache_events ORDER BY ts").to_dicts()
    assert [g["event"] for g in got] == ["hit", "miss", "store"]
    assert got[0]["tokens"] == 300 and got[0]["layer"] == "gateway_semantic"
    assert got[0]["source"] == "gateway" and got[0]["event_id"].startswith("gw-")
    (rej,) = q(lake, "SELECT location, reason FROM rejects").to_dicts()
    assert rej["location"] == f"{csv_path}:5" and "'lots'" in rej["reason"]


def test_mapping_for_other_table_is_refused(lake: Lake, tmp_path: Path) -> None:
    csv_path = tmp_path / "t.csv"
    csv_path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:00:00,1,2\n")
    with pytest.raises(MappingError, match="maps to the requests table"):
        ingest_cache_events(csv_path, lake, mapping="azure-llm-2023")


def test_cli_cache_events(tmp_path: Path) -> None:
    lake_dir = tmp_path / "lake"
    shim = tmp_path / "shim.jsonl"
    write_jsonl(shim, [_req(1, "hit")])
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", "cache-events", str(shim), "--lake", str(lake_dir)])
    assert res.exit_code == 2
    assert "shim request log" in res.stderr and "finops ingest requests" in res.stderr
    gen = tmp_path / "c.jsonl"
    write_jsonl(
        gen, [{"ts": "2026-11-16T10:00:00Z", "layer": "redis", "event": "hit", "tokens": 5}]
    )
    res = runner.invoke(
        app, ["ingest", "cache-events", str(gen), "--lake", str(lake_dir), "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert (row["read"], row["loaded"], row["rejected"]) == (1, 1, 0)
    assert "cache_events" not in row


def test_zero_token_hits_get_the_replayed_usage(lake: Lake, tmp_path: Path) -> None:
    """The shim bills a hit as 0 tokens; the event carries what the original spent."""
    first = tmp_path / "requests-1.jsonl"
    write_jsonl(
        first,
        [
            _req(1, "miss", tenant="acme", prompt_fingerprint="fpX"),  # 101 + 21 tokens
            _req(
                2, "hit", tenant="acme", prompt_fingerprint="fpX", input_tokens=0, output_tokens=0
            ),
            _req(
                3, "hit", tenant="globex", prompt_fingerprint="fpX", input_tokens=0, output_tokens=0
            ),
            _req(
                4, "hit", tenant="acme", prompt_fingerprint="fpY", input_tokens=0, output_tokens=0
            ),
        ],
    )
    ingest_file(first, lake)
    second = tmp_path / "requests-2.jsonl"  # a later file: the originals are in the lake
    write_jsonl(
        second,
        [
            _req(
                5, "miss", tenant="acme", prompt_fingerprint="fpX", input_tokens=7, output_tokens=3
            ),
            _req(
                6,
                "coalesced",
                tenant="acme",
                prompt_fingerprint="fpX",
                input_tokens=0,
                output_tokens=0,
            ),
            _req(
                7,
                "hit",
                tenant="acme",
                retry_of="r1",
                prompt_fingerprint="other",
                input_tokens=0,
                output_tokens=0,
            ),
            _req(
                8, "hit", tenant="globex", prompt_fingerprint="fpY", input_tokens=0, output_tokens=0
            ),
        ],
    )
    ingest_file(second, lake)
    got = dict(q(lake, "SELECT request_id, tokens FROM cache_events").iter_rows())
    assert got == {
        "r2": 122,  # same tenant + fingerprint, earlier miss
        "r3": None,  # other tenant: the response cache is tenant-scoped, nothing known
        "r4": None,  # no original seen
        "r6": 10,  # the latest earlier original (r5), not r1
        "r7": 122,  # idempotent replay: the original named by retry_of (from the lake)
        "r8": None,
    }


def test_unserved_hits_and_coalesced_followers_book_no_savings(lake: Lake, tmp_path: Path) -> None:
    """A coalesced follower whose client left (499) or a hit that failed saved nothing
    anyone received: no shim_response event. A failed request is no original either."""
    log = tmp_path / "shim.jsonl"
    zero = {"input_tokens": 0, "output_tokens": 0, "prompt_fingerprint": "fpZ", "tenant": "acme"}
    write_jsonl(
        log,
        [
            _req(1, "miss", tenant="acme", prompt_fingerprint="fpZ", status_code=200),  # 122
            _req(2, "coalesced", status_code=200, **zero),  # served by the leader
            _req(3, "coalesced", status_code=499, error_type="client_disconnected", **zero),
            _req(4, "hit", status_code=500, error_type="server_error", **zero),
            _req(5, "hit", status_code=200, **zero),
            # a failed request with usage, later than r1, must not be taken as the original
            _req(
                6,
                "miss",
                tenant="acme",
                prompt_fingerprint="fpZ",
                status_code=400,
                error_type="context_length_exceeded",
                input_tokens=90_000,
                output_tokens=0,
            ),
            _req(7, "hit", status_code=200, **zero),
        ],
    )
    report = ingest_file(log, lake)
    assert report.cache_events == 3
    got = dict(q(lake, "SELECT request_id, tokens FROM cache_events").iter_rows())
    assert got == {"r2": 122, "r5": 122, "r7": 122}
    rows = pl.DataFrame(
        [_req(8, "coalesced", status_code=499, error_type="client_disconnected", **zero)]
    ).with_columns(pl.col("ts").str.to_datetime(time_zone="UTC"))
    assert shim_cache_events(rows, "test").height == 0
