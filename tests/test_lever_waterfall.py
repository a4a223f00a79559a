"""Where the saving comes from: the growth plan's levers as a cumulative waterfall.

`finops.models.waterfall.lever_waterfall` adds the levers a scenario sets one at a time, in a
fixed order, so the steps add up to before - after (run alone, the levers overlap); the
same table is in `finops simulate` (text and JSON, `--default-levers`), notebook 02 and the
charts. Figures are never hard-coded: the simulator's sizing moves them, so the tests assert
relations (sums, first/last rows equal the plans, order, the values in the words).

The lake is the tests' two-day synthetic one (tiers 'small' on L4 and 'large' on H100).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

import finops
import finops.charts as ch
from finops.cli import app
from finops.lake import Lake
from finops.models.simulate import Levers, Simulator, default_levers
from finops.models.synthetic import SyntheticSpec, write_synthetic_lake
from finops.models.waterfall import (
    LEVER_ORDER,
    REPLICA_NOTE,
    describe_lever,
    describe_levers,
    lever_waterfall,
    set_levers,
    top_levers,
)
from tests.test_planner_fixes import _sharing

GROWTH = 5.0
TOTALS = ("gpu_hours", "cost_usd", "cost_per_1k_requests")
SAVED = {"gpu_hours": "saved_gpu_hours", "cost_usd": "saved_usd", "cost_per_1k_requests": "saved_per_1k"}  # fmt: skip


@pytest.fixture(scope="module")
def syn_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lake = Lake(tmp_path_factory.mktemp("waterfall") / "lake")
    write_synthetic_lake(lake, SyntheticSpec(days=2, scrape_s=180))
    return lake.path


@pytest.fixture(scope="module")
def sim(syn_lake: Path) -> Simulator:
    return Simulator.from_lake(finops.connect(syn_lake))


@pytest.fixture(scope="module")
def wf(sim: Simulator) -> pl.DataFrame:
    """The default scenario's waterfall at 5x (the demo's and weekly report's levers)."""
    return lever_waterfall(sim, GROWTH)


def _priced(sim: Simulator, prices: pl.DataFrame) -> Simulator:
    """`sim` with another price list, reusing its searched capacities (prices move none)."""
    return _sharing(sim, dataclasses.replace(sim.trace, prices=prices))


@pytest.fixture
def cli_sim(sim: Simulator, monkeypatch: pytest.MonkeyPatch):
    """`finops simulate` plans on a simulator sharing the module's curves (the CLI still opens
    the lake and picks the period); call the result with a price list to plan with it."""

    def use(prices: pl.DataFrame | None = None) -> Simulator:
        s = _priced(sim, sim.trace.prices if prices is None else prices)
        monkeypatch.setattr(Simulator, "from_lake", lambda db, **kw: s)
        return s

    use()
    return use


def _cli(*args: str) -> tuple[int, str, str]:
    r = CliRunner().invoke(app, ["simulate", *args])
    return r.exit_code, r.stdout, r.stderr


# ----------------------------------------------------------------------------- the frame


def test_the_steps_add_up_to_before_minus_after(sim: Simulator, wf: pl.DataFrame) -> None:
    before, after = sim.plan(GROWTH, Levers()), sim.plan(GROWTH, default_levers(sim))
    first, last = wf.row(0, named=True), wf.row(-1, named=True)
    for col in TOTALS:
        assert first[col] == before.totals[col] and last[col] == after.totals[col], col
        steps = wf[SAVED[col]].drop_nulls()
        assert steps.len() == wf.height - 1
        assert steps.sum() == pytest.approx(first[col] - last[col], rel=1e-12, abs=1e-9), col
        # each step against the one above it
        assert steps.to_list() == pytest.approx((-wf[col].diff()).drop_nulls().to_list())
    assert first["saved_usd"] is None and first["share_of_saving"] is None
    assert wf["share_of_saving"].drop_nulls().sum() == pytest.approx(1.0)
    assert last["cost_usd"] < first["cost_usd"] and wf["saved_usd"].max() > 0
    assert wf["requests"].n_unique() == 1  # the levers move requests, never drop them


