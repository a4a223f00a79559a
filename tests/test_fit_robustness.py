"""Fit robustness: one glitched window must not set a tier's capacity; fit quality is
reported (held-out error, load range, windows, curve) and warned about; the latency fit
refuses one load level and flags predictions beyond the load it measured."""

from __future__ import annotations

import datetime as dt
import warnings

import numpy as np
import polars as pl
import pytest
from scipy.optimize import least_squares

import finops
from finops.lake import Lake
from finops.models.data import NoServingData
from finops.models.latency import ExtrapolationWarning, LatencyFit, fit_latency
from finops.models.regressors import LoadLatencyRegressor, SaturatingRegressor, hill
from finops.models.synthetic import SyntheticSpec, TierTruth, write_synthetic_lake
from finops.models.throughput import MAPE_WARN, fit_frame

GEN = "vllm:generation_tokens_total"


# ----------------------------------------------------------------------------- regressor


def _curve(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.5, 6, 60)
    return x, hill(x, 1000, 8, 1) * rng.normal(1, 0.03, x.size)


@pytest.mark.parametrize("factor", [5.0, 0.2])
def test_one_outlier_window_does_not_move_the_ceiling(factor: float) -> None:
    # least squares put the ceiling at 1.7e11 tokens/s for the 5x window
    x, y = _curve()
    clean = SaturatingRegressor().fit(x[:, None], y)
    bad = y.copy()
    bad[np.argmax(x)] *= factor  # the busiest window: the one that pins the bend
    m = SaturatingRegressor().fit(x[:, None], bad)
    assert m.vmax_ == pytest.approx(clean.vmax_, rel=0.1)
    assert m.k_ == pytest.approx(clean.k_, rel=0.15)
    assert m.n_outliers_ == 1 and m.outliers_[np.argmax(x)]
    assert clean.n_outliers_ == 0
    assert m.outlier_mask(x[:, None], bad).sum() == 1


def test_a_clean_fit_is_the_plain_least_squares_fit() -> None:
    # the robust loss is least squares for windows near the curve: clean figures stay put
    rng = np.random.default_rng(3)
    conc = rng.uniform(0.5, 60, 400)
    out_len = rng.uniform(100, 400, 400)
    y = hill(conc, 900.0, 15.0, 1.4) * (out_len / 200.0) ** 0.3 * rng.normal(1, 0.05, 400)
    X = np.column_stack([conc, out_len])
    m = SaturatingRegressor().fit(X, y)
    start = np.array([np.log(1.5 * y.max()), np.log(np.median(conc)), 0.0, 0.0])
    plain = least_squares(
        lambda p: m._predict_params(p, X) - y,
        start,
        bounds=([-50, -50, np.log(0.2), -5], [50, 50, np.log(8.0), 5]),
        x_scale="jac",
        max_nfev=5000,
    ).x
    assert m.vmax_ == pytest.approx(np.exp(plain[0]), rel=0.01)
    assert m.k_ == pytest.approx(np.exp(plain[1]), rel=0.01)
    assert m.coef_[0] == pytest.approx(plain[3], abs=0.005)
    assert m.n_outliers_ == 0 and not m.ceiling_bounded_
    assert m.n_windows_ == 400 and m.load_range_ == (conc.min(), conc.max())


def test_a_ceiling_the_data_cannot_pin_is_bounded_and_said() -> None:
    # a straight line: no bend at all, so least squares sends the ceiling to infinity
    rng = np.random.default_rng(2)
    x = rng.uniform(0.5, 5, 200)
    y = 50 * x * rng.normal(1, 0.02, x.size)
    m = SaturatingRegressor().fit(x[:, None], y)
    assert m.ceiling_bounded_
    assert m.vmax_ <= SaturatingRegressor.MAX_CEILING_RATIO * np.quantile(y, 0.99) * 1.001
    assert m.predict(np.array([[3.0]]))[0] == pytest.approx(150, rel=0.03)  # in range: fine
    fit = fit_frame(_frame(conc=x, tps=y), tier="x", features=("concurrency",))
    assert any("does not pin the ceiling" in n for n in fit.quality_notes())
    # a tier whose capacity comes from the step time: the bound is not this fit's to report
    assert not any("pin" in n for n in fit.quality_notes(capacity_from="decode step time"))


# ----------------------------------------------------------------------------- fit_frame


