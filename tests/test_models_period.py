"""The fitted models read one period, named as finops.costs names it (week / from-to / Period)."""

from __future__ import annotations

import datetime as dt

import polars as pl
import pytest

import finops
import finops.costs as fc
from finops.lake import Lake
from finops.models.data import NoServingData, histogram_quantiles, model_period
from finops.models.latency import fit_latency, latency_frame
from finops.models.synthetic import busy_spec, write_synthetic_lake
from finops.models.throughput import fit_all, fit_throughput

DAY1 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)  # busy_spec: 2 days from Monday of 2026-W47
DAY2 = DAY1 + dt.timedelta(days=1)


@pytest.fixture(scope="module")
def syn_db(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("syn_period") / "lake")
    write_synthetic_lake(lake, busy_spec(scrape_s=120))
    return finops.connect(lake.path)


def _within(ts: pl.Series, lo: dt.datetime, hi: dt.datetime) -> bool:
    return bool(ts.min() >= lo and ts.max() < hi)


def test_fits_read_only_the_period_asked_for(syn_db) -> None:
    # the first day only: one day, so the tail (not a day) is held out
    fits = fit_all(syn_db, start="2026-11-16", end="2026-11-16")
    assert set(fits) == {"small", "large"}
    for f in fits.values():
        assert _within(f.data["t"], DAY1, DAY2)
        assert f.holdout_day is None
    one = fit_throughput(syn_db, "small", per=fc.period(None, "2026-11-17", "2026-11-17"))
    assert _within(one.data["t"], DAY2, DAY2 + dt.timedelta(days=1))
    lat = fit_latency(syn_db, "large", start="2026-11-16", end="2026-11-16")
    assert _within(lat.data["t"], DAY1, DAY2)
    assert _within(
        latency_frame(syn_db, "large", week="2026-W47")["t"], DAY1, DAY1 + dt.timedelta(days=7)
    )
    q = histogram_quantiles(
        syn_db,
        "vllm:time_to_first_token_seconds",
        tier="large",
        where=fc.period(None, "2026-11-17", "2026-11-17").where("ts"),
    )
    assert q.height and _within(q["t"], DAY2, DAY2 + dt.timedelta(days=1))


def test_the_whole_week_and_no_period_are_the_same_data(syn_db) -> None:
    week = fit_all(syn_db, week="2026-W47")
    everything = fit_all(syn_db)
    assert {t: f.n_train for t, f in week.items()} == {t: f.n_train for t, f in everything.items()}
    assert model_period().label == "all data"


def test_a_period_without_serving_data_is_named(syn_db) -> None:
    with pytest.raises(NoServingData, match=r"^2026-W48: no vLLM token counters"):
        fit_all(syn_db, week="2026-W48")
    with pytest.raises(NoServingData, match=r"^2026-W48: no vLLM token counters"):
        fit_latency(syn_db, "large", week="2026-W48")
    with pytest.raises(ValueError, match="either per or week"):
        fit_all(syn_db, week="2026-W47", per=fc.period("2026-W47"))
    with pytest.raises(fc.CostError, match="ISO week"):
        fit_all(syn_db, week="last week")
