"""`finops simulate` and `finops recommend autoscaling`: capacity at growth, with levers."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Annotated

import typer

from finops.cli._common import LakeOption, connect_lake, fail, print_frame

recommend_app = typer.Typer(
    help="Recommendations derived from the fitted models.", no_args_is_help=True
)


WeekOption = Annotated[
    str | None,
    typer.Option(help="ISO week, e.g. 2026-W47 (default: the lake's latest whole week)."),
]
FromOption = Annotated[
    str | None, typer.Option("--from", help="First day (YYYY-MM-DD, inclusive).")
]
ToOption = Annotated[str | None, typer.Option("--to", help="Last day (YYYY-MM-DD, inclusive).")]
DeploymentsOption = Annotated[
    Path | None,
    typer.Option(help="TOML mapping of pods/labels to deployments, tiers, pricing kinds."),
]


def _open(lake: Path | None, deployments: Path | None = None):
    import finops.costs as fc

    db = connect_lake(lake)
    if deployments is not None:
        fc.load_deployments(db, deployments)  # as `finops costs --deployments` does
    return db


def _period(db, week: str | None, from_: str | None, to: str | None):
    """The period asked for, like `finops costs`; nothing given: the lake's latest whole week."""
    import finops.costs as fc

    if week is None and from_ is None and to is None:
        return fc.period(fc.latest_whole_week(db))
    return fc.period(week, from_, to)


def _warn_unsimulated(sim, *, data: bool = True) -> None:
    """Tiers the simulation could not model are named on stderr in every format; with
    `data`, so are days of the period without data and tiers whose cost is unknown (the
    JSON of `finops simulate` carries those in its plan notes instead)."""
    for note in [*sim.trace.notes, *(sim.data_notes() if data else [])]:
        typer.echo(f"warning: {note}", err=True)


def _check_prometheus_url(url: str) -> None:
    """--prometheus goes verbatim into each KEDA trigger's serverAddress: an http(s) URL."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    try:
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        port_ok = False
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or not port_ok
        or any(c.isspace() for c in url)
    ):
        raise ValueError(
            "--prometheus must be an http(s) URL with a host, e.g. "
            f"http://prometheus.monitoring.svc:9090 (KEDA's serverAddress), got {url!r}"
        )


def _check_growth(growth: float) -> None:
    """--growth is a positive, finite factor; a tiny one is planned but warned about."""
    if not (growth > 0 and math.isfinite(growth)):
        raise ValueError(
            f"--growth must be a positive factor (a finite number, e.g. 5 for 5x), got {growth}"
        )
    if growth < 0.01:
        typer.echo(
            f"warning: --growth {growth:g} is below 0.01: the plan keeps at least one replica"
            " per tier (a fixed fleet: the observed one) for almost no requests, so its cost"
            " per 1k requests says little",
            err=True,
        )


def _usd(x: float | None, digits: int = 2) -> str:
    """Dollars, or n/a where the amount is unknown (no price), never $nan."""
    return "n/a" if x is None or not math.isfinite(x) else f"${x:,.{digits}f}"


def _finite(v):
    """JSON values with NaN/inf (an unknown cost) as null: `NaN` is not JSON."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_finite(x) for x in v]
    return v


def _lever_error(message: str) -> str:
    """A Levers validation message in the flags' words (route_small_share ->
    --route-small-share): the user sees the option they typed."""
    from finops.models.waterfall import LEVER_FLAGS

    for name, flag in LEVER_FLAGS.items():
        message = message.replace(name, flag)
    return message


# how to turn a lever of --default-levers off again, for its error messages
_LEVER_OFF = {
    "--route-small-share": "--route-small-share 0",
    "--autoscale": "--fixed",
    "--reserved-baseline": "--no-reserved-baseline",
    "--spot-share": "--spot-share 0",
}


