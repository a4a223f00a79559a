"""`finops ingest requests|cache-events|mappings`: load request and cache logs into the lake.

One-shot by default (idempotent: loading a file twice adds nothing); `--follow`
tails files with durable checkpoints under `<lake>/_state/logs`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated, Any

import typer

from finops.cli._common import LakeOption, fail, lake_flag, print_frame, resolve_lake

ingest_app = typer.Typer(
    help="Load request logs (shim JSONL, OpenAI usage, mapped CSV/JSONL/Parquet) and cache "
    "events into the lake.",
    no_args_is_help=True,
)

PROGRESS_MIN_BYTES = 8 * 1024 * 1024

PathsArg = Annotated[
    list[Path],
    typer.Argument(help="Log files (JSONL, CSV, Parquet).", readable=False),
]
MappingOpt = Annotated[
    str | None,
    typer.Option(
        "--mapping",
        "-m",
        help="A mapping TOML file, or a shipped one by name (`finops ingest mappings`). "
        "Default: detect the shim log / OpenAI usage format.",
    ),
]
FollowOpt = Annotated[
    bool, typer.Option("--follow", "-f", help="Keep tailing (growing and rotated files).")
]
FormatOpt = Annotated[str, typer.Option("--format", help="table|json")]
BaseTsOpt = Annotated[
    str | None,
    typer.Option(
        "--base-ts", help="ISO time that relative timestamps count from (e.g. Mooncake traces)."
    ),
]
CheckpointOpt = Annotated[
    Path | None,
    typer.Option(
        "--checkpoint-dir", help="Where --follow keeps positions (default <lake>/_state/logs)."
    ),
]
IntervalOpt = Annotated[
    float, typer.Option("--interval", help="Seconds between polls with --follow.")
]


def _parse_base(base_ts: str | None) -> dt.datetime | None:
    if base_ts is None:
        return None
    try:
        value = dt.datetime.fromisoformat(base_ts)
    except ValueError:
        fail(f"--base-ts: expected an ISO-8601 time like 2025-01-06T00:00:00Z, got {base_ts!r}")
        raise  # unreachable: fail exits
    return value.replace(tzinfo=dt.UTC) if value.tzinfo is None else value


def _recent_rejects(lake_path: Path, since: dt.datetime, labels: set[str], limit: int = 5) -> Any:
    """This run's first few reject reasons, so the user sees *why* without a query."""
    import polars as pl

    files = sorted((lake_path / "rejects").glob("date=*/*.parquet"))
    files = [f for f in files if f.stat().st_mtime >= since.timestamp() - 1]
    if not files:
        return None
    df = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    df = df.filter(
        pl.any_horizontal([pl.col("location").str.starts_with(f"{label}") for label in labels])
    )
    return (
        df.select("location", "reason").unique(maintain_order=True).head(limit)
        if df.height
        else None
    )


