"""Column mappings: load any CSV/JSONL/Parquet log into a lake table with a TOML file.

Why a mapping file and not code: every team's request log has its own column
names, units and clocks, and the people who own those logs should not have to
write Python to get them into the lake. A mapping says, per lake column, where
the value comes from and how to convert it:

```toml
[mapping]
name = "azure-llm-2023"
format = "csv"            # csv | jsonl | parquet (default: from the file suffix)
table = "requests"        # or cache_events
source = "azure-llm-2023" # the lake's `source` column (default: ingest:<file name>)

[key]                     # the deterministic id when the source has none
hash = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
line = true               # mix the line number in (identical rows stay distinct)
prefix = "azure2023-"

[columns]
ts = { from = "TIMESTAMP", format = "%Y-%m-%d %H:%M:%S%.f", timezone = "UTC" }
input_tokens = "ContextTokens"
latency_ms = { from = "latency_s", scale = 1000 }
operation = { value = "chat" }
```

Column spec keys: `from` (a source column, a dotted path into nested JSON such
as `usage.prompt_tokens` or `choices.0.finish_reason`, or a list of
alternatives: the first non-null wins), `optional` (absent source column ->
null instead of an error), `required` (a row whose value is null, after
`default`, is a reject naming its line and the field), `value` (a constant; `{file}` and `{stem}` are
replaced by the file name and stem), `template` (`"{colA}-{colB}"`, plus
`{line}`, `{file}`, `{stem}`), `hash` (a list of source columns -> a stable
hex digest), `scale` (multiply numbers, e.g. 1000 for s -> ms), `map` (value
-> value), `default` (fills nulls), and for timestamps `format` (strftime
pattern), `timezone` (for naive times), `unit` (`s|ms|us|ns` epoch numbers)
and `relative_to` (an ISO base time for offsets counted in `unit`).

`timezone` applies to every time without an offset, with or without `format`:
`ts = { from = "time", timezone = "America/New_York" }` reads
`2026-11-20 01:00:00` as 06:00 UTC. A time in the data that has its own
offset (`...+02:00`) keeps it, as it names the instant; epoch numbers are UTC.

Local clock times (`format` without an offset, read in `timezone`): a time the
clocks skip in spring (02:30 on a spring-forward night) does not exist and is
a reject naming the line. A time in the hour the clocks repeat in autumn is
placed by the file's order, since logs are written in time order: once the
local times of that hour go back (by at least half the clock change, so the
seconds-long disorder of concurrent writers does not count), the rows of that
hour from there on are its later occurrence. Rows the order cannot place (the
file never goes back through the hour after them) are read as the earlier
occurrence, and the ingest says so with a warning naming the lines
(`FoldTracker.warnings`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import string
import tomllib
import zoneinfo
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from finops.lake import coerce
from finops.schemas import TABLES, schema_for

SHIPPED_DIR = Path(__file__).parent / "mappings"
LINE_COLUMN = "__line"
"""Internal column with each row's physical line number in its file."""

_SPEC_KEYS = {
    "from",
    "optional",
    "value",
    "template",
    "hash",
    "scale",
    "map",
    "default",
    "format",
    "timezone",
    "unit",
    "relative_to",
    "required",
}
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
_SPECIAL = {"line", "file", "stem"}


class MappingError(ValueError):
    """A mapping file that is wrong, or does not fit the file it is applied to."""


_NO_DST = frozenset({"UTC", "Etc/UTC", "Etc/GMT", "GMT", "Zulu", "Etc/Zulu", "Universal"})
"""Zones whose clocks never go back: no local time in them is ambiguous."""


class AmbiguousTimeWarning(UserWarning):
    """Local times in a repeated (DST fall-back) hour that the file's order cannot place."""


@dataclass(frozen=True)
class ColumnSpec:
    """How one lake column is computed from a source row."""

    target: str
    sources: tuple[str, ...] = ()
    optional: bool = False
    value: Any = None
    template: str | None = None
    hash: tuple[str, ...] = ()
    scale: float | None = None
    map: dict[str, Any] | None = None
    default: Any = None
    format: str | None = None
    timezone: str = "UTC"
    unit: str | None = None
    relative_to: dt.datetime | None = None
    required: bool = False  # a row whose value is null (after `default`) is a reject

    def source_columns(self) -> list[str]:
        cols = list(self.sources) + [c for c in self.hash if c not in _SPECIAL]
        if self.template:
            cols += [c for c in _template_fields(self.template) if c not in _SPECIAL]
        return cols