def _default_lever_hint(message: str, given: dict[str, object]) -> str:
    """An error of a lever that --default-levers set (not one the user gave) says so, and
    how to plan without it."""
    from finops.models.waterfall import LEVER_FLAGS

    set_by_default = [
        f for n, f in LEVER_FLAGS.items() if n not in given and f in message and f in _LEVER_OFF
    ]
    if not set_by_default:
        return message
    return (
        f"{message} ({', '.join(set_by_default)} set by --default-levers: override with "
        f"{', '.join(_LEVER_OFF[f] for f in set_by_default)})"
    )


def _print_waterfall(wf, growth: float, label: str, unpriced: list[str]) -> None:
    """The lever waterfall as a table, then one line on how to read it."""
    import polars as pl

    from finops.models.waterfall import LEVER_FLAGS

    view = wf.select(
        "step",
        pl.col("lever").replace_strict(LEVER_FLAGS, default="").alias("flag"),
        "setting",
        "gpu_hours",
        "cost_usd",
        "cost_per_1k_requests",
        "saved_usd",
        "saved_per_1k",
        "share_of_saving",
    )
    usd = {c: _usd for c in ("cost_usd", "saved_usd")}
    per_1k = {c: (lambda x: _usd(x, 3)) for c in ("cost_per_1k_requests", "saved_per_1k")}
    print_frame(
        view,
        "table",
        title=f"{growth:g}x growth of {label}: where the saving comes from, levers added one at"
        " a time in a fixed order",
        headers={
            "gpu_hours": "GPU-h",
            "cost_usd": "cost",
            "cost_per_1k_requests": "$/1k req",
            "saved_usd": "saved",
            "saved_per_1k": "saved $/1k",
            "share_of_saving": "share",
        },
        cells={
            "gpu_hours": lambda x: f"{x:,.0f}",
            **usd,
            **per_1k,
            "share_of_saving": lambda x: f"{100 * x:.1f}%",
        },
        missing="n/a",  # a saving of a step with an unknown cost; step 0 saves nothing
    )
    first, last = wf.row(0, named=True), wf.row(-1, named=True)
    c0, c1 = first["cost_usd"], last["cost_usd"]
    # from the cents shown, so the line adds up as printed (2,123.805 shows as $2,123.80)
    saved = None if c0 is None or c1 is None else round(c0, 2) - round(c1, 2)
    g0, g1 = first["gpu_hours"], last["gpu_hours"]
    typer.echo(
        f"waterfall: the steps add up to the whole saving, {_usd(c0)} - {_usd(c1)} ="
        f" {_usd(saved)} and {g0:,.0f} - {g1:,.0f} = {g0 - g1:,.0f} GPU-h; each step is"
        " measured after the levers above it, so its saving depends on the order (traffic,"
        " serving, fleet, buying): applied alone the levers overlap and their savings add up"
        " to more than the whole"
        + f"; cost figures: priced tiers only (unknown cost: {', '.join(unpriced)})"
        * bool(unpriced)
    )


