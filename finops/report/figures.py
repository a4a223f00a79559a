"""Every number of the weekly report, computed once as a JSON-ready dict.

All cost figures come from `finops.costs` (the marts in `finops/sql/marts/3x_*.sql`);
this module only chooses periods, compares weeks, and adds what the cost API has no
function for: idle capacity by hour of day, a leakage line for over-long context,
router impact from the request log, anomalies (robust z-scores) and a simple
forecast. The notebook, the Markdown summary, the JSON and the FOCUS export all read
this dict, so they cannot disagree.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

import finops
import finops.costs as fc

# Robust z-score threshold (Iglewicz & Hoaglin): |0.6745 (x - median) / MAD| > 3.5 is an outlier.
Z_THRESHOLD = 3.5
HISTORY_WEEKS = 4
MIN_BASELINE = 3  # fewer comparable points than this: too little history to judge
# the spread an anomaly is judged against is never below this share of the usual value
# (so |z| > 3.5 needs a 35% move), and for counts never below Poisson noise, sqrt(usual):
# with three same-weekday points the MAD can be near 0, and a steady week flagged +5%
# hours at z = 8.8
MIN_RELATIVE_SPREAD = 0.10
TREND_CLIP = (0.8, 1.25)
# where a missing GPU price goes (finops.prices.load_prices reads $FINOPS_PRICES first)
PRICES_HINT = "data/prices.csv or the catalog file $FINOPS_PRICES names"
HEADLINE_KEYS = (
    "spend_usd",
    "requests",
    "input_tokens",
    "output_tokens",
    "tokens",
    "usd_per_1k_requests",
    "usd_per_1m_tokens",
    "gpu_hours",
    "gpus",
    "utilization",
    "idle_capacity_usd",
    "leakage_usd",
    "cache_saved_usd",
)


class ReportError(ValueError):
    """A report that cannot be built at all (bad week, unreadable lake); the message says why."""


def _f(x: Any) -> float | None:
    """JSON-safe float: None for missing, NaN or infinite values."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _iso(x: dt.datetime | None) -> str | None:
    return None if x is None else x.isoformat()


def _records(df: pl.DataFrame) -> list[dict[str, Any]]:
    out = []
    for row in df.iter_rows(named=True):
        rec = {}
        for k, v in row.items():
            if isinstance(v, float):
                v = _f(v)
            elif isinstance(v, dt.datetime | dt.date):
                v = v.isoformat()
            rec[k] = v
        out.append(rec)
    return out


_PLAIN_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9 ._:/@+-]*[A-Za-z0-9])?")


def md_name(x: Any) -> str:
    """A name from the data (tenant, feature, tier...: client-chosen headers) as inert Markdown.

    Takeaways are Markdown in the summary and in the HTML page; a name like
    `<img onerror=...>` or `*x* [y](z)` must read as text there, never as markup. Plain
    names stay as they are; anything else becomes a code span (the HTML escapes it).
    """
    s = re.sub(r"[\x00-\x1f\x7f]+", " ", str(x)).strip()[:200] or "(blank)"
    if _PLAIN_NAME.fullmatch(s):
        return s
    fence = "`" * (max((len(t) for t in re.findall(r"`+", s)), default=0) + 1)
    return f"{fence} {s} {fence}"


def signed_pct(x: float, digits: int = 1) -> str:
    """+3.2%, -1.0%, 0.0%: float noise (-1.6e-16 for equal spend) never prints as -0.0%."""
    s = f"{100 * x:+.{digits}f}%"
    return s[1:] if float(s[1:-1]) == 0 else s


def signed_pp(x: float) -> str:
    """A share's change in percentage points (+0.6 pp); float noise never reads -0.0 pp."""
    s = f"{100 * x:+.1f}"
    return f"{s[1:] if float(s[1:]) == 0 else s} pp"


def period_text(per: fc.Period) -> str:
    """'2026-11-16 to 2026-11-22 UTC': the last day shown is the last one included (end is exclusive)."""
    assert per.start is not None and per.end is not None
    last = per.end - dt.timedelta(microseconds=1)
    return f"{per.start:%Y-%m-%d} to {last:%Y-%m-%d} UTC"


def previous_week(week: str) -> str:
    """The ISO week before `week` ("2026-W47" -> "2026-W46"), across year ends."""
    per = fc.period(week)
    assert per.start is not None
    y, w, _ = (per.start - dt.timedelta(days=7)).isocalendar()
    return f"{y}-W{w:02d}"


# ----------------------------------------------------------------------------- SQL


def quiet(db: duckdb.DuckDBPyConnection) -> None:
    """No DuckDB progress bar in CLI output (Jupyter without ipywidgets refuses: keep it)."""
    with contextlib.suppress(duckdb.Error):
        db.execute("SET enable_progress_bar = false").fetchall()


def sql(db: duckdb.DuckDBPyConnection, query: str) -> duckdb.DuckDBPyRelation:
    """Run report SQL over the cost marts, reading finops.costs' materialized copies.

    `finops.costs.materialize` evaluates the mart views once per connection; the
    report's own queries go through the same rewrite so they never re-run the
    view chain (the window functions of marts.request_flags over every request).
    """
    fc.materialize(db)
    return db.sql(fc._cached(query))


# ----------------------------------------------------------------------------- sources