@dataclass(frozen=True)
class KeySpec:
    """The deterministic row id for sources without one: a hash of columns (+ line)."""

    hash: tuple[str, ...] = ()
    line: bool = True
    prefix: str = ""


@dataclass
class Mapping:
    """A parsed mapping file (see the module docstring for the format)."""

    name: str
    origin: str
    table: str = "requests"
    format: str | None = None
    source: str | None = None
    description: str = ""
    columns: dict[str, ColumnSpec] = field(default_factory=dict)
    key: KeySpec | None = None
    csv_separator: str = ","

    @property
    def key_column(self) -> str:
        return schema_for(self.table).key[0]

    def source_columns(self) -> list[str]:
        """Every source column or path the mapping reads, in a stable order."""
        seen: dict[str, None] = {}
        for spec in self.columns.values():
            seen.update(dict.fromkeys(spec.source_columns()))
        if self.key is not None:
            seen.update(dict.fromkeys(c for c in self.key.hash if c not in _SPECIAL))
        return list(seen)

    def with_base_time(self, base: dt.datetime) -> Mapping:
        """A copy whose relative timestamps count from `base` (CLI `--base-ts`)."""
        if not any(v.relative_to is not None for v in self.columns.values()):
            raise MappingError(
                f"{self.origin}: --base-ts given, but no column of this mapping has relative_to"
            )
        cols = {
            k: (_replace(v, relative_to=base) if v.relative_to is not None else v)
            for k, v in self.columns.items()
        }
        return Mapping(**{**self.__dict__, "columns": cols})


def _replace(spec: ColumnSpec, **changes: Any) -> ColumnSpec:
    return ColumnSpec(**{**spec.__dict__, **changes})


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def shipped_mappings() -> dict[str, Path]:
    """Mappings that ship with finops, by name (`azure-llm-2023`, ...)."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.toml"))}


def resolve_mapping(name_or_path: str | Path) -> Path:
    """A mapping file path, or the name of a shipped mapping."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_mappings()
    if str(name_or_path) in shipped:
        return shipped[str(name_or_path)]
    if path.is_dir():
        raise MappingError(
            f"mapping {str(name_or_path)!r}: a folder, expected a mapping file (TOML) or the "
            f"name of a shipped mapping (shipped: {', '.join(shipped) or 'none'})"
        )
    raise MappingError(
        f"mapping {str(name_or_path)!r}: no such file, and not a shipped mapping "
        f"(shipped: {', '.join(shipped) or 'none'})"
    )