def test_only_the_levers_set_appear_in_the_documented_order(sim: Simulator, wf) -> None:
    assert LEVER_ORDER == ("cache_hit_rate", "route_small_share", "token_cap", "max_num_seqs",
                           "autoscale", "reserved_baseline", "spot_share")  # fmt: skip
    assert set(LEVER_ORDER) == {f.name for f in dataclasses.fields(Levers)}
    # the default scenario sets every lever but the batch limit
    assert wf["lever"].to_list() == ["none", "cache_hit_rate", "route_small_share", "token_cap",
                                     "autoscale", "reserved_baseline", "spot_share"]  # fmt: skip
    assert wf["step"].to_list() == list(range(wf.height))
    # the scenario's field order never matters; a lever at its default gets no step
    some = Levers(spot_share=0.5, autoscale=True, route_small_share=0.3, cache_hit_rate=None)
    w = lever_waterfall(sim, 2, some)
    assert w["lever"].to_list() == ["none", "route_small_share", "autoscale", "spot_share"]
    assert w.row(-1, named=True)["gpu_hours"] == sim.plan(2, some).totals["gpu_hours"]
    assert w.row(-1, named=True)["cost_usd"] == sim.plan(2, some).totals["cost_usd"]
    # a hit rate of 0 is a setting (no hits), not the default (as observed)
    assert set_levers(Levers(cache_hit_rate=0.0)) == ["cache_hit_rate"]
    every = Levers(0.1, 0.2, 100, 64, True, True, 0.3)
    assert set_levers(every) == list(LEVER_ORDER)
    # no lever: the plan alone, nothing to attribute
    none = lever_waterfall(sim, GROWTH, Levers())
    assert none.height == 1 and none["setting"].to_list() == ["no levers"]
    assert none["saved_usd"].to_list() == [None] and describe_levers(sim, Levers()) == "no levers"
    assert "No lever is set" in top_levers(none)


def test_descriptions_carry_the_real_values(sim: Simulator, wf: pl.DataFrame) -> None:
    dl = default_levers(sim)
    said = dict(zip(wf["lever"], wf["setting"], strict=True))
    hit, seen = 100 * dl.cache_hit_rate, 100 * sim.trace.observed_hit_rate
    assert said["cache_hit_rate"] == f"response cache hit rate {hit:.1f}% (observed {seen:.1f}%)"
    assert said["route_small_share"] == (
        f"20% of larger-tier requests routed to {sim.smallest_tier()}"
    )
    prompts = np.concatenate([p.prompt_tokens for p in sim.trace.profiles.values()])
    longer = 100 * float((prompts > dl.token_cap).mean())
    assert said["token_cap"] == (
        f"input capped at {dl.token_cap:,} tokens ({longer:.3g}% of sampled prompts are longer)"
    )
    assert said["autoscale"] == "autoscaling on queue depth"
    assert said["reserved_baseline"] == "always-on floor at reserved prices"
    assert said["spot_share"] == "30% of burst GPU-hours on spot"
    line = describe_levers(sim, Levers(spot_share=0.45, max_num_seqs=64, token_cap=1234,
                                       route_small_share=0.125, cache_hit_rate=0.25))  # fmt: skip
    parts = ["response cache hit rate 25.0%", "12.5% of larger-tier requests",
             "input capped at 1,234 tokens", "vLLM batch limit 64 sequences per replica",
             "45% of burst GPU-hours on spot"]  # fmt: skip
    at = [line.index(p) for p in parts]  # all there, in waterfall order
    assert at == sorted(at), line
    assert describe_lever(sim, "autoscale", False) == "fixed fleet (sized by the peak need)"
    # the sentence for the notebook names the steps that save the most, with their dollars
    best = wf.filter(pl.col("step") > 0).sort("saved_usd", descending=True).row(0, named=True)
    text = top_levers(wf)
    assert f"**{best['setting']}** (${best['saved_usd']:,.0f}" in text
    assert "measured after the levers above it" in text
    # a share is replicas freed under the SLO, not tokens avoided: the sentence says so
    assert REPLICA_NOTE in text and "whole replicas" in text
    title = ch.lever_waterfall_chart(wf).to_dict()["title"]
    assert "whole replicas" in title["subtitle"]


def test_unknown_costs_are_null_never_nan(sim: Simulator) -> None:
    prices = sim.trace.prices
    # one tier unpriced: the plans' cost figures are the priced tiers' only, and still add up
    part = lever_waterfall(_priced(sim, prices.filter(pl.col("gpu_model") != "NVIDIA L4")))
    assert part["cost_usd"].null_count() == 0
    assert part["saved_usd"].drop_nulls().sum() == pytest.approx(
        part["cost_usd"][0] - part["cost_usd"][-1]
    )
    # no tier priced: every cost and dollar saving unknown (null), GPU-hours still known
    s = _priced(sim, prices.clear())
    w = lever_waterfall(s)
    for col in ("cost_usd", "cost_per_1k_requests", "saved_usd", "saved_per_1k", "share_of_saving"):
        assert w[col].null_count() == w.height, col
    assert not any(w.select(pl.col(pl.Float64).is_nan().any()).row(0))
    assert w["saved_gpu_hours"].drop_nulls().sum() == pytest.approx(
        w["gpu_hours"][0] - w["gpu_hours"][-1]
    )
    text = top_levers(w)
    assert "GPU-h" in text and "nan" not in text.lower()
    with pytest.raises(ValueError, match="gpu_hours"):
        ch.lever_waterfall_chart(w)  # no dollars to chart
    assert ch.lever_waterfall_chart(w, "gpu_hours").to_dict()["encoding"]["tooltip"]


