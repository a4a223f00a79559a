"""`finops report`: the weekly cost report (HTML, Markdown summary, JSON, FOCUS 1.3 export)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from finops.cli._common import LakeOption, fail, price_catalog_errors, resolve_lake


def report(
    week: Annotated[str, typer.Option(help="ISO week, e.g. 2026-W47.")],
    lake: LakeOption = None,
    out: Annotated[Path, typer.Option(help="Folder for the report files.")] = Path("."),
    compare_to: Annotated[
        str | None, typer.Option(help="Week to compare with (default: the week before).")
    ] = None,
    router: Annotated[
        Path | None, typer.Option(help="Router artifact folder: adds quality and drift.")
    ] = None,
    no_growth: Annotated[
        bool, typer.Option("--no-growth", help="Skip the growth/autoscaling simulation.")
    ] = False,
    allow_empty: Annotated[
        bool,
        typer.Option(
            "--allow-empty",
            help="Write a report (all n/a) for a week outside the lake's data instead of "
            "failing: by default a mistyped week is an error, not an empty report.",
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Print step timings.")] = False,
) -> None:
    """Write report-<week>.html (self-contained, inline SVG), summary-<week>.md,
    report-<week>.json and focus-<week>.csv/.parquet/.metadata.json (FOCUS 1.3 rows)."""
    from finops.costs import CostError
    from finops.report.build import build_report
    from finops.report.figures import ReportError

    try:
        with price_catalog_errors():
            paths = build_report(
                resolve_lake(lake),
                week,
                out,
                compare_to=compare_to,
                router=router,
                growth=not no_growth,
                log=(lambda m: typer.echo(m, err=True)) if verbose else None,
                allow_empty=allow_empty,
            )
    except (ReportError, CostError) as exc:
        fail(str(exc))
        return
    for p in (paths.html, paths.summary, paths.json, paths.focus_csv, paths.focus_parquet,
              paths.focus_metadata):  # fmt: skip
        if p is not None:
            typer.echo(str(p))
    typer.echo(f"report built in {paths.seconds:.1f}s", err=True)


def register(app: typer.Typer) -> None:
    app.command("report")(report)
