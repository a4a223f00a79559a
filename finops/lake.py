"""The Parquet lake: one writer API that every collector and the demo use.

Why files and not a DuckDB database: a DuckDB file admits one writer process,
and collectors run for weeks while analysts open notebooks. So writers append
immutable Parquet files under `<lake>/<table>/date=YYYY-MM-DD/`, each written
to a temporary name and renamed into place (a reader never sees half a file),
and `finops.connect()` puts DuckDB views on top.

Guarantees of `Lake.append`:
- validated: every row is coerced to the table's schema (`finops.schemas`);
- lossless: a row that fails is written to `rejects` with its location and
  reason, and `read == loaded + rejected` in the returned counts;
- idempotent: the file name carries a fingerprint of its content, so appending
  the same batch twice writes nothing new (also after `compact`, which records the
  fingerprints it merged), and clean views keep one row per key;
- latest write wins: the file name also carries when it was written, so when rows
  with one key differ (a log re-ingested with a corrected mapping), the clean views
  keep the most recently written one, the same on every query. Within one batch the
  later row of a key is kept: an earlier exact copy counts as loaded once (and in
  `AppendResult.duplicates`), an earlier row that differs is rejected with a reason
  that names where the kept row is.
- re-reads write nothing twice: with `skip_unchanged` (one-shot log ingest), a row
  whose key the partition already holds with the same values in every column is
  not written again, so a log read again after it grew adds only its new lines.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import math
import os
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from finops.schemas import REJECTS, TABLES, TableSchema, schema_for

LOCATION_COLUMN = "_location"
"""Optional input column naming where each row came from (e.g. `file.jsonl:12`)."""

RAW_COLUMN = "_raw"
"""Optional input column with the original text of each row, kept for rejects."""

MAX_RAW_CHARS = 500
STALE_TMP_AGE = dt.timedelta(minutes=15)
"""A hidden temporary file this old is a killed writer's leftover; `compact` removes it."""
SWEEP_EVERY = dt.timedelta(minutes=1)
"""How often a writing `Lake` deletes merged-away files past their grace (`sweep_superseded`)."""
SUPERSEDED_GRACE = dt.timedelta(minutes=30)
"""How long the files a compaction merged stay on disk before a later compaction deletes them.

DuckDB expands a view's glob when it binds a query and opens the files later (a long
`finops sql`, a notebook cell, another process's query), so deleting them at once fails
such a query with "Cannot open file". Half an hour outlasts any query over the lake.
"""
FUTURE_TOLERANCE = dt.timedelta(minutes=10)
EARLIEST_TS = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
_TS_FORMATS_TZ = ("%Y-%m-%dT%H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%.f%#z")
_TS_FORMATS_NAIVE = ("%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f", "%Y-%m-%d")
_TS_DT = r"(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)"  # date and time of day
_TS_REWRITES = (
    # Go's time.Time.String() may end in the monotonic clock reading: "... m=+0.000012"
    (r"\s+m=[+-]\d+(?:\.\d+)?$", ""),
    # Go's "2026-11-20 01:00:00 +0000 UTC": the numeric offset is the time, the name a note
    (rf"^{_TS_DT}\s*([+-]\d{{2}}:?\d{{2}})\s+[A-Za-z]{{1,5}}$", "${1}${2}"),
    # "2026-11-20 01:00:00 UTC" (Go's layout for UTC times)
    (rf"^{_TS_DT}\s*(?:UTC|GMT)$", "${1}+00:00"),
    # an offset after a space: "2026-11-20 01:00:00 +0100"
    (rf"^{_TS_DT}\s+([+-]\d{{2}}:?\d{{2}})$", "${1}${2}"),
    # minutes without seconds: "2026-11-20T01:00", "2026-11-20T01:00Z", "... 01:00+01:00"
    (r"^(\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2})([Zz]|[+-]\d{2}:?\d{2})?$", "${1}:00${2}"),
)
"""Close spellings of a timestamp, rewritten (in order) into one `_TS_FORMATS_*` reads."""
_TRUE = ("true", "1", "yes", "t", "y")
_FALSE = ("false", "0", "no", "f", "n")
_TYPE_WORDS = {
    pl.Int32: "an integer",
    pl.Int64: "an integer",
    pl.Float64: "a number",
    pl.Boolean: "a boolean",
    pl.String: "a string",
}


class LakeError(ValueError):
    """Input the lake cannot take at all (as opposed to a row it rejects)."""


class LakeFileError(LakeError, OSError):
    """Files in the lake that cannot be read as their table: cut short (a full disk, a
    killed copy), not Parquet at all, or a hand-placed file whose column has another type.

    Readers refuse such a lake rather than skip the file: a day's requests missing
    would show a smaller bill, not an error. `problems` holds (file, reason) pairs.
    An OSError too (as `gzip.BadGzipFile`), so a writer's handler of failed file I/O
    reports it as it reports a full disk.
    """

    def __init__(self, problems: Sequence[tuple[Path, str]]) -> None:
        self.problems = list(problems)
        shown = "; ".join(f"{path}: {why}" for path, why in self.problems[:3])
        if len(self.problems) > 3:
            shown += f"; and {len(self.problems) - 3} more"
        one = len(self.problems) == 1
        super().__init__(
            (
                "a lake file cannot be read"
                if one
                else f"{len(self.problems)} lake files cannot be read"
            )
            + f": {shown}; move {'it' if one else 'them'} out of the lake folder "
            "(`finops lake info` lists every such file) and run again"
        )


@dataclass
class AppendResult:
    """What one append did; `read == loaded + rejected` always holds.

    `loaded`: rows the lake holds after the append, counting `duplicates`.
    `rejected`: rows written to `rejects` with a reason, among them an earlier row whose
    key appears again later in the batch with other values (the later one is kept).
    `duplicates`: of `loaded`, earlier exact copies of a row repeated later in the same
    batch (same key, same value in every column): the row is written once, so the
    batch's files hold `loaded - duplicates` rows.
    `duplicate_files`: partitions not written because the same batch was written before.
    With `skip_unchanged`, of `loaded`: `unchanged` rows the lake held already with the
    same values (not written again), `replaced` rows whose key it held with other values
    (written: they win); the rest are new.
    """

    table: str
    read: int = 0
    loaded: int = 0
    rejected: int = 0
    files: list[Path] = field(default_factory=list)
    duplicate_files: int = 0
    ignored_columns: list[str] = field(default_factory=list)
    duplicates: int = 0
    unchanged: int = 0
    replaced: int = 0

    def __iadd__(self, other: AppendResult) -> AppendResult:
        self.read += other.read
        self.loaded += other.loaded
        self.rejected += other.rejected
        self.duplicates += other.duplicates
        self.unchanged += other.unchanged
        self.replaced += other.replaced
        self.files += other.files
        self.duplicate_files += other.duplicate_files
        self.ignored_columns = sorted(set(self.ignored_columns) | set(other.ignored_columns))
        return self


@dataclass
class CompactResult:
    table: str
    partitions: int = 0
    files_before: int = 0
    files_after: int = 0
    rows_before: int = 0
    rows_after: int = 0
    deleted: int = 0  # files merged away by an earlier compaction, now past their grace
    # files left as they are, neither merged nor deleted: they cannot be read (file, why)
    unreadable: list[tuple[Path, str]] = field(default_factory=list)


def canonical_json(value: Any) -> str | None:
    """Sorted-key compact JSON: equal label sets give equal strings (and keys)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS).decode()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _atomic_file(dest: Path, mode: str, *, fsync: bool) -> Iterator[Any]:
    """A file handle on a temporary name next to `dest`, renamed into place when done.

    The temporary name starts with '.' and does not end like the real one: finops'
    globs never match it, and dataset readers (pyarrow.dataset, Spark, Trino) skip
    hidden files, so a writer killed mid-way leaves nothing any reader trips on.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:12]}")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as fh:
            yield fh
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if fsync:
        _fsync_dir(dest.parent)


