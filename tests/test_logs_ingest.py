"""Request-log ingest: real traces via mappings, shim JSONL, OpenAI usage, bad input, tailing.

Everything runs against real files and a real Parquet lake; the crash test
kill -9s a real follower process.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from collectors.logs import LogError, LogSource, ingest_file
from collectors.mapping import AmbiguousTimeWarning, MappingError, load_mapping
from finops.cli import app
from finops.lake import Lake

TRACES = Path(__file__).resolve().parents[2] / "shared" / "data" / "traces"
if not TRACES.is_dir():
    TRACES = Path("/work/shared/data/traces")
ROOT = Path(__file__).resolve().parents[1]
UTC = dt.UTC
needs_traces = pytest.mark.skipif(not TRACES.is_dir(), reason=f"{TRACES} not present")


def shim_record(i: int, *, start: dt.datetime | None = None, **over: object) -> dict:
    """One shim request-log record (the requests table's column names)."""
    start = start or dt.datetime(2026, 11, 16, tzinfo=UTC)
    rec = {
        "request_id": f"req-{i:07d}",
        "ts": (start + dt.timedelta(seconds=i * 0.37)).isoformat().replace("+00:00", "Z"),
        "tenant": f"tenant-{i % 5}",
        "feature": ["chat-assistant", "summarize", "rag-qa"][i % 3],
        "operation": "chat",
        "request_model": "auto",
        "response_model": "llama-3.1-8b-instruct",
        "tier": "mid",
        "upstream": "http://vllm-mid-0:8000",
        "input_tokens": 100 + i % 900,
        "output_tokens": 10 + i % 300,
        "cached_input_tokens": (i % 7) * 16,
        "status_code": 200,
        "finish_reason": "stop",
        "ttft_ms": 35.5 + i % 10,
        "latency_ms": 420.25 + i % 100,
        "stream": i % 2 == 0,
        "cache_status": "hit" if i % 10 == 0 else "miss",
        "prompt_fingerprint": f"fp{i % 1000:04d}",
        "attempt": 1,
        "router_version": "r1",
        "router_score": 0.25,
    }
    rec.update(over)
    return rec


def write_jsonl(path: Path, records: list[dict], mode: str = "w") -> None:
    with open(path, mode) as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")


def q(lake: Lake, sql: str) -> pl.DataFrame:
    return finops.connect(lake.path).sql(sql).pl()


def rejects(lake: Lake) -> pl.DataFrame:
    files = lake.files("rejects")
    if not files:
        return pl.DataFrame(schema={"location": pl.String, "reason": pl.String, "raw": pl.String})
    return pl.concat([pl.read_parquet(f) for f in files]).unique(
        ["table_name", "location", "reason"]
    )


# --------------------------------------------------------------------------- real traces


@needs_traces
@pytest.mark.parametrize("name", ["azure-llm-2023-conv.csv", "azure-llm-2023-code.csv"])
def test_azure_trace_loads_with_mapping_only(lake: Lake, name: str) -> None:
    path = TRACES / name
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    report = ingest_file(path, lake, mapping="azure-llm-2023")
    assert report.read == len(rows) == report.loaded
    assert report.rejected == 0
    got = q(lake, "SELECT * FROM requests ORDER BY ts, request_id")
    assert got.height == len(rows)
    assert got["input_tokens"].sum() == sum(int(r["ContextTokens"]) for r in rows)
    assert got["output_tokens"].sum() == sum(int(r["GeneratedTokens"]) for r in rows)
    first = q(
        lake,
        "SELECT * FROM requests WHERE request_id = (SELECT min_by(request_id, ts) FROM requests)",
    ).row(0, named=True)
    r0 = min(rows, key=lambda r: r["TIMESTAMP"])
    assert first["input_tokens"] == int(r0["ContextTokens"])
    assert first["output_tokens"] == int(r0["GeneratedTokens"])
    # "2023-11-16 18:15:46.6805900" keeps its microseconds, in UTC
    expect = dt.datetime.strptime(r0["TIMESTAMP"][:26], "%Y-%m-%d %H:%M:%S.%f").replace(tzinfo=UTC)
    assert first["ts"] == expect
    assert first["feature"] == path.stem and first["operation"] == "chat"
    assert first["source"] == "trace:azure-llm-2023"
    assert got["request_id"].n_unique() == got.height


@needs_traces
@pytest.mark.parametrize(
    "name", ["mooncake-fast25-conversation.jsonl", "mooncake-fast25-synthetic.jsonl"]
)
def test_mooncake_trace_loads_with_mapping_only(lake: Lake, name: str) -> None:
    path = TRACES / name
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    base = dt.datetime(2025, 3, 1, 12, tzinfo=UTC)
    report = ingest_file(path, lake, mapping="mooncake-fast25", base_ts=base)
    assert report.read == len(recs) == report.loaded and report.rejected == 0
    got = q(lake, "SELECT * FROM requests")
    assert got.height == len(recs)
    assert got["input_tokens"].sum() == sum(r["input_length"] for r in recs)
    last = recs[-1]
    assert got["ts"].max() == base + dt.timedelta(milliseconds=max(r["timestamp"] for r in recs))
    assert got["ts"].min() == base + dt.timedelta(milliseconds=recs[0]["timestamp"])
    match = got.filter(
        (pl.col("input_tokens") == last["input_length"])
        & (pl.col("output_tokens") == last["output_length"])
        & (pl.col("ts") == base + dt.timedelta(milliseconds=last["timestamp"]))
    )
    assert match.height >= 1
    # equal block lists -> equal prompt fingerprints (the basis for duplicate detection)
    n_prompts = len({tuple(r["hash_ids"]) for r in recs})
    assert got["prompt_fingerprint"].n_unique() == n_prompts


@needs_traces
def test_reingest_is_idempotent(lake: Lake) -> None:
    path = TRACES / "azure-llm-2023-code.csv"
    ingest_file(path, lake, mapping="azure-llm-2023")
    before = q(
        lake, "SELECT count(*) n, sum(input_tokens) s, count(DISTINCT request_id) d FROM requests"
    )
    raw_before = q(lake, "SELECT count(*) FROM raw.requests").item()
    again = ingest_file(path, lake, mapping="azure-llm-2023")
    assert again.loaded == again.read and again.duplicate_files >= 1 and not again.files
    after = q(
        lake, "SELECT count(*) n, sum(input_tokens) s, count(DISTINCT request_id) d FROM requests"
    )
    assert before.equals(after)
    assert q(lake, "SELECT count(*) FROM raw.requests").item() == raw_before


# --------------------------------------------------------------------------- shim log


def test_shim_log_values_and_cache_hits(lake: Lake, tmp_path: Path) -> None:
    recs = [shim_record(i) for i in range(200)]
    path = tmp_path / "shim.jsonl"
    write_jsonl(path, recs)
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.rejected) == (200, 200, 0)
    assert report.mapping == "shim"
    assert report.cache_events == 20
    got = q(lake, "SELECT * FROM requests ORDER BY request_id").to_dicts()
    for rec, row in zip(recs, got, strict=True):
        assert row["request_id"] == rec["request_id"]
        assert row["ts"] == dt.datetime.fromisoformat(rec["ts"])
        for k in (
            "input_tokens",
            "output_tokens",
            "tenant",
            "stream",
            "latency_ms",
            "cache_status",
        ):
            assert row[k] == rec[k], k
        assert row["source"] == "shim"


