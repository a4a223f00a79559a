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
from finops.models.queueing import ServiceModel, erlang_c, mmc_mean_wait, simulate
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
        (np.full((50, 1), 10.0), np.full(50, 100.0), "more than one load level"),
        (np.linspace(9.8, 10.2, 50)[:, None], np.ones(50), r"load spans 9.8-10.2"),
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
        (np.linspace(9.8, 10.2, 9)[:, None], np.ones(9), None, "more than one load level"),
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


@pytest.fixture(scope="module")
def late_db(tmp_path_factory: pytest.TempPathFactory):
    """24 h of serving that started at 23:52 UTC: the lake's first day holds 8 minutes."""
    import datetime as dt

    from finops.models.synthetic import SyntheticSpec, TierTruth

    lake = Lake(tmp_path_factory.mktemp("late") / "lake")
    start = dt.datetime(2026, 11, 16, 23, 52, tzinfo=dt.UTC)
    write_synthetic_lake(lake, SyntheticSpec(start=start, days=1, tiers={"small": TierTruth()}))
    return finops.connect(lake.path)


def test_fit_holds_out_the_tail_when_the_first_day_is_minutes(late_db) -> None:
    # holding out the last day would leave the fit 2 intervals of day one
    fits = fit_all(late_db)
    f = fits["small"]
    assert f.holdout_day is None and f.n_train >= 3 * f.n_test > 0
    assert str(f.holdout_from) > "2026-11-17 12:00"  # the last quarter, in time order
    assert f.model.ceiling(f.model.covariate_ref_) == pytest.approx(120.0, rel=0.15)
    assert f.model.k_ == pytest.approx(12.0, rel=0.25)
    assert f.data.filter(pl.col("split") == "holdout")["t"].min() == f.holdout_from
    lat = fit_latency(late_db, "small")
    assert lat.n_train >= 3 * lat.n_test > 0


def _frame(day_hours: list[float], conc: np.ndarray | None = None) -> pl.DataFrame:
    """Five-minute intervals covering the last `h` hours of consecutive UTC days."""
    import datetime as dt

    t = [
        dt.datetime(2026, 11, 16 + d, tzinfo=dt.UTC) + dt.timedelta(hours=24 - h, minutes=5 * i)
        for d, h in enumerate(day_hours)
        for i in range(int(h * 12))
    ]
    n = len(t)
    c = np.linspace(1, 40, n) if conc is None else conc
    return pl.DataFrame(
        {
            "t": t,
            "tier": "x",
            "concurrency": c,
            "mean_prompt": np.full(n, 600.0),
            "mean_output": np.full(n, 200.0),
            "gen_tps": hill(c, 120.0, 12.0, 1.0),
        }
    ).with_columns(day=pl.col("t").dt.date())


