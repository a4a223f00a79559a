"""Altair charts over `finops.costs` frames, shared by the notebooks and the weekly report.

Every function takes the Polars frame a `finops.costs` function returns (or, for
`lever_waterfall_chart`, the frame of `finops.models.waterfall.lever_waterfall`) and
gives back an `alt.Chart` (or a layered/concatenated chart) with tooltips.
`to_svg(chart)` renders offline through vl-convert (no browser, no network),
which is how the report embeds them.

>>> import finops, finops.costs as fc, finops.charts as ch
>>> db = finops.connect()
>>> ch.idle_heatmap(fc.idle(db, week="2026-W47"))
"""

from __future__ import annotations

from collections.abc import Sequence

import altair as alt
import polars as pl

_DOW = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
_USD = "$,.2f"
# Vega-Lite draws times in the viewer's local zone unless told UTC: a utc scale for
# axes, a utc time unit for tooltips (a utc scale does not reach the tooltip text)
_UTC = alt.Scale(type="utc")
_UTC_HOUR = "utcyearmonthdatehours"


def _require(df: pl.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(
            f"{what}: frame lacks column(s) {missing}; pass the frame from finops.costs "
            f"(it has {df.columns})"
        )


def utilization_over_time(util: pl.DataFrame, *, width: int = 640) -> alt.Chart:
    """SM activity vs GPU_UTIL per tier over time (from `finops.costs.utilization`).

    Two lines per tier: the solid one is SM activity (how busy the SMs were),
    the dashed one GPU_UTIL (whether any kernel ran); the gap is how much
    GPU_UTIL flatters.
    """
    _require(util, ["hour", "tier", "sm_active", "gpu_util"], "utilization_over_time")
    long = (
        util.select("hour", "tier", "gpus", "sm_active", "gpu_util")
        .unpivot(index=["hour", "tier", "gpus"], variable_name="signal", value_name="value")
        .with_columns(
            pl.col("signal").replace_strict(
                {
                    "sm_active": "SM activity (DCGM_FI_PROF_SM_ACTIVE)",
                    "gpu_util": "GPU_UTIL (DCGM_FI_DEV_GPU_UTIL)",
                }
            )
        )
    )
    return (
        alt.Chart(long.drop_nulls("value"))
        .mark_line(strokeWidth=1.5)
        .encode(
            x=alt.X("hour:T", title="hour (UTC)", scale=_UTC),
            y=alt.Y(
                "value:Q",
                title="utilization",
                axis=alt.Axis(format="%"),
                scale=alt.Scale(domain=[0, 1]),
            ),
            color=alt.Color("tier:N", title="tier"),
            strokeDash=alt.StrokeDash("signal:N", title="signal"),
            tooltip=[
                alt.Tooltip("hour:T", timeUnit=_UTC_HOUR, format="%a %d %H:00 UTC", title="hour"),
                "tier:N",
                "signal:N",
                alt.Tooltip("value:Q", format=".1%"),
                alt.Tooltip("gpus:Q", title="GPUs"),
            ],
        )
        .properties(
            width=width, height=260, title="GPU utilization per tier: SM activity vs GPU_UTIL"
        )
    )


def idle_heatmap(
    idle: pl.DataFrame, *, tier: str | None = None, value: str = "idle_cost"
) -> alt.Chart:
    """Idle capacity by hour of day x day of week (from `finops.costs.idle`).

    `tier` picks one tier; None sums all tiers. `value`: idle_cost (default),
    idle_gpu_hours or idle_share.
    """
    _require(
        idle, ["dow", "hour_of_day", "gpu_hours", "idle_gpu_hours", "idle_cost"], "idle_heatmap"
    )
    if value not in ("idle_cost", "idle_gpu_hours", "idle_share"):
        raise ValueError(
            f"idle_heatmap: value must be idle_cost, idle_gpu_hours or idle_share, got {value!r}"
        )
    df = idle
    if tier is not None:
        if "tier" not in df.columns or tier not in df["tier"].to_list():
            known = sorted(set(df["tier"])) if "tier" in df.columns else []
            raise ValueError(f"idle_heatmap: no tier {tier!r}; the frame has {known}")
        df = df.filter(pl.col("tier") == tier)
    # GPUs the catalog has no price for have idle_cost NULL: unknown, not $0 (a cell of
    # only such GPUs stays empty), and a sum over some of them is the priced ones' only
    partial = bool(df["idle_cost"].null_count())
    df = (
        df.group_by("dow", "hour_of_day")
        .agg(
            pl.col("gpu_hours").sum(),
            pl.col("idle_gpu_hours").sum(),
            pl.when(pl.col("idle_cost").is_not_null().any()).then(pl.col("idle_cost").sum()),
        )
        .with_columns(
            (pl.col("idle_gpu_hours") / pl.col("gpu_hours")).alias("idle_share"),
            pl.col("dow").map_elements(lambda d: _DOW[d - 1], return_dtype=pl.String).alias("day"),
        )
    )
    fmt = {"idle_cost": _USD, "idle_gpu_hours": ",.1f", "idle_share": ".0%"}[value]
    return (
        alt.Chart(df)
        .mark_rect()
        .encode(
            x=alt.X("hour_of_day:O", title="hour of day (UTC)"),
            y=alt.Y("day:N", sort=_DOW, title=None),
            color=alt.Color(
                f"{value}:Q",
                title=value.replace("_", " "),
                scale=alt.Scale(scheme="oranges"),
                legend=alt.Legend(format=fmt),
            ),
            tooltip=[
                "day:N",
                alt.Tooltip("hour_of_day:O", title="hour"),
                alt.Tooltip(
                    "idle_cost:Q",
                    format=_USD,
                    title="idle $ (priced GPUs)" if partial else "idle $",
                ),
                alt.Tooltip("idle_gpu_hours:Q", format=",.1f", title="idle GPU-hours"),
                alt.Tooltip("idle_share:Q", format=".0%", title="idle share"),
            ],
        )
        .properties(
            title=f"Idle capacity{'' if tier is None else f' ({tier})'}: hour of day x day of week"
            + (" (dollars: priced GPUs only)" if partial and value == "idle_cost" else "")
        )
    )


# cost_bars' value axis formats other than dollars: shares in percent, counts as numbers
_BAR_FORMATS = {
    "idle_share": ".0%",
    "util": ".0%",
    "gpu_util": ".0%",
    "share": ".0%",
    "requests": ",",
    "gpus": ",",
}


def _value_axis(value: str) -> dict[str, object]:
    """Title and number format of a cost_bars value axis: a column of dollars (its name
    says cost or usd) reads "(USD)" on a $ axis, a share in %, a count as a number.

    A share (cost_share) is a fraction whatever its name says; a per-unit price
    (usd_per_1m_input_tokens, cost_per_request) is cents or less, which whole dollars
    would show as "$0" on every tick, so it keeps 3 significant digits."""
    title = value.replace("_", " ")
    if value in _BAR_FORMATS:
        return {"title": title, "axis": alt.Axis(format=_BAR_FORMATS[value])}
    if value.endswith("share"):
        return {"title": title, "axis": alt.Axis(format=".0%")}
    if "cost" in value or "usd" in value:
        fmt = "$,.3~r" if "per_" in value else "$,.0f"
        return {"title": f"{title} (USD)", "axis": alt.Axis(format=fmt)}
    return {"title": title}


def cost_bars(
    by: pl.DataFrame, dim: str | None = None, *, value: str = "cost", top: int = 15
) -> alt.Chart:
    """Cost per value of a dimension (from `finops.costs.by`), leakage shown as its own segment."""
    dim = dim or by.columns[0]
    _require(by, [dim, value], "cost_bars")
    df = by.sort(value, descending=True, nulls_last=True).head(top)
    if value == "cost" and "leakage_cost" in df.columns:
        df = df.with_columns((pl.col("cost") - pl.col("leakage_cost")).alias("useful_cost"))
        long = df.unpivot(
            index=[c for c in df.columns if c not in ("useful_cost", "leakage_cost")],
            on=["useful_cost", "leakage_cost"],
            variable_name="part",
            value_name="usd",
        ).with_columns(
            pl.col("part").replace_strict({"useful_cost": "useful", "leakage_cost": "leakage"})
        )
        color = alt.Color(
            "part:N",
            title=None,
            scale=alt.Scale(domain=["useful", "leakage"], range=["#4c78a8", "#e45756"]),
        )
        x = alt.X("sum(usd):Q", title="cost (USD)", axis=alt.Axis(format="$,.0f"))
    else:
        long, color = df.with_columns(pl.col(value).alias("usd")), alt.value("#4c78a8")
        x = alt.X("usd:Q", **_value_axis(value))
    tips = [alt.Tooltip(f"{dim}:N")]
    for c, f in (
        ("requests", ","),
        ("gpus", ","),
        ("cost", _USD),
        ("gpu_cost", _USD),
        ("idle_cost", _USD),
        ("idle_share", ".0%"),
        ("util", ".1%"),
        ("gpu_util", ".0%"),
        ("cost_per_request", "$,.5f"),
        ("usd_per_1m_input_tokens", _USD),
        ("usd_per_1m_output_tokens", _USD),
        ("share", ".1%"),
    ):
        if c in long.columns:
            tips.append(alt.Tooltip(f"{c}:Q", format=f))
    return (
        alt.Chart(long)
        .mark_bar()
        .encode(y=alt.Y(f"{dim}:N", sort="-x", title=None), x=x, color=color, tooltip=tips)
        .properties(title=f"{value.replace('_', ' ')} by {dim}")
    )


def leakage_waterfall(leak: pl.DataFrame) -> alt.Chart:
    """The GPU bill as a waterfall: leakage lines, unallocated, then useful work (`fc.leakage`).

    Only the disjoint lines (kind leak/idle/useful) stack to the bill; the
    overlapping 'info' lines are left out.
    """
    _require(leak, ["category", "kind", "cost"], "leakage_waterfall")
    df = leak.filter(pl.col("kind").is_in(["leak", "idle", "useful"])).with_columns(
        pl.col("cost").clip(lower_bound=0.0)
    )
    df = df.with_columns(pl.col("cost").cum_sum().alias("end")).with_columns(
        (pl.col("end") - pl.col("cost")).alias("start"),
        pl.int_range(pl.len()).alias("order"),
    )
    bill = df["cost"].sum()
    total = pl.DataFrame(
        {
            "category": ["GPU bill"],
            "kind": ["bill"],
            "cost": [bill],
            "start": [0.0],
            "end": [bill],
            "order": [df.height],
        }
    )
    df = pl.concat([df.select(total.columns), total], how="vertical_relaxed")
    order = df.sort("order")["category"].to_list()
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X("category:N", sort=order, title=None),
            y=alt.Y("start:Q", title="USD", axis=alt.Axis(format="$,.0f")),
            y2="end:Q",
            color=alt.Color(
                "kind:N",
                scale=alt.Scale(
                    domain=["leak", "idle", "useful", "bill"],
                    range=["#e45756", "#f58518", "#4c78a8", "#54a24b"],
                ),
            ),
            tooltip=["category:N", "kind:N", alt.Tooltip("cost:Q", format=_USD)],
        )
        .properties(title="Where the GPU bill went", width=420)
    )


