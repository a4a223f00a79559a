"""Latency vs load from vLLM's own histograms.

TTFT and inter-token latency quantiles per replica per interval come from
bucket increases (Prometheus `histogram_quantile` semantics, see
`finops.models.data.histogram_quantiles`); a power curve in the number of
requests in the replica (running + waiting) captures the queueing knee.
"""

from __future__ import annotations

import datetime as dt
import warnings
from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from finops.costs import Period
from finops.models.data import (
    NoServingData,
    histogram_quantiles,
    in_period,
    model_period,
    serving_intervals,
)
from finops.models.regressors import LoadLatencyRegressor, check_load_spread, mape
from finops.models.throughput import MIN_INTERVALS, holdout_split

METRICS = {
    "ttft": "vllm:time_to_first_token_seconds",
    "itl": "vllm:inter_token_latency_seconds",
    "e2e": "vllm:e2e_request_latency_seconds",
}


class ExtrapolationWarning(UserWarning):
    """A latency was predicted at a load above any the fit measured."""


@dataclass
class LatencyFit:
    """A latency quantile vs load for one tier, with its held-out error.

    `load_range`: the lowest and highest load (requests in the replica) of the
    windows behind the fit, train and held out. Above it the power curve is an
    extrapolation (fitted on loads 0.5-3 it says 539 s at 100): `predict_ms` warns
    (ExtrapolationWarning) and `beyond_range` tells which loads are, so a caller
    can flag them; predictions inside the range are unaffected.
    """

    tier: str
    metric: str  # ttft | itl | e2e
    quantile: str  # q50 | q95
    model: LoadLatencyRegressor
    mape_holdout: float
    n_train: int
    n_test: int
    data: pl.DataFrame  # t, target, load, observed (s), predicted, residual, split
    load_range: tuple[float, float] = (float("nan"), float("nan"))

    @property
    def n_windows(self) -> int:
        return self.n_train + self.n_test

    def summary(self) -> dict[str, object]:
        return {
            "tier": self.tier,
            "metric": self.metric,
            "quantile": self.quantile,
            "t0_ms": round(1000 * self.model.t0_, 2),
            "exponent": round(self.model.exponent_, 3),
            "mape_holdout_pct": round(100 * self.mape_holdout, 2),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "load_min": round(self.load_range[0], 4),
            "load_max": round(self.load_range[1], 4),
        }

    def beyond_range(self, load: float | np.ndarray) -> np.ndarray:
        """True for each load above the highest the fit measured (`load_range`)."""
        x = np.atleast_1d(np.asarray(load, float))
        hi = self.load_range[1]
        return x > hi * (1 + 1e-9) if np.isfinite(hi) else np.zeros(x.shape, dtype=bool)

    def predict_ms(self, load: float | np.ndarray, *, warn: bool = True) -> np.ndarray:
        """The latency quantile (ms) at each load; an ExtrapolationWarning (unless `warn`
        is False) when some load lies above the measured range (see `beyond_range`)."""
        x = np.atleast_1d(np.asarray(load, float)).reshape(-1, 1)
        out = 1000 * self.model.predict(x)
        far = self.beyond_range(x[:, 0])
        if warn and far.any():
            warnings.warn(
                f"tier {self.tier!r}: {self.metric} {self.quantile} predicted at load up to "
                f"{x[far, 0].max():.3g} ({int(far.sum())} of {far.size} loads), above the "
                f"highest measured ({self.load_range[1]:.3g} requests in the replica): a "
                "power-law extrapolation, not a measurement",
                ExtrapolationWarning,
                stacklevel=2,
            )
        return out


def latency_frame(
    db: duckdb.DuckDBPyConnection,
    tier: str | None = None,
    *,
    interval_s: int = 300,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> pl.DataFrame:
    """Per replica-interval load with TTFT/ITL quantiles (seconds) side by side, in the
    period (`week`, `start`/`end` or `per`, as in `finops.costs`; nothing: all data)."""
    p = model_period(week, start, end, per)
    at = p.where("ts")
    try:
        load = serving_intervals(db, interval_s=interval_s, tier=tier, where=at)
    except NoServingData as e:
        raise in_period(e, p) from None
    load = load.select("t", "tier", "target", "day", "running", "waiting", "request_rate")
    out = load.with_columns(load=pl.col("running").fill_null(0) + pl.col("waiting").fill_null(0))
    for short, metric in METRICS.items():
        try:
            q = histogram_quantiles(
                db, metric, (0.5, 0.95), interval_s=interval_s, tier=tier, where=at
            )
        except NoServingData:
            continue
        q = q.rename({"q50": f"{short}_p50", "q95": f"{short}_p95", "count": f"{short}_count"})
        out = out.join(q, on=["t", "tier", "target"], how="left")
    return out


def fit_latency(
    db: duckdb.DuckDBPyConnection,
    tier: str,
    *,
    metric: str = "ttft",
    quantile: str = "q95",
    interval_s: int = 300,
    min_count: int = 5,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> LatencyFit:
    """Fit a latency quantile vs requests in the replica; the last day (or quarter) is held out.

    The period is named as in `finops.costs` (`week`, `start`/`end` or `per`); nothing
    given: all data in the lake."""
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {sorted(METRICS)}, got {metric!r}")
    if quantile not in ("q50", "q95"):
        raise ValueError(f"quantile must be q50 or q95, got {quantile!r}")
    p = model_period(week, start, end, per)
    df = latency_frame(db, tier, interval_s=interval_s, per=p)
    col = f"{metric}_{quantile.replace('q', 'p')}"
    if col not in df.columns:
        raise in_period(
            NoServingData(f"no {METRICS[metric]} histogram for tier {tier!r} in the lake"), p
        )
    rows = df.filter(
        pl.col(col).is_not_null() & (pl.col(col) > 0) & (pl.col(f"{metric}_count") >= min_count)
    )
    if rows.height < MIN_INTERVALS:
        raise in_period(
            NoServingData(
                f"tier {tier!r}: only {rows.height} intervals with {col}; need {MIN_INTERVALS}"
            ),
            p,
        )
    rows, _ = holdout_split(rows, tier)
    train = rows.filter(pl.col("split") == "train")
    try:  # at one load level any exponent fits: refused, as the throughput fit refuses it
        check_load_spread(train["load"].to_numpy(), "the latency fit", zero_is_a_level=True)
    except ValueError as exc:
        raise in_period(
            NoServingData(f"tier {tier!r}: {exc} (in the {train.height} training intervals)"), p
        ) from exc
    model = LoadLatencyRegressor().fit(train.select("load").to_numpy(), train[col].to_numpy())
    rows = rows.with_columns(
        observed=pl.col(col), predicted=pl.Series(model.predict(rows.select("load").to_numpy()))
    ).with_columns(residual=pl.col("observed") - pl.col("predicted"))
    te = rows.filter(pl.col("split") == "holdout")
    return LatencyFit(
        tier=tier,
        metric=metric,
        quantile=quantile,
        model=model,
        mape_holdout=mape(te["observed"].to_numpy(), te["predicted"].to_numpy())
        if te.height
        else float("nan"),
        n_train=train.height,
        n_test=te.height,
        data=rows.select(
            "t", "tier", "target", "split", "load", "observed", "predicted", "residual"
        ),
        load_range=(float(rows["load"].min()), float(rows["load"].max())),  # type: ignore[arg-type]
    )
