"""The weekly report after a review: week-over-week changes on weeks with missing days,
the FOCUS export's basis beside the report's tables, the context-cap line's basis,
per-request figures with unpriced GPUs, and the "where the bill went" chart.

Real parts: demo lakes on disk (days removed by deleting their partitions), price
catalogs written as CSV files, the FOCUS rows, the notebook built into HTML.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import polars as pl
import pytest
from test_report_missing_inputs import _catalog, _copy_without

import finops
import finops.costs as fc
from finops.report.build import build_report, summary_markdown
from finops.report.figures import compute, usd
from finops.report.focus import focus_rows

WEEK = "2026-W47"


@pytest.fixture(scope="module")
def two_weeks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two small demo weeks from Monday 2026-11-16 (W47, W48); treat as read-only."""
    from finops.demo import generate

    path = tmp_path_factory.mktemp("review_two_weeks") / "lake"
    generate(path, days=14, seed=7, gpus=6, scale=0.02, vllm_interval_s=3600)
    return path


def _without_day(lake: Path, tmp_path: Path, day: str) -> Path:
    """A copy of `lake` with every table's partition of `day` removed (a day not collected)."""
    out = tmp_path / f"lake-no-{day}"
    shutil.copytree(lake, out)
    for part in out.glob(f"*/date={day}"):
        shutil.rmtree(part)
    return out


@pytest.fixture(scope="module")
def week(demo_lake: Path) -> dict:
    return compute(demo_lake, WEEK, growth=False)


# ----------------------------------------------------------------------------- 1. gaps


def test_a_missing_day_in_the_report_week_is_not_a_move(two_weeks: Path, tmp_path: Path) -> None:
    """W48 without its Wednesday read spend -14% (in green) against all of W47: the same
    fleet, a day fewer. The changes compare the hours both weeks have, and say so."""
    lake = _without_day(two_weeks, tmp_path, "2026-11-25")
    r = compute(lake, "2026-W48", growth=False)
    assert r["compared_hours"] == 144
    assert r["compare_text"] == "the 144 hours of 2026-W47 both weeks have data for"
    spend = r["headline"]["spend_usd"]
    assert abs(spend["change"]) < 0.02  # the same GPUs over the same hours
    assert spend["compared_value"] == pytest.approx(spend["value"])  # W48 lacks them anyway
    note = next(m for m in r["sources"]["missing"] if "changes compare only" in m)
    assert note.startswith("2026-W48 has no GPU samples or no requests in 24 hours")
    assert "Wed 2026-11-25" in note
    # the summary says it whole, not behind "(+N more)"
    md = summary_markdown(r)
    assert f"- Changes: {note}" in md
    assert len(md.splitlines()) <= 10


def test_a_missing_day_in_the_comparison_week_is_named(two_weeks: Path, tmp_path: Path) -> None:
    """W47 without its Wednesday: W48's spend read +17% (in red) and the report said
    nothing about the comparison week. Now the same hours are compared and the missing
    box names W47's gap."""
    lake = _without_day(two_weeks, tmp_path, "2026-11-18")
    r = compute(lake, "2026-W48", growth=False)
    assert r["compared_hours"] == 144
    spend = r["headline"]["spend_usd"]
    assert abs(spend["change"]) < 0.02
    assert spend["compared_value"] < spend["value"]  # W48's Wednesday left out of the change
    full = compute(two_weeks, "2026-W48", growth=False)  # no gap: whole weeks, as before
    assert full["compare_text"] == "2026-W47" and "compared_hours" not in full
    assert spend["value"] == pytest.approx(full["headline"]["spend_usd"]["value"])
    note = next(m for m in r["sources"]["missing"] if "comparison week 2026-W47" in m)
    assert "(Wed 2026-11-18)" in note
    assert note in summary_markdown(r)


# ----------------------------------------------------------------------------- 2. FOCUS basis


def test_focus_and_table_bases_are_reconciled(demo_lake: Path, week: dict) -> None:
    """The tables (allocation basis) and the FOCUS export (usage basis) differed ~5x and
    the report never said so; the reconciliation line gives the export's own figures."""
    rc = week["reconciliation"]
    assert rc["usage_usd"] + rc["idle_usd"] == pytest.approx(rc["bill_usd"])
    assert rc["bill_usd"] == pytest.approx(week["headline"]["spend_usd"]["value"])
    db = finops.connect(demo_lake)
    rows = focus_rows(db, WEEK)
    db.close()
    idle = rows.filter(pl.col("x_IdleCapacity"))
    used = rows.filter(~pl.col("x_IdleCapacity"))
    assert used["BilledCost"].sum() == pytest.approx(rc["usage_usd"], abs=0.01)
    assert idle["BilledCost"].sum() == pytest.approx(rc["idle_usd"], abs=0.01)
    assert idle["x_Tenant"].null_count() == idle.height
    # x_Requests: the requests that ran on a priced GPU (per-row rounding aside)
    assert abs(used["x_Requests"].sum() - rc["focus_requests"]) <= used.height
    other = rc["cache_served_requests"] + rc["refused_requests"] + rc["unpriced_requests"]
    assert rc["requests"] - rc["focus_requests"] == other
    assert rc["requests"] == week["headline"]["requests"]["value"]
    text = week["takeaways"]["reconciliation"]
    for figure in (usd(rc["usage_usd"]), usd(rc["idle_usd"]), usd(rc["bill_usd"])):
        assert figure in text
    assert f"focus-{WEEK}.parquet" in text and "allocation basis" in text
    if other:
        assert f"{rc['focus_requests']:,} requests" in text
        assert f"the other {other:,} used no priced GPU time" in text
    # the summary points at it in one short line with the same figures
    line = next(x for x in summary_markdown(week).splitlines() if "FOCUS export" in x)
    for figure in (usd(rc["usage_usd"]), usd(rc["idle_usd"]), usd(rc["bill_usd"])):
        assert figure in line


