"""Throughput and latency models: parameter recovery, held-out error, bad inputs."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from sklearn.base import clone
from sklearn.model_selection import cross_val_score

import finops
from finops.lake import Lake
from finops.models.data import (
    NoServingData,
    bucket_quantiles,
    histogram_quantiles,
    serving_intervals,
)
from finops.models.latency import fit_latency
from finops.models.regressors import (
    LoadLatencyRegressor,
    SaturatingRegressor,
    StepTimeRegressor,
    hill,
    mape,
)
from finops.models.synthetic import busy_spec, write_synthetic_lake
from finops.models.throughput import fit_all, fit_step_time, fit_throughput

SPEC = busy_spec(scrape_s=120)


@pytest.fixture(scope="module")
def syn_db(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("syn") / "lake")
    write_synthetic_lake(lake, SPEC)
    return finops.connect(lake.path)


def test_saturating_regressor_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    n = 400
    conc = rng.uniform(0.5, 60, n)
    out_len = rng.uniform(100, 400, n)
    truth = hill(conc, 900.0, 15.0, 1.4) * (out_len / 200.0) ** 0.3
    y = truth * rng.normal(1, 0.02, n)
    X = np.column_stack([conc, out_len])
    m = SaturatingRegressor().fit(X, y)
    assert m.k_ == pytest.approx(15.0, rel=0.08)
    assert m.hill_ == pytest.approx(1.4, rel=0.08)
    assert m.coef_[0] == pytest.approx(0.3, abs=0.05)
    assert m.ceiling(np.array([200.0])) == pytest.approx(900.0, rel=0.08)
    assert mape(truth, m.predict(X)) < 0.02


def test_regressors_follow_the_sklearn_api() -> None:
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 40, (120, 1))
    y = hill(x[:, 0], 100, 8, 1.0) + rng.normal(0, 1, 120).clip(-5, 5) + 5
    m = clone(SaturatingRegressor(hill_exponent=False))
    assert m.get_params() == {"hill_exponent": False, "relative_loss": False}
    scores = cross_val_score(m, x, y, cv=3)
    assert scores.mean() > 0.9
    with pytest.raises(Exception, match="not fitted"):
        SaturatingRegressor().predict(x)


def test_latency_regressor_recovers_power_curve() -> None:
    x = np.linspace(0.1, 20, 200).reshape(-1, 1)
    y = 0.05 + 0.002 * x[:, 0] ** 2.5
    m = LoadLatencyRegressor().fit(x, y)
    assert m.t0_ == pytest.approx(0.05, rel=0.05)
    assert m.exponent_ == pytest.approx(2.5, rel=0.05)


@pytest.mark.parametrize(
    ("X", "y", "match"),
    [
        (np.ones((2, 1)), np.ones(2), "at least 3 samples"),
        (-np.ones((5, 1)), np.ones(5), "non-negative"),
        (np.ones((5, 1)), np.array([1, 2, np.nan, 3, 4.0]), "NaN"),
    ],
)
def test_saturating_regressor_rejects_bad_input(X, y, match) -> None:
    with pytest.raises(ValueError, match=match):
        SaturatingRegressor().fit(X, y)


def test_step_time_regressor_is_the_michaelis_menten_curve() -> None:
    # step time a + b*n at light load only (n <= 12, where T(n) still looks linear),
    # plus a few windows a prefill burst stretched: the line still finds the ceiling
    rng = np.random.default_rng(5)
    a, b = 0.0026, 0.00015  # seconds: vmax = 1/b = 6667 tok/s, k = a/b = 17.3
    n = rng.uniform(1, 12, 200)
    y = (a + b * n) * rng.normal(1, 0.03, n.size)
    y[:10] *= 3.0
    m = StepTimeRegressor().fit(n[:, None], y, sample_weight=rng.uniform(100, 3000, n.size))
    assert m.vmax_ == pytest.approx(1 / b, rel=0.08)
    assert m.k_ == pytest.approx(a / b, rel=0.1)
    assert m.throughput([32])[0] == pytest.approx(hill(32, 1 / b, a / b, 1.0), rel=0.05)
    assert m.predict(np.array([[10.0]]))[0] == pytest.approx(a + 10 * b, rel=0.03)
    # a straight least-squares line through the same points is pulled by the outliers
    plain_b = np.polyfit(n, y, 1)[0]
    assert abs(m.slope_ - b) < abs(plain_b - b)
    assert clone(m).get_params() == {"huber_scale": 1.5}


@pytest.mark.parametrize(
    ("X", "y", "w", "match"),
    [
        (np.ones((2, 1)), np.ones(2), None, "at least 3"),
        (np.ones((4, 2)), np.ones(4), None, "one load column"),
        (np.arange(4.0)[:, None], np.array([1.0, 1.0, 0.0, 1.0]), None, "positive step"),
        (np.full((4, 1), 3.0), np.ones(4), None, "more than one load level"),
        (np.arange(4.0)[:, None], np.ones(4), np.array([1.0, -1.0, 1.0, 1.0]), "sample_weight"),
    ],
)
def test_step_time_regressor_rejects_bad_input(X, y, w, match) -> None:
    with pytest.raises(ValueError, match=match):
        StepTimeRegressor().fit(X, y, sample_weight=w)


def test_step_time_fit_recovers_synthetic_truth(syn_db) -> None:
    df = serving_intervals(syn_db, interval_s=300)
    assert df["itl_s"].drop_nulls().len() > 0.9 * df.height  # the ITL histogram is read
    for tier in ("small", "large"):
        truth = SPEC.tiers[tier]
        m = fit_step_time(df, tier=tier)
        assert m.vmax_ == pytest.approx(truth.vmax, rel=0.08)
        assert m.k_ == pytest.approx(truth.k, rel=0.12)
    with pytest.raises(NoServingData, match="inter-token-latency"):
        fit_step_time(df.with_columns(itl_s=pl.lit(None, dtype=pl.Float64)), tier="small")


def test_bucket_quantiles_match_prometheus_interpolation() -> None:
    # 100 observations: 10 in (0,1], 40 in (1,2], 50 in (2,4]; none above.
    bounds = np.array([1.0, 2.0, 4.0, np.inf])
    cum = np.array([[10.0, 50.0, 100.0, 100.0]])
    q = bucket_quantiles(bounds, cum, (0.05, 0.5, 0.95))
    assert q[0, 0] == pytest.approx(0.5)  # rank 5 of 10 in (0,1]
    assert q[0, 1] == pytest.approx(2.0)  # rank 50 ends bucket (1,2]
    assert q[0, 2] == pytest.approx(2.0 + 2.0 * 45 / 50)
    # rank in the +Inf bucket returns the highest finite bound, like histogram_quantile
    q = bucket_quantiles(bounds, np.array([[0.0, 0.0, 1.0, 10.0]]), (0.95,))
    assert q[0, 0] == 4.0


def test_throughput_fit_recovers_synthetic_truth(syn_db) -> None:
    fits = fit_all(syn_db)
    assert set(fits) == {"small", "large"}
    for tier, tt in SPEC.tiers.items():
        f = fits[tier]
        assert f.model.ceiling(f.model.covariate_ref_) == pytest.approx(tt.vmax, rel=0.15)
        assert f.model.k_ == pytest.approx(tt.k, rel=0.25)
        assert f.holdout_day is not None and f.n_test > 0
        assert f.mape_holdout < 0.08, f.summary()
        assert {"predicted", "residual", "split"} <= set(f.data.columns)


def test_sm_activity_model(syn_db) -> None:
    f = fit_throughput(syn_db, "small", target="sm_active")
    assert f.model.vmax_ == pytest.approx(0.95, rel=0.1)
    assert f.mape_holdout < 0.08


def test_serving_intervals_little_law_concurrency(syn_db) -> None:
    df = serving_intervals(syn_db, tier="small")
    assert df["tier"].unique().to_list() == ["small"]
    # gen_tps agrees with counters / seconds
    row = df.row(5, named=True)
    assert row["gen_tps"] == pytest.approx(row["generation_tokens"] / row["seconds"])
    assert df["concurrency"].drop_nulls().len() > 0


def test_ttft_quantiles_track_the_truth(syn_db) -> None:
    q = histogram_quantiles(syn_db, "vllm:time_to_first_token_seconds", tier="large")
    assert (q["q95"] >= q["q50"]).all()
    f = fit_latency(syn_db, "large")
    assert f.mape_holdout < 0.3
    lo, hi = f.predict_ms([1.0, 10.0])
    assert hi > lo  # latency rises with load


def test_unknown_tier_and_empty_lake_errors(syn_db, lake) -> None:
    with pytest.raises(ValueError, match=r"unknown tier 'huge'.*\['large', 'small'\]"):
        fit_throughput(syn_db, "huge")
    with pytest.raises(ValueError, match="target must be one of"):
        fit_throughput(syn_db, "small", target="watts")
    empty = finops.connect(lake.path)
    with pytest.raises(NoServingData, match="no vLLM token counters"):
        serving_intervals(empty)
    with pytest.raises(ValueError, match="interval_s must be a positive"):
        serving_intervals(syn_db, interval_s=0)


def test_fit_needs_enough_intervals(syn_db) -> None:
    from finops.models.throughput import fit_frame

    df = serving_intervals(syn_db, tier="small").head(5)
    with pytest.raises(NoServingData, match="only 5 intervals"):
        fit_frame(df, tier="small")
    assert isinstance(df, pl.DataFrame)
