"""The demo week: a simulated vLLM fleet written through the same Lake API as collectors.

`generate(lake_path)` writes a deterministic week of requests, GPU and serving
telemetry, cache events, scrape health and a few rejects into a lake, using
only `finops.lake.Lake.append` (no side door), so every view, notebook and
report can be tried without a GPU. The conventions (tiers, names, labels) are
the ones real collectors produce; see the README's "Demo week" section.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

from finops.demo.fleet import Fleet, build_fleet
from finops.demo.telemetry import VLLM_INTERVAL_S, gpu_samples, serving_samples
from finops.demo.traffic import TracesMissing, Traffic, generate_traffic, load_traces
from finops.lake import AppendResult, Lake

MARKER = ".finops-demo"
DEFAULT_START = dt.date(2026, 11, 16)

__all__ = ["MARKER", "DemoError", "DemoResult", "TracesMissing", "generate", "prepare_lake"]


class DemoError(RuntimeError):
    """The demo cannot run as asked (e.g. it would overwrite a lake it did not make)."""


@dataclass
class DemoResult:
    """What `generate` wrote: per-table append counts and the simulation's landmarks."""

    lake: Path
    start: dt.datetime
    days: int
    seed: int
    gpus: int
    appends: dict[str, AppendResult] = field(default_factory=dict)
    restart: dict[str, object] = field(default_factory=dict)
    incidents: list[dict[str, object]] = field(default_factory=list)

    def rows(self, table: str) -> int:
        r = self.appends.get(table)
        return r.loaded if r else 0


def prepare_lake(path: Path) -> None:
    """Wipe a lake the demo made before; refuse to touch anything else that is non-empty."""
    if path.exists() and not path.is_dir():
        raise DemoError(f"{path}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        if not (path / MARKER).is_file():
            raise DemoError(
                f"{path}: not empty and not made by `finops demo` (no {MARKER} marker); "
                "refusing to wipe it. Choose another --lake or empty it yourself."
            )
        for child in path.iterdir():
            if child.is_dir() and not child.is_symlink():
                shutil.rmtree(child)
            else:
                child.unlink()
    path.mkdir(parents=True, exist_ok=True)


def _as_start(start: dt.date | dt.datetime) -> dt.datetime:
    if isinstance(start, dt.datetime):
        return start.astimezone(dt.UTC) if start.tzinfo else start.replace(tzinfo=dt.UTC)
    return dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)


def _shim_cache_events(requests: pl.DataFrame) -> pl.DataFrame:
    """One shim_response event per response-cache hit (tokens it saved upstream)."""
    hits = requests.filter(pl.col("cache_status") == "hit")
    return hits.select(
        pl.format("demo:shim_response:{}", pl.col("request_id")).alias("event_id"),
        "ts",
        pl.lit("demo").alias("source"),
        pl.lit("shim_response").alias("layer"),
        pl.lit("hit").alias("event"),
        "tenant",
        "tier",
        pl.col("response_model").alias("model"),
        "request_id",
        (pl.col("input_tokens") + pl.col("output_tokens")).alias("tokens"),
        pl.lit(1, dtype=pl.Int64).alias("requests"),
    )


def _malformed_log(requests: pl.DataFrame, rng: np.random.Generator) -> pl.DataFrame:
    """A few broken lines of a shim log, fed through the same API so `rejects` has rows."""
    sample = requests.sample(6, seed=int(rng.integers(0, 2**31))).with_columns(
        pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M:%S%.fZ"),
        pl.col("input_tokens").cast(pl.String),
        pl.col("output_tokens").cast(pl.String),
    )
    day = sample["ts"][0][:10]
    broken = sample.with_columns(
        pl.Series("ts", ["2026-13-45T99:00:00Z", *sample["ts"][1:]]),
        pl.Series("input_tokens", [*sample["input_tokens"][:1], "-42", "lots", *sample["input_tokens"][3:]]),
        pl.Series("request_id", [*sample["request_id"][:3], None, *sample["request_id"][4:]]),
        pl.Series("output_tokens", [*sample["output_tokens"][:4], "-1", "3.5"]),
    )  # fmt: skip
    return broken.with_columns(
        pl.format("shim-{}.jsonl:{}", pl.lit(day), pl.int_range(1, 7) * 997).alias("_location")
    )


