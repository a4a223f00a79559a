"""`finops.connect()`: a DuckDB connection whose views read the lake.

Layers follow dbt's habit: `raw` (the Parquet files as written), `clean`
(deduplicated, counter resets handled), `marts` (what analysts and reports
read). The search path puts marts and clean first, so `SELECT * FROM
requests` reads the clean view. Named SQL lives in `finops/sql/<layer>/`,
applied in file-name order; each file is plain DuckDB SQL.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import duckdb
import polars as pl

from finops.prices import load_prices
from finops.schemas import TABLES, TableSchema

SQL_DIR = Path(__file__).parent / "sql"
LAYERS = ("clean", "marts")
PROJECT_ROOT = Path(__file__).resolve().parent.parent

_DUCK_TYPES = {
    pl.String: "VARCHAR",
    pl.Int32: "INTEGER",
    pl.Int64: "BIGINT",
    pl.Float64: "DOUBLE",
    pl.Boolean: "BOOLEAN",
}


def default_lake_path() -> Path:
    """`$FINOPS_LAKE`, else `data/lake` in the project (works from notebooks/ too)."""
    env = os.environ.get("FINOPS_LAKE")
    if env:
        return Path(env)
    cwd = Path.cwd()
    for base in (cwd, *cwd.parents):
        if (base / "data" / "lake").is_dir() or (
            (base / "pyproject.toml").is_file() and (base / "finops").is_dir()
        ):
            return base / "data" / "lake"
    return PROJECT_ROOT / "data" / "lake"


def _duck_type(dtype: pl.DataType) -> str:
    if isinstance(dtype, pl.Datetime):
        return "TIMESTAMPTZ"
    return _DUCK_TYPES[dtype]  # type: ignore[index]


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _raw_view_sql(db: duckdb.DuckDBPyConnection, lake: Path, schema: TableSchema) -> str:
    """The typed raw view of one table: every schema column, NULL where no file has it.

    A lake written before a column was added (an older finops) has files without it;
    casting a column no file has would fail the whole view, so such a column reads as
    NULL until files carrying it arrive (and `refresh` or a new connection sees them).
    """
    files = sorted((lake / schema.name).glob("date=*/*.parquet"))
    if not files:
        nulls = ", ".join(
            f'CAST(NULL AS {_duck_type(t)}) AS "{c}"' for c, t in schema.columns.items()
        )
        return (
            f"CREATE OR REPLACE VIEW raw.{schema.name} AS SELECT {nulls}, "
            "CAST(NULL AS VARCHAR) AS _file WHERE false"
        )
    glob = str(lake / schema.name / "date=*" / "*.parquet").replace("'", "''")
    source = (
        f"read_parquet('{glob}', union_by_name = true, hive_partitioning = false, filename = true)"
    )
    try:
        described = db.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
    except duckdb.Error as exc:  # a file cut short or not Parquet: name it, not DuckDB's words
        _refuse_unreadable(files, schema, exc)
        raise
    present = {row[0]: row[1] for row in described}
    if any(c in present and not _reads_as(present[c], t) for c, t in schema.columns.items()):
        # a hand-placed file with text where a number belongs fails every query later,
        # naming no file ("Could not convert string"): refuse now, naming the file
        _refuse_unreadable(files, schema, None)
    cols = ", ".join(
        f"CAST({_quoted(c) if c in present else 'NULL'} AS {_duck_type(t)}) AS {_quoted(c)}"
        for c, t in schema.columns.items()
    )
    # `_file`: the lake file each row came from; its name says when it was written
    # (finops.lake), which is how the clean views keep the latest of rows sharing a key
    return (
        f"CREATE OR REPLACE VIEW raw.{schema.name} AS SELECT {cols}, "
        f"parse_filename(filename) AS _file FROM {source}"
    )


_INTEGERS = frozenset(
    {"TINYINT", "SMALLINT", "INTEGER", "BIGINT", "HUGEINT"}
    | {"UTINYINT", "USMALLINT", "UINTEGER", "UBIGINT", "UHUGEINT"}
)


def _reads_as(found: str, want: pl.DataType) -> bool:
    """Whether DuckDB's type for a column (all files together) casts to the schema's
    type without a guess; the lake's own files always do (`lake._fits`, per file)."""
    if found in ('"NULL"', "NULL"):
        return True
    if want == pl.String:
        return not found.endswith("]") and not found.startswith(("STRUCT", "MAP", "UNION"))
    if want in (pl.Int32, pl.Int64):
        return found in _INTEGERS
    if want == pl.Float64:
        return found in _INTEGERS or found in ("FLOAT", "DOUBLE") or found.startswith("DECIMAL")
    if want == pl.Boolean:
        return found == "BOOLEAN"
    if isinstance(want, pl.Datetime):
        return found.startswith("TIMESTAMP")
    return True


