"""The `finops collect` daemon: many targets, one lake, never stalled by one target.

Design:
- one asyncio task per target, each on its own jittered schedule; HTTP via
  one shared `httpx.AsyncClient`; blocking work (NVML reads, log polls,
  exposition parsing) runs in the target's own thread (`_Worker`), never in
  a shared pool: a thread cannot be cancelled, so one stuck call (NVML when
  a GPU falls off the bus) must not use up threads the others need. While a
  target's previous call is still running its next attempts are skipped and
  recorded as down ("previous attempt still running after Ns");
- every attempt is bounded by the target's timeout (`asyncio.wait_for`
  around the whole attempt, so a server that drips one byte a second is cut
  off too), except Prometheus, where each request (one chunk) is bounded so
  a long catch-up can take several; a failed target backs off exponentially
  (`backoff_initial` doubling up to `backoff_max`, jittered) while the others
  keep their cadence;
- every attempt yields one `scrape_health` row (up, duration_ms, samples,
  rejected, error); rows a restart rebuilds (vLLM's re-emitted cache events)
  are no attempt and yield none;
- rows are buffered and written in batches (every `flush_interval` or
  `flush_rows`, whichever first) by the lake writer thread, which nothing
  else uses (so the final flush always gets it): few, larger Parquet files;
- Prometheus chunks are written as they arrive (lake, then checkpoint);
  log targets use `collectors.logs.LogSource`, which writes its own batches
  and checkpoints (lake first, then checkpoint), taking the write lock for
  one batch at a time, and stops at the first batch boundary after its
  timeout (the rest follows next attempt);
- SIGTERM/SIGINT: stop scheduling, flush what is buffered, commit
  checkpoints, exit 0, without waiting for a target stuck in a blocking call
  (worker threads are daemon threads, abandoned at exit). A kill -9 loses at
  most the unflushed scrapes of one flush interval (never a log line: those
  are re-read from the checkpoint), and never duplicates rows: file names
  are content fingerprints and every table has a deterministic key that the
  clean views deduplicate on.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import queue
import random
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TextIO, TypeVar

import httpx
import polars as pl

from collectors.config import CollectConfig, TargetConfig
from collectors.mapping import MappingError
from finops.lake import AppendResult, Lake
from finops.schemas import schema_for

if TYPE_CHECKING:
    from collectors.logs import LogSource
    from collectors.prometheus_api import RangeResult
    from collectors.vllm import PrefixCacheTracker

T = TypeVar("T")
ACCEPT = "text/plain;version=0.0.4;q=1,application/openmetrics-text;version=1.0.0;q=0.5,*/*;q=0.1"


class ScrapeError(RuntimeError):
    """An attempt failed; the message is what `scrape_health.error` says."""


class LakeWriteError(RuntimeError):
    """The last flush (--once, shutdown) could not write the lake; nothing retries it."""


class _Worker:
    """One daemon thread that runs blocking calls in order, awaited from asyncio.

    Not `asyncio.to_thread`: the default pool is shared and small, and a call
    stuck in a driver keeps its pool thread forever; a few of those and no
    target, nor the final flush, gets a thread again. Not a ThreadPoolExecutor
    either: its threads are joined at interpreter exit, so one stuck call
    would keep the process alive after SIGTERM. A daemon thread is abandoned
    at exit instead.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Any, asyncio.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._since: float | None = None

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn(*args)` in this thread; cancelling the await does not stop the call."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending += 1
            if self._since is None:
                self._since = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((lambda: fn(*args), loop, fut))
        return await fut

    def busy_for(self) -> float | None:
        """Seconds the call in progress (or queued) has been going, None when idle."""
        with self._lock:
            return None if self._since is None else time.monotonic() - self._since

    def _main(self) -> None:
        while True:
            call, loop, fut = self._queue.get()
            try:
                ok, result = True, call()
            except BaseException as exc:  # handed to the awaiting coroutine
                ok, result = False, exc
            with self._lock:
                self._pending -= 1
                self._since = time.monotonic() if self._pending else None
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                loop.call_soon_threadsafe(_settle, fut, ok, result)


def _settle(fut: asyncio.Future[Any], ok: bool, result: Any) -> None:
    if fut.done():  # the awaiting attempt timed out or was cancelled
        return
    if ok:
        fut.set_result(result)
    else:
        fut.set_exception(result)


@dataclass(frozen=True)
class Validated:
    """Rows `Target.keep` validated against their table: the flush writes them as they are."""

    rows: pl.DataFrame

    def __len__(self) -> int:
        return self.rows.height


@dataclass
class Outcome:
    """What one attempt produced: rows per table, rejects, and its health row."""

    target: str
    kind: str
    ts: dt.datetime
    up: bool = False
    duration_ms: float = 0.0
    samples: int = 0
    rejected: int = 0
    error: str | None = None
    frames: dict[str, list[Any]] = field(default_factory=dict)
    rejects: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    attempt: bool = True  # False: rows rebuilt at startup (`restore`), no health row
    commits: list[Callable[[], None]] = field(default_factory=list)
    """State changes a worker computed, kept only if its attempt counts (`commit`)."""

    def add(self, table: str, data: Any) -> None:
        if data is None or (isinstance(data, pl.DataFrame | list | Validated) and len(data) == 0):
            return
        self.frames.setdefault(table, []).append(data)

    def rows(self) -> int:
        return sum(len(d) for ds in self.frames.values() for d in ds)

    def absorb(self, other: Outcome) -> None:
        """Take what a worker thread filled in on a scratch Outcome.

        The thread never touches the real one: after a timeout that one is
        already in the buffer, and rows landing in it late would be written
        under a health row that says the attempt failed.
        """
        for table, datas in other.frames.items():
            self.frames.setdefault(table, []).extend(datas)
        self.rejects += other.rejects
        self.samples += other.samples
        self.rejected += other.rejected
        self.error = other.error or self.error
        self.up = other.up

    def commit(self) -> None:
        """Keep the target state this (scratch) Outcome's rows lead to.

        Called by the attempt after `absorb`: an attempt that timed out never
        gets there, so a late worker's state changes are dropped with its rows.
        """
        commits, self.commits = self.commits, []
        for fn in commits:
            fn()

    def health(self) -> dict[str, Any]:
        return {
            "ts": self.ts,
            "target": self.target,
            "kind": self.kind,
            "up": self.up,
            "duration_ms": round(self.duration_ms, 3),
            "samples": self.samples,
            "rejected": self.rejected,
            "error": self.error,
        }


# --------------------------------------------------------------------------- targets


class Target(abc.ABC):
    """Base: one configured source; `attempt()` fills an Outcome or raises ScrapeError."""

    blocking = False
    final_poll = False  # attempted once more at shutdown (a log's unterminated last line)

    def __init__(self, cfg: TargetConfig, ctx: Collector) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.failures = 0
        self.attempts = 0
        self.last: Outcome | None = None
        self._worker: _Worker | None = None
        self.note: str | None = None  # said once, in the next attempt's health row
        self.dropped = 0  # buffered rows dropped (lake unwritable, buffer full), all told

    @abc.abstractmethod
    async def attempt(self, out: Outcome) -> None:
        """One scrape/poll of this target; fills `out` or raises ScrapeError."""

    def attempt_timeout(self) -> float | None:
        """Bound on one whole attempt (None: the attempt bounds its own steps)."""
        return self.cfg.timeout + 1.0

    async def in_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """Run blocking work in this target's own thread (see `_Worker`)."""
        if self._worker is None:
            self._worker = _Worker(f"collect-{self.cfg.name}")
        return await self._worker.run(fn, *args)

    def busy_for(self) -> float | None:
        """How long this target's thread has been in its current call (None: idle)."""
        return None if self._worker is None else self._worker.busy_for()

    def interrupt(self) -> None:  # noqa: B027 - optional hook
        """Ask a call still running in this target's thread to stop at a safe point."""

    async def restore(self) -> Outcome | None:
        """Rebuild state from the lake after a restart (optional)."""
        return None

    def keep(self, table: str, rows: Any, out: Outcome) -> pl.DataFrame:
        """Rows the lake will take go to `out`; the rest go to rejects now, with the lake's reasons.

        scrape_health and the `--once` summary are written from this attempt's
        counts: counting rows the lake then rejects (no GPU UUID, a timestamp
        before 2000) would report samples that no table holds.
        """
        from finops.lake import to_frame, validate

        rows = to_frame(rows)
        if rows.height == 0:
            return rows
        schema = schema_for(table)
        rows, impossible = split_impossible(rows, schema)
        for rej in impossible:
            out.rejects.append((table, rej))
        out.rejected += len(impossible)
        checked, _ = validate(rows, schema, source=out.kind)
        for location, raw, reason in checked.bad.iter_rows():
            out.rejects.append((table, {"location": location, "raw": raw, "reason": reason}))
        out.rejected += checked.bad.height
        out.samples += checked.good.height
        out.add(table, Validated(checked.good))
        return checked.good

    def close(self) -> None:  # noqa: B027 - optional hook; most targets hold nothing
        """Release resources at shutdown (optional)."""


def split_impossible(
    rows: pl.DataFrame, schema: Any, *, at_ts: bool = False
) -> tuple[pl.DataFrame, list[dict[str, str]]]:
    """Rows whose values are possible, and rejects for the rest (`schemas.impossible_values`).

    A negative utilization or counter, a ratio above 1, a bucket `le` that is
    no number: never a measurement, so it goes to `rejects` (location, raw
    text, reason) and the samples around it load. `at_ts`: add each row's time
    to its location (a query_range answer shares one location for all points).
    """
    from finops.schemas import impossible_values

    reasons = impossible_values(rows, schema)
    if reasons is None:
        return rows, []
    bad = reasons.is_not_null()
    worse = rows.filter(bad).with_columns(_reason=reasons.filter(bad))
    location = (
        pl.col("_location").cast(pl.String) if "_location" in worse.columns else pl.lit(schema.name)
    )
    if at_ts or "_location" not in worse.columns:
        location = pl.format(
            "{} at {}", location, pl.col("ts").dt.to_string("%Y-%m-%dT%H:%M:%S%.3fZ")
        )
    name = pl.col(schema.metric_column)
    raw = (
        pl.col("_raw")
        if "_raw" in worse.columns
        else pl.format("{}{} {}", name, pl.col("labels").fill_null(""), pl.col("value"))
    )
    rejects = worse.select(location=location, raw=raw, reason="_reason").to_dicts()
    return rows.filter(~bad), rejects


async def fetch_exposition(
    client: httpx.AsyncClient, url: str, *, timeout: float, max_bytes: int
) -> tuple[bytes, str]:
    """GET a /metrics page with clear errors for the ways it goes wrong."""
    try:
        async with client.stream("GET", url, timeout=timeout, headers={"Accept": ACCEPT}) as r:
            ctype = r.headers.get("content-type", "")
            if r.status_code != 200:
                body = (await r.aread())[:200].decode("utf-8", "replace").strip()
                raise ScrapeError(
                    f"HTTP {r.status_code} {r.reason_phrase}: {body!r}"
                    if body
                    else f"HTTP {r.status_code} {r.reason_phrase}"
                )
            chunks: list[bytes] = []
            size = 0
            async for chunk in r.aiter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise ScrapeError(
                        f"payload larger than max_bytes={max_bytes:,} bytes: refused "
                        "(raise max_bytes if this exporter is really that big)"
                    )
                chunks.append(chunk)
    except httpx.TimeoutException:
        raise ScrapeError(f"timed out after {timeout:g}s") from None
    except httpx.ConnectError as exc:
        raise ScrapeError(f"cannot connect: {exc or 'connection refused'}") from None
    except httpx.HTTPError as exc:
        raise ScrapeError(f"HTTP failure: {type(exc).__name__}: {exc}") from None
    body = b"".join(chunks)
    head = body[:200].lstrip().lower()
    if "html" in ctype or head.startswith((b"<!doctype", b"<html", b"<?xml", b"<")):
        raise ScrapeError(
            f"answered HTML, not Prometheus exposition text (Content-Type {ctype or '?'}; "
            f"starts {body[:40].decode('utf-8', 'replace')!r}): is the URL the /metrics path?"
        )
    return body, ctype


class _ExpositionTarget(Target):
    table = ""
    prefixes: tuple[str, ...] = ()  # metric names this target loads
    hint = ""  # what to check when a payload has none of them

    async def attempt(self, out: Outcome) -> None:
        body, ctype = await fetch_exposition(
            self.ctx.http,
            self.cfg.url or "",
            timeout=self.cfg.timeout,
            max_bytes=self.cfg.max_bytes,
        )
        openmetrics = True if "openmetrics" in ctype else None
        scratch = Outcome(out.target, out.kind, out.ts)
        await self.in_thread(self._process, body, openmetrics, scratch)
        out.absorb(scratch)
        scratch.commit()

    def _process(self, body: bytes, openmetrics: bool | None, out: Outcome) -> None:
        from collectors.exposition import parse

        parsed = parse(body, openmetrics=openmetrics)
        for line, raw, reason in parsed.rejects.iter_rows():
            out.rejects.append(
                (self.table, {"location": f"{self.cfg.url}:{line}", "raw": raw, "reason": reason})
            )
        out.rejected += parsed.rejects.height
        found = self._map(parsed, out)
        if not found and not self._listed(parsed):
            # a 200 with nothing of ours (an empty body, JSON, another exporter): the
            # URL is wrong, and "up, 0 samples" would hide it
            raise ScrapeError(f"{self._nothing()} ({_what_came(body, parsed)}): {self.hint}")
        out.up = True

    def _nothing(self) -> str:
        return f"no metrics starting with {list(self.prefixes)}"

    def _listed(self, parsed: Any) -> bool:
        """Whether the payload names one of our families (TYPE/HELP) without samples of it."""
        names = parsed.metadata["name"].drop_nulls().to_list()
        return any(n.startswith(p) for n in names for p in self.prefixes)

    @abc.abstractmethod
    def _map(self, parsed: Any, out: Outcome) -> int:
        """Turn a parsed payload into this target's lake rows; how many it found."""


def _what_came(body: bytes, parsed: Any) -> str:
    """What a payload held instead, for an error message."""
    if not body.strip():
        return "the body is empty"
    if parsed.samples.height:
        n = parsed.samples.height
        return f"{n:,} sample{'s' if n != 1 else ''} of other metrics"
    return f"no sample parsed; it starts {body[:60].decode('utf-8', 'replace')!r}"


class DcgmTarget(_ExpositionTarget):
    table = "gpu_samples"
    prefixes = ("DCGM_",)
    hint = "is this a dcgm-exporter?"

    def _nothing(self) -> str:
        return "no DCGM_* metrics in the payload"

    def _map(self, parsed: Any, out: Outcome) -> int:
        from collectors.dcgm import gpu_rows

        res = gpu_rows(parsed, ts=out.ts, target=self.cfg.url or "", source="dcgm")
        self.keep(self.table, res.rows, out)
        return res.rows.height


class VllmTarget(_ExpositionTarget):
    table = "serving_samples"
    hint = "is this vLLM?"

    @property
    def prefixes(self) -> tuple[str, ...]:  # type: ignore[override]
        return self.cfg.metric_prefixes

    def __init__(self, cfg: TargetConfig, ctx: Collector) -> None:
        super().__init__(cfg, ctx)
        from collectors.vllm import PrefixCacheTracker

        self.tracker = PrefixCacheTracker(target=cfg.url or cfg.name)
        self._lock = threading.Lock()
        self._several = False  # last committed scrape: the URL reaches several processes

    async def restore(self) -> Outcome | None:
        events = await self.in_thread(self.tracker.restore, str(self.ctx.lake.path))
        self._several = bool(self.tracker.several_processes())
        if not events:
            return None
        out = Outcome(self.cfg.name, "vllm", dt.datetime.now(dt.UTC), up=True, attempt=False)
        out.add("cache_events", events)
        return out

    def _process(self, body: bytes, openmetrics: bool | None, out: Outcome) -> None:
        super()._process(body, openmetrics, out)
        if out.error is not None and out.error.startswith(SEVERAL_PROCESSES):
            out.up = False  # its samples are kept: each is a true reading of one process

    def _map(self, parsed: Any, out: Outcome) -> int:
        from collectors.vllm import (
            PROCESS_START,
            describe_processes,
            process_identity,
            serving_rows,
        )

        labels = {k: v for k in ("tier", "pod") if (v := getattr(self.cfg, k))}
        kw = {"ts": out.ts, "target": self.cfg.url or "", "labels": labels}
        rows = serving_rows(parsed, prefixes=self.cfg.metric_prefixes, **kw)
        found = rows.height
        if found and process_identity(rows) is None:
            # no `_created` samples: keep the process start time, the identity the
            # lake's increases (clean.serving_increase) then go by
            start = serving_rows(parsed, prefixes=(PROCESS_START,), **kw)
            start = start.filter(pl.col("metric") == PROCESS_START)
            if start.height:
                rows = pl.concat([rows, start])
        good = self.keep(self.table, rows, out)
        with self._lock:
            events, state = self.tracker.step(good)
            several = self.tracker.several_processes(state)
        out.add("cache_events", events)
        if several:
            out.error = (
                f"{SEVERAL_PROCESSES} ({describe_processes(several)}): scrape each pod "
                "(headless Service or pod IPs); increases are taken per process, never across"
            )
        out.commits.append(lambda: self._commit(state, bool(several)))
        return found

    def _commit(self, state: Any, several: bool) -> None:
        """The tracker moves on only with an attempt that counts (see `Outcome.commit`).

        A target's attempts never overlap (the next one is skipped while its
        thread is busy), so the state a step started from is still the
        committed one: the next good attempt's interval starts where the
        lake's last kept rows end.
        """
        with self._lock:
            self.tracker.commit(state)
        if several and not self._several:
            self.ctx._print(
                f"collect: warning: {self.cfg.name}: {SEVERAL_PROCESSES}: each scrape may "
                "reach another replica; scrape each pod (headless Service or pod IPs)"
            )
        self._several = several


SEVERAL_PROCESSES = "URL reaches more than one vLLM process"


class NvmlTarget(Target):
    blocking = True

    def __init__(self, cfg: TargetConfig, ctx: Collector) -> None:
        super().__init__(cfg, ctx)
        from collectors.nvml import NvmlCollector

        self.collector = NvmlCollector(nvml=ctx.nvml_module, host=cfg.host)

    async def attempt(self, out: Outcome) -> None:
        from collectors.nvml import NvmlUnavailable

        scratch = Outcome(out.target, out.kind, out.ts)
        try:
            await self.in_thread(self._read, scratch)
        except NvmlUnavailable as exc:
            raise ScrapeError(str(exc)) from None
        except Exception as exc:
            from collectors.nvml import explain

            raise ScrapeError(explain(exc)) from None
        out.absorb(scratch)
        out.up = True

    def _read(self, out: Outcome) -> None:
        self.keep("gpu_samples", self.collector.read(out.ts), out)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.collector.close()  # not called while a read is stuck (see Collector._close)


class PrometheusTarget(Target):
    """`query_range` chunks -> gpu_samples and serving_samples, and cache_events.

    vLLM prefix-cache counters among the serving rows become `cache_events`
    as a direct vLLM target makes them (same schema, deterministic ids, with
    the series' `instance` as target): one `PrefixCacheTracker` per instance,
    fed point by point in time order. Prometheus rows carry no process
    identity, so a restart shows only as a counter going down (counted from
    zero). The trackers' state follows the checkpoint (`restore`), so a
    resumed or re-fetched range makes the same events, never more.
    """

    def __init__(self, cfg: TargetConfig, ctx: Collector) -> None:
        super().__init__(cfg, ctx)
        from collectors.prometheus_api import RangeCheckpoint

        self.checkpoint = RangeCheckpoint.for_query(
            ctx.cfg.checkpoint_dir, cfg.url or "", cfg.query or ""
        )
        self.loaded_until: dt.datetime | None = None
        # vLLM prefix-cache counters -> cache_events: one tracker per vLLM instance
        # (a serving row's `target`: the series' `instance` label, else the API URL)
        self.trackers: dict[str, PrefixCacheTracker] = {}

    def _tracker(self, target: str) -> PrefixCacheTracker:
        from collectors.vllm import PrefixCacheTracker

        if target not in self.trackers:
            self.trackers[target] = PrefixCacheTracker(target=target, source="prometheus")
        return self.trackers[target]

    async def restore(self) -> Outcome | None:
        """The prefix-cache trackers' state as of the checkpoint, from the lake.

        Each instance's series get their latest hits/queries reading at or
        before `loaded_until` (the last two date partitions up to it), so the
        first point of the resumed range counts its increase from there: no
        point is lost to a baseline after a restart, and none counts twice
        (every point up to the checkpoint has its events, written with its
        samples before the checkpoint moved). Nothing is re-emitted: a crash
        between the samples and their events left the checkpoint behind, so
        that range is fetched, and its events made, again (same ids).
        """
        from collectors.vllm import TrackerStep

        until = self.checkpoint.load()
        if until is None:
            return None
        readings = await self.in_thread(self._last_readings, until)
        for target, states in readings.items():
            ts = max(r[0] for r in states.values())
            self._tracker(target).commit(TrackerStep(ts, None, states))
        return None

    def _last_readings(self, until: dt.datetime) -> dict[str, dict[str, Any]]:
        """target -> labels -> (ts, hits, queries): each series' last reading up to `until`."""
        from collectors.vllm import HITS, QUERIES

        days = {f"date={(until.date() - dt.timedelta(days=d)).isoformat()}" for d in (0, 1)}

        def read(files: list[Any]) -> pl.DataFrame:
            files = [f for f in files if f.parent.name in days]
            if not files:
                return pl.DataFrame()
            return (
                pl.scan_parquet(files)
                .filter(
                    (pl.col("source") == "prometheus")
                    & pl.col("metric").is_in([HITS, QUERIES])
                    & (pl.col("ts") <= until)
                    & pl.col("value").is_not_null()
                    & pl.col("value").is_not_nan()
                )
                .select("ts", "target", "metric", "labels", "value")
                .collect()
            )

        df = self.ctx.lake.read_files("serving_samples", read)
        if df.height == 0:
            return {}
        wide = df.pivot(
            on="metric", index=["target", "labels", "ts"], values="value", aggregate_function="last"
        )
        if HITS not in wide.columns or QUERIES not in wide.columns:
            return {}
        last = wide.drop_nulls([HITS, QUERIES]).sort("ts").group_by("target", "labels").last()
        out: dict[str, dict[str, Any]] = {}
        for target, labels, ts, hits, queries in last.select(
            "target", "labels", "ts", HITS, QUERIES
        ).iter_rows():
            out.setdefault(target, {})[labels] = (ts, float(hits), float(queries))
        return out

    def _prepare(
        self, res: RangeResult
    ) -> tuple[
        dict[str, pl.DataFrame | None], dict[str, list[dict[str, str]]], list[dict], list[Any]
    ]:
        """One chunk's rows without impossible values, its rejects, and its cache events.

        Rejects: points the answer held that are no number (`RangeResult.rejects`),
        and values impossible by definition (`split_impossible`), each at its time.
        """
        rejects: dict[str, list[dict[str, str]]] = {}
        for table, rows in res.rejects.items():
            rejects.setdefault(table, []).extend(rows)
        frames: dict[str, pl.DataFrame | None] = {
            "gpu_samples": res.gpu,
            "serving_samples": res.serving,
        }
        for table, rows in frames.items():
            if rows is not None and rows.height:
                frames[table], bad = split_impossible(rows, schema_for(table), at_ts=True)
                if bad:
                    rejects.setdefault(table, []).extend(bad)
        events, states = self._cache_events(frames["serving_samples"])
        return frames, rejects, events, states

    def _cache_events(self, serving: pl.DataFrame | None) -> tuple[list[dict], list[Any]]:
        """One chunk's prefix-cache events, per instance, and the tracker states to commit.

        Points go in time order per series (`PrefixCacheTracker.step_points`);
        the states are kept only once the chunk is in the lake (see `_store`).
        """
        from collectors.vllm import HITS, QUERIES

        if serving is None or serving.height == 0:
            return [], []
        rows = serving.filter(pl.col("metric").is_in([HITS, QUERIES]))
        events: list[dict] = []
        states: list[Any] = []
        for (target,), part in rows.partition_by("target", as_dict=True).items():
            tracker = self._tracker(target)
            got, state = tracker.step_points(part)
            events += got
            states.append((tracker, state))
        return events, states

    def attempt_timeout(self) -> float | None:
        """Each request is bounded by `timeout`: a catch-up may need many of them."""
        return None

    async def attempt(self, out: Outcome) -> None:
        from collectors.prometheus_api import PrometheusAPIError, iter_range

        cfg = self.cfg
        try:
            loaded = self.loaded_until or self.checkpoint.load()
        except PrometheusAPIError as exc:
            raise ScrapeError(str(exc)) from None
        end = out.ts - dt.timedelta(seconds=cfg.lag)
        start = (
            loaded + dt.timedelta(seconds=cfg.step)
            if loaded
            else end - dt.timedelta(seconds=cfg.lookback)
        )
        out.up = True
        if end < start:
            return
        warnings: list[str] = []
        done = 0
        fetch = iter_range(
            self.ctx.http,
            cfg.url or "",
            cfg.query or "",
            start,
            end,
            cfg.step,
            timeout=cfg.timeout,
            max_points=cfg.max_points,
            max_samples=cfg.max_samples,
        )
        try:
            async with contextlib.aclosing(fetch) as parts:
                async for res in parts:
                    loaded, rejected = await self._store(res, out.kind)
                    done += 1
                    out.samples += loaded
                    out.rejected += rejected
                    warnings += res.warnings
        except PrometheusAPIError as exc:
            raise ScrapeError(self._so_far(str(exc), done, out.samples)) from None
        except httpx.ConnectError as exc:
            msg = f"cannot connect: {exc or 'connection refused'}"
            raise ScrapeError(self._so_far(msg, done, out.samples)) from None
        except httpx.HTTPError as exc:
            msg = f"HTTP failure: {type(exc).__name__}: {exc}"
            raise ScrapeError(self._so_far(msg, done, out.samples)) from None
        except ScrapeError as exc:
            raise ScrapeError(self._so_far(str(exc), done, out.samples)) from None
        if warnings:
            out.error = "warnings: " + "; ".join(warnings)[:500]

    async def _store(self, res: RangeResult, kind: str) -> tuple[int, int]:
        """Write one chunk, then its checkpoint; return (loaded, rejected) rows.

        Rows wait in no buffer, so a later request failing, or the daemon
        stopping, never sends the next attempt back over chunks already loaded.
        """
        cfg = self.cfg
        until = res.end

        def commit() -> None:
            self.checkpoint.save(until, url=cfg.url or "", query=cfg.query or "")

        frames, rejects, events, states = await self.in_thread(self._prepare, res)
        tables = {**frames, "cache_events": events}
        try:
            results = await self.ctx.write_now(kind, tables, then=commit, rejects=rejects)
        except Exception as exc:
            raise ScrapeError(f"writing to {self.ctx.cfg.lake} failed: {exc}") from None
        # the trackers move on with the checkpoint: a chunk that failed is fetched
        # again from the same state, and makes the same events
        for tracker, state in states:
            tracker.commit(state)
        self.loaded_until = until
        loaded = sum(r.loaded for r in results if r.table != "cache_events")
        return loaded, sum(r.rejected for r in results) + sum(map(len, rejects.values()))

    def _so_far(self, error: str, done: int, points: int) -> str:
        """The error, and what this attempt loaded before it (kept: see `_store`)."""
        if not done:
            return error
        return f"{error}; {done} earlier chunk(s) ({points:,} points) are in the lake"


class _LockedLake:
    """The lake as a log poll sees it: the write lock for one write at a time.

    Holding the lock for a whole poll would hold every other target's flush
    for as long as a backlog takes. Writes to the poll's own table are
    counted, so a poll that stops early (or ends after its attempt was
    reported) still has its rows in `scrape_health`.
    """

    def __init__(self, lake: Lake, lock: threading.Lock, table: str) -> None:
        self._lake = lake
        self._lock = lock
        self._table = table
        self.loaded = 0
        self.rejected = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._lake, name)

    def append(self, table: str, data: Any, **kw: Any) -> AppendResult:
        with self._lock:
            res = self._lake.append(table, data, **kw)
        if table == self._table:
            self.loaded += res.loaded
            self.rejected += res.rejected
        return res

    def reject(self, table: str, bad: Any, **kw: Any) -> int:
        with self._lock:
            n = self._lake.reject(table, bad, **kw)
        if table == self._table:
            self.rejected += n
        return n


class _PollStopped(Exception):
    """Raised between two batches to end a log poll early (checkpoint already saved)."""


class LogTarget(Target):
    blocking = True
    final_poll = True

    def __init__(self, cfg: TargetConfig, ctx: Collector) -> None:
        super().__init__(cfg, ctx)
        from collectors.logs import LogSource

        self.lake = _LockedLake(ctx.lake, ctx.write_lock, cfg.table)
        self.source: LogSource = LogSource(
            cfg.path or "",
            self.lake,  # type: ignore[arg-type]
            ctx.cfg.checkpoint_dir,
            cfg.mapping,
            table=cfg.table,
            progress=self._after_batch,
        )
        self._deadline = float("inf")
        self._stop = threading.Event()
        self._reported = (0, 0)

    def attempt_timeout(self) -> float | None:
        """`--once` loads the whole backlog; the daemon polls in slices of `timeout`."""
        return None if self.ctx.once else self.cfg.timeout + 1.0

    def interrupt(self) -> None:
        self._stop.set()

    async def attempt(self, out: Outcome) -> None:
        self._stop.clear()
        self._deadline = float("inf") if self.ctx.once else time.monotonic() + self.cfg.timeout
        try:
            stopped = await self.in_thread(self._poll)
        except (OSError, MappingError) as exc:
            # A wrong mapping is a configuration error of this target only: it is
            # reported in scrape_health and the other targets keep running.
            self._count(out)
            raise ScrapeError(f"{self.cfg.path}: {exc}") from None
        self._count(out)
        out.up = True
        notes = []
        if stopped:
            notes.append(f"backlog: {out.samples:,} rows loaded this attempt, the rest follows")
        errors = getattr(self.source, "errors", None)
        if errors:
            notes.append("; ".join(str(e) for e in errors[-3:]))
            errors.clear()
        if notes:
            out.error = "; ".join(notes)[:500]

    def _count(self, out: Outcome) -> None:
        """Report the rows written since the last report (a late batch included)."""
        loaded, rejected = self.lake.loaded, self.lake.rejected
        out.samples += loaded - self._reported[0]
        out.rejected += rejected - self._reported[1]
        self._reported = (loaded, rejected)

    def _poll(self) -> bool:
        """Poll the log files; True when stopped early (time is up, or shutdown).

        `--once` and the shutdown poll are final: a settled last line without
        its newline is taken then (and its checkpoint advanced past it), as
        `finops ingest` takes it; a running daemon leaves it for its writer.
        """
        try:
            self.source.poll(final=self.ctx.once or self.ctx.stopping)
        except _PollStopped:
            return True
        return False

    def _after_batch(self, offset: int, size: int) -> None:
        """Called by LogSource once a batch and its checkpoint are saved: stop here?"""
        if self._stop.is_set() or time.monotonic() > self._deadline:
            raise _PollStopped


TARGET_TYPES: dict[str, type[Target]] = {
    "dcgm": DcgmTarget,
    "vllm": VllmTarget,
    "nvml": NvmlTarget,
    "prometheus": PrometheusTarget,
    "log": LogTarget,
}


# --------------------------------------------------------------------------- the collector


@dataclass
class Stats:
    attempts: int = 0
    up: int = 0
    down: int = 0
    samples: int = 0
    rejected: int = 0
    flushes: int = 0
    files: int = 0
    write_errors: int = 0
    dropped_rows: int = 0
    last_flush: float | None = None


class Collector:
    """Runs targets on schedule and writes their rows to the lake in batches."""

    def __init__(
        self,
        cfg: CollectConfig,
        *,
        status: TextIO | None = sys.stderr,
        nvml_module: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = cfg
        self.lake = Lake(cfg.lake)
        self.status_out = status
        self.nvml_module = nvml_module
        self.rng = rng or random.Random()
        self.buffer: list[Outcome] = []
        self.buffered_rows = 0
        self.write_lock = threading.Lock()
        self.stats = Stats()
        self.stopping = False
        self.once = False  # run_once: every target loads all it has pending
        self.stop_event: asyncio.Event | None = None
        self._writer = _Worker("collect-lake-writer")
        self.http: httpx.AsyncClient = None  # type: ignore[assignment]
        self.targets = [TARGET_TYPES[t.kind](t, self) for t in cfg.targets]
        self._flush_lock: asyncio.Lock | None = None
        # at most this many rows wait in memory; past it the oldest are dropped
        self.max_buffered_rows = cfg.max_buffered_rows
        self._retry_at = 0.0  # time.monotonic() before which no flush retries a failed one
        self._write_failures = 0  # consecutive failed flushes
        self._drop_said = -float("inf")  # time.monotonic() of the last drop said on stderr
        self._unreported: dict[str, int] = {}  # target -> dropped rows no health row says yet

    # ---- scheduling
    def _delay(self, t: Target) -> float:
        base = t.cfg.interval
        if t.failures:
            backoff = min(self.cfg.backoff_max, self.cfg.backoff_initial * 2 ** (t.failures - 1))
            base = max(base, backoff)
        j = self.cfg.jitter
        return base * (1 + self.rng.uniform(-j, j)) if j else base

    async def run_attempt(self, t: Target) -> Outcome:
        """One bounded attempt of one target; never raises (the outcome says what failed)."""
        out = Outcome(t.cfg.name, t.cfg.kind, dt.datetime.now(dt.UTC))
        t0 = time.perf_counter()
        busy = t.busy_for()
        limit = t.attempt_timeout()
        try:
            if busy is not None:
                # its thread is stuck in (or still finishing) the last call: starting
                # another would only pile up threads behind it
                raise ScrapeError(f"previous attempt still running after {busy:.1f}s")
            if limit is None:
                await t.attempt(out)
            else:
                await asyncio.wait_for(t.attempt(out), timeout=limit)
        except TimeoutError:
            out.up, out.error = False, f"timed out after {t.cfg.timeout:g}s"
            out.frames.clear()
            t.interrupt()
        except ScrapeError as exc:
            out.up, out.error = False, str(exc)
            out.frames.clear()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug or an unforeseen input: report, keep running
            out.up, out.error = False, f"{type(exc).__name__}: {exc}"
            out.frames.clear()
        out.duration_ms = (time.perf_counter() - t0) * 1000
        if t.note:
            out.error = f"{t.note}; {out.error}" if out.error else t.note
            t.note = None
        t.attempts += 1
        t.failures = 0 if out.up else t.failures + 1
        t.last = out
        self.stats.attempts += 1
        self.stats.up += out.up
        self.stats.down += not out.up
        self.stats.samples += out.samples
        self.stats.rejected += out.rejected
        self.buffer.append(out)
        self.buffered_rows += out.rows() + 1
        self._cap()
        # while writes fail, only the flush timer retries (with backoff): not every attempt
        if self.buffered_rows >= self.cfg.flush_rows and time.monotonic() >= self._retry_at:
            await self.flush()
        return out

    async def _target_loop(self, t: Target) -> None:
        assert self.stop_event is not None
        await self._sleep(self.rng.uniform(0, t.cfg.interval * max(self.cfg.jitter, 0.0)))
        while not self.stop_event.is_set():
            started = time.monotonic()
            await self.run_attempt(t)
            delay = self._delay(t) - (time.monotonic() - started)
            await self._sleep(max(delay, 0.0))

    async def _sleep(self, seconds: float) -> None:
        assert self.stop_event is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), timeout=seconds)

    # ---- writing
    def _cap(self) -> None:
        """Drop the oldest buffered outcomes past `max_buffered_rows` (the lake is unwritable).

        A fleet makes millions of rows an hour: a weekend of disk-full would
        otherwise end in an out-of-memory kill that loses everything. What is
        dropped is counted per target, said on stderr, and in the target's next
        health row that reaches the lake (`_write`). The newest outcome is kept.
        """
        dropped: dict[str, int] = {}
        while self.buffered_rows > self.max_buffered_rows and len(self.buffer) > 1:
            old = self.buffer.pop(0)
            n = old.rows() + old.attempt
            self.buffered_rows -= n
            dropped[old.target] = dropped.get(old.target, 0) + n
        if not dropped:
            return
        total = sum(dropped.values())
        self.stats.dropped_rows += total
        by_name = {t.cfg.name: t for t in self.targets}
        for name, n in dropped.items():
            self._unreported[name] = self._unreported.get(name, 0) + n
            if name in by_name:
                by_name[name].dropped += n
        now = time.monotonic()
        if now - self._drop_said < self.cfg.status_interval:
            return  # said at most once a status interval (the status line counts them)
        self._drop_said = now
        self._print(
            f"collect: DROPPED {total:,} buffered rows ({self.stats.dropped_rows:,} so far): "
            f"the lake {self.cfg.lake} cannot be written and the buffer is full "
            f"(max_buffered_rows={self.max_buffered_rows:,}); oldest rows go first"
        )

    async def flush(self) -> None:
        """Write buffered rows (in the writer thread), then commit dependent checkpoints.

        A failed write keeps the rows (up to `max_buffered_rows`) and sets the
        next retry `flush_interval` later, doubling per consecutive failure up to
        `backoff_max`; until then only the flush timer (or the last flush) tries.
        """
        assert self._flush_lock is not None
        async with self._flush_lock:
            batch, self.buffer, self.buffered_rows = self.buffer, [], 0
            if not batch:
                return
            # a target's drops are said in its newest health row of the batch
            attempted = {o.target for o in batch if o.attempt}
            notes = {k: n for k, n in self._unreported.items() if k in attempted}
            try:
                await self._writer.run(self._write, batch, notes)
            except Exception as exc:  # disk full, permissions...: keep the rows, retry later
                self.buffer[:0] = batch
                self.buffered_rows += sum(o.rows() + o.attempt for o in batch)
                self.stats.write_errors += 1
                self._write_failures += 1
                if self.stopping:  # the last flush (--once, shutdown): nothing retries it
                    raise LakeWriteError(f"writing to {self.cfg.lake} failed: {exc}") from exc
                wait = min(
                    self.cfg.flush_interval * 2 ** (self._write_failures - 1),
                    max(self.cfg.backoff_max, self.cfg.flush_interval),
                )
                self._retry_at = time.monotonic() + wait
                self._cap()
                self._print(
                    f"collect: writing to {self.cfg.lake} failed, will retry: {exc} "
                    f"(next try in {wait:.3g}s; {self.buffered_rows:,} rows buffered, "
                    f"at most {self.max_buffered_rows:,})"
                )
                return
            self._write_failures = 0
            self._retry_at = 0.0
            for name, n in notes.items():  # said in the health rows just written
                left = self._unreported.get(name, 0) - n
                if left > 0:
                    self._unreported[name] = left
                else:
                    self._unreported.pop(name, None)

    async def write_now(
        self,
        kind: str,
        tables: dict[str, Any],
        *,
        then: Callable[[], None],
        rejects: dict[str, list[dict[str, str]]] | None = None,
    ) -> list[AppendResult]:
        """Write rows now (not via the buffer), then run `then` (a checkpoint commit).

        Returns what the lake did with them: the caller's health row counts
        the rows loaded and rejected, not the rows it handed over. `rejects`
        (table -> location/raw/reason rows the caller refused) go to `rejects`.
        """
        by_table = {(t, kind): [d] for t, d in tables.items() if d is not None and len(d)}

        def write() -> list[AppendResult]:
            with self.write_lock:
                for table, rows in (rejects or {}).items():
                    if rows:
                        self.lake.reject(table, rows, source=kind)
                results = self._append(by_table)
                self.stats.files += sum(len(r.files) for r in results)
            then()
            return results

        return await self._writer.run(write)

    def _append(self, by_table: dict[tuple[str, str], list[Any]]) -> list[AppendResult]:
        """Append rows per (table, source); the caller holds the write lock."""
        results = []
        # samples before the cache events derived from them (see collectors.vllm)
        order = {"gpu_samples": 0, "serving_samples": 1, "cache_events": 2}
        for (table, kind), datas in sorted(by_table.items(), key=lambda kv: order.get(kv[0][0], 9)):
            valid = [d.rows for d in datas if isinstance(d, Validated)]
            if valid:  # `Target.keep` validated them: not again
                frame = pl.concat(valid) if len(valid) > 1 else valid[0]
                results.append(self.lake.append_validated(table, frame, source=kind))
            frames = [
                d if isinstance(d, pl.DataFrame) else pl.DataFrame(d)
                for d in datas
                if not isinstance(d, Validated)
            ]
            if frames:
                frame = pl.concat(frames, how="diagonal_relaxed") if len(frames) > 1 else frames[0]
                results.append(self.lake.append(table, frame, source=kind))
        return results

    def _write(self, batch: list[Outcome], notes: dict[str, int] | None = None) -> None:
        by_table: dict[tuple[str, str], list[Any]] = {}
        rejects: dict[tuple[str, str], list[dict[str, str]]] = {}
        for out in batch:
            for table, datas in out.frames.items():
                by_table.setdefault((table, out.kind), []).extend(datas)
            for table, rej in out.rejects:
                rejects.setdefault((table, out.kind), []).append(rej)
        with self.write_lock:
            files = sum(len(r.files) for r in self._append(by_table))
            for (table, kind), rows in rejects.items():
                self.lake.reject(table, rows, source=kind)
            health = [o.health() for o in batch if o.attempt]  # a restore is no attempt
            for name, n in (notes or {}).items():
                # the target's newest health row says what the full buffer dropped
                rows = [h for h in health if h["target"] == name]
                said = (
                    f"{n:,} buffered rows of this target dropped: the lake could not be "
                    f"written and the buffer reached max_buffered_rows={self.max_buffered_rows:,}"
                )
                h = rows[-1]
                h["error"] = f"{said}; {h['error']}" if h["error"] else said
            if health:
                self.lake.append("scrape_health", health, source="collect")
        self.stats.flushes += 1
        self.stats.files += files
        self.stats.last_flush = time.monotonic()

    # ---- status
    def status_line(self) -> str:
        down = [t for t in self.targets if t.last is not None and not t.last.up]
        parts = [
            f"{len(self.targets)} targets",
            f"{sum(1 for t in self.targets if t.last is not None and t.last.up)} up",
            f"{len(down)} down",
            f"{self.stats.samples:,} samples",
            f"{self.stats.rejected:,} rejected",
            f"{self.stats.flushes} flushes",
        ]
        if self.stats.dropped_rows:
            parts.append(f"{self.stats.dropped_rows:,} rows DROPPED (lake unwritable)")
        line = "collect: " + ", ".join(parts)
        if down:
            t = down[0]
            line += f" | {t.cfg.name}: {(t.last.error or '')[:120]}"  # type: ignore[union-attr]
        return line

    def _print(self, line: str) -> None:
        if self.status_out is not None:
            print(line, file=self.status_out, flush=True)

    async def _status_loop(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            await self._sleep(self.cfg.status_interval)
            self._print(self.status_line())

    async def _flush_loop(self) -> None:
        assert self.stop_event is not None
        while not self.stop_event.is_set():
            await self._sleep(self.cfg.flush_interval)
            if time.monotonic() >= self._retry_at:  # a failed write backs off
                await self.flush()

    # ---- entry points
    async def _open(self) -> None:
        self.stop_event = asyncio.Event()
        self._flush_lock = asyncio.Lock()
        self.http = httpx.AsyncClient(
            follow_redirects=True, limits=httpx.Limits(max_connections=256)
        )
        for t in self.targets:
            try:
                restored = await t.restore()
            except Exception as exc:  # an unreadable file: this target starts without it
                msg = str(exc) or type(exc).__name__
                t.note = f"started without its state from the lake: {msg}"
                self._print(f"collect: {t.cfg.name}: {t.note}")
                continue
            if restored is not None:  # written with the first flush, under no health row
                self.buffer.append(restored)
                self.buffered_rows += restored.rows()

    async def _close(self) -> None:
        """Flush and release, without waiting for a target stuck in a blocking call.

        Such a target's thread is a daemon thread, abandoned at exit; its
        `close()` is skipped, as it would block behind the stuck call (NVML
        serializes its calls).
        """
        self.stopping = True
        for t in self.targets:
            t.interrupt()
        if not self.once:
            # one last, final poll of each idle log (bounded by its timeout): the
            # daemon's polls leave a last line without its newline to its writer
            finals = [t for t in self.targets if t.final_poll and t.busy_for() is None]
            await asyncio.gather(*(self.run_attempt(t) for t in finals))
        await self.flush()
        stuck = []
        for t in self.targets:
            if t.busy_for() is None:
                t.close()
            else:
                stuck.append(t.cfg.name)
        if stuck:
            self._print(f"collect: not waiting for {', '.join(stuck)} (a call still running)")
        await self.http.aclose()

    async def run_once(self) -> list[Outcome]:
        """Try every target once (concurrently), flush, return the outcomes."""
        self.once = True
        await self._open()
        try:
            outs = await asyncio.gather(*(self.run_attempt(t) for t in self.targets))
        finally:
            await self._close()
        return list(outs)

    async def run_forever(self, *, install_signals: bool = True) -> None:
        """Collect until SIGTERM/SIGINT (or `stop()`), then flush and return."""
        await self._open()
        assert self.stop_event is not None
        loop = asyncio.get_running_loop()
        if install_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.stop_event.set)
        self._print(f"collect: {len(self.targets)} targets -> {self.cfg.lake}")
        tasks = [asyncio.create_task(self._target_loop(t), name=t.cfg.name) for t in self.targets]
        tasks += [asyncio.create_task(self._flush_loop()), asyncio.create_task(self._status_loop())]
        try:
            await self.stop_event.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._close()
            self._print(self.status_line() + " | stopped")

    def stop(self) -> None:
        if self.stop_event is not None:
            self.stop_event.set()