def simulate(
    lake: LakeOption = None,
    growth: Annotated[
        float, typer.Option(help="Traffic growth factor (5 = 5x the week; default 5).")
    ] = 5.0,
    slo_ttft_p95_ms: Annotated[
        float | None, typer.Option(help="p95 time-to-first-token SLO (default 1000 ms).")
    ] = None,
    default_levers: Annotated[
        bool,
        typer.Option(
            "--default-levers",
            help="Plan the default lever scenario (the demo's and weekly report's 'after':"
            " autoscaling, reserved floor, 30% spot, p95 token cap, observed cache hit rate"
            " + 5 points, 20% routed to the small tier); a lever flag given as well overrides"
            " that lever.",
        ),
    ] = False,
    route_small_share: Annotated[
        float | None,
        typer.Option(help="Share of larger-tier requests routed to the smallest tier (default 0)."),
    ] = None,
    cache_hit_rate: Annotated[
        float | None, typer.Option(help="Response-cache hit rate (default: as observed).")
    ] = None,
    token_cap: Annotated[int | None, typer.Option(help="Cap on input tokens per request.")] = None,
    max_num_seqs: Annotated[
        int | None, typer.Option(help="vLLM batch limit (default 256).")
    ] = None,
    autoscale: Annotated[
        bool | None,
        typer.Option(
            "--autoscale/--fixed", help="Queue-depth autoscaling vs fixed fleet (default fixed)."
        ),
    ] = None,
    reserved_baseline: Annotated[
        bool | None,
        typer.Option(help="Buy the always-on floor at reserved prices (default: no)."),
    ] = None,
    spot_share: Annotated[
        float | None, typer.Option(help="Share of burst GPU-hours on spot (default 0).")
    ] = None,
    format: str = typer.Option("table", "--format", help="table|json"),
    week: WeekOption = None,
    from_: FromOption = None,
    to: ToOption = None,
    deployments: DeploymentsOption = None,
) -> None:
    """Replicas, GPU-hours and cost per request at a growth factor, before vs with levers.

    The observed period is the lake's latest whole ISO week (traffic on all seven days)
    unless --week or --from/--to say otherwise. A tier with requests or GPUs but no vLLM
    serving metrics cannot be simulated: it is named in a warning and its observed
    requests and GPU cost are carried into the totals as observed (no growth, no levers).

    With any lever set, a waterfall says where the saving comes from: the levers added
    one at a time in a fixed order (cache, routing, token cap, batch limit, autoscaling,
    reserved floor, spot), each step's saving measured after the levers above it, the
    steps adding up to the whole saving (JSON: "waterfall").
    """
    if format not in ("table", "json"):
        fail(f"--format must be table or json, got {format!r}")
    from dataclasses import replace

    from finops.models.data import NoServingData
    from finops.models.simulate import Levers, Simulator
    from finops.models.simulate import default_levers as scenario
    from finops.models.waterfall import describe_levers, lever_waterfall, set_levers

    given = {
        k: v
        for k, v in {
            "route_small_share": route_small_share,
            "cache_hit_rate": cache_hit_rate,
            "token_cap": token_cap,
            "max_num_seqs": max_num_seqs,
            "autoscale": autoscale,
            "reserved_baseline": reserved_baseline,
            "spot_share": spot_share,
        }.items()
        if v is not None
    }
    try:
        levers = Levers(**given)  # checked before the (slow) simulation is set up
    except ValueError as exc:
        fail(_lever_error(str(exc)))
    try:
        _check_growth(growth)
        db = _open(lake, deployments)
        sim = Simulator.from_lake(
            db, per=_period(db, week, from_, to), slo_ttft_p95_ms=slo_ttft_p95_ms
        )
        if default_levers:  # the lake's default scenario, the flags given overriding it
            levers = replace(scenario(sim), **given)
        before = sim.plan(growth)
        after = sim.plan(growth, levers)
        # where the saving comes from: only when some lever is set (no empty waterfall)
        wf = lever_waterfall(sim, growth, levers) if set_levers(levers) else None
    except (ValueError, NoServingData) as exc:
        fail(_default_lever_hint(str(exc), given) if default_levers else str(exc))
        return
    from finops.models.simulate import unpriced_tiers

    b, a = before.cost_per_1k(), after.cost_per_1k()
    _warn_unsimulated(sim, data=format != "json")  # JSON: in after.notes
    label = sim.trace.period.label if sim.trace.period else "all data"
    unpriced = unpriced_tiers(sim)
    if format == "json":
        out = {
            "period": label,
            "growth": growth,
            "levers": levers.__dict__,
            # hourly: each tier-hour's planned rate, replicas, GPUs and modelled utilisation
            "before": {
                **before.totals,
                "tiers": before.tiers.to_dicts(),
                "hourly": before.hourly.to_dicts(),
            },
            "after": {
                **after.totals,
                "tiers": after.tiers.to_dicts(),
                "hourly": after.hourly.to_dicts(),
                "notes": after.notes,
            },
            "notes": {t: p.notes for t, p in sim.trace.profiles.items() if p.notes},
            "unsimulated": sim.trace.notes,
        }
        if wf is not None:
            out["scenario"] = describe_levers(sim, levers)
            # steps in a fixed order, each measured after those above it; they add up
            # to before - after (null: an unknown cost, see the notes)
            out["waterfall"] = wf.to_dicts()
        typer.echo(json.dumps(_finite(out), default=str, indent=2))
        return
    import polars as pl

    view = before.tiers.select("tier", "peak_replicas", "gpu_hours", "cost_usd").join(
        after.tiers.select(
            "tier",
            pl.col("peak_replicas").alias("peak_replicas_levers"),
            pl.col("gpu_hours").alias("gpu_hours_levers"),
            pl.col("cost_usd").alias("cost_usd_levers"),
            "idle_share",
            "slo_ttft_p95_ms",
        ),
        on="tier",
    )
    these = "these levers"
    if default_levers:
        from finops.models.waterfall import LEVER_FLAGS

        over = [LEVER_FLAGS[k] for k in given]  # flags given on top of the default scenario
        these = "the default levers" + (f" ({', '.join(over)} overridden)" if over else "")
    print_frame(
        view,
        "table",
        title=f"{growth:g}x growth of {label}: per tier, no levers vs {these}",
        missing="n/a" if unpriced else "",  # an unknown cost
    )
    typer.echo(
        f"{growth:g}x growth of {label}: {_usd(b)}/1k requests with no levers "
        f"({before.totals['gpu_hours']:,.0f} GPU-h), {_usd(a)} with {these} "
        f"({after.totals['gpu_hours']:,.0f} GPU-h, simulated idle "
        f"{100 * after.totals['idle_share']:.0f}%"
        + (" of the simulated tiers'" if sim.trace.notes else "")
        + " GPU time: modelled busy time, where `finops costs` reports measured SM idle)"
        + (
            f"; cost figures: priced tiers only (unknown cost: {', '.join(unpriced)})"
            * bool(unpriced)
        )
    )
    if wf is not None:
        typer.echo(f"levers: {describe_levers(sim, levers)}")
        _print_waterfall(wf, growth, label, unpriced)
    else:  # both sides are the same plan: say how to get a comparison
        typer.echo(
            "no lever set, so both sides are the same plan: --default-levers plans the "
            "demo's and weekly report's scenario; or set levers (--autoscale, "
            "--route-small-share, --token-cap, ...)"
        )
    # days without data, unpriced tiers, levers asked for that change nothing here
    for note in dict.fromkeys([*before.notes, *after.notes]):
        typer.echo(f"note: {note}")
    for t, p in sim.trace.profiles.items():
        for note in p.notes:
            typer.echo(f"note ({t}): {note}")
    for note in sim.trace.notes:
        typer.echo(f"note: {note}")


