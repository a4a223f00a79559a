"""Prometheus / Thanos HTTP API (`/api/v1/query_range`) -> the lake.

For teams whose metrics already live in Prometheus, and the way past direct
scraping at scale. What it handles:

- a long range is split into requests bounded two ways: at most `max_points`
  steps per series (Prometheus refuses more than 11,000), and at most
  `max_samples` samples (series x steps) in all, the series count learnt from
  the previous answer (the first request assumes `FIRST_CHUNK_SERIES`); each
  chunk is fetched, turned into rows and yielded before the next request
  (`iter_range`; each request has its own timeout). A server refusing a chunk
  as too many samples (`--query.max-samples`), or timing out (the server's own
  query timeout, or this request's), gets the same start with half the span: a
  refusal for size down to one step, a timeout `TIMEOUT_SPLITS` times in a row
  (a server that hangs for every request costs that many timeouts, no more);
- steps lie on one grid for every run: multiples of `step` since the epoch.
  Each chunk reports as loaded-until the last grid point Prometheus evaluated
  (not the end asked for), so the next run, starting one step later, neither
  skips nor repeats a point;
- resume: a checkpoint (one JSON file per URL + query) remembers the end of
  the last loaded chunk, committed only after that chunk reached the lake;
- `warnings` (and Thanos' partial responses, which come as warnings) keep the
  data and are reported in `scrape_health.error`; `status: error` responses
  name the `errorType` and `error`;
- values arrive as strings (`"1.5"`, `"NaN"`, `"+Inf"`); gaps simply have no
  points: nothing is filled in. A point that is no pair of numbers (a timestamp
  `"x"`, a value `"abc"`) or a series of the wrong shape is left out and
  reported (`RangeResult.rejects`, naming the series); the rest loads.

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
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
import polars as pl

from collectors import dcgm as dcgm_mod
from collectors.exposition import ParseResult
from collectors.vllm import normalize_names

MAX_POINTS = 11_000
"""Prometheus' limit of points per series in one query_range answer."""

MAX_SAMPLES = 2_000_000
"""Samples (series x steps) one request may ask for: bounds what one answer costs
the collector (a few hundred bytes a sample while it becomes rows) and stays far
below Prometheus' own `--query.max-samples` (50 million by default)."""

FIRST_CHUNK_SERIES = 10_000
"""Series a query is assumed to have until its first answer says how many."""

_TOO_MANY = re.compile(
    r"too many samples|maxSamplesPerQuery|exceeded maximum resolution", re.IGNORECASE
)
"""A server refusing a request for its size: Prometheus/Thanos' `--query.max-samples`
("query processing would load too many samples into memory"), VictoriaMetrics'
`-search.maxSamplesPerQuery`, the 11,000-points-per-series limit."""

_SERVER_TIMEOUT = re.compile(r"query timed out|timeout exceeded|deadline exceeded", re.IGNORECASE)
"""A server giving up on a request for its cost: Prometheus/Thanos' `--query.timeout`
("query timed out in expression evaluation", `errorType: timeout`, HTTP 503),
VictoriaMetrics' `-search.maxQueryDuration` ("timeout exceeded")."""

TIMEOUT_SPLITS = 2
"""Times in a row a timed-out request is asked again for half its span before the
attempt fails: a heavy range gets a quarter of the span; a dead server costs three
timeouts, not log2(span)."""

_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
_MS = dt.timedelta(milliseconds=1)


class PrometheusAPIError(RuntimeError):
    """The API answered `status: error`, or not in its JSON format at all."""


class RangeTimeout(PrometheusAPIError):
    """One query_range request did not complete within its timeout."""


class TooManySamples(PrometheusAPIError):
    """The server refused a request as too large (samples or points per series)."""


class ServerTimeout(PrometheusAPIError):
    """The server gave up evaluating a request within its own query timeout."""


@dataclass
class RangeResult:
    """Rows one or more chunks produced, and what the API said along the way."""

    gpu: pl.DataFrame | None = None
    serving: pl.DataFrame | None = None
    points: int = 0
    series: int = 0
    warnings: list[str] = field(default_factory=list)
    chunks: int = 0
    end: dt.datetime | None = None  # the last step the last chunk evaluated (on the grid)
    # series and points the answer held that are no data (table -> location/raw/reason)
    rejects: dict[str, list[dict[str, str]]] = field(default_factory=dict)


