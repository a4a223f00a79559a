"""A small serving lake generated from a *known* service model.

Tests and examples need a lake whose true throughput curve and latency
behaviour are known, so a fit can be checked against the truth. This writes
vLLM-shaped serving metrics (cumulative counters, gauges, histogram buckets),
DCGM SM activity and a request log through `Lake.append`, like any collector.
It is not the demo week (see `finops demo`); it is deliberately simple.
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from finops.lake import Lake
from finops.models.regressors import hill

TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
ITL_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)


@dataclass(frozen=True)
class TierTruth:
    """The true per-replica behaviour of one synthetic tier."""

    vmax: float = 120.0  # generation tokens/s at saturation
    k: float = 12.0  # concurrency at half of vmax
    hill: float = 1.0
    replicas: int = 2
    gpus_per_replica: int = 1
    gpu_model: str = "NVIDIA L4"
    mean_prompt: float = 600.0
    mean_output: float = 200.0
    peak_concurrency: float = 24.0
    max_num_seqs: int = 256
    ttft_base_s: float = 0.08
    ttft_slope_s: float = 0.4  # extra median TTFT at concurrency == k
    prefill_tokens_per_s: float = 8000.0


@dataclass(frozen=True)
class SyntheticSpec:
    start: dt.datetime = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
    days: int = 2
    scrape_s: int = 60
    seed: int = 7
    cache_hit_share: float = 0.05
    tiers: dict[str, TierTruth] = field(
        default_factory=lambda: {
            "small": TierTruth(),
            "large": TierTruth(
                vmax=60.0,
                k=6.0,
                replicas=1,
                gpus_per_replica=4,
                gpu_model="NVIDIA H100 80GB HBM3",
                peak_concurrency=10.0,
                mean_output=300.0,
            ),
        }
    )


def busy_spec(scrape_s: int = 120, days: int = 2) -> SyntheticSpec:
    """The tests' two-tier lake: peaks past half-saturation so the fitted curves bend."""
    return SyntheticSpec(
        days=days,
        scrape_s=scrape_s,
        tiers={
            "small": TierTruth(vmax=120.0, k=12.0, replicas=2, peak_concurrency=30.0),
            "large": TierTruth(
                vmax=60.0,
                k=6.0,
                replicas=1,
                gpus_per_replica=4,
                gpu_model="NVIDIA H100 80GB HBM3",
                peak_concurrency=12.0,
                mean_output=300.0,
            ),
        },
    )


