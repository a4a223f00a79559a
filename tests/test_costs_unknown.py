"""Cost without GPU data is unknown (None / "unknown"), never $0.00, and cost per 1k
requests counts only the requests that have a price."""

from __future__ import annotations

import datetime as dt
import html
import json
import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from test_costs import T0, _gpu_rows, _request_rows, _serving_rows
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake

WEEK = "2026-W47"
NOW = T0 + dt.timedelta(days=30)


def _lake(path: Path, *, gpu_rows: list[dict] | None) -> Path:
    lake = Lake(path, fsync=False)
    if gpu_rows is not None:
        assert lake.append("gpu_samples", gpu_rows, source="test", now=NOW).rejected == 0
        assert lake.append("serving_samples", _serving_rows(), source="test", now=NOW).rejected == 0
    assert lake.append("requests", _request_rows(), source="test", now=NOW).rejected == 0
    return path


def test_no_gpu_data_totals_leakage_and_caches_are_unknown(tmp_path: Path) -> None:
    con = finops.connect(_lake(tmp_path / "lake", gpu_rows=None))
    t = fc.totals(con, week=WEEK)
    assert t["requests"] == 51
    for key in ("usd_per_1k_requests", "cost_per_request", "leakage_cost", "input_cost",
                "usd_per_1m_input_tokens", "usd_per_1m_output_tokens"):  # fmt: skip
        assert t[key] is None, key
    leak = fc.leakage(con, week=WEEK)
    some = leak.filter(pl.col("requests") > 0)
    assert some.height > 3 and some["cost"].null_count() == some.height, leak
    cache = fc.cache_savings(con, week=WEEK)
    worked = cache.filter(pl.col("requests") > 0)
    assert worked.height and worked["usd_saved"].null_count() == worked.height, cache
    assert fc.cap_savings(con, "chat", 10, week=WEEK).usd_saved is None
    h = fc.headline(con, week=WEEK)
    for key in ("gpu_cost", "cost_per_1k_requests", "usage_cost_per_1k_requests",
                "leakage_cost", "cache_saved", "response_cache_potential"):  # fmt: skip
        assert h[key] is None, key


def test_cli_headline_says_unknown_not_zero(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", gpu_rows=None)
    res = CliRunner().invoke(app, ["costs", "--lake", str(lake), "--week", WEEK, "--headline"])
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[0]
    assert "$0.00" not in line, line
    assert "51 requests at unknown/1k" in line and "leakage unknown" in line
    assert "caches saved unknown" in line


def test_cli_bill_line_says_unknown_not_zero(tmp_path: Path) -> None:
    lake = _lake(tmp_path / "lake", gpu_rows=None)
    res = CliRunner().invoke(app, ["costs", "--lake", str(lake), "--week", WEEK])
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert last == f"GPU bill unknown (no GPU samples in {WEEK}); 51 requests", last


def test_per_1k_counts_only_priced_requests(tmp_path: Path) -> None:
    """The large tier's GPUs were not scraped: its requests have cost NULL; the bill of
    the small tier (and the untiered GPU) is divided by the priced requests only."""
    rows = [r for r in _gpu_rows() if r["gpu_uuid"] != "gpu-l0"]
    con = finops.connect(_lake(tmp_path / "lake", gpu_rows=rows))
    n, unpriced = con.execute(
        "SELECT count(*), count(*) FILTER (unpriced) FROM marts.request_costs"
    ).fetchall()[0]
    assert 0 < unpriced < n
    t = fc.totals(con, week=WEEK)
    assert t["unpriced_requests"] == unpriced
    assert t["usd_per_1k_requests"] == pytest.approx(1000 * t["gpu_cost"] / (n - unpriced))
    assert t["cost_per_request"] == pytest.approx(t["gpu_cost"] / (n - unpriced))
    assert any(f"only the {n - unpriced:,} priced requests" in s for s in t["notes"])
    res = CliRunner().invoke(app, ["costs", "--lake", str(tmp_path / "lake"), "--week", WEEK,
                                   "--headline"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert f"at ${t['usd_per_1k_requests']:,.2f}/1k" in res.stdout
    assert f"only the {n - unpriced:,} priced requests" in res.stderr


def test_report_html_without_gpu_data_never_says_zero_dollars(
    demo_lake: Path, tmp_path: Path
) -> None:
    from finops.report.build import build_report

    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake, ignore=shutil.ignore_patterns("gpu_samples"))
    paths = build_report(lake, "2026-W47", tmp_path / "out", growth=False)
    r = json.loads(paths.json.read_text())
    assert r["cache"]["saved_usd"] is None and r["leakage"]["leak_usd"] is None
    page = paths.html.read_text()
    text = html.unescape(re.sub("<[^>]+>", " ", re.sub(r"<svg.*?</svg>", "", page, flags=re.S)))
    assert "$0.00" not in text
    assert "Cache savings are unknown" in text
