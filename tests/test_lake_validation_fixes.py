"""Lake.append validation: repeated keys in a batch, blank ids, non-finite numbers,
enumeration case and timestamp spellings. Every append keeps read == loaded + rejected."""

from __future__ import annotations

import datetime as dt
import math

import polars as pl
import pytest

import finops
from finops.lake import AppendResult, Lake, coerce

NOW = dt.datetime(2026, 11, 28, 12, 0, tzinfo=dt.UTC)
TS = pl.Datetime("us", "UTC")


def _rejects(lake: Lake) -> list[tuple[str, str, str]]:
    db = finops.connect(lake.path)
    return db.sql(
        "SELECT table_name, location, reason FROM clean.rejects ORDER BY location, reason"
    ).fetchall()


def _balanced(r: AppendResult) -> None:
    assert r.read == r.loaded + r.rejected, r


def _raw_count(lake: Lake, table: str) -> int:
    return finops.connect(lake.path).sql(f"SELECT count(*) FROM raw.{table}").fetchall()[0][0]


# ---------------------------------------------------------------- repeated keys in one batch


def test_a_differing_earlier_row_with_the_same_key_is_rejected_naming_the_kept_row(
    lake: Lake,
) -> None:
    rows = [
        {"request_id": "r1", "ts": "2026-11-20T01:00:00Z", "input_tokens": 100, "attempt": 1},
        {"request_id": "r1", "ts": "2026-11-20T01:00:05Z", "input_tokens": 100, "attempt": 2},
        {"request_id": "r2", "ts": "2026-11-20T01:00:06Z", "input_tokens": 7},
    ]
    r = lake.append("requests", rows, source="log", now=NOW)
    _balanced(r)
    assert (r.read, r.loaded, r.rejected, r.duplicates) == (3, 2, 1, 0)
    assert _raw_count(lake, "requests") == r.loaded - r.duplicates == 2
    db = finops.connect(lake.path)
    assert db.sql("SELECT attempt FROM raw.requests WHERE request_id = 'r1'").fetchall() == [(2,)]
    assert _rejects(lake) == [
        ("requests", "log row 1", "request_id 'r1' appears again at log row 2; "
         "the later record is kept"),
    ]  # fmt: skip


