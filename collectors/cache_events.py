"""Cache hits into `cache_events`, so the marts can price what each cache layer saved.

Two producers live here:
- the routing shim's response cache: each request-log record with
  `cache_status` `hit` or `coalesced` spent no upstream tokens; it becomes one
  `shim_response` event carrying the input + output tokens it avoided. The
  request-log ingest (`collectors.logs`) writes these in the same pass.
- generic cache-event logs (JSONL/CSV/Parquet): natively, records with the
  table's column names (`ts`, `layer`, `event`, `tokens`, ...), or anything
  else through a mapping file with `table = "cache_events"`.

(vLLM prefix-cache counters become `vllm_prefix` events in the vLLM scraper.)
"""

from __future__ import annotations

import datetime as dt
import os
from typing import TYPE_CHECKING

import polars as pl

from finops.lake import Lake, coerce
from finops.schemas import CACHE_EVENTS, REQUESTS

if TYPE_CHECKING:
    from collectors.logs import FileReport

SHIM_CACHE_STATUSES = ("hit", "coalesced")


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=CACHE_EVENTS.polars_schema)


def shim_cache_events(rows: pl.DataFrame, source: str) -> pl.DataFrame:
    """Response-cache hits of shim request-log rows as `cache_events` rows.

    A hit (or a request coalesced onto an identical in-flight one) is recorded
    as event `hit`: both avoided an upstream call, and `requests.cache_status`
    keeps which it was. The event id derives from the request id, so reading
    the same log twice adds nothing. Rows the requests table would reject
    (no id, no valid time, negative tokens) yield no event.
    """
    need = ("request_id", "ts", "cache_status")
    if rows.height == 0 or any(c not in rows.columns for c in need):
        return _empty()
    hits = rows.filter(
        pl.col("cache_status").cast(pl.String).str.to_lowercase().is_in(SHIM_CACHE_STATUSES)
    )
    if hits.height == 0:
        return _empty()
    hits = hits.with_columns(
        [
            coerce(hits[c], REQUESTS.columns[c]).alias(c)
            for c in ("request_id", "ts", "input_tokens", "output_tokens")
            if c in hits.columns
        ]
    )
    zero = pl.lit(0, dtype=pl.Int64)
    inp = pl.col("input_tokens") if "input_tokens" in hits.columns else zero
    out = pl.col("output_tokens") if "output_tokens" in hits.columns else zero
    tokens = inp.fill_null(0) + out.fill_null(0)
    ok = (
        pl.col("request_id").is_not_null()
        & pl.col("ts").is_not_null()
        & (inp.fill_null(0) >= 0)
        & (out.fill_null(0) >= 0)
    )

    def text(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.String) if c in hits.columns else pl.lit(None, dtype=pl.String)

    return hits.filter(ok).select(
        pl.format("shim_response:{}", pl.col("request_id")).alias("event_id"),
        pl.col("ts"),
        pl.lit(source).alias("source"),
        pl.lit("shim_response").alias("layer"),
        pl.lit("hit").alias("event"),
        text("tenant").alias("tenant"),
        text("tier").alias("tier"),
        text("response_model").alias("model"),
        pl.col("request_id"),
        tokens.cast(pl.Int64).alias("tokens"),
        pl.lit(1, dtype=pl.Int64).alias("requests"),
    )


def ingest_cache_events(
    path: str | os.PathLike[str],
    lake: Lake,
    *,
    mapping: str | None = None,
    base_ts: dt.datetime | None = None,
) -> FileReport:
    """Load a generic cache-event log (native columns, or through a mapping).

    Returns a `collectors.logs.FileReport`. A record without `layer` is a
    `generic` one; a record without `event_id` gets a deterministic one
    (hash of its content and line), so re-ingest adds nothing.
    """
    from collectors.logs import ingest_file

    return ingest_file(path, lake, table="cache_events", mapping=mapping, base_ts=base_ts)
