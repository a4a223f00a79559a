"""Where the saving comes from: the growth plan's levers as a cumulative waterfall.

Run alone, the levers overlap (autoscaling alone and a token cap alone each claim much of
the same idle capacity), so per-lever savings measured separately add up to more than the
whole. The waterfall applies the levers one at a time, cumulatively, in a fixed order, so
each step's saving is measured *after the levers above it* and the steps add up exactly to
"before levers" minus "after levers". The order is documented and never depends on the
scenario: traffic levers first (they shrink what must be served), then serving (the batch
limit), then the fleet (autoscaling), then buying (reserved floor, spot burst):

1. ``cache_hit_rate``: response-cache hit rate;
2. ``route_small_share``: larger-tier requests routed to the smallest tier;
3. ``token_cap``: context (input token) cap;
4. ``max_num_seqs``: vLLM batch limit;
5. ``autoscale``: replicas follow the hourly need (queue-depth autoscaling);
6. ``reserved_baseline``: the always-on floor at reserved prices;
7. ``spot_share``: part of the GPU-hours above the floor on spot.

A different order gives the same total but different steps (a lever's saving depends on
what is left to save when it is applied). The steps also come in whole replicas: each hour
runs the fewest replicas that keep p95 TTFT within the SLO, so a lever saves only where it
takes a tier below a replica boundary. A share of the saving is therefore not the tokens a
lever avoids: a small change (5 points of cache hits, a cap that shortens prefill) can free
one large replica and earn most of the saving, a bigger one nothing (`REPLICA_NOTE`). Cost figures are the plans' own: priced tiers
only where some tier has no price (`unpriced_tiers`), unknown (null, never NaN) where no
tier is priced.

>>> from finops.models.waterfall import lever_waterfall
>>> lever_waterfall(Simulator.from_lake(finops.connect()), 5)
"""

from __future__ import annotations

import math
from dataclasses import fields, replace

import polars as pl

from finops.models.simulate import (
    DEFAULT_MAX_NUM_SEQS,
    Levers,
    Plan,
    Simulator,
    default_levers,
)

# the waterfall's step order (see the module docstring): traffic, serving, fleet, buying
LEVER_ORDER: tuple[str, ...] = (
    "cache_hit_rate",
    "route_small_share",
    "token_cap",
    "max_num_seqs",
    "autoscale",
    "reserved_baseline",
    "spot_share",
)

# why a step's share is not "tokens avoided" (top_levers, the chart, notebook 02)
REPLICA_NOTE = (
    "The steps are whole replicas: each hour runs the fewest replicas that keep p95 TTFT "
    "within the SLO, so a lever saves only where it takes a tier below a replica boundary, "
    "and its share depends on the order and on those boundaries, not only on the work it "
    "avoids."
)

# levers that change the price of the same GPU-hours, not the replicas run: their saving
# does not hinge on replica boundaries, so REPLICA_NOTE does not apply to them
PRICE_LEVERS: frozenset[str] = frozenset({"reserved_baseline", "spot_share"})

# the `finops simulate` flag of each lever, for error messages
LEVER_FLAGS: dict[str, str] = {
    "cache_hit_rate": "--cache-hit-rate",
    "route_small_share": "--route-small-share",
    "token_cap": "--token-cap",
    "max_num_seqs": "--max-num-seqs",
    "autoscale": "--autoscale",
    "reserved_baseline": "--reserved-baseline",
    "spot_share": "--spot-share",
}


def set_levers(levers: Levers) -> list[str]:
    """The levers a scenario sets (differ from `Levers()`, which changes nothing), in
    waterfall order."""
    none = Levers()
    # a lever newer than LEVER_ORDER still gets a step (last), so the last row is the plan
    names = [*LEVER_ORDER, *(f.name for f in fields(Levers) if f.name not in LEVER_ORDER)]
    return [n for n in names if getattr(levers, n) != getattr(none, n)]


