"""The clean and marts views on the demo week: dedup, counter resets, utilization signal."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest

import finops
from finops.lake import Lake


@pytest.fixture(scope="module")
def db(demo_lake: Path):
    con = finops.connect(demo_lake)
    con.execute("SET enable_progress_bar = false")
    return con


def test_every_table_and_mart_has_rows(db) -> None:
    for view in (
        "clean.gpu_samples", "clean.serving_samples", "clean.requests", "clean.cache_events",
        "clean.scrape_health", "clean.rejects", "clean.serving_increase",
        "clean.gpu_counter_increase", "marts.gpu_hourly", "marts.requests_hourly",
        "marts.tenant_daily",
    ):  # fmt: skip
        assert db.sql(f"SELECT count(*) FROM (FROM {view} LIMIT 1)").fetchall()[0][0] == 1, view


def test_clean_views_dedupe_a_reloaded_batch(demo_lake: Path, tmp_path: Path) -> None:
    copy = tmp_path / "lake"
    shutil.copytree(demo_lake, copy)
    con = finops.connect(copy)
    q = {
        "requests": "SELECT count(*), sum(input_tokens) FROM requests",
        "hourly": "SELECT sum(requests), sum(output_tokens) FROM marts.requests_hourly",
        "serving": "SELECT count(*), round(sum(increase), 2) FROM serving_increase "
        "WHERE target = 'vllm-mid-0' AND metric LIKE 'vllm:%_total'",
    }
    before = {k: con.sql(v).fetchall() for k, v in q.items()}
    raw_before = con.sql("SELECT count(*) FROM raw.requests").fetchall()[0][0]
    # a collector re-sends an overlapping slice: other file contents, same keys
    some = con.sql("SELECT * FROM raw.requests USING SAMPLE 500 ROWS (reservoir, 1)").pl()
    scrape = con.sql(
        "SELECT * FROM raw.serving_samples WHERE target = 'vllm-mid-0' "
        "AND ts < TIMESTAMPTZ '2026-11-16 06:00:00+00'"
    ).pl()
    now = dt.datetime(2026, 11, 28, tzinfo=dt.UTC)
    lake = Lake(copy)
    assert lake.append("requests", some, now=now).files
    assert lake.append("serving_samples", scrape, now=now).files
    assert con.sql("SELECT count(*) FROM raw.requests").fetchall()[0][0] == raw_before + 500
    assert {k: con.sql(v).fetchall() for k, v in q.items()} == before


def test_counter_resets_never_give_negative_increases(db) -> None:
    inc = db.sql(
        "SELECT target, min(increase) AS low, count(*) FILTER (reset) AS resets "
        "FROM serving_increase WHERE metric LIKE '%\\_total' ESCAPE '\\' GROUP BY 1"
    ).pl()
    assert inc["low"].min() >= 0
    # the one restart of the demo: every counter of that replica resets once
    assert inc.filter(pl.col("resets") > 0)["target"].to_list() == ["vllm-mid-3"]
    low, resets = db.sql(
        "SELECT min(increase), count(*) FILTER (reset) FROM gpu_counter_increase"
    ).fetchall()[0]
    assert low > 0 and resets == 0  # the GPU energy counter survives a vLLM restart
    raw_drop = db.sql(
        """
        SELECT count(*) FROM (
          SELECT value < lag(value) OVER (PARTITION BY target, metric, labels ORDER BY ts) AS down
          FROM clean.serving_samples WHERE metric = 'vllm:prompt_tokens_total'
        ) WHERE down
        """
    ).fetchall()[0][0]
    assert raw_drop == 1  # the raw counter really goes down once, and the view absorbs it


def test_serving_counters_match_the_request_log(db) -> None:
    counters = db.sql(
        """
        SELECT target, sum(increase) AS prompt FROM serving_increase
        WHERE metric = 'vllm:prompt_tokens_total' GROUP BY 1
        """
    ).pl()
    logged = db.sql(
        """
        SELECT regexp_extract(upstream, '//([^.]+)\\.', 1) AS target,
               sum(input_tokens)::DOUBLE AS prompt
        FROM requests WHERE status_code = 200 AND upstream IS NOT NULL GROUP BY 1
        """
    ).pl()
    both = counters.join(logged, on="target", suffix="_log")
    assert both.height == 10
    # equal up to scrape granularity: the last interval, and the restart's lost one
    rel = (both["prompt"] - both["prompt_log"]).abs() / both["prompt_log"]
    assert rel.max() < 0.02, both


def test_histogram_buckets_are_cumulative(db) -> None:
    bad = db.sql(
        """
        WITH b AS (
          SELECT ts, target, metric, value,
                 CAST(json_extract_string(labels, '$.le') AS DOUBLE) AS le
          FROM clean.serving_samples
          WHERE metric LIKE '%\\_bucket' ESCAPE '\\' AND target IN ('vllm-mid-3', 'vllm-large-0')
        )
        SELECT count(*) FROM (
          SELECT value < lag(value) OVER (PARTITION BY ts, target, metric ORDER BY le) AS down
          FROM b
        ) WHERE down
        """
    ).fetchall()[0][0]
    assert bad == 0
    inf_vs_count = db.sql(
        """
        SELECT count(*) FROM clean.serving_samples c
        JOIN clean.serving_samples b ON b.ts = c.ts AND b.target = c.target
         AND b.metric = replace(c.metric, '_count', '_bucket')
         AND json_extract_string(b.labels, '$.le') = '+Inf'
        WHERE c.metric LIKE '%\\_count' ESCAPE '\\' AND b.value <> c.value
          AND c.target IN ('vllm-mid-3', 'vllm-large-0')
        """
    ).fetchall()[0][0]
    assert inf_vs_count == 0


def test_gpu_hourly_util_signal(db, tmp_path: Path) -> None:
    sig = db.sql("SELECT DISTINCT util_signal FROM marts.gpu_hourly").pl()["util_signal"]
    assert sig.to_list() == ["DCGM_FI_PROF_SM_ACTIVE"]
    flatter = db.sql("SELECT avg(gpu_util) > 1.5 * avg(util) FROM marts.gpu_hourly").fetchall()
    assert flatter[0][0], "GPU_UTIL should read well above SM activity"
    # a GPU that only reports GPU_UTIL (no profiling metrics) falls back and says so
    lake = Lake(tmp_path / "lake")
    lake.append(
        "gpu_samples",
        [
            {"ts": f"2026-11-16T10:{m:02d}:00Z", "source": "nvml", "gpu_uuid": "GPU-x",
             "field": "DCGM_FI_DEV_GPU_UTIL", "value": 80.0}
            for m in range(3)
        ],
        now=dt.datetime(2026, 11, 28, tzinfo=dt.UTC),
    )  # fmt: skip
    row = finops.connect(lake.path).sql("SELECT util, util_signal FROM gpu_hourly").pl()
    assert row.to_dicts() == [{"util": 0.8, "util_signal": "DCGM_FI_DEV_GPU_UTIL"}]


def test_marts_agree_with_clean_requests(db) -> None:
    # token columns: what a model processed (no shim cache hits, no refusals: a cap's, or
    # a 4xx but 408/499, such as vLLM's 400 for a prompt over max_model_len)
    clean = db.sql(
        "SELECT count(*), sum(input_tokens) FILTER (cache_status NOT IN ('hit', 'coalesced')"
        " AND coalesce(error_type, '') <> 'context_length_exceeded'"
        " AND NOT (coalesce(status_code, 0) BETWEEN 400 AND 498 AND status_code <> 408))"
        " FROM requests"
    ).fetchall()[0]
    hourly = db.sql("SELECT sum(requests), sum(input_tokens) FROM requests_hourly").fetchall()[0]
    daily = db.sql("SELECT sum(requests), sum(input_tokens) FROM tenant_daily").fetchall()[0]
    assert clean == hourly == daily
    hours = db.sql("SELECT count(DISTINCT hour) FROM gpu_hourly").fetchall()[0][0]
    assert hours == 48
    per_gpu = db.sql("SELECT count(DISTINCT gpu_uuid) FROM gpu_hourly").pl()
    assert per_gpu.item() == 16
    assert isinstance(per_gpu, pl.DataFrame)


def _ok_and_capped() -> list[dict]:
    """A served request and one a context cap refused (its refused size in input_tokens)."""
    ts = dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    base = {"ts": ts, "tier": "small", "tenant": "t", "feature": "f", "operation": "chat"}
    return [
        {**base, "request_id": "ok", "status_code": 200, "input_tokens": 100, "output_tokens": 10},
        {
            **base,
            "request_id": "capped",
            "status_code": 400,
            "error_type": "context_length_exceeded",
            "input_tokens": 90_000,
            "output_tokens": 0,
        },
    ]


def test_requests_refused_for_context_length_did_no_work(tmp_path: Path) -> None:
    """A shim cap refusing an over-long prompt logs its size in input_tokens, but no
    model ran: it must not take a share of the tier-hour's GPU cost."""
    Lake(tmp_path / "lake").append("requests", _ok_and_capped(), source="test")
    con = finops.connect(tmp_path / "lake")
    got = dict(con.sql("SELECT request_id, (worked, work_in) FROM marts.request_work").fetchall())
    assert got == {"ok": (True, 100), "capped": (False, 0)}


