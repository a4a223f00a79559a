"""Requests that ran on a model but carry no tier (a mapped gateway or trace log without
one): which GPUs served them is unknown, so their cost is unknown, not $0.00, and
per-request figures leave them out. Was: cost 0.0, and the headline's cost per 1k fell
(the README's own mooncake ingest took the demo week from $14.18/1k to $13.81/1k)."""

from __future__ import annotations

import datetime as dt
import shutil
from pathlib import Path

import pytest

import finops
import finops.costs as fc
from finops.lake import Lake

DAY = dt.datetime(2026, 11, 16, 6, tzinfo=dt.UTC)


def _rows(n: int, **kw) -> list[dict]:
    base = {"input_tokens": 1000, "output_tokens": 100, "status_code": 200}
    return [
        {"request_id": f"tl-{i}", "ts": DAY + dt.timedelta(seconds=i), **base, **kw}
        for i in range(n)
    ]


def test_tierless_requests_have_an_unknown_cost_and_leave_the_denominators(
    demo_lake: Path, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    shutil.copytree(demo_lake, lake)
    before = fc.totals(finops.connect(lake), start="2026-11-16", end="2026-11-17")
    # 300 that ran on a model, 50 cache hits and 20 refusals: the last two did no work
    rows = [*_rows(300), *_rows(50, cache_status="hit"), *_rows(20, status_code=400)]
    for i, r in enumerate(rows):
        r["request_id"] = f"tl-{i}"
    assert Lake(lake).append("requests", rows, source="ingest:gw").loaded == 370
    db = finops.connect(lake)
    after = fc.totals(db, start="2026-11-16", end="2026-11-17")
    assert after["requests"] == before["requests"] + 370
    assert after["gpu_cost"] == pytest.approx(before["gpu_cost"])
    # per 1k over the priced requests: the 70 that did no work count (at $0, as the
    # cache hits and refusals of every tier do); the 300 of unknown cost do not
    priced = before["requests"] - before["unpriced_requests"] + 70
    assert after["usd_per_1k_requests"] == pytest.approx(1000 * after["gpu_cost"] / priced)
    assert after["unpriced_requests"] == before["unpriced_requests"] + 300
    costs = db.sql(
        "SELECT cost_allocation IS NULL AS unknown, count(*) FROM marts.request_costs "
        "WHERE request_id LIKE 'tl-%' GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert costs == [(False, 70), (True, 300)]  # the hits and refusals cost nothing
    note = next(n for n in after["notes"] if "have no tier" in n)
    assert note.startswith("300 requests that ran on a model have no tier")
    by_tier = fc.by(db, "tier", start="2026-11-16", end="2026-11-17")
    none = by_tier.filter(by_tier["tier"] == "(none)").to_dicts()[0]
    assert none["requests"] == 370
    assert none["cost"] is None and none["usd_per_1k_requests"] is None
