"""Per-replica, per-interval serving features read from the lake.

The models fit on what Prometheus would compute: counter increases (with
reset handling, from `clean.serving_increase`) over an interval, averaged
gauges, and histogram bucket increases turned into quantiles the way
`histogram_quantile()` does. One row = one replica (scrape target + served
model) in one interval. vLLM's data-parallel engines (series split by an
`engine` label, `--data-parallel-size`) are one replica: their counters and
running/waiting gauges add up, and the interval's length is counted once.
"""

from __future__ import annotations

import datetime as dt

import duckdb
import numpy as np
import polars as pl

from finops.costs import Period

GEN = "vllm:generation_tokens_total"
PROMPT = "vllm:prompt_tokens_total"
DONE = "vllm:request_success_total"
PREFILL_SUM = "vllm:request_prefill_time_seconds_sum"
PREFILL_COUNT = "vllm:request_prefill_time_seconds_count"
E2E_SUM = "vllm:e2e_request_latency_seconds_sum"
QUEUE_SUM = "vllm:request_queue_time_seconds_sum"
ITL_SUM = "vllm:inter_token_latency_seconds_sum"
ITL_COUNT = "vllm:inter_token_latency_seconds_count"
RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV = "vllm:kv_cache_usage_perc"
SM_FIELDS = ("DCGM_FI_PROF_SM_ACTIVE", "DCGM_FI_PROF_GR_ENGINE_ACTIVE")

TIER_SQL = "coalesce(json_extract_string(labels, '$.tier'), model_name, target)"
POD_SQL = "coalesce(json_extract_string(labels, '$.pod'), target)"
ENGINE_SQL = "coalesce(json_extract_string(labels, '$.engine'), '')"


def request_tier_sql(served: str = "$served") -> str:
    """SQL tier of a clean.requests row, matched to the serving tiers (TIER_SQL) in `served`.

    Serving series are keyed by their `tier` label, else vLLM's `model_name` (a direct
    scrape); a request joins on its own tier where that names a serving tier, else on
    the model that answered it, so both sides of the join use one definition."""
    return (
        f"CASE WHEN list_contains({served}, tier) THEN tier "
        f"WHEN list_contains({served}, response_model) THEN response_model "
        "ELSE coalesce(tier, response_model) END"
    )


class NoServingData(ValueError):
    """The lake has no usable vLLM serving metrics for what was asked."""