def _frame(
    days: int = 3,
    seed: int = 0,
    conc: np.ndarray | None = None,
    tps: np.ndarray | None = None,
) -> pl.DataFrame:
    """Five-minute windows of a lightly loaded tier: loads far below the half-saturation
    point, as on the demo's small tier, so the ceiling is an extrapolation."""
    rng = np.random.default_rng(seed)
    n = days * 288 if conc is None else conc.size
    t = [dt.datetime(2026, 11, 16, tzinfo=dt.UTC) + dt.timedelta(minutes=5 * i) for i in range(n)]
    c = 0.15 * rng.lognormal(0, 0.5, n) if conc is None else conc
    out = 200 * rng.lognormal(0, 0.2, n)
    y = hill(c, 1000.0, 10.0, 1.0) * (out / 200) ** 0.05 * rng.normal(1, 0.1, n)
    return pl.DataFrame(
        {
            "t": t,
            "tier": "x",
            "concurrency": c,
            "mean_prompt": 600 * rng.lognormal(0, 0.2, n),
            "mean_output": out,
            "gen_tps": y if tps is None else tps,
        }
    ).with_columns(day=pl.col("t").dt.date())


def _glitch(df: pl.DataFrame, row: int = 300, tokens: float = 2e6) -> pl.DataFrame:
    """One replica's generation counter jumps by `tokens` in one window: its rate and its
    mean output length (tokens per completed request) both jump."""
    jump = pl.col("index") == row
    return (
        df.with_row_index()
        .with_columns(
            mean_output=pl.when(jump)
            .then(pl.col("mean_output") * (1 + tokens / 300 / pl.col("gen_tps")))
            .otherwise("mean_output"),
            gen_tps=pl.when(jump).then(pl.col("gen_tps") + tokens / 300).otherwise("gen_tps"),
        )
        .drop("index")
    )


def test_a_counter_glitch_does_not_set_the_tiers_capacity() -> None:
    # least squares: ceiling -33% and held-out error doubled (8% -> 17%), no word of it
    df = _frame()
    clean = fit_frame(df, tier="x")
    fit = fit_frame(_glitch(df), tier="x")
    assert fit.vmax == pytest.approx(clean.vmax, rel=0.2)
    assert fit.model.k_ == pytest.approx(clean.model.k_, rel=0.2)
    assert abs(fit.mape_holdout - clean.mape_holdout) < 0.02
    assert fit.n_outliers == 1 and clean.n_outliers == 0
    (note,) = fit.quality_notes()
    assert "1 of the 864 windows" in note and "counter glitch" in note
    assert clean.quality_notes() == []


def test_fit_quality_is_on_the_fit_and_a_high_held_out_error_is_warned() -> None:
    df = _frame()
    f = fit_frame(df, tier="x")
    assert f.n_windows == f.n_train + f.n_test == df.height
    assert f.load_range == (df["concurrency"].min(), df["concurrency"].max())
    assert f.curve == "Hill curve of gen_tps vs concurrency"
    s = f.summary()
    assert {"n_windows", "load_min", "load_max", "n_outliers", "mape_holdout_pct"} <= set(s)
    # the held-out day runs at twice the training days' rate: the curve misses it by ~50%
    late = df.with_columns(
        gen_tps=pl.when(pl.col("day") == pl.col("day").max())
        .then(2 * pl.col("gen_tps"))
        .otherwise("gen_tps")
    )
    f = fit_frame(late, tier="x")
    assert f.mape_holdout > MAPE_WARN
    (note,) = [n for n in f.quality_notes() if "held-out" in n]
    assert f"off by {100 * f.mape_holdout:.0f}% on held-out windows" in note
    assert "capacity read from it is uncertain" in note and "864 windows" in note
    (note,) = [n for n in f.quality_notes(capacity_from="decode step time") if "held-out" in n]
    assert "capacity comes from the decode step time" in note
    assert not [n for n in f.quality_notes(mape_warn=0.9) if "held-out" in n]


# ----------------------------------------------------------------------------- lakes

# lightly loaded (peak 2 sequences, half-saturation at 12): the ceiling is extrapolated
TRUTH = TierTruth(vmax=120.0, k=12.0, replicas=2, peak_concurrency=2.0)
SPEC = SyntheticSpec(days=2, scrape_s=300, tiers={"small": TRUTH})


@pytest.fixture(scope="module")
def syn_lake(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("robust") / "lake")
    write_synthetic_lake(lake, SPEC)
    return lake.path


def _derive(src, dst, serving) -> Lake:
    """Copy lake `src` to `dst` with its serving samples passed through `serving`."""
    db = finops.connect(src)
    out = Lake(dst)
    for table in ("gpu_samples", "serving_samples", "requests"):
        df = db.sql(f"SELECT * FROM raw.{table}").pl()
        df = df.select([c for c in df.columns if c != "date"])
        out.append(table, serving(df) if table == "serving_samples" else df, source="copy")
    return out


def _no_itl(df: pl.DataFrame) -> pl.DataFrame:
    """Older vLLM: no inter-token-latency histogram, so the tokens/s curve sets capacity."""
    return df.filter(~pl.col("metric").str.starts_with("vllm:inter_token_latency_seconds"))


