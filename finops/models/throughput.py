"""Per-tier throughput and SM-activity models fitted on the lake.

Why a saturating curve: a vLLM replica's generation throughput rises almost
linearly with the number of running sequences while the GPU has spare compute,
then flattens as each decode step gets memory-bandwidth bound. The fitted
ceiling (`vmax`) and half-saturation concurrency (`k`) are what the capacity
simulation needs; the held-out-day MAPE says how far to trust them.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from finops.costs import Period
from finops.models.data import NoServingData, in_period, model_period, serving_intervals
from finops.models.regressors import (
    SaturatingRegressor,
    StepTimeRegressor,
    check_load_spread,
    mape,
)

LOAD_FEATURES = ("concurrency", "mean_prompt", "mean_output")
TARGETS = {"tokens": "gen_tps", "sm_active": "sm_active"}
MIN_INTERVALS = 8  # intervals a fit needs, and a held-out day needs to be worth scoring
TAIL_HOLDOUT = 0.25  # share of intervals held out (in time order) when no day can be
MIN_TRAIN = MIN_INTERVALS - int(MIN_INTERVALS * TAIL_HOLDOUT)  # intervals left to fit on
MAPE_WARN = 0.30  # held-out error above which a fit's figures come with a warning note


@dataclass
class ThroughputFit:
    """A fitted curve for one tier, with its held-out error and the data behind it.

    Fit quality, for whoever plans from it: `mape_holdout` (the held-out error),
    `load_range` (the lowest and highest load of the windows, train and held out),
    `n_windows` (how many), `curve` (which curve was fitted), `n_outliers` (windows
    far off the curve, e.g. a counter glitch, which the robust fit gave no weight) and
    `ceiling_bounded`; `quality_notes()` turns them into the warnings a plan carries.
    """

    tier: str
    target: str  # column predicted: gen_tps (generation tokens/s) or sm_active (0-1)
    features: tuple[str, ...]
    model: SaturatingRegressor
    holdout_day: object  # datetime.date; None when the last intervals in time order are held out
    mape_holdout: float  # fraction (0.05 = 5%) on the held-out intervals
    mape_train: float
    n_train: int
    n_test: int
    data: pl.DataFrame  # the rows used, with `predicted`, `residual` and `split`
    holdout_from: object = None  # the first held-out interval (datetime), None if none is
    load_range: tuple[float, float] = (float("nan"), float("nan"))  # features[0], all windows
    n_outliers: int = 0  # windows (training or held out) far off the curve: no weight in the fit

    @property
    def vmax(self) -> float:
        return self.model.vmax_

    @property
    def n_windows(self) -> int:
        """Windows (replica-intervals) behind the fit, training and held out."""
        return self.n_train + self.n_test

    @property
    def curve(self) -> str:
        """The curve fitted: a Hill curve (or Michaelis-Menten, h = 1) of target vs load."""
        kind = "Hill" if getattr(self.model, "hill_exponent", True) else "Michaelis-Menten"
        return f"{kind} curve of {self.target} vs {self.features[0]}"

    @property
    def ceiling_bounded(self) -> bool:
        """The ceiling sits at its bound (SaturatingRegressor.MAX_CEILING_RATIO times the
        highest observed rate): the data do not pin it."""
        return bool(getattr(self.model, "ceiling_bounded_", False))

    def quality_notes(
        self, mape_warn: float = MAPE_WARN, *, capacity_from: str | None = None
    ) -> list[str]:
        """Warnings about this fit, worded for a plan's notes (none for a good fit).

        A held-out error above `mape_warn`, windows the robust fit set aside as far off
        the curve (a counter glitch, a scrape gap), and a ceiling the data cannot pin.
        `capacity_from`: what else set the capacity (e.g. "decode step time"), when this
        fit only scales it with request lengths; the held-out warning then says so.
        """
        name = {"gen_tps": "tokens/s", "sm_active": "SM-activity"}.get(self.target, self.target)
        what = f"the {name} fit ({self.curve})"
        lo, hi = self.load_range
        notes = []
        if self.mape_holdout > mape_warn:
            notes.append(
                f"{what} is off by {100 * self.mape_holdout:.0f}% on held-out windows (above "
                f"{100 * mape_warn:.0f}%; {self.n_windows} windows, load {lo:.3g}-{hi:.3g}): "
                + (
                    f"capacity comes from the {capacity_from}, but its scaling with request "
                    "lengths is uncertain"
                    if capacity_from
                    else "capacity read from it is uncertain"
                )
                + "; check the tier's serving metrics for gaps or counter glitches"
            )
        if self.n_outliers:
            n = self.n_outliers
            notes.append(
                f"{n} of the {self.n_windows} windows of {what} "
                + ("lies" if n == 1 else "lie")
                + " far off the curve (a counter glitch or scrape gap?) and got no weight"
            )
        if self.ceiling_bounded and not capacity_from:
            notes.append(
                f"{what} does not pin the ceiling: it sits at its bound, "
                f"{self.model.MAX_CEILING_RATIO:g}x the highest rate observed"
            )
        return notes

    def summary(self) -> dict[str, object]:
        return {
            "tier": self.tier,
            "target": self.target,
            "vmax": round(self.model.vmax_, 4),
            "k": round(self.model.k_, 4),
            "hill": round(self.model.hill_, 4),
            "holdout_day": str(self.holdout_day),
            "holdout_from": str(self.holdout_from),
            "mape_holdout_pct": round(100 * self.mape_holdout, 2),
            "mape_train_pct": round(100 * self.mape_train, 2),
            "n_train": self.n_train,
            "n_test": self.n_test,
            "n_windows": self.n_windows,
            "load_min": round(self.load_range[0], 4),
            "load_max": round(self.load_range[1], 4),
            "n_outliers": self.n_outliers,
        }


def holdout_split(rows: pl.DataFrame, tier: str) -> tuple[pl.DataFrame, object]:
    """Add a `split` column (train/holdout); also return the held-out day, if a day is.

    Why: the held-out error is only worth reading when the fit kept most of the
    data. The last UTC day is held out when it has MIN_INTERVALS of its own and
    the earlier days keep a third of the intervals; a lake that starts minutes
    before midnight would otherwise fit a handful of points (or, one that stops
    minutes after, score a handful). Else the last TAIL_HOLDOUT of the
    intervals in time order are held out. NoServingData when fewer than
    MIN_TRAIN intervals would be left to fit on.
    """
    n = rows.height
    days = sorted(rows["day"].unique().to_list())
    n_last = rows.filter(pl.col("day") == days[-1]).height if days else 0
    if len(days) > 1 and n_last >= MIN_INTERVALS and n - n_last >= n / 3:
        is_test, day = pl.col("day") == days[-1], days[-1]
    else:
        ts = rows["t"].sort()
        cut = ts[n - max(int(n * TAIL_HOLDOUT), 1)] if n > 1 else None
        # rows of one interval stay together; with a single interval there is nothing to hold out
        is_test = pl.col("t") >= cut if cut is not None and cut > ts[0] else pl.lit(False)
        day = None
    rows = rows.with_columns(
        split=pl.when(is_test).then(pl.lit("holdout")).otherwise(pl.lit("train"))
    )
    n_train = rows.filter(pl.col("split") == "train").height
    if n_train < MIN_TRAIN:
        raise NoServingData(
            f"tier {tier!r}: only {n_train} of {n} intervals left to fit on after holding out "
            f"the last {n - n_train}; need at least {MIN_TRAIN}"
        )
    return rows, day


def fit_frame(
    df: pl.DataFrame,
    *,
    tier: str,
    target: str = "gen_tps",
    features: tuple[str, ...] = LOAD_FEATURES,
) -> ThroughputFit:
    """Fit on a `serving_intervals` frame; the last day (or quarter) is held out for MAPE."""
    need = [*features, target]
    rows = df.filter(pl.col("tier") == tier) if "tier" in df.columns else df
    rows = rows.drop_nulls(need).filter(pl.all_horizontal(pl.col(c).is_finite() for c in need))
    if rows.height < MIN_INTERVALS:
        raise NoServingData(
            f"tier {tier!r}: only {rows.height} intervals with {need} present; "
            f"need at least {MIN_INTERVALS}"
        )
    rows, holdout = holdout_split(rows, tier)
    train = rows.filter(pl.col("split") == "train")
    try:
        check_load_spread(train[features[0]].to_numpy(), "the throughput fit", features[0])
    except ValueError as exc:
        raise NoServingData(
            f"tier {tier!r}: {exc} (in the {train.height} training intervals)"
        ) from exc
    model = SaturatingRegressor().fit(train.select(features).to_numpy(), train[target].to_numpy())
    pred = model.predict(rows.select(features).to_numpy())
    out = rows.with_columns(predicted=pl.Series(pred)).with_columns(
        residual=pl.col(target) - pl.col("predicted")
    )
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
        holdout_from=te["t"].min() if te.height else None,
        load_range=(float(rows[features[0]].min()), float(rows[features[0]].max())),  # type: ignore[arg-type]
        n_outliers=int(
            model.outlier_mask(rows.select(features).to_numpy(), rows[target].to_numpy()).sum()
        ),
    )


def fit_throughput(
    db: duckdb.DuckDBPyConnection,
    tier: str,
    *,
    target: str = "tokens",
    interval_s: int = 300,
    features: tuple[str, ...] = LOAD_FEATURES,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> ThroughputFit:
    """Fit generation tokens/s (`target="tokens"`) or SM activity (`"sm_active"`) vs load.

    The period is named as in `finops.costs` (`week`, or `start`/`end`, or `per`; see
    `finops.models.data.model_period`); nothing given: all data in the lake.

    >>> fit = fit_throughput(finops.connect(), "small", week="2026-W47")
    >>> fit.summary()["mape_holdout_pct"]
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {sorted(TARGETS)}, got {target!r}")
    p = model_period(week, start, end, per)
    try:
        df = serving_intervals(db, interval_s=interval_s, tier=tier, where=p.where("ts"))
    except NoServingData as e:
        raise in_period(e, p) from None
    col = TARGETS[target]
    if target == "sm_active" and df["sm_active"].drop_nulls().len() == 0:
        raise NoServingData(
            f"tier {tier!r}: no DCGM_FI_PROF_SM_ACTIVE samples joined to its pods "
            "(DCGM profiling metrics are needed for the SM-activity model)"
        )
    return fit_frame(df, tier=tier, target=col, features=features)


def fit_all(
    db: duckdb.DuckDBPyConnection,
    *,
    target: str = "tokens",
    interval_s: int = 300,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> dict[str, ThroughputFit]:
    """One fit per tier that has enough data in the period; tiers without are skipped.

    The period is named as in `finops.costs` (`week="2026-W47"`, or `start`/`end` dates,
    or a `Period` as `per`, e.g. a simulation's `trace.period`); nothing given: all data.
    """
    p = model_period(week, start, end, per)
    try:
        df = serving_intervals(db, interval_s=interval_s, where=p.where("ts"))
    except NoServingData as e:
        raise in_period(e, p) from None
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