def _run(
    kind: str,
    paths: list[Path],
    lake: Path | None,
    mapping: str | None,
    follow: bool,
    fmt: str,
    base_ts: str | None,
    checkpoint_dir: Path | None,
    interval: float,
) -> None:
    import polars as pl

    from collectors.logs import FileReport, LogError, ingest_file
    from collectors.mapping import AmbiguousTimeWarning, MappingError, load_mapping
    from finops.lake import Lake, LakeFileError

    if fmt not in ("table", "json"):
        fail(f"--format must be table or json, got {fmt!r}")
    if not (math.isfinite(interval) and interval > 0):  # 0, <0 or nan: a busy loop
        fail(f"--interval: expected a number of seconds > 0, got {interval}")
    lake_path = resolve_lake(lake)
    store = Lake(lake_path)
    base = _parse_base(base_ts)
    try:
        mapped = load_mapping(mapping) if mapping else None
    except MappingError as exc:
        fail(str(exc))
        return
    if follow:
        _follow(
            kind,
            paths,
            store,
            mapped,
            base,
            checkpoint_dir or lake_path / "_state" / "logs",
            interval,
        )
        return
    started = dt.datetime.now(dt.UTC)
    reports: list[FileReport] = []
    unreadable: list[str] = []
    files, skipped = _skip_open(_expand(paths))
    for path in files:
        try:
            size = path.stat().st_size if path.is_file() else 0
            with warnings.catch_warnings():  # printed from the report's own list
                warnings.simplefilter("ignore", AmbiguousTimeWarning)
                if size >= PROGRESS_MIN_BYTES and fmt == "table":
                    report = _with_progress(path, size, store, kind, mapped, base, ingest_file)
                else:
                    report = ingest_file(path, store, table=kind, mapping=mapped, base_ts=base)
        except LogError as exc:
            unreadable.append(str(exc))
            # failed part way (a truncated archive): what it read before is in exc.report
            reports.append(exc.report or FileReport(path=str(path), error=str(exc)))
            continue
        except MappingError as exc:
            fail(str(exc))
            return
        except LakeFileError as exc:  # a lake file it had to read, not the write, failed
            fail(f"loading {path}: {exc}", code=1)
        except (OSError, pl.exceptions.ComputeError) as exc:
            # disk full, file too large, permissions: what was written stays; a rerun
            # adds only the rest (the lake's keys drop what is already there)
            fail(f"writing to {lake_path} failed while loading {path}: {exc}", code=1)
        reports.append(report)
        for w in report.warnings:
            typer.echo(f"warning: {w}", err=True)
    rows = [
        {
            "file": r.path,
            "mapping": r.mapping,
            "read": r.read,
            "loaded": r.loaded,
            # of the rows loaded, those the lake held already (by key: the lake keeps
            # one copy, so they added nothing) and those it did not
            "new": r.new,
            "already_in_lake": r.already_in_lake,
            "rejected": r.rejected,
            **(
                {
                    "cache_events": r.cache_events,
                    "cache_events_new": r.cache_events - r.cache_events_in_lake,
                    "cache_events_already_in_lake": r.cache_events_in_lake,
                }
                if kind == "requests"
                else {}
            ),
            "ignored_columns": r.ignored_columns,
            "error": r.error,
        }
        for r in reports
    ]
    if skipped:
        typer.echo(
            f"skipped {len(skipped)} file(s) still being written (*.jsonl.open: the shim renames "
            "each to .jsonl when it closes it; reading one now would reject its unfinished last "
            "line and load its records again after the rename). Ingest them once closed, or "
            "use --follow:",
            err=True,
        )
        for p in skipped[:5]:
            typer.echo(f"  {p}", err=True)
        if len(skipped) > 5:
            typer.echo(f"  ... and {len(skipped) - 5} more", err=True)
    if not rows:
        if fmt == "json":
            typer.echo("[]")
        return
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2))
    else:
        df = pl.DataFrame(rows, infer_schema_length=None)
        if df["error"].null_count() == df.height:
            df = df.drop("error")
        if not (df["already_in_lake"] > 0).any():  # all new: `loaded` says it
            df = df.drop("new", "already_in_lake")
        if "cache_events" in df.columns and not (df["cache_events_already_in_lake"] > 0).any():
            df = df.drop("cache_events_new", "cache_events_already_in_lake")
        df = df.drop("ignored_columns")  # said below the table, one line per file
        print_frame(df, "table", title=f"ingest {kind} -> {lake_path}")
        for r in reports:
            message = r.ignored_message()
            if message:
                typer.echo(f"warning: {message}", err=True)
        total_rej = sum(r.rejected for r in reports)
        if total_rej:
            # rejects name each file by its absolute path; shown here as it was typed
            typed = {r.location: r.path for r in reports if r.location}
            sample = _recent_rejects(lake_path, started, set(typed))
            typer.echo(
                f"{total_rej} rejected; each is in the rejects table with its reason:", err=True
            )
            if sample is not None:
                for loc, reason in sample.iter_rows():
                    for full, name in typed.items():
                        if loc.startswith((f"{full}:", f"{full} row ")):
                            loc = name + loc[len(full) :]
                            break
                    typer.echo(f"  {loc}: {reason}", err=True)
            typer.echo(
                '  finops sql "SELECT location, reason FROM rejects ORDER BY ts DESC LIMIT 50"'
                + lake_flag(lake_path),
                err=True,
            )
    for message in unreadable:
        typer.echo(f"error: {message}", err=True)
    if unreadable:
        raise typer.Exit(1)


def _expand(paths: list[Path]) -> list[Path]:
    """Quoted globs (`'logs/requests-*.jsonl'`) expand here, as a shell would. A glob
    that matches only files the shim still writes (`X.jsonl.open`) gives those, so they
    are skipped with the reason instead of 'no such file'."""
    import glob

    out: list[Path] = []
    for p in paths:
        if not p.exists() and glob.has_magic(str(p)):
            matches = sorted(glob.glob(str(p))) or sorted(glob.glob(f"{p}.open"))
            out += [Path(m) for m in matches] if matches else [p]
        else:
            out.append(p)
    return out


def _in_progress(path: Path) -> bool:
    """A request-log file its writer still holds: `X.jsonl.open` (renamed to `X.jsonl`
    when closed) or `X.jsonl.open.<pid>-<token>.claim` (being closed out)."""
    name = path.name
    return name.endswith(".open") or (".jsonl.open." in name and name.endswith(".claim"))


