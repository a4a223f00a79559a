"""Weekly-report anomalies on a real demo lake with under three weeks of history.

The demo's weekends carry a quarter of a weekday's traffic. Compared with a
baseline that mixes weekdays in, every weekend hour looked like an anomaly;
like is now compared with like, and a real spike on a Wednesday still shows.
"""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import polars as pl
import pytest

import finops
from finops.lake import Lake
from finops.report.figures import compute

TENANT_WEDNESDAY = dt.date(2026, 11, 25)


@pytest.fixture(scope="module")
def two_weeks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two demo weeks from Monday 2026-11-16 (W47, W48); treat as read-only."""
    from finops.demo import generate

    path = tmp_path_factory.mktemp("two_weeks") / "lake"
    generate(path, days=14, seed=42, gpus=6, scale=0.05, vllm_interval_s=3600)
    return path


def _weekend(iso: str) -> bool:
    return dt.datetime.fromisoformat(iso).weekday() >= 5


def test_two_weeks_weekend_hours_are_not_flagged(two_weeks: Path) -> None:
    """Two weeks: a weekend hour is compared with the four weekend hours at that hour of
    day, not with weekday ones (which flagged all 20 shown, Saturday and Sunday)."""
    an = compute(two_weeks, "2026-W48", growth=False)["anomalies"]
    weekend_hours = [a["hour"] for a in an["hours"] if _weekend(a["hour"])]
    assert weekend_hours == []
    weekend_days = [a for a in an["tenants"] if dt.date.fromisoformat(a["day"]).weekday() >= 5]
    assert all(a["usual"] is not None and a["z"] is not None for a in weekend_days)
    assert an["not_judged"] == {"hours": 0, "tenant_days": 0, "days": []}
    assert "weekend vs weekend, weekday vs weekday" in an["method"]


def test_one_week_weekend_is_too_little_history(two_weeks: Path) -> None:
    """The first week alone: two weekend days are fewer than three to compare with, so its
    weekend is neither flagged nor called usual; the rendered text says why."""
    r = compute(two_weeks, "2026-W47", growth=False)
    an = r["anomalies"]
    assert [a["hour"] for a in an["hours"] if _weekend(a["hour"])] == []
    assert [a for a in an["tenants"] if dt.date.fromisoformat(a["day"]).weekday() >= 5] == []
    nj = an["not_judged"]
    assert nj["days"] == ["2026-11-21", "2026-11-22"]
    assert 40 <= nj["hours"] <= 48 and nj["tenant_days"] >= 2
    text = r["takeaways"]["anomalies"]
    assert f"{nj['hours']} hours and {nj['tenant_days']} tenant-days" in text
    assert "(2026-11-21, 2026-11-22) had too little history to judge" in text


def test_a_real_wednesday_spike_is_still_flagged(two_weeks: Path, tmp_path: Path) -> None:
    """Ten times one tenant's requests on Wednesday 2026-11-25 (the real rows, re-keyed and
    appended through the lake): its hours and its tenant-day stand out."""
    lake_dir = tmp_path / "lake"
    shutil.copytree(two_weeks, lake_dir)
    db = finops.connect(lake_dir)
    day = f"ts >= TIMESTAMPTZ '{TENANT_WEDNESDAY}T00:00:00Z' AND ts < TIMESTAMPTZ '2026-11-26T00:00:00Z'"
    tenant = db.sql(
        f"SELECT tenant FROM raw.requests WHERE {day} GROUP BY tenant ORDER BY count(*) DESC LIMIT 1"
    ).fetchall()[0][0]
    rows = db.sql(f"SELECT * FROM raw.requests WHERE {day} AND tenant = '{tenant}'").pl()
    db.close()
    extra = pl.concat(
        [
            rows.with_columns((pl.col("request_id") + f"-copy{k}").alias("request_id"))
            for k in range(9)
        ]
    )
    res = Lake(lake_dir).append("requests", extra.drop("source", strict=False), source="spike")
    assert res.loaded == extra.height
    an = compute(lake_dir, "2026-W48", growth=False)["anomalies"]
    spiked = [a for a in an["tenants"] if a["tenant"] == tenant and a["day"] == "2026-11-25"]
    assert spiked and spiked[0]["z"] > 3.5 and spiked[0]["cost"] > 1.5 * spiked[0]["usual"]
    wed_hours = [a for a in an["hours"] if a["hour"].startswith("2026-11-25")]
    assert len(wed_hours) >= 5 and all(a["z"] > 3.5 for a in wed_hours)
    assert not [a for a in an["hours"] if _weekend(a["hour"])]