def _refuse_unreadable(files: list[Path], schema: TableSchema, exc: Exception | None) -> None:
    """Raise LakeFileError naming the table's files that cannot be read, if any.

    Checked only once DuckDB has failed or found a column of another type, so a
    sound lake pays nothing for it.
    """
    from finops.lake import LakeFileError, unreadable_files

    bad = unreadable_files(files, schema)
    if bad:
        raise LakeFileError(bad) from exc


def sql_files() -> list[Path]:
    """The named SQL files, in the order they are applied."""
    return [f for layer in LAYERS for f in sorted((SQL_DIR / layer).glob("*.sql"))]


def refresh(db: duckdb.DuckDBPyConnection, lake: str | os.PathLike[str] | None = None) -> None:
    """(Re)create every view; call after a table gets its first file.

    Views over a table that already had files see new files on every query;
    a table that had none at connect time is an empty typed view until this.
    """
    _refresh_views(db, Path(lake) if lake is not None else lake_dir(db))


def connect(
    lake: str | os.PathLike[str] | None = None,
    *,
    prices: str | os.PathLike[str] | None = None,
    database: str = ":memory:",
    threads: int | None = None,
) -> duckdb.DuckDBPyConnection:
    """Open DuckDB with raw/clean/marts views over the lake and `ref.prices`.

    >>> db = finops.connect()                  # data/lake of this project
    >>> db.sql("SELECT * FROM marts.tenant_daily").pl()

    A lake folder that does not exist raises FileNotFoundError: a mistyped path read
    as an empty lake, every figure zero (an existing empty folder is an empty lake).
    """
    lake_path = Path(lake) if lake is not None else default_lake_path()
    if not lake_path.is_dir():
        what = "is a file, not a lake folder" if lake_path.exists() else "no lake here"
        raise FileNotFoundError(
            f"{lake_path}: {what} (`finops demo` or `finops collect` writes one; "
            "$FINOPS_LAKE or finops.connect(PATH) names another)"
        )
    db = duckdb.connect(database)
    db.execute("SET TimeZone = 'UTC'")
    # DuckDB's progress bar writes into CLI output and notebook cells alike.
    # (inside a Jupyter kernel without ipywidgets DuckDB refuses to change it: it stays on)
    with contextlib.suppress(duckdb.InvalidInputException):
        db.execute("SET enable_progress_bar = false")
    if threads:
        db.execute(f"SET threads = {int(threads)}")
    db.execute("SET VARIABLE finops_lake_dir = ?", [str(lake_path)])
    for schema in ("raw", "clean", "marts", "ref"):
        db.execute(f"CREATE SCHEMA IF NOT EXISTS {schema}")
    db.register("__prices", load_prices(prices).to_arrow())
    db.execute("CREATE OR REPLACE TABLE ref.prices AS SELECT * FROM __prices")
    db.unregister("__prices")
    _refresh_views(db, lake_path)
    db.execute("SET search_path = 'marts,clean,ref,main'")
    return db


def _refresh_views(db: duckdb.DuckDBPyConnection, lake_path: Path) -> None:
    for schema in TABLES.values():
        db.execute(_raw_view_sql(db, lake_path, schema))
    for path in sql_files():
        try:
            db.execute(path.read_text())
        except duckdb.Error as exc:
            raise RuntimeError(f"{path.relative_to(SQL_DIR.parent)}: {exc}") from exc


def lake_dir(db: duckdb.DuckDBPyConnection) -> Path:
    """The lake folder a connection from `connect()` reads."""
    return Path(db.execute("SELECT getvariable('finops_lake_dir')").fetchone()[0])  # type: ignore[index]