def _remove_stale_tmp(part_dir: Path, now: float) -> None:
    """Remove killed writers' hidden temporary files; a young one may be a write in progress."""
    for tmp in part_dir.glob(".*.tmp-*"):
        with contextlib.suppress(FileNotFoundError):
            if now - tmp.stat().st_mtime > STALE_TMP_AGE.total_seconds():
                tmp.unlink()


@contextlib.contextmanager
def _flock(path: Path, kind: int) -> Iterator[None]:
    """Hold a `flock` on `path`; the OS releases it when its process dies (no stale lock)."""
    with open(path, "a") as fh:
        fcntl.flock(fh, kind)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _compact_lock(root: Path, *, wait: bool = True) -> contextlib.AbstractContextManager[None]:
    """One compaction (or sweep) of a table at a time, across processes.

    A second one would merge the files the first is merging and superseding under it.
    With `wait=False`, a table already held raises BlockingIOError instead of waiting.
    """
    return _flock(root / ".compact.lock", fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))


def _publish_lock(root: Path, *, exclusive: bool) -> contextlib.AbstractContextManager[None]:
    """Writers (shared) take their file's stamp and rename it in; a compaction (exclusive) lists.

    So a file a compaction's listing misses is stamped later than every file it merges,
    and the merged file, stamped as its newest input, never outranks a later write.
    """
    return _flock(root / ".publish.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)


def _encode_parquet(table: pa.Table | pl.DataFrame, fh: Any) -> None:
    """zstd level 1 with statistics; a Polars frame is written by Polars (no copy to Arrow)."""
    if isinstance(table, pl.DataFrame):
        table.write_parquet(fh, compression="zstd", compression_level=1, statistics=True)
    else:
        pq.write_table(table, fh, compression="zstd", compression_level=1, write_statistics=True)


def write_parquet_atomic(table: pa.Table | pl.DataFrame, dest: Path, *, fsync: bool = True) -> None:
    """Write to a temporary name in the same folder, fsync, then rename."""
    with _atomic_file(dest, "wb", fsync=fsync) as fh:
        _encode_parquet(table, fh)


def _write_pending(table: pl.DataFrame, tmp: Path, *, fsync: bool) -> None:
    """Write a batch to its hidden temporary name; `_write_partitions` names and renames it."""
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "wb") as fh:
        _encode_parquet(table, fh)
        if fsync:
            fh.flush()
            os.fsync(fh.fileno())


def to_frame(data: Any) -> pl.DataFrame:
    """Accept Polars, Arrow, pandas-like or an iterable of dict rows."""
    if isinstance(data, pl.DataFrame):
        return data
    if isinstance(data, pl.LazyFrame):
        return data.collect()
    if isinstance(data, pa.Table | pa.RecordBatch):
        return pl.from_arrow(data)  # type: ignore[return-value]
    if hasattr(data, "to_dict") and hasattr(data, "columns") and hasattr(data, "dtypes"):
        return pl.from_pandas(data)
    if isinstance(data, Mapping):
        raise LakeError("append() takes rows (a list of dicts) or a frame, not a single dict")
    rows = data if isinstance(data, Sequence) else list(data)
    if not rows:
        return pl.DataFrame()
    names: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, Mapping):
            raise LakeError(f"append() rows must be dicts, got {type(row).__name__}")
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        columns[name] = _series_from_python(name, values)
    return pl.DataFrame(columns)