def _pct(share: float) -> str:
    """A share as a percentage with no needless digits: 0.2 -> 20%, 0.125 -> 12.5%,
    0.05001 -> 5% (three significant digits)."""
    return f"{100 * share:.3g}%"


def describe_lever(sim: Simulator, name: str, value: float | int | bool) -> str:
    """One lever setting in words, with the values the plan uses (the observed hit rate,
    the routing target, the share of prompts a cap trims), so a step says what it did."""
    tr = sim.trace
    if name == "cache_hit_rate":
        hit, seen = 100 * float(value), 100 * tr.observed_hit_rate
        return f"response cache hit rate {hit:.1f}% (observed {seen:.1f}%)"
    if name == "route_small_share":
        share = _pct(float(value))
        if len(tr.profiles) < 2:
            return f"{share} routed to the smallest tier (one simulated tier: no effect)"
        return f"{share} of larger-tier requests routed to {sim.smallest_tier()}"
    if name == "token_cap":
        cap = int(value)
        prompts = [p.prompt_tokens for p in tr.profiles.values() if p.prompt_tokens.size]
        n = sum(int(x.size) for x in prompts)
        over = sum(int((x > cap).sum()) for x in prompts)
        trims = f" ({_pct(over / n)} of sampled prompts are longer)" if n else ""
        return f"input capped at {cap:,} tokens{trims}"
    if name == "max_num_seqs":
        return f"vLLM batch limit {value} sequences per replica (default {DEFAULT_MAX_NUM_SEQS})"
    if name == "autoscale":
        return "autoscaling on queue depth" if value else "fixed fleet (sized by the peak need)"
    if name == "reserved_baseline":
        return "always-on floor at reserved prices" if value else "floor bought as today"
    if name == "spot_share":
        return f"{_pct(float(value))} of burst GPU-hours on spot"
    return f"{name} = {value!r}"  # a lever newer than this description


def describe_levers(sim: Simulator, levers: Levers) -> str:
    """A scenario in one line ("no levers" when it sets none), levers in waterfall order."""
    names = set_levers(levers)
    if not names:
        return "no levers"
    return "; ".join(describe_lever(sim, n, getattr(levers, n)) for n in names)


def _known(x: float | None) -> float | None:
    """An amount, or None where it is unknown (no price): NaN never reaches the frame."""
    return None if x is None or not math.isfinite(x) else float(x)


def _less(prev: float | None, now: float | None) -> float | None:
    return None if prev is None or now is None else prev - now