def test_cap_refused_tokens_are_not_input_tokens(tmp_path: Path) -> None:
    """The refused size a cap logs in input_tokens was never processed: the token marts,
    `finops costs --by tier` and the totals (the report headline) leave it out, while the
    request itself is counted (and failed). An upstream error that reached a model counts."""
    import finops.costs as fc

    rows = _ok_and_capped()
    rows.append(
        {
            **rows[0],
            "request_id": "upstream500",
            "status_code": 500,
            "error_type": "server_error",
            "input_tokens": 40,
            "output_tokens": 2,
        }
    )
    Lake(tmp_path / "lake").append("requests", rows, source="test")
    con = finops.connect(tmp_path / "lake")
    for mart in ("requests_hourly", "tenant_daily"):
        got = con.sql(f"SELECT sum(requests), sum(failed), sum(input_tokens) FROM {mart}")
        assert got.fetchall()[0] == (3, 2, 140), mart
    tier = fc.by_tier(con, week="2026-W48").row(0, named=True)
    assert (tier["requests"], tier["input_tokens"], tier["output_tokens"]) == (3, 140, 12)
    t = fc.totals(con, week="2026-W48")
    assert (t["requests"], t["input_tokens"], t["output_tokens"]) == (3, 140, 12)


def test_coalesced_followers_and_replays_are_not_work_nor_duplicates(tmp_path: Path) -> None:
    """3 identical temperature-0 requests in flight make 1 upstream call: the 2 coalesced
    followers (and an Idempotency-Key replay, logged as a hit with retry_of) ran on no
    GPU, are not duplicates and are not what a response cache would still save."""
    import finops.costs as fc

    ts = dt.datetime(2026, 11, 23, 10, tzinfo=dt.UTC)
    base = {"tier": "mid", "tenant": "t", "feature": "f", "operation": "chat",
            "status_code": 200, "prompt_fingerprint": "fpC", "attempt": 1}  # fmt: skip
    ms = dt.timedelta(milliseconds=1)
    zero = {"input_tokens": 0, "output_tokens": 0}
    rows = [
        {**base, "request_id": "leader", "ts": ts, "cache_status": "miss",
         "input_tokens": 50, "output_tokens": 8},
        {**base, "request_id": "f1", "ts": ts + ms, "cache_status": "coalesced", **zero},
        {**base, "request_id": "f2", "ts": ts + 2 * ms, "cache_status": "coalesced", **zero},
        {**base, "request_id": "replay", "ts": ts + 9 * ms, "cache_status": "hit",
         "retry_of": "leader", "attempt": 2, **zero},
        # a real duplicate a minute later that did reach the GPU
        {**base, "request_id": "dup", "ts": ts + 60_000 * ms, "cache_status": "miss",
         "input_tokens": 50, "output_tokens": 8},
    ]  # fmt: skip
    Lake(tmp_path / "lake").append("requests", rows, source="test")
    con = finops.connect(tmp_path / "lake")
    got = {
        r[0]: r[1:]
        for r in con.sql(
            "SELECT request_id, worked, is_duplicate, leak FROM marts.request_costs"
        ).fetchall()
    }
    assert got == {
        "leader": (True, False, None),
        "f1": (False, False, None),
        "f2": (False, False, None),
        "replay": (False, False, None),
        "dup": (True, True, "duplicate"),
    }
    pot = fc.cache_savings(con, week="2026-W48").filter(
        pl.col("layer") == "response_cache_potential"
    )
    assert pot["requests"].to_list() == [1]  # the real duplicate only
    hourly = con.sql("SELECT sum(requests), sum(input_tokens) FROM requests_hourly")
    assert hourly.fetchall()[0] == (5, 100)


