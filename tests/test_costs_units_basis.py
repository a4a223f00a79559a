"""finops.costs: unit figures follow the basis, periods stay on whole hours and say
their real bounds, and the headline's idle share is the report's (share of GPU time)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from test_costs import T0, _gpu_rows, _request_rows, _serving_rows
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake

WEEK = "2026-W47"
NOW = T0 + dt.timedelta(days=30)
H = dt.timedelta(hours=1)


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """test_costs' lake: 3 GPUs x 4 hours, 51 requests in hours 0..2."""
    path = tmp_path_factory.mktemp("units") / "lake"
    lk = Lake(path, fsync=False)
    assert lk.append("gpu_samples", _gpu_rows(), source="test", now=NOW).rejected == 0
    assert lk.append("requests", _request_rows(), source="test", now=NOW).rejected == 0
    assert lk.append("serving_samples", _serving_rows(), source="test", now=NOW).rejected == 0
    return path


@pytest.fixture()
def db(lake: Path):
    con = finops.connect(lake)
    yield con
    con.close()


# ----------------------------------------------------------------------------- 1. basis


def test_usage_totals_give_unit_figures_on_the_usage_basis(db) -> None:
    alloc = fc.totals(db, week=WEEK, basis="allocation")
    usage = fc.totals(db, week=WEEK, basis="usage")
    n = usage["requests"] - usage["unpriced_requests"]
    assert n == 51
    # allocation: the whole bill (idle included) per request, as before
    assert alloc["usd_per_1k_requests"] == pytest.approx(1000 * alloc["gpu_cost"] / n)
    # usage: only the busy cost shared out to requests, like the per-token figures
    assert usage["allocated_cost"] < 0.9 * usage["gpu_cost"]
    assert usage["usd_per_1k_requests"] == pytest.approx(1000 * usage["allocated_cost"] / n)
    assert usage["cost_per_request"] == pytest.approx(usage["allocated_cost"] / n)
    rows = fc.by(db, "tier", week=WEEK, basis="usage")
    assert usage["usd_per_1k_requests"] == pytest.approx(
        1000 * rows["cost"].sum() / rows["requests"].sum()
    )
    assert usage["usd_per_1k_requests"] <= rows["usd_per_1k_requests"].max()
    h = fc.headline(db, week=WEEK)
    assert h["usage_cost_per_1k_requests"] == pytest.approx(usage["usd_per_1k_requests"])
    assert h["cost_per_1k_requests"] == pytest.approx(alloc["usd_per_1k_requests"])