def test_a_step_that_cannot_be_planned_names_the_lever(sim: Simulator) -> None:
    """An on-demand-only price list: the reserved floor has no price to buy it at."""
    od = _priced(sim, sim.trace.prices.filter(pl.col("pricing_kind") == "on_demand"))
    with pytest.raises(ValueError, match=r"waterfall step \d+, reserved_baseline \(always-on"
                       r" floor at reserved prices\): .*--reserved-baseline needs a reserved"):  # fmt: skip
        lever_waterfall(od, GROWTH)


def test_the_chart_stacks_the_steps(wf: pl.DataFrame) -> None:
    chart = ch.lever_waterfall_chart(wf)
    spec = chart.to_dict()
    (bars,) = spec["datasets"].values()
    assert bars[0]["label"] == "no levers" and bars[-1]["label"] == "with levers"
    assert bars[0]["end"] == wf["cost_usd"][0] and bars[-1]["end"] == wf["cost_usd"][-1]
    for above, step in itertools.pairwise(bars[:-1]):  # each step floats from the last
        assert step["start"] == above["end"]
    assert {b["kind"] for b in bars[1:-1]} <= {"saving", "increase"}
    assert "<svg" in ch.to_svg(chart)
    with pytest.raises(ValueError, match="value must be one of"):
        ch.lever_waterfall_chart(wf, "requests")


# ----------------------------------------------------------------------------- the CLI