def test_bad_lines_rejected_valid_kept(lake: Lake, tmp_path: Path) -> None:
    good = [shim_record(i) for i in range(10)]
    lines = [json.dumps(r) for r in good[:3]]
    lines.append(json.dumps(shim_record(100))[:40])  # truncated
    lines.append("not json at all")
    lines.append(json.dumps(shim_record(101, input_tokens="many")))  # wrong type
    lines.append("")  # blank: not a record
    lines.append("[1, 2, 3]")  # not an object
    lines.append(json.dumps(shim_record(102, output_tokens=-5)))  # negative
    lines.append(json.dumps(shim_record(103, ts="yesterday")))  # bad time
    lines.append(json.dumps(shim_record(104, prompt_text="x" * (10 * 1024 * 1024))))  # 10 MB line
    lines += [json.dumps(r) for r in good[3:]]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = ingest_file(path, lake)
    assert report.read == len(lines) - 1 == 17
    assert report.loaded == 10
    assert report.rejected == 7
    assert report.read == report.loaded + report.rejected
    ids = set(q(lake, "SELECT request_id FROM requests")["request_id"])
    assert ids == {r["request_id"] for r in good}
    rej = {r["location"]: r for r in rejects(lake).to_dicts()}
    p = str(path)
    assert set(rej) == {f"{p}:{n}" for n in (4, 5, 6, 8, 9, 10, 11)}
    assert "invalid JSON" in rej[f"{p}:4"]["reason"] and "truncated" in rej[f"{p}:4"]["reason"]
    assert "invalid JSON" in rej[f"{p}:5"]["reason"]
    assert rej[f"{p}:5"]["raw"] == "not json at all"
    assert "input_tokens" in rej[f"{p}:6"]["reason"] and "'many'" in rej[f"{p}:6"]["reason"]
    assert '"request_id": "req-0000101"' in rej[f"{p}:6"]["raw"]
    assert "JSON object" in rej[f"{p}:8"]["reason"]
    assert "output_tokens" in rej[f"{p}:9"]["reason"] and ">= 0" in rej[f"{p}:9"]["reason"]
    assert "'ts'" in rej[f"{p}:10"]["reason"] and "yesterday" in rej[f"{p}:10"]["reason"]
    assert "bytes" in rej[f"{p}:11"]["reason"] and "limit" in rej[f"{p}:11"]["reason"]
    assert len(rej[f"{p}:11"]["raw"]) <= 500


def test_missing_and_directory_paths(lake: Lake, tmp_path: Path) -> None:
    with pytest.raises(LogError, match=r"nope\.jsonl: no such file"):
        ingest_file(tmp_path / "nope.jsonl", lake)
    with pytest.raises(LogError, match="is a directory"):
        ingest_file(tmp_path, lake)


