"""Request logs into the lake: the shim's JSONL log, OpenAI usage records, any mapped file.

Three input kinds share one path:
- the routing shim's request log: JSONL whose fields are the `requests`
  table's own column names (`ts` ISO-8601 UTC); its response-cache hits are
  written to `cache_events` in the same pass;
- OpenAI-style response/usage records (a `chat.completion` object, or a log
  record with `id`, `created`, `model`, `usage`, optional `metadata`),
  read through the shipped `openai-usage` mapping;
- any CSV/JSONL/Parquet with a mapping file (`collectors.mapping`), e.g. the
  public Azure and Mooncake traces (`azure-llm-2023`, `mooncake-fast25`).

Speed comes from parsing whole chunks with Polars' NDJSON/CSV readers; only
when a chunk holds a bad line does a per-line pass run, to find and reject
exactly those lines (`file:line` + reason) while every valid line still loads.
Counts always reconcile: records read = loaded + rejected.

`LogSource` follows growing and rotated files with durable checkpoints
(`collectors.checkpoint`): the lake batch is written first, then the
checkpoint, so a crash never loses a line, and deterministic request ids plus
content-fingerprinted Parquet files mean it never duplicates one either.
"""

from __future__ import annotations

import bz2
import codecs
import contextlib
import csv
import datetime as dt
import glob as globlib
import gzip
import io
import lzma
import os
import re
import time
import warnings
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import polars as pl

from collectors.cache_events import AvoidedTokens, shim_cache_events
from collectors.checkpoint import FINGERPRINT_BYTES, Checkpoint, FileState, head_fingerprint
from collectors.mapping import (
    LINE_COLUMN,
    AmbiguousTimeWarning,
    FoldTracker,
    Mapping,
    MappingError,
    apply_mapping,
    check_columns,
    load_mapping,
    shipped_mappings,
    stable_hash,
    substitute,
)
from finops.lake import LOCATION_COLUMN, RAW_COLUMN, AppendResult, Lake, validate
from finops.schemas import schema_for

CHUNK_BYTES = 32 * 1024 * 1024
PEEK_BYTES = 64 * 1024
"""How much of a block's end is read first to find its last newline (see `_iter_blocks`)."""
_SCAN_BYTES = 1 << 20  # newlines are searched in pieces this big (see `_newline_positions`)
PARSE_WORKERS = 2
"""Blocks parsed at once while earlier ones are prepared and written (each holds a block)."""
MAX_LINE_BYTES = 1024 * 1024
"""Longer lines are rejected (a request-log record is a few hundred bytes;
a multi-megabyte line is a bug upstream, and loading it would hurt every query)."""

MAX_RAW = 500
UTF8_BOM = b"\xef\xbb\xbf"
"""What Windows tools (PowerShell 5's `-Encoding utf8`) put before a file's first line."""
ProgressFn = Callable[[int, int], None]


class LogError(OSError):
    """A file that cannot be read at all (missing, unreadable, unknown format).

    Raised part way through a file (a truncated archive), `report` says what
    was loaded before.
    """

    report: FileReport | None = None


class LogFormatError(LogError, MappingError):
    """No mapping was given and the file's format cannot be told (or needs one).

    A `LogError`, so that one such file among many is that file's error (the
    others still load); a `MappingError` too, as it was before it was per file.
    """


@dataclass
class FileReport:
    """What ingesting one file did. `read == loaded + rejected` (records, not lines)."""

    path: str
    format: str = ""
    mapping: str = ""
    read: int = 0
    loaded: int = 0
    rejected: int = 0
    cache_events: int = 0
    # of `cache_events`, those the lake held already (a file read again): the rest are new
    cache_events_in_lake: int = 0
    duplicate_files: int = 0
    error: str | None = None
    files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # loaded, but a person should check
    table: str = "requests"
    location: str = ""  # the file as rejects name it (`_location_label`): one spelling
    # of the rows loaded, how many keys the lake held already, unchanged (not written
    # again) or with other values (written: the later one wins); counted when
    # `count_existing`: a one-shot ingest; a follower reads each line once
    already_in_lake: int = 0
    count_existing: bool = False
    # fields of the file the table has no column for: dropped, which a person should know
    ignored_columns: list[str] = field(default_factory=list)
    _told_ignored: int = field(default=0, repr=False)

    def add(self, read: int, loaded: int, rejected: int) -> None:
        self.read += read
        self.loaded += loaded
        self.rejected += rejected

    @property
    def new(self) -> int:
        """Rows loaded that the lake did not hold before (loaded = new + already_in_lake)."""
        return self.loaded - self.already_in_lake

    def ignore(self, columns: list[str]) -> None:
        self.ignored_columns += [c for c in columns if c not in self.ignored_columns]

    def ignored_message(self) -> str | None:
        """What the summary says of the file's dropped fields (None: nothing dropped)."""
        if not self.ignored_columns:
            return None
        return (
            f"{self.path}: ignored columns not in the {self.table} schema: "
            f"{', '.join(self.ignored_columns)} — use --mapping (see collectors/mappings/, "
            "`finops ingest mappings`)"
        )

    def untold(self) -> list[str]:
        """`ignored_message` once per new set of ignored columns (a follower's errors)."""
        if len(self.ignored_columns) <= self._told_ignored:
            return []
        self._told_ignored = len(self.ignored_columns)
        return [self.ignored_message() or ""]


# --------------------------------------------------------------------------- formats


def _format_of(path: Path, mapping: Mapping | None) -> str:
    by_name = _format_by_name(path)
    if mapping is not None and mapping.format:
        if by_name not in (None, mapping.format):
            raise MappingError(
                f"{mapping.origin}: maps {mapping.format.upper()} files, but {path} is "
                f"{by_name.upper()} by its name"
            )
        return mapping.format
    return by_name or "jsonl"


_FORMAT_BY_EXTENSION = {
    "parquet": "parquet",
    "pq": "parquet",
    "csv": "csv",
    "tsv": "csv",
    "jsonl": "jsonl",
    "ndjson": "jsonl",
    "json": "jsonl",
}


def _format_by_name(path: Path) -> str | None:
    """The format of the name's rightmost known extension: `x.csv.1.gz` (rotated and
    compressed) is CSV, `gw.csv.jsonl` is JSONL (the first known one anywhere in the
    name took it for CSV and read no rows)."""
    for part in reversed(path.name.lower().split(".")[1:]):
        if part in _FORMAT_BY_EXTENSION:
            return _FORMAT_BY_EXTENSION[part]
    return None


@dataclass
class _Plan:
    """How to read one file: its format and either the native schema or a mapping."""

    format: str
    table: str
    mapping: Mapping | None  # None: the file already uses the table's column names
    source: str
    shim: bool = False  # shim request log: also derive cache events
    # native plans: fields of the first records the table has no column for (dropped)
    ignored: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        if self.mapping is not None:
            return self.mapping.name
        return "shim" if self.shim else f"{self.table} (native)"


def _first_records(path: Path, limit: int = 20) -> list[dict[str, Any]]:
    """The first few JSON objects of a file (bad lines skipped), for detection."""
    out = []
    with _open_log(path) as log:  # a compressed file: its decompressed lines
        fh = log.fh
        for n in range(limit * 5):
            line = fh.readline(MAX_LINE_BYTES + 1)
            if n == 0:
                line = line.removeprefix(UTF8_BOM)
            if not line:
                break
            if not line.strip() or len(line) > MAX_LINE_BYTES:
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append(obj)
                if len(out) >= limit:
                    break
    return out


TOKEN_COLUMNS = ("input_tokens", "output_tokens", "cached_input_tokens")
_FOREIGN_TOKENS = re.compile(
    r"^(usage|(prompt|completion|input|output|total|context|generated|cached)_?tokens?)$",
    re.IGNORECASE,
)
_HINTS = {  # a gateway's field -> the requests column it most likely is (for the error's hint)
    "prompt_tokens": "input_tokens",
    "completion_tokens": "output_tokens",
    "usage.prompt_tokens": "input_tokens",
    "usage.completion_tokens": "output_tokens",
    "usage.prompt_tokens_details.cached_tokens": "cached_input_tokens",
    "model": "response_model",
    "user": "tenant",
}


def _foreign_usage(keys: list[str]) -> list[str]:
    """Fields that hold token counts under another name (`prompt_tokens`, `usage`, ...)."""
    return [k for k in keys if _FOREIGN_TOKENS.match(k)]


def _record_paths(records: list[dict[str, Any]]) -> list[str]:
    """Every field of the records, nested ones also as dotted paths (`usage.prompt_tokens`)."""
    out: dict[str, None] = {}

    def walk(obj: dict[str, Any], prefix: str) -> None:
        for k, v in obj.items():
            out[prefix + k] = None
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")

    for r in records:
        walk(r, "")
    return list(out)


def _foreign_plan(
    path: Path, table: str, records: list[dict[str, Any]], ignored: list[str]
) -> _Plan:
    """A log with the table's id and time but foreign token fields: a shipped mapping that
    reads it, else a `MappingError` naming its fields and the mapping it needs."""
    available = _record_paths(records)
    for origin in shipped_mappings().values():
        m = load_mapping(origin)
        if m.table != table or m.format not in (None, "jsonl"):
            continue
        try:
            check_columns(m, available, str(path))
        except MappingError:
            continue
        return _Plan("jsonl", table, m, substitute(m.source or "ingest:{file}", path.name))
    hint = [
        f'{col} = "{field_}"'
        for field_, col in _HINTS.items()
        if field_ in available and col not in available
    ]
    raise MappingError(
        f"{path}: has request_id and ts but none of the token columns "
        f"({', '.join(TOKEN_COLUMNS)}); its fields {', '.join(ignored)} are not {table} "
        "columns, so every row would load with null tokens. Pass --mapping FILE: a TOML "
        'mapping whose [columns] say request_id = "request_id", ts = "ts"'
        + (f", {', '.join(hint)}" if hint else "")
        + " (README: 'Any CSV/JSONL/Parquet loads with a TOML column mapping'; shipped: "
        f"{', '.join(shipped_mappings())})"
    )


