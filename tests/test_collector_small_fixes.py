"""Small collector fixes: summary quantiles in clean.serving_increase, damaged
Prometheus range checkpoints, and JSONL logs that begin with a UTF-8 BOM."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from pathlib import Path

import pytest

import finops
from collectors.config import CollectConfig, make_target
from collectors.daemon import Collector
from collectors.exposition import parse
from collectors.logs import UTF8_BOM, LogSource, ingest_file
from collectors.prometheus_api import PrometheusAPIError, RangeCheckpoint
from collectors.vllm import serving_rows
from finops.lake import Lake
from tests.test_logs_ingest import _completion, q, rejects, shim_record

UTC = dt.UTC

# --------------------------------------------------------------------------- summaries


def test_summary_quantiles_are_not_counted_as_counters(lake: Lake) -> None:
    """A p99 going 0.9 -> 0.4 -> 0.8 is a gauge: no increase, no false reset.

    The summary's _sum and _count are counters and keep their increases.
    """
    t0 = dt.datetime(2025, 1, 1, tzinfo=UTC)
    scrapes = [(0.9, 10.0, 10), (0.4, 12.0, 20), (0.8, 20.0, 30)]
    for i, (p99, total, count) in enumerate(scrapes):
        text = (
            "# TYPE vllm:request_latency_seconds summary\n"
            f'vllm:request_latency_seconds{{quantile="0.99"}} {p99}\n'
            f"vllm:request_latency_seconds_sum {total}\n"
            f"vllm:request_latency_seconds_count {count}\n"
        )
        rows = serving_rows(parse(text), ts=t0 + dt.timedelta(seconds=10 * i), target="v")
        lake.append("serving_samples", rows.drop("_location", "_raw"), source="vllm")
    db = finops.connect(lake.path)
    got = db.sql(
        "SELECT metric, labels, increase, reset FROM clean.serving_increase ORDER BY metric, ts"
    ).fetchall()
    assert got == [
        ("vllm:request_latency_seconds_count", "{}", 10.0, False),
        ("vllm:request_latency_seconds_count", "{}", 10.0, False),
        ("vllm:request_latency_seconds_sum", "{}", 2.0, False),
        ("vllm:request_latency_seconds_sum", "{}", 8.0, False),
    ]


# --------------------------------------------------------------------------- Prometheus checkpoint


DAMAGED = [
    ('{"url": "x"}', 'field "loaded_until": expected an ISO 8601 time, got missing'),
    ("[]", "expected a JSON object, got list"),
    ('{"loaded_until": 5}', 'field "loaded_until": expected an ISO 8601 time, got 5'),
    (
        '{"loaded_until": "yesterday"}',
        "field \"loaded_until\": expected an ISO 8601 time, got 'yesterday'",
    ),
    (
        '{"loaded_until": "2026-11-16T00:00:00"}',
        'field "loaded_until": expected a time with a UTC offset',
    ),
    ("{not json", "unreadable"),
]


@pytest.mark.parametrize(("body", "problem"), DAMAGED)
def test_damaged_range_checkpoint_names_file_field_and_remedy(
    tmp_path: Path, body: str, problem: str
) -> None:
    cp = RangeCheckpoint.for_query(tmp_path, "http://prom:9090", "up")
    cp.path.write_text(body)
    with pytest.raises(PrometheusAPIError) as exc:
        cp.load()
    msg = str(exc.value)
    assert msg.startswith(f"{cp.path}: checkpoint ")
    assert problem in msg
    assert "move it away to re-read the lookback window" in msg


def test_saved_range_checkpoint_loads_back(tmp_path: Path) -> None:
    cp = RangeCheckpoint.for_query(tmp_path, "http://prom:9090", "up")
    assert cp.load() is None
    until = dt.datetime(2026, 11, 16, 12, 30, tzinfo=UTC)
    cp.save(until, url="http://prom:9090", query="up")
    assert cp.load() == until


def test_damaged_range_checkpoint_reaches_scrape_health(tmp_path: Path) -> None:
    """The collector reports the named file, not a bare KeyError, and fetches nothing."""
    lake = tmp_path / "lake"
    cfg = CollectConfig(lake=lake, checkpoint_dir=lake / "_state")
    url = "http://127.0.0.1:9"  # never contacted: the checkpoint fails first
    cfg.targets.append(make_target({"kind": "prometheus", "url": url, "query": "up"}, "t"))
    cp = RangeCheckpoint.for_query(cfg.checkpoint_dir, url, "up")
    cp.path.parent.mkdir(parents=True, exist_ok=True)
    cp.path.write_text('{"url": "x"}')
    (out,) = asyncio.run(Collector(cfg, status=None).run_once())
    assert out.error is not None
    assert str(cp.path) in out.error
    assert '"loaded_until"' in out.error and "move it away" in out.error
    assert "KeyError" not in out.error


# --------------------------------------------------------------------------- JSONL with a BOM


def _bom_log(path: Path, records: list[dict], extra: str = "") -> None:
    text = "".join(json.dumps(r) + "\n" for r in records) + extra
    path.write_bytes(UTF8_BOM + text.encode())


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64])
def test_jsonl_bom_keeps_the_first_record(lake: Lake, tmp_path: Path, chunk_bytes: int) -> None:
    """PowerShell 5's `Out-File -Encoding utf8` log: line 1 loads; line numbers stay right."""
    log = tmp_path / "bom.jsonl"
    _bom_log(log, [shim_record(0), shim_record(1)], extra="not json\n")
    report = ingest_file(log, lake, chunk_bytes=chunk_bytes)
    assert report.mapping == "shim"
    assert (report.read, report.loaded, report.rejected) == (3, 2, 1)
    ids = q(lake, "SELECT request_id FROM requests ORDER BY 1")["request_id"].to_list()
    assert ids == ["req-0000000", "req-0000001"]
    assert rejects(lake)["location"].to_list() == [f"{log}:3"]


def test_jsonl_bom_single_record_is_detected(lake: Lake, tmp_path: Path) -> None:
    """With only line 1 to look at, format detection must see past the BOM too."""
    log = tmp_path / "usage.jsonl"
    _bom_log(log, [_completion(1)])
    report = ingest_file(log, lake)
    assert (report.mapping, report.loaded, report.rejected) == ("openai-usage", 1, 0)
    got = q(lake, "SELECT request_id, input_tokens FROM requests").rows()
    assert got == [("chatcmpl-1", 51)]


def test_followed_jsonl_bom_keeps_first_record_and_offsets(lake: Lake, tmp_path: Path) -> None:
    """The follower's first poll strips the BOM; the checkpoint's byte offset counts it."""
    log = tmp_path / "app.jsonl"
    _bom_log(log, [shim_record(0)])
    src = LogSource(log, lake, tmp_path / "cp")
    res = src.poll()
    assert (res.read, res.loaded) == (1, 1)
    with open(log, "a") as fh:
        fh.write(json.dumps(shim_record(1)) + "\n" + "not json\n")
    res = src.poll()
    assert (res.read, res.loaded) == (2, 1)
    assert src.errors == []
    (state,) = src.checkpoint.files.values()
    assert (state.offset, state.line) == (log.stat().st_size, 3)
    ids = q(lake, "SELECT request_id FROM raw.requests ORDER BY 1")["request_id"].to_list()
    assert ids == ["req-0000000", "req-0000001"]
    assert rejects(lake)["location"].to_list() == [f"{log}:3"]
