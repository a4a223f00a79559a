"""The demo week generator and `finops demo`."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
from finops.cli import app
from finops.demo import MARKER, DemoError, TracesMissing, generate
from finops.demo.traffic import load_traces
from finops.lake import Lake
from finops.schemas import TABLES


def _contents(path: Path, table: str) -> pl.DataFrame:
    df = pl.concat([pl.read_parquet(f) for f in Lake(path).files(table)], how="vertical")
    return df.sort(df.columns, nulls_last=True)


def test_same_seed_same_lake_other_seed_other_lake(tmp_path: Path) -> None:
    kw = {"days": 1, "gpus": 6, "scale": 0.02}
    generate(tmp_path / "a", seed=7, **kw)
    generate(tmp_path / "b", seed=7, **kw)
    generate(tmp_path / "c", seed=8, **kw)
    for table in TABLES:
        a, b = _contents(tmp_path / "a", table), _contents(tmp_path / "b", table)
        assert a.height > 0, table
        assert a.equals(b), table
    assert not _contents(tmp_path / "a", "requests").equals(_contents(tmp_path / "c", "requests"))


def test_every_table_gets_rows(demo_lake: Path) -> None:
    info = {r["table"]: r for r in Lake(demo_lake).info().to_dicts()}
    for table in TABLES:
        assert info[table]["rows"] > 0, table
    assert info["requests"]["first_date"] == "2026-11-16"
    assert info["requests"]["last_date"] == "2026-11-17"
    assert (demo_lake / MARKER).is_file()


def test_refuses_to_wipe_a_foreign_lake_but_regenerates_its_own(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "precious.parquet").write_text("not mine")
    with pytest.raises(DemoError, match="not made by `finops demo`"):
        generate(foreign, days=1, gpus=6, scale=0.01)
    assert (foreign / "precious.parquet").read_text() == "not mine"
    own = tmp_path / "own"
    generate(own, days=1, gpus=6, scale=0.01, seed=1)
    (own / "requests" / "stale.txt").write_text("left over")
    generate(own, days=1, gpus=6, scale=0.01, seed=2)
    assert not (own / "requests" / "stale.txt").exists()
    assert (own / MARKER).is_file()


def test_missing_traces_fail_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    load_traces()  # cached for the real folder; the override must still be honoured
    monkeypatch.setenv("FINOPS_TRACES_DIR", str(tmp_path / "none"))
    with pytest.raises(TracesMissing, match="FINOPS_TRACES_DIR") as err:
        generate(tmp_path / "lake", days=1, gpus=6)
    assert "azure-llm-2023-conv.csv" in str(err.value)
    assert str(tmp_path / "none") in str(err.value)
    assert not (tmp_path / "lake").exists()  # nothing written


def test_a_fresh_clone_without_the_shared_traces_replays_the_committed_extract(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """No ../shared and no FINOPS_TRACES_DIR: data/traces gives the same numbers and lake."""
    import finops.demo.traffic as traffic

    monkeypatch.delenv("FINOPS_TRACES_DIR", raising=False)
    originals = load_traces()
    if traffic.traces_dir() != traffic.SHARED_TRACES or not traffic._has_traces(
        traffic.SHARED_TRACES
    ):
        pytest.skip("the public traces are not in ../shared/data/traces to compare with")
    monkeypatch.setattr(traffic, "SHARED_TRACES", tmp_path / "no-shared")
    embedded = load_traces()
    for key in traffic.TRACE_KEYS:
        assert getattr(embedded, key).equals(getattr(originals, key)), key
    generate(tmp_path / "a", days=1, gpus=6, scale=0.01)
    monkeypatch.undo()
    generate(tmp_path / "b", days=1, gpus=6, scale=0.01)
    con = finops.connect(tmp_path / "a")
    con2 = finops.connect(tmp_path / "b")
    q = "SELECT count(*), sum(input_tokens), sum(output_tokens) FROM raw.requests"
    assert con.sql(q).fetchall() == con2.sql(q).fetchall()


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(DemoError, match="at least 6"):
        generate(tmp_path / "x", gpus=4)
    with pytest.raises(DemoError, match="days"):
        generate(tmp_path / "x", days=0)


@pytest.fixture(scope="module")
def db(demo_lake: Path):
    con = finops.connect(demo_lake)
    con.execute("SET enable_progress_bar = false")
    return con


def test_fleet_follows_the_conventions(db) -> None:
    pods = db.sql(
        "SELECT pod, gpu_model, count(DISTINCT gpu_uuid) AS gpus, any_value(labels) AS labels "
        "FROM raw.gpu_samples GROUP BY ALL ORDER BY pod"
    ).pl()
    assert pods["pod"].to_list() == [
        "vllm-large-0", "vllm-large-1", "vllm-mid-0", "vllm-mid-1", "vllm-mid-2", "vllm-mid-3",
        "vllm-small-0", "vllm-small-1", "vllm-small-2", "vllm-small-3",
    ]  # fmt: skip
    assert pods["gpus"].to_list() == [4, 4] + [1] * 8
    assert set(pods["gpu_model"]) == {"NVIDIA H100 80GB HBM3", "NVIDIA L4"}
    assert pods["labels"][0] == (
        '{"app":"vllm-large","model":"llama-3.1-70b-instruct","tier":"large"}'
    )
    fields = db.sql("SELECT DISTINCT field FROM raw.gpu_samples ORDER BY 1").pl()["field"]
    assert len(fields) == 7 and all(f.startswith("DCGM_FI_") for f in fields)
    models = db.sql(
        "SELECT DISTINCT tier, response_model FROM requests WHERE response_model IS NOT NULL "
        "ORDER BY 1"
    ).fetchall()
    assert models == [
        ("large", "llama-3.1-70b-instruct"),
        ("mid", "llama-3.1-8b-instruct"),
        ("small", "llama-3.2-1b-instruct"),
    ]


def test_gpu_signals_are_physically_consistent(db) -> None:
    g = db.sql(
        """
        SELECT gpu_model,
          avg(value) FILTER (field = 'DCGM_FI_PROF_SM_ACTIVE') AS sm,
          avg(value) FILTER (field = 'DCGM_FI_DEV_GPU_UTIL') / 100 AS gpu_util,
          quantile_cont(value, 0.5) FILTER (field = 'DCGM_FI_DEV_FB_USED') AS fb,
          min(value) FILTER (field = 'DCGM_FI_DEV_POWER_USAGE') AS pmin,
          max(value) FILTER (field = 'DCGM_FI_DEV_POWER_USAGE') AS pmax
        FROM raw.gpu_samples GROUP BY 1 ORDER BY 1
        """
    ).pl()
    h100, l4 = g.row(0, named=True), g.row(1, named=True)
    for row, total, tdp in ((h100, 81559, 700), (l4, 23034, 72)):
        assert row["gpu_util"] > 1.5 * row["sm"]  # GPU_UTIL flatters
        assert row["fb"] > 0.85 * total  # vLLM preallocates the KV cache
        assert 0 < row["pmin"] < row["pmax"] <= tdp
    # busy hours: SM activity tracks token throughput on each replica
    corr = db.sql(
        """
        WITH tok AS (
          SELECT date_trunc('hour', ts) AS hour, regexp_extract(upstream, '//([^.]+)\\.', 1) AS pod,
                 sum(input_tokens + output_tokens) AS tokens
          FROM requests WHERE upstream IS NOT NULL GROUP BY ALL)
        SELECT corr(h.sm_active, tok.tokens) FROM gpu_hourly h JOIN tok USING (hour, pod)
        """
    ).fetchall()[0][0]
    assert corr > 0.6
    # the energy counter integrates power: kWh ~= avg W x hours
    e = db.sql(
        "SELECT sum(energy_kwh) AS kwh, sum(power_w) / 1000 AS kwh_from_power FROM gpu_hourly"
    ).fetchall()[0]
    assert e[0] == pytest.approx(e[1], rel=0.02)


def test_request_log_has_the_expected_messes(db) -> None:
    r = db.sql("SELECT * FROM requests").pl()
    # a weekday working hour is much busier than the night
    by_hour = r.group_by(pl.col("ts").dt.hour().alias("h")).len()
    day = by_hour.filter(pl.col("h").is_between(9, 16))["len"].mean()
    night = by_hour.filter(pl.col("h").is_between(1, 5))["len"].mean()
    assert day > 4 * night
    # exact duplicates share a fingerprint; response-cache hits spend nothing upstream
    dups = r.group_by("prompt_fingerprint").len().filter(pl.col("len") > 1)
    assert dups.height > 0
    hits = r.filter(pl.col("cache_status") == "hit")
    assert hits.height > 0 and hits["upstream"].null_count() == hits.height
    assert (hits["cached_input_tokens"] == 0).all()
    # retries point at failed originals with a retryable status
    retries = r.filter(pl.col("retry_of").is_not_null())
    assert retries.height > 0 and (retries["attempt"] >= 2).all()
    originals = r.filter(pl.col("request_id").is_in(retries["retry_of"].implode()))
    assert set(originals["status_code"]) <= {429, 503, 504}
    assert originals["error_type"].null_count() == 0
    # the over-attached feature has a long tail of huge prompts
    p99 = r.group_by("feature").agg(pl.col("input_tokens").quantile(0.99).alias("p99"))
    biggest = p99.sort("p99", descending=True)["feature"][0]
    assert biggest == "rag-qa"
    assert (r["truncated_tokens"] > 0).any()
    emb = r.filter(pl.col("feature") == "embeddings")
    assert set(emb["operation"]) == {"embeddings"} and (emb["output_tokens"] == 0).all()
    routed = r.filter(pl.col("request_model") == "auto")
    assert routed["router_version"].null_count() == 0
    assert routed["route_propensity"].is_between(0, 1).all()
    assert (routed["routed_tier"] == routed["tier"]).all()
    assert r.filter(pl.col("request_model") != "auto")["routed_tier"].null_count() == (
        r.height - routed.height
    )
    assert set(r["request_model"]) == {"auto", "small", "mid", "large"}
    assert r["stream"].any() and not r["stream"].all()
    assert (r["cached_input_tokens"] <= r["input_tokens"]).all()
    assert (
        r["tenant"].value_counts(sort=True)["count"][0]
        > 3 * r["tenant"].value_counts(sort=True)["count"][-1]
    )  # Zipf


def test_cache_events_scrape_health_and_rejects(db) -> None:
    layers = dict(db.sql("SELECT layer, count(*) FROM cache_events GROUP BY 1").fetchall())
    assert set(layers) == {"vllm_prefix", "shim_response"}
    hits = db.sql("SELECT count(*) FROM requests WHERE cache_status = 'hit'").fetchall()[0][0]
    assert layers["shim_response"] == hits
    down = db.sql(
        "SELECT target, count(*) FROM scrape_health WHERE NOT up AND error LIKE '%refused%' "
        "GROUP BY 1"
    ).fetchall()
    assert down == [("vllm-mid-3", 4)]  # the replica is down for 4 scrape intervals
    kinds = {k for (k,) in db.sql("SELECT DISTINCT kind FROM scrape_health").fetchall()}
    assert kinds == {"dcgm", "vllm"}
    rej = db.sql("SELECT location, reason FROM rejects ORDER BY location").pl()
    assert rej.height == 7
    assert all("field '" in x or "not valid JSON" in x for x in rej["reason"])


def test_finops_demo_command(tmp_path: Path) -> None:
    runner = CliRunner()
    lake = tmp_path / "lake"
    res = runner.invoke(
        app, ["demo", "--lake", str(lake), "--days", "1", "--gpus", "6", "--scale", "0.2"]
    )
    assert res.exit_code == 0, res.output
    for needle in ("GPU spend", "requests", "cost per 1k requests", "top tenant #1",
                   "DCGM_FI_PROF_SM_ACTIVE"):  # fmt: skip
        assert needle in res.stdout, needle
    again = runner.invoke(app, ["demo", "--lake", str(lake), "--days", "1", "--gpus", "6"])
    assert again.exit_code == 0, again.output
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "x").write_text("x")
    res = runner.invoke(app, ["demo", "--lake", str(foreign)])
    assert res.exit_code == 2 and "refusing to wipe" in res.stderr
    res = runner.invoke(
        app, ["demo", "--lake", str(lake)], env={"FINOPS_TRACES_DIR": str(tmp_path / "none")}
    )
    assert res.exit_code == 2 and "demo traces not found" in res.stderr
    assert "Traceback" not in res.output
    res = runner.invoke(app, ["demo", "--lake", str(lake), "--start", "16/11/2026"])
    assert res.exit_code == 2 and "--start" in res.stderr
    assert dt.date(2026, 11, 16).isoformat() in res.stderr or "YYYY-MM-DD" in res.stderr


@pytest.mark.parametrize("kind", ["file", "foreign folder"])
def test_demo_refuses_a_router_path_it_cannot_fill_before_generating(
    tmp_path: Path, kind: str
) -> None:
    """<lake parent>/router/demo-artifact that is no artifact: one error line, no half-made
    demo (it was an ArtifactError traceback after the lake had been generated)."""
    out = tmp_path / "router" / "demo-artifact"
    if kind == "file":
        out.parent.mkdir()
        out.write_text("not an artifact")
    else:
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
    lake = tmp_path / "lake"
    res = CliRunner().invoke(app, ["demo", "--lake", str(lake), "--days", "1", "--gpus", "6"])
    assert res.exit_code == 2, res.output
    assert "error:" in res.output and str(out) in res.output
    assert "Traceback" not in res.output
    assert not lake.exists()  # refused before generating anything


def test_demo_refuses_to_replace_a_reports_folder_it_did_not_make(tmp_path: Path) -> None:
    """The demo writes its weekly report next to the lake, under the names `finops
    report` uses: a team's own report-<week>.html there was silently replaced."""
    reports = tmp_path / "reports"
    reports.mkdir()
    mine = reports / "report-2026-W47.html"
    mine.write_text("MINE")
    lake = tmp_path / "lake"
    res = CliRunner().invoke(app, ["demo", "--lake", str(lake), "--days", "1", "--gpus", "6"])
    assert res.exit_code == 2, res.output
    assert str(reports) in res.output and "not made by `finops demo`" in res.output
    assert mine.read_text() == "MINE" and not lake.exists()


