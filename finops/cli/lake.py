"""`finops lake info|compact` and `finops sql`: look at the lake without Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from finops.cli._common import LakeOption, connect_lake, existing_lake, fail, print_frame

if TYPE_CHECKING:
    import polars as pl

lake_app = typer.Typer(help="Inspect and maintain the Parquet lake.", no_args_is_help=True)


@lake_app.command("info")
def info(
    lake: LakeOption = None, format: str = typer.Option("table", "--format", help="table|csv|json")
) -> None:
    """Tables, rows, files, bytes and the date range each covers.

    Files that cannot be read (cut short, not Parquet, a column of another type) are
    counted under `unreadable` and named on stderr, one `warning:` line each.
    """
    from finops.lake import Lake

    path = existing_lake(lake)
    the_lake = Lake(path)
    frame = the_lake.info()
    print_frame(frame, format, title=f"lake {path}")
    if frame["unreadable"].sum():
        _warn_unreadable(the_lake.unreadable(), "queries over the lake refuse to run")


def _warn_unreadable(bad: list[tuple[Any, str]], effect: str) -> None:
    for file, why in bad:
        typer.echo(f"warning: {file}: {why}", err=True)
    typer.echo(
        f"warning: {len(bad)} lake file(s) cannot be read and {effect}; move them out of "
        "the lake folder (keep them if they may be repaired or written again)",
        err=True,
    )


@lake_app.command("compact")
def compact(
    lake: LakeOption = None,
    table: Annotated[str | None, typer.Option(help="Only this table.")] = None,
) -> None:
    """Merge each partition's small files into one; query results stay the same.

    A file that cannot be read is left as it is (neither merged nor deleted) and named
    on stderr; the command then exits 1.
    """
    import polars as pl

    from finops.lake import Lake
    from finops.schemas import TABLES

    if table is not None and table not in TABLES:
        fail(f"--table: unknown table {table!r}; expected one of {sorted(TABLES)}")
    path = existing_lake(lake)
    results = Lake(path).compact(table)
    rows = [{**r.__dict__, "unreadable": len(r.unreadable)} for r in results]
    print_frame(pl.DataFrame(rows), "table", title="compaction")
    bad = [b for r in results for b in r.unreadable]
    if bad:
        _warn_unreadable(bad, "were left as they are")
        raise typer.Exit(1)


def sql(
    query: Annotated[str, typer.Argument(help="SQL over the lake's views (raw., clean., marts.)")],
    lake: LakeOption = None,
    format: str = typer.Option(
        "table", "--format", help="table|csv|json (JSON writes NaN and ±inf as null)"
    ),
    limit: int = typer.Option(1000, help="At most this many rows in table format (0: all)."),
) -> None:
    """Run SQL against the lake, e.g. finops sql "SELECT * FROM marts.tenant_daily"."""
    import duckdb

    import finops.costs as fc

    db = connect_lake(lake)
    try:  # the marts assign GPUs to tiers as `finops costs` does, $FINOPS_DEPLOYMENTS included
        fc.ensure_deployments(db)
    except fc.CostError as exc:
        fail(str(exc))
    try:
        rel = db.sql(query)
        if rel is None:  # blank, or comments only: DuckDB has nothing to run
            fail('SQL: no statement to run (expected e.g. "SELECT * FROM requests LIMIT 5")')
        df = _frame(rel)
    except duckdb.Error as exc:
        fail(f"SQL error: {exc}")
    if format == "table" and limit and df.height > limit:
        typer.echo(
            f"(showing {limit} of {df.height} rows; --limit 0 for all or --format csv)", err=True
        )
        df = df.head(limit)
    print_frame(df, format)


def _frame(rel: Any) -> pl.DataFrame:
    """The relation as a Polars frame; INTERVAL columns (`max(ts) - min(ts)`) as text
    such as `02:30:00`, which Polars cannot import from Arrow."""
    if any("INTERVAL" in str(t) for t in rel.types):
        cols = [
            f'CAST("{c}" AS VARCHAR) AS "{c}"' if "INTERVAL" in str(t) else f'"{c}"'
            for c, t in zip([c.replace('"', '""') for c in rel.columns], rel.types, strict=True)
        ]
        rel = rel.project(", ".join(cols))
    return rel.pl()


def register(app: typer.Typer) -> None:
    app.add_typer(lake_app, name="lake")
    app.command("sql")(sql)
