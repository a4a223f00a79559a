"""Cache hits into `cache_events`, so the marts can price what each cache layer saved.

Two producers live here:
- the routing shim's response cache: each served request-log record with
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
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from finops.lake import Lake, coerce
from finops.schemas import CACHE_EVENTS, REQUESTS

if TYPE_CHECKING:
    from collectors.logs import FileReport

SHIM_CACHE_STATUSES = ("hit", "coalesced")


def _empty() -> pl.DataFrame:
    return pl.DataFrame(schema=CACHE_EVENTS.polars_schema)


_HIT = pl.col("cache_status").cast(pl.String).str.to_lowercase().is_in(SHIM_CACHE_STATUSES)


def _served(rows: pl.DataFrame) -> pl.Expr:
    """The request was answered: status below 400 (or not logged) and no error_type.

    A coalesced follower whose client left (499, client_disconnected) or a hit that
    failed to be sent saved nothing; a failed or refused request is no original."""
    ok = pl.lit(True)
    if "status_code" in rows.columns:
        code = pl.col("status_code").cast(pl.Int64, strict=False)
        ok = ok & (code.is_null() | (code < 400))
    if "error_type" in rows.columns:
        err = pl.col("error_type").cast(pl.String)
        ok = ok & (err.is_null() | (err == ""))
    return ok.fill_null(False)


class AvoidedTokens:
    """Finds the tokens a shim cache hit avoided.

    The shim bills a hit as zero tokens (nothing ran upstream), so the record
    itself does not say what was saved. What was saved is the usage of the
    response that was replayed: the original request (`retry_of`, for an
    idempotent replay), else the latest earlier non-hit request of the same
    tenant with the same `prompt_fingerprint`. Request rows seen during this
    ingest are remembered (as frame references, no copies); what is not found
    there is looked up in the lake. Unknown stays null, never a guess.
    """

    def __init__(self, lake: Lake | None = None, max_rows: int = 2_000_000) -> None:
        self.lake = lake
        self.max_rows = max_rows
        self._frames: deque[pl.DataFrame] = deque()
        self._rows = 0

    @staticmethod
    def _candidates(rows: pl.DataFrame) -> pl.DataFrame:
        """Served non-hit rows with usage: (request_id, ts, tenant, prompt_fingerprint, tokens)."""

        def text(c: str) -> pl.Expr:
            return pl.col(c).cast(pl.String) if c in rows.columns else pl.lit(None, dtype=pl.String)

        inp = pl.col("input_tokens") if "input_tokens" in rows.columns else pl.lit(0)
        out = pl.col("output_tokens") if "output_tokens" in rows.columns else pl.lit(0)
        hit = _HIT if "cache_status" in rows.columns else pl.lit(False)
        return (
            rows.filter(~hit.fill_null(False) & _served(rows))
            .select(
                text("request_id").alias("request_id"),
                pl.col("ts"),
                text("tenant").fill_null("").alias("tenant"),
                text("prompt_fingerprint").alias("prompt_fingerprint"),
                (inp.fill_null(0) + out.fill_null(0)).cast(pl.Int64).alias("tokens"),
            )
            .filter(pl.col("tokens") > 0)
        )

    def observe(self, rows: pl.DataFrame) -> None:
        """Remember request rows (typed `ts`) as possible originals of later hits."""
        if rows.height == 0 or "ts" not in rows.columns:
            return
        if not isinstance(rows.schema["ts"], pl.Datetime):
            return
        frame = self._candidates(rows)
        if frame.height:
            self._frames.append(frame)
            self._rows += frame.height
        while self._rows > self.max_rows and len(self._frames) > 1:
            self._rows -= self._frames.popleft().height

    def _lookup(self, ids: list[str], fps: list[str]) -> pl.DataFrame:
        def want(f: pl.DataFrame | pl.LazyFrame) -> pl.Expr:
            return pl.col("request_id").is_in(ids) | pl.col("prompt_fingerprint").is_in(fps)

        def scan(files: list[Path]) -> pl.DataFrame | None:
            if not files:
                return None
            cols = [
                "request_id",
                "ts",
                "tenant",
                "prompt_fingerprint",
                "input_tokens",
                "output_tokens",
                "cache_status",
            ]
            lazy = pl.scan_parquet(files)
            have = lazy.collect_schema().names()
            cols += [c for c in ("status_code", "error_type") if c in have]
            lazy = lazy.select(cols)
            return lazy.filter(want(lazy)).collect()

        found = [f.filter(want(f)) for f in self._frames]
        # listed again if a compaction in another process replaces files meanwhile
        from_lake = self.lake.read_files("requests", scan) if self.lake is not None else None
        if from_lake is not None:
            found.append(self._candidates(from_lake))
        found = [f for f in found if f.height]
        if not found:
            return pl.DataFrame(
                schema={
                    "request_id": pl.String,
                    "ts": pl.Datetime("us", "UTC"),
                    "tenant": pl.String,
                    "prompt_fingerprint": pl.String,
                    "tokens": pl.Int64,
                }
            )
        return pl.concat(found).unique(["request_id"], keep="last")

    def resolve(self, hits: pl.DataFrame) -> pl.Series:
        """Tokens avoided per hit row (same order); null where the original is unknown."""
        n = hits.height
        zero = pl.lit(0, dtype=pl.Int64)
        inp = pl.col("input_tokens") if "input_tokens" in hits.columns else zero
        out = pl.col("output_tokens") if "output_tokens" in hits.columns else zero
        own = hits.select((inp.fill_null(0) + out.fill_null(0)).cast(pl.Int64)).to_series()
        # a record that carries the replayed usage says it itself
        known = own.set(own <= 0, None) if n else own  # type: ignore[arg-type]
        need = hits.with_row_index("__i").filter(known.is_null())
        if need.height == 0:
            return known.alias("tokens")
        retry = (
            need["retry_of"].cast(pl.String)
            if "retry_of" in need.columns
            else pl.Series([None] * need.height, dtype=pl.String)
        )
        fp = (
            need["prompt_fingerprint"].cast(pl.String)
            if "prompt_fingerprint" in need.columns
            else pl.Series([None] * need.height, dtype=pl.String)
        )
        tenant = (
            need["tenant"].cast(pl.String).fill_null("")
            if "tenant" in need.columns
            else pl.Series([""] * need.height, dtype=pl.String)
        )
        need = need.select(
            "__i",
            pl.col("ts"),
            retry.alias("retry_of"),
            fp.alias("prompt_fingerprint"),
            tenant.alias("tenant"),
        )
        ids = need["retry_of"].drop_nulls().unique().to_list()
        fps = need["prompt_fingerprint"].drop_nulls().unique().to_list()
        if not ids and not fps:
            return known.alias("tokens")
        cand = self._lookup(ids, fps)
        by_id = need.join(
            cand.select("request_id", pl.col("tokens").alias("t_id")),
            left_on="retry_of",
            right_on="request_id",
            how="left",
        )
        by_fp = (
            need.filter(pl.col("prompt_fingerprint").is_not_null())
            .sort("ts")
            .join_asof(
                cand.filter(pl.col("prompt_fingerprint").is_not_null())
                .select("ts", "tenant", "prompt_fingerprint", pl.col("tokens").alias("t_fp"))
                .sort("ts"),
                on="ts",
                by=["tenant", "prompt_fingerprint"],
                strategy="backward",
                check_sortedness=False,  # both sides are sorted by ts just above
            )
            .select("__i", "t_fp")
        )
        found = by_id.join(by_fp, on="__i", how="left").select(
            "__i", pl.coalesce("t_id", "t_fp").alias("t")
        )
        filled = (
            pl.DataFrame({"__i": pl.int_range(n, eager=True, dtype=pl.UInt32), "k": known})
            .join(found, on="__i", how="left")
            .sort("__i")
        )
        return filled.select(pl.coalesce("k", "t").alias("tokens"))["tokens"]


def shim_cache_events(
    rows: pl.DataFrame, source: str, resolver: AvoidedTokens | None = None
) -> pl.DataFrame:
    """Response-cache hits of shim request-log rows as `cache_events` rows.

    A hit (or a request coalesced onto an identical in-flight one) is recorded
    as event `hit`: both avoided an upstream call, and `requests.cache_status`
    keeps which it was. `tokens` is what the hit avoided (`AvoidedTokens`).
    Only requests that were served count (status below 400, no error_type): a
    coalesced follower whose client left (499) avoided nothing anyone received.
    The same rule picks the shim_response line of `finops.costs.cache_savings`.
    The event id derives from the request id, so reading the same log twice
    adds nothing. Rows the requests table would reject (no id, no valid time,
    negative tokens) yield no event.
    """
    need = ("request_id", "ts", "cache_status")
    if rows.height == 0 or any(c not in rows.columns for c in need):
        return _empty()
    typed = rows.with_columns(
        [
            coerce(rows[c], REQUESTS.columns[c]).alias(c)
            for c in ("request_id", "ts", "input_tokens", "output_tokens")
            if c in rows.columns
        ]
    )
    resolver = resolver or AvoidedTokens()
    resolver.observe(typed)
    hits = typed.filter(_HIT.fill_null(False) & _served(typed))
    if hits.height == 0:
        return _empty()
    zero = pl.lit(0, dtype=pl.Int64)
    inp = pl.col("input_tokens") if "input_tokens" in hits.columns else zero
    out = pl.col("output_tokens") if "output_tokens" in hits.columns else zero
    ok = (
        pl.col("request_id").is_not_null()
        & pl.col("ts").is_not_null()
        & (inp.fill_null(0) >= 0)
        & (out.fill_null(0) >= 0)
    )
    hits = hits.filter(ok)
    if hits.height == 0:
        return _empty()
    tokens = resolver.resolve(hits)

    def text(c: str) -> pl.Expr:
        return pl.col(c).cast(pl.String) if c in hits.columns else pl.lit(None, dtype=pl.String)

    return hits.select(
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