def test_cli_json_with_default_levers(syn_lake: Path, sim: Simulator, wf) -> None:
    """End to end (the lake read again): the default scenario and its waterfall in JSON."""
    code, out, err = _cli("--lake", str(syn_lake), "--default-levers", "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["levers"] == dataclasses.asdict(default_levers(sim))
    assert doc["scenario"] == describe_levers(sim, default_levers(sim))
    steps = doc["waterfall"]
    assert [s["lever"] for s in steps] == wf["lever"].to_list()
    assert steps[0]["cost_usd"] == pytest.approx(doc["before"]["cost_usd"])
    assert steps[-1]["cost_usd"] == pytest.approx(doc["after"]["cost_usd"])
    assert sum(s["saved_usd"] for s in steps[1:]) == pytest.approx(
        doc["before"]["cost_usd"] - doc["after"]["cost_usd"]
    )


def test_cli_table_prints_the_waterfall_only_with_levers(syn_lake: Path, cli_sim, wf) -> None:
    code, out, err = _cli("--lake", str(syn_lake), "--default-levers")
    assert code == 0, err
    assert "no levers vs the default levers" in out and "where the saving comes from" in out
    table = out[out.index("where the saving comes from") :]
    flags = ["--cache-hit-rate", "--route-small-share", "--token-cap", "--autoscale",
             "--reserved-baseline", "--spot-share"]  # fmt: skip
    at = [table.index(f) for f in flags]
    assert at == sorted(at) and "--max-num-seqs" not in table
    # the line adds up as printed: cents read off the output, not the unrounded floats
    got = re.search(
        r"steps add up to the whole saving, \$([\d,.]+) - \$([\d,.]+) = \$([\d,.]+)", out
    )
    assert got, out
    a, b, c = (float(x.replace(",", "")) for x in got.groups())
    assert (a, b) == (round(wf["cost_usd"][0], 2), round(wf["cost_usd"][-1], 2))
    assert round(a - b, 2) == c
    assert "depends on the order" in out and "$nan" not in out
    # no lever: today's output, no empty waterfall
    code, out, err = _cli("--lake", str(syn_lake))
    assert code == 0, err
    assert "where the saving comes from" not in out and "levers:" not in out
    assert "no lever set, so both sides are the same plan: --default-levers" in out
    code, out, err = _cli("--lake", str(syn_lake), "--format", "json")
    assert code == 0 and "waterfall" not in json.loads(out)


def test_cli_flags_override_the_default_levers(syn_lake: Path, cli_sim, sim) -> None:
    dl = default_levers(sim)
    args = ["--lake", str(syn_lake), "--default-levers", "--spot-share", "0.5", "--fixed"]
    code, out, err = _cli(*args, "--format", "json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["levers"] == dataclasses.asdict(
        dataclasses.replace(dl, spot_share=0.5, autoscale=False)
    )
    steps = {s["lever"]: s["setting"] for s in doc["waterfall"]}
    assert "autoscale" not in steps and steps["spot_share"] == "50% of burst GPU-hours on spot"
    assert any("spot share 0.5 changes nothing" in n for n in doc["after"]["notes"])
    code, out, err = _cli(*args)
    assert code == 0, err
    assert "no levers vs the default levers (--autoscale, --spot-share overridden)" in out
    # without --default-levers the flags alone are the scenario, as before
    code, out, err = _cli("--lake", str(syn_lake), "--autoscale", "--route-small-share", "0.2",
                          "--format", "json")  # fmt: skip
    assert code == 0, err
    doc = json.loads(out)
    assert doc["levers"] == dataclasses.asdict(Levers(route_small_share=0.2, autoscale=True))
    assert [s["lever"] for s in doc["waterfall"]] == ["none", "route_small_share", "autoscale"]


def test_cli_errors_name_the_flag(syn_lake: Path, cli_sim, sim) -> None:
    lake = ["--lake", str(syn_lake)]
    code, _, err = _cli(*lake, "--default-levers", "--route-small-share", "1.5")
    assert code == 2 and "error: --route-small-share must be between 0 and 1, got 1.5" in err
    code, _, err = _cli(*lake, "--spot-share", "-1")
    assert code == 2 and "error: --spot-share must be between 0 and 1" in err
    # a price list without reserved or spot prices: the default scenario's buying levers
    # cannot be priced; the error names them and how to plan without them
    cli_sim(sim.trace.prices.filter(pl.col("pricing_kind") == "on_demand"))
    code, _, err = _cli(*lake, "--default-levers")
    assert code == 2, err
    assert "--reserved-baseline needs a reserved price" in err
    assert "set by --default-levers: override with --no-reserved-baseline" in err
    code, out, err = _cli(*lake, "--default-levers", "--no-reserved-baseline", "--spot-share", "0")
    assert code == 0, err
    steps = out[out.index("where the saving comes from") :]  # the waterfall: no such step
    assert "--reserved-baseline" not in steps and "--spot-share" not in steps
    assert "--token-cap" in out  # the rest of the scenario is still planned


def test_cli_unknown_costs_read_na(syn_lake: Path, cli_sim, sim) -> None:
    cli_sim(sim.trace.prices.clear())
    code, out, err = _cli("--lake", str(syn_lake), "--default-levers")
    assert code == 0, err
    table = out[out.index("where the saving comes from") :]
    assert "n/a" in table and "$nan" not in out and "nan" not in table
    assert "the whole saving, n/a - n/a = n/a" in out
    code, out, err = _cli("--lake", str(syn_lake), "--default-levers", "--format", "json")
    assert code == 0, err
    steps = json.loads(out)["waterfall"]
    assert all(s["cost_usd"] is None and s["gpu_hours"] > 0 for s in steps)


def _waterfall(saved: dict[str, float]) -> pl.DataFrame:
    """A hand-built waterfall: the baseline, then one step per lever saving `saved`."""
    cost, rows = 1000.0, [("baseline", "", 1000.0, 0.0)]
    for lever, usd in saved.items():
        cost -= usd
        rows.append((lever, f"{lever} setting", cost, usd))
    return pl.DataFrame(
        {
            "step": list(range(len(rows))),
            "lever": [r[0] for r in rows],
            "setting": [r[1] for r in rows],
            "gpu_hours": [r[2] / 2 for r in rows],
            "cost_usd": [r[2] for r in rows],
            "saved_gpu_hours": [r[3] / 2 for r in rows],
            "saved_usd": [r[3] for r in rows],
        }
    )


def test_the_replica_caveat_only_with_a_lever_that_changes_replicas() -> None:
    """Reserved and spot pricing save on the same GPU-hours whatever the replica boundaries:
    the sentence carried the replica caveat when those two were the top levers."""
    prices = _waterfall({"cache_hit_rate": 10.0, "reserved_baseline": 300.0, "spot_share": 200.0})
    text = top_levers(prices)
    assert "**reserved_baseline setting**" in text and "**spot_share setting**" in text
    assert REPLICA_NOTE not in text and "measured after the levers above it" in text
    mixed = _waterfall({"autoscale": 250.0, "reserved_baseline": 300.0, "spot_share": 10.0})
    assert REPLICA_NOTE in top_levers(mixed)