def plan_for(
    path: Path,
    table: str,
    mapping: Mapping | None,
    *,
    base_ts: dt.datetime | None = None,
) -> _Plan:
    """Pick the reader: an explicit mapping, else detect shim/OpenAI/native JSONL."""
    if mapping is not None:
        if mapping.table != table:
            raise MappingError(
                f"{mapping.origin}: maps to the {mapping.table} table, but this command "
                f"ingests {table}"
            )
        if base_ts is not None:
            mapping = mapping.with_base_time(base_ts)
        fmt = _format_of(path, mapping)
        source = mapping.source or "ingest:{file}"
        return _Plan(fmt, table, mapping, substitute(source, path.name))
    if base_ts is not None:
        raise MappingError("--base-ts needs a mapping whose timestamps are relative (relative_to)")
    fmt = _format_of(path, None)
    if fmt != "jsonl":
        raise MappingError(
            f"{path}: a {fmt.upper()} file needs --mapping (shipped mappings: "
            f"{', '.join(shipped_mappings())}; or write a TOML mapping of your columns, as "
            f"{next(iter(shipped_mappings().values()), 'the shipped ones')} does: README, "
            "'Any CSV/JSONL/Parquet loads with a TOML column mapping')"
        )
    records = _first_records(path)
    if not records:
        # nothing parseable yet (empty, or only bad lines): read it natively so bad
        # lines are rejected with their reasons; a growing file is re-detected later.
        shim = table == "requests"
        return _Plan("jsonl", table, None, "shim" if shim else f"ingest:{path.name}", shim)
    keys = set().union(*(r.keys() for r in records))
    cols = set(schema_for(table).columns)
    # fields the table has no column for, in the order the records show them
    ignored = list(dict.fromkeys(k for r in records for k in r if k not in cols))
    if table == "requests" and {"request_id", "ts"} <= keys:
        if not keys & set(TOKEN_COLUMNS) and _foreign_usage(ignored):
            # a gateway's log with the shim's id and time but its own token fields:
            # read natively, every token count would load as null
            return _foreign_plan(path, table, records, ignored)
        return _Plan("jsonl", table, None, "shim", shim=True, ignored=ignored)
    if table == "cache_events" and {"request_id", "ts", "cache_status"} <= keys:
        raise MappingError(
            f"{path}: this is a shim request log; ingest it with `finops ingest requests`, "
            "which writes its response-cache hits to cache_events in the same pass"
        )
    if table == "cache_events" and {"ts", "event"} <= keys:
        return _Plan("jsonl", table, None, f"ingest:{path.name}", ignored=ignored)
    if table == "requests" and (
        "usage" in keys or str(records[0].get("object", "")).endswith("completion")
    ):
        m = load_mapping("openai-usage")
        return _Plan("jsonl", table, m, substitute(m.source or "ingest:{file}", path.name))
    raise MappingError(
        f"{path}: cannot tell the log format: the first records have keys "
        f"{sorted(keys)[:12]}, not the {table} columns ({', '.join(sorted(cols)[:8])}, ...) "
        f"nor OpenAI usage; pass --mapping FILE or a shipped name "
        f"({', '.join(shipped_mappings())})"
    )


# --------------------------------------------------------------------------- chunk parsing


@dataclass
class _Chunk:
    src: pl.DataFrame  # parsed records + __line, _location, _raw
    rejects: list[dict[str, str]]  # lines that never became records
    records: int  # non-blank lines (or CSV rows) seen
    columns: list[str] = field(default_factory=list)  # what the file has, for error messages
    raw: Callable[[], pl.Series] | None = None  # original text per row, built on demand
    suspicious: bool = False  # the typed fast parse failed: some values are off

    def with_raw(self) -> pl.DataFrame:
        """`src` plus `_raw` (the original text), for chunks whose rejects need it."""
        if RAW_COLUMN in self.src.columns:
            return self.src
        raw = self.raw() if self.raw is not None else None
        if raw is None or raw.len() != self.src.height:
            raw = pl.Series(RAW_COLUMN, [None] * self.src.height, dtype=pl.String)
        return self.src.with_columns(raw.alias(RAW_COLUMN))


def _split_lines(data: bytes) -> pl.Series:
    """The chunk's lines as strings, one per physical line (blank lines kept as null/'')."""
    expected = data.count(b"\n") + (0 if data.endswith(b"\n") or not data else 1)
    try:
        s = pl.read_csv(
            data,
            has_header=False,
            separator="\x1f",
            quote_char=None,
            schema={"line": pl.String},
            encoding="utf8-lossy",
            raise_if_empty=False,
        ).to_series()
        if s.len() == expected:
            return s.str.strip_chars_end("\r")
    except pl.exceptions.PolarsError:
        pass
    parts = data.decode("utf-8", "replace").split("\n")
    if data.endswith(b"\n"):
        parts.pop()
    return pl.Series("line", parts, dtype=pl.String).str.strip_chars_end("\r")


def _native_read_schema(table: str) -> dict[str, pl.DataType]:
    """Typed JSON schema for native logs.

    Timestamps are read as text and parsed after with one explicit format
    (several times faster than the reader's own datetime inference). Any value
    that does not fit (a string token count) fails the typed read, and the
    chunk is re-read as text so the lake converts or rejects each value with
    its own message.
    """
    return {
        c: (pl.String if isinstance(t, pl.Datetime) else t)
        for c, t in schema_for(table).columns.items()
    }


def _parse_ndjson(text: bytes, schema: dict[str, pl.DataType] | None) -> tuple[pl.DataFrame, bool]:
    """Parse NDJSON fast; typed first, then all-text (so Lake reports bad values).

    Returns the frame and whether the typed read succeeded.
    """
    if schema is None:
        return pl.read_ndjson(text, infer_schema_length=None), True
    try:
        return pl.read_ndjson(text, schema=schema), True
    except pl.exceptions.PolarsError:
        return pl.read_ndjson(text, schema=dict.fromkeys(schema, pl.String)), False


def _value_series(name: str, values: list[Any]) -> pl.Series:
    try:
        return pl.Series(name, values, strict=False)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        return pl.Series(
            name,
            [
                None
                if v is None
                else v
                if isinstance(v, str)
                else orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
                for v in values
            ],
            dtype=pl.String,
        )


def _get_path(obj: Any, path: str, missing: Any = None) -> Any:
    """The value at a dotted path (a flat key of that name first). `missing` when a field
    on the way is absent or no object/list (`"usage": "none"` for `usage.prompt_tokens`);
    an explicit null at the end is None."""
    if isinstance(obj, dict) and path in obj:
        return obj[path]
    cur = obj
    for part in path.split("."):
        if cur is None:
            return missing
        if isinstance(cur, dict):
            if part not in cur:
                return missing
            cur = cur[part]
        elif isinstance(cur, list) and part.isdigit():
            idx = int(part)
            cur = cur[idx] if idx < len(cur) else None
        else:
            return missing
    return cur


def _path_expr(schema: pl.Schema, path: str) -> pl.Expr | None:
    """A Polars expression reading a dotted path from (nested) columns, or None."""
    if path in schema:
        return pl.col(path)
    parts = path.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        if head not in schema:
            continue
        expr: pl.Expr = pl.col(head)
        dtype: Any = schema[head]
        for part in parts[cut:]:
            if isinstance(dtype, pl.Struct):
                fields = {f.name: f.dtype for f in dtype.fields}
                if part not in fields:
                    return None
                expr, dtype = expr.struct.field(part), fields[part]
            elif isinstance(dtype, pl.List) and part.isdigit():
                expr = expr.list.get(int(part), null_on_oob=True)
                dtype = dtype.inner
            else:
                return None
        return expr
    return None


def _leaf_paths(schema: pl.Schema, prefix: str = "", limit: int = 60) -> list[str]:
    """Column names with nested struct fields spelled as dotted paths (for messages)."""
    out: list[str] = []
    for name, dtype in schema.items():
        full = f"{prefix}{name}"
        if isinstance(dtype, pl.Struct) and len(out) < limit:
            out += _leaf_paths(pl.Schema({f.name: f.dtype for f in dtype.fields}), f"{full}.")
        else:
            out.append(full)
    return out[:limit]


def _select_paths(df: pl.DataFrame, paths: list[str]) -> pl.DataFrame:
    exprs = []
    for p in paths:
        e = _path_expr(df.schema, p)
        if e is not None:
            exprs.append(e.alias(p))
    return df.select(exprs) if exprs else pl.DataFrame({"__n": [None] * df.height}).drop("__n")


def _with_meta(df: pl.DataFrame, line_no: np.ndarray, label: str) -> pl.DataFrame:
    lines = pl.Series(LINE_COLUMN, line_no, dtype=pl.Int64)
    return df.with_columns(lines, pl.format("{}:{}", pl.lit(label), lines).alias(LOCATION_COLUMN))


def _newline_positions(data: bytes) -> np.ndarray:
    """Offsets of every b"\\n" in `data`, searched 1 MiB at a time.

    One comparison over a whole 32 MB chunk allocates (and page-faults) a
    chunk-sized mask; pieces that stay in cache take half the time.
    """
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) <= _SCAN_BYTES:
        return np.flatnonzero(buf == 10)
    return np.concatenate(
        [
            np.flatnonzero(buf[i : i + _SCAN_BYTES] == 10) + i
            for i in range(0, len(buf), _SCAN_BYTES)
        ]
    )


