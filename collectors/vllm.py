"""vLLM `/metrics` -> `serving_samples`, and prefix-cache hits -> `cache_events`.

Metric names changed across vLLM releases; a mixed fleet must read as one, so
old names are renamed to the current ones (V1 engine) before they reach the
lake:

| old name (V0 / early V1)                  | lake name                         |
|-------------------------------------------|-----------------------------------|
| `vllm:gpu_cache_usage_perc`               | `vllm:kv_cache_usage_perc`        |
| `vllm:gpu_prefix_cache_queries[_total]`   | `vllm:prefix_cache_queries[_total]` |
| `vllm:gpu_prefix_cache_hits[_total]`      | `vllm:prefix_cache_hits[_total]`  |
| `vllm:time_per_output_token_seconds_*`    | `vllm:inter_token_latency_seconds_*` |

When a release exports both names, the current one wins. OpenMetrics output
with escaped names (prometheus_client's `/metrics/` mount answers with
`escaping=underscores`: `vllm_prompt_tokens_total` under `# TYPE
vllm:prompt_tokens counter`) is read under the family's real name. Histogram buckets
are taken as exported (`le` stays in the labels): nothing assumes bucket
bounds. Labels keep `model_name` and `engine` and are stored as canonical
JSON; `model_name` is also lifted into its own column.

Prefix-cache savings: vLLM counts prefix-cache *queried* and *hit* tokens.
Between two consecutive scrapes of a target, the increase of each (a
decrease of either means vLLM restarted, which resets both: the increase is
the new value, as Prometheus' `increase()` reads it) becomes two
`cache_events` rows of layer `vllm_prefix`: `hit` (tokens served from the
cache) and `miss` (queried but not cached). Event ids are deterministic (target, labels, event, scrape
time), and after a restart the collector takes its baseline from the lake
itself and re-emits the last interval's events (idempotent), so a crash
between writing samples and events neither loses nor doubles tokens.

Which process answered: a scrape's *process identity* is the earliest of its
counters' creation times (the `vllm:*_created` samples prometheus_client
exports, stored in `serving_samples` with the rest), else
`process_start_time_seconds` (then kept as a row too). Increases are taken
within one process only, exactly as `clean.serving_increase` takes them
(finops/sql/clean/20_counters.sql): a process first seen counts from zero if
its counters were created after the target's previous scrape (a restart),
otherwise it gives no increase until its next reading. A URL that
load-balances across replicas (a Kubernetes Service) reaches another process
on each scrape: its identities flip back (A -> B -> A), which a restart never
does; `PrefixCacheTracker.several_processes` tells, and the daemon marks the
target down for it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import polars as pl

from collectors.exposition import ParseResult, _sample_type
from finops.lake import canonical_json

RENAMES: dict[str, str] = {
    "vllm:gpu_cache_usage_perc": "vllm:kv_cache_usage_perc",
    "vllm:gpu_prefix_cache_queries": "vllm:prefix_cache_queries",
    "vllm:gpu_prefix_cache_hits": "vllm:prefix_cache_hits",
    "vllm:time_per_output_token_seconds": "vllm:inter_token_latency_seconds",
}
"""Old family name -> current family name (suffixes `_total`, `_bucket`... follow)."""

HITS = "vllm:prefix_cache_hits_total"
QUERIES = "vllm:prefix_cache_queries_total"
PROCESS_START = "process_start_time_seconds"
"""The exporter's process metric: the identity of a scrape without `_created` samples."""
HISTORY = 16
"""Scrapes of a target whose process identities are remembered (flip-back detection)."""

SERVING_COLUMNS = ("ts", "source", "target", "metric", "type", "labels", "model_name", "value")

_ESCAPED = re.compile(r"[^A-Za-z0-9_]")


def normalize_names(names: pl.Expr) -> pl.Expr:
    """Rename old vLLM metric names (any suffix) to the current ones."""
    out = names
    for old, new in RENAMES.items():
        out = (
            pl.when(out.str.starts_with(old + "_") | (out == old))
            .then(pl.concat_str(pl.lit(new), out.str.slice(len(old))))
            .otherwise(out)
        )
    return out