_WATERFALL_VALUES = {
    "cost_usd": ("USD over the planned period", "$,.0f", _USD),
    "gpu_hours": ("GPU-hours", ",.0f", ",.1f"),
    "cost_per_1k_requests": ("$ per 1k requests", "$,.2f", "$,.3f"),
}


def lever_waterfall_chart(wf: pl.DataFrame, value: str = "cost_usd") -> alt.Chart:
    """The growth plan's saving lever by lever (from `finops.models.waterfall.lever_waterfall`).

    A bar for the plan with no levers, one floating bar per lever step (green: what it
    saved, red: what it added), a bar for the plan with every lever. The steps are
    cumulative, in the waterfall's fixed order: each bar is measured after the ones to
    its left, so their heights add up to before - after. `value`: cost_usd, gpu_hours or
    cost_per_1k_requests (cost needs prices: an unknown cost is refused, use gpu_hours).
    """
    if value not in _WATERFALL_VALUES:
        raise ValueError(f"lever_waterfall_chart: value must be one of {list(_WATERFALL_VALUES)}")
    _require(wf, ["step", "lever", "setting", value], "lever_waterfall_chart")
    title, axis_fmt, tip_fmt = _WATERFALL_VALUES[value]
    if wf.height == 0 or wf[value].null_count():
        raise ValueError(
            f"lever_waterfall_chart: {value} is unknown for some step (no price for a tier's"
            " GPUs?); chart value='gpu_hours' instead"
        )
    d = wf.sort("step")
    vals = d[value].to_list()
    bars = [
        {"label": "no levers", "setting": d["setting"][0], "kind": "before",
         "start": 0.0, "end": vals[0], "change": None}
    ]  # fmt: skip
    for i, r in enumerate(d.iter_rows(named=True)):
        if i == 0:
            continue
        prev = vals[i - 1]
        bars.append(
            {
                "label": f"{r['step']}. {r['lever'].replace('_', ' ')}",
                "setting": r["setting"],
                "kind": "saving" if r[value] <= prev else "increase",
                "start": prev,
                "end": r[value],
                "change": prev - r[value],  # vs the step before
            }
        )
    if d.height > 1:  # the whole saving
        bars.append({"label": "with levers", "setting": "every lever above", "kind": "after",
                     "start": 0.0, "end": vals[-1], "change": vals[0] - vals[-1]})  # fmt: skip
    df = pl.DataFrame(bars, schema_overrides={"change": pl.Float64})
    return (
        alt.Chart(df)
        .mark_bar()
        .encode(
            x=alt.X(
                "label:N",
                sort=df["label"].to_list(),
                title=None,
                axis=alt.Axis(labelAngle=-30, labelLimit=160),
            ),
            y=alt.Y("start:Q", title=title, axis=alt.Axis(format=axis_fmt)),
            y2="end:Q",
            color=alt.Color(
                "kind:N",
                title=None,
                scale=alt.Scale(
                    domain=["before", "saving", "increase", "after"],
                    range=["#4c78a8", "#54a24b", "#e45756", "#72b7b2"],
                ),
            ),
            tooltip=[
                alt.Tooltip("label:N", title="step"),
                "setting:N",
                alt.Tooltip("end:Q", format=tip_fmt, title=value),
                # a step: vs the step before; "with levers": in all
                alt.Tooltip("change:Q", format=tip_fmt, title="saved"),
            ],
        )
        .properties(
            width=420,
            height=260,
            title=alt.TitleParams(
                "Where the saving comes from (levers added in order, each after those left of it)",
                # a step's height is replicas freed, not tokens avoided (REPLICA_NOTE)
                subtitle="Steps are whole replicas the TTFT SLO needs: a lever's share depends "
                "on the order and on replica boundaries",
            ),
        )
    )