def test_a_lake_written_before_a_column_existed_still_opens(tmp_path: Path) -> None:
    """Files an older finops wrote lack the columns added since (prompt_tokens_est,
    routed_tier, ...): the views read those as NULL instead of failing to open."""
    from finops.schemas import TABLES

    lake = tmp_path / "lake"
    Lake(lake).append(
        "requests",
        [
            {
                "request_id": "r1",
                "ts": dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC),
                "tier": "small",
                "input_tokens": 10,
                "output_tokens": 5,
                "status_code": 200,
            }
        ],
        source="test",
    )
    (path,) = (lake / "requests").glob("date=*/*.parquet")
    old = pl.read_parquet(path).drop("prompt_tokens_est", "routed_tier")
    old.write_parquet(path)
    assert "prompt_tokens_est" not in pl.read_parquet_schema(path)
    db = finops.connect(lake)
    row = db.sql(
        "SELECT request_id, prompt_tokens_est, routed_tier, input_tokens FROM clean.requests"
    ).fetchall()
    assert row == [("r1", None, None, 10)]
    assert db.sql("SELECT count(*) FROM marts.requests_hourly").fetchall() == [(1,)]
    cols = [r[0] for r in db.sql("DESCRIBE raw.requests").fetchall()]
    assert cols == [*TABLES["requests"].columns, "_file"]
    cols = [r[0] for r in db.sql("DESCRIBE clean.requests").fetchall()]
    assert cols == list(TABLES["requests"].columns)