def test_unknown_format_asks_for_a_mapping(lake: Lake, tmp_path: Path) -> None:
    path = tmp_path / "other.jsonl"
    write_jsonl(path, [{"when": 1, "tok": 3}])
    with pytest.raises(MappingError, match=r"cannot tell the log format.*'tok'.*--mapping"):
        ingest_file(path, lake)
    csv_path = tmp_path / "x.csv"
    csv_path.write_text("a,b\n1,2\n")
    with pytest.raises(MappingError, match=r"needs --mapping .*write a TOML mapping"):
        ingest_file(csv_path, lake)


# --------------------------------------------------------------------------- OpenAI usage


def _completion(i: int, **over: object) -> dict:
    body = {
        "id": f"chatcmpl-{i}",
        "object": "chat.completion",
        "created": 1_763_300_000 + i,
        "model": "llama-3.1-8b-instruct",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hi"},
                "finish_reason": "length" if i % 2 else "stop",
            }
        ],
        "usage": {
            "prompt_tokens": 50 + i,
            "completion_tokens": 7 + i,
            "total_tokens": 57 + 2 * i,
            "prompt_tokens_details": {"cached_tokens": 16 * i},
        },
    }
    body.update(over)
    return body


def test_openai_usage_records_detected_and_mapped(lake: Lake, tmp_path: Path) -> None:
    recs = [_completion(i) for i in range(5)]
    recs[1]["metadata"] = {"tenant": "acme", "feature": "rag-qa"}
    wrapped = {"response": _completion(9), "metadata": {"tenant": "globex", "latency_ms": 812.5}}
    no_details = _completion(7)
    del no_details["usage"]["prompt_tokens_details"]
    path = tmp_path / "usage.jsonl"
    write_jsonl(path, [*recs, wrapped, no_details])
    report = ingest_file(path, lake)
    assert report.mapping == "openai-usage"
    assert (report.read, report.loaded, report.rejected) == (7, 7, 0)
    got = {r["request_id"]: r for r in q(lake, "SELECT * FROM requests").to_dicts()}
    r1 = got["chatcmpl-1"]
    assert r1["ts"] == dt.datetime.fromtimestamp(1_763_300_001, UTC)
    assert (r1["input_tokens"], r1["output_tokens"], r1["cached_input_tokens"]) == (51, 8, 16)
    assert r1["finish_reason"] == "length" and r1["response_model"] == "llama-3.1-8b-instruct"
    assert (r1["tenant"], r1["feature"], r1["operation"]) == ("acme", "rag-qa", "chat")
    w = got["chatcmpl-9"]
    assert (w["input_tokens"], w["tenant"], w["latency_ms"]) == (59, "globex", 812.5)
    assert got["chatcmpl-7"]["cached_input_tokens"] is None
    assert got["chatcmpl-0"]["finish_reason"] == "stop"


def test_openai_record_without_usage_is_rejected(lake: Lake, tmp_path: Path) -> None:
    bad = _completion(3)
    bad["usage"] = {"prompt_tokens": "lots", "completion_tokens": 1}
    path = tmp_path / "u.jsonl"
    write_jsonl(path, [_completion(1), bad, {**_completion(2), "created": "noon"}])
    report = ingest_file(path, lake, mapping="openai-usage")
    assert (report.read, report.loaded, report.rejected) == (3, 1, 2)
    reasons = " | ".join(rejects(lake)["reason"])
    assert "input_tokens" in reasons and "'lots'" in reasons
    assert "created" in reasons and "noon" in reasons


# --------------------------------------------------------------------------- mappings


def _mapping(tmp_path: Path, body: str, name: str = "m.toml") -> Path:
    p = tmp_path / name
    p.write_text(body)
    return p


def test_mapping_transforms_csv(lake: Lake, tmp_path: Path) -> None:
    m = _mapping(
        tmp_path,
        """
[mapping]
name = "gateway"
source = "gw:{stem}"
[columns]
request_id = { template = "gw-{rid}-{line}" }
ts = { from = "epoch_ms", unit = "ms" }
input_tokens = "in"
output_tokens = { from = "out", default = 0 }
latency_ms = { from = "latency_s", scale = 1000 }
tenant = { from = "team", map = { "a" = "acme", "g" = "globex" } }
operation = { value = "chat" }
stream = "streamed"
""",
    )
    data = tmp_path / "gw.csv"
    data.write_text(
        "rid,epoch_ms,in,out,latency_s,team,streamed\n"
        "r1,1763300000000,10,5,0.25,a,true\n"
        "r2,1763300001500,20,,1.5,g,false\n"
        "r3,1763300002000,30,7,slow,x,true\n"
        "r4,1763300003000,4O,7,0.1,a,true\n"
        'r5,"1763300004000",5,1,0.2,"a",1\n'
    )
    report = ingest_file(data, lake, mapping=str(m))
    assert (report.read, report.loaded, report.rejected) == (5, 3, 2)
    got = {r["request_id"]: r for r in q(lake, "SELECT * FROM requests").to_dicts()}
    assert set(got) == {"gw-r1-2", "gw-r2-3", "gw-r5-6"}
    r1, r2 = got["gw-r1-2"], got["gw-r2-3"]
    assert r1["ts"] == dt.datetime(2025, 11, 16, 13, 33, 20, tzinfo=UTC)
    assert r1["latency_ms"] == 250.0 and r2["latency_ms"] == 1500.0
    assert (r1["tenant"], r2["tenant"]) == ("acme", "globex")
    assert r2["output_tokens"] == 0 and r1["stream"] is True and r2["stream"] is False
    assert got["gw-r5-6"]["input_tokens"] == 5 and r1["source"] == "gw:gw"
    assert set(rejects(lake)["source"]) == {"gw:gw"}
    rej = {r["location"]: r["reason"] for r in rejects(lake).to_dicts()}
    assert "latency_ms (from latency_s)" in rej[f"{data}:4"] and "'slow'" in rej[f"{data}:4"]
    assert "input_tokens" in rej[f"{data}:5"] and "4O" in rej[f"{data}:5"]