def _count_newlines(data: bytes) -> int:
    """`data.count(b"\\n")`, about three times faster on large blocks (NumPy, in pieces)."""
    if len(data) <= _SCAN_BYTES:
        return data.count(b"\n")
    buf = np.frombuffer(data, dtype=np.uint8)
    return sum(
        int(np.count_nonzero(buf[i : i + _SCAN_BYTES] == 10))
        for i in range(0, len(buf), _SCAN_BYTES)
    )


class _Lines:
    """Line boundaries of a chunk, found with NumPy; text is materialized only on demand.

    Splitting a 32 MB chunk into Python strings costs more than parsing it, and
    the text of a line is only needed when that line is rejected.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        nl = _newline_positions(data)
        ends = nl if data.endswith(b"\n") or not data else np.append(nl, len(data))
        starts = np.zeros(len(ends), dtype=np.int64)
        if len(ends) > 1:
            starts[1:] = ends[:-1] + 1
        if b"\r" in data:  # a CRLF line ends before its \r
            buf = np.frombuffer(data, dtype=np.uint8)
            cr = (ends > starts) & (buf[np.maximum(ends - 1, 0)] == 13)
            ends = ends - cr.astype(np.int64)
        self.starts = starts
        self.ends = ends
        self.lengths = ends - starts

    def __len__(self) -> int:
        return len(self.starts)

    def text(self, i: int, limit: int | None = None) -> str:
        end = self.ends[i] if limit is None else min(self.ends[i], self.starts[i] + limit)
        return self.data[self.starts[i] : end].decode("utf-8", "replace")

    def texts(self, idx: np.ndarray, limit: int | None = None) -> list[str]:
        return [self.text(int(i), limit) for i in idx]

    def series(self, idx: np.ndarray, limit: int = MAX_RAW) -> pl.Series:
        return pl.Series(RAW_COLUMN, self.texts(idx, limit * 4), dtype=pl.String).str.slice(
            0, limit
        )


def parse_jsonl_chunk(
    data: bytes,
    *,
    first_line: int,
    label: str,
    schema: dict[str, pl.DataType] | None = None,
    paths: list[str] | None = None,
    max_line_bytes: int = MAX_LINE_BYTES,
) -> _Chunk:
    """Parse complete JSONL lines; bad lines become rejects with `label:line` and a reason.

    `schema` reads native logs (typed columns); `paths` reads mapped logs (any
    nesting, then the dotted paths are pulled out). The fast path parses the
    whole chunk at once; a failure switches to a per-line pass over this chunk.
    """
    lines = _Lines(data)
    n = len(lines)
    line_no = np.arange(first_line + 1, first_line + 1 + n, dtype=np.int64)
    blank = lines.lengths == 0
    if blank.any() or n < 1000:  # whitespace-only lines count as blank too
        for i in np.flatnonzero(~blank & (lines.lengths < 64)):
            if not lines.text(int(i)).strip():
                blank[i] = True
    too_long = lines.lengths > max_line_bytes
    keep = ~blank
    records = int(keep.sum())
    rejects: list[dict[str, str]] = []
    for i in np.flatnonzero(too_long):
        rejects.append(
            {
                "location": f"{label}:{line_no[i]}",
                "raw": lines.text(int(i), MAX_RAW),
                "reason": f"line is {int(lines.lengths[i]):,} bytes, over the "
                f"{max_line_bytes:,}-byte limit for one record",
            }
        )
    keep &= ~too_long
    kept_idx = np.flatnonzero(keep)
    df: pl.DataFrame | None = None
    typed = True
    if records and not too_long.any():
        try:
            df, typed = _parse_ndjson(data, schema)
            if df.height != len(kept_idx) or (paths is not None and _mixed_paths(df, paths)):
                df = None  # the per-line pass finds the records whose types differ
        except pl.exceptions.PolarsError:
            df = None
    if df is None and len(kept_idx):
        # whitespace-only lines are blank, not bad JSON (the fast check looked at few lines)
        for i in kept_idx[lines.lengths[kept_idx] < 256]:
            if not lines.text(int(i)).strip():
                blank[i], keep[i] = True, False
        records = int((~blank).sum())
        kept_idx = np.flatnonzero(keep)
        df, kept_idx, bad = _parse_slow(lines, kept_idx, line_no, label, schema, paths)
        rejects += bad
        typed = False
    if df is None:
        df = pl.DataFrame(schema=schema or {})
    columns = _leaf_paths(df.schema)
    if paths is not None:
        df = _select_paths(df, paths)
    src = _with_meta(df, line_no[kept_idx], label)
    final_idx = kept_idx
    return _Chunk(
        src, rejects, records, columns, lambda: lines.series(final_idx), suspicious=not typed
    )


def _parse_slow(
    lines: _Lines,
    kept_idx: np.ndarray,
    line_no: np.ndarray,
    label: str,
    schema: dict[str, pl.DataType] | None,
    paths: list[str] | None,
) -> tuple[pl.DataFrame | None, np.ndarray, list[dict[str, str]]]:
    """Per-line pass: find the lines that are not JSON objects, parse the rest."""
    good_idx: list[int] = []
    objs: list[dict[str, Any]] = []
    bad: list[dict[str, str]] = []
    texts = lines.texts(kept_idx)
    good_texts: list[str] = []
    for i, text in zip(kept_idx.tolist(), texts, strict=True):
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            reason = f"invalid JSON: {exc}"
            if text.rstrip().endswith(("}", "]")) is False:
                reason += " (truncated line?)"
            bad.append(
                {"location": f"{label}:{line_no[i]}", "raw": text[:MAX_RAW], "reason": reason}
            )
            continue
        if not isinstance(obj, dict):
            bad.append(
                {
                    "location": f"{label}:{line_no[i]}",
                    "raw": text[:MAX_RAW],
                    "reason": f"expected a JSON object, got {type(obj).__name__}",
                }
            )
            continue
        good_idx.append(i)
        good_texts.append(text)
        objs.append(obj)
    good = np.asarray(good_idx, dtype=np.int64)
    if not objs:
        return None, good, bad
    joined = "\n".join(good_texts).encode()
    try:
        df, _ = _parse_ndjson(joined, schema)
        if df.height == len(objs) and (paths is None or not _mixed_paths(df, paths)):
            return df, good, bad
    except pl.exceptions.PolarsError:
        pass
    if paths is not None:
        # mapped records: each path read per record, so a record whose field has
        # another type than in the rest (`"usage": "none"`) reads as absent there
        # and the others keep their values
        return _records_frame(objs, paths), good, bad
    names = list(schema or {})
    df = pl.DataFrame([_value_series(c, [_get_path(o, c) for o in objs]) for c in names])
    return df, good, bad


_MISSING = object()


def _records_frame(objs: list[dict[str, Any]], paths: list[str]) -> pl.DataFrame:
    """The paths' values per record, read record by record: a field on a path that is
    no object (`"usage": "none"` for `usage.prompt_tokens`) reads as absent in that
    record only, so the others keep their values and the mapping's alternatives,
    `optional` and `required` decide about it, as for a missing field; a path holding
    objects in some records and plain values in others is JSON text in all of them, as
    the whole-chunk reader makes it (the lake then rejects an object where a number
    belongs, naming the field). One row per record: every record is kept."""
    values: dict[str, list[Any]] = {}
    present: set[str] = set()
    for p in paths:
        col: list[Any] = []
        for o in objs:
            v = _get_path(o, p, _MISSING)
            if v is not _MISSING:
                present.add(p)
            col.append(None if v is _MISSING else v)
        kinds = {isinstance(v, dict | list) for v in col if v is not None}
        if len(kinds) == 2:
            col = [
                None
                if v is None
                else v
                if isinstance(v, str)
                else orjson.dumps(v, option=orjson.OPT_SORT_KEYS).decode()
                for v in col
            ]
        values[p] = col
    frame = pl.DataFrame([_value_series(p, values[p]) for p in paths if p in present])
    if not frame.width:
        frame = pl.DataFrame({"__n": [None] * len(objs)}).drop("__n")
    return frame


def _mixed_paths(df: pl.DataFrame, paths: list[str]) -> bool:
    """Whether a dotted path runs into a plain column: the reader made a field text
    because its type differs between records (an object in most, `"none"` in one)."""
    schema = df.schema
    for path in paths:
        if path in schema or "." not in path:
            continue
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head = ".".join(parts[:cut])
            if head not in schema:
                continue
            dtype: Any = schema[head]
            expr = pl.col(head)
            for part in parts[cut:]:
                if isinstance(dtype, pl.Struct):
                    fields = {f.name: f.dtype for f in dtype.fields}
                    if part not in fields:
                        break  # absent in every record: not a conflict
                    dtype = fields[part]
                    expr = expr.struct.field(part)
                elif isinstance(dtype, pl.List) and part.isdigit():
                    dtype = dtype.inner
                    expr = expr.list.get(int(part), null_on_oob=True)
                elif dtype == pl.String:
                    # what the reader makes of an object in some records and text in
                    # others: the objects as JSON text. Text in every record (a legacy
                    # `"metadata": "..."`) is no conflict: the path is absent in all
                    text = df.select(expr.str.strip_chars_start()).to_series()
                    if (text.str.starts_with("{") | text.str.starts_with("[")).any():
                        return True
                    break
                else:
                    break
            break
    return False


def parse_csv_chunk(
    data: bytes, *, header: str, first_line: int, label: str, separator: str = ","
) -> _Chunk:
    """Parse CSV rows (all as text; the mapping and the lake convert types)."""
    names = next(csv.reader([header], delimiter=separator))
    ncols = len(names)
    rejects: list[dict[str, str]] = []
    if b'"' not in data:
        lines = _split_lines(data)
        n = lines.len()
        line_no = np.arange(first_line + 1, first_line + 1 + n, dtype=np.int64)
        blank = (lines.is_null() | (lines.str.strip_chars() == "")).to_numpy()
        fields = (lines.str.count_matches(separator, literal=True) + 1).fill_null(0).to_numpy()
        ragged = ~blank & (fields != ncols)
        for i in np.flatnonzero(ragged):
            rejects.append(
                {
                    "location": f"{label}:{line_no[i]}",
                    "raw": (lines[int(i)] or "")[:MAX_RAW],
                    "reason": f"expected {ncols} fields ({header.strip()}), got {fields[i]}",
                }
            )
        keep = np.flatnonzero(~blank & ~ragged)
        records = int((~blank).sum())
        kept = lines.gather(keep) if len(keep) else pl.Series("line", [], pl.String)
        if len(keep):
            body = "\n".join(kept.to_list()).encode()
            df = pl.read_csv(
                io.BytesIO(body),
                has_header=False,
                new_columns=names,
                separator=separator,
                infer_schema=False,
                quote_char=None,
            )
        else:
            df = pl.DataFrame(schema=dict.fromkeys(names, pl.String))
        return _Chunk(_with_meta(df, line_no[keep], label), rejects, records, names, lambda: kept)
    # quoted fields (maybe spanning lines): the csv module tracks physical lines. Strict
    # quoting: a quote that never closes, or text after a closing quote, is an error
    # (lenient reading would swallow the lines after it into one field, or merge two rows
    # silently); the malformed record's first line is rejected and reading goes on from
    # the line after it, so the rows a stray quote swallowed load as rows of their own
    text = data.decode("utf-8", "replace")
    phys = re.findall(r"[^\n]*\n|[^\n]+$", text)
    rows: list[list[str]] = []
    nums: list[int] = []
    raws: list[str] = []
    records = 0
    pos = 0  # the physical line (0-based, in this chunk) the reader starts at
    while pos < len(phys):
        # lines from `pos` on without copying or skipping the ones before (a restart per
        # stray quote stays linear)
        lines = (phys[i] for i in range(pos, len(phys)))
        reader = csv.reader(lines, delimiter=separator, strict=True)
        prev = 0
        try:
            for row in reader:
                start, prev = prev, reader.line_num
                if not row or all(not c.strip() for c in row):
                    continue
                records += 1
                raw = separator.join(row)
                line = first_line + pos + start + 1
                if len(row) != ncols:
                    rejects.append(
                        {
                            "location": f"{label}:{line}",
                            "raw": raw[:MAX_RAW],
                            "reason": f"expected {ncols} fields ({header.strip()}), got {len(row)}",
                        }
                    )
                    continue
                rows.append(row)
                nums.append(line)
                raws.append(raw)
            break
        except csv.Error as exc:
            records += 1
            bad = pos + prev  # the malformed record's first line
            span = reader.line_num - prev
            if "unexpected end of data" in str(exc) or "field limit" in str(exc):
                what = (
                    "a quoted field opened on this line is never closed (it runs to the "
                    f"end of the data read, {span} line(s))"
                    if "unexpected end" in str(exc)
                    else f"a quoted field opened on this line runs over {span} line(s), past "
                    f"the {csv.field_size_limit():,}-character field limit"
                )
            else:
                what = f"malformed quoting ({exc}) in the record starting on this line"
            rejects.append(
                {
                    "location": f"{label}:{first_line + bad + 1}",
                    "raw": phys[bad].rstrip("\r\n")[:MAX_RAW],
                    "reason": f"{what}; expected a quoted field to end with '\"' followed by "
                    f"'{separator}' or the end of the line (the lines after this one are read "
                    "as rows of their own)",
                }
            )
            pos = bad + 1
    df = pl.DataFrame(
        {n_: [r[j] or None for r in rows] for j, n_ in enumerate(names)},  # "" is null
        schema=dict.fromkeys(names, pl.String),
    )
    return _Chunk(
        _with_meta(df, np.asarray(nums, dtype=np.int64), label),
        rejects,
        records,
        names,
        lambda: pl.Series(RAW_COLUMN, raws, dtype=pl.String).str.slice(0, MAX_RAW),
    )


# --------------------------------------------------------------------------- loading


def _may_reject(df: pl.DataFrame, table: str) -> bool:
    """Cheap check whether the lake could reject any row (then we attach the original text).

    Conservative: a False means every row passes the lake's rules for
    required, non-negative and timestamp-range checks given the typed columns.
    """
    schema = schema_for(table)
    for c in schema.required:
        if c not in df.columns or df[c].null_count():
            return True
    ts = df[schema.ts_column]
    if not isinstance(ts.dtype, pl.Datetime):
        return True
    now = dt.datetime.now(dt.UTC)
    if ts.min() < dt.datetime(2000, 1, 1, tzinfo=dt.UTC) or ts.max() > now:  # type: ignore[operator]
        return True
    for c in schema.non_negative:
        if c in df.columns:
            col = df[c]
            if not col.dtype.is_numeric():
                return True
            low = col.min()
            if low is not None and low < 0:  # type: ignore[operator]
                return True
    return False


def _prepare_native(df: pl.DataFrame, table: str, file: str) -> pl.DataFrame:
    """Native rows: parse ISO timestamps in one pass; fill a missing key deterministically."""
    schema = schema_for(table)
    ts = schema.ts_column
    if ts in df.columns and df.schema[ts] == pl.String:
        parsed = df[ts].str.strptime(  # cache=False: log timestamps are nearly all distinct
            pl.Datetime("us", "UTC"), "%Y-%m-%dT%H:%M:%S%.f%#z", strict=False, cache=False
        )
        if parsed.null_count() == df[ts].null_count():
            df = df.with_columns(parsed.alias(ts))
    if table == "cache_events":
        df = df.with_columns(
            pl.col("layer").cast(pl.String).fill_null("generic")
            if "layer" in df.columns
            else pl.lit("generic").alias("layer")
        )
    key = schema.key[0]
    if key not in df.columns or df[key].null_count():
        data_cols = [c for c in df.columns if c in schema.columns and c != key]
        text = df.select(
            pl.concat_str(
                [pl.col(c).cast(pl.String).fill_null("\x00") for c in data_cols]
                + [pl.col(LINE_COLUMN).cast(pl.String)],
                separator="\x1f",
            )
        ).to_series()
        made = pl.Series(key, [f"{table}-{h}" for h in stable_hash(text)], dtype=pl.String)
        df = df.with_columns(pl.col(key).fill_null(made) if key in df.columns else made.alias(key))
    return df


@dataclass
class _Prepared:
    """A chunk turned into lake rows, ready to write (computed off the writer's thread)."""

    chunk: _Chunk
    rows: pl.DataFrame
    mapped_rejects: pl.DataFrame | None = None
    events: pl.DataFrame | None = None
    # the rows the lake will accept (validated with `now`, as Lake.append then is);
    # None where not worked out (a mapped chunk: `_accepted` does it when needed)
    accepted: pl.DataFrame | None = None
    now: dt.datetime = field(default_factory=lambda: dt.datetime.now(dt.UTC))


def _accepted(rows: pl.DataFrame, table: str, source: str, now: dt.datetime) -> pl.DataFrame:
    """The rows `Lake.append(..., now=now)` accepts, typed as the table's columns."""
    return validate(rows, schema_for(table), source=source, now=now)[0].good


def _prepare(
    chunk: _Chunk,
    plan: _Plan,
    file: str,
    *,
    check: bool,
    resolver: AvoidedTokens | None,
    folds: FoldTracker | None = None,
) -> _Prepared:
    """Map/convert a parsed chunk and derive its cache events; writes nothing.

    A mapping that does not fit the file raises here, before anything of the
    chunk is written.
    """
    src = chunk.src
    now = dt.datetime.now(dt.UTC)
    may_reject = True
    if plan.mapping is not None:
        if check:
            available = [
                c for c in src.columns if c not in (LINE_COLUMN, LOCATION_COLUMN, RAW_COLUMN)
            ]
            check_columns(plan.mapping, available, file, shown=chunk.columns)
        applied = apply_mapping(plan.mapping, chunk.with_raw(), file=file, folds=folds)
        rows, mapped_rejects = applied.frame, applied.rejects
    else:
        rows = _prepare_native(src, plan.table, file) if src.height else src
        may_reject = chunk.suspicious or _may_reject(rows, plan.table)
        if may_reject:
            rows = rows.with_columns(chunk.with_raw()[RAW_COLUMN])
        mapped_rejects = None
    rows = rows.drop(LINE_COLUMN, strict=False)
    accepted = None if may_reject else rows  # typed rows the lake's checks all pass
    events = None
    if plan.shim and rows.height:
        # only requests the lake keeps are hits (or originals of hits): a rejected row
        # is in no table, so an event for it would claim savings nobody can trace
        if accepted is None:
            accepted = _accepted(rows, plan.table, plan.source, now)
        events = shim_cache_events(accepted, plan.source, resolver)
    return _Prepared(chunk, rows, mapped_rejects, events, accepted, now)


def _load_chunk(prep: _Prepared, plan: _Plan, lake: Lake, report: FileReport) -> AppendResult:
    """Write one prepared chunk: rows through Lake.append, unparsable lines to rejects."""
    table = plan.table
    chunk = prep.chunk
    result = AppendResult(table=table)
    rejected = 0
    if chunk.rejects:
        rejected += lake.reject(table, chunk.rejects, source=plan.source)
    if prep.mapped_rejects is not None and prep.mapped_rejects.height:
        rejected += lake.reject(table, prep.mapped_rejects, source=plan.source)
    # a one-shot ingest may re-read a file (it grew, or is read again): rows the lake
    # holds unchanged are not written twice
    appended = lake.append(
        table, prep.rows, source=plan.source, now=prep.now, skip_unchanged=report.count_existing
    )
    result.read = chunk.records
    result.loaded = appended.loaded
    result.duplicates = appended.duplicates
    result.rejected = rejected + appended.rejected
    result.files = appended.files
    result.duplicate_files = appended.duplicate_files
    result.ignored_columns = appended.ignored_columns
    report.table = table
    report.add(result.read, result.loaded, result.rejected)
    report.duplicate_files += appended.duplicate_files
    report.files += appended.files
    report.ignore(plan.ignored + [c for c in appended.ignored_columns if c != LINE_COLUMN])
    report.already_in_lake += appended.unchanged + appended.replaced
    if prep.events is not None and prep.events.height:
        ev = lake.append(
            "cache_events",
            prep.events,
            source=plan.source,
            skip_unchanged=report.count_existing,
        )
        report.cache_events += ev.loaded
        report.cache_events_in_lake += ev.unchanged + ev.replaced
    return result


# --------------------------------------------------------------------------- reading files


def _open_checked(path: Path) -> Any:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise LogError(f"{path}: no such file") from None
    except PermissionError:
        raise LogError(f"{path}: permission denied (cannot read)") from None
    except IsADirectoryError:
        raise LogError(f"{path}: is a directory, expected a log file") from None
    except OSError as exc:
        raise LogError(f"{path}: cannot read: {exc.strerror or exc}") from None


_COMPRESSED = (  # leading bytes of a compressed file -> its compression
    (b"\x1f\x8b", "gzip"),
    (b"\xfd7zXZ\x00", "xz"),
    (b"\x28\xb5\x2f\xfd", "zstd"),
    (b"PK\x03\x04", "zip"),
)
_DECOMPRESSORS: dict[str, Callable[[Any], Any]] = {
    "gzip": lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"),
    "bzip2": bz2.BZ2File,
    "xz": lzma.LZMAFile,
}
_CAT = {"gzip": "zcat", "bzip2": "bzcat", "xz": "xzcat", "zstd": "zstdcat", "zip": "unzip -p"}
_STREAMS = (gzip.GzipFile, bz2.BZ2File, lzma.LZMAFile)
_READ_ERRORS = (OSError, EOFError, zlib.error, lzma.LZMAError)
"""What reading a damaged or truncated file raises (gzip's end of data is an EOFError)."""


def _compression(head: bytes) -> str | None:
    """The compression a file's first bytes say it has (logrotate's `compress`: gzip)."""
    for magic, name in _COMPRESSED:
        if head.startswith(magic):
            return name
    if head[:3] == b"BZh" and head[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
        return "bzip2"
    return None


def _head(path: Path, n: int = 16) -> bytes:
    """The first `n` bytes of a file (b"" when it cannot be read: the reader says why)."""
    try:
        with open(path, "rb") as fh:
            return fh.read(n)
    except OSError:
        return b""


@dataclass
class _LogFile:
    """An open log file: `fh` reads its text, decompressed where it is compressed."""

    fh: Any
    raw: Any  # the file itself: its position is how far a compressed one was read
    compression: str | None = None


@contextlib.contextmanager
def _open_log(path: Path) -> Iterator[_LogFile]:
    """Open a log file; a gzip/bzip2/xz one (a rotated archive) reads decompressed."""
    with _open_checked(path) as raw:
        try:
            kind = _compression(raw.read(16))
            raw.seek(0)
        except OSError as exc:
            raise LogError(f"{path}: cannot read: {exc.strerror or exc}") from None
        if kind is None:
            yield _LogFile(raw, raw)
            return
        if kind not in _DECOMPRESSORS:
            raise LogError(
                f"{path}: {kind}-compressed, which finops does not read; decompress it "
                f"first ({_CAT[kind]} '{path}' > '{_plain_name(path)}')"
            )
        with _DECOMPRESSORS[kind](raw) as fh:
            yield _LogFile(fh, raw, kind)


def _plain_name(path: Path, infix: str = "") -> Path:
    """`path` without its compression suffix, `infix` before its own (for advice)."""
    name = path.name
    for suffix in (".gz", ".bz2", ".xz", ".zst", ".zip"):
        name = name.removesuffix(suffix)
    stem, dot, ext = name.rpartition(".")
    if infix:
        name = f"{stem}{infix}.{ext}" if dot and stem else f"{name}{infix}"
    return path.with_name(name)


_WIDE_BOMS = (  # longest first: UTF-32 LE's mark begins with UTF-16 LE's
    (b"\xff\xfe\x00\x00", "UTF-32", "UTF-32 text (little-endian, byte-order mark FF FE 00 00)"),
    (b"\x00\x00\xfe\xff", "UTF-32", "UTF-32 text (big-endian, byte-order mark 00 00 FE FF)"),
    (
        b"\xff\xfe",
        "UTF-16",
        "UTF-16 text (little-endian, byte-order mark FF FE: what PowerShell 5's `>` and "
        "Out-File write)",
    ),
    (b"\xfe\xff", "UTF-16", "UTF-16 text (big-endian, byte-order mark FE FF)"),
)


def _wide_encoding(head: bytes) -> tuple[str, str] | None:
    """(iconv's name, a description) when text is UTF-16/UTF-32, not UTF-8: a byte-order
    mark, or ASCII with a NUL in every other byte (UTF-16 written without a mark)."""
    for bom, name, what in _WIDE_BOMS:
        if head.startswith(bom):
            return name, what
    if len(head) >= 8 and b"\x00" in head:
        even, odd = head[0::2], head[1::2]
        for nuls, text, name, end in (
            (odd, even, "UTF-16LE", "little"),
            (even, odd, "UTF-16BE", "big"),
        ):
            if nuls.count(0) >= 0.4 * len(nuls) and text.count(0) <= 0.05 * len(text):
                return name, f"UTF-16 text ({end}-endian, no byte-order mark: NUL every other byte)"
    return None


def _check_encoding(path: Path, log: _LogFile) -> None:
    """Refuse UTF-16/UTF-32 text with one error that says how to convert it.

    Read as UTF-8, every line of it would be rejected as invalid JSON (and a
    CSV's header would not match), with no word of the encoding.
    """
    try:
        head = log.fh.read(4096)
        log.fh.seek(0)
    except _READ_ERRORS as exc:
        raise LogError(f"{path}: cannot read: {exc}") from None
    if head.startswith(b"PAR1"):
        return  # Parquet: binary, its own encoding
    found = _wide_encoding(head)
    if found is None:
        return
    name, what = found
    out = _plain_name(path, ".utf8")
    src = f"{_CAT[log.compression]} '{path}' | " if log.compression else ""
    file = "" if log.compression else f" '{path}'"
    raise LogError(
        f"{path}: {what}, expected UTF-8; convert it and ingest the copy: "
        f"{src}iconv -f {name} -t UTF-8{file} > '{out}'"
    )


def _check_json_array(path: Path, log: _LogFile, mapping: Mapping | None) -> None:
    """Refuse a JSON array (`[` then objects): read as JSON Lines, every line of a
    pretty-printed one would be rejected as invalid JSON, with no word of the cause."""
    fmt = (mapping.format if mapping is not None else None) or _format_by_name(path) or "jsonl"
    if fmt != "jsonl":
        return
    try:
        head = log.fh.read(4096)
        log.fh.seek(0)
    except _READ_ERRORS:
        return  # the reader says why
    text = head.removeprefix(UTF8_BOM).lstrip()
    if not text.startswith(b"[") or text[1:].lstrip()[:1] not in (b"{", b"]", b""):
        return
    out = _plain_name(path, ".lines")
    src = (
        f"{_CAT[log.compression]} '{path}' | jq -c '.[]'"
        if log.compression
        else (f"jq -c '.[]' '{path}'")
    )
    raise LogError(
        f"{path}: a JSON array (the file starts with '['), expected JSON Lines (one JSON "
        f"object per line); convert it and ingest the copy: {src} > '{out}'"
    )


def _json_line_complete(line: bytes) -> bool:
    """Whether a last line without its newline is a whole JSON record.

    Not valid JSON: its writer is most likely still writing it (a record
    cut off mid-write never parses: objects end in `}`). A bare number
    might yet grow digits.
    """
    text = line.removeprefix(UTF8_BOM).strip()
    if not text:
        return True
    try:
        value = orjson.loads(text.decode("utf-8", "replace"))
    except orjson.JSONDecodeError:
        return False
    return isinstance(value, bool) or not isinstance(value, int | float)


def _csv_line_complete(line: bytes, header: str, separator: str) -> bool:
    """Whether a last CSV line without its newline is a whole row.

    Incomplete: fewer fields than the header, or a quoted field opened and not
    closed. (A row with all its fields may still lack the end of its last one;
    nothing can tell, so it is taken, as a file's last line often has no newline.)
    """
    text = line.decode("utf-8", "replace").rstrip("\r")
    if not text.strip():
        return True
    ncols = len(next(csv.reader([header], delimiter=separator), []))
    if text.count('"') % 2:
        # a quote left open: a field opened here (cut off) unless this line ends a
        # quoted field begun on an earlier line (its first quote then closes it)
        first = text.index('"')
        return not (first == 0 or text[first - 1] == separator)
    return len(next(csv.reader([text], delimiter=separator), [])) >= ncols


def _invalid_utf8(data: bytes, first_line: int) -> tuple[int, int]:
    """(lines with invalid UTF-8, the first one's number; 0 when none) of a block.

    They load with U+FFFD in place of the bad bytes (the readers decode
    lossily); this counts them so that a person hears of it. Pure ASCII
    (nearly every log) is told by `bytes.isascii` at memory speed, other text
    is validated by Polars, and only a block with bad bytes is searched.
    """
    if data.isascii():
        return 0, 0
    try:
        pl.Series([data], dtype=pl.Binary).cast(pl.String)
        return 0, 0
    except pl.exceptions.PolarsError:
        pass
    view = memoryview(data)
    count = first = 0
    pos = counted = 0  # lines are counted up to `counted`
    line = first_line + 1
    while pos < len(data):
        try:
            codecs.utf_8_decode(view[pos:], "strict", True)
            break
        except UnicodeDecodeError as exc:
            bad = pos + exc.start
        line += data.count(b"\n", counted, bad)
        count += 1
        first = first or line
        nl = data.find(b"\n", bad)
        if nl < 0:
            break
        pos = counted = nl + 1
        line += 1
    return count, first


def _utf8_note(path: Path, count: int, first: int) -> str:
    return (
        f"{path}: {count:,} line(s) with invalid UTF-8 (first: line {first:,}) loaded with "
        "U+FFFD (\ufffd) in place of the bad bytes; if the file is Latin-1/Windows-1252, "
        "convert it before ingesting (iconv -f WINDOWS-1252 -t UTF-8)"
    )


def _plan_checked(
    path: Path, table: str, mapping: Mapping | None, base_ts: dt.datetime | None
) -> _Plan:
    """`plan_for`; without a mapping its errors are the file's (`LogFormatError`).

    One file whose format cannot be told, among files that can, is that
    file's error; a mapping that does not fit stays an error of the command,
    and so does a shim request log given to `ingest cache-events` (the
    command is wrong: `ingest requests` writes its cache events).
    """
    try:
        return plan_for(path, table, mapping, base_ts=base_ts)
    except LogFormatError:
        raise
    except MappingError as exc:
        if mapping is not None or base_ts is not None:
            raise
        if table == "cache_events" and any(
            {"request_id", "ts", "cache_status"} <= r.keys() for r in _first_records(path)
        ):
            raise
        raise LogFormatError(str(exc)) from None


def _iter_blocks(
    fh: Any,
    offset: int,
    size: int,
    *,
    final: bool,
    chunk_bytes: int,
    complete: Callable[[bytes], bool] | None = None,
) -> Iterator[tuple[bytes, int]]:
    """Blocks of complete lines from `offset`; yields (data, new_offset).

    A partial last line waits for its newline unless `final` (a file that is
    complete, as in a one-shot ingest), and then also unless `complete(line)`
    says it is cut off (its writer is still writing it: it is left unread).
    A line longer than a block grows the read until its newline. Each block
    is read once and cut at its last newline; the next read starts right
    after it (no buffer concatenation). A decompressing reader (a compressed
    file) is read in order instead, offsets counting decompressed bytes.
    """
    if isinstance(fh, _STREAMS):
        yield from _iter_stream_blocks(
            fh, offset, final=final, chunk_bytes=chunk_bytes, complete=complete
        )
        return
    pos = offset
    want = chunk_bytes
    while pos < size:
        block = _read_block(fh, pos, min(want, size - pos), last=pos + want >= size)
        if not block:
            break
        cut = block.rfind(b"\n")
        if cut < 0:
            if pos + len(block) >= size:
                if final and (complete is None or complete(block)):
                    yield block, pos + len(block)
                return
            want *= 2  # one line longer than the block: read more
            continue
        want = chunk_bytes
        if cut == len(block) - 1:
            pos += len(block)
            yield block, pos
        else:
            pos += cut + 1
            yield block[: cut + 1], pos  # the partial line is read again next time


def _iter_stream_blocks(
    fh: Any,
    offset: int,
    *,
    final: bool,
    chunk_bytes: int,
    complete: Callable[[bytes], bool] | None,
) -> Iterator[tuple[bytes, int]]:
    """`_iter_blocks` over a decompressing reader: read in order to its end.

    Read in small pieces, so that an archive cut short (still being written
    by logrotate, or damaged) yields every line before the damage, then raises.
    """
    fh.seek(offset)  # forward from where the reader is (a CSV's header was read)
    pos = offset
    pieces: list[bytes] = []
    have = 0
    want = chunk_bytes
    failed: BaseException | None = None
    while True:
        try:
            data = fh.read1(_SCAN_BYTES)
        except _READ_ERRORS as exc:
            failed, data = exc, b""
        if data:
            pieces.append(data)
            have += len(data)
            if have < want:
                continue
        buf = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        cut = buf.rfind(b"\n")
        rest = buf[cut + 1 :] if cut + 1 < len(buf) else b""
        if cut >= 0:
            pos += cut + 1
            yield (buf[: cut + 1] if rest else buf), pos
        pieces, have = ([rest], len(rest)) if rest else ([], 0)
        want = chunk_bytes if cut >= 0 else 2 * have  # one line longer than a block: read on
        if not data:
            break
    if failed is not None:
        raise failed
    if pieces and final and (complete is None or complete(pieces[0])):
        yield pieces[0], pos + len(pieces[0])


def _read_block(fh: Any, pos: int, n: int, *, last: bool) -> bytes:
    """Up to `n` bytes at `pos`, ending at the last newline among them where one is near the end.

    Cutting the partial last line off a block that was read would copy the
    whole block (32 MB); so the block's last `PEEK_BYTES` are read first to find
    that newline, and then the block exactly up to it. The caller still cuts at
    the last newline of what it got (a file rewritten in between, or no newline
    in the peeked end: then the full `n` bytes are read here).
    """
    peek = min(PEEK_BYTES, n // 8)
    if not last and peek > 0:
        fh.seek(pos + n - peek)
        nl = fh.read(peek).rfind(b"\n")
        if nl >= 0:
            n = n - peek + nl + 1
    fh.seek(pos)
    return fh.read(n)


def _read_header(fh: Any) -> tuple[str, int, bool]:
    """The CSV header line, its length in bytes, and whether it is complete."""
    line = fh.readline(MAX_LINE_BYTES)
    text = line.decode("utf-8", "replace").rstrip("\r\n").lstrip("\ufeff")
    return text, len(line), line.endswith(b"\n")


def ingest_file(
    path: str | os.PathLike[str],
    lake: Lake,
    *,
    table: str = "requests",
    mapping: Mapping | str | None = None,
    base_ts: dt.datetime | None = None,
    progress: ProgressFn | None = None,
    chunk_bytes: int = CHUNK_BYTES,
) -> FileReport:
    """Read a whole file into the lake (one-shot; no checkpoint). Idempotent.

    Raises `LogError` when the file cannot be read at all and `MappingError`
    when the mapping does not fit it; bad records are rejected, not raised.
    Rows that loaded but need a look (local times in a repeated DST hour that
    the file's order cannot place) are in `report.warnings`, each also issued
    as an `AmbiguousTimeWarning`.

    A gzip/bzip2/xz file (a rotated archive, `requests-x.jsonl.1.gz`) is read
    decompressed. Without a mapping, a file whose format cannot be told raises
    `LogFormatError` (a `LogError` and a `MappingError`: one file's error); so
    does UTF-16/UTF-32 text, with the command that converts it. A file that
    fails part way (a truncated archive) raises `LogError` with what was
    loaded before in `exc.report`. Also in `report.warnings`, not issued as
    warnings: a last line without its newline that is not a whole record
    (left unread: its writer may still be writing it; a whole one loads), and
    how many lines had invalid UTF-8 (loaded with U+FFFD for the bad bytes).
    """
    p = Path(path)
    if isinstance(mapping, str):
        mapping = load_mapping(mapping)
    with _open_log(p) as log:
        fh = log.fh
        _check_encoding(p, log)
        _check_json_array(p, log, mapping)
        plan = _plan_checked(p, table, mapping, base_ts)
        report = FileReport(
            path=str(p), format=plan.format, mapping=plan.label, count_existing=True
        )
        state = FileState(path=str(p), dev=0, ino=0)
        size = os.fstat(log.raw.fileno()).st_size
        resolver = AvoidedTokens(lake)
        folds = FoldTracker(str(p))
        notes: list[str] = []
        try:
            for _ in _read_from(
                fh,
                p,
                plan,
                lake,
                state,
                report,
                size,
                final=True,
                chunk_bytes=chunk_bytes,
                resolver=resolver,
                folds=folds,
                check_tail=True,
                notes=notes,
            ):
                if progress:  # a compressed file: how much of it was decompressed
                    progress(log.raw.tell() if log.compression else state.offset, size)
        except LogError as exc:
            report.error = str(exc)
            report.warnings += notes
            exc.report = report  # type: ignore[attr-defined]
            raise
    report.warnings += folds.warnings()
    for message in report.warnings:
        warnings.warn(message, AmbiguousTimeWarning, stacklevel=2)
    report.warnings += notes
    return report


def _location_label(p: Path) -> str:
    """The file part of a row's location (`file:line`): its absolute path, symlinks resolved.

    One spelling whichever way the file was named (`x.jsonl`, `./x.jsonl`, an absolute
    path, `finops ingest` or `finops collect --log`): the same bad line is one reject.
    """
    return os.path.realpath(p)


def _read_from(
    fh: Any,
    p: Path,
    plan: _Plan,
    lake: Lake,
    state: FileState,
    report: FileReport,
    size: int,
    *,
    final: bool,
    chunk_bytes: int,
    resolver: AvoidedTokens | None = None,
    folds: FoldTracker | None = None,
    check_tail: bool = False,
    notes: list[str] | None = None,
) -> Iterator[AppendResult]:
    """Load what follows `state.offset`, advancing `state` after each written batch.

    `folds` (one per file, kept across calls) carries the file's pass through
    repeated DST hours from chunk to chunk and poll to poll. With `final` and
    `check_tail`, a last line without its newline that is not a whole record is
    left unread. `notes` gets what a person should hear of: that line, and the
    lines with invalid UTF-8 (loaded with U+FFFD). A file that cannot be read
    on (damaged, a truncated archive) raises `LogError` once the batches read
    before are written.
    """
    notes = [] if notes is None else notes
    label = report.location = _location_label(p)
    if plan.format == "parquet":
        if state.done:
            return
        try:
            df = pl.read_parquet(p)
        except (pl.exceptions.PolarsError, OSError) as exc:
            raise LogError(f"{p}: not a readable Parquet file: {exc}") from None
        line_no = np.arange(1, df.height + 1, dtype=np.int64)
        src = _with_meta(df, line_no, label).with_columns(
            pl.format("{} row {}", pl.lit(label), pl.col(LINE_COLUMN)).alias(LOCATION_COLUMN)
        )
        if plan.mapping is not None:
            paths = plan.mapping.source_columns()
            src = pl.concat(
                [_select_paths(df, paths), src.select(LINE_COLUMN, LOCATION_COLUMN)],
                how="horizontal",
            )

        def raw() -> pl.Series:
            if not df.width:
                return pl.Series(RAW_COLUMN, [""] * df.height, dtype=pl.String)
            return df.select(pl.struct(pl.all()).struct.json_encode()).to_series()

        prep = _prepare(
            _Chunk(src, [], df.height, _leaf_paths(df.schema), raw),
            plan,
            label,
            check=True,
            resolver=resolver or AvoidedTokens(lake),
            folds=folds,
        )
        res = _load_chunk(prep, plan, lake, report)
        state.done = True
        state.offset = size
        yield res
        return
    if plan.format == "csv" and state.header is None:
        fh.seek(0)
        header, consumed, complete = _read_header(fh)
        if not complete and not final:
            return  # the header itself is still being written
        if not header.strip():
            raise LogError(f"{p}: empty CSV file (no header line)")
        sep_ = plan.mapping.csv_separator if plan.mapping else ","
        names = next(csv.reader([header], delimiter=sep_), [])
        seen: dict[str, int] = {}
        for i, name in enumerate(names, 1):
            if name in seen:  # the reader would fail with a message about its schema
                raise LogError(
                    f"duplicate column {name!r} in the header of {p} (columns {seen[name]} "
                    f"and {i}); expected each column name once: rename one of them"
                )
            seen[name] = i
        state.header = header
        state.offset = consumed
        state.line = 1
    sep = plan.mapping.csv_separator if plan.mapping else ","
    paths = plan.mapping.source_columns() if plan.mapping is not None else None
    native = _native_read_schema(plan.table) if plan.mapping is None else None
    header_lines = 1 if plan.format == "csv" else 0

    resolver = resolver or AvoidedTokens(lake)

    def parse(data: bytes, first_line: int) -> _Chunk:
        if plan.format == "csv":
            return parse_csv_chunk(
                data, header=state.header or "", first_line=first_line, label=label, separator=sep
            )
        return parse_jsonl_chunk(
            data, first_line=first_line, label=label, schema=native, paths=paths
        )

    def prepare(parsed: Future[_Chunk], check: bool) -> _Prepared:
        return _prepare(parsed.result(), plan, label, check=check, resolver=resolver, folds=folds)

    def tail_complete(tail: bytes) -> bool:
        """A last line without its newline: a whole record, or one still being written?"""
        if plan.format == "csv":
            whole = _csv_line_complete(tail, state.header or "", sep)
        else:
            whole = _json_line_complete(tail)
        if not whole:
            notes.append(
                f"last line of {p} (line {line + 1:,}) unterminated and incomplete: left "
                "unread, still being written?"
            )
        return whole

    # three stages overlap: PARSE_WORKERS blocks are parsed at once (Polars parses one
    # buffer on one core, and releases the GIL), one thread prepares the parsed blocks
    # in file order (cache-hit resolution and DST folds must see them in order), and
    # this thread writes them, also in order, advancing the state after each batch.
    line = state.line
    queue: deque[tuple[Future[_Prepared], int, int, Future[tuple[int, int]]]] = deque()
    bad_utf8, first_bad, note_at = 0, 0, -1
    failed: BaseException | None = None
    with (
        ThreadPoolExecutor(max_workers=PARSE_WORKERS, thread_name_prefix="log-parse") as parsers,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="log-prepare") as preparer,
    ):
        blocks = _iter_blocks(
            fh,
            state.offset,
            size,
            final=final,
            chunk_bytes=chunk_bytes,
            complete=tail_complete if check_tail else None,
        )
        while True:
            try:
                block = next(blocks, None)
            except _READ_ERRORS as exc:  # write what was read, then say where it stopped
                failed, block = exc, None
            if block is not None:
                data, new_offset = block
                if new_offset == len(data) and plan.format == "jsonl":
                    # the file's first block: a BOM (PowerShell's utf8) is no part of line 1;
                    # no newline is dropped, so line numbers and the byte offsets stay right
                    data = data.removeprefix(UTF8_BOM)
                # a final block may end in a line without its newline: it is parsed as a
                # line, but the count stops before it, so the newline its writer may add
                # later reads as a blank remainder of that line (skipped), not a new line
                nlines = _count_newlines(data)
                first = line <= header_lines or plan.format == "csv"
                parsed = parsers.submit(parse, data, line)
                utf8 = parsers.submit(_invalid_utf8, data, line)
                queue.append((preparer.submit(prepare, parsed, first), nlines, new_offset, utf8))
                line += nlines
                if len(queue) <= PARSE_WORKERS:  # one batch being written, the next parsing
                    continue
            if not queue:
                break
            fut, nlines, new_offset, utf8 = queue.popleft()
            res = _load_chunk(fut.result(), plan, lake, report)
            state.line += nlines
            state.offset = new_offset
            count, first_line = utf8.result()
            if count:  # one note per file (per poll), kept up to date batch by batch
                bad_utf8, first_bad = bad_utf8 + count, first_bad or first_line
                if note_at < 0:
                    note_at = len(notes)
                    notes.append("")
                notes[note_at] = _utf8_note(p, bad_utf8, first_bad)
            yield res
    if failed is not None:
        kind = {gzip.GzipFile: "gzip", bz2.BZ2File: "bzip2", lzma.LZMAFile: "xz"}.get(type(fh))
        why = f"{kind} data truncated or damaged: {failed}" if kind else str(failed)
        raise LogError(
            f"{p}: cannot read past line {state.line:,} ({why}); what precedes it was read"
        )


# --------------------------------------------------------------------------- following


def _folder_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """The regular files of `folder` with their stat (where rotation leaves a log)."""
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return []
    out = []
    for entry in entries:
        try:
            if entry.is_file():
                out.append((Path(entry.path), entry.stat()))
        except OSError:
            continue
    return out


class LogSource:
    """Follow log files (a path or a glob) into the lake with durable checkpoints.

    >>> src = LogSource("/var/log/shim/requests.jsonl", lake, "data/lake/_state")
    >>> src.poll()   # call on a schedule; each call loads what is new

    `poll()` reads the complete lines added since the checkpoint, writes the
    lake batch, then the checkpoint. A file renamed away by rotation
    (`shim.log` -> `shim.log.1`, `app-20261116.jsonl`) with unread lines is
    finished first, found by its inode among the files of its folder. A file
    truncated in place (logrotate `copytruncate`) has its copy's unread tail read
    first (the copy is found by the checkpoint's head fingerprint), then starts
    over. Unread lines that cannot be found are reported in `self.errors`, and so
    are rows loaded with a warning (`FileReport.warnings`), each once.

    A compressed file matching the glob (`requests-x.jsonl.1.gz`: logrotate's
    `compress`) is a copy of a file followed under its plain name, so it is not
    read: one note in `self.errors`, and the checkpoint marks it done. (A
    one-shot `ingest_file` reads archives.) A file that cannot be read (UTF-16,
    a format that cannot be told) is an error of that file only, each poll.
    """

    def __init__(
        self,
        path_or_glob: str | os.PathLike[str],
        lake: Lake,
        checkpoint_dir: str | os.PathLike[str],
        mapping: Mapping | str | None = None,
        *,
        table: str = "requests",
        base_ts: dt.datetime | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        settle_seconds: float = 30.0,
        progress: ProgressFn | None = None,
    ) -> None:
        self.pattern = os.path.abspath(os.fspath(path_or_glob))
        self.lake = lake
        self.table = table
        self.mapping = load_mapping(mapping) if isinstance(mapping, str) else mapping
        self.base_ts = base_ts
        self.chunk_bytes = chunk_bytes
        self.settle_seconds = settle_seconds
        self.progress = progress
        self.checkpoint = Checkpoint.for_source(Path(checkpoint_dir), self.pattern, table)
        self.reports: dict[str, FileReport] = {}
        self.errors: list[str] = []
        self.resolver = AvoidedTokens(lake)  # remembers originals of later cache hits
        # per file (dev:ino): where it went back through repeated DST hours, across polls;
        # in memory only, so after a restart inside such an hour its rows may be warned of
        self._folds: dict[str, FoldTracker] = {}
        self._seen_size: dict[str, int] = {}  # file key -> size at the last poll

    def __repr__(self) -> str:
        return f"LogSource({self.pattern!r}, table={self.table!r})"

    def _candidates(self) -> list[Path]:
        if globlib.has_magic(self.pattern):
            return [Path(p) for p in globlib.glob(self.pattern) if os.path.isfile(p)]
        return [Path(self.pattern)] if os.path.isfile(self.pattern) else []

    def _find_moved(self, state: FileState) -> Path | None:
        """Where a tracked file went (rotation renames it within its folder).

        Any name is checked, not only ones starting with the original's: logrotate's
        `dateext` + `extension` turns `app.jsonl` into `app-20261116.jsonl`.
        """
        old = Path(state.path)
        try:
            st = old.stat()
            if (st.st_dev, st.st_ino) == (state.dev, state.ino):
                return old
        except OSError:
            pass
        for path, st in _folder_files(old.parent):
            if (st.st_dev, st.st_ino) == (state.dev, state.ino):
                return path
        return None

    def _find_copy(self, p: Path, state: FileState) -> tuple[Path, os.stat_result] | None:
        """The copy `copytruncate` made of `p` before truncating it, if it is next to it.

        It is the newest other file whose head matches the checkpoint's fingerprint
        and that holds at least the bytes already read, and is not followed on its own.
        """
        if not state.fp_len:
            return None
        found: tuple[Path, os.stat_result] | None = None
        for path, st in _folder_files(p.parent):
            key = f"{st.st_dev}:{st.st_ino}"
            if key == state.key or key in self.checkpoint.files or st.st_size < state.offset:
                continue
            try:
                if head_fingerprint(path, state.fp_len) != state.fp:
                    continue
            except OSError:
                continue
            if found is None or st.st_mtime_ns > found[1].st_mtime_ns:
                found = (path, st)
        return found

    def _lost(self, state: FileState, what: str) -> None:
        """Report lines that cannot be read any more (never drop them silently)."""
        seen = self._seen_size.get(state.key, state.offset)
        if seen > state.offset:
            unread = f"{seen - state.offset:,} unread bytes (from line {state.line + 1})"
        else:
            unread = f"anything written after byte {state.offset:,} (line {state.line})"
        self.errors.append(f"{state.path}: {what}; {unread} not loaded")

    def poll(self, *, final: bool = False) -> AppendResult:
        """Load everything new; returns the `requests` (or cache_events) counts of this poll.

        A last line without its newline waits for it. It is taken as a record
        only when the file has not changed for `settle_seconds` and either
        `final` is set (shutdown) or the file was rotated away: a writer may
        still be in the middle of that line, and reading half of it would lose it.

        Unreadable files are recorded in `self.errors` (and skipped) instead of
        raising, so one bad file never stops a follower; a wrong mapping raises.
        Even with `final`, a live file's last line that is not a whole record (not
        valid JSON, too few CSV fields) is left for its writer, with a note in
        `self.errors`; a rotated file's is read (and rejected).
        """
        self.errors = []
        total = AppendResult(table=self.table)
        cp = self.checkpoint
        current = {}
        for p in self._candidates():
            try:
                st = p.stat()
            except OSError:
                continue
            current[f"{st.st_dev}:{st.st_ino}"] = (p, st)
        if not current and not cp.files:
            what = "no file matches" if globlib.has_magic(self.pattern) else "no such file"
            self.errors.append(f"{self.pattern}: {what} (yet)")
        order: list[tuple[Path, os.stat_result, bool]] = []
        # 1. files rotated away with unread data: finish them first
        for key, state in list(cp.files.items()):
            if key in current:
                if not state.done and self._stale(current[key][0], current[key][1], state):
                    # truncated in place (copytruncate): the copy holds the unread tail
                    del cp.files[key]  # the live file starts over
                    copy = self._find_copy(current[key][0], state)
                    if copy is None:
                        self._lost(state, "truncated in place and no copy of it found next to it")
                        continue
                    cst = copy[1]
                    cp.files[f"{cst.st_dev}:{cst.st_ino}"] = FileState(
                        path=str(copy[0]),
                        dev=cst.st_dev,
                        ino=cst.st_ino,
                        offset=state.offset,
                        line=state.line,
                        fp=state.fp,
                        fp_len=state.fp_len,
                        header=state.header,
                    )
                    order.append((copy[0], cst, True))
                continue
            moved = self._find_moved(state)
            if moved is None:
                del cp.files[key]
                if not state.done and (state.path == self.pattern or key in self._seen_size):
                    self._lost(state, "moved out of its folder or deleted before it was read")
                continue
            st = moved.stat()
            state.path = str(moved)
            if st.st_size > state.offset and not state.done:
                order.append((moved, st, True))
        # 2. the live files, oldest first (a copy queued above is read there)
        queued = {str(p) for p, _, _ in order}
        for p, st in sorted(current.values(), key=lambda x: (x[1].st_mtime_ns, str(x[0]))):
            if str(p) not in queued:
                order.append((p, st, False))
        for p, st, rotated in order:
            try:
                total += self._poll_file(
                    p, st, final=(final or rotated) and self._settled(st), rotated=rotated
                )
            except LogError as exc:
                self.errors.append(str(exc))
        self._seen_size = {
            key: current[key][1].st_size
            for key, state in cp.files.items()
            if key in current and current[key][1].st_size > state.offset
        }
        self._folds = {key: f for key, f in self._folds.items() if key in cp.files}
        if cp.files:
            cp.save()
        return total

    def _settled(self, st: os.stat_result) -> bool:
        return time.time() - st.st_mtime >= self.settle_seconds

    @staticmethod
    def _stale(p: Path, st: os.stat_result, state: FileState) -> bool:
        """Truncated in place, or a new file on a reused inode: the state no longer fits."""
        return st.st_size < state.offset or bool(
            state.fp_len and head_fingerprint(p, state.fp_len) != state.fp
        )

    def _poll_file(
        self, p: Path, st: os.stat_result, *, final: bool, rotated: bool = False
    ) -> AppendResult:
        """Read what is new in one file. A compressed one is skipped (`_skip_compressed`);
        a live file's last line without its newline that is not a whole record is
        left for its writer even when `final` (a rotated file's is taken)."""
        cp = self.checkpoint
        key = f"{st.st_dev}:{st.st_ino}"
        state = cp.files.get(key)
        if state is not None and self._stale(p, st, state):
            state = None
        if state is None:
            state = FileState(path=str(p), dev=st.st_dev, ino=st.st_ino)
        state.path = str(p)
        result = AppendResult(table=self.table)
        if st.st_size <= state.offset or state.done:
            cp.files[key] = state
            return result
        if state.offset == 0 and (kind := _compression(_head(p))) is not None:
            self._skip_compressed(p, st, state, kind)
            cp.files[key] = state
            return result
        with _open_log(p) as log:
            fh = log.fh
            if state.offset == 0:
                _check_encoding(p, log)
                _check_json_array(p, log, self.mapping)
            plan = _plan_checked(p, self.table, self.mapping, self.base_ts)
            report = self.reports.setdefault(
                str(p), FileReport(path=str(p), format=plan.format, mapping=plan.label)
            )
            folds = self._folds.setdefault(key, FoldTracker(str(p)))
            if state.offset == 0 and not state.line:
                folds.folds.clear()  # the file starts over (truncated, or a reused inode)
            folds.file = str(p)
            for res in _read_from(
                fh,
                p,
                plan,
                self.lake,
                state,
                report,
                st.st_size,
                final=final,
                chunk_bytes=self.chunk_bytes,
                resolver=self.resolver,
                folds=folds,
                check_tail=not rotated,
                notes=self.errors,  # as they happen: a poll may stop between batches
            ):
                result += res
                if state.fp_len < FINGERPRINT_BYTES:
                    state.fp_len = min(FINGERPRINT_BYTES, state.offset)
                    state.fp = head_fingerprint(p, state.fp_len)
                cp.files[key] = state
                cp.save()  # after the lake batch: a crash re-reads, never skips
                if self.progress:
                    self.progress(state.offset, st.st_size)
            new = folds.warnings()
            report.warnings += new
            self.errors += new + report.untold()
        cp.files[key] = state
        return result

    def _skip_compressed(self, p: Path, st: os.stat_result, state: FileState, kind: str) -> None:
        """Mark a compressed file done, unread, with one note (it stays done in the checkpoint).

        In a followed glob (`'requests-*.jsonl*'`), `requests-x.jsonl.1.gz` is
        logrotate's `compress` of a file this source followed under its plain
        name: its lines were read from that file. An archive that was never
        followed loads with a one-shot `finops ingest` (idempotent).
        """
        state.done = True
        state.offset = st.st_size
        state.fp_len = min(FINGERPRINT_BYTES, st.st_size)  # a reused inode reads as new
        state.fp = head_fingerprint(p, state.fp_len)
        command = "cache-events" if self.table == "cache_events" else "requests"
        self.errors.append(
            f"{p}: {kind}-compressed, not followed: a rotated copy (logrotate `compress`) of "
            "a log read under its uncompressed name; to load an archive that was never "
            f"followed, ingest it once: finops ingest {command} '{p}'"
        )

    def follow(self, interval: float = 1.0, stop: Callable[[], bool] | None = None) -> None:
        """Poll until `stop()` says so (or forever); the CLI's `--follow`."""
        while stop is None or not stop():
            self.poll()
            time.sleep(interval)