def _skip_open(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(files to read, files skipped because still being written)."""
    keep: list[Path] = []
    skipped: list[Path] = []
    for p in paths:
        (skipped if _in_progress(p) else keep).append(p)
    return keep, skipped


def _with_progress(
    path: Path, size: int, store: Any, kind: str, mapped: Any, base: Any, ingest_file: Any
) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task(path.name, total=size)
        return ingest_file(
            path,
            store,
            table=kind,
            mapping=mapped,
            base_ts=base,
            progress=lambda done, total: bar.update(task, completed=done),
        )


def _follow(
    kind: str,
    paths: list[Path],
    store: Any,
    mapped: Any,
    base: Any,
    checkpoint_dir: Path,
    interval: float,
) -> None:
    """Tail until SIGTERM/SIGINT; each poll's batch is written, then its checkpoint."""
    import polars as pl

    from collectors.checkpoint import CheckpointError
    from collectors.logs import LogSource
    from collectors.mapping import MappingError
    from finops.lake import LakeFileError

    try:
        sources = [
            LogSource(p, store, checkpoint_dir, mapped, table=kind, base_ts=base) for p in paths
        ]
    except CheckpointError as exc:
        fail(str(exc))
    stopping = False

    def _stop(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    totals = {"read": 0, "loaded": 0, "rejected": 0}
    typer.echo(
        f"following {len(sources)} path(s) into {store.path} (checkpoints: {checkpoint_dir})",
        err=True,
    )
    seen_errors: set[str] = set()
    while not stopping:
        for src in sources:
            try:
                res = src.poll()
            except MappingError as exc:
                fail(str(exc))
                return
            except LakeFileError as exc:
                fail(f"{exc}; stopped", code=1)
            except (OSError, pl.exceptions.ComputeError) as exc:
                # each batch's checkpoint follows its write: a restart resumes from here
                fail(f"writing to {store.path} failed: {exc}; stopped", code=1)
            for err in src.errors:
                if err not in seen_errors:
                    typer.echo(f"warning: {err}", err=True)
                    seen_errors.add(err)
            if res.read:
                totals["read"] += res.read
                totals["loaded"] += res.loaded
                totals["rejected"] += res.rejected
                stamp = dt.datetime.now(dt.UTC).strftime("%H:%M:%S")
                typer.echo(
                    f"{stamp} {src.pattern}: +{res.read} read, +{res.loaded} loaded, "
                    f"+{res.rejected} rejected (total {totals['read']}/{totals['loaded']}/"
                    f"{totals['rejected']})",
                    err=True,
                )
        deadline = time.monotonic() + interval
        while not stopping and time.monotonic() < deadline:
            time.sleep(min(0.2, interval))
    typer.echo(
        f"stopped: {totals['read']} read, {totals['loaded']} loaded, {totals['rejected']} rejected",
        err=True,
    )
    sys.stderr.flush()


@ingest_app.command("requests")
def requests(
    paths: PathsArg,
    lake: LakeOption = None,
    mapping: MappingOpt = None,
    follow: FollowOpt = False,
    format: FormatOpt = "table",
    base_ts: BaseTsOpt = None,
    checkpoint_dir: CheckpointOpt = None,
    interval: IntervalOpt = 1.0,
) -> None:
    """Load request logs into `requests` (shim hits also into `cache_events`).

    Prints read/loaded/rejected per file; bad lines go to the rejects table
    with file:line and the reason. Exit 1 only when a file cannot be read.
    Files the shim is still writing (`*.jsonl.open`) are skipped and counted;
    `--follow` reads them as they grow and across the rename to `.jsonl`.
    Example: finops ingest requests azure-llm-2023-conv.csv --mapping azure-llm-2023
    """
    _run("requests", paths, lake, mapping, follow, format, base_ts, checkpoint_dir, interval)


@ingest_app.command("cache-events")
def cache_events(
    paths: PathsArg,
    lake: LakeOption = None,
    mapping: MappingOpt = None,
    follow: FollowOpt = False,
    format: FormatOpt = "table",
    base_ts: BaseTsOpt = None,
    checkpoint_dir: CheckpointOpt = None,
    interval: IntervalOpt = 1.0,
) -> None:
    """Load cache-event logs (columns ts, layer, event, tokens, ... or a mapping)."""
    _run("cache_events", paths, lake, mapping, follow, format, base_ts, checkpoint_dir, interval)


@ingest_app.command("mappings")
def mappings(format: FormatOpt = "table") -> None:
    """The shipped column mappings (use their name with --mapping)."""
    import polars as pl

    from collectors.mapping import load_mapping, shipped_mappings

    rows = []
    for name, path in shipped_mappings().items():
        m = load_mapping(path)
        rows.append(
            {
                "name": name,
                "table": m.table,
                "format": m.format or "auto",
                "description": m.description,
            }
        )
    print_frame(
        pl.DataFrame(rows), "json" if format == "json" else "table", title="shipped mappings"
    )


def register(app: typer.Typer) -> None:
    app.add_typer(ingest_app, name="ingest")