def test_local_times_in_a_dst_gap_are_rejected_as_such(lake: Lake, tmp_path: Path) -> None:
    """02:30 on the night Berlin's clocks skip from 02:00 to 03:00 reads fine but does not
    exist: its reject said "expected a time like '%Y-%m-%d %H:%M:%S'", which it is. The
    hour the clocks repeat (autumn) takes its first occurrence; a real typo is still a
    format error."""
    m = _mapping(
        tmp_path,
        """
[mapping]
name = "berlin"
[columns]
request_id = "id"
ts = { from = "when", format = "%Y-%m-%d %H:%M:%S", timezone = "Europe/Berlin" }
input_tokens = "tin"
output_tokens = "tout"
""",
    )
    data = tmp_path / "b.csv"
    data.write_text(
        "id,when,tin,tout\n"
        "a,2026-03-29 01:30:00,1,1\n"
        "b,2026-03-29 02:30:00,1,1\n"
        "c,2026-10-25 02:30:00,1,1\n"
        "d,2026-13-01 00:00:00,1,1\n"
    )
    # c alone in the repeated hour: the file's order cannot place it (test_log_dst)
    with pytest.warns(AmbiguousTimeWarning, match=f"{data}: line 4"):
        report = ingest_file(data, lake, mapping=str(m))
    assert (report.read, report.loaded, report.rejected) == (4, 2, 2)
    got = {r["request_id"]: r["ts"] for r in q(lake, "SELECT * FROM requests").to_dicts()}
    assert got["a"] == dt.datetime(2026, 3, 29, 0, 30, tzinfo=UTC)
    assert got["c"] == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # CEST, the first
    rej = {r["location"]: r["reason"] for r in rejects(lake).to_dicts()}
    assert "does not exist in Europe/Berlin" in rej[f"{data}:3"]
    assert "daylight saving" in rej[f"{data}:3"] and "a time like" not in rej[f"{data}:3"]
    assert "expected a time like" in rej[f"{data}:5"]


def test_mapping_unknown_column_names_file_key_and_columns(lake: Lake, tmp_path: Path) -> None:
    m = _mapping(
        tmp_path,
        '[columns]\nts = { from = "time", unit = "s" }\ninput_tokens = "prompt_tokns"\n',
    )
    data = tmp_path / "x.csv"
    data.write_text("time,prompt_tokens\n1763300000,5\n")
    with pytest.raises(MappingError) as err:
        ingest_file(data, lake, mapping=str(m))
    msg = str(err.value)
    assert str(m) in msg and "input_tokens" in msg and "'prompt_tokns'" in msg
    assert "available columns: time, prompt_tokens" in msg
    assert not lake.files("requests") and not lake.files("rejects")
    # nested JSON: the message lists dotted paths
    j = tmp_path / "n.jsonl"
    write_jsonl(j, [{"time": 1763300000, "usage": {"in": 3}}])
    m2 = _mapping(
        tmp_path,
        '[columns]\nts = { from = "time", unit = "s" }\ninput_tokens = "usage.inn"\n',
        "m2.toml",
    )
    with pytest.raises(
        MappingError, match=r"'usage\.inn' not found.*available columns: time, usage\.in"
    ):
        ingest_file(j, lake, mapping=str(m2))


@pytest.mark.parametrize(
    ("body", "match"),
    [
        (
            "[columns]\ntokens = 'x'\n",
            r"\[columns\] tokens: 'tokens' is not a column of the requests table",
        ),
        ("[columns]\nts = { from = 'a', unit = 'hours' }\n", r"\[columns\] ts unit: 'hours'"),
        ("[columns]\nts = { from = 'a', frm = 'b' }\n", r"unknown option\(s\) \['frm'\]"),
        ("[columns]\nts = { from = 'a', value = 1 }\n", "exactly one of"),
        ("[mapping]\ntable = 'gpu'\n[columns]\nts = 'a'\n", "table = 'gpu'"),
        ("[columns\nts = 'a'\n", "not valid TOML"),
        ("[mapping]\nname = 'x'\n", r"\[columns\] is missing"),
        (
            "[columns]\nts = { from = 'a', relative_to = 'noon', unit = 's' }\n",
            "relative_to: expected an ISO-8601",
        ),
    ],
)
def test_bad_mapping_files(tmp_path: Path, body: str, match: str) -> None:
    m = _mapping(tmp_path, body)
    with pytest.raises(MappingError, match=match) as err:
        load_mapping(m)
    assert str(m) in str(err.value)


def test_unknown_mapping_name_lists_shipped() -> None:
    with pytest.raises(
        MappingError, match="shipped: azure-llm-2023, mooncake-fast25, openai-usage"
    ):
        load_mapping("azure-2099")