def generate(
    lake_path: str | os.PathLike[str],
    *,
    days: int = 7,
    seed: int = 42,
    gpus: int = 16,
    start: dt.date | dt.datetime = DEFAULT_START,
    scale: float = 1.0,
    vllm_interval_s: int = VLLM_INTERVAL_S,
    traces_dir: str | os.PathLike[str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DemoResult:
    """Simulate `days` of a `gpus`-GPU vLLM fleet into the lake at `lake_path`.

    Deterministic for (`days`, `seed`, `gpus`, `start`, `scale`). `scale`
    multiplies request volume (1.0 is ~440k requests a week) for quick tests.
    A lake the demo made before (marked by `.finops-demo`) is wiped first; any
    other non-empty folder raises `DemoError`.
    """
    if days < 1:
        raise DemoError(f"--days must be at least 1, got {days}")
    if scale <= 0:
        raise DemoError(f"scale must be > 0, got {scale}")
    if vllm_interval_s < 1 or 3600 % vllm_interval_s:
        raise DemoError(f"vllm_interval_s must divide 3600, got {vllm_interval_s}")
    step = progress or (lambda _msg: None)
    path = Path(lake_path)
    try:
        fleet: Fleet = build_fleet(gpus, seed=seed)
    except ValueError as exc:
        raise DemoError(str(exc)) from None
    begin = _as_start(start)
    horizon = days * 86400.0
    traces = load_traces(str(traces_dir) if traces_dir else None)
    prepare_lake(path)
    (path / MARKER).write_text(
        f"made by `finops demo` (seed={seed}, days={days}, gpus={gpus}, "
        f"start={begin.date()}, scale={scale}); `finops demo` may wipe and regenerate it\n"
    )
    lake = Lake(path, fsync=False)
    # Validation's "not in the future" check is relative to the simulated week's end.
    now = begin + dt.timedelta(days=days)
    result = DemoResult(lake=path, start=begin, days=days, seed=seed, gpus=gpus)

    def append(table: str, frame: pl.DataFrame, source: str = "demo") -> None:
        res = lake.append(table, frame, source=source, now=now)
        if table in result.appends:
            result.appends[table] += res
        else:
            result.appends[table] = res

    step("simulating requests")
    traffic: Traffic = generate_traffic(
        fleet, start=begin, days=days, seed=seed, scale=scale, scrape_s=vllm_interval_s,
        traces=traces,
    )  # fmt: skip
    rng = np.random.default_rng([seed, 2])
    step(f"writing {traffic.requests.height:,} requests")
    append("requests", traffic.requests)
    append("cache_events", _shim_cache_events(traffic.requests))
    step("simulating DCGM GPU telemetry")
    gpu, gpu_health = gpu_samples(fleet, traffic, begin, horizon, rng)
    step(f"writing {gpu.height:,} GPU samples")
    append("gpu_samples", gpu)
    append("scrape_health", gpu_health)
    del gpu
    step("simulating vLLM /metrics scrapes")
    serving, serving_health, prefix = serving_samples(
        fleet, traffic, begin, horizon, rng, interval_s=vllm_interval_s
    )
    step(f"writing {serving.height:,} serving samples")
    append("serving_samples", serving)
    append("scrape_health", serving_health)
    append("cache_events", prefix)
    del serving
    step("feeding a malformed shim log")
    append("requests", _malformed_log(traffic.requests, rng), source="ingest:shim-log")
    lake.reject(
        "requests",
        [{"location": "shim-log.jsonl:4711", "raw": '{"request_id": "req-', "reason": "line is "
          "not valid JSON: unexpected end of data at column 20"}],
        source="ingest:shim-log",
        now=now,
    )  # fmt: skip
    r = traffic.restart
    result.restart = {
        "pod": fleet.replicas[r.replica].pod,
        "at": begin + dt.timedelta(seconds=r.at_s),
        "down_s": r.down_s,
    }
    result.incidents = [
        {
            "tier": ("small", "mid", "large")[i.tier],
            "start": begin + dt.timedelta(seconds=i.start_s),
            "end": begin + dt.timedelta(seconds=i.end_s),
            "status": i.status,
        }
        for i in traffic.incidents
    ]
    return result