def test_cli_json_usage_basis_totals_match_its_rows(lake: Path) -> None:
    res = CliRunner().invoke(
        app,
        ["costs", "--lake", str(lake), "--week", WEEK, "--basis", "usage", "--by", "tier",
         "--format", "json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["basis"] == "usage"
    rows = doc["rows"]
    per_1k = 1000 * sum(r["cost"] for r in rows) / sum(r["requests"] for r in rows)
    assert doc["totals"]["usd_per_1k_requests"] == pytest.approx(per_1k)


# ----------------------------------------------------------------------------- 2. periods


def test_a_bound_inside_an_hour_is_refused_not_widened(db) -> None:
    with pytest.raises(fc.CostError, match=r"^start: .*whole hour.*2026-11-16T00:00Z"):
        fc.totals(db, start=T0 + 0.5 * H, end=T0 + 2 * H)
    with pytest.raises(fc.CostError, match=r"^end: .*whole hour.*2026-11-16T02:00Z"):
        fc.headline(db, start=T0, end=T0 + 2.5 * H)
    with pytest.raises(fc.CostError, match=r"^per\.start: .*whole hour"):
        fc.by(db, "tenant", per=fc.period(start=T0 + dt.timedelta(minutes=1)))
    # a whole UTC hour given in another zone is fine; 10:00 at +05:30 is 04:30 UTC
    ist = dt.timezone(dt.timedelta(hours=5, minutes=30))
    assert fc.totals(db, start=dt.datetime(2026, 11, 16, 5, 30, tzinfo=ist))["requests"] == 51
    with pytest.raises(fc.CostError, match=r"^start: .*2026-11-16T04:00Z"):
        fc.totals(db, start=dt.datetime(2026, 11, 16, 10, 0, tzinfo=ist))


def test_a_whole_hour_window_counts_exactly_its_hours(db) -> None:
    s, e = T0 + H, T0 + 3 * H
    t = fc.totals(db, start=s, end=e)
    assert t["requests"] == sum(s <= r["ts"] < e for r in _request_rows()) == 34
    assert t["gpu_hours"] == 6  # 3 GPUs x 2 hours
    assert t["period"] == "2026-11-16T01:00Z..2026-11-16T03:00Z"


def test_period_labels_show_the_real_bounds() -> None:
    assert fc.period(start="2026-11-16", end="2026-11-22").label == "2026-11-16..2026-11-22"
    day = fc.period(start=T0, end=T0 + dt.timedelta(days=1))  # midnight end: a date end
    assert day.label == "2026-11-16..2026-11-16"
    assert fc.period(start=T0 + H, end=T0 + 3 * H).label == "2026-11-16T01:00Z..2026-11-16T03:00Z"
    assert fc.period(start=T0 + 10 * H, end=T0 + 13 * H).label == (
        "2026-11-16T10:00Z..2026-11-16T13:00Z"
    )
    assert fc.period(start=T0 + 10 * H, end="2026-11-16").label == "2026-11-16T10:00Z..2026-11-16"
    # one open side says so in words (was "…..2026-11-16T05:00Z", "2026-11-16..…")
    assert fc.period(end=T0 + 5 * H).label == "up to 2026-11-16T05:00Z (from the start of the data)"
    assert fc.period(start="2026-11-16").label == "from 2026-11-16 to the end of the data"
    assert fc.period(week=WEEK).label == WEEK and fc.period().label == "all data"
    # period() itself still takes any instant: a Period on the per-request ts column
    # (the router's off-policy logs) may cut hours; only the hourly cost functions refuse
    cut = fc.period(start=T0 + dt.timedelta(minutes=30))
    assert cut.label == "from 2026-11-16T00:30Z to the end of the data"
    assert "2026-11-16T00:30:00+00:00" in cut.where("ts")


# ----------------------------------------------------------------------------- 3. idle share


def _two_gpu_rows() -> list[dict]:
    """One hour: a cheap L4 90% busy and a dear H100 10% busy. Idle GPU time is 50%,
    the idle dollars 77% of the bill: the two shares cannot be mixed up."""
    rows = []
    for k, (uuid, model, sm) in enumerate(
        (("gpu-a", "NVIDIA L4", 0.9), ("gpu-b", "NVIDIA H100 80GB HBM3", 0.1))
    ):
        for m in range(0, 60, 15):
            rows.append(
                {
                    "ts": T0 + dt.timedelta(minutes=m),
                    "source": "test",
                    "host": "node-1",
                    "gpu_uuid": uuid,
                    "gpu_index": k,
                    "gpu_model": model,
                    "namespace": "llm-serving",
                    "pod": f"vllm-{k}",
                    "container": "vllm",
                    "labels": json.dumps({"tier": "small"}),
                    "field": "DCGM_FI_PROF_SM_ACTIVE",
                    "value": sm,
                }
            )
    return rows


def test_headline_idle_share_is_the_reports_share_of_gpu_time(tmp_path: Path) -> None:
    lk = Lake(tmp_path / "lake", fsync=False)
    assert lk.append("gpu_samples", _two_gpu_rows(), source="test", now=NOW).rejected == 0
    con = finops.connect(lk.path)
    h = fc.headline(con, week=WEEK)
    # the report's idle share (finops/report/figures.py `_idle`): idle GPU-hours / GPU-hours
    df = fc.idle(con, week=WEEK, per_tier=False)
    report_share = df["idle_gpu_hours"].sum() / df["gpu_hours"].sum()
    assert report_share == pytest.approx(0.5)
    assert h["idle_time_share"] == pytest.approx(report_share)
    assert h["utilization"] + h["idle_time_share"] == pytest.approx(1.0)
    assert h["idle_capacity_share"] == pytest.approx((0.75 * 0.1 + 3.90 * 0.9) / 4.65)
    line = fc.format_headline(h)
    idle_usd = f"${df['idle_cost'].sum():,.2f}"
    assert f"SM-active 50%, idle 50% of GPU time = {idle_usd})" in line, line
    assert "idle 77%" not in line, line