def _step_ms(step: float) -> int:
    if not step > 0:
        raise ValueError(f"step must be > 0 seconds, got {step}")
    ms = round(step * 1000)
    if ms < 1:
        raise ValueError(f"step must be at least 1 ms (Prometheus' resolution), got {step}")
    return ms


def _epoch_ms(t: dt.datetime, *, up: bool) -> int:
    """`t` in whole milliseconds since the epoch, rounded up or down (naive = local time)."""
    delta = (t if t.tzinfo else t.astimezone()) - _EPOCH
    return -(-delta // _MS) if up else delta // _MS


def _at(ms: int) -> dt.datetime:
    return _EPOCH + ms * _MS


def _api_time(ms: int) -> str:
    return f"{ms // 1000}.{ms % 1000:03d}"


def grid_bounds(start: dt.datetime, end: dt.datetime, step: float) -> tuple[int, int, int]:
    """(first, last, step) in epoch milliseconds: the grid points in [start, end].

    The grid is every multiple of `step` since the epoch, the same for every run
    and restart. `first > last` when no grid point lies in the range.
    """
    step_ms = _step_ms(step)
    first = -(-_epoch_ms(start, up=True) // step_ms) * step_ms
    last = _epoch_ms(end, up=False) // step_ms * step_ms
    return first, last, step_ms


def points_per_series(series: int, max_points: int, max_samples: int) -> int:
    """Steps one request may span: `max_points`, fewer when many series share the budget."""
    return max(1, min(max_points, max_samples // max(series, 1)))


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
        error = f"{url}: Prometheus error {doc.get('errorType', '?')}: {doc.get('error', '?')}"
        if _TOO_MANY.search(str(doc.get("error", ""))):
            raise TooManySamples(error)
        if doc.get("errorType") == "timeout" or _SERVER_TIMEOUT.search(str(doc.get("error", ""))):
            raise ServerTimeout(error)
        raise PrometheusAPIError(error)
    data = doc.get("data") or {}
    if not isinstance(data, dict):
        raise PrometheusAPIError(f"{url}: 'data' must be an object, got {_excerpt(data)}")
    rtype = data.get("resultType")
    if rtype not in ("matrix", "vector"):
        raise PrometheusAPIError(f"{url}: expected resultType matrix, got {rtype!r}")
    result = data.get("result") or []
    if not isinstance(result, list):
        raise PrometheusAPIError(
            f"{url}: 'data.result' must be a list of series, got {_excerpt(result)}"
        )
    return result, warnings


def _infer_type(name: str) -> str:
    if name.endswith("_total"):
        return "counter"
    if name.endswith(("_bucket", "_sum", "_count")):
        return "histogram"
    return "gauge"


def _type_expr(metric: pl.Expr) -> pl.Expr:
    """`_infer_type`, vectorized."""
    return (
        pl.when(metric.str.ends_with("_total"))
        .then(pl.lit("counter"))
        .when(
            metric.str.ends_with("_bucket")
            | metric.str.ends_with("_sum")
            | metric.str.ends_with("_count")
        )
        .then(pl.lit("histogram"))
        .otherwise(pl.lit("gauge"))
    )


def _columns(points: list[Any]) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """One series' `[[t, "v"], ...]` as (timestamps, values) float arrays, and its bad points.

    numpy reads the pairs in one pass (Prometheus' value strings, `"NaN"`,
    `"+Inf"`, included). When it cannot, each point is read on its own: one
    that is no `[timestamp, "value"]` pair of numbers is left out and returned
    as (index, reason), so the rest of the series still loads.
    """
    try:
        pairs = np.array(points, dtype=np.float64)
    except (TypeError, ValueError):
        pairs = None
    ok = pairs is not None and pairs.ndim == 2 and pairs.shape[1] == 2
    if ok and np.isfinite(pairs[:, 0]).all():  # type: ignore[index]
        return pairs[:, 0], pairs[:, 1], []  # type: ignore[index]
    ts: list[float] = []
    values: list[float] = []
    bad: list[tuple[int, str]] = []
    for i, p in enumerate(points):
        if not isinstance(p, list | tuple) or len(p) != 2:
            bad.append((i, f'expected a [timestamp, "value"] pair, got {_excerpt(p)}'))
            continue
        t, v = _num(p[0]), _num(p[1])
        if not math.isfinite(t) or isinstance(p[0], bool):
            bad.append((i, f"timestamp {_excerpt(p[0])} is not a number of seconds"))
        elif math.isnan(v) and not _is_nan_text(p[1]):
            bad.append((i, f"value {_excerpt(p[1])} is not a number"))
        else:
            ts.append(t)
            values.append(v)
    return np.array(ts, dtype=np.float64), np.array(values, dtype=np.float64), bad


def _is_nan_text(v: Any) -> bool:
    """Whether a value that reads as NaN says NaN (Prometheus' "NaN"), not garbage."""
    return isinstance(v, float) or (isinstance(v, str) and v.strip().lower() == "nan")


def _excerpt(v: Any) -> str:
    text = orjson.dumps(v, default=str).decode()
    return text if len(text) <= 60 else text[:57] + "..."


def result_to_rows(
    result: list[dict[str, Any]],
    *,
    url: str,
    query: str,
    name: str | None = None,
    consume: bool = False,
    rejects: dict[str, list[dict[str, str]]] | None = None,
) -> tuple[pl.DataFrame | None, pl.DataFrame | None, int]:
    """Turn a matrix result into gpu_samples and serving_samples frames.

    Built column-wise: one row per series for the names and labels (and what
    is derived from them), one float array per series for the points, joined
    at the end. No Python object per point beyond what the JSON parser made;
    with `consume`, each series of `result` is dropped (set to None) once read,
    so the parsed answer is freed before the rows are built.

    A series that is no `{"metric": {...}, "values": [...]}` object, and a
    point that is no pair of numbers, is left out; the rest loads. What was
    left out and why goes to `rejects` (table -> location/raw/reason rows)
    when given.
    """
    where: list[int] = []  # each kept series' index in `result`
    names: list[str] = []
    labels: list[str] = []
    counts: list[int] = []
    pending: list[list[Any] | None] = []
    series: Any = None
    points: Any = None
    location = f"{url} query {query!r}"

    def refuse(k: int, series_name: str | None, raw: Any, reason: str) -> None:
        if rejects is None:
            return
        table = "gpu_samples" if (series_name or "").startswith("DCGM_") else "serving_samples"
        rejects.setdefault(table, []).append(
            {"location": f"{location} result[{k}]", "raw": _excerpt(raw), "reason": reason}
        )

    for k, series in enumerate(result):
        if consume:
            result[k] = None  # type: ignore[call-overload]
        if not isinstance(series, dict):
            refuse(
                k, name, series, f"result[{k}]: expected a series object, got {_excerpt(series)}"
            )
            continue
        metric = series.get("metric") or {}
        if not isinstance(metric, dict):
            refuse(
                k,
                name,
                series,
                f"result[{k}]: 'metric' must be an object of labels, got {_excerpt(metric)}",
            )
            continue
        metric = dict(metric)
        series_name = metric.pop("__name__", None) or name or query
        what = f"result[{k}] ({series_name}{_excerpt(metric) if metric else ''})"
        points = series.get("values")
        if points is None and "value" in series:
            points = [series["value"]]
        if points is not None and not isinstance(points, list):
            refuse(
                k,
                series_name,
                series,
                f"{what}: 'values' must be a list of [timestamp, \"value\"] pairs, "
                f"got {_excerpt(points)}",
            )
            continue
        if not points:
            continue
        where.append(k)
        names.append(series_name)
        labels.append(orjson.dumps(metric, option=orjson.OPT_SORT_KEYS).decode())
        counts.append(len(points))
        pending.append(points)
    del series, points
    if not names:
        return None, None, 0
    n = int(sum(counts))
    ts_all = np.empty(n, dtype=np.float64)
    values_all = np.empty(n, dtype=np.float64)
    offset = 0
    for j, k in enumerate(where):
        points, pending[j] = pending[j], None  # with `consume`, its last reference
        assert points is not None
        ts, values, bad = _columns(points)
        for i, reason in bad:
            raw = {"metric": {"__name__": names[j], **orjson.loads(labels[j])}, "point": points[i]}
            refuse(k, names[j], raw, f"result[{k}] ({names[j]}{labels[j]}): point {i}: {reason}")
        counts[j] = len(ts)
        ts_all[offset : offset + counts[j]], values_all[offset : offset + counts[j]] = ts, values
        offset += counts[j]
    del points, pending
    if offset < n:  # bad points left out
        n = offset
        ts_all, values_all = ts_all[:n], values_all[:n]
    sids = pl.Series("sid", np.arange(len(names), dtype=np.uint32))
    per_series = pl.DataFrame(
        [sids, pl.Series("name", names, pl.String), pl.Series("labels", labels, pl.String)]
    )
    points_df = pl.DataFrame(
        [
            pl.Series("sid", np.repeat(sids.to_numpy(), counts)),
            pl.Series("ts_s", ts_all),
            pl.Series("value", values_all),
        ]
    )
    del ts_all, values_all
    points_df = points_df.select(
        "sid",
        "value",
        timestamp_ms=(pl.col("ts_s") * 1000).round(0).cast(pl.Int64),
        line=pl.int_range(1, pl.len() + 1, dtype=pl.Int64),
    )
    is_dcgm = per_series["name"].str.starts_with("DCGM_")
    gpu = serving = None
    if is_dcgm.any():
        gpu = _gpu_rows(points_df, per_series.filter(is_dcgm), url=url, location=location)
    if not is_dcgm.all():
        metric = normalize_names(pl.col("name"))
        meta = per_series.filter(~is_dcgm).select(
            "sid",
            "labels",
            target=pl.coalesce(pl.col("labels").str.json_path_match("$.instance"), pl.lit(url)),
            metric=metric,
            type=_type_expr(metric),
            model_name=pl.col("labels").str.json_path_match("$.model_name"),
        )
        serving = _points_of(points_df, meta).select(
            ts=pl.from_epoch("timestamp_ms", time_unit="ms")
            .dt.cast_time_unit("us")
            .dt.replace_time_zone("UTC"),
            source=pl.lit("prometheus"),
            target="target",
            metric="metric",
            type="type",
            labels="labels",
            model_name="model_name",
            value="value",
            _location=pl.lit(location),
        )
    return gpu, serving, n


_PER_POINT = ("ts", "value", "_location", "_raw")
"""The columns of `dcgm.gpu_rows` that differ from one point of a series to the next."""


def _gpu_rows(
    points: pl.DataFrame, series: pl.DataFrame, *, url: str, location: str
) -> pl.DataFrame:
    """gpu_samples rows: the exporter's label rules (`dcgm.gpu_rows`) once per series,
    then joined to the series' points (the per-point columns as `gpu_rows` makes them)."""
    one_each = ParseResult(
        samples=series.select(
            "name",
            "labels",
            value=pl.lit(0.0),
            timestamp_ms=pl.lit(0, dtype=pl.Int64),
            type=pl.lit("gauge"),
            line=pl.col("sid").cast(pl.Int64),
        ),
        rejects=pl.DataFrame(),
    )
    now = dt.datetime.now(dt.UTC)
    per_series = dcgm_mod.gpu_rows(one_each, ts=now, target=url, source="prometheus").rows
    if per_series.height != series.height:  # gpu_rows keeps each DCGM_ sample, in order
        raise AssertionError("dcgm.gpu_rows dropped or added rows")
    order = per_series.columns
    per_series = per_series.select(pl.exclude(_PER_POINT)).with_columns(
        sid=series["sid"], _name=series["name"], _labels=series["labels"]
    )
    blank = (pl.col("value") >= dcgm_mod.DCGM_BLANK_MIN) | pl.col("value").is_in(
        dcgm_mod.DCGM_BLANKS
    )
    return (
        _points_of(points, per_series)
        .with_columns(
            ts=pl.from_epoch("timestamp_ms", time_unit="ms")
            .dt.cast_time_unit("us")
            .dt.replace_time_zone("UTC"),
            _location=pl.lit(location),
            _raw=pl.format("{}{} {}", pl.col("_name"), pl.col("_labels"), pl.col("value")),
            value=pl.when(blank).then(None).otherwise(pl.col("value")),
        )
        .select(order)
    )


def _points_of(points: pl.DataFrame, per_series: pl.DataFrame) -> pl.DataFrame:
    """The points of these series (in result order), with the series' columns."""
    if per_series.height != points["sid"].n_unique():
        points = points.filter(pl.col("sid").is_in(per_series["sid"].implode()))
    return points.join(per_series, on="sid", how="left", maintain_order="left")


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
    max_samples: int | None = None,
    name: str | None = None,
) -> AsyncIterator[RangeResult]:
    """Fetch [start, end] chunk by chunk, yielding each chunk's rows as it arrives.

    Steps lie on the epoch-aligned grid of `step` (see `grid_bounds`); each
    result's `end` is the last grid point its request evaluated, so a caller
    resuming at `end + step` continues on the same grid and loses no point.
    A chunk spans at most `max_points` steps and `max_samples` (default
    `MAX_SAMPLES`) samples, with the series count of the previous answer; a
    server refusing a chunk as too many samples is asked again for half of it,
    and so is a chunk that times out (on the server or here), at most
    `TIMEOUT_SPLITS` times in a row. Later chunks keep the smaller span.

    The caller can commit every chunk (lake, then checkpoint) before the next
    request, so a long catch-up moves forward even when a later request fails
    or the process stops. `timeout` bounds each request as a whole: httpx's
    own timeouts apply per network read, which a server dripping its answer
    never trips.
    """
    budget = MAX_SAMPLES if max_samples is None else max_samples
    api = url.rstrip("/") + "/api/v1/query_range"
    cur, last, step_ms = grid_bounds(start, end, step)
    span = points_per_series(FIRST_CHUNK_SERIES, max_points, budget)
    cap = max(max_points, 1)  # lowered when the server refuses a span as too large or slow
    timeouts = 0  # consecutive timed-out requests (each halves the span)
    i = 0
    while cur <= last:
        i += 1
        b = min(cur + (min(span, cap) - 1) * step_ms, last)
        request = client.get(
            api,
            params={
                "query": query,
                "start": _api_time(cur),
                "end": _api_time(b),
                "step": _api_time(step_ms),
            },
            timeout=timeout,
        )
        steps = (b - cur) // step_ms + 1
        try:
            resp = await asyncio.wait_for(request, timeout)
        except (TimeoutError, httpx.TimeoutException):
            if timeouts < TIMEOUT_SPLITS and steps > 1:
                timeouts += 1
                cap = steps // 2  # same start, half the span
                continue
            total = i + -(-(last - b) // (step_ms * min(span, cap)))
            where = f" (request {i} of {total})" if total > 1 else ""
            again = (
                f", {timeouts + 1} times in a row, the span halved each time" if timeouts else ""
            )
            raise RangeTimeout(f"timed out after {timeout:g}s{where}{again}") from None
        try:
            if resp.status_code >= 400 and not resp.headers.get("content-type", "").startswith(
                "application/json"
            ):
                error = f"{api}: HTTP {resp.status_code}: {resp.text[:200]!r}"
                if _TOO_MANY.search(resp.text[:2000]):
                    raise TooManySamples(error)
                if resp.status_code == 504 or _SERVER_TIMEOUT.search(resp.text[:2000]):
                    raise ServerTimeout(error)  # a gateway in front giving up, or the server
                raise PrometheusAPIError(error)
            result, warnings = parse_response(resp.content, url=api)
        except ServerTimeout as exc:
            if timeouts < TIMEOUT_SPLITS and steps > 1:
                timeouts += 1
                cap = steps // 2
                continue
            again = (
                f", {timeouts + 1} times in a row, the span halved each time" if timeouts else ""
            )
            raise ServerTimeout(
                f"query {query!r} timed out on the server at {_at(cur).isoformat()}{again} "
                f"({exc}); make the query cheaper, or raise the server's --query.timeout"
            ) from None
        except TooManySamples as exc:
            if steps <= 1:
                raise TooManySamples(
                    f"query {query!r} is refused as too large even for a single step "
                    f"at {_at(cur).isoformat()} ({exc}); split the query (e.g. by a "
                    "label matcher) or raise the server's --query.max-samples"
                ) from None
            cap = steps // 2  # same start, half the span
            continue
        del resp
        timeouts = 0
        series = len(result)
        # the parsed answer is freed series by series as it becomes columns
        rejects: dict[str, list[dict[str, str]]] = {}
        gpu, serving, points = result_to_rows(
            result, url=url, query=query, name=name, consume=True, rejects=rejects
        )
        del result
        span = points_per_series(series, max_points, budget)
        yield RangeResult(
            gpu=gpu,
            serving=serving,
            points=points,
            series=series,
            warnings=warnings,
            chunks=1,
            end=_at(b),
            rejects=rejects,
        )
        cur = b + step_ms
