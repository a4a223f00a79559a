"""GPU (DCGM) and serving (vLLM /metrics) telemetry consistent with the request log.

The GPU signals follow the load on each replica: GR engine activity is the
chance that any request is in flight, SM activity adds how full the batch is,
DCGM_FI_DEV_GPU_UTIL only says "a kernel ran" and so reads far higher than
SM activity (the classic "GPU_UTIL flatters"). Frame-buffer use stays high
because vLLM preallocates its KV cache. Power sits between idle and TDP by
load, and the energy counter (mJ) integrates that power.

vLLM counters are cumulative sums of the requests each replica served,
counted at the first scrape after the request finished; histograms use
vLLM's own bucket boundaries. One replica restarts, so its counters reset.
"""

from __future__ import annotations

import datetime as dt

import numpy as np
import orjson
import polars as pl

from finops.demo.fleet import TIERS, Fleet
from finops.demo.traffic import Traffic

DCGM_INTERVAL_S = 30
VLLM_INTERVAL_S = 120
DCGM_PORT = 9400

# vLLM V1 bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
    10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0,
)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
    240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
HISTOGRAMS = {
    "vllm:time_to_first_token_seconds": ("ttft_s", TTFT_BUCKETS),
    "vllm:inter_token_latency_seconds": ("itl_s", ITL_BUCKETS),
    "vllm:e2e_request_latency_seconds": ("e2e_s", REQUEST_LATENCY_BUCKETS),
    "vllm:request_queue_time_seconds": ("queue_s", REQUEST_LATENCY_BUCKETS),
    "vllm:request_prefill_time_seconds": ("prefill_s", REQUEST_LATENCY_BUCKETS),
    "vllm:request_decode_time_seconds": ("decode_s", REQUEST_LATENCY_BUCKETS),
}
KV_CAPACITY_TOKENS = {"small": 420_000, "mid": 95_000, "large": 1_300_000}


def _labels(d: dict[str, str]) -> str:
    return orjson.dumps(d, option=orjson.OPT_SORT_KEYS).decode()


def _epoch_us(start: dt.datetime, seconds: np.ndarray) -> pl.Series:
    us = np.int64(round(start.timestamp() * 1e6)) + (seconds * 1_000_000).astype(np.int64)
    return pl.Series("ts", us).cast(pl.Datetime("us", "UTC"))


def _per_bin(
    replica: np.ndarray, bins: np.ndarray, weights: np.ndarray, n_rep: int, n_bins: int
) -> np.ndarray:
    ok = (replica >= 0) & (bins >= 0) & (bins < n_bins)
    flat = np.bincount(
        replica[ok] * n_bins + bins[ok], weights=weights[ok], minlength=n_rep * n_bins
    )
    return flat.reshape(n_rep, n_bins)


def down_mask(traffic: Traffic, n_rep: int, times: np.ndarray) -> np.ndarray:
    """[replica, time] True while the restarting replica is down."""
    r = traffic.restart
    m = np.zeros((n_rep, times.size), dtype=bool)
    m[r.replica] = (times >= r.at_s) & (times < r.at_s + r.down_s)
    return m


def scrape_failures(rng: np.random.Generator, shape: tuple[int, int], rate: float) -> np.ndarray:
    """Random failed scrapes (timeouts), a few per target per week."""
    return rng.random(shape) < rate