def lever_waterfall(
    sim: Simulator, growth: float = 5.0, levers: Levers | None = None
) -> pl.DataFrame:
    """The plan at `growth` with no levers, then each lever the scenario sets added in
    `LEVER_ORDER`, cumulatively; the last row is `sim.plan(growth, levers)`.

    `levers` defaults to `default_levers(sim)` (the demo's and weekly report's "after").
    One row per step: `step` (0 = no levers), `lever` (the Levers field, "none" for step 0),
    `setting` (the lever in words), the plan's `requests`, `gpu_hours`, `cost_usd`,
    `cost_per_1k_requests`, and what the step saved vs the one above (`saved_gpu_hours`,
    `saved_usd`, `saved_per_1k`; null on step 0) plus `share_of_saving` (of the whole
    cost saving). A step's saving depends on the order: it is measured after the levers
    above it, and on replica boundaries (`REPLICA_NOTE`). Unknown costs (unpriced tiers) are null. A step whose plan fails raises a
    ValueError naming the lever.
    """
    levers = default_levers(sim) if levers is None else levers
    rows = []
    cur = Levers()
    steps: list[tuple[str, str]] = [("none", "no levers")]
    for name in set_levers(levers):
        steps.append((name, describe_lever(sim, name, getattr(levers, name))))
    prev: dict[str, float | None] | None = None
    for i, (name, setting) in enumerate(steps):
        if name != "none":
            cur = replace(cur, **{name: getattr(levers, name)})
        try:
            plan: Plan = sim.plan(growth, cur)
        except ValueError as e:
            what = "the plan with no levers" if name == "none" else f"{name} ({setting})"
            raise ValueError(f"waterfall step {i}, {what}: {e}") from e
        t = plan.totals
        now = {
            "gpu_hours": _known(t["gpu_hours"]),
            "cost_usd": _known(t["cost_usd"]),
            "cost_per_1k_requests": _known(t["cost_per_1k_requests"]),
        }
        rows.append(
            {
                "step": i,
                "lever": name,
                "setting": setting,
                "requests": float(t["requests"]),
                **now,
                "saved_gpu_hours": _less(prev["gpu_hours"], now["gpu_hours"]) if prev else None,
                "saved_usd": _less(prev["cost_usd"], now["cost_usd"]) if prev else None,
                "saved_per_1k": (
                    _less(prev["cost_per_1k_requests"], now["cost_per_1k_requests"])
                    if prev
                    else None
                ),
            }
        )
        prev = now
    total = _less(rows[0]["cost_usd"], rows[-1]["cost_usd"])
    for r in rows:
        s = r["saved_usd"]
        r["share_of_saving"] = s / total if s is not None and total else None
    schema = {
        "step": pl.Int64,
        "lever": pl.String,
        "setting": pl.String,
        "requests": pl.Float64,
        "gpu_hours": pl.Float64,
        "cost_usd": pl.Float64,
        "cost_per_1k_requests": pl.Float64,
        "saved_gpu_hours": pl.Float64,
        "saved_usd": pl.Float64,
        "saved_per_1k": pl.Float64,
        "share_of_saving": pl.Float64,
    }
    return pl.DataFrame(rows, schema=schema)


def top_levers(wf: pl.DataFrame, n: int = 2, *, context: str = "") -> str:
    """One sentence naming the steps that earn the most (dollars where known, else
    GPU-hours), for the notebook and reports; the order caveat included, and the replica
    one (`REPLICA_NOTE`) where a lever named changes replicas (not only prices). `context` says
    which plan ("at 5x growth of 2026-W47")."""
    steps = wf.filter(pl.col("step") > 0)
    if not steps.height:
        return "No lever is set: nothing to attribute."
    by_usd = steps["saved_usd"].is_not_null().all() and wf["cost_usd"].is_not_null().all()
    col, unit = ("saved_usd", "usd") if by_usd else ("saved_gpu_hours", "GPU-h")
    best = steps.sort(col, descending=True).head(n).filter(pl.col(col) > 0)
    if not best.height:
        return "No lever lowers the " + ("cost" if by_usd else "GPU-hours") + " of this plan."
    first, last = wf.row(0, named=True), wf.row(-1, named=True)
    whole = (
        first["cost_usd"] - last["cost_usd"] if by_usd else first["gpu_hours"] - last["gpu_hours"]
    )

    def amount(x: float) -> str:
        return f"${x:,.0f}" if unit == "usd" else f"{x:,.0f} GPU-h"

    parts = [
        f"**{r['setting']}** ({amount(r[col])}"
        + (f", {100 * r[col] / whole:.0f}% of the saving" if whole > 0 else "")
        + ")"
        for r in best.iter_rows(named=True)
    ]
    return (
        f"Of the {amount(whole)} the levers save"
        + (f" {context}" if context else "")
        + ("" if by_usd else " (costs unknown: GPU-hours instead)")
        + f", most comes from {' and '.join(parts)}, each measured after the levers above it"
        " in the waterfall (applied in another order a lever would earn a different share)."
        + (f" {REPLICA_NOTE}" if set(best["lever"]) - PRICE_LEVERS else "")
    )


__all__ = [
    "LEVER_FLAGS",
    "LEVER_ORDER",
    "PRICE_LEVERS",
    "REPLICA_NOTE",
    "describe_lever",
    "describe_levers",
    "lever_waterfall",
    "set_levers",
    "top_levers",
]
