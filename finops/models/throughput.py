"""Per-tier throughput and SM-activity models fitted on the lake.

Why a saturating curve: a vLLM replica's generation throughput rises almost
linearly with the number of running sequences while the GPU has spare compute,
then flattens as each decode step gets memory-bandwidth bound. The fitted
ceiling (`vmax`) and half-saturation concurrency (`k`) are what the capacity
simulation needs; the held-out-day MAPE says how far to trust them.
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from finops.models.data import NoServingData, serving_intervals
from finops.models.regressors import SaturatingRegressor, StepTimeRegressor, mape

LOAD_FEATURES = ("concurrency", "mean_prompt", "mean_output")
TARGETS = {"tokens": "gen_tps", "sm_active": "sm_active"}


@dataclass
class ThroughputFit:
    """A fitted curve for one tier, with its held-out error and the data behind it."""

    tier: str
    target: str  # column predicted: gen_tps (generation tokens/s) or sm_active (0-1)
    features: tuple[str, ...]
    model: SaturatingRegressor
    holdout_day: object  # datetime.date, or None when the lake holds a single day
    mape_holdout: float  # fraction (0.05 = 5%) on the held-out day
    mape_train: float
    n_train: int
    n_test: int
    data: pl.DataFrame  # the rows used, with `predicted`, `residual` and `split`

    @property
    def vmax(self) -> float:
        return self.model.vmax_

    def summary(self) -> dict[str, object]:
        return {
            "tier": self.tier,
            "target": self.target,
            "vmax": round(self.model.vmax_, 4),
            "k": round(self.model.k_, 4),
            "hill": round(self.model.hill_, 4),
            "holdout_day": str(self.holdout_day),
            "mape_holdout_pct": round(100 * self.mape_holdout, 2),
            "mape_train_pct": round(100 * self.mape_train, 2),
            "n_train": self.n_train,
            "n_test": self.n_test,
        }


def _split(df: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame, object]:
    days = sorted(df["day"].unique().to_list())
    if len(days) < 2:
        return df, df.clear(), None
    last = days[-1]
    return df.filter(pl.col("day") != last), df.filter(pl.col("day") == last), last


def fit_frame(
    df: pl.DataFrame,
    *,
    tier: str,
    target: str = "gen_tps",
    features: tuple[str, ...] = LOAD_FEATURES,
) -> ThroughputFit:
    """Fit on a `serving_intervals` frame; the last day is held out for MAPE."""
    need = [*features, target]
    rows = df.filter(pl.col("tier") == tier) if "tier" in df.columns else df
    rows = rows.drop_nulls(need).filter(pl.all_horizontal(pl.col(c).is_finite() for c in need))
    if rows.height < 8:
        raise NoServingData(
            f"tier {tier!r}: only {rows.height} intervals with {need} present; need at least 8"
        )
    train, _, holdout = _split(rows)
    model = SaturatingRegressor().fit(train.select(features).to_numpy(), train[target].to_numpy())
    pred = model.predict(rows.select(features).to_numpy())
    out = rows.with_columns(
        predicted=pl.Series(pred),
        split=pl.when(pl.col("day") == holdout).then(pl.lit("holdout")).otherwise(pl.lit("train"))
        if holdout is not None
        else pl.lit("train"),
    ).with_columns(residual=pl.col(target) - pl.col("predicted"))
    tr = out.filter(pl.col("split") == "train")
    te = out.filter(pl.col("split") == "holdout")
    return ThroughputFit(
        tier=tier,
        target=target,
        features=tuple(features),
        model=model,
        holdout_day=holdout,
        mape_holdout=mape(te[target].to_numpy(), te["predicted"].to_numpy())
        if te.height
        else float("nan"),
        mape_train=mape(tr[target].to_numpy(), tr["predicted"].to_numpy()),
        n_train=tr.height,
        n_test=te.height,
        data=out,
    )


def fit_throughput(
    db: duckdb.DuckDBPyConnection,
    tier: str,
    *,
    target: str = "tokens",
    interval_s: int = 300,
    features: tuple[str, ...] = LOAD_FEATURES,
) -> ThroughputFit:
    """Fit generation tokens/s (`target="tokens"`) or SM activity (`"sm_active"`) vs load.

    >>> fit = fit_throughput(finops.connect(), "small")
    >>> fit.summary()["mape_holdout_pct"]
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    df = serving_intervals(db, interval_s=interval_s, tier=tier)
    col = TARGETS[target]
    if target == "sm_active" and df["sm_active"].drop_nulls().len() == 0:
        raise NoServingData(
            f"tier {tier!r}: no DCGM_FI_PROF_SM_ACTIVE samples joined to its pods "
            "(DCGM profiling metrics are needed for the SM-activity model)"
        )
    return fit_frame(df, tier=tier, target=col, features=features)


def fit_all(
    db: duckdb.DuckDBPyConnection, *, target: str = "tokens", interval_s: int = 300
) -> dict[str, ThroughputFit]:
    """One fit per tier that has enough data; tiers without are skipped."""
    df = serving_intervals(db, interval_s=interval_s)
    col = TARGETS[target]
    out = {}
    for tier in sorted(df["tier"].unique().to_list()):
        try:
            out[tier] = fit_frame(df, tier=tier, target=col)
        except NoServingData:
            continue
    return out


def fit_step_time(df: pl.DataFrame, *, tier: str | None = None) -> StepTimeRegressor:
    """The decode step time vs concurrency line from a `serving_intervals` frame.

    Its `vmax_`/`k_` are the Michaelis-Menten throughput curve the capacity
    simulation needs (see `StepTimeRegressor`); each window is weighted by the
    tokens behind its mean step time.
    """
    rows = df.filter(pl.col("tier") == tier) if tier is not None and "tier" in df.columns else df
    rows = rows.drop_nulls(["concurrency", "itl_s", "generation_tokens"]).filter(
        (pl.col("itl_s") > 0) & (pl.col("concurrency") > 0) & (pl.col("generation_tokens") > 0)
    )
    if rows.height < 3:
        raise NoServingData(
            f"tier {tier!r}: only {rows.height} intervals with an inter-token-latency histogram "
            "(vllm:inter_token_latency_seconds) and running sequences; need at least 3"
        )
    return StepTimeRegressor().fit(
        rows.select("concurrency").to_numpy(),
        rows["itl_s"].to_numpy(),
        sample_weight=rows["generation_tokens"].to_numpy(),
    )


def summary_table(fits: dict[str, ThroughputFit]) -> pl.DataFrame:
    return pl.DataFrame([f.summary() for f in fits.values()])


def per_sequence_rate(model: SaturatingRegressor, n: np.ndarray, covariates=None) -> np.ndarray:
    """Tokens/s each of `n` running sequences gets (T(n)/n)."""
    n = np.asarray(n, float)
    vmax = model.ceiling(covariates)
    from finops.models.regressors import hill

    return np.where(n > 0, hill(n, vmax, model.k_, model.hill_) / np.maximum(n, 1e-12), 0.0)