def gpu_samples(
    fleet: Fleet,
    traffic: Traffic,
    start: dt.datetime,
    horizon_s: float,
    rng: np.random.Generator,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """DCGM samples per GPU every 30 s, and the scrape_health rows of the exporters."""
    n_rep = len(fleet.replicas)
    n_bins = int(horizon_s // DCGM_INTERVAL_S)
    times = np.arange(n_bins) * float(DCGM_INTERVAL_S)
    tm = traffic.timing
    rep = tm["replica"].to_numpy()
    b = (tm["t_s"].to_numpy() // DCGM_INTERVAL_S).astype(np.int64)
    # Little's law: requests in flight = sum of their durations / interval
    conc = _per_bin(rep, b, tm["e2e_s"].to_numpy() * (rep >= 0), n_rep, n_bins) / DCGM_INTERVAL_S
    down = down_mask(traffic, n_rep, times)

    gpus = fleet.gpus
    g_rep = np.array([g.replica for g in gpus])
    L = conc[g_rep] * rng.lognormal(0.0, 0.06, (len(gpus), n_bins))
    spec = [TIERS[fleet.replicas[r].tier] for r in g_rep]
    gr = 1.0 - np.exp(-1.8 * L)
    sm = gr * (0.42 + 0.5 * np.minimum(1.0, L / 10.0)) * rng.uniform(0.93, 1.0, L.shape)
    tensor = sm * rng.uniform(0.42, 0.5, L.shape)
    util = np.round(100.0 * np.minimum(1.0, (1.0 - np.exp(-4.0 * L)) * 1.02))
    fb_total = np.array([s.fb_total_mib for s in spec])[:, None]
    fb = np.round(fb_total * 0.915 + rng.normal(0, 12, L.shape))
    idle = np.array([s.idle_w for s in spec])[:, None]
    tdp = np.array([s.tdp_w for s in spec])[:, None]
    power = idle * 1.25 + (tdp - idle * 1.25) * (0.55 * sm + 0.35 * tensor + 0.1 * gr)
    power = power * rng.normal(1.0, 0.015, L.shape)
    g_down = down[g_rep]
    for arr, val in ((gr, 0.0), (sm, 0.0), (tensor, 0.0), (util, 0.0)):
        arr[g_down] = val
    fb[g_down] = 0.0
    power[g_down] = (idle * np.ones_like(power))[g_down]
    power = np.minimum(power, tdp)
    energy0 = rng.uniform(2e11, 9e11, (len(gpus), 1))
    energy = np.round(energy0 + np.cumsum(power * DCGM_INTERVAL_S * 1000.0, axis=1))

    hosts = sorted({g.host for g in gpus})
    host_idx = np.array([hosts.index(g.host) for g in gpus])
    failed = scrape_failures(rng, (len(hosts), n_bins), 0.0008)
    fields = {
        "DCGM_FI_PROF_GR_ENGINE_ACTIVE": np.round(gr, 6),
        "DCGM_FI_PROF_SM_ACTIVE": np.round(sm, 6),
        "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": np.round(tensor, 6),
        "DCGM_FI_DEV_GPU_UTIL": util,
        "DCGM_FI_DEV_FB_USED": fb,
        "DCGM_FI_DEV_POWER_USAGE": np.round(power, 3),
        "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": energy,
    }
    keep = ~failed[host_idx]  # [gpu, time]
    gi, ti = np.nonzero(keep)
    n_f = len(fields)
    values = np.stack([v[gi, ti] for v in fields.values()], axis=1).ravel()
    gi_r = np.repeat(gi, n_f)
    ts = _epoch_us(start, np.repeat(times[ti], n_f))
    field_idx = np.tile(np.arange(n_f), gi.size)

    def col(vals: list[str | None], idx: np.ndarray) -> pl.Series:
        return pl.Series(vals, dtype=pl.String).gather(idx)

    samples = pl.DataFrame(
        {
            "ts": ts,
            "source": pl.repeat("demo", values.size, dtype=pl.String, eager=True),
            "host": col([g.host for g in gpus], gi_r),
            "gpu_uuid": col([g.uuid for g in gpus], gi_r),
            "gpu_index": pl.Series(np.array([g.index for g in gpus], dtype=np.int32)[gi_r]),
            "gpu_model": col([fleet.replicas[g.replica].spec.gpu_model for g in gpus], gi_r),
            "mig_profile": pl.repeat(None, values.size, dtype=pl.String, eager=True),
            "mig_instance": pl.repeat(None, values.size, dtype=pl.String, eager=True),
            "namespace": pl.repeat("llm-serving", values.size, dtype=pl.String, eager=True),
            "pod": col([fleet.replicas[g.replica].pod for g in gpus], gi_r),
            "container": pl.repeat("vllm", values.size, dtype=pl.String, eager=True),
            "labels": col([fleet.gpu_labels(g) for g in gpus], gi_r),
            "field": col(list(fields), field_idx),
            "value": values,
        }
    )
    per_host = np.bincount(host_idx, minlength=len(hosts))
    hi, ti = np.indices(failed.shape)
    hi, ti, fail = hi.ravel(), ti.ravel(), failed.ravel()
    health = pl.DataFrame(
        {
            "ts": _epoch_us(start, times[ti]),
            "target": col([f"dcgm-exporter@{h}:{DCGM_PORT}" for h in hosts], hi),
            "kind": pl.repeat("dcgm", hi.size, dtype=pl.String, eager=True),
            "up": ~fail,
            "duration_ms": np.round(
                np.where(fail, 10_000.0, rng.lognormal(np.log(28.0), 0.25, hi.size)), 3
            ),
            "samples": np.where(fail, 0, per_host[hi] * n_f),
            "rejected": np.zeros(hi.size, dtype=np.int64),
            "error": col([None, "context deadline exceeded (timeout 10s)"], fail.astype(np.int64)),
        }
    )
    return samples, health


def serving_samples(
    fleet: Fleet,
    traffic: Traffic,
    start: dt.datetime,
    horizon_s: float,
    rng: np.random.Generator,
    interval_s: int = VLLM_INTERVAL_S,
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """vLLM /metrics scrapes per replica, their scrape_health, and prefix-cache events."""
    n_rep = len(fleet.replicas)
    n_k = int(horizon_s // interval_s)
    times = np.arange(n_k) * float(interval_s)
    tm = traffic.timing
    rep = tm["replica"].to_numpy()
    # counted at the first scrape at or after the request finished
    k = np.ceil(tm["finish_s"].to_numpy() / interval_s).astype(np.int64)
    restart = traffic.restart
    k_crash = int(np.ceil(restart.at_s / interval_s))
    k_up = int(np.ceil((restart.at_s + restart.down_s) / interval_s))
    lost = (rep == restart.replica) & (k >= k_crash) & (k <= k_up)
    rep_c = np.where(lost, -1, rep)

    def counter(weights: np.ndarray) -> np.ndarray:
        c = _per_bin(rep_c, k, weights.astype(np.float64), n_rep, n_k)
        cum = np.cumsum(c, axis=1)
        r = restart.replica
        cum[r, k_up:] = np.cumsum(c[r, k_up:])
        return cum

    ones = np.ones(rep.size)
    inp = tm["input_tokens"].to_numpy()
    cached = tm["cached_tokens"].to_numpy()
    finish = tm["finish_reason"].fill_null("stop").to_numpy()
    series: list[tuple[str, str, dict[str, str], np.ndarray]] = [
        ("vllm:prompt_tokens_total", "counter", {}, counter(inp)),
        ("vllm:generation_tokens_total", "counter", {}, counter(tm["output_tokens"].to_numpy())),
        ("vllm:prefix_cache_queries_total", "counter", {}, counter(inp)),
        ("vllm:prefix_cache_hits_total", "counter", {}, counter(cached)),
    ]
    for reason in ("stop", "length"):
        series.append(
            (
                "vllm:request_success_total",
                "counter",
                {"finished_reason": reason},
                counter(finish == reason),
            )
        )
    for metric, (column, buckets) in HISTOGRAMS.items():
        values = tm[column].to_numpy()
        weight = ones
        if column == "itl_s":  # one observation per generated token after the first
            weight = np.maximum(tm["output_tokens"].to_numpy() - 1, 0).astype(np.float64)
        elif column in ("ttft_s", "decode_s"):
            weight = tm["generates"].to_numpy().astype(np.float64)
        bucket = np.searchsorted(np.asarray(buckets), values, side="left")
        per_bucket = [counter(weight * (bucket == i)) for i in range(len(buckets) + 1)]
        running = np.zeros_like(per_bucket[0])
        for i, le in enumerate([*buckets, float("inf")]):
            running = running + per_bucket[i]
            le_text = "+Inf" if le == float("inf") else repr(float(le))
            series.append((f"{metric}_bucket", "histogram", {"le": le_text}, running))
        total = weight * values if column != "itl_s" else tm["decode_s"].to_numpy()
        series.append((f"{metric}_sum", "histogram", {}, counter(np.nan_to_num(total))))
        series.append((f"{metric}_count", "histogram", {}, running.copy()))

    # gauges, sampled at the scrape
    b = (tm["t_s"].to_numpy() // interval_s).astype(np.int64)
    in_flight = _per_bin(rep, b, tm["e2e_s"].to_numpy(), n_rep, n_k) / interval_s
    waiting = _per_bin(rep, b, tm["queue_s"].to_numpy(), n_rep, n_k) / interval_s
    ctx = _per_bin(rep, b, (inp + tm["output_tokens"].to_numpy()) * tm["e2e_s"].to_numpy(),
                   n_rep, n_k) / interval_s  # fmt: skip
    kv_cap = np.array([KV_CAPACITY_TOKENS[r.tier] for r in fleet.replicas])[:, None]
    running_g = rng.poisson(in_flight).astype(np.float64)
    waiting_g = rng.poisson(waiting).astype(np.float64)
    kv = np.round(np.minimum(1.0, ctx / kv_cap * rng.uniform(0.8, 1.0, ctx.shape)), 6)
    series += [
        ("vllm:num_requests_running", "gauge", {}, running_g),
        ("vllm:num_requests_waiting", "gauge", {}, waiting_g),
        ("vllm:kv_cache_usage_perc", "gauge", {}, kv),
    ]

    down = down_mask(traffic, n_rep, times)
    failed = scrape_failures(rng, (n_rep, n_k), 0.0015) & ~down
    up = ~(down | failed)
    n_s = len(series)
    values = np.stack([s[3] for s in series], axis=0)  # [series, replica, k]
    ri, ki = np.nonzero(up)
    vals = values[:, ri, ki].T.ravel()  # rows ordered (replica, k, series)
    r_rows = np.repeat(ri, n_s)
    s_rows = np.tile(np.arange(n_s), ri.size)
    label_texts = []
    for r in fleet.replicas:
        base = fleet.serving_labels(r)
        label_texts += [_labels({**base, **extra}) for _, _, extra, _ in series]
    samples = pl.DataFrame(
        {
            "ts": _epoch_us(start, np.repeat(times[ki], n_s)),
            "source": pl.repeat("demo", vals.size, dtype=pl.String, eager=True),
            "target": pl.Series([r.pod for r in fleet.replicas], dtype=pl.String).gather(r_rows),
            "metric": pl.Series([s[0] for s in series], dtype=pl.String).gather(s_rows),
            "type": pl.Series([s[1] for s in series], dtype=pl.String).gather(s_rows),
            "labels": pl.Series(label_texts, dtype=pl.String).gather(r_rows * n_s + s_rows),
            "model_name": pl.Series([r.spec.model for r in fleet.replicas]).gather(r_rows),
            "value": vals,
        }
    )
    ri, ki = np.indices(up.shape)
    ri, ki = ri.ravel(), ki.ravel()
    ok = up.ravel()
    reason = np.where(ok, 0, np.where(down.ravel(), 1, 2))
    health = pl.DataFrame(
        {
            "ts": _epoch_us(start, times[ki]),
            "target": pl.Series([r.pod for r in fleet.replicas], dtype=pl.String).gather(ri),
            "kind": pl.repeat("vllm", ri.size, dtype=pl.String, eager=True),
            "up": ok,
            "duration_ms": np.round(
                np.where(
                    reason == 2,
                    5000.0,
                    np.where(reason == 1, 0.4, rng.lognormal(np.log(14.0), 0.3, ri.size)),
                ),
                3,
            ),
            "samples": np.where(ok, n_s, 0),
            "rejected": np.zeros(ri.size, dtype=np.int64),
            "error": pl.Series(
                [
                    None,
                    "Get /metrics: dial tcp: connect: connection refused",
                    "context deadline exceeded (timeout 5s)",
                ],
                dtype=pl.String,
            ).gather(reason),
        }
    )

    # prefix-cache events: per replica per scrape interval (hits and misses, in tokens)
    q = _per_bin(rep, k, inp.astype(np.float64), n_rep, n_k)
    h = _per_bin(rep, k, cached.astype(np.float64), n_rep, n_k)
    nreq = _per_bin(rep, k, (cached > 0).astype(np.float64), n_rep, n_k)
    nall = _per_bin(rep, k, (rep >= 0).astype(np.float64), n_rep, n_k)
    ri, ki = np.nonzero(q > 0)
    events = []
    for name, tokens, reqs in (("hit", h, nreq), ("miss", q - h, nall - nreq)):
        events.append(
            pl.DataFrame(
                {
                    "ts": _epoch_us(start, times[ki]),
                    "layer": pl.repeat("vllm_prefix", ri.size, dtype=pl.String, eager=True),
                    "event": pl.repeat(name, ri.size, dtype=pl.String, eager=True),
                    "tier": pl.Series([r.tier for r in fleet.replicas]).gather(ri),
                    "model": pl.Series([r.spec.model for r in fleet.replicas]).gather(ri),
                    "target": pl.Series([r.pod for r in fleet.replicas]).gather(ri),
                    "tokens": tokens[ri, ki].astype(np.int64),
                    "requests": reqs[ri, ki].astype(np.int64),
                }
            )
        )
    prefix = (
        pl.concat(events)
        .with_columns(
            pl.format(
                "demo:vllm_prefix:{}:{}:{}",
                pl.col("target"),
                pl.col("ts").dt.strftime("%Y%m%dT%H%M%S"),
                pl.col("event"),
            ).alias("event_id"),
            pl.lit("demo").alias("source"),
        )
        .drop("target")
    )
    return samples, health, prefix