@recommend_app.command("autoscaling")
def autoscaling(
    lake: LakeOption = None,
    slo_ttft_p95_ms: Annotated[float | None, typer.Option(help="p95 TTFT SLO, ms.")] = None,
    namespace: Annotated[str, typer.Option(help="Kubernetes namespace.")] = "llm-serving",
    prometheus: Annotated[str | None, typer.Option(help="Prometheus URL for KEDA.")] = None,
    growth: Annotated[
        float,
        typer.Option(
            help="Traffic growth the manifests must absorb: maxReplicas is at least the busiest"
            " hour's replica need at this multiple of the period's traffic, as `finops simulate"
            " --growth G --autoscale` plans it (default 2 = twice the observed week)."
        ),
    ] = 2.0,
    max_replicas: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Cap on each tier's maxReplicas (default: none); a cap below the need at"
            " --growth is kept and named in a note.",
        ),
    ] = None,
    format: str = typer.Option("table", "--format", help="table|yaml|json"),
    week: WeekOption = None,
    from_: FromOption = None,
    to: ToOption = None,
    deployments: DeploymentsOption = None,
) -> None:
    """Queue-depth targets per tier as KEDA ScaledObject / HPA YAML, and the period's cost.

    The period is the lake's latest whole ISO week unless --week or --from/--to say otherwise;
    requests, serving metrics and the observed bill are all read for that period. maxReplicas
    covers the busiest hour at --growth (default 2x) times the period's traffic.
    """
    if format not in ("table", "yaml", "json"):
        fail(f"--format must be table, yaml or json, got {format!r}")
    from finops.models.autoscaling import (
        PROMETHEUS_DEFAULT,
        observed_week_cost,
        recommend,
        validate_manifests,
    )
    from finops.models.data import NoServingData
    from finops.models.simulate import Simulator

    try:
        _check_growth(growth)
        if prometheus is not None:
            _check_prometheus_url(prometheus)
        db = _open(lake, deployments)
        per = _period(db, week, from_, to)
        sim = Simulator.from_lake(db, per=per, slo_ttft_p95_ms=slo_ttft_p95_ms)
        adv = recommend(
            sim,
            namespace=namespace,
            prometheus=prometheus or PROMETHEUS_DEFAULT,
            growth=growth,
            max_replicas=max_replicas,
            observed_cost_usd=observed_week_cost(db, per),
        )
        text = adv.to_yaml() if format == "yaml" else ""
        if text:
            validate_manifests(text)
    except (ValueError, NoServingData) as exc:
        fail(str(exc))
        return
    _warn_unsimulated(sim)
    for t, p in sim.trace.profiles.items():
        for note in dict.fromkeys([*p.notes, *adv.notes.get(t, [])]):  # maxReplicas notes
            typer.echo(f"note ({t}): {note}", err=True)
    if format == "yaml":
        typer.echo(text, nl=False)
        return
    cmp_ = adv.cost_comparison()
    if format == "json":
        doc = {"period": per.label, "growth": growth, "max_replicas": max_replicas,
               "tiers": adv.table().to_dicts(), "cost": cmp_, "notes": adv.notes,
               "data_notes": adv.data_notes, "unsimulated": sim.trace.notes}  # fmt: skip
        typer.echo(json.dumps(doc, indent=2))
        return
    print_frame(adv.table(), "table", title="target vllm:num_requests_waiting per replica")
    from finops.models.simulate import unpriced_tiers

    observed, pct = cmp_["observed_cost_usd"], cmp_["saving_pct"]
    unpriced = unpriced_tiers(sim)
    typer.echo(
        f"{per.label}: fixed fleet {_usd(cmp_['fixed_fleet_usd'], 0)} "
        f"({cmp_['fixed_gpu_hours']:,.0f} GPU-h) vs queue-depth autoscaling "
        f"{_usd(cmp_['autoscaled_usd'], 0)} ({cmp_['autoscaled_gpu_hours']:,.0f} GPU-h): "
        f"saves {_usd(cmp_['saving_usd'], 0)} ({'n/a' if pct is None else f'{pct:.0f}%'})"
        + (f"; observed GPU bill ${observed:,.0f}" if observed is not None else "")
        + f"; cost figures: priced tiers only (unknown cost: {', '.join(unpriced)})"
        * bool(unpriced)
    )
    typer.echo(
        f"maxReplicas: the busiest hour's replica need at {growth:g}x the period's traffic"
        " (--growth)" + (f", capped at {max_replicas} (--max-replicas)" if max_replicas else "")
    )
    typer.echo("YAML: finops recommend autoscaling --format yaml")


def register(app: typer.Typer) -> None:
    app.command("simulate")(simulate)
    app.add_typer(recommend_app, name="recommend")