def unescape_names(parsed: ParseResult) -> pl.DataFrame:
    """The payload's samples, OpenMetrics-escaped names read back as their family's.

    prometheus_client's ASGI app (vLLM's `/metrics/` mount) answers an Accept
    that offers OpenMetrics with `escaping=underscores`: `vllm:prompt_tokens_total`
    arrives as `vllm_prompt_tokens_total` while TYPE/HELP keep `vllm:prompt_tokens`,
    so no sample would match `vllm:`. A sample the parser could not type whose
    name is an escaped family name plus a suffix of that family's type gets the
    family's name and type back.
    """
    s = parsed.samples
    fams: dict[str, tuple[str, str | None]] = {}
    for fam, typ in parsed.metadata.select("name", "type").iter_rows():
        esc = _ESCAPED.sub("_", fam or "")
        if esc != fam:
            fams[esc] = (fam, typ)
    if not fams or s.height == 0:
        return s
    names: dict[str, str] = {}
    types: dict[str, str] = {}
    for n in s.filter(pl.col("type") == "untyped")["name"].unique().to_list():
        for esc, (fam, typ) in fams.items():
            new = fam + n[len(esc) :]
            if n.startswith(esc) and (new == fam or _sample_type(new, fam, typ) != "untyped"):
                names[n], types[n] = new, _sample_type(new, fam, typ)
                break
    if not names:
        return s
    return s.with_columns(
        name=pl.col("name").replace(names),
        type=pl.col("name").replace_strict(types, default=pl.col("type")),
    )


def serving_rows(
    parsed: ParseResult,
    *,
    ts: dt.datetime,
    target: str,
    source: str = "vllm",
    prefixes: tuple[str, ...] = ("vllm:",),
    labels: dict[str, str] | None = None,
) -> pl.DataFrame:
    """`serving_samples` rows of one payload (plus `_location`/`_raw` for rejects).

    Only metrics whose names start with one of `prefixes` are kept (process
    and Python runtime metrics are the exporter's, not serving's); pass `("",)`
    to keep all. `labels` (the target's configured `tier`/`pod`) are added to
    every series, over the exporter's own: vLLM exports neither, and the cost
    split (`marts.tier_phase_hourly`) finds a series' tier only through them.
    """
    s = unescape_names(parsed)
    if prefixes and prefixes != ("",):
        keep = pl.any_horizontal([pl.col("name").str.starts_with(p) for p in prefixes])
        s = s.filter(keep)
    scrape_ms = int(ts.timestamp() * 1000)
    rows = s.with_columns(
        metric=normalize_names(pl.col("name")),
        renamed=normalize_names(pl.col("name")) != pl.col("name"),
    )
    # a release exporting old and new names: keep the current one
    rows = rows.sort("renamed").unique(
        subset=["metric", "labels"], keep="first", maintain_order=True
    )
    rows = rows.sort("line")
    if labels:
        merged = {
            lab: canonical_json({**(orjson.loads(lab) if lab else {}), **labels})
            for lab in rows["labels"].unique().to_list()
        }
        rows = rows.with_columns(labels_out=pl.col("labels").replace_strict(merged))
    else:
        rows = rows.with_columns(labels_out=pl.col("labels"))
    return rows.select(
        ts=pl.from_epoch(pl.col("timestamp_ms").fill_null(scrape_ms), time_unit="ms")
        .dt.cast_time_unit("us")
        .dt.replace_time_zone("UTC"),
        source=pl.lit(source),
        target=pl.lit(target),
        metric="metric",
        type="type",
        labels="labels_out",
        model_name=pl.col("labels").str.json_path_match("$.model_name"),
        value="value",
        _location=pl.format("{}:{}", pl.lit(target), pl.col("line")),
        _raw=pl.format("{}{} {}", pl.col("name"), pl.col("labels"), pl.col("value")),
    )


