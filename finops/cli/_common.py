"""Shared CLI helpers: lake option, output formats, clean error exits."""

from __future__ import annotations

import contextlib
import json
import math
import shlex
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer

if TYPE_CHECKING:
    import duckdb

LakeOption = Annotated[
    Path | None,
    typer.Option(
        "--lake", help="Lake folder (default: $FINOPS_LAKE or data/lake of this project)."
    ),
]


def resolve_lake(lake: Path | None) -> Path:
    """The lake folder asked for (or the default); a file in its place is an error,
    since writing there fails half-way and reading it shows an empty lake."""
    from finops.db import default_lake_path

    path = lake if lake is not None else default_lake_path()
    if path.exists() and not path.is_dir():
        fail(f"{path}: not a lake folder (it is a file); give --lake a folder")
    return path


def existing_lake(lake: Path | None) -> Path:
    """The lake folder asked for; a missing one is an error, not an empty answer."""
    path = resolve_lake(lake)
    if not path.exists():
        fail(f"{path}: no lake here (run `finops demo` or `finops collect` first)")
    return path


def connect_lake(lake: Path | None) -> duckdb.DuckDBPyConnection:
    """`finops.connect()` for a command: a missing lake, a bad price catalog
    ($FINOPS_PRICES) or an unreadable lake file is one `error:` line, never a traceback."""
    import finops

    path = existing_lake(lake)
    with price_catalog_errors():
        return finops.connect(path)


@contextlib.contextmanager
def price_catalog_errors() -> Iterator[None]:
    """Turn a bad price catalog (a missing file, column or price) into one error line,
    and a lake file that cannot be read too: both are inputs every `finops.connect()`
    opens, so each command that connects wraps it in this."""
    from finops.lake import LakeFileError
    from finops.prices import PriceCatalogError

    try:
        yield
    except PriceCatalogError as exc:
        fail(str(exc))
    except LakeFileError as exc:  # the lake's data, not the command line: exit 1
        fail(str(exc), code=1)


def lake_flag(lake: Path | None) -> str:
    """` --lake <path>` for a hint line, when the lake is not the default one."""
    from finops.db import default_lake_path

    path = resolve_lake(lake)
    if path.resolve() == default_lake_path().resolve():
        return ""
    return f" --lake {shlex.quote(str(path))}"


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear line to stderr and exit (no traceback for user errors)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def print_frame(
    df: Any,
    fmt: str = "table",
    *,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    cells: dict[str, Callable[[Any], str]] | None = None,
    missing: str = "",
) -> None:
    """Print a Polars frame as a rich table, CSV or JSON rows.

    JSON writes NaN and ±inf as null (strict JSON has neither). For the table only,
    `headers` renames columns, `cells` formats a column's values
    (money with cents, shares as percentages) and `missing` shows a null ("n/a" where
    null means unknown); CSV and JSON keep names and raw values. The table is as wide as
    its numbers need (at least 120 columns): a number is never cut to "12345…" or folded;
    text wraps in its cell.
    """
    import polars as pl

    if fmt == "csv":
        # CSV has no nested values: a list or struct column (list(...), SHOW ALL TABLES)
        # is written as JSON text in its cell, not a traceback
        nested = [c for c, t in zip(df.columns, df.dtypes, strict=True) if t.is_nested()]
        if nested:
            df = df.with_columns(
                pl.Series(
                    c,
                    [
                        None if v is None else json.dumps(finite(v), default=str)
                        for v in df[c].to_list()
                    ],
                    dtype=pl.String,
                )
                for c in nested
            )
        sys.stdout.write(df.write_csv())
        return
    if fmt == "json":
        typer.echo(json.dumps(finite(df.to_dicts()), default=str, indent=2))
        return
    if fmt != "table":
        fail(f"--format must be table, csv or json, got {fmt!r}")
    from rich.console import Console
    from rich.table import Table

    headers, cells = headers or {}, cells or {}
    fmts = [cells.get(c, _cell) for c in df.columns]
    rows = [
        [missing if v is None else f(v) for f, v in zip(fmts, row, strict=True)]
        for row in df.iter_rows()
    ]
    table = Table(title=title, show_lines=False)
    widths = []
    for i, (name, dtype) in enumerate(zip(df.columns, df.dtypes, strict=True)):
        head = headers.get(name, name)
        numeric = dtype.is_numeric() or name in cells  # a formatted number ($1,234.56, 5.0%)
        # numbers stay whole on one line; text (names, error messages) wraps in its cell
        table.add_column(head, justify="right" if numeric else "left", no_wrap=numeric)
        longest = max([len(head), *(len(r[i]) for r in rows)])
        widths.append(longest if numeric else min(longest, 40))
    for row in rows:
        table.add_row(*row)
    needed = sum(widths) + 3 * len(widths) + 1  # cells, their padding and borders
    Console(width=max(120, Console().width, needed)).print(table)
    if isinstance(df, pl.DataFrame) and df.height == 0:
        typer.echo("(no rows)")


def finite(v: Any) -> Any:
    """A value for JSON with NaN and ±inf as null: `NaN` and `Infinity` are not JSON,
    and strict parsers (jq, JSON.parse, serde) reject the whole document for one."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: finite(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [finite(x) for x in v]
    return v


def _cell(v: Any) -> str:
    from rich.markup import escape

    if v is None:
        return ""
    if isinstance(v, float):
        # 4 significant digits below 1,000; cents above (a bill of 6,249.60 is not 6,250)
        return f"{v:,.4g}" if abs(v) < 1000 else f"{v:,.2f}"
    return escape(str(v))  # a value like "[columns]" is text, not rich markup
