"""`finops demo`: generate the demo week, build the views, print the headline numbers.

`run_demo()` is a list of steps so later features (economics, router,
report) add a step instead of rewriting the command.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from finops.cli._common import LakeOption, fail, lake_flag, resolve_lake


@dataclass
class DemoContext:
    """What the steps share: options, the lake, the connection, and each step's output."""

    lake: Path
    days: int
    seed: int
    gpus: int
    start: dt.date
    scale: float = 1.0
    db: Any = None
    results: dict[str, Any] = field(default_factory=dict)


Step = tuple[str, Callable[[DemoContext, Callable[[str], None]], None]]


def _generate(ctx: DemoContext, note: Callable[[str], None]) -> None:
    from finops.demo import generate

    ctx.results["generate"] = generate(
        ctx.lake, days=ctx.days, seed=ctx.seed, gpus=ctx.gpus, start=ctx.start,
        scale=ctx.scale, progress=note,
    )  # fmt: skip


def _views(ctx: DemoContext, note: Callable[[str], None]) -> None:
    import finops

    ctx.db = finops.connect(ctx.lake)
    ctx.db.execute("SET enable_progress_bar = false")


def _summary(ctx: DemoContext, note: Callable[[str], None]) -> None:
    from finops.demo.summary import summarize

    ctx.results["summary"] = summarize(ctx.db)


def report_week(start: dt.date, days: int) -> str:
    """The ISO week the demo's weekly report covers (2026-W47 for the default week):
    the latest week the demo fills from Monday to Sunday, as a team reports last week."""
    import finops.costs as fc

    return fc.whole_week(start, days)


def _week(ctx: DemoContext) -> str:
    return report_week(ctx.start, ctx.days)


def _economics(ctx: DemoContext, note: Callable[[str], None]) -> None:
    import finops.costs as fc

    end = ctx.start + dt.timedelta(days=ctx.days - 1)
    ctx.results["economics"] = fc.format_headline(fc.headline(ctx.db, start=ctx.start, end=end))


def _growth(ctx: DemoContext, note: Callable[[str], None]) -> None:
    import finops.costs as fc
    from finops.models.simulate import headline

    # the report's week, so the growth line, `finops simulate` and the report agree
    h = headline(ctx.db, 5, per=fc.period(_week(ctx)))
    ctx.results["growth"] = (
        f"{h['line']}\n  after = {h['scenario']}"
        f"\n  (finops simulate --default-levers{lake_flag(ctx.lake)} shows what each lever earns)"
    )


DEMO_ROUTER_ROWS = 4000


def router_dir(lake: Path) -> Path:
    """Where the demo writes its router artifact (next to the lake)."""
    return lake.parent / "router" / "demo-artifact"


def reports_dir(lake: Path) -> Path:
    """Where the demo writes its weekly report (next to the lake)."""
    return lake.parent / "reports"


def preflight(ctx: DemoContext) -> None:
    """Refuse output paths the later steps could not fill, before the lake is generated.

    A file or an unrelated folder at router/demo-artifact (or a file at reports)
    would otherwise fail minutes in, with a traceback and a half-made demo.
    Raises DemoError with the path and what was expected.
    """
    from finops.demo import MARKER, DemoError
    from finops.router.artifact import ArtifactError, check_out_dir

    try:
        check_out_dir(router_dir(ctx.lake), overwrite=True)
    except ArtifactError as exc:
        raise DemoError(
            f"{exc} (the demo writes its router artifact there: move it or use another --lake)"
        ) from None
    reports = reports_dir(ctx.lake)
    if reports.exists() and not reports.is_dir():
        raise DemoError(
            f"{reports}: exists and is not a folder (the demo writes its weekly report there)"
        )
    if reports.is_dir() and any(reports.iterdir()) and not (reports / MARKER).is_file():
        # `finops report` writes the same file names: a team's own report of that week
        # would be replaced by the demo's
        raise DemoError(
            f"{reports}: not empty and not made by `finops demo` (no {MARKER} marker); "
            "the demo writes its weekly report there and would replace what is there. "
            "Choose another --lake (the report goes next to it) or move that folder."
        )


def _router(ctx: DemoContext, note: Callable[[str], None]) -> None:
    """Train the demo router (labeled demo prompts) and price it on the lake's tiers."""
    from finops.router.data import load_labeled, write_demo_labeled
    from finops.router.train import one_line, train

    out = router_dir(ctx.lake)
    data = write_demo_labeled(out.parent / "demo-labeled.jsonl", DEMO_ROUTER_ROWS, ctx.seed)
    note(f"training on {DEMO_ROUTER_ROWS} labeled requests")
    res = train(load_labeled(data), out, cv_folds=0, seed=ctx.seed, lake=ctx.lake, overwrite=True)
    assert res.router is not None
    ctx.results["router_path"] = out
    ctx.results["router"] = one_line(res.evaluation, res.router.tiers)


