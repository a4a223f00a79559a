"""Prometheus / Thanos HTTP API (`/api/v1/query_range`) -> the lake.

For teams whose metrics already live in Prometheus, and the way past direct
scraping at scale. What it handles:

- Prometheus refuses ranges over 11,000 points per series, so a long range is
  split into chunks of at most `MAX_POINTS` steps and fetched one by one
  (`iter_range` yields each as it arrives; each request has its own timeout);
- resume: a checkpoint (one JSON file per URL + query) remembers the end of
  the last loaded chunk, committed only after that chunk reached the lake;
  the next run starts one step later;
- `warnings` (and Thanos' partial responses, which come as warnings) keep the
  data and are reported in `scrape_health.error`; `status: error` responses
  name the `errorType` and `error`;
- values arrive as strings (`"1.5"`, `"NaN"`, `"+Inf"`); gaps simply have no
  points: nothing is filled in.

Mapping: `DCGM_*` series go to `gpu_samples` (same label rules as the
exporter, `source = "prometheus"`); everything else goes to
`serving_samples` with vLLM names normalized, `target` = the series'
`instance` label (else the API URL), and `type` inferred from the name
(`_total` counter, `_bucket`/`_sum`/`_count` histogram parts, else gauge —
query_range does not say).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import math
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
import polars as pl

from collectors import dcgm as dcgm_mod
from collectors.exposition import ParseResult
from collectors.vllm import normalize_names

MAX_POINTS = 11_000
"""Prometheus' limit of points per series in one query_range answer."""


class PrometheusAPIError(RuntimeError):
    """The API answered `status: error`, or not in its JSON format at all."""


class RangeTimeout(PrometheusAPIError):
    """One query_range request did not complete within its timeout."""


@dataclass
class RangeResult:
    """Rows one or more chunks produced, and what the API said along the way."""

    gpu: pl.DataFrame | None = None
    serving: pl.DataFrame | None = None
    points: int = 0
    series: int = 0
    warnings: list[str] = field(default_factory=list)
    chunks: int = 0
    end: dt.datetime | None = None  # end of the last chunk fetched


def chunks(
    start: dt.datetime, end: dt.datetime, step: float, max_points: int = MAX_POINTS
) -> list[tuple[dt.datetime, dt.datetime]]:
    """Split [start, end] so no chunk has more than `max_points` points per series.

    Chunks do not overlap: each starts one step after the previous one ends.
    """
    if step <= 0:
        raise ValueError(f"step must be > 0 seconds, got {step}")
    if end < start:
        return []
    span = dt.timedelta(seconds=step * (max_points - 1))
    out = []
    cur = start
    while cur <= end:
        stop = min(cur + span, end)
        out.append((cur, stop))
        cur = stop + dt.timedelta(seconds=step)
    return out


def parse_response(body: bytes, *, url: str) -> tuple[list[dict[str, Any]], list[str]]:
    """Check Prometheus' envelope; return (result series, warnings)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        excerpt = body[:120].decode("utf-8", "replace").replace("\n", " ")
        raise PrometheusAPIError(
            f"{url}: not Prometheus API JSON (starts with {excerpt!r})"
        ) from None
    if not isinstance(doc, dict) or "status" not in doc:
        raise PrometheusAPIError(f"{url}: JSON without a 'status' field: not a Prometheus API")
    warnings = [str(w) for w in doc.get("warnings") or []]
    if doc["status"] != "success":
        raise PrometheusAPIError(
            f"{url}: Prometheus error {doc.get('errorType', '?')}: {doc.get('error', '?')}"
        )
    data = doc.get("data") or {}
    rtype = data.get("resultType")
    if rtype not in ("matrix", "vector"):
        raise PrometheusAPIError(f"{url}: expected resultType matrix, got {rtype!r}")
    return list(data.get("result") or []), warnings


def _infer_type(name: str) -> str:
    if name.endswith("_total"):
        return "counter"
    if name.endswith(("_bucket", "_sum", "_count")):
        return "histogram"
    return "gauge"


def result_to_rows(
    result: list[dict[str, Any]], *, url: str, query: str, name: str | None = None
) -> tuple[pl.DataFrame | None, pl.DataFrame | None, int]:
    """Turn a matrix result into gpu_samples and serving_samples frames."""
    names: list[str] = []
    labels: list[str] = []
    ts: list[float] = []
    values: list[float] = []
    for series in result:
        metric = dict(series.get("metric") or {})
        mname = metric.pop("__name__", None) or name or query
        lab = orjson.dumps(metric, option=orjson.OPT_SORT_KEYS).decode()
        points = series.get("values")
        if points is None and "value" in series:
            points = [series["value"]]
        for t, v in points or []:
            names.append(mname)
            labels.append(lab)
            ts.append(float(t))
            values.append(_num(v))
    if not names:
        return None, None, 0
    df = pl.DataFrame(
        {
            "name": names,
            "labels": labels,
            "ts_s": ts,
            "value": values,
        },
        schema={"name": pl.String, "labels": pl.String, "ts_s": pl.Float64, "value": pl.Float64},
    )
    df = df.with_columns(
        timestamp_ms=(pl.col("ts_s") * 1000).round(0).cast(pl.Int64),
        line=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
    )
    is_dcgm = pl.col("name").str.starts_with("DCGM_")
    gpu_part = df.filter(is_dcgm)
    serving_part = df.filter(~is_dcgm)
    gpu = serving = None
    now = dt.datetime.now(dt.UTC)
    if gpu_part.height:
        parsed = ParseResult(
            samples=gpu_part.select(
                "name", "labels", "value", "timestamp_ms", type=pl.lit("gauge"), line="line"
            ),
            rejects=pl.DataFrame(),
        )
        gpu = dcgm_mod.gpu_rows(parsed, ts=now, target=url, source="prometheus").rows
        gpu = gpu.with_columns(pl.lit(f"{url} query {query!r}").alias("_location"))
    if serving_part.height:
        metric = normalize_names(pl.col("name"))
        serving = serving_part.select(
            ts=pl.from_epoch("timestamp_ms", time_unit="ms")
            .dt.cast_time_unit("us")
            .dt.replace_time_zone("UTC"),
            source=pl.lit("prometheus"),
            target=pl.coalesce(pl.col("labels").str.json_path_match("$.instance"), pl.lit(url)),
            metric=metric,
            type=metric.map_elements(_infer_type, return_dtype=pl.String),
            labels="labels",
            model_name=pl.col("labels").str.json_path_match("$.model_name"),
            value="value",
            _location=pl.lit(f"{url} query {query!r}"),
        )
    return gpu, serving, len(names)


def _num(v: Any) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def atomic_write_text(path: Path, text: str) -> None:
    """Temp file, fsync, rename: a crash leaves the old checkpoint or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