def diurnal(hours: np.ndarray) -> np.ndarray:
    """Load shape 0.25..1.0 peaking mid-afternoon UTC, lower at weekends."""
    hod = hours % 24
    dow = (hours // 24) % 7
    shape = 0.25 + 0.75 * (0.5 - 0.5 * np.cos(2 * np.pi * (hod - 3) / 24)) ** 1.5
    return shape * np.where(dow >= 5, 0.6, 1.0)


def write_synthetic_lake(lake: Lake, spec: SyntheticSpec | None = None) -> dict[str, int]:
    """Write the synthetic week into `lake`; returns rows loaded per table."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(spec.seed)
    n_scrapes = int(spec.days * 86400 // spec.scrape_s)
    ts = [spec.start + dt.timedelta(seconds=i * spec.scrape_s) for i in range(n_scrapes)]
    hours = np.arange(n_scrapes) * spec.scrape_s / 3600.0
    serving: list[pl.DataFrame] = []
    gpus: list[pl.DataFrame] = []
    reqs: list[pl.DataFrame] = []
    for tier, tt in spec.tiers.items():
        for r in range(tt.replicas):
            pod = f"vllm-{tier}-{r}"
            base = {"tier": tier, "pod": pod, "namespace": "llm-serving", "model_name": tier}
            conc = tt.peak_concurrency * diurnal(hours) * rng.lognormal(0, 0.15, n_scrapes)
            running = np.minimum(conc, tt.max_num_seqs)
            tps = hill(running, tt.vmax, tt.k, tt.hill) * rng.normal(1, 0.03, n_scrapes)
            tps = np.maximum(tps, 0)
            gen_inc = tps * spec.scrape_s
            done = rng.poisson(gen_inc / tt.mean_output)
            done[0] = 0
            gen_inc[0] = 0
            prompt_inc = done * tt.mean_prompt * rng.normal(1, 0.05, n_scrapes).clip(0.5)
            # per-request draws for histograms and the request log
            idx = np.repeat(np.arange(n_scrapes), done)
            med_ttft = tt.ttft_base_s + tt.ttft_slope_s * (running[idx] / tt.k) ** 2
            ttft = med_ttft * rng.lognormal(0, 0.35, idx.size)
            itl = (running[idx] / np.maximum(tps[idx], 1e-6)) * rng.lognormal(0, 0.2, idx.size)
            rows = [
                _counter(ts, "vllm:generation_tokens_total", np.cumsum(gen_inc), base),
                _counter(ts, "vllm:prompt_tokens_total", np.cumsum(prompt_inc), base),
                _counter(
                    ts,
                    "vllm:request_success_total",
                    np.cumsum(done),
                    {**base, "finished_reason": "length"},
                ),
                _counter(
                    ts,
                    "vllm:request_prefill_time_seconds_sum",
                    np.cumsum(prompt_inc / tt.prefill_tokens_per_s),
                    base,
                ),
                _counter(ts, "vllm:request_prefill_time_seconds_count", np.cumsum(done), base),
                _gauge(ts, "vllm:num_requests_running", running, base),
                _gauge(ts, "vllm:num_requests_waiting", np.maximum(conc - running, 0), base),
                _gauge(ts, "vllm:kv_cache_usage_perc", running / tt.max_num_seqs, base),
                *_histogram(
                    ts, "vllm:time_to_first_token_seconds", TTFT_BUCKETS, idx, ttft, n_scrapes, base
                ),
                *_histogram(
                    ts, "vllm:inter_token_latency_seconds", ITL_BUCKETS, idx, itl, n_scrapes, base
                ),
            ]
            serving.extend(rows)
            sm = np.clip(0.95 * tps / tt.vmax, 0, 1)
            for g in range(tt.gpus_per_replica):
                gpus.append(
                    pl.DataFrame(
                        {
                            "ts": ts * 2,
                            "host": f"node-{tier}-{r}",
                            "gpu_uuid": f"GPU-{tier}-{r}-{g}",
                            "gpu_index": g,
                            "gpu_model": tt.gpu_model,
                            "namespace": "llm-serving",
                            "pod": pod,
                            "container": "vllm",
                            "labels": json.dumps({"app": f"vllm-{tier}", "tier": tier}),
                            "field": ["DCGM_FI_PROF_SM_ACTIVE"] * n_scrapes
                            + ["DCGM_FI_DEV_GPU_UTIL"] * n_scrapes,
                            "value": np.concatenate([sm, np.where(running > 0.05, 100.0, 0.0)]),
                        }
                    )
                )
            start_s = np.array([(t - spec.start).total_seconds() for t in ts])[idx]
            offs = start_s - spec.scrape_s * rng.random(idx.size)
            out_tok = rng.geometric(1 / tt.mean_output, idx.size)
            reqs.append(
                pl.DataFrame(
                    {
                        "request_id": [f"{pod}-{i}" for i in range(idx.size)],
                        "ts": [spec.start + dt.timedelta(seconds=float(s)) for s in offs],
                        "tenant": rng.choice(["acme", "globex"], idx.size),
                        "feature": rng.choice(["chat-assistant", "summarize"], idx.size),
                        "operation": "chat",
                        "request_model": tier,
                        "response_model": tier,
                        "tier": tier,
                        "upstream": pod,
                        "input_tokens": rng.poisson(tt.mean_prompt, idx.size),
                        "output_tokens": out_tok,
                        "cached_input_tokens": 0,
                        "status_code": 200,
                        "ttft_ms": ttft * 1000,
                        "latency_ms": ttft * 1000 + itl * out_tok * 1000,
                        "stream": True,
                        "cache_status": "miss",
                    }
                )
            )
    requests = pl.concat(reqs, how="vertical_relaxed")
    n_hits = int(requests.height * spec.cache_hit_share)
    hits = requests.sample(n_hits, seed=spec.seed).with_columns(
        request_id=pl.col("request_id") + "-hit",
        cache_status=pl.lit("hit"),
        output_tokens=pl.col("output_tokens"),
        ttft_ms=pl.lit(2.0),
        latency_ms=pl.lit(3.0),
        upstream=pl.lit(None, pl.String),
    )
    out = {
        "serving_samples": lake.append(
            "serving_samples", pl.concat(serving, how="vertical_relaxed"), source="synthetic"
        ).loaded,
        "gpu_samples": lake.append(
            "gpu_samples", pl.concat(gpus, how="vertical_relaxed"), source="synthetic"
        ).loaded,
        "requests": lake.append(
            "requests", pl.concat([requests, hits], how="vertical_relaxed"), source="synthetic"
        ).loaded,
    }
    return out


def _labels(base: dict[str, str], **extra: str) -> str:
    return json.dumps({**base, **extra}, sort_keys=True, separators=(",", ":"))


def _counter(ts: list, metric: str, values: np.ndarray, labels: dict) -> pl.DataFrame:
    return _frame(ts, metric, "counter", values, _labels(labels), labels["pod"], labels["tier"])


def _gauge(ts: list, metric: str, values: np.ndarray, labels: dict) -> pl.DataFrame:
    return _frame(ts, metric, "gauge", values, _labels(labels), labels["pod"], labels["tier"])


def _frame(ts, metric, kind, values, labels, target, model) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts": ts,
            "target": target,
            "metric": metric,
            "type": kind,
            "labels": labels,
            "model_name": model,
            "value": np.asarray(values, float),
        }
    )


def _histogram(ts, base_name, bounds, idx, values, n, labels) -> list[pl.DataFrame]:
    b = np.searchsorted(np.array(bounds), values, side="left")  # bucket index; len = +Inf
    counts = np.zeros((n, len(bounds) + 1))
    np.add.at(counts, (idx, b), 1.0)
    cum = np.cumsum(np.cumsum(counts, axis=1), axis=0)
    sums = np.zeros(n)
    np.add.at(sums, idx, values)
    out = []
    for j, le in enumerate([*bounds, float("inf")]):
        le_s = "+Inf" if np.isinf(le) else repr(float(le))
        lab = _labels(labels, le=le_s)
        out.append(
            _frame(
                ts,
                f"{base_name}_bucket",
                "histogram",
                cum[:, j],
                lab,
                labels["pod"],
                labels["tier"],
            )
        )
    out.append(
        _frame(
            ts,
            f"{base_name}_sum",
            "histogram",
            np.cumsum(sums),
            _labels(labels),
            labels["pod"],
            labels["tier"],
        )
    )
    out.append(
        _frame(
            ts,
            f"{base_name}_count",
            "histogram",
            cum[:, -1],
            _labels(labels),
            labels["pod"],
            labels["tier"],
        )
    )
    return out
