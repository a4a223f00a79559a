"""Capacity and growth simulation with the four cost levers.

For each tier: the fitted throughput curve (finops.models.throughput) becomes
a per-replica service model; the continuous-batching simulation
(finops.models.queueing) finds, for c replicas behind one queue, the highest
Poisson arrival rate whose p95 TTFT meets the SLO (pooled over runs of thousands of
requests: near the SLO a short run's p95 is noise). The observed week's hourly
request counts (its diurnal shape), scaled by the growth factor and reshaped
by the levers, then say how many replicas each hour needs, each count checked by
simulating it at the highest rate it is planned for; GPU-hours x prices
from `ref.prices` give the cost per request. A replica costs the GPU-hours the cost
mart bills its pod per hour (whole GPUs, a MIG instance's slice share, a time-sliced
pod's share), so the plain 1x plan of a steady fleet costs what `finops costs` bills.
The observed period is the lake's latest whole ISO week unless one is given
(`load_trace(per=...)`); tiers without vLLM serving metrics are carried at their
observed cost, never silently dropped.

Assumptions, stated because they drive the numbers: arrivals within an hour
are Poisson at that hour's mean rate; request sizes are resampled from the
tier's observed requests, and requests routed to the smallest tier keep theirs (its
sample becomes a mixture of its own and the moved requests); a replica's service curve
is the one fitted at the tier's observed mean prompt/output lengths, scaled through the
fitted length coefficients where a lever changes them (a token cap's shorter prompts
never lower the ceiling; routed longer outputs and prompts may).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import math
import re
from dataclasses import asdict, dataclass, field, replace

import duckdb
import numpy as np
import polars as pl

from finops.costs import Period
from finops.models.data import (
    NoServingData,
    model_period,
    request_tier_sql,
    serving_intervals,
)
from finops.models.queueing import ServiceModel, simulate
from finops.models.throughput import fit_frame, fit_step_time
from finops.prices import PriceCatalogError, price_for

DEFAULT_SLO_TTFT_P95_MS = 1000.0
C_GRID = (1, 4, 16)
DEFAULT_MAX_NUM_SEQS = 256  # vLLM's default batch limit


@dataclass(frozen=True)
class Levers:
    """What-if settings; the defaults change nothing (the observed week as it ran).

    route_small_share: share of the requests on larger tiers moved to the smallest tier.
    cache_hit_rate: share of all requests answered by the response cache, the same share of
        every tier's requests each hour (None: as observed; 0: no hits).
    token_cap: cap on input tokens per request (context discipline; None: no cap).
    max_num_seqs: vLLM batch limit per replica (None: 256, vLLM's default); a lower limit
        trades throughput for decode speed.
    autoscale: replicas follow the hourly need (queue-depth autoscaling) instead of a
        fixed fleet: the observed fleet, grown to the week's peak need when that is larger.
    reserved_baseline: the always-on floor of the fleet is bought at the reserved price.
    spot_share: share of the GPU-hours above the floor bought as spot.
    """

    route_small_share: float = 0.0
    cache_hit_rate: float | None = None
    token_cap: int | None = None
    max_num_seqs: int | None = None
    autoscale: bool = False
    reserved_baseline: bool = False
    spot_share: float = 0.0

    def __post_init__(self) -> None:
        for name in ("route_small_share", "spot_share"):
            v = getattr(self, name)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {v}")
        if self.cache_hit_rate is not None and not 0.0 <= self.cache_hit_rate < 1.0:
            raise ValueError(f"cache_hit_rate must be in [0, 1), got {self.cache_hit_rate}")
        if self.token_cap is not None and self.token_cap < 1:
            raise ValueError(f"token_cap must be a positive number of tokens, got {self.token_cap}")
        if self.max_num_seqs is not None and self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")


@dataclass
class TierProfile:
    """Everything the simulation knows about one tier, read from the lake."""

    tier: str
    vmax: float  # fitted ceiling at the observed mean lengths, tokens/s per replica
    k: float
    hill: float
    length_coef: tuple[float, ...]  # fitted exponents for (mean_prompt, mean_output)
    length_ref: tuple[float, ...]
    prefill_tokens_per_s: float
    gpus_per_replica: float  # GPU-hours a replica is billed per hour (see _replica_footprint)
    gpu_model: str
    observed_replicas: int
    prompt_tokens: np.ndarray  # uncached prompt tokens of a sample of upstream requests
    output_tokens: np.ndarray
    hourly: pl.DataFrame  # hour, requests (all), upstream (reached vLLM)
    mape_holdout: float
    observed_batch: int  # p99 of running sequences per replica
    notes: list[str] = field(default_factory=list)
    curve_source: str = "tokens/s curve"  # what vmax/k were read from (see load_trace)
    model_name: str | None = None  # the model the tier serves (most common response_model)
    pricing_kind: str = "on_demand"  # how its GPUs are bought (deployment mapping / default)
    active_hours: list | None = None  # hours its GPUs reported (None: every trace hour)

    def service(self, levers: Levers, prompt: np.ndarray, output: np.ndarray) -> ServiceModel:
        """The per-replica service model under the levers' sizes and batch limit."""
        vmax = self.vmax
        if self.length_coef:
            now = np.array([max(prompt.mean(), 1.0), max(output.mean(), 1.0)])
            base = np.array(
                [max(self.prompt_tokens.mean(), 1.0), max(self.output_tokens.mean(), 1.0)]
            )
            # a shorter prompt never lowers the ceiling: clip the prompt exponent at 0
            coef = np.array(self.length_coef)
            coef[0] = min(coef[0], 0.0)
            vmax = vmax * float(np.exp(np.log(now / base) @ coef))
        b = levers.max_num_seqs or DEFAULT_MAX_NUM_SEQS
        return ServiceModel.from_curve(
            vmax, self.k, self.hill, max_num_seqs=b, prefill_tokens_per_s=self.prefill_tokens_per_s
        )


@dataclass(frozen=True)
class RoutedSizes:
    """The routing target's request sizes under a routing lever (`Simulator.routed_sizes`):
    a seeded mixture of its own requests and the requests moved to it, which keep their
    uncached prompt and output lengths. `weights`: each source tier's share of the mixture
    (its upstream calls on the target); `key`: the levers it depends on (share, cache)."""

    tier: str
    prompt: np.ndarray
    output: np.ndarray
    weights: dict[str, float]
    key: tuple


@dataclass
class Trace:
    """The observed traffic the simulation replays, plus the observed fleet.

    `unsimulated`: tiers of the period with requests or GPU cost but no vLLM serving
    metrics to fit (columns tier, requests, upstream, gpu_hours, cost_usd; a tier of
    None holds requests and GPUs of no tier). Their observed figures are carried into
    every plan's totals as they were (not grown, no levers), so the totals are the
    whole fleet's and never a silent subset; `notes` says so.

    `no_gpu`: tiers with vLLM serving metrics but no GPU samples in the period (columns
    tier, requests, upstream): nothing says what a replica holds or costs, so they are
    carried with their observed requests, no GPU-hours and an unknown cost; `notes`
    names each. `period_notes`: what the period's data leaves out (days without data).
    """

    profiles: dict[str, TierProfile]
    hours: list  # every hour of the period in which some GPU reported (datetime)
    total_requests: int
    observed_hit_rate: float
    prices: pl.DataFrame
    period: Period | None = None
    unsimulated: pl.DataFrame | None = None
    notes: list[str] = field(default_factory=list)
    no_gpu: pl.DataFrame | None = None
    period_notes: list[str] = field(default_factory=list)

    @property
    def tiers(self) -> list[str]:
        return list(self.profiles)


def _gpu_rows(db: duckdb.DuckDBPyConnection, per: Period) -> pl.DataFrame:
    """GPU-hours of the period from the cost mart (deployment mapping and pricing kind
    resolved, as `finops costs` bills them)."""
    import finops.costs as fc

    return fc._q(
        db,
        f"""
        SELECT hour, tier, namespace, pod, gpu_uuid, gpu_uuid || '/' || mig_instance AS device,
               gpu_model, pricing_kind, gpu_hours, gpu_cost
        FROM marts.gpu_cost_hourly WHERE {per.where()}
        """,
    )


def load_trace(
    db: duckdb.DuckDBPyConnection,
    *,
    interval_s: int = 300,
    sample: int = 20000,
    seed: int = 0,
    tiers: list[str] | None = None,
    per: Period | None = None,
) -> Trace:
    """Read one period (requests, serving metrics, GPU inventory, prices) and fit each tier.

    `per` defaults to the lake's latest whole ISO week (finops.costs.latest_whole_week),
    the week `finops simulate` and the weekly report plan from, so "the observed week" is
    a calendar week with traffic on all seven days: not the span from the oldest request
    ever ingested to the newest, and not the few days of a week still running. A tier's fleet is
    billed only for the hours its GPUs reported in the period.
    """
    import finops.costs as fc

    if not db.sql("SELECT count(*) FROM clean.requests").fetchall()[0][0]:  # type: ignore[index]
        raise NoServingData("the lake has no requests; the simulation replays the request log")
    # a hand-built Period inside an hour would bill whole GPU-hours for part of their
    # requests: refused, as every cost function refuses it
    per = fc._p(None, None, None, per) if per is not None else fc.period(fc.latest_whole_week(db))
    at = per.where("ts")
    n_req = db.sql(f"SELECT count(*) FROM clean.requests WHERE {at}").fetchall()[0][0]  # type: ignore[index]
    if not n_req:
        raise NoServingData(
            f"the lake has no requests in {per.label}; the simulation replays the request log"
        )
    try:
        intervals = serving_intervals(db, interval_s=interval_s, where=at)
    except NoServingData as e:
        raise NoServingData(f"{per.label}: {e}") from None
    served = sorted(t for t in intervals["tier"].unique().to_list() if t is not None)
    gpu = _gpu_rows(db, per)
    prices = db.sql("SELECT * FROM ref.prices").pl()
    req_tier = request_tier_sql()
    params = {"served": served}
    req = db.sql(
        f"""
        SELECT date_trunc('hour', ts) AS hour, {req_tier} AS tier,
               count(*) AS requests,
               count(*) FILTER (coalesce(cache_status, '') <> 'hit') AS upstream
        FROM clean.requests WHERE {at} GROUP BY ALL
        """,
        params=params,
    ).pl()
    served_model = dict(
        db.sql(
            f"""
            SELECT {req_tier} AS tier, mode(response_model)
            FROM clean.requests WHERE response_model IS NOT NULL AND {at} GROUP BY ALL
            """,
            params=params,
        ).fetchall()
    )
    hit = db.sql(
        "SELECT avg(CASE WHEN cache_status = 'hit' THEN 1.0 ELSE 0.0 END) "
        f"FROM clean.requests WHERE {at}"
    ).fetchall()[0][0]  # type: ignore[index]
    if tiers:
        unknown = [t for t in tiers if t not in served]
        if unknown:
            raise ValueError(
                f"unknown tier(s) {unknown}; the lake has serving metrics for {served}"
            )
    # requests reaching vLLM per tier, hour and busiest 5 minutes: how bursty arrivals are
    bursts = db.sql(
        f"""
        WITH b AS (
            SELECT {req_tier} AS tier, date_trunc('hour', ts) AS hour,
                   time_bucket(INTERVAL 5 MINUTE, ts) AS b, count(*) AS n
            FROM clean.requests WHERE {at} AND coalesce(cache_status, '') <> 'hit'
            GROUP BY ALL
        )
        SELECT tier, hour, CAST(sum(n) AS BIGINT) AS n, max(n) AS peak FROM b GROUP BY ALL
        """,
        params=params,
    ).pl()
    rng = np.random.default_rng(seed)
    profiles: dict[str, TierProfile] = {}
    no_gpu: list[str] = []  # tiers with serving metrics but no GPU samples in the period
    claimed: set[str] = set()  # devices (a GPU, or one MIG instance) a simulated tier prices
    for tier in tiers or served:
        fit = fit_frame(intervals, tier=tier)
        rows = intervals.filter(pl.col("tier") == tier)
        notes: list[str] = []
        sizes = db.sql(
            f"""
            SELECT greatest(coalesce(input_tokens, 0) - coalesce(cached_input_tokens, 0), 0) AS p,
                   coalesce(output_tokens, 0) AS o
            FROM clean.requests
            WHERE {req_tier} = $tier AND coalesce(cache_status, '') <> 'hit'
              AND coalesce(status_code, 200) < 400 AND {at}
            ORDER BY request_id  -- a seeded sample must see rows in the same order every run
            """,
            params={"tier": tier, **params},
        ).pl()
        if sizes.height == 0:
            raise NoServingData(
                f"tier {tier!r} has serving metrics but no requests in the log in {per.label}"
            )
        pick = rng.choice(sizes.height, min(sample, sizes.height), replace=False)
        prompt = sizes["p"].to_numpy()[pick].astype(float)
        output = sizes["o"].to_numpy()[pick].astype(float)
        max_load = float(rows["concurrency"].drop_nulls().max() or 0.0)
        prefill = _prefill_speed(rows)
        if math.isinf(prefill):
            notes.append("no prefill-time histogram: TTFT modelled as queueing delay only")
        # the tier's GPUs: those the cost mart gives this tier (label or deployment
        # mapping), else those of the pods its vLLM series came from
        inv_rows = gpu.filter(pl.col("tier") == tier)
        if inv_rows.height == 0:
            inv_rows = gpu.filter(pl.col("pod").is_in(rows["pod"].unique().to_list()))
        if inv_rows.height == 0:
            # no GPU samples: nothing says what a replica holds or costs; carried with its
            # observed requests and named (see _no_gpu), the other tiers still planned
            no_gpu.append(tier)
            continue
        claimed.update(inv_rows["device"].to_list())
        footprint, reps = _replica_footprint(inv_rows, f"tier {tier!r} in {per.label}")
        kinds = inv_rows["pricing_kind"].unique().sort().to_list()
        kind = str(inv_rows["pricing_kind"].mode().sort()[0])
        if len(kinds) > 1:
            notes.append(f"GPUs on several pricing kinds {kinds}: the fleet is priced as {kind}")
        active = inv_rows["hour"].unique().sort().to_list()
        tier_req = req.filter(pl.col("tier") == tier)
        outside = int(tier_req.filter(~pl.col("hour").is_in(active))["requests"].sum())
        if outside:
            notes.append(
                f"{outside} requests fell in hours with no GPU samples of this tier and are "
                "left out (the fleet is billed only for hours its GPUs reported)"
            )
        mean_p = float(rows["mean_prompt"].drop_nulls().mean() or 1.0)
        mean_o = float(rows["mean_output"].drop_nulls().mean() or 1.0)
        m = fit.model
        vmax = m.ceiling(np.array([mean_p, mean_o])) if len(m.coef_) == 2 else m.vmax_
        k, h, source = m.k_, m.hill_, "tokens/s curve"
        # Where vLLM reports its inter-token latency, the decode step time vs running
        # sequences pins the same curve more tightly (validated on a real server in
        # bench/bench_vllm_capacity_validation.py); the tokens/s fit keeps the length
        # coefficients, which scale this ceiling when a lever changes request sizes.
        with contextlib.suppress(NoServingData, ValueError):
            step = fit_step_time(rows)
            vmax, k, h, source = step.vmax_, step.k_, 1.0, "decode step time"
        if k > 2 * max_load:
            notes.append(
                f"throughput ceiling extrapolated: half-saturation at {k:.1f} "
                f"concurrent requests, the lake never saw more than {max_load:.1f}; capacity "
                "at high growth is uncertain until busier hours are observed"
            )
        burst = _burst_note(bursts.filter(pl.col("tier") == tier))
        if burst:
            notes.append(burst)
        # fit quality: a held-out error above 30%, windows set aside as counter glitches
        notes.extend(
            fit.quality_notes(capacity_from=None if source == "tokens/s curve" else source)
        )
        profiles[tier] = TierProfile(
            tier=tier,
            vmax=float(vmax),
            k=float(k),
            hill=float(h),
            length_coef=tuple(float(c) for c in m.coef_),
            length_ref=tuple(float(c) for c in m.covariate_ref_),
            prefill_tokens_per_s=prefill,
            gpus_per_replica=footprint,
            gpu_model=str(inv_rows["gpu_model"].mode().sort()[0]),
            observed_replicas=reps,
            prompt_tokens=prompt,
            output_tokens=output,
            hourly=tier_req.select("hour", "requests", "upstream"),
            mape_holdout=fit.mape_holdout,
            observed_batch=max(
                1, math.ceil(float(rows["running"].drop_nulls().quantile(0.99) or 1))
            ),
            notes=notes,
            curve_source=source,
            model_name=served_model.get(tier),
            pricing_kind=kind,
            active_hours=active,
        )
    bare, bare_notes = _no_gpu(req, no_gpu, per)
    if not profiles:
        raise NoServingData(" ".join(bare_notes))
    unsim, trace_notes = _unsimulated(req, gpu, set(profiles) | set(no_gpu), claimed)
    hours = sorted({h for p in profiles.values() for h in p.active_hours or []})
    return Trace(
        profiles, hours, int(n_req), float(hit or 0.0), prices, per, unsim,
        trace_notes + bare_notes, no_gpu=bare, period_notes=_days_seen(req, gpu, per),
    )  # fmt: skip


def _no_gpu(
    req: pl.DataFrame, tiers: list[str], per: Period
) -> tuple[pl.DataFrame | None, list[str]]:
    """Observed requests of the tiers with serving metrics but no GPU samples, and a note
    naming each with what is missing and how to add it."""
    if not tiers:
        return None, []
    out = (
        pl.DataFrame({"tier": tiers}, schema={"tier": pl.String})
        .join(
            req.filter(pl.col("tier").is_in(tiers))
            .group_by("tier")
            .agg(requests=pl.col("requests").sum(), upstream=pl.col("upstream").sum()),
            on="tier",
            how="left",
        )
        .with_columns(pl.col("requests", "upstream").fill_null(0).cast(pl.Float64))
    )
    notes = [
        f"tier {row['tier']!r} has vLLM serving metrics but no GPU samples in {per.label}"
        " (none whose tier label, deployment mapping or pod names it), so nothing says what"
        " a replica holds or costs: it is NOT simulated; its observed"
        f" {row['requests']:,.0f} requests are carried into the totals with no GPU-hours"
        " and an unknown cost (no growth, no levers; cost figures cover the other tiers"
        " only). To plan it, collect DCGM GPU samples from its nodes (`finops collect"
        " --dcgm`); --deployments maps sampled GPUs to tiers but cannot declare GPUs the"
        " lake never sampled"
        for row in out.iter_rows(named=True)
    ]
    return out, notes


BURST_MIN_REQUESTS = 120  # an hour's requests below which its 5-minute peak is mostly noise
BURST_EXCESS = 1.15  # observed peak over random arrivals' beyond which a note is due


def _burst_note(hours: pl.DataFrame) -> str | None:
    """A note when arrivals within the hour are burstier than the plan assumes.

    The plan sizes each hour for its mean rate with random (Poisson) arrivals; the
    busiest 5 minutes of an hour then run at a little over the mean (about 1.15x at a
    few hundred requests an hour). Retries, batch jobs and incidents make them run much
    higher, and those minutes queue past the SLO. Compared at the busiest hour, the one
    that sets the fleet, with random arrivals at the same rate (`hours`: columns hour,
    n = requests, peak = the busiest 5 minutes' requests).
    """
    busy = hours.filter(pl.col("n") >= BURST_MIN_REQUESTS)
    if busy.is_empty():
        return None
    draws = np.random.default_rng(0)

    def random_peak(n: float) -> float:  # the busiest 5 minutes over the mean, random arrivals
        return float(draws.poisson(n / 12, (2000, 12)).max(axis=1).mean() / (n / 12))

    top = busy.sort("n", descending=True).row(0, named=True)
    seen, expected = 12 * top["peak"] / top["n"], random_peak(top["n"])
    if seen <= BURST_EXCESS * expected:
        return None
    ratios = (12 * busy["peak"] / busy["n"]).to_numpy()
    med_n = float(busy["n"].median())  # type: ignore[arg-type]
    return (
        f"arrivals are burstier than the plan assumes: in the busiest hour "
        f"({top['hour']:%a %H:00} UTC) the busiest 5 minutes ran at {seen:.2f}x the hour's "
        f"mean rate, where random arrivals give {expected:.2f}x (median hour "
        f"{float(np.median(ratios)):.2f}x vs {random_peak(med_n):.2f}x); the plan sizes each "
        "hour for its mean rate with random arrivals, so such bursts queue past the SLO: "
        "keep headroom (plan for more growth than you expect, or autoscale on queue depth)"
    )


def _days_seen(req: pl.DataFrame, gpu: pl.DataFrame, per: Period) -> list[str]:
    """A note when the period's requests and GPU samples cover only some of its days
    (a lake of Mon and Tue planned as a whole week); none when every day has data."""
    if per.start is None or per.end is None:
        return []
    first, last = per.start.date(), (per.end - dt.timedelta(microseconds=1)).date()
    n_days = (last - first).days + 1
    seen = sorted(
        {h.date() for h in req["hour"].to_list() if h is not None}
        | {h.date() for h in gpu["hour"].to_list() if h is not None}
    )
    seen = [d for d in seen if first <= d <= last]
    if not seen or len(seen) >= n_days:
        return []
    runs: list[list[dt.date]] = []
    for d in seen:
        if runs and (d - runs[-1][-1]).days == 1:
            runs[-1].append(d)
        else:
            runs.append([d])
    name = (lambda d: d.strftime("%a")) if n_days <= 7 else (lambda d: d.isoformat())
    days = ", ".join(
        name(r[0]) if len(r) == 1 else f"{name(r[0])}\u2013{name(r[-1])}" for r in runs
    )
    week = re.fullmatch(r"\d{4}-W\d{2}", per.label or "") is not None
    return [
        f"{len(seen)} of {n_days} days of {per.label} seen: {days}"
        f" ({seen[0].isoformat()} to {seen[-1].isoformat()}); the plan's"
        f"{' weekly' if week else ''} totals cover those days only, and its cost per request"
        f" is theirs, not a whole {'week' if week else 'period'}'s"
        f" ({n_days - len(seen)} days without data)"
    ]


def _replica_footprint(inv: pl.DataFrame, who: str) -> tuple[float, int]:
    """GPU-hours one replica is billed per hour, and the observed fleet in replicas.

    A replica is a pod (GPU rows without a pod: one replica). The cost mart already gives
    each pod-hour its GPU-hours: whole GPUs, a MIG instance's share of its GPU by compute
    slices, a time-sliced pod's share; counting GPUs would bill a 3g.40gb instance or a
    shared GPU as a whole GPU per replica. The footprint is the median pod-hour, so a pod
    that held its GPUs for part of an hour (a restart) does not shrink it; the fleet is
    the busiest hour's GPU-hours in footprints, so neither rows nor a pod replaced
    mid-hour count as extra replicas. `who` names the tier in errors.
    """
    pod_hours = (
        inv.group_by("hour", "namespace", "pod")
        .agg(gpu_hours=pl.col("gpu_hours").sum())
        .filter(pl.col("gpu_hours") > 0)  # a MIG GPU's parent row carries none of its hour
    )
    if pod_hours.height == 0:
        raise NoServingData(
            f"{who}: its GPU rows in marts.gpu_cost_hourly carry no gpu_hours (only the "
            "parent rows of MIG GPUs?), so a replica has no GPU-hours to be priced by"
        )
    held = pod_hours.filter(pl.col("pod").is_not_null())
    held = held if held.height else pod_hours
    footprint = float(held["gpu_hours"].median())  # type: ignore[arg-type]
    per_hour = pod_hours.group_by("hour").agg(pl.col("gpu_hours").sum())["gpu_hours"]
    peak = float(per_hour.max())  # type: ignore[arg-type]
    return footprint, max(1, math.ceil(round(peak / footprint, 6)))


def _unsimulated(
    req: pl.DataFrame, gpu: pl.DataFrame, simulated: set[str], claimed: set[str]
) -> tuple[pl.DataFrame, list[str]]:
    """Observed requests and GPU cost of what the simulation cannot model (no vLLM
    serving metrics), per tier, and a note naming each such tier."""
    r = (
        req.filter(~pl.col("tier").is_in(list(simulated)) | pl.col("tier").is_null())
        .group_by("tier")
        .agg(requests=pl.col("requests").sum(), upstream=pl.col("upstream").sum())
    )
    g = (
        gpu.filter(~pl.col("device").is_in(list(claimed)))
        .group_by("tier")
        .agg(
            gpu_hours=pl.col("gpu_hours").sum(),
            cost_usd=pl.col("gpu_cost").sum(),
            unpriced=pl.col("gpu_cost").is_null().sum(),
        )
    )
    out = (
        r.join(g, on="tier", how="full", coalesce=True, nulls_equal=True)
        .with_columns(
            pl.col("requests", "upstream").fill_null(0).cast(pl.Float64),
            pl.col("gpu_hours", "cost_usd").fill_null(0.0),
            pl.col("unpriced").fill_null(0),
        )
        .sort("tier", nulls_last=True)
    )
    notes = []
    for row in out.iter_rows(named=True):
        who = f"tier {row['tier']!r}" if row["tier"] is not None else "requests/GPUs of no tier"
        notes.append(
            f"{who} has no vLLM serving metrics and is NOT simulated: its observed "
            f"{row['requests']:,.0f} requests and {row['gpu_hours']:,.1f} GPU-h "
            f"(${row['cost_usd']:,.2f}) are carried into the totals as observed "
            "(no growth, no levers)"
            + (f"; {row['unpriced']} of its GPU-hours have no price" if row["unpriced"] else "")
        )
    return out.drop("unpriced"), notes


def _observed_batch(rows: pl.DataFrame) -> int:
    """p99 of running sequences per replica (gauges; else Little's-law concurrency)."""
    col = rows["running"].drop_nulls()
    if col.len() == 0:
        col = rows["concurrency"].drop_nulls()
    return max(1, math.ceil(float(col.quantile(0.99) or 1.0)))


def _prefill_speed(rows: pl.DataFrame) -> float:
    """Prompt tokens/s of prefill at low load (lowest quartile of running sequences)."""
    r = rows.drop_nulls(["prefill_s_per_request", "mean_prompt", "running"]).filter(
        pl.col("prefill_s_per_request") > 0
    )
    if r.height == 0:
        return math.inf
    low = r.filter(pl.col("running") <= r["running"].quantile(0.25))
    low = low if low.height else r
    return float((low["mean_prompt"] / low["prefill_s_per_request"]).median())


# ----------------------------------------------------------------------------- capacity

SEARCH_RUNS = 3  # independent arrival/size draws pooled into each p95 estimate


def _requests_per_run(replicas: int) -> int:
    """Requests per simulated run. Near the SLO one run's p95 swings by about 4% at 5,000
    requests (more at the 2,000 of earlier versions, which moved the searched rate by 15%
    or more); pooling SEARCH_RUNS such runs brings it to about 2%."""
    return int(min(8000, 5000 + 1000 * replicas))


class TtftProbe:
    """p95 TTFT (s) of `replicas` behind one queue at a Poisson rate, pooled over `runs`
    independent runs of `n_requests` each (the first 20% of each run is warm-up).

    Common random numbers: each run's unit-rate arrivals and sampled sizes are drawn once
    and time-scaled, so the estimate is a smooth function of the rate and two rates are
    compared on the same requests. Results are cached per rate.
    """

    def __init__(
        self,
        service: ServiceModel,
        prompt: np.ndarray,
        output: np.ndarray,
        *,
        replicas: int,
        n_requests: int | None = None,
        runs: int = SEARCH_RUNS,
        seed: int = 0,
    ) -> None:
        if runs < 1:
            raise ValueError(f"runs must be >= 1, got {runs}")
        n = n_requests or _requests_per_run(replicas)
        self.service, self.replicas, self.n = service, replicas, n
        self.draws = []
        for r in range(runs):
            # draws differ by replica count too: one lucky arrival sequence shared by every
            # count would bias the whole curve the same way
            rng = np.random.default_rng([seed, replicas, r])
            base = np.cumsum(rng.exponential(1.0, n))
            pick = rng.integers(0, len(output), n)
            self.draws.append((base, prompt[pick], output[pick]))
        mean_o = max(float(np.mean([d[2].mean() for d in self.draws])), 1e-9)
        self.saturation_rps = replicas * service.saturation_tokens_per_s() / mean_o
        self._seen: dict[float, float] = {}

    def __call__(self, rate: float) -> float:
        if rate not in self._seen:
            ttft = [
                simulate(b / rate, o, self.service, replicas=self.replicas, prompt_tokens=p).ttft_s[
                    int(self.n * 0.2) :
                ]
                for b, p, o in self.draws
            ]
            self._seen[rate] = float(np.quantile(np.concatenate(ttft), 0.95))
        return self._seen[rate]


def _refine(
    probe: TtftProbe,
    slo_s: float,
    start: float,
    *,
    floor: float,
    top: float,
    step: float = 1.1,
    rel_tol: float = 0.025,
) -> float:
    """Highest rate in [floor, top] whose probed p95 meets `slo_s`, searched from `start`:
    widening steps until the SLO boundary is bracketed, then bisection in log rate to
    `rel_tol`. 0.0 when even `floor` misses the SLO."""
    r = min(max(start, floor), top)
    if probe(r) <= slo_s:
        ok = r
        while True:
            if ok >= top:
                return top
            r = min(ok * step, top)
            if probe(r) > slo_s:
                bad = r
                break
            ok, step = r, step * step
    else:
        bad = r
        while True:
            if bad <= floor:
                return 0.0
            r = max(bad / step, floor)
            if probe(r) <= slo_s:
                ok = r
                break
            bad, step = r, step * step
    while bad / ok > 1 + rel_tol:
        mid = math.sqrt(ok * bad)
        if probe(mid) <= slo_s:
            ok = mid
        else:
            bad = mid
    return ok


def max_rate_for_slo(
    service: ServiceModel,
    prompt: np.ndarray,
    output: np.ndarray,
    *,
    replicas: int,
    slo_ttft_p95_s: float,
    n_requests: int | None = None,
    seed: int = 0,
    steps: int = 8,
    runs: int = SEARCH_RUNS,
    probe: TtftProbe | None = None,
) -> float:
    """Highest Poisson rate (req/s) at which p95 TTFT stays within the SLO.

    A coarse bisection on one short run finds the neighbourhood; the answer is then
    bracketed and refined to 2.5% on `probe` (default: `runs` pooled runs of `n_requests`),
    because one short run's p95 near the SLO is too noisy to plan replicas on.
    """
    probe = probe or TtftProbe(
        service, prompt, output, replicas=replicas, n_requests=n_requests, runs=runs, seed=seed
    )
    coarse = TtftProbe(
        service, prompt, output, replicas=replicas, n_requests=int(min(8000, 2000 + 400 * replicas)),
        runs=1, seed=seed + 1,
    )  # fmt: skip
    hi = probe.saturation_rps
    floor, top = hi * 1e-3, hi * 0.999
    lo, start = floor, floor
    if coarse(floor) <= slo_ttft_p95_s:
        if coarse(top) <= slo_ttft_p95_s:
            start = top
        else:
            for _ in range(steps):
                mid = math.sqrt(lo * hi) if hi / lo > 4 else 0.5 * (lo + hi)
                if coarse(mid) <= slo_ttft_p95_s:
                    lo = mid
                else:
                    hi = mid
            start = lo
    return _refine(probe, slo_ttft_p95_s, start, floor=floor, top=top)


@dataclass
class CapacityCurve:
    """Sustainable req/s per replica for c replicas (interpolated in log c).

    `raw`: the searched values before they were made monotone (see capacity_curve)."""

    c: np.ndarray
    per_replica: np.ndarray
    raw: np.ndarray | None = None

    def capacity(self, c: int) -> float:
        pr = float(np.interp(math.log(c), np.log(self.c), self.per_replica))
        return c * pr

    def min_feasible(self) -> int:
        """The fewest replicas known to meet the SLO at some load: a count whose
        simulated capacity is 0 (p95 TTFT over the SLO even when idle) never serves."""
        ok = np.flatnonzero(self.per_replica > 0)
        if ok.size == 0:
            raise ValueError("no replica count meets the SLO at any load")
        return int(self.c[ok[0]])

    def replicas_for(self, rate: float, min_replicas: int = 1) -> int:
        if rate <= 0:
            return min_replicas
        c = max(min_replicas, self.min_feasible(), math.floor(rate / self.per_replica.max()))
        while self.capacity(c) < rate:
            c += 1
        return c


def conservative_per_replica(per: np.ndarray) -> np.ndarray:
    """Searched per-replica capacities made non-increasing towards fewer replicas (one queue
    over more replicas never serves less per replica), conservatively: each value is
    lowered to the smallest at any larger count, so a lucky high value at a small count is
    never carried up to larger ones. A zero after a feasible count is sampling noise in the
    idle p95 (it does not depend on the count) and takes the smallest feasible value."""
    per = np.asarray(per, float).copy()
    ok = np.flatnonzero(per > 0)
    if ok.size:
        tail = per[ok[0] :]
        tail[tail <= 0] = tail[tail > 0].min()
        per[ok[0] :] = np.minimum.accumulate(tail[::-1])[::-1]
    return per


def capacity_curve(
    service: ServiceModel,
    prompt: np.ndarray,
    output: np.ndarray,
    slo_ttft_p95_s: float,
    *,
    c_grid: tuple[int, ...] = C_GRID,
    seed: int = 0,
    probes: dict[int, TtftProbe] | None = None,
) -> CapacityCurve:
    """Per-replica SLO capacity at each count of `c_grid` (`probes`: the p95 estimators
    to search on, by count; default one per count from `seed`)."""
    probes = probes or {}
    raw = np.array(
        [
            max_rate_for_slo(
                service, prompt, output, replicas=c, slo_ttft_p95_s=slo_ttft_p95_s, seed=seed,
                probe=probes.get(c),
            ) / c
            for c in c_grid
        ]
    )  # fmt: skip
    return CapacityCurve(np.array(c_grid, float), conservative_per_replica(raw), raw)


# ----------------------------------------------------------------------------- growth plan


@dataclass
class Plan:
    """A capacity plan: per tier per hour replicas, and the week's totals.

    `idle_share` (in `tiers` and `totals`) is *simulated* idle: 1 - the modelled busy
    time, each hour's planned arrival rate over what the replicas serve at the
    saturation of their fitted service curve (`hourly.util`). It is not the measured
    idle of `finops costs` (1 - SM activity, or GPU_UTIL, from DCGM): a lightly loaded
    replica runs kernels on every decode step, so its SMs are active far more of the
    time than its share of the throughput ceiling; the simulated share is usually the
    higher of the two.
    """

    growth: float
    levers: Levers
    slo_ttft_p95_ms: float
    hourly: pl.DataFrame  # hour, tier, rate_rps, replicas, gpus, util
    tiers: pl.DataFrame  # per tier totals
    totals: dict[str, float]
    notes: list[str] = field(default_factory=list)  # levers that changed nothing, and why

    def cost_per_1k(self) -> float:
        return self.totals["cost_per_1k_requests"]


class Simulator:
    """Plans capacity for growth factors and lever settings over one observed trace.

    Capacity curves are cached per (tier, sizes, batch limit), where the sizes are the
    token cap and, on the routing target, the routing settings, so a growth table
    over 1x..10x costs one set of simulations per lever setting. The curve is
    interpolated between a few replica counts; every count a plan picks is then
    simulated directly at the curve's rate for it (`capacity`), and the plan adds
    replicas where that misses the SLO.
    """

    def __init__(
        self,
        trace: Trace,
        *,
        slo_ttft_p95_ms: float | None = None,
        seed: int = 0,
        c_grid: tuple[int, ...] = C_GRID,
    ) -> None:
        if slo_ttft_p95_ms is not None and not slo_ttft_p95_ms > 0:
            raise ValueError(f"slo_ttft_p95_ms must be positive, got {slo_ttft_p95_ms}")
        self.trace = trace
        self.explicit_slo = slo_ttft_p95_ms is not None
        self.slo_ttft_p95_ms = float(slo_ttft_p95_ms or DEFAULT_SLO_TTFT_P95_MS)
        self.tier_slo_ms: dict[str, float] = {}
        self.seed = seed
        self.c_grid = c_grid
        self._curves: dict[tuple, CapacityCurve] = {}
        self._probes: dict[tuple, TtftProbe] = {}
        self._capacity: dict[tuple, float] = {}
        self._mixes: dict[tuple, RoutedSizes] = {}

    @classmethod
    def from_lake(
        cls,
        db: duckdb.DuckDBPyConnection,
        *,
        week: str | None = None,
        start: str | dt.date | None = None,
        end: str | dt.date | None = None,
        per: Period | None = None,
        **kw: object,
    ) -> Simulator:
        """Simulator over one period of the lake, named as `finops.costs` names it
        (`week="2026-W47"`, `start`/`end` dates, or a `Period` as `per`); nothing given:
        the lake's latest whole ISO week, the week `finops simulate` plans from."""
        return cls(load_trace(db, per=_sim_period(week, start, end, per)), **kw)  # type: ignore[arg-type]

    def smallest_tier(self) -> str:
        """The cheapest tier per replica-hour (the routing target).

        Tiers on the same GPUs cost the same per replica-hour; the tie goes to the
        smaller model (parameter count in the served model's name), then the tier
        name, so the target never depends on dict order. Where a tier's GPUs have no
        on-demand price, prices cannot rank the tiers: the smaller model is the target."""
        gaps = self.price_gaps("on_demand")
        return min(
            self.trace.profiles.values(),
            key=lambda p: (
                0.0 if gaps else round(self._price(p, "on_demand") * p.gpus_per_replica, 9),
                model_size_b(p.model_name),
                p.tier,
            ),
        ).tier

    def price_gaps(self, kind: str | None = None) -> dict[str, str]:
        """Simulated tiers whose GPUs the price list has no price for (tier -> why), for
        the way each tier's GPUs are bought (`kind`: one pricing kind for every tier).

        Such a tier is still planned (replicas, GPU-hours); its cost is unknown (None),
        and a plan's cost totals and cost per request cover the priced tiers only."""
        gaps = {}
        for t, p in self.trace.profiles.items():
            try:
                self._price(p, kind or p.pricing_kind)
            except PriceCatalogError as e:
                gaps[t] = str(e)
        return gaps

    def _price(self, p: TierProfile, kind: str, lever: str | None = None) -> float:
        try:
            return price_for(self.trace.prices, p.gpu_model, kind)
        except PriceCatalogError as e:
            if lever is None:
                raise
            raise PriceCatalogError(f"tier {p.tier!r}: {lever} needs a {kind} price: {e}") from None

    def routed_sizes(self, levers: Levers) -> RoutedSizes | None:
        """The smallest tier's request sizes once routing lands other tiers' requests on it
        (None when the levers route nothing).

        Routed requests keep their prompt and output lengths, so the tier's sample becomes a
        mixture: its own requests and each other tier's moved ones, in proportion to the
        upstream calls each brings over the period (after the cache lever, as
        `hourly_rates` moves them; growth cancels). The draw is seeded, so plans repeat; the
        other tiers lose a random share and keep their own size distribution."""
        share = levers.route_small_share
        if share <= 0 or len(self.trace.profiles) < 2:
            return None
        key = (share, levers.cache_hit_rate)
        if key not in self._mixes:
            small = self.smallest_tier()
            plain = self.hourly_rates(1.0, replace(levers, route_small_share=0.0))
            up = dict(plain.group_by("tier").agg(pl.col("upstream").sum()).rows())
            profiles = self.trace.profiles
            weights = {t: up.get(t, 0.0) * (1.0 if t == small else share) for t in profiles}
            total = sum(weights.values())
            if total <= 0:  # no upstream calls anywhere: nothing moves, the sample stays
                weights, total = {small: 1.0}, 1.0
            n = max(len(p.prompt_tokens) for p in profiles.values())
            # counts by largest remainder, so the mixture holds each source's exact share
            raw = {t: n * w / total for t, w in weights.items()}
            counts = {t: math.floor(x) for t, x in raw.items()}
            for t in sorted(raw, key=lambda t: counts[t] - raw[t])[: n - sum(counts.values())]:
                counts[t] += 1
            rng = np.random.default_rng([self.seed, 1])
            parts = []
            for t, k in counts.items():
                p = profiles[t]
                if k and len(p.prompt_tokens):
                    pick = rng.choice(len(p.prompt_tokens), k, replace=k > len(p.prompt_tokens))
                    parts.append((p.prompt_tokens[pick], p.output_tokens[pick]))
            self._mixes[key] = RoutedSizes(
                small,
                np.concatenate([a for a, _ in parts]),
                np.concatenate([b for _, b in parts]),
                {t: w / total for t, w in weights.items()},
                key,
            )
        return self._mixes[key]

    def _routed_to(self, tier: str, levers: Levers) -> RoutedSizes | None:
        mix = self.routed_sizes(levers)
        return mix if mix is not None and mix.tier == tier else None

    def _key(self, tier: str, levers: Levers, *more: int) -> tuple:
        """Cache key of everything searched on a tier's sizes and batch limit: the plain
        sample's key is (tier, token_cap, max_num_seqs, *more); a routed mixture adds its
        routing settings, so a plan with routing never reuses the plain sample's entries."""
        mix = self._routed_to(tier, levers)
        return (
            tier,
            levers.token_cap,
            levers.max_num_seqs,
            *more,
            *([("routed", *mix.key)] if mix else []),
        )

    def _sizes(self, p: TierProfile, levers: Levers) -> tuple[np.ndarray, np.ndarray]:
        """Uncached prompt and output tokens the tier serves under the levers: its own
        sample, or the routed mixture on the routing target, capped by the token cap."""
        mix = self._routed_to(p.tier, levers)
        prompt, output = (mix.prompt, mix.output) if mix else (p.prompt_tokens, p.output_tokens)
        if levers.token_cap is not None:
            prompt = np.minimum(prompt, levers.token_cap)
        return prompt, output

    def _probe(self, tier: str, levers: Levers, replicas: int) -> TtftProbe:
        """The p95 TTFT estimator of `replicas` of the tier under the levers' sizes and
        batch limit; the curve's search and the direct check of a count share it."""
        key = self._key(tier, levers, replicas)
        if key not in self._probes:
            p = self.trace.profiles[tier]
            prompt, output = self._sizes(p, levers)
            svc = p.service(levers, prompt, output)
            self._probes[key] = TtftProbe(svc, prompt, output, replicas=replicas, seed=self.seed)
        return self._probes[key]

    def curve(self, tier: str, levers: Levers) -> CapacityCurve:
        p = self.trace.profiles[tier]
        prompt, output = self._sizes(p, levers)
        key = self._key(tier, levers)
        if key not in self._curves:
            svc = p.service(levers, prompt, output)
            slo = self.slo_for(tier)
            curve = capacity_curve(
                svc,
                prompt,
                output,
                slo / 1000.0,
                c_grid=self.c_grid,
                seed=self.seed,
                probes={c: self._probe(tier, levers, c) for c in self.c_grid},
            )
            if curve.per_replica.max() <= 0:
                why = self._routing_why(tier, levers)
                raise ValueError(
                    f"tier {tier!r}: no replica count meets p95 TTFT <= {slo:g} ms even at"
                    " near-zero load"
                    + (
                        f": {why}"
                        if why
                        else f" (unloaded p95 prefill is {self.ttft_floor_ms(tier):.0f} ms);"
                        " relax --slo-ttft-p95-ms"
                    )
                )
            self._curves[key] = curve
        return self._curves[key]

    def capacity(self, tier: str, levers: Levers, replicas: int) -> float:
        """Req/s `replicas` of the tier serve within its p95 TTFT SLO, checked directly.

        The curve's rate for the count is simulated on that count; where the p95 there
        misses the SLO (the curve interpolates between a few counts, and its points are
        estimates), the count's own highest rate meeting it is searched below it."""
        key = self._key(tier, levers, replicas)
        if key not in self._capacity:
            claim = self.curve(tier, levers).capacity(replicas)
            probe = self._probe(tier, levers, replicas)
            slo = self.slo_for(tier) / 1000.0
            cap = claim
            if claim > 0 and probe(claim) > slo:
                cap = _refine(probe, slo, claim, floor=probe.saturation_rps * 1e-3, top=claim)
            self._capacity[key] = cap
        return self._capacity[key]

    def replicas_for(self, tier: str, levers: Levers, rate: float) -> int:
        """The fewest replicas, from the curve's count up, whose directly checked capacity
        (`capacity`) covers `rate` within the tier's p95 TTFT SLO."""
        curve = self.curve(tier, levers)
        c = curve.replicas_for(rate)
        if rate <= 0:
            return c
        limit = 4 * c + 16
        while self.capacity(tier, levers, c) < rate:
            c += 1
            if c > limit:
                raise ValueError(
                    f"tier {tier!r}: no replica count up to {limit} simulates {rate:.3g} req/s"
                    f" within p95 TTFT <= {self.slo_for(tier):g} ms"
                    + (f": {why}" if (why := self._routing_why(tier, levers)) else "")
                )
        return c

    def _routing_why(self, tier: str, levers: Levers) -> str:
        """Why the SLO fails on the routing target, for errors ('' where routing moves
        nothing onto the tier): routed requests bring their prompts, and the SLO stays the
        one set by the tier's own requests."""
        if self._routed_to(tier, levers) is None:
            return ""
        prompt, _ = self._sizes(self.trace.profiles[tier], levers)
        return (
            f"the routing lever (--route-small-share {levers.route_small_share:g}) moves larger"
            " tiers' requests here with their own prompts, and their prefill on this tier puts"
            f" its unloaded p95 TTFT at {self.ttft_floor_ms(tier, prompt):.0f} ms (its own"
            f" requests': {self.ttft_floor_ms(tier):.0f} ms); lower the routed share, cap"
            " prompts (--token-cap) or relax --slo-ttft-p95-ms"
        )

    def ttft_floor_ms(self, tier: str, prompt: np.ndarray | None = None) -> float:
        """p95 TTFT of an idle replica: prefill of the tier's observed prompts (or of
        `prompt`, e.g. the routed mixture's)."""
        p = self.trace.profiles[tier]
        if math.isinf(p.prefill_tokens_per_s):
            return 0.0
        prompt = p.prompt_tokens if prompt is None else prompt
        return 1000.0 * float(np.quantile(prompt, 0.95)) / p.prefill_tokens_per_s

    def slo_for(self, tier: str) -> float:
        """The tier's p95 TTFT SLO in ms.

        An explicit SLO applies to every tier as given. The default is 1 s, raised
        to 1.5x the tier's unloaded p95 prefill time where long prompts (RAG,
        summarisation) make 1 s impossible on any number of replicas; the plan's
        notes say so.
        """
        if tier not in self.tier_slo_ms:
            slo = self.slo_ttft_p95_ms
            floor = self.ttft_floor_ms(tier)
            if not self.explicit_slo and floor * 1.2 > slo:
                slo = 1.5 * floor
                self.trace.profiles[tier].notes.append(
                    f"default SLO raised to {slo:.0f} ms p95 TTFT: unloaded p95 prefill of "
                    f"this tier's prompts is {floor:.0f} ms"
                )
            self.tier_slo_ms[tier] = slo
        return self.tier_slo_ms[tier]

    def hourly_rates(self, growth: float, levers: Levers) -> pl.DataFrame:
        """Upstream req/s per tier per hour after growth, cache and routing levers."""
        if not growth > 0 or not math.isfinite(growth):
            raise ValueError(f"growth must be a positive factor (e.g. 5 for 5x), got {growth}")
        tr = self.trace
        frames = []
        for tier, p in tr.profiles.items():
            # a tier's fleet exists in the hours its GPUs reported, never in a phantom hour
            hours = p.active_hours if p.active_hours is not None else tr.hours
            grid = pl.DataFrame({"hour": hours}, schema={"hour": pl.Datetime("us", "UTC")})
            h = p.hourly.with_columns(pl.col("hour").dt.cast_time_unit("us"))
            frames.append(
                grid.join(h, on="hour", how="left").fill_null(0).with_columns(tier=pl.lit(tier))
            )
        df = pl.concat(frames).with_columns(
            requests=pl.col("requests").cast(pl.Float64) * growth,
            upstream=pl.col("upstream").cast(pl.Float64) * growth,
        )
        if levers.cache_hit_rate is not None:
            # the cache answers that share of every tier-hour's requests, so the simulated
            # hit rate is the one asked for (0: no hits); scaling the observed misses by one
            # ratio and capping at each tier's requests lost the excess of low-hit tiers
            df = df.with_columns(upstream=pl.col("requests") * (1 - levers.cache_hit_rate))
        if levers.route_small_share > 0 and len(tr.profiles) > 1:
            # the routed requests move to the small tier, counted there as requests too
            # (a tier's requests and its upstream calls stay the same requests)
            small, share = self.smallest_tier(), levers.route_small_share
            moved = (
                df.filter(pl.col("tier") != small)
                .group_by("hour")
                .agg(
                    moved=(pl.col("upstream") * share).sum(),
                    moved_req=(pl.col("requests") * share).sum(),
                )
            )
            df = (
                df.join(moved, on="hour", how="left")
                .with_columns(
                    pl.when(pl.col("tier") == small)
                    .then(pl.col(c) + pl.col(m).fill_null(0))
                    .otherwise(pl.col(c) * (1 - share))
                    .alias(c)
                    for c, m in (("upstream", "moved"), ("requests", "moved_req"))
                )
                .drop("moved", "moved_req")
            )
        return df.with_columns(rate_rps=pl.col("upstream") / 3600.0).sort("tier", "hour")

    def plan(self, growth: float = 1.0, levers: Levers | None = None) -> Plan:
        """Replicas per tier per hour meeting the SLO, GPU-hours, cost per request."""
        levers = levers or Levers()
        rates = self.hourly_rates(growth, levers)
        rows = []
        tier_rows = []
        total_cost = total_gpu_h = busy_gpu_h = total_burst_h = 0.0
        gaps = self.price_gaps()  # tiers planned with an unknown cost
        unpriced_req = 0.0
        # a batch limit that changes no hour's replicas is named (see _lever_notes)
        same_reps = levers.max_num_seqs is not None
        for tier, p in self.trace.profiles.items():
            curve = self.curve(tier, levers)
            prompt, output = self._sizes(p, levers)
            svc = p.service(levers, prompt, output)
            sat_rps = svc.saturation_tokens_per_s() / max(float(output.mean()), 1e-9)
            r = rates.filter(pl.col("tier") == tier)
            need = [self.replicas_for(tier, levers, x) for x in r["rate_rps"].to_list()]
            fixed = max(max(need), p.observed_replicas)
            reps = need if levers.autoscale else [fixed] * len(need)
            if same_reps:
                base = replace(levers, max_num_seqs=None)
                was = [self.replicas_for(tier, base, x) for x in r["rate_rps"]]
                was = was if levers.autoscale else [max(max(was), p.observed_replicas)] * len(was)
                same_reps = reps == was
            util = [min(x / (c * sat_rps), 1.0) for x, c in zip(r["rate_rps"], reps, strict=True)]
            g = p.gpus_per_replica
            gpu_h = float(sum(reps) * g)
            floor_h = float(min(reps) * g * len(reps))
            burst_h = gpu_h - floor_h
            # reserved/spot prices are needed only by the levers that buy them, so an
            # on-demand-only catalog still plans the plain fleet; with no lever the fleet
            # is bought the way its GPUs are (deployment mapping, else on demand)
            cost = None  # unknown where the price list has no price for its GPUs
            if tier in gaps:
                unpriced_req += float(r["requests"].sum())
            else:
                od = self._price(p, p.pricing_kind)
                rsv = (
                    self._price(p, "reserved", "--reserved-baseline")
                    if levers.reserved_baseline
                    else od
                )
                spot = self._price(p, "spot", "--spot-share") if levers.spot_share > 0 else od
                floor_price = rsv if levers.reserved_baseline else od
                cost = floor_h * floor_price + burst_h * (
                    levers.spot_share * spot + (1 - levers.spot_share) * od
                )
                total_cost += cost
            busy = float(sum(u * c * g for u, c in zip(util, reps, strict=True)))
            total_burst_h += burst_h
            total_gpu_h += gpu_h
            busy_gpu_h += busy
            rows.append(
                r.select("hour", "tier", "rate_rps").with_columns(
                    replicas=pl.Series(reps),
                    needed=pl.Series(need),
                    gpus=pl.Series([c * g for c in reps]),
                    util=pl.Series(util),
                )
            )
            tier_rows.append(
                {
                    "tier": tier,
                    "requests": float(r["requests"].sum()),
                    "upstream": float(r["upstream"].sum()),
                    "peak_replicas": max(reps),
                    # what the SLO needs at the busiest hour; a fixed fleet keeps at least
                    # the observed replicas, so peak_replicas may be above it
                    "needed_peak_replicas": max(need),
                    "observed_replicas": p.observed_replicas,
                    "gpus_per_replica": g,
                    "gpu_hours": gpu_h,
                    # simulated idle: 1 - modelled busy time (rate / saturation rate of the
                    # fitted service curve), not the measured SM-activity idle of finops costs
                    "idle_share": 1 - busy / gpu_h if gpu_h else 0.0,
                    "cost_usd": cost,
                    "max_num_seqs": svc.max_num_seqs,
                    "slo_ttft_p95_ms": self.slo_for(tier),
                    "replica_capacity_rps": curve.per_replica.max(),
                    # how far to trust that capacity: the curve it came from, and the
                    # tokens/s fit's held-out error
                    "curve_source": p.curve_source,
                    "fit_mape_holdout_pct": round(100 * p.mape_holdout, 2),
                    "simulated": True,
                }
            )
        requests = float(rates["requests"].sum())
        idle = 1 - busy_gpu_h / total_gpu_h if total_gpu_h else 0.0
        un = self.trace.unsimulated
        un_req = un_gpu_h = un_cost = 0.0
        if un is not None and un.height:
            # tiers without serving metrics: carried as observed, so totals are the fleet's
            un_req, un_gpu_h = float(un["requests"].sum()), float(un["gpu_hours"].sum())
            un_cost = float(un["cost_usd"].sum())
            for row in un.iter_rows(named=True):
                tier_rows.append({"tier": row["tier"], "requests": row["requests"],
                                  "upstream": row["upstream"], "gpu_hours": row["gpu_hours"],
                                  "cost_usd": row["cost_usd"], "simulated": False})  # fmt: skip
        bare = self.trace.no_gpu
        if bare is not None and bare.height:
            # tiers without GPU samples: their requests are the fleet's, their cost unknown
            for row in bare.iter_rows(named=True):
                tier_rows.append({"tier": row["tier"], "requests": row["requests"],
                                  "upstream": row["upstream"], "gpu_hours": None,
                                  "cost_usd": None, "simulated": False})  # fmt: skip
            un_req += float(bare["requests"].sum())
            unpriced_req += float(bare["requests"].sum())
        requests += un_req
        total_gpu_h += un_gpu_h
        total_cost += un_cost
        per_1k = 1000 * total_cost / requests if requests else math.nan
        if gaps or unpriced_req:
            # cost figures of the priced tiers only: an unknown cost is no $0
            priced = requests - unpriced_req
            per_1k = 1000 * total_cost / priced if priced > 0 else math.nan
            if len(gaps) == len(self.trace.profiles) and not (un is not None and un.height):
                total_cost = math.nan
        totals = {
            "growth": growth,
            "requests": requests,
            "gpu_hours": total_gpu_h,
            "cost_usd": total_cost,
            "cost_per_1k_requests": per_1k,
            # simulated (modelled busy time, see Plan), of the simulated tiers' GPU-hours
            "idle_share": idle,
            "unsimulated_requests": un_req,
            "unsimulated_gpu_hours": un_gpu_h,
            "unsimulated_cost_usd": un_cost,
        }
        if gaps or unpriced_req:
            totals["unpriced_requests"] = unpriced_req  # left out of cost_per_1k_requests
        return Plan(
            growth,
            levers,
            self.slo_ttft_p95_ms,
            pl.concat(rows),
            pl.from_dicts(tier_rows, infer_schema_length=None),
            totals,
            [
                *self.trace.period_notes,
                *self._price_notes(gaps),
                *self._lever_notes(levers, total_burst_h, same_reps=same_reps),
            ],
        )

    def data_notes(self) -> list[str]:
        """What every plan of this trace leaves out, as its notes say: days of the period
        without data, tiers whose cost is unknown (no price, no GPU samples)."""
        return [*self.trace.period_notes, *self._price_notes(self.price_gaps())]

    def _price_notes(self, gaps: dict[str, str]) -> list[str]:
        """What the cost figures leave out: tiers whose GPUs have no price, tiers with no
        GPU samples (named in the trace's notes too)."""
        bare = self.trace.no_gpu
        bare_tiers = bare["tier"].to_list() if bare is not None else []
        if not gaps and not bare_tiers:
            return []
        why: dict[str, list[str]] = {}
        for t, reason in gaps.items():
            why.setdefault(reason.split(";")[0], []).append(t)
        if bare_tiers:
            why["no GPU samples in the period"] = bare_tiers
        priced = [t for t in self.trace.profiles if t not in gaps]
        unknown = [t for ts in why.values() for t in ts]
        parts = "; ".join(
            r if len(why) == 1 else f"{', '.join(map(repr, ts))}: {r}" for r, ts in why.items()
        )
        return [
            "cost figures cover the priced tiers only"
            + (f" ({', '.join(priced)})" if priced else " (none is priced)")
            + f": the cost of {', '.join(map(repr, unknown))} is unknown (n/a: {parts}) and"
            " their requests are left out of the cost per 1k requests"
            + (
                f"; the replicas and GPU-hours of {', '.join(map(repr, gaps))} are planned: add"
                " the price to the price list ($FINOPS_PRICES, else data/prices.csv) to cost"
                " them"
                if gaps
                else ""
            )
        ]

    def _lever_notes(
        self, levers: Levers, burst_gpu_h: float, *, same_reps: bool = False
    ) -> list[str]:
        """Levers asked for that cannot change this plan, named so none is ignored silently.

        `same_reps`: with the plan's batch limit every tier runs the replicas of every hour
        that vLLM's default limit gives it."""
        notes = []
        if levers.max_num_seqs is not None and same_reps:
            notes.append(
                f"max-num-seqs {levers.max_num_seqs} changes nothing: every hour runs the same"
                f" replicas as with vLLM's default batch limit ({DEFAULT_MAX_NUM_SEQS}), so"
                " GPU-hours and cost do not move (only the simulated idle share, measured"
                " against the batch-limited ceiling)"
                + (
                    "; a fixed fleet is sized by its busiest hour and the observed fleet"
                    " (with --autoscale the limit may move the hourly need)"
                    if not levers.autoscale
                    else ""
                )
            )
        if levers.spot_share > 0 and burst_gpu_h <= 0:
            notes.append(
                f"spot share {levers.spot_share:g} changes nothing: spot buys only the GPU-hours"
                " above the always-on floor, and "
                + (
                    "a fixed fleet has none (add --autoscale)"
                    if not levers.autoscale
                    else "the autoscaled fleet never rises above its floor in this period"
                )
            )
        gaps = self.price_gaps("on_demand") if levers.route_small_share > 0 else {}
        if gaps and len(self.trace.profiles) > 1:
            notes.append(
                f"route-small share {levers.route_small_share:g}: the target tier is"
                f" {self.smallest_tier()!r}, the smallest model, not the cheapest per"
                f" replica-hour: {', '.join(map(repr, gaps))} have no on_demand price to"
                " compare"
            )
        mix = self.routed_sizes(levers)
        if mix is not None:
            p = self.trace.profiles[mix.tier]
            own_p, own_o = self._sizes(p, replace(levers, route_small_share=0.0))
            new_p, new_o = self._sizes(p, levers)
            came = {t: w for t, w in mix.weights.items() if t != mix.tier and w > 0}
            cap = f" (prompts capped at {levers.token_cap:,} tokens)" if levers.token_cap else ""
            notes.append(
                f"route-small share {levers.route_small_share:g}: routed requests keep their"
                f" sizes on {mix.tier!r}, where they make {sum(came.values()):.0%} of the"
                f" upstream calls ({', '.join(f'{t} {w:.0%}' for t, w in came.items())}): its"
                f" mean uncached prompt grows from {own_p.mean():,.0f} to {new_p.mean():,.0f}"
                f" tokens{cap}, its mean output from {own_o.mean():,.0f} to {new_o.mean():,.0f}"
            )
        if levers.route_small_share > 0 and len(self.trace.profiles) < 2:
            only = ", ".join(self.trace.profiles)
            notes.append(
                f"route-small share {levers.route_small_share:g} changes nothing: routing moves"
                f" requests between simulated tiers and needs at least two (only {only} is"
                " simulated)"
            )
        return notes

    def growth_table(
        self, growths: tuple[float, ...] = (1, 2, 5, 10), after: Levers | None = None
    ) -> pl.DataFrame:
        """Cost per 1k requests at each growth factor, before and after the levers."""
        after = after or default_levers(self)
        out = []
        for g in growths:
            for name, lv in (("before", Levers()), ("after", after)):
                pl_ = self.plan(g, lv)
                out.append(
                    {
                        "growth": g,
                        "scenario": name,
                        **{k: v for k, v in pl_.totals.items() if k != "growth"},
                        # GPU-equivalents (MIG and time-sliced replicas hold a share): whole GPUs
                        "peak_gpus": math.ceil(
                            round(
                                pl_.hourly.group_by("hour").agg(pl.col("gpus").sum())["gpus"].max(),
                                6,
                            )
                        ),
                    }
                )
        return pl.DataFrame(out)


def model_size_b(name: str | None) -> float:
    """Parameter count in billions from a model name (`llama-3.1-8b-instruct` -> 8.0);
    inf when the name carries none."""
    m = re.findall(r"(?<![\d.])(\d+(?:\.\d+)?)([bBmM])(?![a-zA-Z])", name or "")
    if not m:
        return math.inf
    size, unit = m[-1]
    return float(size) / (1000.0 if unit in "mM" else 1.0)


def default_levers(sim: Simulator) -> Levers:
    """The 'after' scenario, grounded in the observed week where the data allows.

    - autoscaling on queue depth instead of a peak-sized fleet;
    - the always-on floor on reserved prices, 30% of the burst on spot;
    - a context cap at the tier-wide p95 of uncached prompt tokens (trims the tail only);
    - response cache: the observed hit rate plus 5 points (exact duplicates seen in the log);
    - 20% of larger-tier traffic routed to the smallest tier (a conservative router policy).
    """
    prompts = np.concatenate([p.prompt_tokens for p in sim.trace.profiles.values()])
    cap = int(max(np.quantile(prompts, 0.95), 1)) if prompts.size else None
    hit = min(sim.trace.observed_hit_rate + 0.05, 0.95)
    return Levers(
        route_small_share=0.2 if len(sim.trace.profiles) > 1 else 0.0,
        cache_hit_rate=hit,
        token_cap=cap,
        autoscale=True,
        reserved_baseline=True,
        spot_share=0.3,
    )


def headline(
    db: duckdb.DuckDBPyConnection,
    growth: float = 5.0,
    *,
    slo_ttft_p95_ms: float | None = None,
    after: Levers | None = None,
    simulator: Simulator | None = None,
    week: str | None = None,
    start: str | dt.date | None = None,
    end: str | dt.date | None = None,
    per: Period | None = None,
) -> dict[str, object]:
    """Cost per 1k requests at `growth`, before and after the levers (the first question).

    Planned from the period named as in `finops.costs` (`week=`, `start`/`end` or `per`;
    default: the lake's latest whole week, as `finops simulate`). A `simulator` given
    plans from the period it was built on.

    >>> h = headline(finops.connect(), 5)
    >>> print(h["line"])   # 5x growth: $X/1k requests before levers, $Y after
    """
    from finops.models.waterfall import describe_levers  # it builds on this module

    sim = simulator or Simulator.from_lake(
        db, week=week, start=start, end=end, per=per, slo_ttft_p95_ms=slo_ttft_p95_ms
    )
    after = after or default_levers(sim)
    before_plan = sim.plan(growth, Levers())
    after_plan = sim.plan(growth, after)
    b, a = before_plan.cost_per_1k(), after_plan.cost_per_1k()
    line = f"{growth:g}x growth: {_usd(b)}/1k requests before levers, {_usd(a)} after"
    unpriced = unpriced_tiers(sim)
    if unpriced:
        line += f" (priced tiers only; unknown cost: {', '.join(unpriced)})"
    return {
        "growth": growth,
        "slo_ttft_p95_ms": sim.slo_ttft_p95_ms,
        "before_usd_per_1k": b,
        "after_usd_per_1k": a,
        "saving_pct": 100 * (1 - a / b) if b else math.nan,
        "before_gpu_hours": before_plan.totals["gpu_hours"],
        "after_gpu_hours": after_plan.totals["gpu_hours"],
        "levers": asdict(after),
        # the "after" scenario in words: a reader of the line can see what it assumes
        "scenario": describe_levers(sim, after),
        "line": line,
        # what the figures leave out (days without data, unpriced tiers, idle levers)
        "notes": list(dict.fromkeys([*before_plan.notes, *after_plan.notes])),
    }


def _sim_period(
    week: str | None, start: str | dt.date | None, end: str | dt.date | None, per: Period | None
) -> Period | None:
    """The period a simulation plans from, named as `finops.costs` names it (same parsing
    and errors); None (nothing named) leaves load_trace its default, the latest whole week,
    where the model fits' "nothing named" means all data."""
    if (week, start, end, per) == (None, None, None, None):
        return None
    return model_period(week, start, end, per)


def unpriced_tiers(sim: Simulator) -> list[str]:
    """Tiers whose cost a plan cannot give: GPUs without a price, or no GPU samples."""
    bare = sim.trace.no_gpu
    return [*sim.price_gaps(), *(bare["tier"].to_list() if bare is not None else [])]


def _usd(x: float | None) -> str:
    """Dollars with cents; an unknown amount (None, NaN) reads n/a, never $nan."""
    return "n/a" if x is None or not math.isfinite(x) else f"${x:,.2f}"


__all__ = [
    "CapacityCurve",
    "Levers",
    "Plan",
    "RoutedSizes",
    "Simulator",
    "TierProfile",
    "Trace",
    "TtftProbe",
    "capacity_curve",
    "conservative_per_replica",
    "default_levers",
    "headline",
    "load_trace",
    "max_rate_for_slo",
    "model_size_b",
    "replace",
    "unpriced_tiers",
]