def _parse_time(text: str, where: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError:
        raise MappingError(f"{where}: expected an ISO-8601 time, got {text!r}") from None
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value.astimezone(dt.UTC)


def load_mapping(name_or_path: str | Path) -> Mapping:
    """Parse and check a mapping file; errors name the file and the key."""
    path = resolve_mapping(name_or_path)
    origin = str(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise MappingError(f"{origin}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise MappingError(f"{origin}: cannot read: {exc.strerror or exc}") from None
    unknown = set(doc) - {"mapping", "columns", "key"}
    if unknown:
        raise MappingError(
            f"{origin}: unknown section(s) {sorted(unknown)}; expected [mapping], [columns], [key]"
        )
    meta = doc.get("mapping", {})
    if not isinstance(meta, dict):
        raise MappingError(f"{origin}: mapping = {meta!r}; expected a [mapping] table")
    unknown = set(meta) - set(_MAPPING_KEYS)
    if unknown:
        raise MappingError(
            f"{origin}: [mapping] unknown key(s) {sorted(unknown)}; expected some of "
            f"{', '.join(_MAPPING_KEYS)}"
        )
    for k in _MAPPING_KEYS:
        if k in meta and not isinstance(meta[k], str):
            raise MappingError(f"{origin}: [mapping] {k} = {meta[k]!r}; expected a string")
    sep = meta.get("csv_separator", ",")
    if len(sep) != 1:
        raise MappingError(f"{origin}: [mapping] csv_separator = {sep!r}; expected one character")
    table = meta.get("table", "requests")
    if table not in TABLES or table in ("rejects", "scrape_health"):
        raise MappingError(
            f"{origin}: [mapping] table = {table!r}; expected 'requests' or 'cache_events'"
        )
    fmt = meta.get("format")
    if fmt is not None and fmt not in ("csv", "jsonl", "parquet"):
        raise MappingError(
            f"{origin}: [mapping] format = {fmt!r}; expected 'csv', 'jsonl' or 'parquet'"
        )
    schema = schema_for(table)
    raw_cols = doc.get("columns")
    if not isinstance(raw_cols, dict) or not raw_cols:
        raise MappingError(f"{origin}: [columns] is missing or empty")
    columns: dict[str, ColumnSpec] = {}
    for target, spec in raw_cols.items():
        where = f"{origin}: [columns] {target}"
        if target not in schema.columns:
            raise MappingError(
                f"{where}: {target!r} is not a column of the {table} table; "
                f"expected one of {', '.join(schema.columns)}"
            )
        columns[target] = _parse_spec(target, spec, where, schema.columns[target])
    key = None
    if "key" in doc:
        k = doc["key"]
        where = f"{origin}: [key]"
        if not isinstance(k, dict):
            raise MappingError(f"{origin}: key = {k!r}; expected a [key] table")
        if set(k) - {"hash", "line", "prefix"}:
            raise MappingError(
                f"{where}: unknown key(s) {sorted(set(k) - {'hash', 'line', 'prefix'})}"
            )
        hash_cols = k.get("hash", [])
        if not isinstance(hash_cols, list) or not all(isinstance(c, str) for c in hash_cols):
            raise MappingError(f"{where} hash: expected a list of column names")
        if not isinstance(k.get("line", True), bool):
            raise MappingError(f"{where} line = {k['line']!r}; expected true or false")
        if not isinstance(k.get("prefix", ""), str):
            raise MappingError(f"{where} prefix = {k['prefix']!r}; expected a string")
        key = KeySpec(tuple(hash_cols), k.get("line", True), k.get("prefix", ""))
    return Mapping(
        name=str(meta.get("name", path.stem)),
        origin=origin,
        table=table,
        format=fmt,
        source=meta.get("source"),
        description=str(meta.get("description", "")),
        columns=columns,
        key=key,
        csv_separator=sep,
    )


_MAPPING_KEYS = ("name", "format", "table", "source", "description", "csv_separator")


def _check_constant(value: Any, dtype: pl.DataType, where: str) -> None:
    """A `value`/`default` that the column's type cannot hold fails here, not in the lake."""
    if isinstance(value, str) and ("{file}" in value or "{stem}" in value):
        return
    if isinstance(value, dt.date) and isinstance(dtype, pl.Datetime):
        return
    try:
        pl.Series([value]).cast(dtype, strict=True)
    except (pl.exceptions.PolarsError, TypeError, ValueError, OverflowError):
        if isinstance(dtype, pl.Datetime) and isinstance(value, str):
            try:
                dt.datetime.fromisoformat(value)
                return
            except ValueError:
                pass
        raise MappingError(f"{where} = {value!r}: expected a value of type {dtype}") from None


def _parse_spec(target: str, spec: Any, where: str, dtype: pl.DataType) -> ColumnSpec:
    if isinstance(spec, str):
        return ColumnSpec(target=target, sources=(spec,))
    if not isinstance(spec, dict):
        raise MappingError(f"{where}: expected a column name or a table of options, got {spec!r}")
    unknown = set(spec) - _SPEC_KEYS
    if unknown:
        raise MappingError(
            f"{where}: unknown option(s) {sorted(unknown)}; expected some of {sorted(_SPEC_KEYS)}"
        )
    kinds = [k for k in ("from", "value", "template", "hash") if k in spec]
    if len(kinds) != 1:
        raise MappingError(
            f"{where}: give exactly one of from, value, template, hash (got {kinds or 'none'})"
        )
    src = spec.get("from", [])
    sources = (src,) if isinstance(src, str) else tuple(src) if isinstance(src, list) else None
    if sources is None or not all(isinstance(s, str) and s for s in sources):
        raise MappingError(f"{where} from = {src!r}: expected a column name or a list of them")
    if "from" in spec and not sources:
        raise MappingError(f"{where} from = []: expected at least one column name")
    for opt in ("optional", "required"):
        if not isinstance(spec.get(opt, False), bool):
            raise MappingError(f"{where} {opt} = {spec[opt]!r}: expected true or false")
    required = spec.get("required", False)
    for opt in ("template", "format", "timezone", "unit"):
        if opt in spec and not isinstance(spec[opt], str):
            raise MappingError(f"{where} {opt} = {spec[opt]!r}: expected a string")
    for opt in ("value", "default"):
        if isinstance(spec.get(opt), dict | list):
            raise MappingError(
                f"{where} {opt} = {spec[opt]!r}: expected one plain value (text, a number, "
                "true/false or a time)"
            )
    if "value" in spec:
        _check_constant(spec["value"], dtype, f"{where} value")
    if "default" in spec:
        _check_constant(spec["default"], dtype, f"{where} default")
    unit = spec.get("unit")
    if unit is not None and unit not in _UNIT_US:
        raise MappingError(f"{where} unit: {unit!r}; expected one of {sorted(_UNIT_US)}")
    relative = spec.get("relative_to")
    if relative is not None:
        if isinstance(relative, dt.datetime):
            relative = relative if relative.tzinfo else relative.replace(tzinfo=dt.UTC)
        else:
            relative = _parse_time(str(relative), f"{where} relative_to")
        if unit is None:
            raise MappingError(f"{where}: relative_to needs a unit (s, ms, us or ns)")
    is_ts = isinstance(dtype, pl.Datetime)
    if (spec.get("format") or unit) and not is_ts:
        raise MappingError(f"{where}: format/unit/relative_to apply to timestamp columns only")
    scale = spec.get("scale")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, int | float)):
        raise MappingError(f"{where} scale: expected a number, got {scale!r}")
    hash_cols = spec.get("hash", ())
    if isinstance(hash_cols, str):
        hash_cols = (hash_cols,)
    if not isinstance(hash_cols, list | tuple) or not all(isinstance(c, str) for c in hash_cols):
        raise MappingError(f"{where} hash = {hash_cols!r}: expected a list of column names")
    mapping = spec.get("map")
    if mapping is not None and not isinstance(mapping, dict):
        raise MappingError(f"{where} map: expected a table of value = replacement")
    for k_, v_ in (mapping or {}).items():
        if isinstance(v_, dict | list):
            raise MappingError(f"{where} map {k_!r} = {v_!r}: expected one plain value")
    try:
        tz = str(spec.get("timezone", "UTC"))
        dt.datetime.now(dt.UTC).astimezone(__import__("zoneinfo").ZoneInfo(tz))
    except Exception:
        raise MappingError(f"{where} timezone: unknown time zone {tz!r}") from None
    return ColumnSpec(
        target=target,
        sources=sources,
        optional=bool(spec.get("optional", False)),
        value=spec.get("value"),
        template=spec.get("template"),
        hash=tuple(hash_cols),
        scale=float(scale) if scale is not None else None,
        map={str(k): v for k, v in mapping.items()} if mapping else None,
        default=spec.get("default"),
        format=spec.get("format"),
        timezone=tz,
        unit=unit,
        relative_to=relative,
        required=required,
    )


# --------------------------------------------------------------------------- applying


def stable_hash(values: Iterable[str]) -> list[str]:
    """blake2b digests (20 hex chars): stable across Python/Polars versions and hosts.

    Request ids are stored for good, so their hash must never change when a
    library is upgraded (Polars' own `hash` is documented as unstable).
    """
    return [hashlib.blake2b(v.encode(), digest_size=10).hexdigest() for v in values]


def _as_text(expr: pl.Expr, dtype: pl.DataType) -> pl.Expr:
    """A canonical string for hashing/templates: lists as `[a,b]`, structs as JSON."""
    if isinstance(dtype, pl.List | pl.Array):
        inner = expr.cast(pl.List(pl.String)).list.join(",")
        return pl.format("[{}]", inner)
    if isinstance(dtype, pl.Struct):
        return expr.struct.json_encode()
    if isinstance(dtype, pl.Datetime):
        return expr.dt.to_string("%Y-%m-%dT%H:%M:%S%.f")
    return expr.cast(pl.String)


def substitute(value: Any, file: str) -> Any:
    """Replace `{file}` and `{stem}` in a string value (constants, prefixes, source)."""
    if isinstance(value, str):
        return value.replace("{file}", file).replace("{stem}", Path(file).stem)
    return value


@dataclass
class Applied:
    """The mapped rows (lake columns + `_location`/`_raw`) and the rows that failed."""

    frame: pl.DataFrame
    rejects: pl.DataFrame  # location, raw, reason
    warnings: list[str] = field(default_factory=list)  # only when no FoldTracker was given


@dataclass
class _Fold:
    """One file's rows in one repeated local hour (one column, one zone, one night)."""

    max_local_us: int  # the latest local time read before the clocks went back
    went_back_line: int | None = None  # where the file's times went back through the hour
    early_first: int = 0  # rows read as the earlier occurrence: first/last line, count
    early_last: int = 0
    early_rows: int = 0
    early_min_us: int = 0
    early_max_us: int = 0
    warned: bool = False


@dataclass
class FoldTracker:
    """Places local times of DST fall-back hours by the file's order, chunk after chunk.

    A log is read in chunks (and a follower reads an hour's lines over many
    polls), so where the file went back through a repeated hour must be carried
    from one chunk to the next: keep one tracker per file, in file order.
    """

    file: str
    folds: dict[tuple[str, str, dt.date], _Fold] = field(default_factory=dict)

    def choose(self, target: str, tz: str, local: pl.Series, lines: pl.Series) -> pl.Series | None:
        """Per row 'earliest'/'latest' for `replace_time_zone`; None when no row is ambiguous."""
        if tz in _NO_DST:  # the common case: two conversions per chunk saved
            return None
        early = local.dt.replace_time_zone(tz, ambiguous="earliest", non_existent="null")
        late = local.dt.replace_time_zone(tz, ambiguous="latest", non_existent="null")
        amb = (early != late).fill_null(False).to_numpy()
        if not amb.any():
            return None
        idx = np.flatnonzero(amb)
        local_us = local.cast(pl.Int64).to_numpy()
        half = ((late - early).dt.total_microseconds() // 2).to_numpy()
        days = local.dt.date().to_list()
        line_no = lines.to_numpy()
        choice = np.zeros(len(local), dtype=bool)  # True: the later occurrence
        by_day: dict[dt.date, list[int]] = {}
        for i in idx:
            by_day.setdefault(days[i], []).append(int(i))
        for day, rows in by_day.items():
            sel = np.asarray(rows)
            v = local_us[sel]
            fold = self.folds.get((target, tz, day))
            if fold is None:
                fold = self.folds[(target, tz, day)] = _Fold(max_local_us=int(v[0]))
            prior = np.maximum.accumulate(np.concatenate([[fold.max_local_us], v]))[:-1]
            back = (prior - v) >= half[sel]
            later = np.logical_or.accumulate(back) | (fold.went_back_line is not None)
            if fold.went_back_line is None and back.any():
                fold.went_back_line = int(line_no[sel[int(np.argmax(back))]])
            fold.max_local_us = max(fold.max_local_us, int(v.max()))
            choice[sel] = later
            kept = sel[~later]
            if len(kept):
                if not fold.early_rows:
                    fold.early_first = int(line_no[kept[0]])
                    fold.early_min_us = int(local_us[kept].min())
                    fold.early_max_us = int(local_us[kept].max())
                fold.early_last = int(line_no[kept[-1]])
                fold.early_rows += len(kept)
                fold.early_min_us = min(fold.early_min_us, int(local_us[kept].min()))
                fold.early_max_us = max(fold.early_max_us, int(local_us[kept].max()))
        return pl.Series(np.where(choice, "latest", "earliest"), dtype=pl.String)

    def warnings(self) -> list[str]:
        """New warnings: rows read as the earlier occurrence that the order did not place.

        Call at the end of a file (one-shot) or of a poll (a follower): a fold the
        file went back through by then needs none. Each fold warns once.
        """
        out = []
        for (target, tz, day), fold in self.folds.items():
            if fold.warned or fold.went_back_line is not None or not fold.early_rows:
                continue
            fold.warned = True
            first = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=fold.early_min_us)
            last = dt.datetime(1970, 1, 1) + dt.timedelta(microseconds=fold.early_max_us)
            offset = first.replace(tzinfo=zoneinfo.ZoneInfo(tz), fold=0).strftime("%z")
            if fold.early_first == fold.early_last:
                lines, times = f"line {fold.early_first}", f"local time {day} {first:%H:%M:%S}"
            else:
                lines = f"lines {fold.early_first}-{fold.early_last}"
                times = f"local times {day} {first:%H:%M:%S}-{last:%H:%M:%S}"
            out.append(
                f"{self.file}: {lines} ({fold.early_rows} row(s)), column {target}: {times} "
                f"falls in the hour {tz} repeats when its clocks go back, and the file's order "
                f"cannot tell which occurrence (the file does not go back through that hour "
                f"after these rows): read as the earlier one (UTC{offset[:3]}:{offset[3:]}); "
                f"if the later one was meant, these rows are an hour early"
            )
        return out


def check_columns(
    mapping: Mapping, available: list[str], file: str, *, shown: list[str] | None = None
) -> None:
    """Raise when the mapping names a column the file does not have.

    The message names the mapping file, the key and the file's columns, which
    is what a person needs to fix a typo. `shown` is the list to print (the
    file's own columns, nested fields as dotted paths) when it differs from
    the resolved `available` ones.
    """
    listed = ", ".join(shown if shown is not None else available) or "(none)"
    for target, spec in mapping.columns.items():
        needed = [list(spec.sources)] if spec.sources else []
        needed += [[c] for c in spec.hash if c not in _SPECIAL]
        if spec.template:
            needed += [[c] for c in _template_fields(spec.template) if c not in _SPECIAL]
        for group in needed:
            if not any(c in available for c in group) and not spec.optional:
                shown = group[0] if len(group) == 1 else " or ".join(group)
                raise MappingError(
                    f"{mapping.origin}: [columns] {target}: column {shown!r} not found in "
                    f"{file}; available columns: {listed}"
                )
    if mapping.key is not None:
        for c in mapping.key.hash:
            if c not in _SPECIAL and c not in available:
                raise MappingError(
                    f"{mapping.origin}: [key] hash: column {c!r} not found in {file}; "
                    f"available columns: {listed}"
                )


def apply_mapping(
    mapping: Mapping, src: pl.DataFrame, *, file: str, folds: FoldTracker | None = None
) -> Applied:
    """Compute the lake columns from a frame of source columns.

    `src` holds one column per source path (as named in the mapping) plus
    `__line`, `_location` and `_raw`. Values a transform cannot convert (a
    non-number to scale, a time that does not match `format`) make the row a
    reject naming the column, the source column and the value. `folds` carries
    the file's pass through DST fall-back hours from the previous chunks (one
    tracker per file, chunks in file order); without one, `src` is taken as the
    whole file and its warnings come back in `Applied.warnings`.
    """
    own_folds = folds is None
    tracker = FoldTracker(file) if folds is None else folds
    schema = schema_for(mapping.table)
    available = [c for c in src.columns if c not in (LINE_COLUMN, "_location", "_raw")]
    exprs: dict[str, pl.Expr] = {}
    errors: list[pl.Expr] = []
    hashed: dict[str, pl.Expr] = {}  # target -> text to hash (done in Python)

    def text_of(col: str) -> pl.Expr:
        if col == "line":
            return pl.col(LINE_COLUMN).cast(pl.String)
        if col == "file":
            return pl.lit(file)
        if col == "stem":
            return pl.lit(Path(file).stem)
        return _as_text(pl.col(col), src.schema[col]).fill_null("\x00")

    for target, spec in mapping.columns.items():
        dtype = schema.columns[target]
        if spec.value is not None:
            expr = pl.lit(substitute(spec.value, file))
        elif spec.template is not None:
            parts: list[pl.Expr] = []
            for lit, fld, _, _ in string.Formatter().parse(spec.template):
                if lit:
                    parts.append(pl.lit(lit))
                if fld:
                    if fld not in _SPECIAL and fld not in available:
                        parts.append(pl.lit(None, dtype=pl.String))
                    else:
                        parts.append(text_of(fld).replace("\x00", None))
            expr = pl.concat_str(parts) if parts else pl.lit("")
        elif spec.hash:
            cols = [c for c in spec.hash if c in _SPECIAL or c in available]
            hashed[target] = pl.concat_str([text_of(c) for c in cols], separator="\x1f")
            continue
        else:
            present = [s for s in spec.sources if s in available]
            if not present:
                if spec.required:
                    errors.append(_missing_error(spec, list(spec.sources)))
                exprs[target] = (
                    pl.lit(spec.default).cast(dtype)
                    if spec.default is not None
                    else (pl.lit(None, dtype=dtype))
                )
                continue
            kinds = {src.schema[s] for s in present}
            if len(kinds) == 1:
                expr = pl.coalesce([pl.col(s) for s in present])
                sdtype = next(iter(kinds))
            else:
                expr = pl.coalesce([_as_text(pl.col(s), src.schema[s]) for s in present])
                sdtype = pl.String
            label = f"{target} (from {' or '.join(present)})"
            raw_text = _as_text(expr, sdtype)
            if spec.map:
                expr = raw_text.replace_strict(
                    list(spec.map), list(spec.map.values()), default=raw_text
                )
                sdtype = pl.String
            if spec.default is not None:
                expr = expr.fill_null(pl.lit(spec.default))
            if spec.required:
                errors.append(pl.when(expr.is_null()).then(_missing_error(spec, present)))
            zoned = _zoned_naive(spec, sdtype)
            if isinstance(dtype, pl.Datetime) and (spec.format or spec.unit or zoned):
                local: pl.Expr | None = None
                ambiguous: pl.Expr | str = "earliest"
                if _is_local_format(spec) or zoned:
                    # parse once; the repeated DST hour needs the file's order (a pass in
                    # row order), not a per-value rule
                    name = f"__local_{target}"
                    src = src.with_columns(_local_time(expr, spec, sdtype).alias(name))
                    local = pl.col(name)
                    choice = tracker.choose(target, spec.timezone, src[name], src[LINE_COLUMN])
                    if choice is not None:
                        src = src.with_columns(choice.alias(f"__ambiguous_{target}"))
                        ambiguous = pl.col(f"__ambiguous_{target}")
                expr, bad, gap = _timestamp(expr, sdtype, spec, local=local, ambiguous=ambiguous)
                errors.append(
                    pl.when(gap)
                    .then(
                        pl.format(
                            "field '{}': '{}' is a local time that does not exist in {} (the "
                            "clocks skip it for daylight saving): expected a time that does",
                            pl.lit(label),
                            raw_text.str.slice(0, 60),
                            pl.lit(spec.timezone),
                        )
                    )
                    .when(bad)
                    .then(
                        pl.format(
                            "field '{}': expected {}, got '{}'",
                            pl.lit(label),
                            pl.lit(
                                f"a time like {spec.format!r}"
                                if spec.format
                                else f"a number of {spec.unit}"
                                if spec.unit
                                else "an ISO-8601 time (read in "
                                f"{spec.timezone} when it has no offset)"
                            ),
                            raw_text.str.slice(0, 60),
                        )
                    )
                )
            elif spec.scale is not None:
                num = (
                    expr.cast(pl.Float64, strict=False)
                    if sdtype != pl.String
                    else (expr.str.strip_chars().cast(pl.Float64, strict=False))
                )
                bad = num.is_null() & expr.is_not_null()
                errors.append(
                    pl.when(bad).then(
                        pl.format(
                            "field '{}': expected a number to scale, got '{}'",
                            pl.lit(label),
                            raw_text.str.slice(0, 60),
                        )
                    )
                )
                expr = num * spec.scale
                if dtype.is_integer():
                    expr = expr.round(0)
        exprs[target] = expr.alias(target)

    out = src.select(
        *[e.alias(t) for t, e in exprs.items()],
        *[e.alias(f"__hash_{t}") for t, e in hashed.items()],
        (pl.coalesce(errors) if errors else pl.lit(None, dtype=pl.String)).alias("__error"),
        pl.col("_location"),
        pl.col("_raw"),
        pl.col(LINE_COLUMN),
    )
    for target in hashed:
        out = out.with_columns(
            pl.Series(target, stable_hash(out[f"__hash_{target}"]), dtype=pl.String)
        ).drop(f"__hash_{target}")
    key_col = mapping.key_column
    if key_col not in mapping.columns:
        out = out.with_columns(_key_series(mapping, src, out, file, key_col, text_of, available))
    bad = out["__error"].is_not_null()
    rejects = out.filter(bad).select(
        pl.col("_location").alias("location"),
        pl.col("_raw").alias("raw"),
        pl.col("__error").alias("reason"),
    )
    good = out.filter(~bad).drop("__error", LINE_COLUMN)
    if mapping.source is not None and "source" not in mapping.columns:
        good = good.with_columns(pl.lit(substitute(mapping.source, file)).alias("source"))
    return Applied(good, rejects, tracker.warnings() if own_folds else [])


def _missing_error(spec: ColumnSpec, sources: list[str]) -> pl.Expr:
    """The reason for a row without a value in a `required` column."""
    return pl.lit(
        f"field '{spec.target} (from {' or '.join(sources)})': missing or null; expected a "
        "value (the mapping marks it required)"
    )


def _key_series(
    mapping: Mapping,
    src: pl.DataFrame,
    out: pl.DataFrame,
    file: str,
    key_col: str,
    text_of: Any,
    available: list[str],
) -> pl.Series:
    """The deterministic id: prefix + stable hash of the chosen columns (and the line).

    Without a [key] section every mapped source column is hashed, so the id
    depends only on the row's content and position, never on when it was read.
    """
    key = mapping.key or KeySpec(tuple(available), True, f"{mapping.name}-")
    cols = [c for c in key.hash if c in _SPECIAL or c in available]
    if key.line and "line" not in cols:
        cols.append("line")
    text = src.select(
        pl.concat_str([text_of(c) for c in cols], separator="\x1f").alias("t")
    ).to_series()
    prefix = substitute(key.prefix, file)
    return pl.Series(key_col, [prefix + h for h in stable_hash(text)], dtype=pl.String)


def _is_local_format(spec: ColumnSpec) -> bool:
    """A `format` without an offset: wall-clock times in `spec.timezone`."""
    return bool(spec.format) and not any(
        d in (spec.format or "") for d in ("%z", "%#z", "%Z", "%:z")
    )


_NAIVE_FORMATS = (
    "%Y-%m-%dT%H:%M:%S%.f",
    "%Y-%m-%d %H:%M:%S%.f",
    "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H:%M",
    "%Y-%m-%d",
)
"""Spellings of a time without an offset that a `timezone` without `format` reads as local."""


def _zoned_naive(spec: ColumnSpec, sdtype: pl.DataType) -> bool:
    """A `timezone` without `format`/`unit`: naive times in the data are read in that zone.

    Without this the zone was ignored and naive times loaded as UTC. Times with an
    offset keep it (the data says which instant it is); epoch numbers are UTC.
    """
    if spec.format or spec.unit or spec.timezone in _NO_DST:
        return False
    return sdtype in (pl.String, pl.Date) or isinstance(sdtype, pl.Datetime)


def _local_time(expr: pl.Expr, spec: ColumnSpec, sdtype: pl.DataType = pl.String) -> pl.Expr:
    """The wall-clock (naive) time of each value; null where it has an offset or no time."""
    if spec.format:
        return (
            expr.cast(pl.String)
            .str.strip_chars()
            .str.strptime(pl.Datetime("us"), spec.format, strict=False)
        )
    if isinstance(sdtype, pl.Datetime):
        if sdtype.time_zone is not None:
            return pl.lit(None, dtype=pl.Datetime("us"))
        return expr.dt.cast_time_unit("us")
    if sdtype == pl.Date:
        return expr.cast(pl.Datetime("us"))
    text = expr.cast(pl.String).str.strip_chars()
    return pl.coalesce(
        [text.str.strptime(pl.Datetime("us"), f, strict=False) for f in _NAIVE_FORMATS]
    )


def _as_utc(expr: pl.Expr, sdtype: pl.DataType) -> pl.Expr:
    """Values read as the lake reads them (offsets, epoch numbers): for times with an offset."""
    utc = pl.Datetime("us", "UTC")
    if isinstance(sdtype, pl.Datetime):
        if sdtype.time_zone is None:
            return pl.lit(None, dtype=utc)
        return expr.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
    if sdtype == pl.Date:
        return pl.lit(None, dtype=utc)
    return expr.cast(pl.String).map_batches(lambda s: coerce(s, utc), return_dtype=utc)


def _timestamp(
    expr: pl.Expr,
    sdtype: pl.DataType,
    spec: ColumnSpec,
    *,
    local: pl.Expr | None = None,
    ambiguous: pl.Expr | str = "earliest",
) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """Convert per the spec; returns (UTC timestamp expr, expr flagging bad values, expr
    flagging local times that read but do not exist in the time zone: a DST gap, which
    is no format error and must not be reported as one). `local` is the already parsed
    wall-clock time and `ambiguous` the per-row choice in a repeated hour
    (`FoldTracker.choose`)."""
    if not spec.format and not spec.unit:  # `timezone` alone (`_zoned_naive`)
        local = _local_time(expr, spec, sdtype) if local is None else local
        zoned = local.dt.replace_time_zone(
            spec.timezone, ambiguous=ambiguous, non_existent="null"
        ).dt.convert_time_zone("UTC")
        ts = pl.when(local.is_not_null()).then(zoned).otherwise(_as_utc(expr, sdtype))
        return ts, ts.is_null() & expr.is_not_null(), zoned.is_null() & local.is_not_null()
    if spec.format:
        if not _is_local_format(spec):
            text = expr.cast(pl.String).str.strip_chars()
            ts = text.str.strptime(pl.Datetime("us", "UTC"), spec.format, strict=False)
            return ts, ts.is_null() & expr.is_not_null(), pl.lit(False)
        local = _local_time(expr, spec) if local is None else local
        ts = local.dt.replace_time_zone(
            spec.timezone, ambiguous=ambiguous, non_existent="null"
        ).dt.convert_time_zone("UTC")
        return ts, ts.is_null() & expr.is_not_null(), ts.is_null() & local.is_not_null()
    num = (
        expr.str.strip_chars().cast(pl.Float64, strict=False)
        if sdtype == pl.String
        else expr.cast(pl.Float64, strict=False)
    )
    us = (num * _UNIT_US[spec.unit or "s"]).round(0).cast(pl.Int64, strict=False)
    if spec.relative_to is not None:
        base_us = int(spec.relative_to.timestamp() * 1_000_000)
        us = us + base_us
    ts = us.cast(pl.Datetime("us")).dt.replace_time_zone("UTC")
    return ts, ts.is_null() & expr.is_not_null(), pl.lit(False)
