"""The weekly report as a reader who never opens a notebook takes it: no "0 requests"
for missing logs, no empty report for a mistyped week, the summary agrees with the page,
the forecast says what it rests on, and an unpriced tier leaves no silent gaps.

Real parts: demo lakes on disk, price catalogs written as CSV files, the CLI.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from pathlib import Path

import polars as pl
import pytest
from test_report_missing_inputs import _catalog, _copy_without, nine_days  # noqa: F401
from typer.testing import CliRunner

import finops
from finops.cli import app
from finops.report.build import summary_markdown
from finops.report.figures import ReportError, compute
from finops.report.focus import write_focus


def test_missing_request_logs_read_unknown_not_zero(nine_days: Path, tmp_path: Path) -> None:  # noqa: F811
    """Was: "Requests 0", "Tokens 0.0M" beside busy GPUs, and "No requests this week"."""
    lake = _copy_without(nine_days, tmp_path, "requests")
    r = compute(lake, "2026-W47", growth=False)
    for key in ("requests", "tokens"):
        assert r["headline"][key]["value"] is None, key
    assert r["headline"]["spend_usd"]["value"] > 0
    assert any(m.startswith("No request logs this week") for m in r["sources"]["missing"])
    assert "requests n/a, tokens n/a" in summary_markdown(r)


def test_a_week_outside_the_lake_is_an_error_unless_allowed(nine_days: Path) -> None:  # noqa: F811
    """Was: exit 0 and a page of n/a for a mistyped week, which a cron job would mail."""
    res = CliRunner().invoke(app, ["report", "--week", "2025-W47", "--lake", str(nine_days)])
    assert res.exit_code == 2
    assert (
        "the lake holds no data for 2025-W47 (it holds 2026-11-16 to 2026-11-24 UTC): "
        "check --week, or give --allow-empty" in res.output
    )
    assert "Traceback" not in res.output
    with pytest.raises(ReportError, match="no data for 2026-W50"):
        compute(nine_days, "2026-W50", growth=False, allow_empty=False)
    # the API (a notebook) keeps the report that says what is missing
    assert compute(nine_days, "2026-W50", growth=False)["headline"]["spend_usd"]["value"] is None
    # a week the lake holds is no error
    assert compute(nine_days, "2026-W48", growth=False, allow_empty=False)["headline"]


def test_the_summary_agrees_with_the_page(nine_days: Path) -> None:  # noqa: F811
    """Was: utilization change as a relative % (the page shows points), and "(vs 2026-W46)"
    in the header and page with no W46 data at all."""
    r = compute(nine_days, "2026-W48", growth=False)
    h = r["headline"]["utilization"]
    summary = summary_markdown(r)
    points = 100 * (h["value"] - h["previous"])
    assert re.search(rf"utilization [\d.]+% \({points:+.1f} pp\)", summary), summary
    r47 = compute(nine_days, "2026-W47", growth=False)
    assert r47["compare_text"] == "2026-W46 (no data: changes are not shown)"
    assert summary_markdown(r47).startswith(
        "*GPU cost report 2026-W47* (vs 2026-W46 (no data: changes are not shown))"
    )


def test_the_forecast_says_what_it_rests_on(nine_days: Path, tmp_path: Path) -> None:  # noqa: F811
    """Was: "(trend x1.00)" with no earlier week, and one Wednesday's hours laid over the
    whole next week without a word."""
    from finops.demo import generate

    r = compute(nine_days, "2026-W47", growth=False)
    assert r["forecast"]["trend_measured"] is False
    assert r["forecast"]["weekdays_seen"] == 7
    text = r["takeaways"]["forecast"]
    assert text.startswith("Next week: about ")
    assert "(no earlier week to measure a trend: none applied)" in text
    assert compute(nine_days, "2026-W48", growth=False)["forecast"]["trend_measured"]
    one = tmp_path / "one"
    generate(
        one, days=1, start=dt.date(2026, 11, 18), seed=3, gpus=6, scale=0.03, vllm_interval_s=3600
    )
    text = compute(one, "2026-W47", growth=False)["takeaways"]["forecast"]
    assert text.startswith("Next week: about ")
    assert text.endswith(
        "It rests on 1 day of the week with traffic: the other days repeat their hours."
    )


def test_routing_savings_with_an_unpriced_tier_are_unknown(
    nine_days: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Was: the large tier unpriced, the saving was priced against mid, the next tier
    down, over routed requests that included large's."""
    priced = compute(nine_days, "2026-W47", growth=False)
    assert priced["router"]["reference_tier"] == "large"
    db = finops.connect(nine_days, prices=_catalog(tmp_path, ("H100",)))
    r = compute(db, "2026-W47", growth=False)
    assert r["router"]["unpriced_tiers"] == ["large"]
    assert "saved_usd" not in r["router"]
    assert r["takeaways"]["router"].endswith(
        "what routing saved is unknown: tier large served some of them on GPUs the price "
        "catalog has no price for."
    )


def test_the_focus_metadata_names_unpriced_gpu_hours(tmp_path: Path) -> None:
    """Was: an unpriced tier's GPU-hours had no rows and no trace: a complete-looking bill."""
    df = pl.DataFrame({"BilledCost": [1.0]})
    write_focus(df, tmp_path, "2026-W47", {"gpu_hours": 1344.0, "models": ["NVIDIA H100"]})
    meta = json.loads((tmp_path / "focus-2026-W47.metadata.json").read_text())
    assert meta["x_UnpricedGpuHours"] == 1344.0
    assert meta["x_UnpricedGpuModels"] == ["NVIDIA H100"]
    assert "priced part of the bill only" in meta["x_Note"]
    pq = pl.read_parquet_metadata(tmp_path / "focus-2026-W47.parquet")
    assert pq["x_UnpricedGpuHours"] == "1344.0"
    write_focus(df, tmp_path, "2026-W48", {"gpu_hours": 0.0, "models": []})
    meta = json.loads((tmp_path / "focus-2026-W48.metadata.json").read_text())
    assert not any(k.startswith("x_") for k in meta)


def test_comparing_a_week_with_itself_is_refused(nine_days: Path) -> None:  # noqa: F811
    """Was: accepted, every change 0.0%."""
    with pytest.raises(ReportError, match="'2026-W47' is the report week itself"):
        compute(nine_days, "2026-W47", compare_to="2026-W47", growth=False)
    # a later week too (was: a report "vs 2026-W48", a week after it with no data)
    with pytest.raises(ReportError, match="'2026-W48' comes after the report week 2026-W47"):
        compute(nine_days, "2026-W47", compare_to="2026-W48", growth=False)