def _is_identity(metric: pl.Expr) -> pl.Expr:
    return (metric.str.starts_with("vllm:") & metric.str.ends_with("_created")) | (
        metric == PROCESS_START
    )


def process_identity(rows: pl.DataFrame) -> float | None:
    """The identity of the process one scrape reached (see the module doc), None if unknown.

    The earliest `vllm:*_created` value: when this process began counting (a
    series created later, say a new label set, never changes it); else
    `process_start_time_seconds`. `clean.serving_increase` computes the same.
    """
    if rows.height == 0:
        return None
    ok = pl.col("value").is_not_nan() & pl.col("value").is_not_null()
    metric = pl.col("metric")
    created = rows.filter(metric.str.starts_with("vllm:") & metric.str.ends_with("_created") & ok)
    if created.height:
        return float(created["value"].min())  # type: ignore[arg-type]
    start = rows.filter((metric == PROCESS_START) & ok)
    if start.height:
        return float(start["value"].max())  # type: ignore[arg-type]
    return None


def describe_processes(identities: list[float]) -> str:
    """`process start times 2026-11-28T10:00:00Z, ...` for an error message."""
    stamps = [
        dt.datetime.fromtimestamp(p, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for p in sorted(set(identities))
    ]
    return "process start times " + ", ".join(stamps)


Reading = tuple[dt.datetime, float, float]


@dataclass
class TrackerStep:
    """What one scrape leads to (see `PrefixCacheTracker.step`): kept by `commit`."""

    ts: dt.datetime | None
    process: float | None
    readings: dict[str, Reading]


@dataclass
class PrefixCacheTracker:
    """Turns prefix-cache counters into `cache_events` rows, scrape after scrape.

    State: `last` (labels -> (ts, hits, queries) of the series' latest
    reading), the latest reading of each series per process, and the recent
    scrapes' process identities; `restore()` rebuilds it from the lake after
    a restart. Increases are never taken across two processes (module doc).
    """

    target: str
    source: str = "vllm"
    last: dict[str, Reading] = field(default_factory=dict)
    by_process: dict[tuple[str, float | None], Reading] = field(default_factory=dict)
    history: list[tuple[dt.datetime, float | None]] = field(default_factory=list)

    def update(self, rows: pl.DataFrame) -> list[dict]:
        """Feed one scrape's serving rows; return the cache_events of the interval."""
        events, state = self.step(rows)
        self.commit(state)
        return events

    def step(self, rows: pl.DataFrame) -> tuple[list[dict], TrackerStep]:
        """The events of one scrape and the state it leads to, changing nothing.

        The daemon parses in a thread that can outlive its attempt: a timed-out
        attempt's rows are dropped, so its state must not be kept either, or
        the next attempt's interval would start after rows the lake never got
        and its events would be lost. `commit` keeps it once the attempt counts.
        """
        cur = _prefix_values(rows)
        process = process_identity(rows)
        prev_scrape = self.history[-1][0] if self.history else None
        events: list[dict] = []
        state: dict[str, Reading] = {}
        for labels, reading in cur.items():
            ts = reading[0]
            newest = self.last.get(labels)
            if newest is not None and ts < newest[0]:
                continue  # older than what the series already has
            prev = self.by_process.get((labels, process))
            if prev is not None:
                if ts > prev[0]:
                    events += self._events(labels, prev, reading)
            elif (
                process is not None
                and prev_scrape is not None
                and ts > prev_scrape
                and process > prev_scrape.timestamp()
            ):
                # a process whose counters began after the previous scrape (vLLM
                # restarted): all it counted falls in this interval
                events += self._events(labels, (prev_scrape, 0.0, 0.0), reading)
            # else: a series' first reading, or a process first seen that was already
            # running (another replica behind the same URL): a baseline only
            state[labels] = reading
        scrape_ts = rows["ts"].max() if rows.height and "ts" in rows.columns else None
        return events, TrackerStep(scrape_ts, process, state)  # type: ignore[arg-type]

    def step_points(self, rows: pl.DataFrame) -> tuple[list[dict], TrackerStep]:
        """`step` for many readings per series (a range query's points), changing nothing.

        For rows with no process identity (Prometheus' `query_range` answers):
        each point's increase is taken from the series' previous point, in time
        order (a decrease of either counter is a restart: counted from zero, as
        `_events` does); a series' first point with no earlier reading here or
        in the state is a baseline only; points not newer than the series'
        latest reading are skipped (a re-fetched overlap). Same events, ids
        included, as one `step` per point would give.
        """
        metric = pl.col("metric")
        sub = rows.filter(
            metric.is_in([HITS, QUERIES])
            & pl.col("value").is_not_null()
            & pl.col("value").is_not_nan()
        )
        if sub.height == 0:
            return [], TrackerStep(None, None, {})
        wide = sub.pivot(
            on="metric", index=["labels", "ts"], values="value", aggregate_function="last"
        )
        if HITS not in wide.columns or QUERIES not in wide.columns:
            return [], TrackerStep(None, None, {})
        wide = wide.drop_nulls([HITS, QUERIES]).sort("labels", "ts")
        events: list[dict] = []
        state: dict[str, Reading] = {}
        for labels, ts, hits, queries in wide.select("labels", "ts", HITS, QUERIES).iter_rows():
            prev = state.get(labels) or self.last.get(labels)
            if prev is not None and ts <= prev[0]:
                continue
            reading = (ts, float(hits), float(queries))
            if prev is not None:
                events += self._events(labels, prev, reading)
            state[labels] = reading
        return events, TrackerStep(wide["ts"].max(), None, state)  # type: ignore[arg-type]

    def commit(self, state: TrackerStep) -> None:
        """Keep the state a `step` computed (never moving a series back in time)."""
        for labels, cur in state.readings.items():
            prev = self.last.get(labels)
            if prev is None or cur[0] >= prev[0]:
                self.last[labels] = cur
            mine = self.by_process.get((labels, state.process))
            if mine is None or cur[0] >= mine[0]:
                self.by_process[(labels, state.process)] = cur
        if state.ts is not None and (not self.history or state.ts > self.history[-1][0]):
            self.history = [*self.history, (state.ts, state.process)][-HISTORY:]
            recent = {p for _, p in self.history}
            # forget processes no recent scrape reached (replicas come and go)
            self.by_process = {k: v for k, v in self.by_process.items() if k[1] in recent}

    def several_processes(self, step: TrackerStep | None = None) -> list[float]:
        """Identities of the recent scrapes when they flip back (A -> B -> A), else [].

        A restart changes the identity once (A -> B); only a URL that reaches
        several processes in turn (a load-balancing Service) returns to one
        it left. `step`: count a scrape not committed yet too.
        """
        history = list(self.history)
        if step is not None and step.ts is not None and (not history or step.ts > history[-1][0]):
            history = [*history, (step.ts, step.process)][-HISTORY:]
        runs: list[float] = []
        for _, p in history:
            if p is not None and (not runs or runs[-1] != p):
                runs.append(p)
        return sorted(set(runs)) if len(set(runs)) < len(runs) else []

    def restore(self, lake_path: str | None, days: int = 2) -> list[dict]:
        """Baseline from the lake's recent samples; re-emit the last interval's events.

        The last `HISTORY` scrapes of the last `days` date partitions are
        replayed (their process identities too), read through the lake's
        reader (`Lake.read_files`: files a compaction merged away are skipped,
        a listing that lost a file is taken again). Re-emitting is idempotent
        (same event ids, same content), and it repairs a crash that wrote the
        samples but not their events. A file that cannot be read raises
        `RestoreError` naming it.
        """
        if lake_path is None:
            return []
        from finops.lake import Lake

        lake = Lake(lake_path)

        def recent(files: list[Path]) -> list[Path]:
            days_kept = sorted({f.parent.name for f in files})[-days:]
            return [f for f in files if f.parent.name in days_kept]

        def read(files: list[Path]) -> pl.DataFrame:
            files = recent(files)
            if not files:
                return pl.DataFrame()
            try:
                return self._scan(files)
            except FileNotFoundError:
                raise
            except Exception as exc:  # a corrupt file: say which
                bad = _unreadable(files, self._scan)
                if bad is None:
                    raise RestoreError(f"cannot read serving_samples: {exc}") from None
                raise RestoreError(f"cannot read {bad[0]}: {bad[1]}") from None

        df = lake.read_files("serving_samples", read)
        if df.height == 0:
            return []
        stamps = df["ts"].unique().sort()[-HISTORY:]
        df = df.filter(pl.col("ts").is_in(stamps.implode()))
        events: list[dict] = []
        for ts in stamps:
            events = self.update(df.filter(pl.col("ts") == ts))
        return events if stamps.len() >= 2 else []

    def _scan(self, files: list[Path]) -> pl.DataFrame:
        return (
            pl.scan_parquet(files)
            .filter(
                (pl.col("target") == self.target)
                & (pl.col("source") == self.source)
                & (pl.col("metric").is_in([HITS, QUERIES]) | _is_identity(pl.col("metric")))
            )
            .select("ts", "metric", "labels", "value")
            .unique()
            .sort("ts")
            .collect()
        )

    def _events(
        self,
        labels: str,
        prev: Reading,
        cur: Reading,
    ) -> list[dict]:
        ts, hits, queries = cur
        # vLLM resets both counters together on a restart; hits never outrun
        # queries, so either one going down means both start over
        reset = hits < prev[1] or queries < prev[2]
        d_hits = hits if reset else hits - prev[1]
        d_queries = queries if reset else queries - prev[2]
        lab = orjson.loads(labels)
        model = lab.get("model_name")
        tier = lab.get("tier")
        digest = hashlib.blake2b(labels.encode(), digest_size=6).hexdigest()
        stamp = ts.strftime("%Y%m%dT%H%M%S.%f")
        out = []
        for event, tokens in (("hit", d_hits), ("miss", max(d_queries - d_hits, 0.0))):
            out.append(
                {
                    "event_id": f"vllm_prefix:{self.target}:{digest}:{event}:{stamp}",
                    "ts": ts,
                    "source": self.source,
                    "layer": "vllm_prefix",
                    "event": event,
                    "tenant": None,
                    "tier": tier,
                    "model": model,
                    "request_id": None,
                    "tokens": round(tokens),
                    "requests": None,
                }
            )
        return out


class RestoreError(RuntimeError):
    """The lake's recent samples could not be read back (the message names the file)."""


def _unreadable(
    files: list[Path], scan: Callable[[list[Path]], pl.DataFrame]
) -> tuple[Path, str] | None:
    """The first file that fails on its own, with its error (None: none does)."""
    for f in files:
        try:
            scan([f])
        except FileNotFoundError:
            continue  # merged away meanwhile: not the culprit
        except Exception as exc:
            return f, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None


def _prefix_values(rows: pl.DataFrame) -> dict[str, tuple[dt.datetime, float, float]]:
    """Label set (hits and queries share it) -> (ts, hits, queries) of one scrape."""
    sub = rows.filter(pl.col("metric").is_in([HITS, QUERIES]) & pl.col("value").is_not_nan())
    if sub.height == 0:
        return {}
    wide = sub.pivot(on="metric", index=["labels"], values=["value"], aggregate_function="last")
    ts = sub.group_by("labels").agg(pl.col("ts").max())
    wide = wide.join(ts, on="labels")
    out = {}
    for row in wide.iter_rows(named=True):
        if row.get(HITS) is None or row.get(QUERIES) is None:
            continue
        out[row["labels"]] = (row["ts"], float(row[HITS]), float(row[QUERIES]))
    return out
