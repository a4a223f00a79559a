"""Chart axes say what they measure and in which unit (dollars, tokens/s), never a raw column name."""

from __future__ import annotations

import polars as pl
import pytest

import finops
import finops.charts as ch
from finops.lake import Lake
from finops.models import charts as mch
from finops.models.synthetic import busy_spec, write_synthetic_lake
from finops.models.throughput import fit_all


def _x(chart) -> dict:
    return chart.to_dict()["encoding"]["x"]


def test_cost_bars_value_axis_is_in_dollars_or_its_unit() -> None:
    tiers = pl.DataFrame(
        {"tier": ["small", "large"], "idle_cost": [12.5, 840.0], "idle_share": [0.4, 0.8]}
    )
    idle = _x(ch.cost_bars(tiers, "tier", value="idle_cost"))
    assert idle["title"] == "idle cost (USD)" and idle["axis"]["format"].startswith("$")
    share = _x(ch.cost_bars(tiers, "tier", value="idle_share"))
    assert share["title"] == "idle share" and share["axis"]["format"] == ".0%"


def test_cost_bars_per_unit_dollars_and_cost_shares_keep_their_scale() -> None:
    """Per-unit prices (cents or less) read "$0" on every tick of a whole-dollar axis, and
    cost_share was formatted as dollars."""
    tiers = pl.DataFrame(
        {
            "tier": ["small", "large"],
            "usd_per_1m_input_tokens": [0.12, 0.32],
            "cost_per_request": [0.0002, 0.064],
            "cost_share": [0.2, 0.8],
            "cost": [120.0, 4800.0],
        }
    )
    for col in ("usd_per_1m_input_tokens", "cost_per_request"):
        x = _x(ch.cost_bars(tiers, "tier", value=col))
        assert x["title"].endswith("(USD)") and x["axis"]["format"] == "$,.3~r", x
    share = _x(ch.cost_bars(tiers, "tier", value="cost_share"))
    assert share["title"] == "cost share" and share["axis"]["format"] == ".0%"
    # whole-dollar totals stay whole dollars
    assert _x(ch.cost_bars(tiers, "tier", value="cost"))["axis"]["format"] == "$,.0f"


@pytest.fixture(scope="module")
def fit(tmp_path_factory: pytest.TempPathFactory):
    lake = Lake(tmp_path_factory.mktemp("chart_units") / "lake")
    write_synthetic_lake(lake, busy_spec(scrape_s=180))
    fits = fit_all(finops.connect(lake.path), week="2026-W47")
    return fits["large"]


def test_throughput_fit_axes_carry_units(fit) -> None:
    left, right = mch.throughput_fit_chart(fit).to_dict()["hconcat"]
    y = left["layer"][0]["encoding"]["y"]
    assert y["title"] == "generation tokens/s per replica"
    assert "gen_tps" not in left["title"]
    enc = right["encoding"]
    assert enc["x"]["title"] == "predicted generation tokens/s per replica"
    assert enc["y"]["title"].startswith("residual: observed - predicted")
    assert "residuals of the fit" in right["title"]