def test_energy_counted_once_when_dcgm_and_nvml_read_the_same_gpu(tmp_path: Path) -> None:
    """Both collectors on one host read the same joules: the hour keeps DCGM's counter."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    rows = []
    for k in range(3):  # 3 scrapes, 3.6e9 mJ (1 kWh) apart
        ts = t0 + dt.timedelta(seconds=10 * k)
        for source, field, slope in (
            ("dcgm", "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", 3.6e9),
            ("nvml", "nvml_total_energy_consumption_mj", 3.7e9),  # a slightly other reading
        ):
            rows.append(
                {"ts": ts, "source": source, "host": "n1", "gpu_uuid": "GPU-1",
                 "gpu_model": "NVIDIA L4", "field": field, "value": 1e10 + k * slope}
            )  # fmt: skip
    # a second GPU seen only by NVML still gets its energy
    rows += [{**r, "gpu_uuid": "GPU-2"} for r in rows if r["source"] == "nvml"]
    Lake(tmp_path / "lake", fsync=False).append("gpu_samples", rows, source="t")
    got = dict(
        finops.connect(tmp_path / "lake")
        .sql("SELECT gpu_uuid, energy_kwh FROM marts.gpu_hourly")
        .fetchall()
    )
    assert got == pytest.approx({"GPU-1": 2.0, "GPU-2": 2 * 3.7 / 3.6})