def _series_from_python(name: str, values: list[Any]) -> pl.Series:
    """Build a column from Python values without losing what a bad value was."""
    if any(isinstance(v, dict | list) for v in values):
        values = [canonical_json(v) if isinstance(v, dict | list) else v for v in values]
    try:
        return pl.Series(name, values, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        return pl.Series(
            name,
            [
                None if v is None else (v.isoformat() if hasattr(v, "isoformat") else str(v))
                for v in values
            ],
            dtype=pl.String,
        )


def _strptime(fmt: str) -> Callable[[pl.Series], pl.Series]:
    """A reader of one format; a format without an offset is read as UTC."""

    def read(s: pl.Series) -> pl.Series:
        if fmt in _TS_FORMATS_TZ:
            return s.str.strptime(pl.Datetime("us", "UTC"), fmt, strict=False)
        naive = s.str.strptime(pl.Datetime("us"), fmt, strict=False)
        return naive.dt.replace_time_zone("UTC")

    return read


def _respelled(s: pl.Series) -> pl.Series:
    """`_TS_REWRITES` applied, then read by the standard readers (see `_parse_ts_strings`)."""
    spelled = s.str.strip_chars()
    for pattern, replacement in _TS_REWRITES:
        spelled = spelled.str.replace(pattern, replacement)
    return _read_first(spelled, _TS_READERS[:-1])


def _read_first(s: pl.Series, readers: Sequence[Callable[[pl.Series], pl.Series]]) -> pl.Series:
    """Each string read by the first of `readers` that reads it (null: none does).

    The readers read disjoint spellings, so their order does not change a result, only
    the cost: those that read most of a small sample go first, each later one only sees
    the strings still unread, and none runs once all are read. A log spells its times
    one way, so the usual column costs one reader whichever way that is.
    """
    want = s.len() - s.null_count()
    sample = s.head(_TS_SAMPLE).drop_nulls()
    hits = [r(sample).null_count() if sample.len() else 0 for r in readers]
    order = sorted(range(len(readers)), key=lambda i: hits[i])  # fewest unread first
    out: pl.Series | None = None
    for i in order:
        todo = s if out is None else pl.select(pl.when(out.is_null()).then(s)).to_series()
        parsed = readers[i](todo)
        out = parsed if out is None else out.fill_null(parsed)
        if out.len() - out.null_count() == want:
            break
    assert out is not None
    return out.alias(s.name)


def _parse_ts_strings(s: pl.Series) -> pl.Series:
    """Timestamps from strings: ISO 8601 / RFC 3339, epoch numbers, and close spellings.

    The close spellings (`_TS_REWRITES`: minutes without seconds, Go's `time.Time`
    text, a trailing `UTC`) are rewritten into an ISO form and read again.
    """
    return _read_first(s, _TS_READERS)


def _epoch_to_ts(s: pl.Series) -> pl.Series:
    """Numbers as epoch time; the unit follows from the magnitude (s, ms, us, ns).

    Nanoseconds (OTel `time_unix_nano`) are >= 1e17; integers among them are divided
    exactly, as a float has too few digits for them.
    """
    f = s.cast(pl.Float64, strict=False)
    exact = s.cast(pl.Int64, strict=False)
    us = (
        pl.select(
            pl.when(f.abs() >= 1e17)
            .then(pl.when(exact.is_not_null()).then(exact // 1000).otherwise(f / 1e3))
            .when(f.abs() >= 1e14)
            .then(f)
            .when(f.abs() >= 1e11)
            .then(f * 1e3)
            .otherwise(f * 1e6)
            .round(0)
        )
        .to_series()
        .cast(pl.Int64, strict=False)
    )
    return us.cast(pl.Datetime("us")).dt.replace_time_zone("UTC").alias(s.name)


_TS_SAMPLE = 64
_TS_READERS: tuple[Callable[[pl.Series], pl.Series], ...] = (
    *(_strptime(fmt) for fmt in (*_TS_FORMATS_TZ, *_TS_FORMATS_NAIVE)),
    lambda s: _epoch_to_ts(s.str.strip_chars()),
    _respelled,  # last: `_respelled` reads with the ones before it
)
"""What reads a timestamp string, each a disjoint set of spellings (`_read_first`)."""


def coerce(s: pl.Series, target: pl.DataType) -> pl.Series:
    """Cast a column to its schema type; values that cannot be cast become null.

    The caller compares nulls before and after to find the bad values, so a
    bad value is reported instead of silently vanishing.
    """
    src = s.dtype
    if src == target:
        return s
    if src == pl.Null:
        return s.cast(target)
    if isinstance(target, pl.Datetime):
        if isinstance(src, pl.Datetime):
            return (
                s.dt.replace_time_zone("UTC")
                if src.time_zone is None
                else s.dt.convert_time_zone("UTC")
            ).dt.cast_time_unit("us")
        if src == pl.Date:
            return s.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
        if src.is_numeric():
            return _epoch_to_ts(s)
        if src == pl.String:
            return _parse_ts_strings(s)
        return pl.Series(s.name, [None] * len(s), dtype=target)
    if target == pl.Boolean:
        if src.is_numeric():
            return (
                pl.select(pl.when(s == 1).then(True).when(s == 0).then(False))
                .to_series()
                .alias(s.name)
            )
        if src == pl.String:
            low = s.str.strip_chars().str.to_lowercase()
            return (
                pl.select(pl.when(low.is_in(_TRUE)).then(True).when(low.is_in(_FALSE)).then(False))
                .to_series()
                .alias(s.name)
            )
        return pl.Series(s.name, [None] * len(s), dtype=pl.Boolean)
    if target.is_integer():
        if src.is_float():
            ok = s.is_finite() & (s == s.round(0))
            return (
                pl.select(pl.when(ok).then(s)).to_series().cast(target, strict=False).alias(s.name)
            )
        if src == pl.String:
            stripped = s.str.strip_chars()
            as_float = stripped.cast(pl.Float64, strict=False)
            ok = as_float.is_finite() & (as_float == as_float.round(0))
            return (
                pl.select(pl.when(ok).then(as_float))
                .to_series()
                .cast(target, strict=False)
                .alias(s.name)
            )
        if src == pl.Boolean:
            return pl.Series(s.name, [None] * len(s), dtype=target)
        return s.cast(target, strict=False)
    if target.is_float():
        if src == pl.String:
            return s.str.strip_chars().cast(target, strict=False)
        if src == pl.Boolean:
            return pl.Series(s.name, [None] * len(s), dtype=target)
        return s.cast(target, strict=False)
    if target == pl.String:
        if isinstance(src, pl.Struct | pl.List):
            return (
                s.to_frame()
                .select(
                    pl.col(s.name).struct.json_encode()
                    if isinstance(src, pl.Struct)
                    else pl.col(s.name).cast(pl.String, strict=False)
                )
                .to_series()
            )
        if isinstance(src, pl.Datetime):
            return s.dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
        return s.cast(pl.String, strict=False)
    return s.cast(target, strict=False)


def _lowercased(s: pl.Series) -> pl.Series:
    """An enumeration stripped and lower-cased ("HIT" -> "hit"); `s` itself if already so."""
    if s.dtype != pl.String:
        return s
    values = s.unique()  # a handful: checking them is cheaper than rewriting every row
    if values.eq_missing(values.str.strip_chars().str.to_lowercase()).all():
        return s
    return s.str.strip_chars().str.to_lowercase()


def _describe(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "a timestamp (ISO 8601 or epoch s/ms/us/ns)"
    return _TYPE_WORDS.get(dtype, str(dtype))  # type: ignore[call-overload]


@dataclass
class _Validated:
    good: pl.DataFrame
    bad: pl.DataFrame  # columns: location, raw, reason
    # earlier copies of a row repeated later in the batch (same key, same values): not in
    # `good`, as the later copy is (see `_resolve_repeated_keys`); their keys, one row each
    duplicates: int = 0
    duplicate_keys: pl.DataFrame | None = None


def validate(
    df: pl.DataFrame,
    schema: TableSchema,
    *,
    source: str,
    now: dt.datetime | None = None,
) -> tuple[_Validated, list[str]]:
    """Coerce a frame to `schema` and split it into good rows and rejects."""
    now = now or dt.datetime.now(dt.UTC)
    n = df.height
    ignored = [
        c for c in df.columns if c not in schema.columns and c not in (LOCATION_COLUMN, RAW_COLUMN)
    ]

    cols: dict[str, pl.Series] = {}
    reason_exprs: list[pl.Expr] = []
    checks: dict[str, pl.Series] = {}
    flagged = False  # whether any row failed any check (else no reason is built at all)
    lowercase = {*schema.lowercase, *schema.allowed}
    for name, dtype in schema.columns.items():
        if name not in df.columns:
            cols[name] = pl.repeat(None, n, dtype=dtype, eager=True).alias(name)
            continue
        raw = df[name]
        try:
            cast = coerce(raw, dtype)
        except (pl.exceptions.PolarsError, TypeError, ValueError) as exc:
            raise LakeError(
                f"{schema.name}.{name}: cannot read column of type {raw.dtype}: {exc}"
            ) from exc
        if name in lowercase:
            cast = _lowercased(cast)
        cols[name] = cast.alias(name)
        if dtype.is_float() and name not in schema.non_finite_ok:
            # NaN and +-inf (as floats, or the strings "NaN", "inf") cast fine but
            # would turn a mart's mean or percentile into NaN or inf
            infinite = ~cast.is_finite().fill_null(True)
            if infinite.any():
                flagged = True
                flag = f"__nonfinite_{name}"
                checks[flag] = infinite
                checks[f"__nonfiniteval_{name}"] = (
                    raw.cast(pl.String, strict=False).str.slice(0, 60).fill_null("?")
                )
                reason_exprs.append(
                    pl.when(pl.col(flag)).then(
                        pl.format(
                            "field '{}': expected a finite number, got '{}'",
                            pl.lit(name),
                            pl.col(f"__nonfiniteval_{name}"),
                        )
                    )
                )
        if cast is raw:  # already of the schema's type: no value was lost to the cast
            continue
        bad = cast.is_null() & raw.is_not_null()
        if bad.any():
            flagged = True
            flag = f"__bad_{name}"
            checks[flag] = bad
            shown = (
                raw.cast(pl.String, strict=False).str.slice(0, 60)
                if raw.dtype != pl.String
                else raw.str.slice(0, 60)
            )
            checks[f"__val_{name}"] = shown.fill_null("?")
            reason_exprs.append(
                pl.when(pl.col(flag)).then(
                    pl.format(
                        "field '{}': expected {}, got '{}'",
                        pl.lit(name),
                        pl.lit(_describe(dtype)),
                        pl.col(f"__val_{name}"),
                    )
                )
            )
    out = pl.DataFrame(list(cols.values()))
    for name in schema.required:
        flag = f"__missing_{name}"
        checks[flag] = out[name].is_null() & ~checks.get(
            f"__bad_{name}", pl.repeat(False, n, eager=True)
        )
        flagged = flagged or bool(checks[flag].any())
        reason_exprs.append(
            pl.when(pl.col(flag)).then(pl.lit(f"field '{name}': required, missing or null"))
        )
        if out[name].dtype == pl.String:
            # a blank id is no id: every such row would share the key "" and collapse
            blank = out[name].str.contains(r"^\s*$").fill_null(False)
            if blank.any():
                flagged = True
                checks[f"__blank_{name}"] = blank
                reason_exprs.append(
                    pl.when(pl.col(f"__blank_{name}")).then(
                        pl.lit(f"field '{name}': required, missing or empty")
                    )
                )
    # Value strings for the reasons are only built when some row fails the check:
    # formatting a million values nobody reads is most of a clean append's cost.
    for name in schema.non_negative:
        flag = f"__neg_{name}"
        negative = (out[name] < 0).fill_null(False)
        if not negative.any():
            continue
        flagged = True
        checks[flag] = negative
        checks[f"__negval_{name}"] = out[name].cast(pl.String)
        reason_exprs.append(
            pl.when(pl.col(flag)).then(
                pl.format(
                    "field '{}': must be >= 0, got {}", pl.lit(name), pl.col(f"__negval_{name}")
                )
            )
        )
    for name, values in schema.allowed.items():
        flag = f"__notallowed_{name}"
        wrong = (~out[name].is_in(list(values))).fill_null(False)
        if not wrong.any():
            continue
        flagged = True
        checks[flag] = wrong
        checks[f"__allowedval_{name}"] = out[name].str.slice(0, 60)
        reason_exprs.append(
            pl.when(pl.col(flag)).then(
                pl.format(
                    "field '{}': expected one of {}, got '{}'",
                    pl.lit(name),
                    pl.lit(", ".join(values)),
                    pl.col(f"__allowedval_{name}"),
                )
            )
        )
    ts_col = schema.ts_column
    if schema.name != REJECTS.name:
        ts = out[ts_col]
        future = (ts > (now + FUTURE_TOLERANCE)).fill_null(False)
        ancient = (ts < EARLIEST_TS).fill_null(False)
    if schema.name != REJECTS.name and (future.any() or ancient.any()):
        flagged = True
        checks["__future"] = future
        checks["__ancient"] = ancient
        checks["__tsval"] = ts.dt.to_string("%Y-%m-%dT%H:%M:%SZ")
        reason_exprs.append(
            pl.when(pl.col("__future")).then(
                pl.format(
                    "field '{}': timestamp {} is in the future", pl.lit(ts_col), pl.col("__tsval")
                )
            )
        )
        reason_exprs.append(
            pl.when(pl.col("__ancient")).then(
                pl.format(
                    "field '{}': timestamp {} is before 2000 (epoch unit wrong?)",
                    pl.lit(ts_col),
                    pl.col("__tsval"),
                )
            )
        )
    if not flagged or n == 0:
        return _resolve_repeated_keys(df, out, None, _empty_bad(), schema, source), ignored
    check_df = (
        pl.DataFrame(list(checks.values()), schema=list(checks)) if checks else pl.DataFrame()
    )
    reasons = check_df.select(pl.coalesce(reason_exprs).alias("reason")).to_series()
    is_bad = reasons.is_not_null()
    if not is_bad.any():
        return _resolve_repeated_keys(df, out, None, _empty_bad(), schema, source), ignored
    bad_idx = is_bad.arg_true()
    if LOCATION_COLUMN in df.columns:
        location = df[LOCATION_COLUMN].cast(pl.String).gather(bad_idx)
    else:
        location = _row_locations(bad_idx, source)
    bad = pl.DataFrame(
        {
            "location": location,
            "raw": _raw_texts(df, bad_idx),
            "reason": reasons.gather(bad_idx),
        }
    )
    good_idx = (~is_bad).arg_true()
    return _resolve_repeated_keys(df, out.filter(~is_bad), good_idx, bad, schema, source), ignored


def _row_locations(idx: pl.Series, source: str) -> pl.Series:
    """`<source> row <n>` (1-based) for rows of a batch without a `_location` column."""
    return pl.select(pl.format("{} row {}", pl.lit(source), idx.cast(pl.Int64) + 1)).to_series()


def _raw_texts(df: pl.DataFrame, idx: pl.Series) -> pl.Series:
    """The input text of these rows (`_raw`, else a JSON excerpt), at most MAX_RAW_CHARS."""
    if RAW_COLUMN in df.columns:
        raw_text = df[RAW_COLUMN].gather(idx).cast(pl.String)
    else:
        raw_text = _row_excerpts(
            df.drop([c for c in (LOCATION_COLUMN,) if c in df.columns]).gather(idx)
        )
    return raw_text.str.slice(0, MAX_RAW_CHARS).alias("raw")


def _key_text(rows: pl.DataFrame, key: Sequence[str]) -> pl.Series:
    """A key as a reason names it: `request_id 'r1'`, or `key (source='a', ts='...')`."""
    shown = []
    for c in key:
        v = rows[c]
        text = (
            v.dt.to_string("%Y-%m-%dT%H:%M:%S%.fZ")
            if isinstance(v.dtype, pl.Datetime)
            else v.cast(pl.String)
        )
        shown.append(
            pl.select(
                pl.when(text.is_null())
                .then(pl.lit("null"))
                .otherwise(pl.format("'{}'", text.str.slice(0, 60)))
            ).to_series()
        )
    if len(key) == 1:
        return pl.select(pl.format("{} {}", pl.lit(key[0]), shown[0])).to_series()
    parts = [pl.format("{}={}", pl.lit(c), s) for c, s in zip(key, shown, strict=True)]
    return pl.select(pl.format("key ({})", pl.concat_str(parts, separator=", "))).to_series()


def _resolve_repeated_keys(
    df: pl.DataFrame,
    good: pl.DataFrame,
    rows: pl.Series | None,
    bad: pl.DataFrame,
    schema: TableSchema,
    source: str,
) -> _Validated:
    """One row per key in a batch: a row whose key appears again later is superseded.

    The later row is kept (a log's later line is its later word). An earlier row equal
    to it in every column is a duplicate, loaded once (`_Validated.duplicates`); one
    that differs is rejected, the reason naming where the kept row is. `rows` maps
    `good`'s rows to `df`'s (None: the same rows).
    """
    key = list(schema.key)
    if good.height < 2 or not key:
        return _Validated(good, bad)
    # the usual batch repeats no key: distinct hashes prove it, at a fraction of the cost
    # of comparing the keys themselves (4x less for the ten columns of a GPU sample's)
    if good.select(key).hash_rows(seed=0).n_unique() == good.height:
        return _Validated(good, bad)
    keys = good.select(pl.struct(key) if len(key) > 1 else pl.col(key[0])).to_series()
    if keys.n_unique() == good.height:  # two keys sharing a hash, none repeated
        return _Validated(good, bad)
    pairs = (
        good.select(key)
        .with_columns(pl.int_range(good.height, dtype=pl.UInt32).alias("__i"))
        .filter(keys.is_duplicated())
        .with_columns(pl.col("__i").last().over(key).alias("__kept"))
        .filter(pl.col("__i") != pl.col("__kept"))
    )
    earlier, kept = pairs["__i"], pairs["__kept"]
    a, b = good.gather(earlier), good.gather(kept)
    same = pl.DataFrame([a[c].eq_missing(b[c]) for c in good.columns]).select(
        pl.all_horizontal(pl.all())
    )
    differ = ~same.to_series()
    superseded = pl.repeat(False, good.height, eager=True).scatter(earlier, True)
    out = _Validated(
        good.filter(~superseded),
        bad,
        duplicates=earlier.len() - int(differ.sum()),
        duplicate_keys=a.filter(~differ).select(key),
    )
    if not differ.any():
        return out
    lost = earlier.filter(differ) if rows is None else rows.gather(earlier.filter(differ))
    winner = kept.filter(differ) if rows is None else rows.gather(kept.filter(differ))
    if LOCATION_COLUMN in df.columns:
        locations = df[LOCATION_COLUMN].cast(pl.String)
        lost_at = locations.gather(lost).fill_null(_row_locations(lost, source))
        kept_at = locations.gather(winner).fill_null(_row_locations(winner, source))
    else:
        lost_at, kept_at = _row_locations(lost, source), _row_locations(winner, source)
    reasons = pl.select(
        pl.format(
            "{} appears again at {}; the later record is kept",
            _key_text(a.filter(differ), key),
            kept_at,
        )
    ).to_series()
    rejected = pl.DataFrame({"location": lost_at, "raw": _raw_texts(df, lost), "reason": reasons})
    out.bad = pl.concat([bad, rejected], how="vertical_relaxed")
    return out


def _row_excerpts(df: pl.DataFrame) -> pl.Series:
    rows = df.to_dicts()
    return pl.Series(
        "raw",
        [orjson.dumps(r, default=str).decode()[:MAX_RAW_CHARS] for r in rows],
        dtype=pl.String,
    )


def _empty_bad() -> pl.DataFrame:
    return pl.DataFrame(schema={"location": pl.String, "raw": pl.String, "reason": pl.String})


def _fingerprint(df: pl.DataFrame) -> str:
    """Content fingerprint of a partition: same rows (any order) -> same name."""
    if df.height == 0:
        return "empty"
    h = df.hash_rows(seed=0).to_numpy()
    total = int(h.sum(dtype="uint64"))
    xor = int(np.bitwise_xor.reduce(h))
    return f"{total:016x}{xor:016x}{df.height:x}"


MERGED_FILE = ".merged-fingerprints"
"""Per partition: fingerprints of the batches `compact` merged (one per line)."""

SUPERSEDED_FILE = ".superseded"
"""Per partition: files `compact` merged and will delete, each with when (`name<TAB>epoch s`)."""

_WRITTEN = re.compile(r"^part-(\d{20})-([0-9a-z]+)\.parquet$")
_stamp_lock = threading.Lock()
_last_stamp = 0


def _write_stamp() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def _file_stamp(path: Path) -> int:
    """When a lake file was written (its name says); 0 for files of older finops versions."""
    m = _WRITTEN.match(path.name)
    return int(m.group(1)) if m else 0


def _merged(part_dir: Path) -> set[str]:
    try:
        return set((part_dir / MERGED_FILE).read_text().split())
    except FileNotFoundError:
        return set()


def _superseded(part_dir: Path) -> dict[str, float]:
    """The partition's merged-away files still on disk (name -> when merged away)."""
    try:
        text = (part_dir / SUPERSEDED_FILE).read_text()
    except FileNotFoundError:
        return {}
    out = {}
    for line in text.splitlines():
        name, _, when = line.partition("\t")
        with contextlib.suppress(ValueError):
            out[name] = float(when)
    return out


def _write_superseded(part_dir: Path, entries: Mapping[str, float], *, fsync: bool) -> None:
    if not entries:
        (part_dir / SUPERSEDED_FILE).unlink(missing_ok=True)
        return
    with _atomic_file(part_dir / SUPERSEDED_FILE, "w", fsync=fsync) as fh:
        fh.write("".join(f"{name}\t{when:.3f}\n" for name, when in sorted(entries.items())))


def _live_files(part_dir: Path) -> list[Path]:
    """A partition's Parquet files, less those a compaction merged away.

    The list is read before the folder: a compaction writes its merged file before it
    lists the files it replaces, so no row is ever missing (for an instant a row may
    be counted twice, in a file and the merged file).
    """
    gone = _superseded(part_dir)
    return [f for f in sorted(part_dir.glob("*.parquet")) if f.name not in gone]


def _holds(part_dir: Path, fingerprint: str) -> bool:
    """Whether a batch with this fingerprint was written to the partition before."""
    if (part_dir / f"part-{fingerprint}.parquet").exists():  # named by older versions
        return True
    if any(part_dir.glob(f"part-*-{fingerprint}.parquet")):
        return True
    return fingerprint in _merged(part_dir)


@dataclass
class _Written:
    """What `_write_partitions` did; with `skip_unchanged`, the keys of rows it left out
    (the latest write holds them with the same values) and of rows it wrote over others."""

    files: list[Path] = field(default_factory=list)
    duplicate_files: int = 0
    unchanged: pl.DataFrame | None = None
    replaced: pl.DataFrame | None = None


def _fits(got: pa.DataType, want: pl.DataType) -> bool:
    """Whether a file's column type reads as the schema's without guessing: any integer
    width for an integer, any number for a float, any timestamp for a timestamp."""
    if pa.types.is_dictionary(got):
        got = got.value_type
    if pa.types.is_null(got):  # a column with no values at all
        return True
    if want == pl.String:  # any plain value has a text form
        return not pa.types.is_nested(got)
    if want in (pl.Int32, pl.Int64):
        return pa.types.is_integer(got)
    if want == pl.Float64:
        return pa.types.is_integer(got) or pa.types.is_floating(got) or pa.types.is_decimal(got)
    if want == pl.Boolean:
        return pa.types.is_boolean(got)
    if isinstance(want, pl.Datetime):
        return pa.types.is_timestamp(got)
    return True


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def file_problem(path: Path, schema: TableSchema) -> str | None:
    """Why a lake file cannot be read as `schema`'s table, or None when it can.

    Reads the file's footer only (its schema and row counts). A file that vanished
    (a compaction's sweep) raises FileNotFoundError: gone is not unreadable.
    """
    return _footer(path, schema)[1]


def _footer(path: Path, schema: TableSchema) -> tuple[int, str | None]:
    """(rows, why the file cannot be read as the table or None) from one footer read."""
    try:
        f = pq.ParquetFile(path)
        arrow, rows = f.schema_arrow, f.metadata.num_rows
    except FileNotFoundError:
        raise
    except (pa.ArrowException, OSError, ValueError) as exc:
        return 0, f"not a readable Parquet file ({_first_line(exc)})"
    wrong = [
        f"column {name} is {arrow.field(name).type}, expected {_column_words(want)}"
        for name, want in schema.columns.items()
        if arrow.get_field_index(name) >= 0 and not _fits(arrow.field(name).type, want)
    ]
    if not wrong:
        return rows, None
    # the lake's own writers always write the schema's types: this file came from elsewhere
    return rows, (
        ", ".join(wrong)
        + f" (not written by finops: load such a file with `finops ingest {schema.name} FILE`)"
    )


def _column_words(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "a timestamp column"
    return {
        pl.Int32: "an integer column",
        pl.Int64: "an integer column",
        pl.Float64: "a number column",
        pl.Boolean: "a boolean column",
    }.get(dtype, "a text column")  # type: ignore[call-overload]


def unreadable_files(files: Sequence[Path], schema: TableSchema) -> list[tuple[Path, str]]:
    """(file, why) for each of these files of `schema`'s table that cannot be read as it."""
    out = []
    for f in files:
        with contextlib.suppress(FileNotFoundError):
            why = file_problem(f, schema)
            if why is not None:
                out.append((f, why))
    return out


def _write_order(path: Path) -> str:
    """The clean views' order of writes (`clean.write_order` in 10_dedup.sql)."""
    return ("1" if _WRITTEN.match(path.name) else "0") + path.name


def _split_unchanged(
    part_dir: Path, body: pl.DataFrame, key: list[str], fingerprint: str
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    """(rows to write, keys held with the same values, keys held with other values).

    Held means in the partition's latest written row of that key, the one the clean
    views keep: a row equal to an older version is written again, so it wins again.
    Only key columns are read, and whole rows only of the files holding one of them.
    The usual re-read, a batch written before whose keys no later file holds, is told
    from its file name and the later files' keys alone.
    """
    for attempt in range(3):
        try:
            files = _live_files(part_dir)
            if _latest_for_its_keys(files, fingerprint, body, key):
                return body.clear(), body.select(key), body.clear().select(key)
            return _compare_with_held(files, body, key)
        except FileNotFoundError:  # a compaction deleted a file after the listing
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _latest_for_its_keys(
    files: list[Path], fingerprint: str, body: pl.DataFrame, key: list[str]
) -> bool:
    """Whether this very batch was written to the partition and no later file holds one
    of its keys: then every row of it is the latest of its key, unchanged."""
    mine = [
        f for f in files if _WRITTEN.match(f.name) and f.name.endswith(f"-{fingerprint}.parquet")
    ]
    if not mine:
        return False
    newest = max(_write_order(f) for f in mine)
    later = [f for f in files if _write_order(f) > newest]
    if not later:
        return True
    return (
        pl.scan_parquet(later)
        .select(key)
        .join(body.select(key).lazy(), on=key, how="semi", nulls_equal=True)
        .head(1)
        .collect()
        .is_empty()
    )


def _compare_with_held(
    files: list[Path], body: pl.DataFrame, key: list[str]
) -> tuple[pl.DataFrame, pl.DataFrame, pl.DataFrame]:
    none = body.clear().select(key)
    if not files:
        return body, none, none
    wanted = body.select(key)
    found = (
        pl.scan_parquet(files, include_file_paths="__file")
        .select(*key, "__file")
        .join(wanted.lazy(), on=key, how="semi", nulls_equal=True)
        .collect()
    )
    if not found.height:
        return body, none, none
    old = pl.concat(
        [
            pl.read_parquet(f).with_columns(pl.lit(_write_order(Path(f))).alias("__order"))
            for f in found["__file"].unique().to_list()
        ],
        how="diagonal_relaxed",
    ).join(wanted, on=key, how="semi", nulls_equal=True)
    # an older file may lack a column added since: null there, as the views read it
    old = old.select(
        *(
            pl.col(c).cast(t) if c in old.columns else pl.lit(None, dtype=t).alias(c)
            for c, t in body.schema.items()
        ),
        "__order",
    )
    latest = old.sort("__order").unique(subset=key, keep="last").drop("__order")
    # rows compared through one 64-bit hash of every column, as clean.gpu_samples does
    compared = wanted.with_columns(body.hash_rows(seed=0).alias("__h")).join(
        latest.select(key).with_columns(latest.hash_rows(seed=0).alias("__held")),
        on=key,
        how="left",
        nulls_equal=True,
        maintain_order="left",
    )
    same = (compared["__h"] == compared["__held"]).fill_null(False)
    replaced = compared["__held"].is_not_null() & ~same
    return body.filter(~same), wanted.filter(same), wanted.filter(replaced)


LATEST_WINS = ("requests", "cache_events", "rejects")
"""Tables whose clean views keep the latest written of rows sharing a key (10_dedup.sql)."""

_STAMP = "__written"
_T = TypeVar("_T")


def _read_or_why(path: Path, columns: list[str] | None = None) -> pl.DataFrame | str:
    """The file's rows, or why they cannot be read: a sound footer over damaged pages
    shows only when the pages are read. A vanished file raises FileNotFoundError."""
    try:
        return pl.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise
    except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
        return f"not a readable Parquet file ({_first_line(exc)})"


def _keys_in_several_partitions(
    files: list[Path], key: Sequence[str], unreadable: list[tuple[Path, str]]
) -> pl.DataFrame | None:
    """Keys with rows in more than one date partition of these files (None: no files).

    A file whose keys cannot be read is left out and added to `unreadable`.
    """
    frames = []
    for f in files:
        got = _read_or_why(f, list(key))
        if isinstance(got, str):
            unreadable.append((f, got))
        else:
            frames.append(got.with_columns(_part=pl.lit(f.parent.name)))
    if not frames:
        return None
    keys = pl.concat(frames, how="vertical_relaxed")
    spread = keys.group_by(list(key)).agg(pl.col("_part").n_unique().alias("_n"))
    return spread.filter(pl.col("_n") > 1).select(list(key))


def _has_repeated_keys(df: pl.DataFrame, key: Sequence[str]) -> bool:
    """Whether some key appears twice (a cheap count first: most batches have none)."""
    if df.height < 2:
        return False
    if df.select(key).hash_rows(seed=0).n_unique() == df.height:  # distinct hashes: none
        return False
    keys = df.select(pl.struct(list(key)) if len(key) > 1 else pl.col(key[0]))
    return keys.to_series().n_unique() < df.height


def _date_partitions(df: pl.DataFrame, ts_column: str) -> list[tuple[dt.date, pl.DataFrame]]:
    """Split rows by event date, keeping their order.

    Time-ordered input (the usual case: a scrape, a log, a simulated week) has
    one contiguous run per date, and zero-copy slices of it avoid copying every
    column as `partition_by` would; other input falls back to `partition_by`.
    """
    dates = df[ts_column].dt.date()
    runs = dates.rle()
    if runs.len() == dates.n_unique():
        out, offset = [], 0
        for length, date in zip(
            runs.struct.field("len").to_list(), runs.struct.field("value").to_list(), strict=True
        ):
            out.append((date, df.slice(offset, length)))
            offset += length
        return out
    dated = df.with_columns(dates.alias("__date"))
    return [
        (part["__date"][0], part.drop("__date"))
        for part in dated.partition_by("__date", as_dict=False, maintain_order=True)
    ]


class Lake:
    """A folder of Parquet tables partitioned by event date.

    >>> lake = Lake("data/lake")
    >>> result = lake.append("requests", rows, source="shim")
    >>> result.read == result.loaded + result.rejected
    True
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._swept: dict[str, float] = {}  # table -> time.monotonic() of its last sweep

    def __repr__(self) -> str:
        return f"Lake({str(self.path)!r})"

    def table_path(self, table: str) -> Path:
        schema_for(table)
        return self.path / table

    def files(self, table: str) -> list[Path]:
        """The fully written Parquet files of one table, less those a compaction merged away."""
        root = self.table_path(table)
        if not root.exists():
            return []
        return [f for part_dir in sorted(root.glob("date=*")) for f in _live_files(part_dir)]

    def read_files(self, table: str, read: Callable[[list[Path]], _T], *, tries: int = 3) -> _T:
        """`read(self.files(table))`, listed again if a file vanished meanwhile.

        A compaction in another process deletes the files it merged away once they
        are `SUPERSEDED_GRACE` old, maybe between a listing and the reading; a fresh
        listing holds the merged file instead, so the result stays exact.
        """
        for attempt in range(tries):
            try:
                return read(self.files(table))
            except FileNotFoundError:
                if attempt == tries - 1:
                    raise
        raise AssertionError("unreachable")

    def tables(self) -> list[str]:
        return [t for t in TABLES if self.files(t)]

    def append(
        self,
        table: str,
        data: Any,
        *,
        source: str | None = None,
        now: dt.datetime | None = None,
        skip_unchanged: bool = False,
    ) -> AppendResult:
        """Validate and write rows; rejected rows go to `rejects` with a reason.

        `data` may be a Polars/Arrow frame or an iterable of dicts. Two optional
        input columns help reporting: `_location` (e.g. `file.jsonl:12`) and
        `_raw` (the original text). When `source` is given and the table has a
        `source` column that the rows leave empty, it is filled in.
        `skip_unchanged`: rows whose key the lake's latest write already holds with the
        same values are not written again (`AppendResult.unchanged`). It reads the key
        columns of the rows' date partitions, which a re-read log is worth and a
        collector's fresh samples are not.
        """
        schema = schema_for(table)
        src = source or table
        df = to_frame(data)
        result = AppendResult(table=table, read=df.height)
        if df.height == 0:
            return result
        if source is not None and "source" in schema.columns:
            if "source" in df.columns:
                df = df.with_columns(pl.col("source").cast(pl.String).fill_null(source))
            else:
                df = df.with_columns(pl.lit(source).alias("source"))
        checked, ignored = validate(df, schema, source=src, now=now)
        result.ignored_columns = ignored
        result.loaded = checked.good.height + checked.duplicates
        result.duplicates = checked.duplicates
        result.rejected = checked.bad.height
        if checked.good.height:
            # `validate` left one row per key
            written = self._write_partitions(
                schema, checked.good, keys_unique=True, skip_unchanged=skip_unchanged
            )
            result.files += written.files
            result.duplicate_files += written.duplicate_files
            # an exact copy in the batch (`duplicates`) counts as its kept row does
            copies = checked.duplicate_keys
            for held, attr in ((written.unchanged, "unchanged"), (written.replaced, "replaced")):
                if held is not None and held.height:
                    n = held.height
                    if copies is not None and copies.height:
                        n += copies.join(
                            held, on=list(schema.key), how="semi", nulls_equal=True
                        ).height
                    setattr(result, attr, n)
        if checked.bad.height:
            self.reject(table, checked.bad, source=src, now=now)
        if result.files:
            self._sweep_now_and_then(table)
        return result

    def append_validated(
        self, table: str, rows: pl.DataFrame, *, source: str | None = None
    ) -> AppendResult:
        """Write rows that `validate` returned as good, without validating them again.

        A collector validates each payload as it arrives, so scrape_health counts what
        the lake takes; its flush then writes many payloads at once, and validating
        them all a second time cost as much again. Rows sharing a key across the
        payloads (two reads of one measurement) are written once, the last one kept.
        """
        schema = schema_for(table)
        result = AppendResult(table=table, read=rows.height, loaded=rows.height)
        if rows.height == 0:
            return result
        if source is not None and "source" in schema.columns:
            rows = rows.with_columns(pl.col("source").fill_null(source))
        written = self._write_partitions(schema, rows)
        result.files, result.duplicate_files = written.files, written.duplicate_files
        if result.files:
            self._sweep_now_and_then(table)
        return result

    def _sweep_now_and_then(self, table: str) -> None:
        """`sweep_superseded` at most once per `SWEEP_EVERY` per table; never fails a write."""
        now = time.monotonic()
        if now - self._swept.get(table, -math.inf) < SWEEP_EVERY.total_seconds():
            return
        self._swept[table] = now
        with contextlib.suppress(OSError):
            self.sweep_superseded(table)

    def sweep_superseded(self, table: str, *, grace: dt.timedelta | None = None) -> int:
        """Delete the table's files a compaction merged away once `grace` has passed.

        Until they go, `raw.*` reads their rows beside the merged file's and the clean
        views dedupe twice the rows. A lake being written (collectors, ingest) calls
        this from `append` about once a minute, so it never waits for the next
        `finops lake compact`. Skipped, returning 0, while a compaction holds the table.
        Returns how many files were deleted.
        """
        root = self.table_path(table)
        # a list made before a compaction that then held the lock may miss its new
        # entries: they are younger than any grace, so nothing is lost by that
        parts = sorted(f.parent for f in root.glob(f"date=*/{SUPERSEDED_FILE}"))
        if not parts:
            return 0
        keep_for = SUPERSEDED_GRACE if grace is None else grace
        try:
            with _compact_lock(root, wait=False):
                now = time.time()
                return sum(self._delete_superseded(part, now, keep_for) for part in parts)
        except BlockingIOError:  # a compaction holds the table
            return 0

    def reject(
        self,
        table: str,
        bad: pl.DataFrame | Iterable[Mapping[str, Any]],
        *,
        source: str,
        now: dt.datetime | None = None,
    ) -> int:
        """Record rows that could not be loaded (columns: location, raw, reason).

        Collectors call this directly for input that never became a row at
        all (a malformed exposition line, a JSON line that does not parse).
        """
        frame = (
            bad
            if isinstance(bad, pl.DataFrame)
            else pl.DataFrame(
                list(bad),
                schema_overrides={"location": pl.String, "raw": pl.String, "reason": pl.String},
            )
        )
        if frame.height == 0:
            return 0
        when = now or dt.datetime.now(dt.UTC)
        for col in ("location", "raw", "reason"):
            if col not in frame.columns:
                frame = frame.with_columns(pl.lit(None, dtype=pl.String).alias(col))
        rows = frame.select(
            pl.lit(when).cast(pl.Datetime("us", "UTC")).alias("ts"),
            pl.lit(table).alias("table_name"),
            pl.lit(source).alias("source"),
            pl.col("location").cast(pl.String),
            pl.col("raw").cast(pl.String).str.slice(0, MAX_RAW_CHARS),
            pl.col("reason").cast(pl.String).fill_null("unknown"),
        )
        self._write_partitions(REJECTS, rows)
        return rows.height

    def _write_partitions(
        self,
        schema: TableSchema,
        df: pl.DataFrame,
        *,
        keys_unique: bool = False,
        skip_unchanged: bool = False,
    ) -> _Written:
        df = df.select(list(schema.columns))
        key = list(schema.key)
        if not keys_unique and _has_repeated_keys(df, key):
            # one row per key in a file (the later line wins), so which row the clean
            # views keep never depends on the order a scan meets them in
            df = df.unique(subset=key, keep="last", maintain_order=True)
        root = self.path / schema.name
        todo: list[tuple[Path, str, pl.DataFrame]] = []  # (temporary name, fingerprint, rows)
        out = _Written()
        held: list[tuple[pl.DataFrame, pl.DataFrame]] = []  # (unchanged keys, replaced keys)
        for date, body in _date_partitions(df, schema.ts_column):
            # rejects carry the time of rejection; the same bad row rejected twice
            # must still name the same file, so the fingerprint leaves ts out.
            content = body.drop("ts") if schema is REJECTS else body
            fp = _fingerprint(content)
            part_dir = root / f"date={date.isoformat()}"
            if skip_unchanged:
                # row by row: a batch written before may have been overwritten since
                try:
                    body, unchanged, replaced = _split_unchanged(part_dir, body, key, fp)
                except (pl.exceptions.PolarsError, pa.ArrowException, OSError) as exc:
                    # held rows cannot be compared: refuse, naming the file, not the library
                    bad = unreadable_files(_live_files(part_dir), schema)
                    if bad:
                        raise LakeFileError(bad) from exc
                    raise
                held.append((unchanged, replaced))
                if not body.height:
                    out.duplicate_files += 1
                    continue
                fp = _fingerprint(body)
            elif _holds(part_dir, fp):
                out.duplicate_files += 1
                continue
            todo.append((part_dir / f".part-{fp}.parquet.tmp-{uuid.uuid4().hex[:12]}", fp, body))
        if held:
            out.unchanged = pl.concat([u for u, _ in held])
            out.replaced = pl.concat([r for _, r in held])
        if not todo:
            return out
        written: list[Path] = []
        try:
            if len(todo) > 1:  # Parquet encoding releases the GIL: partitions use every core
                with ThreadPoolExecutor(max_workers=min(len(todo), os.cpu_count() or 1)) as pool:
                    list(pool.map(lambda j: _write_pending(j[2], j[0], fsync=self.fsync), todo))
            else:
                _write_pending(todo[0][2], todo[0][0], fsync=self.fsync)
            # the write time is taken at the rename, not before the encoding: a compaction
            # that ran meanwhile stamped its merged file as its newest input, and a
            # correction stamped earlier than that would lose to the rows it corrects
            with _publish_lock(root, exclusive=False):
                for tmp, fp, _ in todo:
                    dest = tmp.with_name(f"part-{_write_stamp():020d}-{fp}.parquet")
                    os.replace(tmp, dest)
                    written.append(dest)
        except BaseException:
            for tmp, _, _ in todo:
                tmp.unlink(missing_ok=True)
            raise
        if self.fsync:
            for part_dir in {dest.parent for dest in written}:
                _fsync_dir(part_dir)
        out.files = written
        return out

    def compact(
        self,
        table: str | None = None,
        *,
        min_files: int = 2,
        grace: dt.timedelta | None = None,
    ) -> list[CompactResult]:
        """Merge each partition's files into one, keeping one row per key (the latest written).

        Safe while readers are open: the merged file is written and renamed into
        place first, then the fingerprints of the batches it holds are recorded (so
        appending one of them again still adds nothing), then the files it replaces
        are listed as superseded (a hidden `.superseded` per partition) but left in
        place, as a query that started before may still open them. A later
        compaction, or a later write (`sweep_superseded`), deletes them once
        superseded for longer than `grace` (default `SUPERSEDED_GRACE`). Until then `files`, `info` and further compactions skip
        them, and the clean views (deduped by key, the latest written winning) read
        the same with or without them; `raw.*` shows their rows beside the merged
        file's, as it shows any duplicate. Compactions of one table run one at a
        time (a `.compact.lock` in its folder), and each removes the hidden
        temporary files that killed writers left, once older than `STALE_TMP_AGE`.
        """
        keep_for = SUPERSEDED_GRACE if grace is None else grace
        results = []
        for name in [table] if table else list(TABLES):
            schema_for(name)
            root = self.path / name
            if not root.exists():
                results.append(CompactResult(table=name))
                continue
            with _compact_lock(root):
                results.append(self._compact_table(name, min_files, keep_for))
        return results

    def _delete_superseded(self, part_dir: Path, now: float, grace: dt.timedelta) -> int:
        """Delete the partition's files superseded for longer than `grace`; forget them.

        The caller holds the table's compaction lock. Returns how many were deleted.
        """
        entries = _superseded(part_dir)
        if not entries:
            return 0
        left = {}
        deleted = 0
        for name, when in entries.items():
            if now - when >= grace.total_seconds():
                with contextlib.suppress(FileNotFoundError):
                    (part_dir / name).unlink()
                    deleted += 1
            elif (part_dir / name).exists():
                left[name] = when
        if left != entries:
            _write_superseded(part_dir, left, fsync=self.fsync)
        return deleted

    def _compact_table(self, name: str, min_files: int, grace: dt.timedelta) -> CompactResult:
        """`compact` of one table; the caller holds its lock."""
        schema = schema_for(name)
        res = CompactResult(table=name)
        root = self.path / name
        now = time.time()
        for part_dir in sorted(root.glob("date=*")):
            _remove_stale_tmp(part_dir, now)
            res.deleted += self._delete_superseded(part_dir, now, grace)
        # writers stamp and rename under the shared side: a file written meanwhile is
        # either listed here or stamped later than every listed file
        with _publish_lock(root, exclusive=True):
            listing = {part_dir: _live_files(part_dir) for part_dir in sorted(root.glob("date=*"))}
        # a file that cannot be read stays as it is: merging would drop its rows for good
        res.unreadable = unreadable_files([f for fs in listing.values() for f in fs], schema)
        footer_bad = {f for f, _ in res.unreadable}
        # a key with copies in several dates: its rows keep their own write time, or
        # a merge would promote an old copy past a newer one in another partition
        spread = (
            _keys_in_several_partitions(
                [f for fs in listing.values() for f in fs if f not in footer_bad],
                schema.key,
                res.unreadable,
            )
            if name in LATEST_WINS
            else None
        )
        bad = {f for f, _ in res.unreadable}
        res.files_after += len(bad)
        res.files_before += len(bad)
        listing = {d: [f for f in fs if f not in bad] for d, fs in listing.items()}
        for part_dir, files in listing.items():
            res.files_before += len(files)
            frames: list[pl.DataFrame] = []
            if len(files) >= min_files:
                # newest file first: `unique(keep="first")` then keeps the latest write
                files.sort(key=lambda f: (_file_stamp(f), f.name), reverse=True)
                for f in list(files):
                    frame = _read_or_why(f)
                    if isinstance(frame, str):
                        res.unreadable.append((f, frame))
                        res.files_after += 1
                        files.remove(f)
                    else:
                        frames.append(frame.with_columns(pl.lit(_file_stamp(f)).alias(_STAMP)))
            if len(files) < min_files:
                res.files_after += len(files)
                res.rows_before += sum(pq.ParquetFile(f).metadata.num_rows for f in files)
                res.rows_after += sum(pq.ParquetFile(f).metadata.num_rows for f in files)
                continue
            merged = pl.concat(frames, how="diagonal_relaxed").select(*schema.columns, _STAMP)
            res.rows_before += merged.height
            merged = merged.unique(subset=list(schema.key), keep="first", maintain_order=True)
            newest = _file_stamp(files[0])
            groups = {newest: merged}
            if spread is not None and spread.height:
                pinned = merged.filter(pl.col(_STAMP) < newest).join(
                    spread, on=list(schema.key), how="semi", nulls_equal=True
                )
                if pinned.height:
                    groups[newest] = merged.join(
                        pinned.select(schema.key), on=list(schema.key), how="anti",
                        nulls_equal=True,
                    )  # fmt: skip
                    for (stamp,), rows in pinned.group_by(_STAMP):
                        groups[int(stamp)] = rows
            held = _merged(part_dir)
            for f in files:
                m = _WRITTEN.match(f.name)
                if m:
                    held.add(m.group(2))
                elif f.name.startswith("part-"):
                    held.add(f.name.removeprefix("part-").removesuffix(".parquet"))
            kept: set[Path] = set()
            for stamp, rows in sorted(groups.items()):
                if not rows.height:
                    continue
                rows = rows.drop(_STAMP).sort(list(schema.key), nulls_last=True)
                fp = _fingerprint(rows.drop("ts") if schema is REJECTS else rows)
                dest = part_dir / f"part-{stamp:020d}-{fp}.parquet"
                if not dest.exists():
                    write_parquet_atomic(rows, dest, fsync=self.fsync)
                held.add(fp)
                kept.add(dest)
                res.files_after += 1
                res.rows_after += rows.height
            with _atomic_file(part_dir / MERGED_FILE, "w", fsync=self.fsync) as fh:
                fh.write("".join(f"{x}\n" for x in sorted(held)))
            if kept != set(files):  # already compact: nothing changed
                res.partitions += 1
                gone = _superseded(part_dir)
                gone.update({f.name: time.time() for f in files if f not in kept})
                for dest in kept:  # a merged file named as one merged away before: keep it
                    gone.pop(dest.name, None)
                _write_superseded(part_dir, gone, fsync=self.fsync)
        return res

    def info(self) -> pl.DataFrame:
        """Tables, rows, files, bytes and the date range they cover.

        `unreadable` counts files that cannot be read as the table (`unreadable()` names
        them); `rows` counts the readable files' rows only.
        """

        def summary(files: list[Path], schema: TableSchema) -> dict[str, Any]:
            rows = bad = 0
            for f in files:  # one footer read per file: its rows, and whether it is readable
                n, why = _footer(f, schema)
                if why is None:
                    rows += n
                else:
                    bad += 1
            dates = sorted({f.parent.name.removeprefix("date=") for f in files})
            return {
                "rows": rows,
                "files": len(files),
                "bytes": sum(f.stat().st_size for f in files),
                "first_date": dates[0] if dates else None,
                "last_date": dates[-1] if dates else None,
                "unreadable": bad,
            }

        return pl.DataFrame(
            [
                {"table": name, **self.read_files(name, lambda fs, s=schema: summary(fs, s))}
                for name, schema in TABLES.items()
            ]
        )

    def unreadable(self, table: str | None = None) -> list[tuple[Path, str]]:
        """The lake's files that cannot be read as their table, each with the reason.

        Checks each file's footer (its schema), not every page: a file whose pages
        alone are damaged shows when a query or `compact` reads it.
        """
        return [
            bad
            for name in ([table] if table else list(TABLES))
            for bad in self.read_files(name, lambda fs, s=schema_for(name): unreadable_files(fs, s))
        ]
