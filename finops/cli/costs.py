"""`finops costs`: the GPU bill and cost per request by tenant, feature, tier, model or hour."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer

from finops.cli._common import LakeOption, connect_lake, fail, print_frame

_TOTAL_KEYS = (
    "gpu_cost",
    "allocated_cost",
    "unallocated_cost",
    "idle_cost",  # the old name of unallocated_cost, kept for readers of the JSON
    "idle_capacity_cost",
    "busy_cost",
    "requests",
    "failed_requests",
    # the per-request and per-token figures divide by the priced requests and tokens only
    "unpriced_requests",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "priced_tokens",
    "gpu_hours",
    "priced_gpu_hours",
    "gpus",
    "utilization",
    "usd_per_1k_requests",
    "usd_per_1m_input_tokens",
    "usd_per_1m_output_tokens",
    "leakage_cost",
)


# the table's (a person's) names and units; CSV and JSON keep the columns' names and values
_HEADERS = {
    "priced_requests": "priced requests",
    "input_tokens": "input tokens",
    "output_tokens": "output tokens",
    "usd_per_1k_requests": "$/1k requests",
    "usd_per_1m_input_tokens": "$/1M input",
    "usd_per_1m_output_tokens": "$/1M output",
    "leakage_cost": "leakage",
}


def _usd(v: float) -> str:
    return f"${v:,.2f}"


_CELLS = {
    "requests": "{:,}".format,
    "priced_requests": "{:,}".format,
    "failed": "{:,}".format,
    "input_tokens": "{:,}".format,
    "output_tokens": "{:,}".format,
    "cost": _usd,
    "share": "{:.1%}".format,
    "usd_per_1k_requests": _usd,
    "usd_per_1m_input_tokens": _usd,
    "usd_per_1m_output_tokens": _usd,
    "leakage_cost": _usd,
}


def costs(
    lake: LakeOption = None,
    week: Annotated[str | None, typer.Option(help="ISO week, e.g. 2026-W47.")] = None,
    from_: Annotated[
        str | None, typer.Option("--from", help="First day (YYYY-MM-DD, inclusive).")
    ] = None,
    to: Annotated[
        str | None, typer.Option("--to", help="Last day (YYYY-MM-DD, inclusive).")
    ] = None,
    by: Annotated[
        str, typer.Option("--by", help="tenant|feature|tier|model|hour|day|operation")
    ] = "tenant",
    basis: Annotated[
        str, typer.Option(help="allocation (idle capacity included) | usage (busy time only)")
    ] = "allocation",
    format: Annotated[str, typer.Option("--format", help="table|csv|json")] = "table",
    deployments: Annotated[
        Path | None,
        typer.Option(help="TOML mapping of pods/labels to deployments, tiers, pricing kinds."),
    ] = None,
    pricing_kind: Annotated[
        str | None, typer.Option(help="Default price kind: on_demand|reserved|spot.")
    ] = None,
    headline: Annotated[
        bool, typer.Option("--headline", help="Print the one-line headline economics only.")
    ] = False,
) -> None:
    """Unit economics for a period: GPU bill, allocated vs idle, cost per request and per token.

    Allocation basis: each tier-hour's whole GPU cost (idle included) is shared by its
    requests by token work, so allocated + idle = the bill. Usage basis: only busy
    (SM-active) GPU time is shared.
    """
    import finops.costs as fc

    if format not in ("table", "csv", "json"):
        fail(f"--format must be table, csv or json, got {format!r}")
    if by not in fc.DIMENSIONS:
        fail(f"--by must be one of {'|'.join(fc.DIMENSIONS)}, got {by!r}")
    if basis not in fc.BASES:
        fail(f"--basis must be allocation or usage, got {basis!r}")
    db = connect_lake(lake)
    try:
        per = fc.period(week, from_, to)
        if deployments is not None:
            fc.load_deployments(db, deployments)
        if pricing_kind is not None:
            try:
                fc.configure(db, pricing_kind=pricing_kind)
            except fc.CostError as exc:  # worded as the flag typed, not the setting
                fail(f"--pricing-kind: {str(exc).removeprefix('pricing_kind: ')}")
        if headline:
            head = fc.headline(db, per=per)
            if format == "json":
                typer.echo(json.dumps(head, default=_json_default, indent=2))
            else:
                typer.echo(fc.format_headline(head))
            for note in head["notes"]:
                typer.echo(f"warning: {note}", err=True)
            return
        tot = fc.totals(db, per=per, basis=basis)  # type: ignore[arg-type]
        rows = fc.by(db, by, per=per, basis=basis)  # type: ignore[arg-type]
    except fc.CostError as exc:
        fail(str(exc))
        return
    for note in tot["notes"]:
        typer.echo(f"warning: {note}", err=True)
    if format == "json":
        doc = {
            "period": tot["period"],
            "start": tot["start"],
            "end": tot["end"],
            "basis": basis,
            "by": by,
            "totals": {k: tot[k] for k in _TOTAL_KEYS},
            "notes": tot["notes"],
            "rows": rows.to_dicts(),
        }
        typer.echo(json.dumps(doc, default=_json_default, indent=2))
        return
    if format == "csv":
        print_frame(rows, "csv")
        return
    # some requests unpriced: cost, share and $/1k cover the priced ones, which the table
    # then counts beside all requests
    unpriced = bool(tot["unpriced_requests"])
    print_frame(
        rows.select(
            by,
            "requests",
            *(["priced_requests"] if unpriced else []),
            "failed",
            "input_tokens",
            "output_tokens",
            "cost",
            "share",
            "usd_per_1k_requests",
            "usd_per_1m_input_tokens",
            "usd_per_1m_output_tokens",
            "leakage_cost",
        ),
        "table",
        title=f"cost by {by}, {tot['period']} ({basis} basis"
        + ("; cost, share and $/1k over priced requests only)" if unpriced else ")"),
        headers=_HEADERS,
        cells=_CELLS,
        missing="n/a",  # unknown (no GPU data or price), not $0
    )
    if not tot["gpu_hours"]:  # no GPU samples: the bill is unknown, not $0.00
        typer.echo(
            f"GPU bill unknown (no GPU samples in {tot['period']}); {tot['requests']:,} requests"
        )
        return
    hours = f"{tot['gpu_hours']:,.0f} GPU-hours"
    if tot["priced_gpu_hours"] < tot["gpu_hours"]:  # the bill covers the priced ones only
        hours = f"{tot['priced_gpu_hours']:,.0f} priced of {hours}"
    # what no request carried: on the usage basis requests carry only their busy time,
    # so the idle time of hours with requests is left over too
    left = (
        "GPU-hours without requests"
        if tot["basis"] == "allocation"
        else "GPU-hours without requests and the idle time of hours with requests"
    )
    typer.echo(
        f"GPU bill ${tot['gpu_cost']:,.2f} ({hours}, {tot['gpus']} GPUs) = "
        f"${tot['allocated_cost']:,.2f} allocated to requests + "
        f"${tot['unallocated_cost']:,.2f} unallocated ({left}); "
        f"${tot['idle_capacity_cost']:,.2f} of the bill is idle "
        f"capacity (GPU time not busy); {tot['requests']:,} requests"
    )


def _json_default(v: object) -> str:
    if isinstance(v, dt.datetime | dt.date):
        return v.isoformat()
    return str(v)


def register(app: typer.Typer) -> None:
    app.command("costs")(costs)
