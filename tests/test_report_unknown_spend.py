"""The weekly report where GPU spend is unknown: request logs without GPU metrics (the
whole week, or some days of it). The report renders and says spend is unknown; no hour,
forecast or chart counts unknown spend as $0.

Real parts: a lake written by `finops ingest requests` from a shim JSONL file, demo lakes
with GPU-metric days removed, the report built through the notebook into HTML.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.report.figures import compute

UTC = dt.UTC


def _shim_log(path: Path, n: int) -> Path:
    """`n` shim request-log records on Monday 2026-11-16, some failed, some duplicates."""
    start = dt.datetime(2026, 11, 16, 9, tzinfo=UTC)
    with path.open("w") as fh:
        for i in range(n):
            rec = {
                "request_id": f"req-{i:07d}",
                "ts": (start + dt.timedelta(seconds=i * 2.5)).isoformat().replace("+00:00", "Z"),
                "tenant": f"tenant-{i % 4}",
                "feature": ["chat-assistant", "summarize", "rag-qa"][i % 3],
                "operation": "chat",
                "request_model": "auto",
                "response_model": "llama-3.1-8b-instruct",
                "tier": "mid",
                "upstream": "http://vllm-mid-0:8000",
                "input_tokens": 100 + i % 900,
                "output_tokens": 10 + i % 300,
                "cached_input_tokens": (i % 7) * 16,
                "status_code": 500 if i % 17 == 0 else 200,
                "finish_reason": "stop",
                "ttft_ms": 35.5,
                "latency_ms": 420.25,
                "stream": False,
                "cache_status": "hit" if i % 10 == 0 else "miss",
                "prompt_fingerprint": f"fp{i % 100:04d}",
                "attempt": 1,
                "router_version": "r1",
                "router_score": 0.25,
            }
            fh.write(json.dumps(rec) + "\n")
    return path


def test_request_logs_without_gpu_metrics_render_a_report_saying_spend_is_unknown(
    tmp_path: Path,
) -> None:
    """A lake holding only shim request logs: the leakage chart's costs were all null and
    Altair failed ("Unexpected DtypeKind: Unknown"), so `finops report` crashed."""
    runner = CliRunner()
    lake, out = tmp_path / "lake", tmp_path / "out"
    log = _shim_log(tmp_path / "shim.jsonl", 1500)
    res = runner.invoke(app, ["ingest", "requests", str(log), "--lake", str(lake)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(
        app,
        ["report", "--week", "2026-W47", "--lake", str(lake), "--out", str(out), "--no-growth"],
    )
    assert res.exit_code == 0, f"{res.output}\n{res.exception!r}"
    r = json.loads((out / "report-2026-W47.json").read_text())
    # the leakage categories are there, with their cost unknown (what broke the chart)
    assert r["leakage"]["chart"] and all(x["cost"] is None for x in r["leakage"]["chart"])
    assert r["headline"]["spend_usd"]["value"] is None
    # an hour with requests and no GPU data: its spend is unknown, not $0
    assert r["hourly"] and all(h["spend"] is None for h in r["hourly"])
    assert r["forecast"]["spend_usd"] is None
    page = (out / "report-2026-W47.html").read_text()
    assert "class='error'" not in page and "Traceback" not in page
    assert "$0.00" not in page
    assert "Leakage cost is unknown: no priced GPU data this week" in page
    assert "GPU spend unknown: no GPU metrics" in page
    # the leakage categories as a table of requests instead of a chart of nothing
    assert "duplicates (incl. their idle share)" in page
    # no GPU metrics at all: not blamed on the price catalog
    assert "what routing saved is unknown: no GPU metrics this week" in page
    assert "price catalog has no price" not in page


@pytest.fixture(scope="module")
def nine_days(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Nine demo days from Monday 2026-11-16: all of W47, and W48 up to Tuesday night."""
    from finops.demo import generate

    path = tmp_path_factory.mktemp("nine") / "lake"
    generate(path, days=9, seed=3, gpus=6, scale=0.03, vllm_interval_s=3600)
    return path


def _without_gpu_days(lake: Path, tmp_path: Path, days: tuple[str, ...]) -> Path:
    out = tmp_path / "lake"
    shutil.copytree(lake, out)
    for d in days:
        shutil.rmtree(out / "gpu_samples" / f"date={d}")
    return out


