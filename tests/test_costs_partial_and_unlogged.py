"""Figures a lake cannot give are said to be unknown, and a partial period says so.

A lake with GPU metrics but no request logs printed "0 requests ... leakage $0.00,
caches saved $0.00"; a two-day lake's totals read as its whole week; a tenant's $/1k
and share over priced requests only had no column saying how many those were.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
from test_costs_unknown import WEEK as W47
from test_costs_unknown import _partly_priced_lake
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from tests.test_thin_lakes_gpu import WEEK, _lake


def test_no_request_logs_leave_requests_leakage_and_caches_unknown(tmp_path: Path) -> None:
    db = finops.connect(_lake(tmp_path / "lake", sm=0.4))
    h = fc.headline(db, week=WEEK)
    assert h["gpu_cost"] and h["idle_capacity_cost"] is not None  # the bill is known
    for key in ("requests", "leakage_cost", "leakage_share", "cache_saved",
                "response_cache_potential", "cost_per_1k_requests"):  # fmt: skip
        assert h[key] is None, key
    line = fc.format_headline(h)
    assert "no request logs: cost per request, leakage and cache savings unknown" in line
    assert "0 requests" not in line and "$0.00" not in line
    (note,) = [n for n in h["notes"] if n.startswith("no request logs")]
    assert "finops ingest requests" in note


def test_a_period_the_data_covers_in_part_says_which_hours(tmp_path: Path) -> None:
    db = finops.connect(_lake(tmp_path / "lake", sm=0.4, requests=3))
    notes = fc.totals(db, week=WEEK)["notes"]
    (partial,) = [n for n in notes if n.startswith("partial period")]
    assert "data covers 1 of 168 hours of 2026-W49" in partial
    assert "Mon 2026-11-30 23:00 to Tue 2026-12-01 00:00 UTC, 1 day" in partial
    # a day: its last hour only
    day = fc.totals(db, start="2026-11-30", end="2026-11-30")["notes"]
    assert [n for n in day if "data covers 1 of 24 hours" in n]
    # all data: nothing to say
    assert not [n for n in fc.totals(db)["notes"] if n.startswith("partial period")]


def test_by_tenant_counts_the_priced_requests_its_dollars_cover(tmp_path: Path) -> None:
    lake = _partly_priced_lake(tmp_path / "lake")
    rows = fc.by(finops.connect(lake), "tenant", week=W47)
    assert (rows["priced_requests"] < rows["requests"]).all()
    assert rows["usd_per_1k_requests"].to_list() == (
        rows.select(pl.col("cost") / pl.col("priced_requests") * 1000).to_series().to_list()
    )
    res = CliRunner().invoke(app, ["costs", "--lake", str(lake), "--week", W47, "--by", "tenant"])
    assert res.exit_code == 0, res.output
    assert "priced requests" in res.stdout
    assert "over priced requests only" in res.stdout