def model_period(
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> Period:
    """The period a model reads, named as `finops.costs` names it: an ISO week
    (`week="2026-W47"`), from/to dates (`start`/`end`, both inclusive) or a `Period`
    (`per`, e.g. `finops.costs.period(...)` or a simulation's `trace.period`).
    Nothing given: all data in the lake."""
    import finops.costs as fc

    if per is not None:
        if week is not None or start is not None or end is not None:
            raise ValueError("give either per or week/start/end, not both")
        return per
    return fc.period(week, start, end)


def in_period(exc: NoServingData, per: Period) -> NoServingData:
    """`exc` with the period named, unless the period is all data."""
    if per.start is None and per.end is None:
        return exc
    return NoServingData(f"{per.label}: {exc}")


def _bucket(interval_s: int) -> str:
    if interval_s <= 0:
        raise ValueError(f"interval_s must be a positive number of seconds, got {interval_s}")
    return f"time_bucket(INTERVAL '{int(interval_s)} seconds', ts)"


def known_tiers(db: duckdb.DuckDBPyConnection) -> list[str]:
    """Tiers (or served model names) that have vLLM token counters in the lake."""
    rows = db.sql(
        f"SELECT DISTINCT {TIER_SQL} FROM clean.serving_samples WHERE metric = $m ORDER BY 1",
        params={"m": GEN},
    ).fetchall()
    return [r[0] for r in rows if r[0] is not None]


def check_tier(db: duckdb.DuckDBPyConnection, tier: str | None) -> None:
    """Raise a clear error for a tier the lake has no serving data for."""
    if tier is None:
        return
    tiers = known_tiers(db)
    if tier not in tiers:
        raise ValueError(f"unknown tier {tier!r}; the lake has serving metrics for {tiers}")


def serving_intervals(
    db: duckdb.DuckDBPyConnection,
    *,
    interval_s: int = 300,
    tier: str | None = None,
    where: str = "true",
) -> pl.DataFrame:
    """Offered load and throughput per replica per interval.

    Columns: t, tier, target, pod, seconds, generation_tokens, prompt_tokens,
    requests (completed), concurrency (time-average sequences in the batch, by
    Little's law from the e2e-latency minus queue-time histogram sums; else the
    sampled running gauge), gen_tps, prompt_tps, request_rate, mean_prompt,
    mean_output, running, waiting, kv_usage, sm_active (None without DCGM
    profiling metrics), prefill_s_per_request, itl_s (mean time between two
    tokens of one sequence: the decode step time; None without the histogram),
    day. `where`: an extra SQL predicate on `ts` (e.g. finops.costs.Period.where("ts")).
    """
    check_tier(db, tier)
    b = _bucket(interval_s)
    tier_filter = f"AND {TIER_SQL} = $tier" if tier is not None else ""
    tier_filter += f" AND ({where})"
    params: dict[str, object] = {"tier": tier} if tier is not None else {}
    sql = f"""
    WITH inc AS (
        SELECT {b} AS t, target, {TIER_SQL} AS tier, {POD_SQL} AS pod, {ENGINE_SQL} AS engine,
               metric, increase, seconds
        FROM clean.serving_increase
        WHERE metric IN ('{GEN}', '{PROMPT}', '{DONE}', '{PREFILL_SUM}', '{PREFILL_COUNT}', '{E2E_SUM}', '{QUEUE_SUM}',
                         '{ITL_SUM}', '{ITL_COUNT}')
        {tier_filter}
    ),
    per_engine AS (
        -- one engine's series of a metric: its increases and the time they cover
        SELECT t, target, tier, engine, metric, any_value(pod) AS pod,
            sum(increase) AS increase, sum(seconds) AS seconds
        FROM inc GROUP BY t, target, tier, engine, metric
    ),
    counters AS (
        -- a replica's engines add up their work; the interval's length is counted once
        SELECT t, target, tier, any_value(pod) AS pod,
            max(seconds) FILTER (metric = '{GEN}') AS seconds,
            sum(increase) FILTER (metric = '{GEN}') AS generation_tokens,
            sum(increase) FILTER (metric = '{PROMPT}') AS prompt_tokens,
            sum(increase) FILTER (metric = '{DONE}') AS requests,
            sum(increase) FILTER (metric = '{PREFILL_SUM}') AS prefill_seconds,
            sum(increase) FILTER (metric = '{PREFILL_COUNT}') AS prefills,
            sum(increase) FILTER (metric = '{E2E_SUM}') AS e2e_seconds,
            sum(increase) FILTER (metric = '{QUEUE_SUM}') AS queue_seconds,
            sum(increase) FILTER (metric = '{ITL_SUM}') AS itl_seconds,
            sum(increase) FILTER (metric = '{ITL_COUNT}') AS itl_count
        FROM per_engine GROUP BY t, target, tier
    ),
    gauges_engine AS (
        SELECT {b} AS t, target, {TIER_SQL} AS tier, {ENGINE_SQL} AS engine,
            avg(value) FILTER (metric = '{RUNNING}') AS running,
            avg(value) FILTER (metric = '{WAITING}') AS waiting,
            avg(value) FILTER (metric = '{KV}') AS kv_usage
        FROM clean.serving_samples
        WHERE metric IN ('{RUNNING}', '{WAITING}', '{KV}') AND NOT isnan(value) {tier_filter}
        GROUP BY ALL
    ),
    gauges AS (
        -- sequences in the replica = the sum over its engines; KV usage is a share of each
        -- engine's own cache, so the replica's is their mean
        SELECT t, target, tier, sum(running) AS running, sum(waiting) AS waiting,
            avg(kv_usage) AS kv_usage
        FROM gauges_engine GROUP BY t, target, tier
    ),
    sm AS (
        SELECT {b} AS t, pod, avg(value) AS sm_active
        FROM clean.gpu_samples WHERE field = '{SM_FIELDS[0]}' AND pod IS NOT NULL
        GROUP BY ALL
    )
    SELECT c.t, c.tier, c.target, c.pod, c.seconds, c.generation_tokens, c.prompt_tokens,
        c.requests, g.running, g.waiting, g.kv_usage, sm.sm_active,
        c.prefill_seconds / nullif(c.prefills, 0) AS prefill_s_per_request,
        c.itl_seconds / nullif(c.itl_count, 0) AS itl_s,
        -- Little's law: request-seconds spent in the batch (e2e minus queue time) per second
        -- = mean running sequences; waiting requests generate nothing, so they are left out
        CASE WHEN c.e2e_seconds IS NOT NULL
             THEN greatest(c.e2e_seconds - coalesce(c.queue_seconds, 0), 0) / c.seconds
             ELSE g.running END AS concurrency
    FROM counters c
    LEFT JOIN gauges g USING (t, target, tier)
    LEFT JOIN sm ON sm.t = c.t AND sm.pod = c.pod
    WHERE c.seconds > 0
    ORDER BY c.tier, c.target, c.t
    """
    df = db.sql(sql, params=params).pl()
    if df.height == 0:
        scope = f" for tier {tier!r}" if tier else ""
        raise NoServingData(
            f"no vLLM token counters ({GEN}) with at least two samples{scope} in the lake"
        )
    return df.with_columns(
        gen_tps=pl.col("generation_tokens") / pl.col("seconds"),
        prompt_tps=pl.col("prompt_tokens") / pl.col("seconds"),
        request_rate=pl.col("requests") / pl.col("seconds"),
        mean_prompt=pl.col("prompt_tokens") / pl.when(pl.col("requests") > 0).then("requests"),
        mean_output=pl.col("generation_tokens") / pl.when(pl.col("requests") > 0).then("requests"),
        day=pl.col("t").dt.date(),
    )


def histogram_quantiles(
    db: duckdb.DuckDBPyConnection,
    metric: str,
    quantiles: tuple[float, ...] = (0.5, 0.95),
    *,
    interval_s: int = 300,
    tier: str | None = None,
    where: str = "true",
) -> pl.DataFrame:
    """Quantiles of a vLLM histogram per replica per interval (Prometheus semantics).

    `metric` is the base name, e.g. `vllm:time_to_first_token_seconds`. Bucket
    counter increases over the interval are interpolated linearly inside the
    bucket holding the rank, like `histogram_quantile(q, increase(..._bucket))`;
    a rank in the +Inf bucket returns the highest finite bound.
    Columns: t, tier, target, count, q50, q95 (one per quantile, named q<100*q>).
    `where`: an extra SQL predicate on `ts`, as in `serving_intervals`.
    """
    check_tier(db, tier)
    for q in quantiles:
        if not 0 < q < 1:
            raise ValueError(f"quantiles must lie strictly between 0 and 1, got {q}")
    b = _bucket(interval_s)
    tier_filter = f"AND {TIER_SQL} = $tier" if tier is not None else ""
    tier_filter += f" AND ({where})"
    params: dict[str, object] = {"tier": tier} if tier is not None else {}
    sql = f"""
    SELECT {b} AS t, {TIER_SQL} AS tier, target,
        CAST(json_extract_string(labels, '$.le') AS DOUBLE) AS le, sum(increase) AS inc
    FROM clean.serving_increase
    WHERE metric = '{metric}_bucket' {tier_filter}
    GROUP BY ALL
    """
    long = db.sql(sql, params=params).pl()
    names = [f"q{round(q * 100):d}" for q in quantiles]
    if long.height == 0:
        raise NoServingData(f"no {metric}_bucket series in the lake")
    wide = long.pivot(on="le", index=["t", "tier", "target"], values="inc", sort_columns=False)
    les = sorted(float(c) for c in wide.columns if c not in ("t", "tier", "target"))
    cols = [
        c for le in les for c in wide.columns if c not in ("t", "tier", "target") and float(c) == le
    ]
    counts = wide.select(cols).fill_null(0.0).to_numpy()
    # Buckets are cumulative; enforce monotonicity against scrape skew.
    counts = np.maximum.accumulate(counts, axis=1)
    bounds = np.array(les)
    qs = bucket_quantiles(bounds, counts, quantiles)
    out = wide.select("t", "tier", "target").with_columns(count=pl.Series(counts[:, -1]))
    for name, col in zip(names, qs.T, strict=True):
        out = out.with_columns(pl.Series(name, col))
    return out.filter(pl.col("count") > 0).sort("tier", "target", "t")


def bucket_quantiles(
    bounds: np.ndarray, cumulative: np.ndarray, quantiles: tuple[float, ...]
) -> np.ndarray:
    """histogram_quantile over rows of cumulative bucket counts (last bound may be inf)."""
    total = cumulative[:, -1]
    finite = bounds[np.isfinite(bounds)]
    top = finite[-1] if finite.size else np.nan
    out = np.full((cumulative.shape[0], len(quantiles)), np.nan)
    for j, q in enumerate(quantiles):
        rank = q * total
        idx = np.array(
            [np.searchsorted(row, r, side="left") for row, r in zip(cumulative, rank, strict=True)]
        )
        idx = np.minimum(idx, len(bounds) - 1)
        upper = bounds[idx]
        lower = np.where(idx > 0, bounds[np.maximum(idx - 1, 0)], 0.0)
        c_hi = cumulative[np.arange(len(idx)), idx]
        c_lo = np.where(idx > 0, cumulative[np.arange(len(idx)), np.maximum(idx - 1, 0)], 0.0)
        width = np.where(c_hi - c_lo > 0, c_hi - c_lo, 1.0)
        val = lower + (upper - lower) * (rank - c_lo) / width
        val = np.where(np.isinf(upper), top, val)
        out[:, j] = np.where(total > 0, val, np.nan)
    return out