def test_hours_without_gpu_metrics_are_unknown_spend_not_zero(
    nine_days: Path, tmp_path: Path
) -> None:
    """Wednesday's GPU metrics lost: its hours read spend $0.00 and the forecast averaged
    them in, so next Wednesday was forecast at $0 of GPU spend."""
    lake = _without_gpu_days(nine_days, tmp_path, ("2026-11-18",))
    r = compute(lake, "2026-W47", growth=False)
    wed = [h for h in r["hourly"] if h["hour"].startswith("2026-11-18")]
    assert wed and all(h["requests"] > 0 and h["spend"] is None for h in wed)
    others = [h for h in r["hourly"] if not h["hour"].startswith("2026-11-18")]
    assert all(h["spend"] is not None and h["spend"] > 0 for h in others)
    fo = r["forecast"]
    assert fo["spend_usd"] is not None and fo["spend_usd"] > 0
    # every forecast hour has a spend from hours that had GPU data, none is $0
    assert min(h["spend"] for h in fo["hourly"]) > 0
    # the mean of the known hours, not diluted by a day of $0 (trend 1: no earlier week)
    known = [h["spend"] for h in others]
    assert fo["spend_usd"] == pytest.approx(168 * sum(known) / len(known), rel=0.25)
    assert "rests on the 144 hours of its history with priced GPU data" in fo["spend_note"]
    assert "24 hours with requests had none" in r["takeaways"]["forecast"]


def test_a_week_without_gpu_metrics_forecasts_no_spend_from_other_weeks(
    nine_days: Path, tmp_path: Path
) -> None:
    """W48 had requests but no GPU metrics: the summary forecast "$X of GPU spend" from
    W47's hours alone, as if it were W48's."""
    lake = _without_gpu_days(nine_days, tmp_path, ("2026-11-23", "2026-11-24"))
    r = compute(lake, "2026-W48", growth=False)
    assert r["headline"]["spend_usd"]["value"] is None
    fo = r["forecast"]
    assert fo["requests"] > 0 and fo["spend_usd"] is None
    assert fo["usd_per_1k_requests"] is None
    line = r["takeaways"]["forecast"]
    assert "GPU spend unknown: no GPU data in 2026-W48 itself" in line, line
    assert "$" not in line, line
    # no hourly figures under an unknown total either
    assert fo["hourly"] and all(h["spend"] is None for h in fo["hourly"])


def _daytime_weeks(start: dt.datetime, weeks: int, priced: bool = True) -> pl.DataFrame:
    """A fleet on 08:00-20:00 only, $10 an hour: the night hours have no rows at all."""
    hours = [start + dt.timedelta(days=d, hours=h) for d in range(7 * weeks) for h in range(8, 20)]
    n = len(hours)
    return pl.DataFrame(
        {
            "hour": hours,
            "requests": [100] * n,
            "spend": [10.0 if priced else None] * n,
            "has_gpu": [True] * n,
            "priced": [priced] * n,
        }
    )


def test_forecast_of_a_fleet_off_overnight_costs_nothing_overnight() -> None:
    """Hours of day never seen (the fleet scaled to zero) got the mean of the priced hours:
    a $840 week was forecast at $1,680."""
    import finops.costs as fc
    from finops.report.figures import _forecast

    start = dt.datetime(2026, 11, 9, tzinfo=dt.UTC)
    per = fc.Period(start + dt.timedelta(days=7), start + dt.timedelta(days=14), "2026-W47")
    fo = _forecast(_daytime_weeks(start, 2), per)
    assert fo["spend_usd"] == pytest.approx(840.0)
    night = [h for h in fo["hourly"] if not 8 <= int(h["hour"][11:13]) < 20]
    assert night and all(h["spend"] == 0 for h in night)


def test_forecast_of_an_hour_of_day_with_unpriced_gpus_uses_the_priced_mean() -> None:
    """An hour of day whose GPU rows are never priced is unknown, not $0: the mean of the
    priced hours stands in for it."""
    import finops.costs as fc
    from finops.report.figures import _forecast

    start = dt.datetime(2026, 11, 9, tzinfo=dt.UTC)
    per = fc.Period(start + dt.timedelta(days=7), start + dt.timedelta(days=14), "2026-W47")
    day = _daytime_weeks(start, 2)
    # the same fleet also ran 20:00-22:00, on GPUs the catalog has no price for
    late = (
        _daytime_weeks(start, 2, priced=False)
        .with_columns(pl.col("hour") + dt.timedelta(hours=12))
        .filter(pl.col("hour").dt.hour().is_between(20, 21))
    )
    fo = _forecast(pl.concat([day, late]).sort("hour"), per)
    assert fo["spend_usd"] == pytest.approx(840.0 + 7 * 2 * 10.0)