@dataclass
class RangeCheckpoint:
    """The end of the last chunk that reached the lake, per (URL, query)."""

    path: Path

    @classmethod
    def for_query(
        cls, checkpoint_dir: str | os.PathLike[str], url: str, query: str
    ) -> RangeCheckpoint:
        digest = hashlib.blake2b(f"{url}\0{query}".encode(), digest_size=8).hexdigest()
        return cls(Path(checkpoint_dir) / f"prometheus-{digest}.json")

    def load(self) -> dt.datetime | None:
        """The saved end, or None with no file; a damaged file raises PrometheusAPIError.

        The error names the file and the remedy (the target reports it in
        scrape_health), not a bare KeyError from deep inside the collector.
        """
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise self._unusable(f"unreadable ({exc})") from None
        if not isinstance(doc, dict):
            raise self._unusable(f"expected a JSON object, got {type(doc).__name__}")
        until = doc.get("loaded_until")
        if not isinstance(until, str):
            got = "missing" if "loaded_until" not in doc else repr(until)
            raise self._unusable(f'field "loaded_until": expected an ISO 8601 time, got {got}')
        try:
            loaded = dt.datetime.fromisoformat(until)
        except ValueError:
            raise self._unusable(
                f'field "loaded_until": expected an ISO 8601 time, got {until!r}'
            ) from None
        if loaded.tzinfo is None:
            raise self._unusable(
                f'field "loaded_until": expected a time with a UTC offset, got {until!r}'
            )
        return loaded

    def _unusable(self, problem: str) -> PrometheusAPIError:
        return PrometheusAPIError(
            f"{self.path}: checkpoint {problem}; move it away to re-read the lookback "
            "window (duplicates are dropped by the lake's keys)"
        )

    def save(self, until: dt.datetime, *, url: str, query: str) -> None:
        atomic_write_text(
            self.path,
            json.dumps({"url": url, "query": query, "loaded_until": until.isoformat()}),
        )


async def iter_range(
    client: httpx.AsyncClient,
    url: str,
    query: str,
    start: dt.datetime,
    end: dt.datetime,
    step: float,
    *,
    timeout: float = 30.0,
    max_points: int = MAX_POINTS,
    name: str | None = None,
) -> AsyncIterator[RangeResult]:
    """Fetch [start, end] chunk by chunk, yielding each chunk's rows as it arrives.

    The caller can commit every chunk (lake, then checkpoint) before the next
    request, so a long catch-up moves forward even when a later request fails
    or the process stops. `timeout` bounds each request as a whole: httpx's
    own timeouts apply per network read, which a server dripping its answer
    never trips.
    """
    api = url.rstrip("/") + "/api/v1/query_range"
    parts = chunks(start, end, step, max_points)
    for i, (a, b) in enumerate(parts, start=1):
        request = client.get(
            api,
            params={
                "query": query,
                "start": f"{a.timestamp():.3f}",
                "end": f"{b.timestamp():.3f}",
                "step": f"{step:g}",
            },
            timeout=timeout,
        )
        try:
            resp = await asyncio.wait_for(request, timeout)
        except (TimeoutError, httpx.TimeoutException):
            where = f" (request {i} of {len(parts)})" if len(parts) > 1 else ""
            raise RangeTimeout(f"timed out after {timeout:g}s{where}") from None
        if resp.status_code >= 400 and not resp.headers.get("content-type", "").startswith(
            "application/json"
        ):
            raise PrometheusAPIError(f"{api}: HTTP {resp.status_code}: {resp.text[:200]!r}")
        result, warnings = parse_response(resp.content, url=api)
        gpu, serving, points = result_to_rows(result, url=url, query=query, name=name)
        yield RangeResult(
            gpu=gpu,
            serving=serving,
            points=points,
            series=len(result),
            warnings=warnings,
            chunks=1,
            end=b,
        )
