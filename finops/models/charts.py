"""Altair charts for the models: fitted curves with residuals, growth, replicas per hour.

Kept beside the models (not in finops.charts) so the report and notebooks can
reuse them without pulling the cost charts; every chart has tooltips.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import polars as pl

from finops.models.latency import LatencyFit
from finops.models.simulate import Plan
from finops.models.throughput import ThroughputFit

MAX_POINTS = 4000  # Altair refuses to embed more than 5,000 rows in a chart
# times in UTC whatever the viewer's zone (Vega-Lite defaults to local time):
# a utc scale for axes, a utc time unit for tooltips
_UTC = alt.Scale(type="utc")
_T_TIP = alt.Tooltip(
    "t:T", timeUnit="utcyearmonthdatehoursminutes", format="%Y-%m-%d %H:%M UTC", title="t"
)
_HOUR_TIP = alt.Tooltip(
    "hour:T", timeUnit="utcyearmonthdatehours", format="%a %d %H:00 UTC", title="hour"
)


# axis titles with units for the throughput fit's targets (finops.models.throughput.TARGETS)
TARGET_TITLES = {
    "gen_tps": "generation tokens/s per replica",
    "sm_active": "SM activity (share of time)",
}


def thin(df: pl.DataFrame, limit: int = MAX_POINTS) -> tuple[pl.DataFrame, str]:
    """At most `limit` rows, every k-th in time order, and a title note saying so.

    Why: a two-week lake has ~8,000 replica-intervals per tier, past Altair's embed
    limit (MaxRowsError); every k-th interval keeps the spread over time and load.
    """
    if df.height <= limit:
        return df, ""
    k = -(-df.height // limit)
    out = df.sort("t").gather_every(k)
    return out, f"; 1 in {k} of {df.height:,} intervals shown"


def throughput_fit_chart(fit: ThroughputFit, *, width: int = 360) -> alt.HConcatChart:
    """Observed vs fitted tokens/s against concurrency, and the residuals by split."""
    load = fit.features[0]
    what = TARGET_TITLES.get(fit.target, fit.target)
    d, shown = thin(fit.data.select("t", load, fit.target, "predicted", "residual", "split"))
    grid_x = np.linspace(0, float(fit.data[load].max()) * 1.2 + 1e-9, 80)
    cov = np.tile(fit.model.covariate_ref_, (grid_x.size, 1))
    curve = pl.DataFrame(
        {load: grid_x, "fitted": fit.model.predict(np.column_stack([grid_x, cov]))}
    )
    pts = (
        alt.Chart(d)
        .mark_circle(size=18, opacity=0.5)
        .encode(
            x=alt.X(f"{load}:Q", title=f"{load} (requests in replica)"),
            y=alt.Y(f"{fit.target}:Q", title=what),
            color=alt.Color("split:N"),
            tooltip=[_T_TIP, f"{load}:Q", f"{fit.target}:Q", "predicted:Q", "split:N"],
        )
    )
    line = alt.Chart(curve).mark_line(color="black").encode(x=f"{load}:Q", y="fitted:Q")
    left = (pts + line).properties(
        width=width,
        height=240,
        title=f"{fit.tier}: {what} vs load (held-out MAPE {100 * fit.mape_holdout:.1f}%{shown})",
    )
    right = (
        alt.Chart(d)
        .mark_circle(size=18, opacity=0.5)
        .encode(
            x=alt.X("predicted:Q", title=f"predicted {what}"),
            y=alt.Y("residual:Q", title=f"residual: observed - predicted {what}"),
            color="split:N",
            tooltip=[_T_TIP, "predicted:Q", "residual:Q"],
        )
        .properties(
            width=width, height=240, title=f"{fit.tier}: residuals of the fit (train and held out)"
        )
    )
    return alt.hconcat(left, right)


def latency_fit_chart(fit: LatencyFit, *, width: int = 360) -> alt.LayerChart:
    d, shown = thin(
        fit.data.with_columns(
            observed_ms=pl.col("observed") * 1000, predicted_ms=pl.col("predicted") * 1000
        )
    )
    pts = (
        alt.Chart(d)
        .mark_circle(size=18, opacity=0.5)
        .encode(
            x=alt.X("load:Q", title="requests in replica (running + waiting)"),
            y=alt.Y("observed_ms:Q", title=f"{fit.metric} {fit.quantile} (ms)"),
            color="split:N",
            tooltip=[_T_TIP, "load:Q", "observed_ms:Q", "predicted_ms:Q"],
        )
    )
    line = alt.Chart(d.sort("load")).mark_line(color="black").encode(x="load:Q", y="predicted_ms:Q")
    return (pts + line).properties(
        width=width,
        height=240,
        title=f"{fit.tier}: {fit.metric} {fit.quantile} vs load "
        f"(held-out MAPE {100 * fit.mape_holdout:.0f}%{shown})",
    )


def growth_chart(table: pl.DataFrame) -> alt.Chart:
    """Cost per 1k requests by growth factor, before vs after the levers."""
    d = table.with_columns(growth_label=pl.format("{}x", pl.col("growth")))
    return (
        alt.Chart(d)
        .mark_bar()
        .encode(
            x=alt.X("growth_label:N", title="traffic growth", sort=None),
            xOffset="scenario:N",
            y=alt.Y("cost_per_1k_requests:Q", title="$ per 1k requests"),
            color=alt.Color("scenario:N", sort=["before", "after"]),
            tooltip=[
                "growth:Q",
                "scenario:N",
                alt.Tooltip("cost_per_1k_requests:Q", format="$.2f"),
                alt.Tooltip("gpu_hours:Q", format=",.0f"),
                # modelled idle (1 - simulated busy time), not the measured SM-activity idle
                alt.Tooltip("idle_share:Q", format=".0%", title="simulated idle share"),
                "peak_gpus:Q",
            ],
        )
        .properties(width=420, height=260, title="Cost per 1k requests as traffic grows")
    )


def replicas_chart(plan: Plan) -> alt.Chart:
    """Replicas per tier per hour in a plan (the diurnal shape the autoscaler follows)."""
    return (
        alt.Chart(plan.hourly)
        .mark_line(interpolate="step-after")
        .encode(
            x=alt.X("hour:T", title="hour (UTC)", scale=_UTC),
            y=alt.Y("replicas:Q"),
            color="tier:N",
            tooltip=[
                _HOUR_TIP,
                "tier:N",
                "replicas:Q",
                alt.Tooltip("rate_rps:Q", format=".2f"),
                alt.Tooltip("util:Q", format=".0%"),
            ],
        )
        .properties(
            width=600,
            height=220,
            title=f"Replicas per hour at {plan.growth:g}x "
            f"({'autoscaled' if plan.levers.autoscale else 'fixed fleet'})",
        )
    )