def test_parquet_with_mapping_and_hash_key(lake: Lake, tmp_path: Path) -> None:
    src = tmp_path / "t.parquet"
    pl.DataFrame(
        {
            "when": ["2026-11-16T01:00:00+01:00", "2026-11-16T02:00:00+01:00", "bad"],
            "tok": [1, 2, 3],
        }
    ).write_parquet(src)
    m = _mapping(
        tmp_path,
        '[columns]\nts = { from = "when", format = "%Y-%m-%dT%H:%M:%S%:z" }\ninput_tokens = "tok"\n'
        '[key]\nhash = ["when", "tok"]\nprefix = "pq-"\n',
    )
    r1 = ingest_file(src, lake, mapping=str(m))
    assert (r1.read, r1.loaded, r1.rejected) == (3, 2, 1)
    got = q(lake, "SELECT * FROM requests ORDER BY ts")
    assert got["ts"].to_list() == [
        dt.datetime(2026, 11, 16, 0, tzinfo=UTC),
        dt.datetime(2026, 11, 16, 1, tzinfo=UTC),
    ]
    assert all(i.startswith("pq-") for i in got["request_id"])
    ids = got["request_id"].to_list()
    ingest_file(src, lake, mapping=str(m))
    assert q(lake, "SELECT request_id FROM requests ORDER BY ts")["request_id"].to_list() == ids
    assert rejects(lake)["location"].to_list() == [f"{src} row 3"]


# --------------------------------------------------------------------------- CLI