def test_the_demo_reports_its_latest_whole_week() -> None:
    """14 days from a Monday report the second week, not the first; else the fullest week."""
    from finops.cli.demo import report_week

    assert report_week(dt.date(2026, 11, 16), 7) == "2026-W47"
    assert report_week(dt.date(2026, 11, 9), 14) == "2026-W47"
    assert report_week(dt.date(2026, 11, 9), 10) == "2026-W46"
    # Wednesday to Tuesday: 5 days of W47, 2 of W48
    assert report_week(dt.date(2026, 11, 18), 7) == "2026-W47"
    # one day only: its week; a year boundary keeps the ISO year
    assert report_week(dt.date(2026, 11, 20), 1) == "2026-W47"
    assert report_week(dt.date(2026, 12, 28), 14) == "2027-W01"


def test_the_demo_summary_counts_tokens_as_costs_does(demo_lake: Path) -> None:
    """Was: raw sums with cache hits and refusals (1,948M input tokens against the 1,801M
    of `finops costs` and the report for the same week)."""
    import finops.costs as fc
    from finops.demo.summary import summarize

    db = finops.connect(demo_lake)
    s, t = summarize(db), fc.totals(db)
    assert (s["input_tokens"], s["output_tokens"]) == (t["input_tokens"], t["output_tokens"])
    raw = db.sql("SELECT sum(input_tokens) FROM clean.requests").fetchall()[0][0]
    assert raw > s["input_tokens"]  # the demo has hits and refusals