def _sources(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    """What the week holds, with one sentence per missing input."""
    src = fc.sources(db, per)
    signals = sql(
        db,
        f"""SELECT util_signal, sum(gpu_hours) AS n FROM marts.gpu_cost_hourly
            WHERE {per.where()} GROUP BY ALL ORDER BY n DESC""",
    ).fetchall()
    req_hours = sql(
        db, f"SELECT count(DISTINCT hour) FROM marts.request_work WHERE {per.where()}"
    ).fetchall()[0][0]
    gpu_hours = sql(
        db, f"SELECT count(DISTINCT hour) FROM marts.gpu_cost_hourly WHERE {per.where()}"
    ).fetchall()[0][0]
    missing: list[str] = []
    if src["gpu_hour_rows"] == 0:
        missing.append(
            "No GPU metrics (DCGM/NVML) this week: spend, GPU-hours, utilization, idle "
            "capacity and the FOCUS rows are unknown. Collect them with finops collect."
        )
    if src["requests"] == 0:
        missing.append(
            "No request logs this week (none collected, or no traffic): requests and tokens "
            "are unknown, and cost cannot be allocated to tenants, features or tiers."
        )
    sig = [s for s, _ in signals if s is not None]
    if src["gpu_hour_rows"] and "DCGM_FI_PROF_SM_ACTIVE" not in sig:
        missing.append(
            "No SM-activity metric (DCGM_FI_PROF_SM_ACTIVE): utilization uses "
            f"{sig[0] if sig else 'no signal (counted as idle)'}, which flatters busy time."
        )
    hours = per.hours or 168
    covered = max(req_hours, gpu_hours)
    if 0 < covered < hours:
        missing.append(f"Partial week: data covers {covered} of {hours:.0f} hours.")
    for note in src["notes"]:
        # said above in the report's own words
        if not note.startswith(("no GPU samples", "no request logs", "partial period")):
            missing.append(note[0].upper() + note[1:] + ".")
    return {
        "gpu_samples": bool(src["gpu_hour_rows"]),
        "requests": bool(src["requests"]),
        # a bill that is known but partial: GPU-hours the catalog has no price for
        "unpriced_gpu_hours": float(src["unpriced_gpu_hours"] or 0.0),
        "unpriced_models": sorted(str(m) for m in (src["unpriced_models"] or []) if m),
        "unpriced_requests": int(src["unpriced_requests"] or 0),
        # the lake's extent (all tables the costs read), for "no data for this week"
        "lake_first_hour": _iso(
            min((x for x in (src["first_request_hour"], src["first_gpu_hour"]) if x), default=None)
        ),
        "lake_last_hour": _iso(
            max((x for x in (src["last_request_hour"], src["last_gpu_hour"]) if x), default=None)
        ),
        "util_signals": {str(s): round(float(n), 2) for s, n in signals},
        "util_signal": sig[0] if sig else None,
        "hours_with_requests": int(req_hours),
        "hours_with_gpu_samples": int(gpu_hours),
        # GPU-hours with no samples between reporting ones (marts.gpu_gap_hourly): unbilled
        "gpu_gap_hours": float(src["gap_gpu_hours"]),
        # tier-hours whose prefill/decode split comes from vLLM's phase histograms; the
        # others use the token-ratio fallback (per-token prices there are estimates)
        "phase_split_tier_hours": int(src["measured_tier_hours"] or 0),
        "tier_hours": int(src["tier_hours"] or 0),
        "gpu_gap_cost": float(src["gap_cost"]),
        "hours_in_period": hours,
        "missing": missing,
    }


# ----------------------------------------------------------------------------- headline


def _week_numbers(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any] | None:
    """Headline numbers of one period via finops.costs; None when the period is empty."""
    try:
        t = fc.totals(db, per=per, basis="allocation")
    except fc.CostError:
        return None
    leak = fc.leakage(db, per=per)
    cache = fc.cache_savings(db, per=per)
    tokens = int(t["input_tokens"]) + int(t["output_tokens"])
    n = int(t["requests"])
    # no GPU samples in the period, or none the price catalog prices: the bill and every
    # dollar figure derived from it are unknown (None, shown as n/a), not $0.00
    measured = bool(t["gpu_hours"])
    known = bool(t["priced_gpu_hours"])
    spend = float(t["gpu_cost"]) if known else None
    # per request and per token over the priced requests only (finops.costs.totals): a
    # tier on a GPU model the catalog has no price for carries no part of the bill, so
    # dividing the bill by its requests too understated both
    priced_tokens = int(t["priced_tokens"])
    # no request rows at all: the logs are missing (or not collected), which "0 requests"
    # beside busy GPUs would misstate; unknown counts show as n/a
    logged = n > 0
    return {
        "spend_usd": spend,
        "requests": n if logged else None,
        "input_tokens": int(t["input_tokens"]) if logged else None,
        "output_tokens": int(t["output_tokens"]) if logged else None,
        "tokens": tokens if logged else None,
        "usd_per_1k_requests": _f(t["usd_per_1k_requests"]) if known else None,
        "usd_per_1m_tokens": (
            1e6 * spend / priced_tokens if priced_tokens and spend is not None else None
        ),
        "gpu_hours": float(t["gpu_hours"]) if measured else None,
        "gpus": int(t["gpus"]) if measured else None,
        "utilization": _f(t["utilization"]),
        "idle_capacity_usd": float(t["idle_capacity_cost"]) if known else None,
        # no request logs: nothing says what leaked or what the caches saved (not $0)
        "leakage_usd": (
            fc.sum_known(leak.filter(pl.col("kind") == "leak")["cost"]) if known and n else None
        ),
        "cache_saved_usd": (
            fc.sum_known(cache.filter(pl.col("layer") != "response_cache_potential")["usd_saved"])
            if known and n
            else None
        ),
    }


def _headline(
    cur: dict[str, Any] | None,
    prev: dict[str, Any] | None,
    compared: dict[str, Any] | None = None,
    not_comparable: dict[str, str] | None = None,
) -> dict[str, Any]:
    """value: the report week's figure; previous and change: against the comparison span.

    compared: the report week's figures over the hours both weeks have data for (when
    one has gaps): the change is compared / previous, never a whole week against a week
    with a day missing, and `compared_value` keeps what was compared. not_comparable:
    key -> why its change is not shown (None)."""
    out = {}
    for k in HEADLINE_KEYS:
        v = cur.get(k) if cur else None
        p = prev.get(k) if prev else None
        c = compared.get(k) if compared else v
        change = (c - p) / p if (c is not None and p not in (None, 0)) else None
        out[k] = {
            "value": _f(v) if isinstance(v, float) else v,
            "previous": p,
            "change": _f(change),
        }
        if compared is not None:
            out[k]["compared_value"] = _f(c) if isinstance(c, float) else c
        if not_comparable and k in not_comparable:
            out[k]["change"] = None
            out[k]["not_comparable"] = not_comparable[k]
    return out


# ----------------------------------------------------------------------------- sections


def _gpu_tiers(db: duckdb.DuckDBPyConnection, per: fc.Period) -> list[dict[str, Any]]:
    """Spend by tier from the GPU metrics alone (their tier labels): what a week without
    request logs can still say about where the bill went."""
    df = sql(
        db,
        f"""SELECT coalesce(tier, '(no tier label)') AS tier, sum(gpu_hours) AS gpu_hours,
                   sum(gpu_cost) AS cost
            FROM marts.gpu_cost_hourly WHERE {per.where()} GROUP BY ALL""",
    ).pl()
    if df.height == 0 or df["cost"].null_count() == df.height:
        return []
    total = float(df["cost"].sum())
    df = df.with_columns((pl.col("cost") / total if total else pl.lit(None)).alias("share"))
    return _records(df.sort("cost", descending=True, nulls_last=True))


def _breakdowns(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, list[dict]]:
    out = {}
    for dim in ("tenant", "feature", "tier", "model"):
        df = fc.by(db, dim, per=per)
        if df.height == 0 and dim == "tier":
            out[dim] = _gpu_tiers(db, per)  # no request logs: the GPUs' own tier labels
            continue
        if df.height and df["cost"].null_count() == df.height:
            # no GPU data for any of it: spend by dimension is unknown (fc.by says NULL,
            # never $0 for some values and NULL for others); `missing` says why
            out[dim] = []
            continue
        # priced_requests (those on priced GPU-hours: what cost, share and per-1k cover)
        # only when some requests are unpriced, as `finops costs --by` shows it
        partial = bool(df.height) and bool((df["priced_requests"] < df["requests"]).any())
        out[dim] = _records(
            df.select(
                dim,
                "requests",
                *(["priced_requests"] if partial else []),
                "failed",
                "cache_hits",
                "input_tokens",
                "output_tokens",
                "cost",
                "share",
                "usd_per_1k_requests",
                "leakage_cost",
            )
        )
    return out


def _idle(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    df = fc.idle(db, per=per, per_tier=False)
    if df.height == 0:
        return {"by_hour": [], "troughs": [], "idle_cost": None, "idle_share": None}
    by_hour = (
        df.group_by("hour_of_day")
        .agg(
            pl.col("gpu_hours").sum(),
            pl.col("idle_gpu_hours").sum(),
            pl.col("idle_cost").sum(),
        )
        .with_columns((pl.col("idle_gpu_hours") / pl.col("gpu_hours")).alias("idle_share"))
        .sort("hour_of_day")
    )
    troughs = by_hour.sort("idle_share", descending=True).head(3)
    total_h = float(by_hour["gpu_hours"].sum())
    # no GPU-hour priced: the idle share is measured, its cost unknown (not $0)
    priced = df["idle_cost"].null_count() < df.height
    return {
        "by_hour": _records(by_hour if priced else by_hour.drop("idle_cost")),
        "troughs": _records(troughs),
        "idle_cost": float(by_hour["idle_cost"].sum()) if priced else None,
        "idle_share": float(by_hour["idle_gpu_hours"].sum()) / total_h if total_h else None,
    }


def _context_leak(db: duckdb.DuckDBPyConnection, per: fc.Period) -> list[dict[str, Any]]:
    """Per feature: what a cap at its own p90 input length would have saved (fc.cap_savings)."""
    dist = fc.token_distribution(db, per=per)
    rows = []
    for r in dist.iter_rows(named=True):
        if r["feature"] == "(none)" or not r["p99"] or r["requests"] < 20:
            continue
        cap = math.ceil(r["p90"])
        if cap <= 0 or r["max"] <= cap:
            continue
        # usage basis: the GPU busy time the cut tokens take (idle capacity is paid
        # whatever the context length); the allocation basis priced them with their
        # hours' idle capacity, 5x the busy time freed
        cs = fc.cap_savings(db, r["feature"], cap, per=per, basis="usage")
        rows.append({**cs.as_dict(), "p50": _f(r["p50"]), "max": int(r["max"])})
    rows.sort(key=lambda x: -(x["usd_saved"] or 0))
    return rows


def _leakage(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    df = fc.leakage(db, per=per)
    ctx = _context_leak(db, per)
    leak = df.filter(pl.col("kind") == "leak")
    known = fc.sum_known  # None (unknown: no GPU data), never $0.00
    return {
        "chart": _bill_chart(db, per, df),
        # no GPU data for any of it: every line is unknown, as in _breakdowns
        "categories": [] if df["cost"].null_count() == df.height else _records(df),
        "leak_usd": known(leak["cost"]),
        "duplicates_usd": known(leak.filter(pl.col("category") == "duplicate")["cost"]),
        "retries_usd": known(df.filter(pl.col("category") == "retries")["cost"]),
        "failed_usd": known(
            leak.filter(pl.col("category").is_in(["retried_failure", "failed"]))["cost"]
        ),
        "context": ctx,
        "context_usd": known(pl.Series([r["usd_saved"] for r in ctx], dtype=pl.Float64)),
    }


BILL_CHART_LABELS = {
    "useful_busy": "useful work: GPU busy time",
    "useful_idle": "idle capacity in hours with requests (allocated to useful work)",
    "idle": "GPU-hours without requests",
    # fc.leakage's newer name for "idle": it also covers GPUs of no tier
    "unallocated": "GPU-hours without requests",
    "retried_failure": "failed, then retried (incl. its idle share)",
    "failed": "failed (incl. its idle share)",
    "stream_aborted": "aborted streams (incl. their idle share)",
    "duplicate": "duplicates (incl. their idle share)",
}


def _bill_chart(
    db: duckdb.DuckDBPyConnection, per: fc.Period, df: pl.DataFrame
) -> list[dict[str, Any]]:
    """Where the bill went, for the chart: fc.leakage's allocation-basis lines, with
    'useful' split into its GPU busy time (usage basis) and the idle capacity of its
    hours the allocation basis spreads over it. Shown whole, 'useful work' was 97% of
    the bill beside an idle-capacity card of 86%; the bars add up to the bill."""
    if df.height == 0 or df["cost"].null_count() == df.height:
        return []
    busy = sql(
        db,
        f"""SELECT {fc._known("cost_usage")} FROM marts.request_costs
            WHERE {per.where()} AND leak IS NULL""",
    ).fetchall()[0][0]
    rows = []
    for x in df.filter(pl.col("kind").is_in(["leak", "idle", "useful"])).iter_rows(named=True):
        if x["category"] == "useful" and busy is not None and x["cost"] is not None:
            rows.append(
                {
                    "category": "useful_busy",
                    "kind": "useful",
                    "requests": x["requests"],
                    "cost": float(busy),
                    "note": "GPU busy time of requests that did useful, "
                    "non-duplicate work (usage basis)",
                }
            )
            rows.append(
                {
                    "category": "useful_idle",
                    "kind": "idle",
                    "requests": 0,
                    "cost": float(x["cost"]) - float(busy),
                    "note": "idle GPU time of the tier-hours those requests ran in, which the "
                    "allocation basis charges to them",
                }
            )
        else:
            rows.append({k: x[k] for k in ("category", "kind", "requests", "cost", "note")})
    for x in rows:
        x["label"] = BILL_CHART_LABELS.get(x["category"], x["category"])
        x["cost"] = _f(x["cost"])
    return rows


def _reconciliation(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    """The FOCUS export's figures (finops.report.focus.focus_rows) against the report's.

    The report's tenant, feature and tier tables are on the allocation basis (each
    tier-hour's idle capacity spread over its requests); the FOCUS rows are on the usage
    basis: tenants carry their busy GPU time, idle capacity is rows without a tenant
    (x_IdleCapacity). Both add up to the priced bill. The export's x_Requests counts the
    requests that ran on a priced GPU: not those the shim's cache served, nor refusals,
    nor requests on unpriced or untiered GPU-hours, which the report's count includes.
    """
    w = per.where()
    row = sql(
        db,
        f"""SELECT
            (SELECT sum(gpu_cost) FROM marts.gpu_cost_hourly
              WHERE {w} AND usd_per_gpu_hour IS NOT NULL) AS bill,
            (SELECT coalesce(sum(cost_usage) FILTER (worked AND NOT unpriced), 0)
               FROM marts.request_costs WHERE {w}) AS usage,
            (SELECT count(*) FILTER (worked AND NOT unpriced) FROM marts.request_costs
              WHERE {w}) AS focus_requests,
            (SELECT count(*) FROM marts.request_costs WHERE {w}) AS requests,
            (SELECT count(*) FILTER (served_by_cache) FROM marts.request_costs WHERE {w})
                AS cache_served,
            (SELECT count(*) FILTER (refused AND NOT served_by_cache) FROM marts.request_costs
              WHERE {w}) AS refused,
            (SELECT count(*) FILTER (processed AND (unpriced OR NOT worked))
               FROM marts.request_costs WHERE {w}) AS unpriced""",
    ).fetchall()[0]
    bill, usage, focus_n, n, cached, refused, unpriced = row
    if bill is None:
        return {}
    return {
        "bill_usd": float(bill),
        "usage_usd": float(usage),
        "idle_usd": float(bill) - float(usage),
        "focus_requests": int(focus_n),
        "requests": int(n),
        "cache_served_requests": int(cached),
        "refused_requests": int(refused),
        "unpriced_requests": int(unpriced),
    }


def _cache(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    df = fc.cache_savings(db, per=per)
    return {
        "layers": _records(df),
        "saved_usd": fc.sum_known(
            df.filter(pl.col("layer") != "response_cache_potential")["usd_saved"]
        ),
        "potential_usd": fc.sum_known(
            df.filter(pl.col("layer") == "response_cache_potential")["usd_saved"]
        ),
    }


def _psi(expected: list[float], actual: list[float]) -> float | None:
    """Population stability index between two histograms (0.1: watch, 0.25: drifted)."""
    e_tot, a_tot = sum(expected), sum(actual)
    if not e_tot or not a_tot:
        return None
    psi = 0.0
    for e, a in zip(expected, actual, strict=True):
        pe, pa = max(e / e_tot, 1e-4), max(a / a_tot, 1e-4)
        psi += (pa - pe) * math.log(pa / pe)
    return psi


def load_artifact(router_dir: str | Path) -> Any:
    """The router artifact, loaded before any figure is computed (a wrong --router fails fast)."""
    from finops.router.artifact import ArtifactError, load_router

    try:
        return load_router(router_dir)
    except ArtifactError as exc:
        raise ReportError(f"--router: {exc}") from None


def _router(
    db: duckdb.DuckDBPyConnection,
    per: fc.Period,
    router_dir: str | Path | None,
    router: Any = None,
) -> dict[str, Any]:
    """Tier shares and dollars vs sending everything to the priciest tier (from the log).

    all_large_usd prices each routed request's token work at the priciest tier's busy
    $/token this week (usage basis, from marts.tier_token_prices: the GPU time the work
    takes); saved = all_large - the usage-basis cost of the same requests. Idle capacity
    is left out on both sides: it is a fixed cost of the fleet, and spreading the top
    tier's idle hours over every routed token (the allocation basis) "saved" more than
    the whole bill. Quality and drift need the router artifact (`--router DIR`).
    """
    w = per.where("w.hour")
    shares = sql(
        db,
        f"""SELECT w.tier, count(*) AS requests,
                   count(*) FILTER (r.router_version IS NOT NULL) AS routed
            FROM marts.request_work w JOIN clean.requests r USING (request_id)
            WHERE {w} AND w.worked GROUP BY ALL ORDER BY requests DESC""",
    ).pl()
    routed_n = int(shares["routed"].sum()) if shares.height else 0
    logged = sql(
        db,
        f"""SELECT DISTINCT router_version FROM clean.requests
            WHERE {per.where("date_trunc('hour', ts)")} AND router_version IS NOT NULL
            ORDER BY 1""",
    ).fetchall()
    out: dict[str, Any] = {
        # the routers that served the week (the logged saving is theirs, not --router's)
        "logged_versions": [v for (v,) in logged],
        "tier_shares": _records(
            shares.with_columns((pl.col("requests") / pl.col("requests").sum()).alias("share"))
        ),
        "routed_requests": routed_n,
        "artifact": None,
        "quality_estimate": None,
        "drift": None,
    }
    prices = sql(
        db,
        f"""SELECT tier, sum(pool_usage * input_share) / nullif(sum(w_in), 0) AS in_p,
                   sum(pool_usage * (1 - input_share)) / nullif(sum(w_out), 0) AS out_p
            FROM marts.tier_token_prices WHERE {per.where()} AND tier IS NOT NULL
            GROUP BY ALL""",
    ).pl()
    # a tier that served routed requests without a GPU price: neither its own cost nor
    # what "all on the priciest tier" would be is known (it may be the priciest), so the
    # saving is unknown; pricing the rest against the next tier down overstated it
    unpriced = sorted(
        set(shares.filter(pl.col("routed") > 0)["tier"].drop_nulls().to_list())
        - set(prices.drop_nulls()["tier"].to_list())
    )
    out["unpriced_tiers"] = unpriced
    prices = prices.drop_nulls()
    if prices.height >= 2 and routed_n and not unpriced:
        top = prices.sort("out_p", descending=True).row(0, named=True)
        row = sql(
            db,
            f"""SELECT sum(work_in * {top["in_p"]} + work_out * {top["out_p"]}) AS all_large,
                       sum(cost_usage) AS actual
                FROM marts.request_costs WHERE {per.where()} AND worked
                  AND request_id IN (SELECT request_id FROM clean.requests
                                     WHERE router_version IS NOT NULL)""",
        ).fetchall()[0]
        all_large, actual = float(row[0] or 0), float(row[1] or 0)
        out.update(
            reference_tier=top["tier"],
            all_large_usd=all_large,
            routed_usd=actual,
            saved_usd=all_large - actual,
            saved_share=(all_large - actual) / all_large if all_large else None,
        )
    if router_dir is None:
        out["note"] = "no router artifact given (--router DIR): quality and drift not estimated"
        return out
    from finops.router.evaluate import replay_lake

    router = router if router is not None else load_artifact(router_dir)
    manifest = router.manifest
    out["artifact"] = {"path": str(router_dir), "version": manifest.get("version")}
    replay = replay_lake(router, finops.db.lake_dir(db), start=per.start, end=per.end)
    out["quality_estimate"] = _f(replay.get("estimated_quality"))
    out["replay"] = {
        k: replay.get(k)
        for k in (
            "requests",
            "saved_usd",
            "saved_pct",
            "shares",
            "test_quality_retained",
            "line",
            "vs_logged_usd",
            "vs_logged_pct",
            "logged_requests",
        )
    }
    ref = manifest.get("drift") or {}
    drift: dict[str, Any] = {}
    if ref.get("tier_shares") and replay.get("shares"):
        diff = {t: replay["shares"].get(t, 0.0) - s for t, s in ref["tier_shares"].items()}
        drift["share_shift"] = diff
        drift["max_share_shift"] = max(abs(v) for v in diff.values())
    if ref.get("bins") and ref.get("score_histogram"):
        edges = ref["bins"]
        scores = sql(
            db,
            f"""SELECT router_score FROM clean.requests
                WHERE {per.where("date_trunc('hour', ts)")} AND router_score IS NOT NULL""",
        ).pl()["router_score"]
        if scores.len():
            import numpy as np

            hist = np.histogram(scores.clip(0, 1).to_numpy(), edges)[0].tolist()
            drift["score_psi"] = _psi(ref["score_histogram"], hist)
    out["drift"] = drift or None
    return out


def _hourly_series(
    db: duckdb.DuckDBPyConnection, start: dt.datetime, end: dt.datetime
) -> pl.DataFrame:
    """Requests and GPU spend per hour over [start, end) (hours without data omitted).

    spend is NULL where the hour has no priced GPU data (no GPU metrics, or none with a
    price): unknown, not $0, which the forecast averaged in. has_gpu: the hour has GPU-hour rows; priced: some of them have a catalog price.
    An hour whose GPUs are all unpriced has GPU metrics but a NULL sum(gpu_cost), so
    the two differ; unpriced_models names them ('on_demand NVIDIA L4': a catalog row is
    per pricing kind and model), for the sentence that says why a spend is unknown.
    """
    where = f"hour >= TIMESTAMPTZ '{start.isoformat()}' AND hour < TIMESTAMPTZ '{end.isoformat()}'"
    return sql(
        db,
        f"""
        WITH r AS (SELECT hour, count(*) AS requests FROM marts.request_work WHERE {where}
                   GROUP BY ALL),
             g AS (SELECT hour, sum(gpu_cost) AS spend,
                          sum(gpu_hours) FILTER (usd_per_gpu_hour IS NULL) AS unpriced_gpu_hours,
                          list(DISTINCT coalesce(pricing_kind, '?') || ' '
                               || coalesce(gpu_model, '(no model name)'))
                              FILTER (usd_per_gpu_hour IS NULL) AS unpriced_models
                   FROM marts.gpu_cost_hourly WHERE {where} GROUP BY ALL)
        SELECT hour, coalesce(r.requests, 0) AS requests, g.spend AS spend,
               g.hour IS NOT NULL AS has_gpu, g.spend IS NOT NULL AS priced,
               coalesce(g.unpriced_gpu_hours, 0.0) AS unpriced_gpu_hours,
               coalesce(g.unpriced_models, []) AS unpriced_models
        FROM r FULL JOIN g USING (hour) ORDER BY hour
        """,
    ).pl()


def _baseline(week: pl.DataFrame, pool: pl.DataFrame, value: str, keys: list[str]) -> pl.DataFrame:
    """Per report-week row (`_id`): median, MAD and count of `value` over the other rows of
    `pool` with the same `keys`, the row itself left out. With three same-weekday points
    and the point judged among them, one outlier moved its own baseline: a tenant's
    Wednesday at $0 against $6.65 and $8.90 read z = -2."""
    pairs = week.select("_id", *keys).join(
        pool.select(pl.col("_id").alias("_other"), *keys, pl.col(value).cast(pl.Float64)),
        on=keys,
    )
    pairs = pairs.filter(pl.col("_id") != pl.col("_other")).drop_nulls(value)
    med = pairs.group_by("_id").agg(pl.col(value).median().alias("med"), pl.len().alias("n"))
    mad = (
        pairs.join(med, on="_id")
        .group_by("_id")
        .agg((pl.col(value) - pl.col("med")).abs().median().alias("mad"))
    )
    return med.join(mad, on="_id")


def _judge(
    df: pl.DataFrame,
    in_week: pl.Expr,
    value: str,
    same_weekday: list[str],
    same_kind: list[str],
    *,
    counts: bool = False,
    suffix: str = "",
) -> pl.DataFrame:
    """The report week's rows of `df` with z, usual and the baseline used: the same
    weekday (or hour of week) when it has MIN_BASELINE other points, else the same kind
    of day (weekend vs weekend, weekday vs weekday), else none (`basis` null: too little
    history to judge). z = (x - median) / spread, spread = MAD / 0.6745 (a normal's sd)
    but at least MIN_RELATIVE_SPREAD of the median, and sqrt(median) for counts (Poisson
    noise): with three points the MAD can be near 0, and a steady week flagged +5% hours."""
    pool = df.with_row_index("_id")
    week = pool.filter(in_week)
    fine = _baseline(week, pool, value, same_weekday)
    kind = _baseline(week, pool, value, same_kind)
    out = week.join(fine, on="_id", how="left").join(kind, on="_id", how="left", suffix="_kind")
    use_fine = pl.col("n").fill_null(0) >= MIN_BASELINE
    use_kind = pl.col("n_kind").fill_null(0) >= MIN_BASELINE
    med = pl.when(use_fine).then(pl.col("med")).when(use_kind).then(pl.col("med_kind"))
    mad = pl.when(use_fine).then(pl.col("mad")).when(use_kind).then(pl.col("mad_kind"))
    floor = MIN_RELATIVE_SPREAD * med.abs()
    if counts:
        floor = pl.max_horizontal(floor, med.abs().sqrt())
    spread = pl.max_horizontal(mad / 0.6745, floor)
    x = pl.col(value).cast(pl.Float64)
    return out.with_columns(
        pl.when(spread > 0).then((x - med) / spread).alias("z" + suffix),
        med.alias("usual" + suffix),
        pl.when(use_fine)
        .then(pl.lit("same weekday"))
        .when(use_kind)
        .then(pl.lit("same kind of day"))
        .alias("basis" + suffix),
    ).drop("_id", "med", "n", "mad", "med_kind", "n_kind", "mad_kind")


def _zero_days(t: pl.DataFrame) -> pl.DataFrame:
    """Tenant-days with no requests, from each tenant's first day on, on days the lake has
    requests at all: a tenant going silent had no row, so it was never judged (days with
    no requests from anyone are a collection gap, not a tenant's silence)."""
    if t.height == 0:
        return t
    days = t.select("day").unique()
    first = t.group_by("tenant").agg(pl.col("day").min().alias("first_day"))
    grid = first.join(days, how="cross").filter(pl.col("day") >= pl.col("first_day"))
    filled = grid.select("day", "tenant").join(t, on=["day", "tenant"], how="left")
    # a zero-request day costs 0 where the tenant's costs are known at all
    known = t.group_by("tenant").agg(pl.col("cost").is_not_null().any().alias("known"))
    return (
        filled.join(known, on="tenant")
        .with_columns(
            pl.col("requests").fill_null(0),
            pl.when(pl.col("known")).then(pl.col("cost").fill_null(0.0)).otherwise(pl.col("cost")),
        )
        .drop("known")
        .select(t.columns)
    )


def _anomalies(
    db: duckdb.DuckDBPyConnection, per: fc.Period, series: pl.DataFrame
) -> dict[str, Any]:
    """Hours and tenant-days far off their usual (robust z-score, |z| > 3.5).

    Hours: each hour's requests vs the same hour of week over the report week and up
    to four weeks before it; tenants: each tenant's daily cost vs its own same weekday.
    Weekends are quiet, so a baseline mixing them with weekdays flags every weekend:
    with fewer than MIN_BASELINE (3) same-weekday points (under three weeks of
    history) an item is compared with the same kind of day only (a Saturday hour with
    weekend hours at that hour of day, a Wednesday with the tenant's weekdays); with
    fewer than 3 of those either (a single weekend), it is not judged and counted in
    `not_judged`, never flagged against the other kind of day.
    """
    assert per.start is not None and per.end is not None
    in_week = (pl.col("hour") >= per.start) & (pl.col("hour") < per.end)
    s = series.with_columns(
        pl.col("hour").dt.hour().alias("hour_of_day"),
        (pl.col("hour").dt.weekday() >= 6).alias("weekend"),
        (
            (pl.col("hour").dt.weekday().cast(pl.Int32) - 1) * 24
            + pl.col("hour").dt.hour().cast(pl.Int32)
        ).alias("hour_of_week"),
    )
    s = _judge(s, in_week, "requests", ["hour_of_week"], ["weekend", "hour_of_day"], counts=True)
    hours = s.filter(pl.col("z").abs() > Z_THRESHOLD).sort(pl.col("z").abs(), descending=True)
    t = sql(
        db,
        f"""SELECT CAST(hour AS DATE) AS day, coalesce(tenant, '(none)') AS tenant,
                   {fc._known("cost_allocation")} AS cost, count(*) AS requests
            FROM marts.request_costs
            WHERE hour >= TIMESTAMPTZ '{(per.start - dt.timedelta(weeks=HISTORY_WEEKS)).isoformat()}'
              AND hour < TIMESTAMPTZ '{per.end.isoformat()}'
            GROUP BY ALL""",
    ).pl()
    t = _zero_days(t)
    t = t.with_columns(
        pl.col("day").dt.weekday().alias("weekday"),
        (pl.col("day").dt.weekday() >= 6).alias("weekend"),
    )
    # a tenant-day is judged on its cost and on its request count: costs of a steady
    # tenant swing by a third from day to day, so a tenant gone silent ($0) was within
    # its cost's noise, while its request count falls far outside its own
    t_week = pl.col("day") >= per.start.date()
    by_requests = _judge(
        t,
        t_week,
        "requests",
        ["tenant", "weekday"],
        ["tenant", "weekend"],
        counts=True,
        suffix="_requests",
    ).select("day", "tenant", "z_requests", "usual_requests")
    t = _judge(t, t_week, "cost", ["tenant", "weekday"], ["tenant", "weekend"]).join(
        by_requests, on=["day", "tenant"], how="left"
    )
    tenants = t.filter(
        (pl.col("z").abs() > Z_THRESHOLD) | (pl.col("z_requests").abs() > Z_THRESHOLD)
    ).sort(pl.max_horizontal(pl.col("z").abs(), pl.col("z_requests").abs()), descending=True)
    unjudged_hours = s.filter(pl.col("basis").is_null())
    unjudged_days = t.filter(pl.col("basis").is_null())
    return {
        "method": f"robust z-score |x - median| / max(MAD / 0.6745, "
        f"{MIN_RELATIVE_SPREAD:.0%} of the median, and sqrt(median) for request counts) > "
        f"{Z_THRESHOLD} over up to "
        f"{HISTORY_WEEKS + 1} weeks, each item against the others (itself left out); hours "
        f"vs the same hour of week, tenants' daily cost and request count vs their same "
        f"weekday; with fewer than {MIN_BASELINE} of those, vs the same kind of day "
        f"only (weekend vs weekend, weekday vs weekday), never a mix of both; with fewer than "
        f"{MIN_BASELINE} of those either, too little history to judge",
        "hours": _records(hours.select("hour", "requests", "usual", "z").head(20)),
        "tenants": _records(
            tenants.select(
                "day", "tenant", "cost", "usual", "z", "requests", "usual_requests", "z_requests"
            ).head(20)
        ),
        "not_judged": {
            "hours": unjudged_hours.height,
            "tenant_days": unjudged_days.height,
            "days": sorted(
                {str(d) for d in unjudged_hours["hour"].dt.date()}
                | {str(d) for d in unjudged_days["day"]}
            ),
        },
    }


def _forecast(series: pl.DataFrame, per: fc.Period) -> dict[str, Any]:
    """Next week = mean of each hour of week over up to 4 weeks x the week-over-week trend.

    trend = this week's rate per hour covered / the same span of the week before
    (so a week still in progress is not read as a drop), clipped to 0.8..1.25 so one
    odd week cannot run away; 1 when there is no earlier week. A report week without
    requests gives no forecast (old weeks alone are no basis for next week). Hours
    of week never seen fall back to the mean of the same hour of day.
    """
    assert per.start is not None and per.end is not None
    none: dict[str, Any] = {"requests": None, "spend_usd": None, "hourly": [], "trend": None}
    if series.height == 0:
        return {**none, "note": f"no data up to {per.label}: no basis for a forecast"}
    s = series.with_columns(
        (
            (pl.col("hour").dt.weekday().cast(pl.Int32) - 1) * 24
            + pl.col("hour").dt.hour().cast(pl.Int32)
        ).alias("how"),
        pl.col("hour").dt.hour().cast(pl.Int32).alias("hod"),
    )
    # a series without the price columns (built by hand) has every GPU hour priced
    defaults = {
        "priced": pl.col("has_gpu"),
        "unpriced_gpu_hours": pl.lit(0.0),
        "unpriced_models": pl.lit([], dtype=pl.List(pl.String)),
    }
    s = s.with_columns(v.alias(k) for k, v in defaults.items() if k not in s.columns)
    # an hour without priced GPU data has an unknown spend: left out of every mean below
    s = s.with_columns(pl.when(pl.col("priced")).then(pl.col("spend")).alias("spend"))
    cur = s.filter(pl.col("hour") >= per.start)
    if not cur["requests"].sum():
        return {**none, "note": f"no requests in {per.label}: no basis for a forecast"}
    # the same elapsed span of the week before, each side as a rate per hour it covers
    span = cur["hour"].max() + dt.timedelta(hours=1) - per.start
    prev_start = per.start - dt.timedelta(days=7)
    prev = s.filter((pl.col("hour") >= prev_start) & (pl.col("hour") < prev_start + span))
    trend = {}
    # no requests in the span before: no trend to measure (1 is an assumption, said so)
    trend_measured = bool(prev["requests"].sum())
    for col in ("requests", "spend"):
        # each side per hour it knows the value of (spend: the hours with priced GPU data)
        n_a, n_b = cur[col].count(), prev[col].count()
        a, b = float(cur[col].sum()), float(prev[col].sum())
        rate = (a / n_a) / (b / n_b) if a and b else 1.0
        trend[col] = min(max(rate, TREND_CLIP[0]), TREND_CLIP[1])
    by_how = s.group_by("how").agg(pl.col("requests").mean(), pl.col("spend").mean())
    by_hod = s.group_by("hod").agg(
        pl.col("requests").mean().alias("r_hod"),
        pl.col("spend").mean().alias("s_hod"),
        pl.col("has_gpu").any().alias("gpu_hod"),
    )
    grid = pl.DataFrame({"how": pl.int_range(0, 168, eager=True).cast(pl.Int32)})
    grid = grid.with_columns((pl.col("how") % 24).alias("hod"))
    f = (
        grid.join(by_how, on="how", how="left")
        .join(by_hod, on="hod", how="left")
        .with_columns(
            (pl.coalesce("requests", "r_hod").fill_null(0) * trend["requests"]).alias("requests"),
            # an hour of day with GPU rows but never priced: the mean of the priced hours
            # (its spend is unknown, not $0); one with no GPU rows at all (a fleet scaled to
            # zero overnight) cost nothing
            (
                pl.coalesce(
                    "spend",
                    "s_hod",
                    pl.when(pl.col("gpu_hod").fill_null(False))
                    .then(pl.lit(s["spend"].mean()))
                    .otherwise(pl.lit(0.0)),
                )
                * trend["spend"]
            ).alias("spend"),
        )
        .with_columns((pl.lit(per.end) + pl.duration(hours=pl.col("how"))).alias("hour"))
        .select("hour", "requests", "spend")
        .sort("hour")
    )
    req, spend = float(f["requests"].sum()), float(f["spend"].sum())
    unpriced = sorted(set(s["unpriced_models"].explode().drop_nulls().to_list()))
    unpriced_h = float(s["unpriced_gpu_hours"].sum())
    spend_note = None
    if not s["has_gpu"].any():
        spend = None  # no GPU samples in the history: the spend is unknown, not $0
        spend_note = "no GPU metrics"
    elif not s["priced"].any():
        # GPU-hours were measured, but the catalog prices none of them: unknown, not $0
        spend = None
        spend_note = (
            f"the price catalog has no price for {', '.join(unpriced)} (add one to {PRICES_HINT})"
        )
    elif not cur["priced"].any():
        # the week's own spend is unknown: a figure from earlier weeks alone would read as
        # this week's forecast, with no trend from this week behind it
        spend = None
        spend_note = (
            f"no {'priced ' if cur['has_gpu'].any() else ''}GPU data in {per.label} itself "
            "(earlier weeks' spend alone is no basis)"
        )
    else:
        said = []
        if unpriced:
            hours = f"{unpriced_h:,.2f}".rstrip("0").rstrip(".")
            said.append(
                f"counts {hours} GPU-hours of {', '.join(unpriced)} in its history as $0 "
                f"(no price in {PRICES_HINT})"
            )
        # hours with requests but no priced GPU data: their spend is unknown, left out
        blind = s.filter(pl.col("spend").is_null() & (pl.col("requests") > 0)).height
        if blind:
            said.append(
                f"rests on the {s['spend'].count():,} hours of its history with priced GPU "
                f"data ({blind:,} hours with requests had none: their spend is unknown, not "
                "counted as $0)"
            )
        spend_note = "; ".join(said) or None
    if spend is None:
        # an unknown week's spend has no hourly figures either (they would read as a forecast)
        f = f.with_columns(pl.lit(None, dtype=pl.Float64).alias("spend"))
    partial = span < dt.timedelta(days=7)
    return {
        "method": "mean of each hour of week over up to 4 weeks x week-over-week trend "
        f"(per hour covered, clipped to {TREND_CLIP[0]}..{TREND_CLIP[1]})"
        + (
            f"; the trend compares the first {span / dt.timedelta(hours=1):.0f} hours of both weeks"
            if partial
            else ""
        ),
        "weeks_of_history": int(s.select(pl.col("hour").dt.truncate("1w").n_unique()).item()),
        # weekdays with traffic in the history: the hours of the others are the same hours
        # of the days seen, so a forecast from one Wednesday says so
        "weekdays_seen": int(
            s.filter(pl.col("requests") > 0).select(pl.col("hour").dt.weekday().n_unique()).item()
        ),
        "trend": trend,
        "trend_measured": trend_measured,
        "requests": req,
        "spend_usd": spend,
        # why spend_usd is unknown (None), or what a known one leaves out
        "spend_note": spend_note,
        "usd_per_1k_requests": 1000 * spend / req if req and spend is not None else None,
        "hourly": _records(f),
    }


def week_connection(lake: str | Path, per: fc.Period) -> duckdb.DuckDBPyConnection:
    """A connection whose clean.* tables hold only `per` (so lake-wide tools see one week).

    finops.models simulates whatever the lake holds; a lake with several weeks would
    otherwise mix them into the report week's autoscaling and growth figures.
    """
    db = finops.connect(lake)
    quiet(db)
    for table in ("requests", "gpu_samples", "serving_samples", "cache_events"):
        db.execute(f"ALTER VIEW clean.{table} RENAME TO {table}__all").fetchall()
        db.execute(
            f"CREATE VIEW clean.{table} AS SELECT * FROM clean.{table}__all WHERE {per.where('ts')}"
        ).fetchall()
    return db


def _growth(db: duckdb.DuckDBPyConnection, per: fc.Period) -> dict[str, Any]:
    """5x growth line and queue-depth autoscaling vs the fixed fleet (finops.models).

    Runs on the report week only (see `week_connection`).
    """
    from finops.models.autoscaling import recommend
    from finops.models.simulate import Levers, Simulator, default_levers, headline
    from finops.models.waterfall import lever_waterfall

    db = week_connection(finops.db.lake_dir(db), per)
    # the report week itself: the default (the lake's latest whole week) is another week
    # when the report is for an older or a partial one
    sim = Simulator.from_lake(db, per=per)
    h = headline(db, 5.0, simulator=sim, per=per)
    fixed = sim.plan(1.0, Levers(autoscale=False)).totals
    auto = sim.plan(1.0, Levers(autoscale=True)).totals
    # which levers earn the saving (each measured after those before it; the CLI's
    # `finops simulate --default-levers` prints every step)
    wf = lever_waterfall(sim, 5.0, default_levers(sim)).filter(pl.col("step") > 0)
    top = wf.filter(pl.col("saved_usd") > 0).sort("saved_usd", descending=True).head(2)
    # the queue-depth targets notebook 02 and `finops simulate --autoscale` emit: where the
    # advice notes that target_waiting is floored (the SLO leaves less queue than its 0.5
    # step), the simulated fleet keeps the SLO but a real queue-depth autoscaler may not
    # a caveat is a footnote to the growth line: its failure must not cost the line itself
    caveats: list[dict[str, Any]] = []
    caveats_error = None
    try:
        adv = recommend(sim)
        caveats = [
            {
                "tier": t.tier,
                "target_waiting": _f(t.target_waiting),
                "queue_wait_ms": _f(t.queue_wait_ms),
                "slo_ms": _f(t.slo_ttft_p95_ms),
                "note": t.queue_note,
            }
            for t in adv.tiers
            if t.queue_note is not None
        ]
    except Exception as exc:
        caveats_error = f"Queue-depth autoscaling targets unavailable: {exc}"
    return {
        # why queue_target_caveats is empty when the advice could not be computed
        "queue_target_caveats_error": caveats_error,
        "growth": h["growth"],
        "line": h["line"],
        "scenario": h["scenario"],
        "top_levers": _records(top.select("lever", "setting", "saved_usd", "share_of_saving")),
        # the SLO both fleets keep: the default, raised for tiers whose prompts need longer
        "tier_slo_ms": {t: _f(sim.slo_for(t)) for t in sim.trace.profiles},
        "queue_target_caveats": caveats,
        "before_usd_per_1k": _f(h["before_usd_per_1k"]),
        "after_usd_per_1k": _f(h["after_usd_per_1k"]),
        "saving_pct": _f(h["saving_pct"]),
        "slo_ttft_p95_ms": _f(h["slo_ttft_p95_ms"]),
        "autoscaling": {
            "fixed_fleet_usd": _f(fixed["cost_usd"]),
            "autoscaled_usd": _f(auto["cost_usd"]),
            "saved_usd": _f(fixed["cost_usd"] - auto["cost_usd"]),
            "fixed_gpu_hours": _f(fixed["gpu_hours"]),
            "autoscaled_gpu_hours": _f(auto["gpu_hours"]),
        },
    }


# ----------------------------------------------------------------------------- takeaways


def usd(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"${x:,.{digits}f}"


def pct(x: float | None, digits: int = 0) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def change(x: float | None, vs: str = "previous week") -> str:
    return "" if x is None else f" ({signed_pct(x)} vs {vs})"


def share_text(x: float | None) -> str:
    """A share that is not exactly 0 or 1 never reads as 0% or 100% (99.6% idle is not 100%)."""
    if x is None:
        return "n/a"
    if 0.995 <= x < 1 or 0 < x < 0.005:
        return f"{100 * x:.1f}%"
    return pct(x)


def _unpriced_clause(src: dict[str, Any]) -> str:
    """What a known but partial bill leaves out (GPU-hours the catalog has no price for)."""
    h = src.get("unpriced_gpu_hours") or 0.0
    if not h:
        return ""
    models = ", ".join(src.get("unpriced_models") or []) or "some GPUs"
    n = src.get("unpriced_requests") or 0
    return (
        f" It leaves out {h:,.0f} GPU-hours of {models}, which the price catalog has no "
        f"price for"
        + (f" (the {n:,} requests they served have an unknown cost)" if n else "")
        + "."
    )


def _estimate_clause(src: dict[str, Any]) -> str:
    """Input-token prices from the token-ratio fallback (no vLLM phase histograms)."""
    measured, total = src.get("phase_split_tier_hours"), src.get("tier_hours")
    if not total or measured is None or measured >= total:
        return ""
    if not measured:
        return " (an estimate from token ratios: no vLLM prefill/decode histograms this week)"
    return (
        f" (partly an estimate from token ratios: {total - measured} of {total} tier-hours "
        "lack vLLM prefill/decode histograms)"
    )


def _reconciliation_text(week: str, rc: dict[str, Any]) -> str:
    """Why the FOCUS export's tenant costs and request counts differ from the tables'."""
    text = (
        f"The FOCUS export (focus-{week}.parquet) charges tenants on the usage basis: "
        f"{usd(rc['usage_usd'])} of busy GPU time plus {usd(rc['idle_usd'])} of idle "
        f"capacity on rows without a tenant (x_IdleCapacity) = the {usd(rc['bill_usd'])} "
        "bill; the tables here spread idle capacity over tenants, features and tiers "
        "(allocation basis), so their costs are higher than the export's."
    )
    gone = rc["requests"] - rc["focus_requests"]
    if gone:
        why = [
            f"{n:,} {what}"
            for n, what in (
                (rc["cache_served_requests"], "served by the shim's cache"),
                (rc["refused_requests"], "refused before reaching a model"),
                (rc["unpriced_requests"], "on GPUs without a price or tier"),
            )
            if n
        ]
        text += (
            f" Its x_Requests counts the {rc['focus_requests']:,} requests that ran on a "
            f"priced GPU, not the report's {rc['requests']:,}: the other {gone:,} used no "
            f"priced GPU time ({', '.join(why)})."
        )
    return text


def _takeaways(r: dict[str, Any]) -> dict[str, str]:
    h = r["headline"]
    src = r["sources"]
    vs = r.get("compare_text") or "previous week"
    t: dict[str, str] = {}
    if h["spend_usd"]["value"] is not None and src["gpu_samples"]:
        nc = h["spend_usd"].get("not_comparable")
        bill = f"The GPU bill was {usd(h['spend_usd']['value'])}" + (
            f" (no change shown: {nc})" if nc else change(h["spend_usd"]["change"], vs)
        )
        if not h["requests"]["value"]:
            t["headline"] = f"{bill}; no request logs this week, so there is no cost per request."
        else:
            n = h["requests"]["value"]
            priced = n - (src.get("unpriced_requests") or 0)
            # some requests on unpriced GPUs: the per-request figures divide by the others
            of = f" priced requests ({priced:,} of {n:,})" if priced < n else " requests"
            tokens = " priced tokens" if priced < n else " tokens"
            t["headline"] = (
                f"{bill} for {n:,} requests, "
                f"{usd(h['usd_per_1k_requests']['value'])} per 1k{of} and "
                f"{usd(h['usd_per_1m_tokens']['value'])} per 1M{tokens}."
            )
        t["headline"] += _unpriced_clause(src)
    b = r["breakdown"]
    for dim in ("tenant", "feature", "tier"):
        rows = b.get(dim) or []
        if not rows or rows[0].get("cost") is None:
            continue
        top = rows[0]
        # some rows unknown (their GPUs have no price): shares are of what is priced
        of = (
            "of the priced allocated spend"
            if any(x.get("cost") is None for x in rows)
            else "of allocated spend"
        )
        if "requests" not in top:  # from the GPU metrics alone (no request logs)
            t[dim] = (
                f"The {md_name(top[dim])} tier's GPUs cost {usd(top['cost'])} "
                f"({pct(top['share'])} of the bill); no request logs to split it further."
            )
        elif dim == "tenant":
            t[dim] = (
                f"{md_name(top['tenant'])} is the largest tenant at {usd(top['cost'])} "
                f"({pct(top['share'])} {of})."
            )
        elif dim == "feature":
            t[dim] = (
                f"{md_name(top['feature'])} costs the most: {usd(top['cost'])}, "
                f"{usd(top['usd_per_1k_requests'])} per 1k requests."
            )
        else:
            t[dim] = (
                f"The {md_name(top['tier'])} tier carries {pct(top['share'])} {of} "
                f"({usd(top['cost'])})."
            )
    rc = r.get("reconciliation") or {}
    if rc and src.get("requests", True):
        t["reconciliation"] = _reconciliation_text(r["week"], rc)
    idle = r["idle"]
    if idle["troughs"]:
        tr = idle["troughs"][0]
        cost = (
            usd(idle["idle_cost"])
            if idle["idle_cost"] is not None
            else "its cost unknown: no GPU price"
        )
        t["idle"] = (
            f"{share_text(idle['idle_share'])} of GPU time was idle ({cost}); the deepest "
            f"trough is {tr['hour_of_day']:02d}:00 UTC at {share_text(tr['idle_share'])} idle."
        )
    g = r.get("growth") or {}
    if g.get("autoscaling") and g["autoscaling"].get("saved_usd") is not None:
        a = g["autoscaling"]
        t["autoscaling"] = (
            f"Queue-depth autoscaling would have cost {usd(a['autoscaled_usd'])} instead of "
            f"{usd(a['fixed_fleet_usd'])} for the fixed fleet in the simulation, "
            f"saving {usd(a['saved_usd'])}{_slo_clause(g)}."
        )
    c = r["cache"]
    no_logs = src["gpu_samples"] and not src.get("requests", True)
    if no_logs:
        t["cache"] = "Cache savings are unknown: no request logs this week."
    elif c["layers"] and c["saved_usd"] is None and not c["potential_usd"]:
        # (a potential of $0: no duplicates reached the GPUs; "n/a ... $0.00 more" misread)
        t["cache"] = (
            "Cache savings are unknown: no priced GPU data this week to price the tokens the "
            "caches avoided."
        )
    elif c["layers"]:
        best = max(c["layers"], key=lambda x: x["usd_saved"] or 0)
        # cache lines are marginal (the GPU busy time the tokens take); the leakage line
        # for the same duplicates is their allocated cost, idle capacity included
        t["cache"] = (
            f"Caches saved {usd(c['saved_usd'])} of GPU busy time; a response cache on the "
            f"duplicates would save {usd(c['potential_usd'])} more (largest line: "
            f"{md_name(best['layer'])}, {usd(best['usd_saved'])}). These are the marginal "
            "cost of the tokens avoided; the leakage figures below are allocated cost, idle "
            "capacity included."
        )
    lk = r["leakage"]
    if no_logs:
        t["leakage"] = "Leakage is unknown: no request logs this week."
    elif lk["categories"] and lk["leak_usd"] is None:
        t["leakage"] = (
            "Leakage cost is unknown: no priced GPU data this week for the leaked requests."
        )
    elif lk["categories"]:
        t["leakage"] = (
            f"Leakage cost {usd(lk['leak_usd'])} of allocated spend (idle capacity included): "
            f"failed and retried work {usd(lk['failed_usd'])}, duplicates "
            f"{usd(lk['duplicates_usd'])}."
        )
        if lk["context"]:
            t["leakage"] += (
                " Capping each feature's context at its p90 would free "
                f"{usd(lk['context_usd'])} of GPU busy time{_estimate_clause(src)}; on a "
                "fixed fleet that is capacity freed, not yet money saved."
            )
    ro = r["router"]
    if ro.get("saved_usd") is not None:
        # a counterfactual on busy time: on a fixed fleet it is capacity freed, which
        # becomes money only when the fleet shrinks to match (see autoscaling)
        t["router"] = (
            f"Routing kept {usd(ro['saved_usd'])} of GPU busy time ({pct(ro['saved_share'])}) "
            f"off {md_name(ro['reference_tier'])}: the {ro['routed_requests']:,} routed "
            "requests that ran on a model (cache hits and refusals left out, which `finops "
            f"router offpolicy` counts) took {usd(ro['routed_usd'])} of busy time where all on "
            f"{md_name(ro['reference_tier'])} would have taken {usd(ro['all_large_usd'])}. "
            "On a fixed fleet that is capacity freed, not yet money saved."
        )
    elif no_logs:
        t["router"] = "Router impact is unknown: no request logs this week."
    elif ro.get("routed_requests") and not src["gpu_samples"]:
        t["router"] = (
            f"{ro['routed_requests']:,} requests were routed; what routing saved is unknown: "
            "no GPU metrics this week."
        )
    elif ro.get("routed_requests") and ro.get("unpriced_tiers"):
        names = ", ".join(md_name(x) for x in ro["unpriced_tiers"])
        t["router"] = (
            f"{ro['routed_requests']:,} requests were routed; what routing saved is unknown: "
            f"tier {names} served some of them on GPUs the price catalog has no price for."
        )
    elif ro.get("routed_requests"):
        t["router"] = (
            f"{ro['routed_requests']:,} requests were routed; what routing saved is unknown: "
            "it needs priced GPU data for at least two tiers this week."
        )
    if ro.get("quality_estimate") is not None and ro.get("artifact"):
        # the --router artifact replayed on the week: its own figures, never mixed with
        # the logged routers' saving above (a different router served the week)
        rep = ro.get("replay") or {}
        version = ro["artifact"].get("version") or "?"
        served = version in (ro.get("logged_versions") or [])
        # against the routing the week's log shows (all-on-the-largest-tier saving is no
        # saving if the log sent most requests to cheaper tiers)
        vs = rep.get("vs_logged_usd")
        t["router_replay"] = (
            f"The router given with --router ({md_name(version)}), replayed on this week's "
            f"{rep.get('requests') or 0:,} requests, would keep an estimated "
            f"{pct(ro['quality_estimate'], 1)} of quality"
            + (
                ""
                if vs is None
                else f" and save {usd(vs)} against the routing the log shows"
                if vs >= 0
                else f" and cost {usd(-vs)} ({pct(-(rep.get('vs_logged_pct') or 0), 1)}) more "
                "than the routing the log shows"
            )
            + "; "
            + (
                "it is the router that served this week."
                if served
                else "it did not serve this week (logged: "
                + (", ".join(md_name(v) for v in ro.get("logged_versions") or []) or "none")
                + ")."
            )
        )
    an = r["anomalies"]
    if not src.get("requests", True):
        t["anomalies"] = "Anomalies not judged: no requests this week."
        an = {**an, "not_judged": {}}
    else:
        t["anomalies"] = (
            f"{len(an['hours'])} hours and {len(an['tenants'])} tenant-days were far off "
            f"their usual (robust |z| > {Z_THRESHOLD})."
        )
    nj = an.get("not_judged") or {}
    if nj.get("hours") or nj.get("tenant_days"):
        t["anomalies"] += (
            f" {nj['hours']} hours and {nj['tenant_days']} tenant-days "
            f"({', '.join(nj['days'])}) had too little history to judge: fewer than "
            f"{MIN_BASELINE} days of the same kind (weekend or weekday) in the lake to compare."
        )
    fo = r["forecast"]
    if fo.get("requests") is None and fo.get("note"):
        t["forecast"] = f"No forecast for next week: {fo['note']}."
    if fo.get("requests") is not None:
        note = fo.get("spend_note")
        head = f"Next week: about {fo['requests']:,.0f} requests"
        trend = (
            f"(trend x{fo['trend']['requests']:.2f})"
            if fo.get("trend_measured", True)
            else "(no earlier week to measure a trend: none applied)"
        )
        if fo.get("spend_usd") is not None:
            t["forecast"] = f"{head} and {usd(fo['spend_usd'])} of GPU spend {trend}." + (
                f" The spend {note}." if note else ""
            )
        else:  # unknown: no GPU metrics, or GPU-hours the catalog has no price for
            t["forecast"] = f"{head} {trend}; GPU spend unknown: {note or 'no GPU metrics'}."
        seen = fo.get("weekdays_seen", 7)
        if seen < 7:  # the hours of the days never seen are those of the days seen
            t["forecast"] += (
                f" It rests on {seen} day{'s' if seen != 1 else ''} of the week with traffic: "
                "the other days repeat their hours."
            )
    if g.get("line"):
        top = g.get("top_levers") or []
        shown = [x for x in top if x["saved_usd"] is not None and x["share_of_saving"] is not None]
        most = " and ".join(
            f"{x['setting']}: {usd(x['saved_usd'], 0)} or {pct(x['share_of_saving'])}"
            + _replica_clause(shown, i)
            for i, x in enumerate(shown)
        )
        t["growth"] = (
            f"At 5x traffic a request would cost {usd(g['before_usd_per_1k'])}/1k before the "
            f"levers and {usd(g['after_usd_per_1k'])}/1k after ({g['saving_pct']:.0f}% less)"
            + (f"; most of the saving comes from {most}" if most else "")
            + "; every lever's share: finops simulate --default-levers."
        )
    return t


def _replica_clause(top: list[dict[str, Any]], i: int) -> str:
    """What a traffic or serving lever's dollars are (finops.models.waterfall.REPLICA_NOTE),
    said after the last such lever of `top` (i: the one being written): a 5x plan buys
    whole replicas for the TTFT SLO, so "input capped: 43%" is replicas no longer needed,
    where the report's context-cap line is GPU busy time freed. Price levers have none."""
    from finops.models.waterfall import PRICE_LEVERS  # what each GPU-hour costs, not how many

    which = [j for j, x in enumerate(top) if x.get("lever") not in (*PRICE_LEVERS, None)]
    if not which or i != which[-1]:
        return ""
    levers = {top[j].get("lever") for j in which}
    return (
        f" ({'both: ' if len(which) > 1 else ''}replicas the p95 TTFT SLO no longer "
        "needs, in whole-replica steps, not GPU work avoided"
        + (
            "; a capped prompt's shorter prefill lets fewer replicas meet the SLO"
            if "token_cap" in levers
            else ""
        )
        + ")"
    )


def _slo_clause(g: dict[str, Any]) -> str:
    """The p95 TTFT SLO both simulated fleets keep, with the tiers whose prompts raised it,
    and the tiers where a queue-depth target cannot promise it (notebook 02's caveat)."""
    slo = g.get("slo_ttft_p95_ms")
    if slo is None:
        return ""
    raised = {t: v for t, v in (g.get("tier_slo_ms") or {}).items() if v and v > slo}
    text = f", both keeping p95 time to first token within {slo:,.0f} ms" + (
        " ("
        + ", ".join(f"{md_name(t)} {v:,.0f} ms" for t, v in raised.items())
        + ": their prompts' prefill needs longer)"
        if raised
        else ""
    )
    caveats = g.get("queue_target_caveats") or []
    if caveats:
        waits = ", ".join(
            f"{x['queue_wait_ms']:,.0f} ms on {md_name(x['tier'])}"
            for x in caveats
            if x.get("queue_wait_ms") is not None
        )
        floor = ", ".join(sorted({f"{x['target_waiting']:g}" for x in caveats}))
        text += (
            f". That is the simulation's hourly fleet: a queue-depth autoscaler's "
            f"target_waiting is floored at {floor} on "
            f"{', '.join(md_name(x['tier']) for x in caveats)}"
            + (f", whose queue waits about {waits}" if waits else "")
            + ", so there p95 TTFT can exceed the SLO before it adds a replica (scale ahead "
            "of the busy hours or relax the SLO)"
        )
    return text


def _findings(r: dict[str, Any]) -> list[str]:
    """Top findings, biggest dollars first (for the Markdown summary)."""
    cand: list[tuple[float, str]] = []
    idle = r["idle"]
    if idle.get("idle_cost"):
        cand.append((idle["idle_cost"], r["takeaways"].get("idle", "")))
    lk = r["leakage"]
    if lk["leak_usd"]:
        cand.append((lk["leak_usd"], r["takeaways"].get("leakage", "")))
    c = r["cache"]
    if c["potential_usd"]:
        cand.append((c["potential_usd"], r["takeaways"].get("cache", "")))
    ro = r["router"]
    if ro.get("saved_usd"):
        cand.append((abs(ro["saved_usd"]), r["takeaways"].get("router", "")))
    a = (r.get("growth") or {}).get("autoscaling") or {}
    if a.get("saved_usd"):
        cand.append((a["saved_usd"], r["takeaways"].get("autoscaling", "")))
    for x in r["anomalies"]["tenants"][:1]:
        zc, zr = abs(x.get("z") or 0.0), abs(x.get("z_requests") or 0.0)
        gap = abs((x["cost"] or 0.0) - (x["usual"] or 0.0))
        if zc >= zr:
            text = (
                f"Anomaly: {md_name(x['tenant'])} spent {usd(x['cost'])} on {x['day']} vs a "
                f"usual {usd(x['usual'])} (z = {x['z']:.2f})."
            )
        else:  # its request count is what stands out (a tenant gone silent, a flood)
            text = (
                f"Anomaly: {md_name(x['tenant'])} sent {x['requests']:,} requests on "
                f"{x['day']} vs a usual {x['usual_requests']:,.0f} (z = {x['z_requests']:.2f})."
            )
        cand.append((gap, text))
    cand.sort(key=lambda x: -x[0])
    return [s for _, s in cand if s]


# ----------------------------------------------------------------------------- entry point


def check_lake_folder(path: Path) -> None:
    """A lake folder that exists and, unless empty, holds lake tables: a wrong --lake (a
    report folder, the project root) gave a full report of n/a instead of an error."""
    from finops.schemas import TABLES

    if not path.exists():
        raise ReportError(f"{path}: lake folder not found")
    if not path.is_dir():
        raise ReportError(f"{path}: not a lake folder (it is a file)")
    entries = [e for e in path.iterdir() if not e.name.startswith(".")]
    if entries and not any(e.is_dir() and e.name in TABLES for e in entries):
        raise ReportError(
            f"{path}: not a finops lake (no table folder such as requests/ or gpu_samples/ "
            "in it); give --lake the folder finops collect or finops demo writes"
        )


def _compare_span(src: dict[str, Any], per: fc.Period, prev: fc.Period) -> fc.Period:
    """The comparison period: the whole week before, or, when the lake ends inside the
    report week, the same first hours of it (48 hours against 168 read as a 70% drop)."""
    last = src.get("lake_last_hour")
    assert per.start is not None and per.end is not None and prev.start is not None
    if last is None:
        return prev
    end = dt.datetime.fromisoformat(last) + dt.timedelta(hours=1)
    if not per.start < end < per.end:
        return prev
    span = end - per.start
    hours = span / dt.timedelta(hours=1)
    return fc.Period(prev.start, prev.start + span, f"{prev.label} (first {hours:.0f} hours)")


# headline figures that come from the GPU samples: a GPU-hour gap inside the hours compared
# makes their change a collection artefact, not a move
GPU_KEYS = tuple(
    k for k in HEADLINE_KEYS if k not in ("requests", "input_tokens", "output_tokens", "tokens")
)
# a GPU gap (marts.gpu_gap_hourly) of under this share of a side's GPU-hours is noise
GAP_TOLERANCE = 0.005


@dataclass(frozen=True)
class HourSet(fc.Period):
    """A Period restricted to some hours of it (offsets in hours from `start`): the hours
    of the week both compared weeks have data for. Every cost function filters through
    `where`, so the totals of both weeks are over the same hours of week."""

    offsets: tuple[int, ...] = ()

    def where(self, column: str = "hour") -> str:
        assert self.start is not None
        offs = ", ".join(str(o) for o in self.offsets) or "NULL"
        return (
            f"{super().where(column)} AND CAST(floor((epoch({column}) - "
            f"epoch(TIMESTAMPTZ '{self.start.isoformat()}')) / 3600) AS INTEGER) IN ({offs})"
        )


def _offset(per: fc.Period) -> str:
    assert per.start is not None
    return (
        f"CAST(floor((epoch(hour) - epoch(TIMESTAMPTZ '{per.start.isoformat()}')) / 3600) "
        "AS INTEGER)"
    )


def _coverage(db: duckdb.DuckDBPyConnection, per: fc.Period) -> tuple[set[int], set[int]]:
    """Hours of `per` (offsets from its start) with GPU samples, and days (0 = its first)
    with requests: a quiet hour without requests is traffic, a day without any is a gap."""
    gpu = sql(
        db, f"SELECT DISTINCT {_offset(per)} FROM marts.gpu_cost_hourly WHERE {per.where()}"
    ).fetchall()
    req = sql(
        db,
        f"SELECT DISTINCT {_offset(per)} // 24 FROM marts.request_work WHERE {per.where()}",
    ).fetchall()
    return {int(x) for (x,) in gpu}, {int(x) for (x,) in req}


def _gap_gpu_hours(db: duckdb.DuckDBPyConnection, per: fc.Period) -> tuple[float, float]:
    """(GPU-hours with no samples between reporting ones, GPU-hours measured) over `per`."""
    gaps = fc._cached(fc._view_bodies()["gpu_gap_hourly"])
    row = sql(
        db,
        f"""SELECT (SELECT coalesce(sum(est_gpu_hours), 0) FROM ({gaps}) WHERE {per.where()}),
                   (SELECT coalesce(sum(gpu_hours), 0) FROM marts.gpu_cost_hourly
                     WHERE {per.where()})""",
    ).fetchall()[0]
    return float(row[0]), float(row[1])


def _hours_text(per: fc.Period, offsets: set[int]) -> str:
    """'Wed 2026-11-18 (24 h), Thu 2026-11-19 (3 h)': the days of `per` the offsets fall on."""
    assert per.start is not None
    days: dict[int, int] = {}
    for o in sorted(offsets):
        days[o // 24] = days.get(o // 24, 0) + 1
    parts = [
        f"{per.start + dt.timedelta(days=d):%a %Y-%m-%d}" + ("" if n == 24 else f" ({n} h)")
        for d, n in days.items()
    ]
    return ", ".join(parts[:4]) + (f" and {len(parts) - 4} more days" if len(parts) > 4 else "")


def _comparison(
    db: duckdb.DuckDBPyConnection, per: fc.Period, span: fc.Period, prev_label: str
) -> dict[str, Any]:
    """Like-for-like periods for the week-over-week changes, and what the report says.

    Hours one week has GPU samples for and the other has not (an exporter down for a
    day), and days one week has requests on and the other has none (logs not collected),
    are left out of both sides: the changes compare the same hours of week. A GPU gap
    left inside those hours (some GPUs silent, marts.gpu_gap_hourly) makes the changes
    of the GPU figures not comparable (None, with `reason`) rather than a move.
    """
    assert per.start is not None and span.start is not None and span.hours is not None
    n = round(span.hours)
    all_hours = set(range(n))
    cur_g, cur_r = _coverage(db, per)
    prev_g, prev_r = _coverage(db, span)
    cur_g &= all_hours
    keep = set(all_hours)
    cur_lacks: set[int] = set()
    prev_lacks: set[int] = set()
    if cur_g and prev_g:
        keep &= cur_g & prev_g
        cur_lacks |= prev_g - cur_g
        prev_lacks |= cur_g - prev_g
    if cur_r and prev_r:
        for d in cur_r ^ prev_r:
            day = {h for h in all_hours if h // 24 == d}
            keep -= day
            (cur_lacks if d in prev_r else prev_lacks).update(day)
    out: dict[str, Any] = {"cur": per, "prev": span, "notes": [], "not_comparable": {}}
    if keep != all_hours or cur_lacks or prev_lacks:
        hours = tuple(sorted(keep))
        out["cur"] = HourSet(per.start, per.end, f"{per.label} (hours both weeks have)", hours)
        out["prev"] = HourSet(span.start, span.end, f"{prev_label} (hours both weeks have)", hours)
        out["hours"] = len(hours)
        out["compare_text"] = f"the {len(hours)} hours of {prev_label} both weeks have data for"
        lacks = []
        if cur_lacks:
            lacks.append(
                f"{per.label} has no GPU samples or no requests in {len(cur_lacks)} hours "
                f"{prev_label} has ({_hours_text(per, cur_lacks)})"
            )
        if prev_lacks:
            lacks.append(
                f"the comparison week {prev_label} has no GPU samples or no requests in "
                f"{len(prev_lacks)} hours {per.label} has ({_hours_text(span, prev_lacks)})"
            )
        text = "; ".join(lacks)
        out["notes"].append(
            (text[0].upper() + text[1:] + ": " if text else "")
            + f"changes compare only the {len(hours)} hours of the week both have data for, "
            "not the whole weeks."
        )
        if not hours:
            reason = f"{per.label} and {prev_label} have no hours of data in common"
            out["not_comparable"] = dict.fromkeys(HEADLINE_KEYS, reason)
            out["notes"][-1] = (
                f"{text[0].upper() + text[1:]}: no hours in common, changes are not shown."
            )
            return out
    gaps = []
    for label, p in ((per.label, out["cur"]), (prev_label, out["prev"])):
        gap, measured = _gap_gpu_hours(db, p)
        if gap > GAP_TOLERANCE * max(measured, 1.0):
            gaps.append(f"{label} misses GPU samples for {gap:,.0f} GPU-hours")
    if gaps:
        reason = " and ".join(gaps) + " in the hours compared (see marts.gpu_gap_hourly)"
        out["not_comparable"] = dict.fromkeys(GPU_KEYS, reason)
        out["notes"].append(
            reason[0].upper() + reason[1:] + ": changes of the GPU figures (spend, cost per "
            "request and token, GPU-hours, utilization) are not comparable and not shown."
        )
    return out


def compute(
    lake: str | Path | duckdb.DuckDBPyConnection,
    week: str,
    *,
    compare_to: str | None = None,
    router: str | Path | None = None,
    growth: bool = True,
    log: Callable[[str], None] | None = None,
    allow_empty: bool = True,
) -> dict[str, Any]:
    """All figures of the weekly report for `week` as a JSON-ready dict.

    compare_to defaults to the ISO week before. An empty or partial week, missing
    GPU metrics, a missing previous week or no router still give a report: the
    `sources.missing` sentences say what is absent. With `allow_empty=False` a week
    the lake holds nothing of and that lies outside its data (a mistyped week, an
    empty lake) raises ReportError instead: a scheduled report must not mail a page
    of n/a.
    """
    try:
        per = fc.period(week)
    except fc.CostError as exc:
        raise ReportError(str(exc)) from None
    prev_label = compare_to or previous_week(week)
    try:
        prev_per = fc.period(prev_label)
    except fc.CostError as exc:
        raise ReportError(f"compare_to (--compare-to): {exc}") from None
    if prev_per.label == per.label:  # every change would read 0.0%
        raise ReportError(
            f"compare_to (--compare-to): {prev_label!r} is the report week itself; "
            "give an earlier week"
        )
    if prev_per.start is not None and per.start is not None and prev_per.start > per.start:
        # "vs" a later week reads every change backwards (and that week may hold no data)
        raise ReportError(
            f"compare_to (--compare-to): {prev_label!r} comes after the report week "
            f"{per.label}; give an earlier week"
        )
    artifact = load_artifact(router) if router is not None else None
    if isinstance(lake, duckdb.DuckDBPyConnection):
        db = lake
    else:
        check_lake_folder(Path(lake))
        db = finops.connect(lake)
    quiet(db)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def step(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(now - t0, 3)
        t0 = now
        if log:
            log(f"{name}: {timings[name]:.2f}s")

    fc.materialize(db)
    step("materialize")
    r: dict[str, Any] = {
        "week": per.label,
        "start": per.start.isoformat() if per.start else None,
        "end": per.end.isoformat() if per.end else None,
        "period": period_text(per),
        "compare_to": prev_per.label,
        "lake": str(finops.db.lake_dir(db)),
    }
    r["sources"] = _sources(db, per)
    cur = _week_numbers(db, per)
    span = _compare_span(r["sources"], per, prev_per)
    prev = _week_numbers(db, span)
    r["sources"]["previous_week"] = prev is not None
    r["compare_text"] = prev_per.label
    # sentences about what the changes compare: the summary shows them whole
    notes: list[str] = []
    if span is not prev_per and prev is not None:
        hours = f"{span.hours:.0f}"
        r["compare_text"] = f"the same first {hours} hours of {prev_per.label}"
        notes.append(
            f"The lake ends {hours} hours into {per.label}: changes compare them with the "
            f"first {hours} hours of {prev_per.label}."
        )
    compared: dict[str, Any] | None = None
    not_comparable: dict[str, str] = {}
    if prev is not None and cur is not None:
        cmp = _comparison(db, per, span, prev_per.label)
        not_comparable = cmp["not_comparable"]
        notes += cmp["notes"]
        if "hours" in cmp:  # gaps: both sides over the hours both weeks have data for
            r["compare_text"] = cmp["compare_text"]
            r["compared_hours"] = cmp["hours"]
            if cmp["hours"]:
                compared = _week_numbers(db, cmp["cur"])
                prev = _week_numbers(db, cmp["prev"])
    if prev is None:
        r["compare_text"] = f"{prev_per.label} (no data: changes are not shown)"
        notes.append(f"No data for the comparison week {prev_per.label}: changes are not shown.")
    r["sources"]["comparison_notes"] = notes
    r["sources"]["missing"] += notes
    if cur is None:
        first, last = r["sources"]["lake_first_hour"], r["sources"]["lake_last_hour"]
        held = (
            f" (it holds {first[:10]} to {last[:10]} UTC)"
            if first and last
            else " (it holds no requests or GPU metrics at all)"
        )
        outside = not (first and last) or not (
            per.start < dt.datetime.fromisoformat(last) + dt.timedelta(hours=1)
            and dt.datetime.fromisoformat(first) < per.end
        )
        if outside and not allow_empty:
            raise ReportError(
                f"the lake holds no data for {per.label}{held}: check --week, or give "
                "--allow-empty for a report that says so"
            )
        r["sources"]["missing"].insert(0, f"The lake holds no data for {per.label}{held}.")
    r["headline"] = _headline(cur, prev, compared, not_comparable)
    r["headline"]["util_signal"] = r["sources"]["util_signal"]
    step("headline")
    empty = cur is None
    r["breakdown"] = {} if empty else _breakdowns(db, per)
    r["idle"] = _idle(db, per)
    # no request logs: what caches saved and what leaked are unknown (None), not $0
    no_logs = empty or not r["sources"]["requests"]
    r["cache"] = (
        {"layers": [], "saved_usd": None, "potential_usd": None} if no_logs else _cache(db, per)
    )
    r["leakage"] = (
        {
            "categories": [],
            "leak_usd": None,
            "duplicates_usd": None,
            "retries_usd": None,
            "failed_usd": None,
            "context": [],
            "context_usd": None,
            "chart": [],
        }
        if no_logs
        else _leakage(db, per)
    )
    r["reconciliation"] = (
        {} if empty or not r["sources"]["gpu_samples"] else _reconciliation(db, per)
    )
    step("sections")
    r["router"] = _router(db, per, router, artifact)
    step("router")
    assert per.start is not None and per.end is not None
    series = _hourly_series(db, per.start - dt.timedelta(weeks=HISTORY_WEEKS), per.end)
    r["hourly"] = _records(
        series.filter(pl.col("hour") >= per.start).select("hour", "requests", "spend")
    )
    r["anomalies"] = _anomalies(db, per, series)
    r["forecast"] = _forecast(series, per)
    step("anomalies+forecast")
    r["growth"] = None
    if growth and not empty and r["sources"]["requests"]:
        try:
            r["growth"] = _growth(db, per)
            if r["growth"]["queue_target_caveats_error"]:
                r["sources"]["missing"].append(r["growth"]["queue_target_caveats_error"])
        except Exception as exc:  # the simulator needs serving metrics; say why it is absent
            r["sources"]["missing"].append(f"Growth simulation unavailable: {exc}")
    elif growth:
        r["sources"]["missing"].append("Growth simulation unavailable: no requests this week.")
    else:
        r["sources"]["missing"].append("Growth and autoscaling simulation skipped (--no-growth).")
    step("growth")
    r["takeaways"] = _takeaways(r)
    r["findings"] = _findings(r)
    r["timings_s"] = timings
    return r