def test_cli_ingest_reports_counts_and_exit_codes(tmp_path: Path) -> None:
    lake_dir = tmp_path / "lake"
    good = tmp_path / "shim.jsonl"
    write_jsonl(good, [shim_record(i) for i in range(30)])
    with open(good, "a") as fh:
        fh.write('{"request_id": "broken"\n')
    runner = CliRunner()
    res = runner.invoke(
        app, ["ingest", "requests", str(good), "--lake", str(lake_dir), "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows == [
        {
            "file": str(good),
            "mapping": "shim",
            "read": 31,
            "loaded": 30,
            "new": 30,
            "already_in_lake": 0,
            "rejected": 1,
            "cache_events": 3,
            "cache_events_new": 3,
            "cache_events_already_in_lake": 0,
            "ignored_columns": [],
            "error": None,
        }
    ]
    res = runner.invoke(
        app,
        ["ingest", "requests", str(good), str(tmp_path / "missing.jsonl"), "--lake", str(lake_dir)],
    )
    assert res.exit_code == 1
    assert f"error: {tmp_path / 'missing.jsonl'}: no such file" in res.stderr
    assert "shim.jsonl:31: invalid JSON" in res.stderr
    res = runner.invoke(
        app, ["ingest", "requests", str(good), "--lake", str(lake_dir), "-m", "nope"]
    )
    assert res.exit_code == 2 and "not a shipped mapping" in res.stderr
    # a folder given as the mapping says so (was: "no such file")
    res = runner.invoke(
        app, ["ingest", "requests", str(good), "--lake", str(lake_dir), "-m", str(tmp_path)]
    )
    assert res.exit_code == 2 and "a folder, expected a mapping file (TOML)" in res.stderr
    res = runner.invoke(app, ["ingest", "mappings", "--format", "json"])
    assert {r["name"] for r in json.loads(res.stdout)} >= {
        "azure-llm-2023",
        "mooncake-fast25",
        "openai-usage",
    }


def test_cli_glob_matching_only_open_files_says_they_are_still_being_written(
    tmp_path: Path,
) -> None:
    """Was: with the shim up, the README's `'logs/requests-*.jsonl'` matched nothing
    (only `.jsonl.open` exists yet) and failed 'no such file', exit 1."""
    logs = tmp_path / "logs"
    logs.mkdir()
    live = logs / "requests-20261116T000001Z-7-0002-bbbb.jsonl.open"
    write_jsonl(live, [shim_record(i) for i in range(2)])
    pattern = str(logs / "requests-*.jsonl")
    res = CliRunner().invoke(app, ["ingest", "requests", pattern, "--lake", str(tmp_path / "l")])
    assert res.exit_code == 0, res.output
    assert "skipped 1 file(s) still being written" in res.stderr and live.name in res.stderr
    assert "no such file" not in res.output
    # a glob matching nothing at all still says so
    res = CliRunner().invoke(
        app, ["ingest", "requests", str(logs / "nope-*.jsonl"), "--lake", str(tmp_path / "l")]
    )
    assert res.exit_code == 1 and "nope-*.jsonl" in res.output


def test_cli_one_shot_skips_files_the_shim_is_still_writing(tmp_path: Path) -> None:
    """`finops ingest requests 'logs/requests-*.jsonl*'` also matches the `.jsonl.open`
    file the shim is writing: reading it would reject its unfinished last line for good
    and, after the shim renames it to `.jsonl`, load its records a second time."""
    logs = tmp_path / "logs"
    logs.mkdir()
    lake_dir = tmp_path / "lake"
    closed = logs / "requests-20261116T000000Z-7-0001-aaaa.jsonl"
    live = logs / "requests-20261116T000001Z-7-0002-bbbb.jsonl.open"
    claim = logs / "requests-20261116T000002Z-9-0001-cccc.jsonl.open.123-ab.claim"
    write_jsonl(closed, [shim_record(i) for i in range(3)])
    write_jsonl(live, [shim_record(i) for i in range(3, 5)])
    tail = json.dumps(shim_record(5))
    with open(live, "a") as fh:
        fh.write(tail[:40])  # the shim is in the middle of this record
    write_jsonl(claim, [shim_record(9)])
    pattern = str(logs / "requests-*.jsonl*")
    runner = CliRunner()
    res = runner.invoke(app, ["ingest", "requests", pattern, "--lake", str(lake_dir)])
    assert res.exit_code == 0, res.output
    assert "skipped 2 file(s) still being written" in res.stderr
    assert live.name in res.stderr and "--follow" in res.stderr
    # the shim finishes the record, closes the file and renames it
    with open(live, "a") as fh:
        fh.write(tail[40:] + "\n")
    live.rename(logs / live.name.removesuffix(".open"))
    claim.unlink()
    res = runner.invoke(
        app, ["ingest", "requests", pattern, "--lake", str(lake_dir), "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    assert "skipped" not in res.stderr
    out = json.loads(res.stdout)
    assert sum(r["loaded"] for r in out) == 6  # 3 again (a no-op) + 3 new
    # the file read before says so (it said "loaded 3" again, as if rows were added)
    assert sorted(r["already_in_lake"] for r in out) == [0, 3]
    assert sorted(r["new"] for r in out) == [0, 3]
    lake = Lake(lake_dir)
    raw = q(lake, "SELECT count(*) AS n, count(DISTINCT request_id) AS d FROM raw.requests")
    assert raw.row(0) == (6, 6)  # no record loaded twice
    assert rejects(lake).height == 0  # no phantom reject of a half-written line
    # only open files: nothing to read, said so, no crash
    only = tmp_path / "only"
    only.mkdir()
    write_jsonl(only / "requests-x.jsonl.open", [shim_record(1)])
    res = runner.invoke(
        app,
        ["ingest", "requests", str(only / "*.jsonl*"), "--lake", str(lake_dir), "--format", "json"],
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [] and "skipped 1 file(s)" in res.stderr


@needs_traces
def test_cli_azure_example_from_readme(tmp_path: Path) -> None:
    res = CliRunner().invoke(
        app,
        [
            "ingest",
            "requests",
            str(TRACES / "azure-llm-2023-code.csv"),
            "--mapping",
            "azure-llm-2023",
            "--lake",
            str(tmp_path),
            "--format",
            "json",
        ],
    )
    assert res.exit_code == 0, res.output
    (row,) = json.loads(res.stdout)
    assert row["read"] == row["loaded"] == 8819 and row["rejected"] == 0


def test_unreadable_file_gives_one_line_error(tmp_path: Path) -> None:
    """A file without read permission: exit 1 and one line naming it (real EACCES)."""
    secret = tmp_path / "secret.jsonl"
    write_jsonl(secret, [shim_record(1)])
    secret.chmod(0)
    entry = "import sys; from finops.cli import main; sys.argv[0] = 'finops'; main()"
    cmd = [
        sys.executable,
        "-c",
        entry,
        "ingest",
        "requests",
        str(secret),
        "--lake",
        str(tmp_path / "lake"),
    ]
    if os.geteuid() == 0:  # root reads anything; drop the capabilities that allow it
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv: cannot make a file unreadable")
        caps = "-dac_override,-dac_read_search"
        cmd = [setpriv, f"--bounding-set={caps}", f"--inh-caps={caps}", "--", *cmd]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert res.returncode == 1, res.stderr
    assert f"error: {secret}: permission denied" in res.stderr
    assert "Traceback" not in res.stderr


# --------------------------------------------------------------------------- tailing


def test_growing_file_partial_line_waits(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "shim.jsonl"
    write_jsonl(log, [shim_record(i) for i in range(5)])
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 5
    line = json.dumps(shim_record(5))
    with open(log, "a") as fh:
        fh.write(line[:30])  # the writer is mid-line
    assert src.poll().read == 0
    with open(log, "a") as fh:
        fh.write(line[30:] + "\n")
        fh.write(json.dumps(shim_record(6)) + "\n")
    res = src.poll()
    assert (res.read, res.loaded, res.rejected) == (2, 2, 0)
    assert src.poll().read == 0
    # a fresh follower resumes from the checkpoint: nothing re-read
    assert LogSource(log, lake, tmp_path / "cp").poll().read == 0
    assert q(lake, "SELECT count(*) FROM requests").item() == 7
    assert rejects(lake).height == 0


def test_rotation_finishes_old_file_first(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "shim.log"
    write_jsonl(log, [shim_record(i) for i in range(10)])
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 10
    write_jsonl(log, [shim_record(i) for i in range(10, 15)], mode="a")  # unread lines...
    log.rename(tmp_path / "shim.log.1")  # ...then rotation
    write_jsonl(log, [shim_record(i) for i in range(15, 18)])
    res = src.poll()
    assert (res.read, res.loaded) == (8, 8)
    assert q(lake, "SELECT count(*) FROM requests").item() == 18
    # old file rotated again (.1 -> .2) and new lines in the live file: no re-read
    (tmp_path / "shim.log.1").rename(tmp_path / "shim.log.2")
    write_jsonl(log, [shim_record(18)], mode="a")
    assert src.poll().read == 1
    ids = q(lake, "SELECT request_id FROM requests ORDER BY request_id")["request_id"].to_list()
    assert ids == [f"req-{i:07d}" for i in range(19)]


def test_truncation_and_inode_reuse_start_over(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "shim.jsonl"
    write_jsonl(log, [shim_record(i) for i in range(6)])
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().loaded == 6
    with open(log, "w") as fh:  # copytruncate: same inode, shorter file
        fh.write(json.dumps(shim_record(100)) + "\n")
    assert src.poll().loaded == 1
    # same inode, rewritten with different content that is *longer* than the offset
    write_jsonl(log, [shim_record(i) for i in range(200, 210)])
    assert src.poll().loaded == 10
    assert q(lake, "SELECT count(*) FROM requests").item() == 17


def test_glob_follows_several_files(lake: Lake, tmp_path: Path) -> None:
    for k in range(3):
        write_jsonl(tmp_path / f"part-{k}.jsonl", [shim_record(k * 100 + i) for i in range(4)])
    src = LogSource(str(tmp_path / "part-*.jsonl"), lake, tmp_path / "cp")
    assert src.poll().loaded == 12
    write_jsonl(tmp_path / "part-3.jsonl", [shim_record(999)])
    assert src.poll().loaded == 1


FOLLOWER = """
import sys, time
from collectors.logs import LogSource
from finops.lake import Lake
src = LogSource(sys.argv[1], Lake(sys.argv[2]), sys.argv[3], chunk_bytes=int(sys.argv[4]))
while True:
    res = src.poll()
    print(res.read, flush=True)
    if sys.argv[5] == "once" and res.read == 0:
        break
    time.sleep(0.01)
"""


def test_kill9_mid_ingest_no_loss_no_duplicates(tmp_path: Path) -> None:
    """kill -9 a follower while it ingests a growing log; a restart ends exact."""
    log = tmp_path / "shim.jsonl"
    lake_dir, cp = tmp_path / "lake", tmp_path / "cp"
    script = tmp_path / "follower.py"
    script.write_text(FOLLOWER)
    total = 2500
    write_jsonl(log, [shim_record(i) for i in range(total)])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # small batches: many lake-write/checkpoint pairs, so the kill lands between them
    args = [sys.executable, str(script), str(log), str(lake_dir), str(cp), "24000"]
    proc = subprocess.Popen([*args, "forever"], stdout=subprocess.PIPE, env=env, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list(lake_dir.glob("requests/*/*.parquet"))) < 5:
            time.sleep(0.005)
        for _ in range(3):  # keep the log growing while the follower works
            write_jsonl(log, [shim_record(total + i) for i in range(300)], mode="a")
            total += 300
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    lake = Lake(lake_dir)
    at_kill = q(lake, "SELECT count(*) FROM requests").item()
    assert 0 < at_kill < total, "the kill should land mid-ingest"
    write_jsonl(log, [shim_record(total + i) for i in range(500)], mode="a")
    total += 500
    subprocess.run(
        [*args, "once"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300, check=True
    )
    stats = q(
        lake, "SELECT count(*) n, count(DISTINCT request_id) d, sum(input_tokens) s FROM requests"
    ).row(0)
    expect_tokens = sum(shim_record(i)["input_tokens"] for i in range(total))
    assert stats == (total, total, expect_tokens)
    hits = q(lake, "SELECT count(*) FROM cache_events").item()
    assert hits == sum(1 for i in range(total) if i % 10 == 0)
    assert rejects(lake).height == 0


def test_cli_follow_tails_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    log = tmp_path / "shim.jsonl"
    lake_dir = tmp_path / "lake"
    write_jsonl(log, [shim_record(i) for i in range(5)])
    entry = "import sys; from finops.cli import main; sys.argv[0] = 'finops'; main()"
    cmd = [sys.executable, "-c", entry, "ingest", "requests", str(log), "--lake", str(lake_dir)]
    proc = subprocess.Popen(
        [*cmd, "--follow", "--interval", "0.1"], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    try:
        lake = Lake(lake_dir)

        def count() -> int:
            return q(lake, "SELECT count(*) FROM requests").item() if lake.files("requests") else 0

        deadline = time.monotonic() + 60
        while count() < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        write_jsonl(log, [shim_record(i) for i in range(5, 9)], mode="a")
        while count() < 9 and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert count() == 9
    assert "stopped: 9 read, 9 loaded, 0 rejected" in err
    assert list((lake_dir / "_state" / "logs").glob("requests-*.json"))


def test_crlf_and_whitespace_lines(lake: Lake, tmp_path: Path) -> None:
    lines = [json.dumps(shim_record(i)) for i in range(1500)]
    lines.insert(700, "   \t ")
    path = tmp_path / "crlf.jsonl"
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    report = ingest_file(path, lake)
    assert (report.read, report.loaded, report.rejected) == (1500, 1500, 0)
    assert q(lake, "SELECT count(*) FROM requests WHERE request_id LIKE '%\r'").item() == 0


def test_base_ts_needs_a_relative_mapping(lake: Lake, tmp_path: Path) -> None:
    path = tmp_path / "shim.jsonl"
    write_jsonl(path, [shim_record(1)])
    base = dt.datetime(2025, 1, 1, tzinfo=UTC)
    with pytest.raises(MappingError, match="--base-ts"):
        ingest_file(path, lake, base_ts=base)
    with pytest.raises(MappingError, match="no column of this mapping has relative_to"):
        ingest_file(path, lake, mapping="openai-usage", base_ts=base)


def test_real_shim_request_log_writer_files_follow(lake: Lake, tmp_path: Path) -> None:
    """Files written by the shim's own RequestLog (with rotation) load exactly once."""
    from finops.shim.requestlog import RequestLog, iso_utc, new_record

    folder = tmp_path / "shimlog"
    writer = RequestLog(folder, rotate_bytes=4096, fsync=False, interval=0.01)
    start = dt.datetime(2026, 11, 16, 9, tzinfo=UTC).timestamp()
    src = LogSource(str(folder / "requests-*.jsonl"), lake, tmp_path / "cp")
    expected = 0
    for batch in range(3):
        for i in range(40):
            rec = new_record()
            n = batch * 40 + i
            rec.update(
                request_id=f"shim-{n}",
                ts=iso_utc(start + n),
                tenant="acme",
                input_tokens=10 + n,
                output_tokens=5,
                cache_status="miss",
                status_code=200,
            )
            writer.write(rec)
        expected += 40
        assert writer.flush()
        src.poll()  # closed (rotated) files only; the .open one waits for its rename
    writer.close()
    src.poll()
    assert len(writer.files) >= 3  # rotated at least once per batch
    stats = q(lake, "SELECT count(*), count(DISTINCT request_id), sum(input_tokens) FROM requests")
    assert stats.row(0) == (expected, expected, sum(10 + n for n in range(expected)))
    assert rejects(lake).height == 0


def test_follower_reports_missing_file_and_bad_checkpoint(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "later.jsonl"
    src = LogSource(log, lake, tmp_path / "cp")
    assert src.poll().read == 0
    assert src.errors == [f"{log}: no such file (yet)"]
    write_jsonl(log, [shim_record(1)])
    assert src.poll().loaded == 1 and src.errors == []
    (cp_file,) = (tmp_path / "cp").glob("*.json")
    cp_file.write_text("{not json")
    with pytest.raises(ValueError, match=r"checkpoint unreadable.*move it away"):
        LogSource(log, lake, tmp_path / "cp")


def test_csv_ragged_rows_and_bad_times_rejected(lake: Lake, tmp_path: Path) -> None:
    path = tmp_path / "azure-like.csv"
    path.write_text(
        "TIMESTAMP,ContextTokens,GeneratedTokens\n"
        "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:47.0000000,12\n"
        "\n"
        "2023-11-16 18:15:48.1000000,5,6,7\n"
        "16/11/2023 18:15,5,6\n"
        "2023-11-16 18:15:49.5000000,-3,6\n"
        "2023-11-16 18:15:50.0000000,8,9"  # no final newline: still read by a one-shot ingest
    )
    report = ingest_file(path, lake, mapping="azure-llm-2023")
    assert (report.read, report.loaded, report.rejected) == (6, 2, 4)
    got = q(lake, "SELECT input_tokens FROM requests ORDER BY ts")["input_tokens"].to_list()
    assert got == [374, 8]
    rej = {r["location"]: r["reason"] for r in rejects(lake).to_dicts()}
    assert "expected 3 fields" in rej[f"{path}:3"] and "got 2" in rej[f"{path}:3"]
    assert "got 4" in rej[f"{path}:5"]
    assert "ts (from TIMESTAMP)" in rej[f"{path}:6"] and "16/11/2023" in rej[f"{path}:6"]
    assert "input_tokens" in rej[f"{path}:7"] and ">= 0" in rej[f"{path}:7"]


def test_final_poll_takes_a_partial_line_only_once_settled(lake: Lake, tmp_path: Path) -> None:
    log = tmp_path / "shim.jsonl"
    line = json.dumps(shim_record(1))
    log.write_text(json.dumps(shim_record(0)) + "\n" + line[:25])
    src = LogSource(log, lake, tmp_path / "cp", settle_seconds=30)
    # shutdown while the writer may be mid-line: the half line must not be consumed
    assert src.poll(final=True).read == 1
    with open(log, "a") as fh:
        fh.write(line[25:])  # completed, but still no newline
    old = time.time() - 60
    os.utime(log, (old, old))  # unchanged for a minute: the writer is gone
    res = src.poll(final=True)
    assert (res.read, res.loaded, res.rejected) == (1, 1, 0)
    assert q(lake, "SELECT count(*) FROM requests").item() == 2
    # the writer comes back: its newline ends line 2, and what follows is line 3 on
    with open(log, "a") as fh:
        fh.write("\n{broken\n" + json.dumps(shim_record(3)) + "\n")
    res = src.poll()
    assert (res.read, res.loaded, res.rejected) == (2, 1, 1)
    assert q(lake, "SELECT location FROM rejects").to_series().to_list() == [f"{log}:3"]
    assert q(lake, "SELECT count(*) FROM requests").item() == 3
