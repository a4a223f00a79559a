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
null instead of an error), `value` (a constant; `{file}` and `{stem}` are
replaced by the file name and stem), `template` (`"{colA}-{colB}"`, plus
`{line}`, `{file}`, `{stem}`), `hash` (a list of source columns -> a stable
hex digest), `scale` (multiply numbers, e.g. 1000 for s -> ms), `map` (value
-> value), `default` (fills nulls), and for timestamps `format` (strftime
pattern), `timezone` (for naive times), `unit` (`s|ms|us|ns` epoch numbers)
and `relative_to` (an ISO base time for offsets counted in `unit`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import string
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

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
}
_UNIT_US = {"s": 1_000_000, "ms": 1_000, "us": 1, "ns": 0.001}
_SPECIAL = {"line", "file", "stem"}


class MappingError(ValueError):
    """A mapping file that is wrong, or does not fit the file it is applied to."""


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
        if set(k) - {"hash", "line", "prefix"}:
            raise MappingError(
                f"{where}: unknown key(s) {sorted(set(k) - {'hash', 'line', 'prefix'})}"
            )
        hash_cols = k.get("hash", [])
        if not isinstance(hash_cols, list) or not all(isinstance(c, str) for c in hash_cols):
            raise MappingError(f"{where} hash: expected a list of column names")
        key = KeySpec(tuple(hash_cols), bool(k.get("line", True)), str(k.get("prefix", "")))
    return Mapping(
        name=str(meta.get("name", path.stem)),
        origin=origin,
        table=table,
        format=fmt,
        source=meta.get("source"),
        description=str(meta.get("description", "")),
        columns=columns,
        key=key,
        csv_separator=str(meta.get("csv_separator", ",")),
    )


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
    src = spec.get("from", ())
    sources = (src,) if isinstance(src, str) else tuple(src)
    if not all(isinstance(s, str) for s in sources):
        raise MappingError(f"{where} from: expected a column name or a list of them")
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
    if scale is not None and not isinstance(scale, int | float):
        raise MappingError(f"{where} scale: expected a number, got {scale!r}")
    hash_cols = spec.get("hash", ())
    if isinstance(hash_cols, str):
        hash_cols = (hash_cols,)
    mapping = spec.get("map")
    if mapping is not None and not isinstance(mapping, dict):
        raise MappingError(f"{where} map: expected a table of value = replacement")
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


def apply_mapping(mapping: Mapping, src: pl.DataFrame, *, file: str) -> Applied:
    """Compute the lake columns from a frame of source columns.

    `src` holds one column per source path (as named in the mapping) plus
    `__line`, `_location` and `_raw`. Values a transform cannot convert (a
    non-number to scale, a time that does not match `format`) make the row a
    reject naming the column, the source column and the value.
    """
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
            if isinstance(dtype, pl.Datetime) and (spec.format or spec.unit):
                expr, bad, gap = _timestamp(expr, sdtype, spec)
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
    return Applied(good, rejects)


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


def _timestamp(
    expr: pl.Expr, sdtype: pl.DataType, spec: ColumnSpec
) -> tuple[pl.Expr, pl.Expr, pl.Expr]:
    """Convert per the spec; returns (UTC timestamp expr, expr flagging bad values, expr
    flagging local times that read but do not exist in the time zone: a DST gap, which
    is no format error and must not be reported as one)."""
    if spec.format:
        text = expr.cast(pl.String).str.strip_chars()
        has_tz = any(d in spec.format for d in ("%z", "%#z", "%Z", "%:z"))
        if has_tz:
            ts = text.str.strptime(pl.Datetime("us", "UTC"), spec.format, strict=False)
            return ts, ts.is_null() & expr.is_not_null(), pl.lit(False)
        local = text.str.strptime(pl.Datetime("us"), spec.format, strict=False)
        ts = local.dt.replace_time_zone(
            spec.timezone, ambiguous="earliest", non_existent="null"
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
