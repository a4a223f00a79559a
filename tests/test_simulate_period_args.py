"""Simulator.from_lake and headline name their period as finops.costs does (week / from-to / per)."""

from __future__ import annotations

import pytest

import finops
import finops.costs as fc
from finops.lake import Lake
from finops.models.simulate import Simulator, headline
from finops.models.synthetic import busy_spec, write_synthetic_lake


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("sim_week") / "lake")
    write_synthetic_lake(lake, busy_spec(scrape_s=180))  # two days of 2026-W47
    return finops.connect(lake.path)


def test_from_lake_takes_week_start_end_like_the_cost_functions(db) -> None:
    by_week = Simulator.from_lake(db, week="2026-W47", slo_ttft_p95_ms=1000)
    assert by_week.trace.period.label == fc.period("2026-W47").label == "2026-W47"
    default = Simulator.from_lake(db, slo_ttft_p95_ms=1000)  # the latest whole week
    assert default.trace.period.label == "2026-W47"
    assert by_week.trace.total_requests == default.trace.total_requests
    day = Simulator.from_lake(db, start="2026-11-16", end="2026-11-16", slo_ttft_p95_ms=1000)
    assert day.trace.period.label == fc.period(None, "2026-11-16", "2026-11-16").label
    assert 0 < day.trace.total_requests < by_week.trace.total_requests


def test_from_lake_period_errors_are_the_cost_functions(db) -> None:
    with pytest.raises(fc.CostError) as ours:
        Simulator.from_lake(db, week="2026-47")
    with pytest.raises(fc.CostError) as theirs:
        fc.totals(db, week="2026-47")
    assert str(ours.value) == str(theirs.value)
    with pytest.raises(ValueError, match="either per or week/start/end"):
        Simulator.from_lake(db, week="2026-W47", per=fc.period("2026-W47"))


def test_headline_takes_week(db) -> None:
    h = headline(db, 2, week="2026-W47", slo_ttft_p95_ms=1000)
    sim = Simulator.from_lake(db, per=fc.period("2026-W47"), slo_ttft_p95_ms=1000)
    assert h["line"] == headline(db, 2, simulator=sim)["line"]