@pytest.mark.parametrize(
    ("hours", "by_day"),
    [
        ([24, 24], True),  # two whole days: the last one is held out
        ([12, 24], True),  # the earlier day keeps a third of the intervals
        ([1, 24], False),  # one hour on day one: the last quarter instead
        ([24, 24, 0.25], False),  # 3 intervals on the last day are too few to score
        ([24], False),  # a single day gets a held-out quarter too
    ],
)
def test_holdout_is_the_last_day_only_when_enough_remains(hours, by_day) -> None:
    from finops.models.throughput import fit_frame

    df = _frame(hours)
    f = fit_frame(df, tier="x")
    assert (f.holdout_day is not None) == by_day
    assert f.n_train + f.n_test == df.height and f.n_train >= df.height / 3
    assert f.n_test >= (df.height // 4 if not by_day else 8)


def test_fit_needs_enough_intervals_left_after_the_holdout() -> None:
    from finops.models.throughput import fit_frame

    # 8 rows, but 4 replicas in each of 2 intervals: holding out the last leaves 4
    df = _frame([10 / 60]).head(2)
    df = pl.concat([df] * 4).with_columns(concurrency=pl.Series(np.linspace(1, 40, 8)))
    with pytest.raises(NoServingData, match=r"tier 'x': only 4 of 8 intervals left to fit on"):
        fit_frame(df, tier="x")


def test_throughput_fit_refuses_a_single_load_level() -> None:
    from finops.models.throughput import fit_frame

    rng = np.random.default_rng(1)
    df = _frame([24, 24], conc=rng.uniform(9.8, 10.2, 576))
    with pytest.raises(NoServingData, match=r"tier 'x'.*more than one load level.*concurrency"):
        fit_frame(df, tier="x")
    assert fit_frame(_frame([24, 24], conc=rng.uniform(5, 40, 576)), tier="x").n_test == 288


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: erlang_c(3, -0.5), r"offered load must be a finite number >= 0, got -0.5"),
        (lambda: erlang_c(3, -1.0), "offered load"),
        (lambda: erlang_c(3, float("nan")), "offered load"),
        (lambda: erlang_c(3, float("inf")), "offered load"),
        (lambda: erlang_c(2.5, 1.0), r"c \(servers\) must be an integer >= 1, got 2.5"),
        (lambda: mmc_mean_wait(3, 1.0, 0.0), "service_rate must be a finite number > 0"),
        (lambda: mmc_mean_wait(3, -1.0, 1.0), "arrival_rate must be a finite number >= 0"),
    ],
)
def test_queueing_formulas_reject_bad_input(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call()
    assert erlang_c(np.int64(2), 1.0) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    ("output", "prompt", "match"),
    [
        (
            [10.0, np.nan, 10.0],
            None,
            r"output_tokens must be finite non-negative.*request 1 has nan",
        ),
        ([10.0, np.inf, 10.0], None, r"output_tokens .* request 1 has inf"),
        ([10.0, -1.0, 10.0], None, "output_tokens"),
        ([10.0, 10.0], None, r"output_tokens must hold one value per arrival \(3\)"),
        ([10.0, 10.0, 10.0], [10.0, 10.0], r"prompt_tokens must hold one value per arrival"),
        ([10.0, 10.0, 10.0], [10.0, np.nan, 10.0], r"prompt_tokens .* request 1 has nan"),
    ],
)
def test_simulate_rejects_bad_token_counts(output, prompt, match) -> None:
    svc = ServiceModel.from_curve(100, 5, max_num_seqs=8, prefill_tokens_per_s=1000)
    arrivals = np.array([0.0, 1.0, 2.0])
    p = None if prompt is None else np.array(prompt)
    with pytest.raises(ValueError, match=match):
        simulate(arrivals, np.array(output), svc, prompt_tokens=p)
    ok = simulate(arrivals, np.full(3, 10.0), svc, prompt_tokens=np.full(3, 10.0))
    assert np.isfinite(ok.e2e_s).all() and (ok.e2e_s > 0).all()


def test_empty_simulation_says_there_is_nothing_to_summarise() -> None:
    svc = ServiceModel.from_curve(100, 5, max_num_seqs=8)
    r = simulate(np.array([]), np.array([]), svc)
    with pytest.raises(ValueError, match="no simulated requests left after the 10% warm-up"):
        r.quantile("ttft", 0.95)
    with pytest.raises(ValueError, match="no simulated requests"):
        r.mean("e2e")


def test_fit_charts_of_a_long_lake_stay_under_altairs_row_limit() -> None:
    """Two weeks of replica-intervals (~8,000) used to raise MaxRowsError in notebook 02."""
    from finops.models.charts import latency_fit_chart, throughput_fit_chart
    from finops.models.latency import LatencyFit
    from finops.models.throughput import fit_frame

    rng = np.random.default_rng(0)
    # two replicas of one tier over 14 days
    df = pl.concat([_frame([24.0] * 14, conc=rng.uniform(1, 40, 14 * 288)) for _ in range(2)])
    assert df.height > 5000
    fit = fit_frame(df, tier="x")
    spec = throughput_fit_chart(fit).to_dict()  # raised altair MaxRowsError
    assert "1 in 3 of 8,064 intervals shown" in str(spec)
    lat = LatencyFit(
        tier="x", metric="ttft", quantile="q95", model=None, mape_holdout=0.1, n_train=1, n_test=1,  # type: ignore[arg-type]
        data=df.select("t", load="concurrency", observed=pl.lit(0.1), predicted=pl.lit(0.1),
                       split=pl.lit("train")),
    )  # fmt: skip
    assert "intervals shown" in str(latency_fit_chart(lat).to_dict())