def cache_savings_bars(cache: pl.DataFrame) -> alt.Chart:
    """Dollars saved per cache layer and the response-cache potential (from `finops.costs.cache_savings`)."""
    _require(cache, ["layer", "usd_saved", "tokens", "requests"], "cache_savings_bars")
    return (
        alt.Chart(
            cache.with_columns(
                pl.when(pl.col("layer") == "response_cache_potential")
                .then(pl.lit("potential"))
                .otherwise(pl.lit("saved"))
                .alias("status")
            )
        )
        .mark_bar()
        .encode(
            y=alt.Y("layer:N", sort="-x", title=None),
            x=alt.X("usd_saved:Q", title="USD", axis=alt.Axis(format="$,.0f")),
            color=alt.Color(
                "status:N",
                scale=alt.Scale(domain=["saved", "potential"], range=["#54a24b", "#bab0ac"]),
            ),
            tooltip=[
                "layer:N",
                alt.Tooltip("usd_saved:Q", format=_USD),
                alt.Tooltip("tokens:Q", format=","),
                alt.Tooltip("requests:Q", format=","),
            ]
            + (["how:N"] if "how" in cache.columns else []),
        )
        .properties(title="Cache economics")
    )


def token_distribution_chart(dist: pl.DataFrame) -> alt.LayerChart:
    """Input tokens per feature: p50-p90 bar, p99 and max ticks, and the cap (from `token_distribution`)."""
    _require(dist, ["feature", "p50", "p90", "p99", "max"], "token_distribution_chart")
    base = alt.Chart(dist).encode(y=alt.Y("feature:N", title=None))
    tips = [
        "feature:N",
        alt.Tooltip("requests:Q", format=","),
        alt.Tooltip("p50:Q", format=",.0f"),
        alt.Tooltip("p90:Q", format=",.0f"),
        alt.Tooltip("p99:Q", format=",.0f"),
        alt.Tooltip("max:Q", format=","),
    ]
    if "cap" in dist.columns:
        tips += [alt.Tooltip("cap:Q", format=","), alt.Tooltip("share_over_cap:Q", format=".1%")]
    x = alt.X("p50:Q", title="input tokens (log)", scale=alt.Scale(type="log"))
    layers = [
        base.mark_rule(color="#9ecae9").encode(x=x, x2="max:Q", tooltip=tips),
        base.mark_bar(height=10, color="#4c78a8").encode(x=x, x2="p90:Q", tooltip=tips),
        base.mark_tick(color="#1f3b73", thickness=2).encode(x="p99:Q", tooltip=tips),
    ]
    if "cap" in dist.columns and dist["cap"].is_not_null().any():
        layers.append(
            alt.Chart(dist.filter(pl.col("cap").is_not_null()))
            .mark_tick(color="#e45756", thickness=3, size=22)
            .encode(y="feature:N", x="cap:Q", tooltip=tips)
        )
    return alt.layer(*layers).properties(
        title="Input tokens per feature: p50-p90 (bar), p99 (tick), max (line), cap (red)"
    )


def to_svg(chart: alt.TopLevelMixin) -> str:
    """Render a chart to SVG offline (vl-convert; no browser, no network)."""
    import vl_convert as vlc

    return vlc.vegalite_to_svg(chart.to_json(), vl_version=_vl_version())


def _vl_version() -> str | None:
    """The Vega-Lite version vl-convert should compile with: Altair's own, when bundled."""
    import vl_convert as vlc

    want = ".".join(alt.SCHEMA_VERSION.lstrip("v").split(".")[:2])
    return want if want in vlc.get_vegalite_versions() else None