# ----------------------------------------------------------------------------- 3. context cap


def test_context_cap_is_busy_time_freed(demo_lake: Path, week: dict, tmp_path: Path) -> None:
    """The p90 cap was priced on the allocation basis (idle included): 5x the GPU busy
    time it frees, and more than the week's busy cost on a lake without vLLM metrics."""
    lk = week["leakage"]
    assert lk["context"] and all(x["basis"] == "usage" for x in lk["context"])
    db = finops.connect(demo_lake)
    busy = fc.totals(db, per=fc.period(WEEK), basis="usage")["allocated_cost"]
    db.close()
    assert 0 < lk["context_usd"] < busy
    assert f"free {usd(lk['context_usd'])} of GPU busy time" in week["takeaways"]["leakage"]
    assert "token ratios" not in week["takeaways"]["leakage"]
    r = compute(_copy_without(demo_lake, tmp_path, "serving_samples"), WEEK, growth=False)
    assert r["leakage"]["context"]
    assert r["leakage"]["context_usd"] < busy * 1.5  # was 1.3x the busy cost
    assert "an estimate from token ratios" in r["takeaways"]["leakage"]


# ----------------------------------------------------------------------------- 4. unpriced


def test_per_request_figures_say_priced_requests(
    demo_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With L4s unpriced the headline read "$48.05 per 1k requests" for the bill over the
    priced requests only; the sentence, summary and tables now say how many."""
    monkeypatch.setenv("FINOPS_PRICES", str(_catalog(tmp_path, ("L4",))))
    r = compute(demo_lake, WEEK, growth=False)
    n = r["headline"]["requests"]["value"]
    unpriced = r["sources"]["unpriced_requests"]
    assert 0 < unpriced < n
    said = f"per 1k priced requests ({n - unpriced:,} of {n:,})"
    assert said in r["takeaways"]["headline"]
    assert said in summary_markdown(r)
    for dim in ("tenant", "feature", "tier"):
        rows = r["breakdown"][dim]
        assert all("priced_requests" in x for x in rows), dim
        assert sum(x["priced_requests"] for x in rows) == n - unpriced
    # all priced: no column, no qualifier (as before)
    monkeypatch.delenv("FINOPS_PRICES")
    full = compute(demo_lake, WEEK, growth=False)
    assert "per 1k requests and" in full["takeaways"]["headline"]
    assert all("priced_requests" not in x for x in full["breakdown"]["tenant"])


# ----------------------------------------------------------------------------- 5. chart + page


def test_bill_chart_splits_useful_work_from_idle(week: dict) -> None:
    """'useful work (with its hours' idle capacity)' was 97% of the bill beside an
    idle-capacity card of 86%: useful work is now its busy time, the idle capacity of its
    hours a bar of its own, and the bars add up to the bill."""
    chart = {x["category"]: x for x in week["leakage"]["chart"]}
    useful = next(x for x in week["leakage"]["categories"] if x["category"] == "useful")
    assert chart["useful_busy"]["cost"] + chart["useful_idle"]["cost"] == pytest.approx(
        useful["cost"]
    )
    assert chart["useful_idle"]["kind"] == "idle"
    total = sum(x["cost"] for x in chart.values())
    assert total == pytest.approx(week["headline"]["spend_usd"]["value"])
    idle = sum(x["cost"] for x in chart.values() if x["kind"] == "idle")
    assert chart["useful_busy"]["cost"] < idle  # the fleet is mostly idle, as the card says
    assert chart["useful_busy"]["label"] == "useful work: GPU busy time"


def test_the_page_shows_the_fixes(demo_lake: Path, tmp_path: Path) -> None:
    """The HTML (the notebook) carries the reconciliation line and the split chart."""
    paths = build_report(demo_lake, WEEK, tmp_path / "out", growth=False)
    page = paths.html.read_text()
    assert "charges tenants on the usage basis" in page
    assert "useful work: GPU busy time" in page
    assert "useful work (with its hours" not in page
    assert "context at its p90 would free" in page and "p90 would save" not in page
    # the router table counts only requests that ran: its rows differ from the tier table's
    assert "Requests that ran on a GPU (cache hits and refusals left out" in page


def test_the_focus_metadata_names_gpu_hours_lost_to_a_gap(two_weeks: Path, tmp_path: Path) -> None:
    """Was: a day the exporter missed left the export ~$900 short with no x_ field saying
    so (unpriced GPU-hours had one, gaps none)."""
    import json

    lake = _without_day(two_weeks, tmp_path, "2026-11-25")
    paths = build_report(lake, "2026-W48", tmp_path / "out", growth=False)
    src = json.loads(paths.json.read_text())["sources"]
    assert src["gpu_gap_hours"] > 0
    meta = json.loads(paths.focus_parquet.with_suffix(".metadata.json").read_text())
    assert meta["x_GapGpuHours"] == pytest.approx(src["gpu_gap_hours"], abs=1e-3)
    assert meta["x_GapCostEstimate"] == pytest.approx(src["gpu_gap_cost"], abs=0.01)
    assert f"${src['gpu_gap_cost']:,.2f} of spend" in meta["x_Note"]
    billed = pl.read_parquet(paths.focus_parquet)["BilledCost"].sum()
    # what the export holds plus what the note says is missing is the whole week's bill
    whole = fc.totals(finops.connect(two_weeks), week="2026-W48")["gpu_cost"]
    assert billed + meta["x_GapCostEstimate"] == pytest.approx(whole, rel=0.01)