def test_the_reason_uses_the_location_column(lake: Lake) -> None:
    rows = pl.DataFrame(
        {
            "request_id": ["a", "a", "a"],
            "ts": ["2026-11-20T01:00:00Z"] * 3,
            "input_tokens": [1, 2, 3],
            "_location": ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"],
            "_raw": ['{"n":1}', '{"n":2}', '{"n":3}'],
        }
    )
    r = lake.append("requests", rows, source="f", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (1, 2)
    want = "request_id 'a' appears again at f.jsonl:3; the later record is kept"
    assert _rejects(lake) == [("requests", "f.jsonl:1", want), ("requests", "f.jsonl:2", want)]
    raw = finops.connect(lake.path).sql("SELECT raw FROM rejects ORDER BY location").fetchall()
    assert raw == [('{"n":1}',), ('{"n":2}',)]
    tokens = finops.connect(lake.path).sql("SELECT input_tokens FROM raw.requests").fetchall()
    assert tokens == [(3,)]


def test_an_exact_copy_is_a_duplicate_loaded_once(lake: Lake) -> None:
    row = {"request_id": "x", "ts": "2026-11-20T01:00:00Z", "input_tokens": 1}
    r = lake.append("requests", [row, dict(row), {**row, "request_id": "y"}], now=NOW)
    _balanced(r)
    assert (r.read, r.loaded, r.rejected, r.duplicates) == (3, 3, 0, 1)
    assert _raw_count(lake, "requests") == r.loaded - r.duplicates == 2
    assert _rejects(lake) == []


def test_counts_add_up_across_appends() -> None:
    total = AppendResult(table="requests", read=3, loaded=3, duplicates=1)
    total += AppendResult(table="requests", read=2, loaded=1, rejected=1, duplicates=1)
    assert (total.read, total.loaded, total.rejected, total.duplicates) == (5, 4, 1, 2)


def test_repeated_keys_are_resolved_for_every_keyed_table(lake: Lake) -> None:
    """Not only requests: a multi-column key (gpu_samples), nulls in it included."""
    base = {
        "ts": "2026-11-20T01:00:00Z",
        "source": "dcgm",
        "gpu_uuid": "GPU-1",
        "field": "DCGM_FI_DEV_GPU_UTIL",
    }
    rows = [{**base, "value": 10.0}, {**base, "value": 10.0}, {**base, "value": 99.0}]
    r = lake.append("gpu_samples", rows, source="dcgm", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected, r.duplicates) == (1, 2, 0)
    assert finops.connect(lake.path).sql("SELECT value FROM raw.gpu_samples").fetchall() == [
        (99.0,)
    ]
    (_, location, reason), _ = _rejects(lake)
    assert location == "dcgm row 1"
    assert reason.startswith("key (source='dcgm', host=null, gpu_uuid='GPU-1', ")
    assert "ts='2026-11-20T01:00:00Z') appears again at dcgm row 3; the later record is kept" in (
        reason
    )
    ev = {"event_id": "e1", "ts": "2026-11-20T01:00:00Z", "layer": "redis", "event": "hit"}
    r = lake.append("cache_events", [ev, {**ev, "event": "miss"}], source="c", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (1, 1)


def test_rows_rejected_for_another_reason_do_not_supersede(lake: Lake) -> None:
    rows = [
        {"request_id": "k", "ts": "2026-11-20T01:00:00Z", "input_tokens": 5},
        {"request_id": "k", "ts": "2026-11-20T01:00:01Z", "input_tokens": -1},
    ]
    r = lake.append("requests", rows, source="s", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (1, 1)
    assert _rejects(lake) == [("requests", "s row 2", "field 'input_tokens': must be >= 0, got -1")]


# ---------------------------------------------------------------- blank required strings


@pytest.mark.parametrize("blank", ["", "  ", "\t"])
def test_a_blank_required_string_is_missing(lake: Lake, blank: str) -> None:
    rows = [
        {"request_id": blank, "ts": "2026-11-20T01:00:06Z", "input_tokens": 300},
        {"request_id": blank, "ts": "2026-11-20T01:00:07Z", "input_tokens": 400},
        {"request_id": "ok", "ts": "2026-11-20T01:00:08Z", "input_tokens": 1},
    ]
    r = lake.append("requests", rows, source="s", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (1, 2)
    assert [reason for *_, reason in _rejects(lake)] == [
        "field 'request_id': required, missing or empty"
    ] * 2


def test_a_null_required_string_keeps_its_reason(lake: Lake) -> None:
    r = lake.append("requests", [{"request_id": None, "ts": "2026-11-20T01:00:00Z"}], now=NOW)
    assert r.rejected == 1
    assert _rejects(lake)[0][2] == "field 'request_id': required, missing or null"


# ---------------------------------------------------------------- non-finite numbers


@pytest.mark.parametrize(
    ("value", "shown"),
    [("NaN", "NaN"), ("inf", "inf"), ("-inf", "-inf"), (math.inf, "inf"), (math.nan, "NaN")],
)
def test_non_finite_floats_are_rejected(lake: Lake, value: object, shown: str) -> None:
    rows = [
        {"request_id": "n1", "ts": "2026-11-20T01:00:00Z", "latency_ms": value},
        {"request_id": "n2", "ts": "2026-11-20T01:00:01Z", "latency_ms": 100},
        {"request_id": "n3", "ts": "2026-11-20T01:00:02Z", "latency_ms": 200},
    ]
    r = lake.append("requests", rows, source="s", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (2, 1)
    assert _rejects(lake)[0][2] == f"field 'latency_ms': expected a finite number, got '{shown}'"
    p95 = finops.connect(lake.path).sql("SELECT latency_p95_ms FROM marts.requests_hourly")
    assert math.isfinite(p95.fetchall()[0][0])


def test_a_float_frame_column_with_nan_is_rejected(lake: Lake) -> None:
    """Already of the schema's type (no cast): still checked."""
    df = pl.DataFrame(
        {
            "request_id": ["a", "b"],
            "ts": pl.Series([NOW - dt.timedelta(hours=1)] * 2).cast(TS),
            "ttft_ms": [float("nan"), 12.0],
        }
    )
    r = lake.append("requests", df, now=NOW)
    assert (r.loaded, r.rejected) == (1, 1)
    assert _rejects(lake)[0][2] == "field 'ttft_ms': expected a finite number, got 'NaN'"


def test_metric_samples_keep_nan_values(lake: Lake) -> None:
    """A Prometheus value may be NaN (an empty summary): data, not an error."""
    row = {"ts": "2026-11-20T01:00:00Z", "source": "prometheus", "target": "t", "metric": "m"}
    r = lake.append("serving_samples", [{**row, "value": math.nan}], now=NOW)
    assert (r.loaded, r.rejected) == (1, 0)


# ---------------------------------------------------------------- enumeration case


def test_cache_status_case_is_one_value_to_every_view(lake: Lake) -> None:
    base = {"ts": "2026-11-20T01:00:00Z", "input_tokens": 5, "output_tokens": 5}
    rows = [
        {**base, "request_id": "h1", "cache_status": "HIT", "status_code": 200},
        {**base, "request_id": "h2", "cache_status": " Miss ", "status_code": 200},
    ]
    r = lake.append("requests", rows, source="s", now=NOW)
    assert (r.loaded, r.rejected) == (2, 0)
    db = finops.connect(lake.path)
    assert db.sql("SELECT request_id, cache_status FROM raw.requests ORDER BY 1").fetchall() == [
        ("h1", "hit"),
        ("h2", "miss"),
    ]
    assert db.sql("SELECT sum(cache_hits) FROM marts.requests_hourly").fetchall() == [(1,)]
    served = "SELECT count(*) FROM marts.request_costs WHERE served_by_cache"
    assert db.sql(served).fetchall() == [(1,)]


def test_cache_event_kind_and_layer_are_lower_cased(lake: Lake) -> None:
    ev = {"event_id": "e1", "ts": "2026-11-20T01:00:00Z", "layer": "Redis", "event": "HIT"}
    r = lake.append("cache_events", [ev, {**ev, "event_id": "e2", "event": "hitt"}], now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (1, 1)
    db = finops.connect(lake.path)
    assert db.sql("SELECT layer, event FROM raw.cache_events").fetchall() == [("redis", "hit")]
    assert _rejects(lake)[0][2] == (
        "field 'event': expected one of hit, miss, store, evict, got 'hitt'"
    )


# ---------------------------------------------------------------- timestamp spellings


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("2026-11-20T01:00", "2026-11-20T01:00:00"),
        ("2026-11-20T01:00Z", "2026-11-20T01:00:00"),
        ("2026-11-20 01:00", "2026-11-20T01:00:00"),
        ("2026-11-20T02:00+01:00", "2026-11-20T01:00:00"),
        ("2026-11-20 01:00:00 +0000 UTC", "2026-11-20T01:00:00"),
        ("2026-11-20 02:00:00.25 +0100 CET", "2026-11-20T01:00:00.25"),
        ("2026-11-20 01:00:00 +0000 UTC m=+0.001234", "2026-11-20T01:00:00"),
        ("2026-11-20 01:00:00 UTC", "2026-11-20T01:00:00"),
        ("2026-11-20 02:00:00 +0100", "2026-11-20T01:00:00"),
        # the forms read before
        ("2026-11-20T01:00:00Z", "2026-11-20T01:00:00"),
        ("2026-11-20T03:00:00.5+02:00", "2026-11-20T01:00:00.5"),
        ("2026-11-20 01:00:00", "2026-11-20T01:00:00"),
        ("2026-11-20", "2026-11-20T00:00:00"),
        ("1763600400", "2025-11-20T01:00:00"),
        ("1763600400123", "2025-11-20T01:00:00.123"),
    ],
)
def test_timestamp_spellings(text: str, want: str) -> None:
    got = coerce(pl.Series("ts", [text]), TS)[0]
    assert got == dt.datetime.fromisoformat(want).replace(tzinfo=dt.UTC)


@pytest.mark.parametrize(
    "text", ["garbage", "2026-11-20 01:00:00 CET", "2026-13-20T01:00", "2026-11-20T25:00", "01:00"]
)
def test_timestamps_that_stay_unread(text: str) -> None:
    assert coerce(pl.Series("ts", [text]), TS)[0] is None


def test_a_column_mixing_spellings_reads_each(lake: Lake) -> None:
    """The sample that orders the readers must not decide what is read."""
    texts = ["2026-11-20T01:00:00Z"] * 100 + ["2026-11-20 01:00:00 +0000 UTC", "1763600400", "x"]
    got = coerce(pl.Series("ts", texts), TS)
    assert got.null_count() == 1 and got[-1] is None
    assert got[-2] == dt.datetime(2025, 11, 20, 1, tzinfo=dt.UTC)
    assert got[-3] == dt.datetime(2026, 11, 20, 1, tzinfo=dt.UTC)
    rows = [{"request_id": f"r{i}", "ts": t} for i, t in enumerate(texts)]
    r = lake.append("requests", rows, source="s", now=NOW)
    _balanced(r)
    assert (r.loaded, r.rejected) == (102, 1)
    assert _rejects(lake)[0][2].startswith("field 'ts': expected a timestamp")
