"""Benchmark: the cost marts over a 10M-request, 64-GPU week at 10 s GPU resolution.

Synthesizes the week straight into a temporary lake (vectorized NumPy -> Arrow ->
Parquet in the lake layout, one file per table per day), then times:

1. marts: `SELECT tenant, sum(cost_allocation) ... FROM marts.request_costs` on a fresh
   `finops.connect()` (dedup, counter resets, deployment mapping, price matching,
   prefill/decode split, duplicate/retry/storm flags: the whole view chain);
2. api: `finops.costs.by_tenant(db, week=...)` on a fresh connection (materializes all
   cost marts once, then aggregates; what a notebook pays for its first question);
3. baseline: one hand-written DuckDB query doing the same allocation over the same
   files with none of the safety (no dedup, no reset handling, no flags).

Prints seconds, the ratios marts/baseline and api/baseline, and checks the per-tenant
costs agree (they must: same formula). Usage:

    uv run python bench/bench_marts.py [--quick] [--requests N] [--gpus N] [--keep DIR]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from finops.schemas import TABLES

if TYPE_CHECKING:
    import polars as pl

START = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
WEEK = "2026-W47"
DAYS = 7
GPU_STEP_S = 10
SERVING_STEP_S = 60
PRICES = {"NVIDIA H100 80GB HBM3": 3.90, "NVIDIA L4": 0.75}
PREFILL = "vllm:request_prefill_time_seconds_sum"
DECODE = "vllm:request_decode_time_seconds_sum"


def _arrow_type(dtype: object) -> pa.DataType:
    import polars as pl

    if isinstance(dtype, pl.Datetime):
        return pa.timestamp("us", tz="UTC")
    return {
        pl.String: pa.string(),
        pl.Int32: pa.int32(),
        pl.Int64: pa.int64(),
        pl.Float64: pa.float64(),
        pl.Boolean: pa.bool_(),
    }[dtype]


def _write(lake: Path, table: str, day: int, cols: dict[str, pa.Array | np.ndarray]) -> int:
    """Write one day of a table with every schema column (absent ones as nulls)."""
    schema = TABLES[table]
    n = len(next(iter(cols.values())))
    arrays, fields = [], []
    for name, dtype in schema.columns.items():
        t = _arrow_type(dtype)
        v = cols.get(name)
        arr = (
            pa.nulls(n, t)
            if v is None
            else pa.array(v, type=t)
            if not isinstance(v, pa.Array | pa.ChunkedArray)
            else v.cast(t)
        )
        arrays.append(arr)
        fields.append(pa.field(name, t))
    date = (START + dt.timedelta(days=day)).date().isoformat()
    dest = lake / table / f"date={date}" / "part-bench.parquet"
    dest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(
        pa.Table.from_arrays(arrays, schema=pa.schema(fields)),
        dest,
        compression="zstd",
        row_group_size=1_000_000,
    )
    return n


def _fleet(gpus: int) -> list[tuple[str, str, str, int]]:
    """(tier, gpu_model, pod, replica GPUs) per GPU: 1/4 large (TP4 H100), rest L4 split."""
    large = max(4, (gpus // 4) // 4 * 4)
    rest = gpus - large
    mid = rest // 2
    out = []
    for i in range(large):
        out.append(("large", "NVIDIA H100 80GB HBM3", f"vllm-large-{i // 4}", 4))
    for i in range(mid):
        out.append(("mid", "NVIDIA L4", f"vllm-mid-{i}", 1))
    for i in range(rest - mid):
        out.append(("small", "NVIDIA L4", f"vllm-small-{i}", 1))
    return out


def _diurnal(seconds: np.ndarray) -> np.ndarray:
    hour = (seconds % 86400) / 3600.0
    return 0.55 + 0.45 * np.sin((hour - 9.0) / 24.0 * 2 * np.pi)


def synthesize(lake: Path, n_requests: int, gpus: int, seed: int = 7) -> dict[str, int]:
    rng = np.random.default_rng(seed)
    fleet = _fleet(gpus)
    counts = {"gpu_samples": 0, "serving_samples": 0, "requests": 0}
    start_us = int(START.timestamp() * 1e6)
    base = {"large": 0.35, "mid": 0.25, "small": 0.08}
    # ---- GPU samples: 2 DCGM fields per GPU every 10 s
    per_day = 86400 // GPU_STEP_S
    for day in range(DAYS):
        secs = day * 86400 + np.arange(per_day) * GPU_STEP_S
        shape = _diurnal(secs)
        ts_all, uuid_all, field_all, val_all = [], [], [], []
        for g, (tier, *_rest) in enumerate(fleet):
            sm = np.clip(base[tier] * shape + rng.normal(0, 0.03, per_day), 0, 1)
            util = np.clip(100 * (sm * 2.5 + 0.1), 0, 100)
            ts = start_us + secs * 1_000_000
            for field, vals in (("DCGM_FI_PROF_SM_ACTIVE", sm), ("DCGM_FI_DEV_GPU_UTIL", util)):
                ts_all.append(ts)
                val_all.append(vals)
                uuid_all.append(np.full(per_day, g))
                field_all.append(field)
        n = per_day * len(fleet) * 2
        gidx = np.concatenate(uuid_all)
        uuids = np.array([f"GPU-{g:04d}" for g in range(len(fleet))], dtype=object)
        models = np.array([f[1] for f in fleet], dtype=object)
        pods = np.array([f[2] for f in fleet], dtype=object)
        labels = np.array(
            [json.dumps({"app": f"vllm-{f[0]}", "tier": f[0]}, sort_keys=True) for f in fleet],
            dtype=object,
        )
        fields = np.repeat(np.array(field_all, dtype=object), per_day)
        counts["gpu_samples"] += _write(
            lake,
            "gpu_samples",
            day,
            {
                "ts": pa.array(np.concatenate(ts_all), pa.timestamp("us", tz="UTC")),
                "source": pa.array(np.full(n, "bench", dtype=object)),
                "host": pa.array(np.full(n, "node", dtype=object)),
                "gpu_uuid": pa.array(uuids[gidx]),
                "gpu_model": pa.array(models[gidx]),
                "namespace": pa.array(np.full(n, "llm-serving", dtype=object)),
                "pod": pa.array(pods[gidx]),
                "labels": pa.array(labels[gidx]),
                "field": pa.array(fields),
                "value": np.concatenate(val_all),
            },
        )
    # ---- serving: prefill/decode histogram _sum counters per replica every 60 s
    replicas = sorted({(f[0], f[2]) for f in fleet})
    steps = DAYS * 86400 // SERVING_STEP_S
    secs = np.arange(steps) * SERVING_STEP_S
    shape = _diurnal(secs)
    per_day_s = 86400 // SERVING_STEP_S
    counters = {}  # one monotone counter per replica and metric for the whole week
    for tier, pod in replicas:
        rate_p = {"large": 6.0, "mid": 3.0, "small": 1.0}[tier]
        for metric, rate in ((PREFILL, rate_p), (DECODE, rate_p * 9)):
            inc = rate * shape * SERVING_STEP_S * rng.uniform(0.8, 1.2, steps)
            counters[pod, metric] = np.cumsum(inc)
    for day in range(DAYS):
        sl = slice(day * per_day_s, (day + 1) * per_day_s)
        ts_l, tgt_l, met_l, lab_l, val_l = [], [], [], [], []
        for tier, pod in replicas:
            for metric in (PREFILL, DECODE):
                val_l.append(counters[pod, metric][sl])
                ts_l.append(start_us + secs[sl] * 1_000_000)
                tgt_l.append(np.full(per_day_s, pod, dtype=object))
                met_l.append(np.full(per_day_s, metric, dtype=object))
                lab_l.append(
                    np.full(
                        per_day_s,
                        json.dumps(
                            {"model_name": f"model-{tier}", "pod": pod, "tier": tier},
                            sort_keys=True,
                        ),
                        dtype=object,
                    )
                )
        n = per_day_s * len(replicas) * 2
        counts["serving_samples"] += _write(
            lake,
            "serving_samples",
            day,
            {
                "ts": pa.array(np.concatenate(ts_l), pa.timestamp("us", tz="UTC")),
                "source": pa.array(np.full(n, "bench", dtype=object)),
                "target": pa.array(np.concatenate(tgt_l)),
                "metric": pa.array(np.concatenate(met_l)),
                "type": pa.array(np.full(n, "histogram", dtype=object)),
                "labels": pa.array(np.concatenate(lab_l)),
                "value": np.concatenate(val_l),
            },
        )
    # ---- requests: diurnal arrivals over the week
    u = rng.random(n_requests * 2)
    cand = rng.uniform(0, DAYS * 86400, n_requests * 2)
    keep = cand[u < _diurnal(cand)][:n_requests]
    secs_r = np.sort(keep)
    n = len(secs_r)
    tiers = np.array(["small", "mid", "large"], dtype=object)
    tier_i = rng.choice(3, n, p=[0.5, 0.3, 0.2])
    tenants = np.array([f"tenant-{i:02d}" for i in range(50)], dtype=object)
    features = np.array(
        [
            "chat-assistant",
            "code-complete",
            "summarize",
            "extract",
            "classify",
            "rag-qa",
            "embeddings",
        ],
        dtype=object,
    )
    feat_i = rng.choice(7, n, p=[0.3, 0.25, 0.07, 0.07, 0.08, 0.15, 0.08])
    inp = rng.lognormal(7.0, 1.0, n).astype(np.int64) + 1
    out = np.where(feat_i == 6, 0, rng.lognormal(5.0, 0.8, n).astype(np.int64))
    cached = (inp * rng.uniform(0, 0.6, n)).astype(np.int64)
    failed = rng.random(n) < 0.01
    status = np.where(failed, 503, 200).astype(np.int32)
    hit = rng.random(n) < 0.02
    ids = pc.binary_join_element_wise("r", pc.cast(pa.array(np.arange(n)), pa.string()), "")
    retry_of = np.full(n, None, dtype=object)
    fail_idx = np.flatnonzero(failed[:-1])
    retry_of[fail_idx + 1] = np.array(ids)[fail_idx] if len(fail_idx) else retry_of[:0]
    fp = pc.binary_join_element_wise(
        "fp", pc.cast(pa.array(rng.integers(0, n // 2 + 1, n)), pa.string()), ""
    )
    ts_us = start_us + (secs_r * 1e6).astype(np.int64)
    day_of = (secs_r // 86400).astype(int)
    cols = {
        "request_id": ids,
        "ts": pa.array(ts_us, pa.timestamp("us", tz="UTC")),
        "source": np.full(n, "bench", dtype=object),
        "tenant": tenants[rng.integers(0, 50, n)],
        "feature": features[feat_i],
        "operation": np.where(feat_i == 6, "embeddings", "chat").astype(object),
        "request_model": np.full(n, "auto", dtype=object),
        "response_model": np.array(["model-small", "model-mid", "model-large"], dtype=object)[
            tier_i
        ],
        "tier": tiers[tier_i],
        "input_tokens": inp,
        "output_tokens": out,
        "cached_input_tokens": cached,
        "status_code": status,
        "error_type": np.where(failed, "upstream_unavailable", None).astype(object),
        "finish_reason": np.where(failed, None, "stop").astype(object),
        "stream": rng.random(n) < 0.6,
        "cache_status": np.where(hit, "hit", "miss").astype(object),
        "prompt_fingerprint": fp,
        "retry_of": retry_of,
        "attempt": np.where(pa.array(retry_of).is_null().to_numpy(zero_copy_only=False), 1, 2),
    }
    table = {
        k: (v if isinstance(v, pa.Array | pa.ChunkedArray) else pa.array(v))
        for k, v in cols.items()
    }
    for day in range(DAYS):
        idx = pa.array(np.flatnonzero(day_of == day))
        counts["requests"] += _write(
            lake, "requests", day, {k: pc.take(v, idx) for k, v in table.items()}
        )
    return counts


BASELINE = """
WITH g AS (
    SELECT date_trunc('hour', ts) AS hour, json_extract_string(labels, '$.tier') AS tier,
           gpu_uuid, any_value(gpu_model) AS gpu_model
    FROM read_parquet('{lake}/gpu_samples/*/*.parquet') GROUP BY ALL
),
gc AS (
    SELECT hour, tier,
           sum(CASE WHEN gpu_model LIKE '%H100%' THEN 3.90 ELSE 0.75 END::DOUBLE) AS cost
    FROM g GROUP BY ALL
),
s AS (
    SELECT date_trunc('hour', ts) AS hour, json_extract_string(labels, '$.tier') AS tier, metric,
           value - lag(value) OVER (PARTITION BY target, metric, labels ORDER BY ts) AS inc
    FROM read_parquet('{lake}/serving_samples/*/*.parquet')
    WHERE metric IN ('{prefill}', '{decode}')
),
ph AS (
    SELECT hour, tier, sum(inc) FILTER (metric = '{prefill}') AS p,
           sum(inc) FILTER (metric = '{decode}') AS d
    FROM s GROUP BY ALL
),
r AS (
    SELECT tenant, date_trunc('hour', ts) AS hour, tier,
           CASE WHEN cache_status = 'hit' THEN 0
                ELSE greatest(input_tokens - coalesce(cached_input_tokens, 0), 0) END AS wi,
           CASE WHEN cache_status = 'hit' THEN 0 ELSE output_tokens END AS wo
    FROM read_parquet('{lake}/requests/*/*.parquet')
    WHERE tier IS NOT NULL
      AND ts >= TIMESTAMPTZ '{start}' AND ts < TIMESTAMPTZ '{end}'
),
w AS (SELECT hour, tier, sum(wi) AS wi, sum(wo) AS wo FROM r GROUP BY ALL),
k AS (
    SELECT w.hour, w.tier,
           gc.cost * ph.p / (ph.p + ph.d) / w.wi AS in_price,
           gc.cost * ph.d / (ph.p + ph.d) / w.wo AS out_price
    FROM w JOIN gc USING (hour, tier) JOIN ph USING (hour, tier)
)
SELECT tenant, sum(wi * in_price + wo * out_price) AS cost
FROM r JOIN k USING (hour, tier) GROUP BY tenant ORDER BY tenant
"""

MARTS = """
SELECT tenant, sum(cost_allocation) AS cost FROM marts.request_costs
WHERE hour >= TIMESTAMPTZ '{start}' AND hour < TIMESTAMPTZ '{end}'
GROUP BY tenant ORDER BY tenant
"""


def tenant_mismatch(got: pl.DataFrame, base: pl.DataFrame, tol: float) -> str | None:
    """How `got`'s per-tenant costs differ from `base`'s, or None if they agree.

    Matched by tenant name, not row position, so a missing, extra or repeated tenant is
    named as such instead of shifting every later row (or crashing on unequal lengths)."""
    import polars as pl

    out = []
    for label, df in (("result", got), ("baseline", base)):
        dup = df.filter(pl.col("tenant").is_duplicated())["tenant"].unique().sort().to_list()
        if dup:
            out.append(f"{label} repeats {len(dup)} tenant(s), e.g. {dup[:3]}")
    j = (
        got.select("tenant", "cost", ours=pl.lit(True))
        .unique("tenant", keep="first")
        .join(
            base.select("tenant", base_cost="cost", theirs=pl.lit(True)).unique(
                "tenant", keep="first"
            ),
            on="tenant",
            how="full",
            coalesce=True,
        )
        .sort("tenant")
    )
    missing = j.filter(pl.col("ours").is_null())["tenant"].to_list()
    extra = j.filter(pl.col("theirs").is_null())["tenant"].to_list()
    if missing:
        out.append(f"{len(missing)} baseline tenant(s) missing, e.g. {missing[:3]}")
    if extra:
        out.append(f"{len(extra)} tenant(s) not in the baseline, e.g. {extra[:3]}")
    both = j.filter(pl.col("ours") & pl.col("theirs")).with_columns(
        diff=(pl.col("cost") - pl.col("base_cost"))
        .abs()
        .fill_null(float("inf"))
        .fill_nan(float("inf"))
    )
    off = both.filter(pl.col("diff") > tol).sort("diff", descending=True)
    if off.height:
        t, c, b = off["tenant"][0], off["cost"][0], off["base_cost"][0]
        out.append(f"{off.height} tenant(s) differ by more than {tol:.3g}; worst {t}: {c} vs {b}")
    return "; ".join(out) or None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1M requests, 16 GPUs")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--gpus", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all)")
    ap.add_argument("--keep", type=Path, default=None, help="write the lake here and keep it")
    args = ap.parse_args()
    n_req = args.requests or (1_000_000 if args.quick else 10_000_000)
    gpus = args.gpus or (16 if args.quick else 64)
    if gpus < 8 or n_req < 1000:
        ap.error("--gpus must be >= 8 and --requests >= 1000")

    import finops
    import finops.costs as fc

    tmp = None
    if args.keep:
        lake = args.keep
        shutil.rmtree(lake, ignore_errors=True)
    else:
        tmp = tempfile.mkdtemp(prefix="bench-marts-")
        lake = Path(tmp) / "lake"
    try:
        t0 = time.perf_counter()
        counts = synthesize(lake, n_req, gpus)
        t_syn = time.perf_counter() - t0
        print(
            f"synthesized {counts['requests']:,} requests, {counts['gpu_samples']:,} GPU samples "
            f"({gpus} GPUs x {DAYS} days at {GPU_STEP_S} s, 2 fields), "
            f"{counts['serving_samples']:,} serving samples in {t_syn:.1f} s"
        )
        per = fc.period(week=WEEK)
        q = {"start": per.start.isoformat(), "end": per.end.isoformat()}

        def timed(fn):
            t = time.perf_counter()
            out = fn()
            return out, time.perf_counter() - t

        def run_baseline():
            import duckdb

            con = duckdb.connect()
            if args.threads:
                con.execute(f"SET threads = {args.threads}")
            con.execute("SET TimeZone = 'UTC'")
            return con.sql(BASELINE.format(lake=lake, prefill=PREFILL, decode=DECODE, **q)).pl()

        def run_marts():
            db = finops.connect(lake, threads=args.threads)
            return db.sql(MARTS.format(**q)).pl()

        def run_api():
            db = finops.connect(lake, threads=args.threads)
            return fc.by_tenant(db, week=WEEK).select("tenant", "cost").sort("tenant")

        base, t_base = timed(run_baseline)
        marts, t_marts = timed(run_marts)
        api, t_api = timed(run_api)
        for name, df in (("marts", marts), ("api", api)):
            if problem := tenant_mismatch(df, base, tol=1e-6 * max(1.0, base["cost"].sum())):
                raise SystemExit(
                    f"MISMATCH: {name} per-tenant costs differ from the baseline ({problem})"
                )
        print(f"per-tenant costs agree ({base.height} tenants, total ${base['cost'].sum():,.2f})")
        print(f"baseline (one hand-written DuckDB query): {t_base:7.2f} s")
        print(
            f"marts    (marts.request_costs by tenant): {t_marts:7.2f} s   "
            f"ratio {t_marts / t_base:.2f}x"
        )
        print(
            f"api      (finops.costs.by_tenant, all marts materialized): {t_api:7.2f} s   "
            f"ratio {t_api / t_base:.2f}x"
        )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
