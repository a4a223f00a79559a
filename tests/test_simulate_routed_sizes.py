"""Requests routed to the smallest tier keep their sizes.

`--route-small-share` once moved the larger tiers' request counts to the small tier and
served them at the small tier's own prompt/output lengths: on the demo week a request
routed from large (mean uncached prompt 7,731 tokens) was planned as one of small's
(601). The small tier's sample is now a mixture of its own and the routed requests.

The traces are built by hand (as in test_simulate's routing test): two tiers, a few
hours, sizes chosen so the routed requests are much longer than the small tier's own.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import polars as pl
import pytest

from finops.models.simulate import Levers, Simulator, TierProfile, Trace

HOUR = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)
PRICES = pl.DataFrame(
    {"gpu_model": ["NVIDIA L4", "NVIDIA H100 80GB HBM3"], "pricing_kind": ["on_demand"] * 2,
     "usd_per_gpu_hour": [0.75, 3.90]}
)  # fmt: skip
UPSTREAM = [30_000, 20_000]  # per hour, both tiers


def _tier(name: str, prompt: float, output: float, *, prefill: float, big: bool) -> TierProfile:
    """A tier whose sample has exponential sizes around the given means (seeded)."""
    rng = np.random.default_rng(len(name))
    hours = [HOUR + dt.timedelta(hours=i) for i in range(len(UPSTREAM))]
    gpu, g, model = (
        ("NVIDIA H100 80GB HBM3", 4, "llama-3.1-70b-instruct")
        if big
        else ("NVIDIA L4", 1, "llama-3.2-1b-instruct")
    )
    return TierProfile(
        name, 800.0, 8.0, 1.0, (), (), prefill, g, gpu, 1,
        np.ceil(rng.exponential(prompt, 4000)), np.ceil(rng.exponential(output, 4000)),
        pl.DataFrame({"hour": hours, "requests": UPSTREAM, "upstream": UPSTREAM}), 0.0, 1,
        model_name=model,
    )  # fmt: skip


def _sim(large_prompt: float = 4000.0, **kw: object) -> Simulator:
    profiles = {
        "large": _tier("large", large_prompt, 300.0, prefill=200_000.0, big=True),
        "small": _tier("small", 400.0, 60.0, prefill=20_000.0, big=False),
    }
    hours = [HOUR + dt.timedelta(hours=i) for i in range(len(UPSTREAM))]
    trace = Trace(profiles, hours, 2 * sum(UPSTREAM), 0.0, PRICES)
    return Simulator(trace, c_grid=(1, 4), **kw)  # type: ignore[arg-type]


ROUTE = Levers(route_small_share=0.5, autoscale=True)
PLAIN = Levers(autoscale=True)


@pytest.fixture(scope="module")
def sim() -> Simulator:
    """The plan before levers first, then the routed one (as `headline` plans them)."""
    s = _sim()
    s.plan(1, PLAIN)
    s.plan(1, ROUTE)
    return s


def test_routed_requests_need_more_small_replicas_than_the_small_tiers_own_sizes(
    sim: Simulator,
) -> None:
    """The small tier serves the routed rates with the routed requests' sizes: more
    replicas than its own sizes would need for the same rates (the old plan), every hour
    at least as many."""
    plan = sim.plan(1, ROUTE)
    small = plan.hourly.filter(pl.col("tier") == "small").sort("hour")
    own_sizes = [sim.replicas_for("small", Levers(), r) for r in small["rate_rps"]]
    assert all(a >= b for a, b in zip(small["replicas"], own_sizes, strict=True))
    assert small["replicas"].max() > max(own_sizes), (small["replicas"].to_list(), own_sizes)
    # the service model sees the mixture's longer outputs: a lower per-replica ceiling
    assert (
        sim.curve("small", ROUTE).per_replica.max() < sim.curve("small", Levers()).per_replica.max()
    )
    # the large tier keeps its own sizes (it loses a random share of its requests)
    assert sim.curve("large", ROUTE) is sim.curve("large", PLAIN)


def test_the_plain_plan_never_shares_the_routed_mixtures_cache_entries(sim: Simulator) -> None:
    """The plan before levers is the same whether or not a routed plan ran first, and the
    routed plan the same whether or not the plain one did."""
    plain_first = sim
    before, routed_after = plain_first.plan(1, PLAIN), plain_first.plan(1, ROUTE)
    routed_first = _sim()
    routed = routed_first.plan(1, ROUTE)
    before_after = routed_first.plan(1, PLAIN)
    assert before.hourly.equals(before_after.hourly)
    assert before.totals == before_after.totals
    assert routed.hourly.equals(routed_after.hourly)
    assert routed.totals == routed_after.totals
    small_curves = [k for k in routed_first._curves if k[0] == "small"]
    assert len(small_curves) == 2, small_curves
    # the mixture is drawn with the simulator's seed: a fresh simulator draws the same one
    a, b = plain_first.routed_sizes(ROUTE), routed_first.routed_sizes(ROUTE)
    assert a is not None and b is not None
    assert np.array_equal(a.prompt, b.prompt) and np.array_equal(a.output, b.output)


def test_the_note_gives_the_small_tiers_sizes_before_and_after_routing(sim: Simulator) -> None:
    plan = sim.plan(1, ROUTE)
    small, large = sim.trace.profiles["small"], sim.trace.profiles["large"]
    # the mixture's weights: small's own upstream calls and half of large's
    w_large = 0.5 * sum(UPSTREAM) / (sum(UPSTREAM) + 0.5 * sum(UPSTREAM))
    mix = sim.routed_sizes(ROUTE)
    assert mix is not None and mix.tier == "small"
    assert mix.weights["large"] == pytest.approx(w_large)
    assert len(mix.prompt) == len(small.prompt_tokens)
    (note,) = [n for n in plan.notes if "keep their sizes" in n]
    nums = [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", note)]
    share, pct, pct_large, p0, p1, o0, o1 = nums
    assert (share, pct, pct_large) == (0.5, round(100 * w_large), round(100 * w_large))
    assert p0 == round(small.prompt_tokens.mean()) and o0 == round(small.output_tokens.mean())
    # the figures are the planned mixture's, a sample of the weighted means
    assert (p1, o1) == (round(mix.prompt.mean()), round(mix.output.mean()))
    mixed = lambda a, b: (1 - w_large) * a.mean() + w_large * b.mean()  # noqa: E731
    assert p1 == pytest.approx(mixed(small.prompt_tokens, large.prompt_tokens), rel=0.1)
    assert o1 == pytest.approx(mixed(small.output_tokens, large.output_tokens), rel=0.1)
    assert p1 > 2 * p0 and o1 > 2 * o0
    # without routing, no such note
    assert not any("keep their sizes" in n for n in sim.plan(1, PLAIN).notes)


def test_a_cap_applies_to_the_routed_mixture(sim: Simulator) -> None:
    capped = Levers(route_small_share=0.5, token_cap=1000)
    prompt, _ = sim._sizes(sim.trace.profiles["small"], capped)
    assert prompt.max() <= 1000
    assert any("capped at 1,000 tokens" in n for n in sim._lever_notes(capped, 0.0))


def test_routed_prompts_that_no_replica_count_can_prefill_in_time_name_the_lever() -> None:
    """Routed 30,000-token prompts take 1.5 s to prefill on the small tier: its 1 s SLO,
    set by its own requests, stays, and the error names the routing lever."""
    sim = _sim(large_prompt=30_000.0)
    with pytest.raises(ValueError, match=r"route-small-share 0\.5.*prefill") as e:
        sim.plan(1, ROUTE)
    assert "small" in str(e.value)
    assert sim.slo_for("small") == 1000.0  # the lever does not move the goalposts
    assert sim.ttft_floor_ms("small") < 200  # its own requests prefill well within it