def _report(ctx: DemoContext, note: Callable[[str], None]) -> None:
    """The weekly report for people who never open a notebook (HTML, Markdown, JSON, FOCUS)."""
    from finops.demo import MARKER
    from finops.report import build_report

    out = reports_dir(ctx.lake)
    paths = build_report(ctx.lake, _week(ctx), out)
    (out / MARKER).touch()  # the next demo may replace what this one wrote
    ctx.results["report"] = paths.html


STEPS: list[Step] = [
    ("generate the demo week", _generate),
    ("build the views", _views),
    ("summarize", _summary),
    ("unit economics", _economics),
    ("5x growth simulation", _growth),
    ("train the router", _router),
    ("write the weekly report", _report),
]


def run_demo(ctx: DemoContext, steps: list[Step] | None = None) -> DemoContext:
    """Run each step with a rich progress line; later issues append to `STEPS`."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console
    ) as progress:
        for title, fn in steps or STEPS:
            task = progress.add_task(title, total=None)
            t0 = time.perf_counter()

            def note(msg: str, task: Any = task, title: str = title) -> None:
                progress.update(task, description=f"{title}: {msg}")

            fn(ctx, note)
            progress.update(
                task, description=f"{title} ({time.perf_counter() - t0:.1f}s)", total=1,
                completed=1,
            )  # fmt: skip
    return ctx


def print_summary(summary: dict[str, Any]) -> None:
    """The few numbers that tell the story of the week."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title="demo week", show_header=False)
    t.add_column("", style="bold")
    t.add_column("", justify="right")

    def add(k: str, v: str) -> None:
        t.add_row(k, v)

    first, last = summary["first_ts"], summary["last_ts"]
    if first and last:
        add("period", f"{first:%Y-%m-%d} .. {last:%Y-%m-%d}")
    add(
        f"GPU spend ({summary['pricing_kind'].replace('_', '-')})",
        f"${summary['spend_usd']:,.0f} for {summary['gpu_hours']:,.0f} GPU-hours",
    )
    for g in summary["gpus"]:
        add(
            f"  {g['gpu_model']}",
            f"{g['gpu_hours']:,} h x ${g['usd_per_gpu_hour']:.2f} = ${g['spend_usd']:,.0f}",
        )
    add("requests", f"{summary['requests']:,} ({summary['failed_requests']:,} failed)")
    add("input tokens", f"{summary['input_tokens']:,} ({summary['cached_input_tokens']:,} "
        "from vLLM prefix cache)")  # fmt: skip
    add("output tokens", f"{summary['output_tokens']:,}")
    if summary["gpu_utilization"] is not None:
        add(
            "GPU utilization",
            f"{summary['gpu_utilization']:.1%} ({summary['utilization_signal']}); "
            f"GPU_UTIL says {summary['gpu_util_reported']:.1%}",
        )
    if summary["cost_per_1k_requests_usd"] is not None:
        add("cost per 1k requests", f"${summary['cost_per_1k_requests_usd']:,.2f}")
    for i, tenant in enumerate(summary["top_tenants"], 1):
        share = tenant["requests"] / summary["requests"] if summary["requests"] else 0
        add(
            f"top tenant #{i}", f"{tenant['tenant']}: {tenant['requests']:,} requests ({share:.0%})"
        )
    console.print(t)


def demo(
    lake: LakeOption = None,
    days: Annotated[int, typer.Option(min=1, max=62, help="Days to simulate.")] = 7,
    seed: Annotated[int, typer.Option(help="Random seed; same seed, same lake.")] = 42,
    gpus: Annotated[int, typer.Option(min=6, help="Fleet size (>= 6).")] = 16,
    start: Annotated[
        str, typer.Option(help="First day (UTC midnight), YYYY-MM-DD.")
    ] = "2026-11-16",
    scale: Annotated[
        float, typer.Option(min=0.001, max=10.0, help="Request volume factor (1.0: ~440k/week).")
    ] = 1.0,
) -> None:
    """Generate a realistic demo week into the lake, build the views, print a summary."""
    from finops.demo import DemoError, TracesMissing
    from finops.report.figures import ReportError
    from finops.router.artifact import ArtifactError

    try:
        first = dt.date.fromisoformat(start)
    except ValueError:
        fail(f"--start: expected a date YYYY-MM-DD, got {start!r}")
    ctx = DemoContext(
        lake=resolve_lake(lake), days=days, seed=seed, gpus=gpus, start=first, scale=scale
    )
    try:
        preflight(ctx)
        run_demo(ctx)
    except (DemoError, TracesMissing, ArtifactError, ReportError) as exc:
        fail(str(exc))
    print_summary(ctx.results["summary"])
    for key in ("economics", "growth", "router"):
        if key in ctx.results:
            typer.echo(ctx.results[key])
    if "router_path" in ctx.results:
        typer.echo(f"router artifact: {ctx.results['router_path']} (finops router inspect ...)")
    if "report" in ctx.results:
        typer.echo(f"weekly report: {ctx.results['report']}")
    hint = f'finops sql "SELECT * FROM marts.tenant_daily"{lake_flag(ctx.lake)}'
    typer.echo(f"lake: {ctx.lake}  (try: {hint})")


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