def test_simulation_notes_a_glitch_and_plans_from_the_clean_curve(syn_lake, tmp_path) -> None:
    from finops.models.simulate import Simulator, load_trace

    at = dt.datetime(2026, 11, 16, 12, tzinfo=dt.UTC)

    def glitch(df: pl.DataFrame) -> pl.DataFrame:
        hit = (
            (pl.col("metric") == GEN) & (pl.col("target") == "vllm-small-0") & (pl.col("ts") >= at)
        )
        return _no_itl(df).with_columns(
            value=pl.when(hit).then(pl.col("value") + 2e6).otherwise("value")
        )

    clean = load_trace(finops.connect(_derive(syn_lake, tmp_path / "clean", _no_itl).path))
    db = finops.connect(_derive(syn_lake, tmp_path / "glitch", glitch).path)
    trace = load_trace(db)
    c, g = clean.profiles["small"], trace.profiles["small"]
    assert g.curve_source == c.curve_source == "tokens/s curve"
    assert g.vmax == pytest.approx(c.vmax, rel=0.2)
    assert g.k == pytest.approx(c.k, rel=0.2)
    assert g.mape_holdout < MAPE_WARN
    assert any("far off the curve" in n for n in g.notes)
    assert not any("far off the curve" in n for n in c.notes)
    # least squares: ceiling 151 -> 37 tok/s, held-out error 2% -> 29%, and the
    # "extrapolated" note vanished with the ceiling it warned about
    assert any("ceiling extrapolated" in n for n in c.notes)
    assert any("ceiling extrapolated" in n for n in g.notes)
    # each tier's plan row says which curve its capacity came from and how well it held out
    sim = Simulator(trace, slo_ttft_p95_ms=1000)
    row = sim.plan(1.0).tiers.row(0, named=True)
    assert row["curve_source"] == "tokens/s curve"
    assert row["fit_mape_holdout_pct"] == pytest.approx(100 * g.mape_holdout, abs=0.01)


def test_latency_fit_refuses_a_single_load_level(syn_lake, tmp_path) -> None:
    # every window at 5 requests in the replica: any exponent fits, and the old fit
    # predicted confidently at 10x
    gauges = ("vllm:num_requests_running", "vllm:num_requests_waiting")

    def flat(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(
            value=pl.when(pl.col("metric") == gauges[0])
            .then(5.0)
            .when(pl.col("metric") == gauges[1])
            .then(0.0)
            .otherwise("value")
        )

    db = finops.connect(_derive(syn_lake, tmp_path / "flat", flat).path)
    with pytest.raises(NoServingData, match=r"tier 'small'.*more than one load level.*load"):
        fit_latency(db, "small")
    with pytest.raises(ValueError, match="more than one load level"):
        LoadLatencyRegressor().fit(np.full((20, 1), 3.0), np.full(20, 0.025))
    # a light tier whose sampled gauges read 0 or 1/3: the unloaded windows are a level
    x = np.r_[np.zeros(10), np.full(30, 1 / 3)]
    m = LoadLatencyRegressor().fit(x[:, None], np.where(x > 0, 0.03, 0.02))
    assert m.predict(np.array([[1 / 3]]))[0] == pytest.approx(0.03, rel=0.05)


def test_latency_beyond_the_measured_load_is_flagged(syn_lake) -> None:
    lat = fit_latency(finops.connect(syn_lake), "small")
    lo, hi = lat.load_range
    assert 0 <= lo < hi == lat.data["load"].max()
    inside = np.linspace(lo, hi, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning inside the measured range
        ms = lat.predict_ms(inside)
    assert ms == pytest.approx(1000 * lat.model.predict(inside[:, None]))  # unchanged
    assert not lat.beyond_range(inside).any()
    with pytest.warns(ExtrapolationWarning, match=r"tier 'small'.*1 of 2 loads.*not a measure"):
        far = lat.predict_ms([hi / 2, 10 * hi])
    assert far[1] == pytest.approx(1000 * lat.model.predict(np.array([[10 * hi]]))[0])
    assert lat.beyond_range([hi / 2, 10 * hi]).tolist() == [False, True]
    assert lat.model.beyond_range(np.array([[10 * hi]])).tolist() == [True]
    assert lat.summary()["load_max"] == pytest.approx(hi, abs=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lat.predict_ms(10 * hi, warn=False)


def test_latency_regressor_flags_extrapolation_without_changing_predictions() -> None:
    # fitted on loads 0.5-3, the power law says 539 s at 100: flagged, in-range untouched
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 3, 40)
    m = LoadLatencyRegressor().fit(x[:, None], (0.2 + 0.05 * x**2) * rng.normal(1, 0.05, 40))
    assert m.load_range_ == (x.min(), x.max())
    assert m.beyond_range(np.array([[1.0], [x.max()], [100.0]])).tolist() == [False, False, True]
    fit = LatencyFit("x", "ttft", "q95", m, 0.1, 30, 10, pl.DataFrame(), (x.min(), x.max()))
    with pytest.warns(ExtrapolationWarning, match="above the highest measured"):
        fit.predict_ms(100.0)
