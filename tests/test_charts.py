"""finops.charts: every chart builds from finops.costs frames, has tooltips, renders to SVG offline."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import altair as alt
import polars as pl
import pytest

import finops
import finops.charts as ch
import finops.costs as fc
from finops.lake import Lake
from tests.test_costs import T0, _gpu_rows, _request_rows, _serving_rows


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("charts") / "lake"
    lake = Lake(path, fsync=False)
    now = T0 + dt.timedelta(days=30)
    lake.append("gpu_samples", _gpu_rows(), source="test", now=now)
    lake.append("requests", _request_rows(), source="test", now=now)
    lake.append("serving_samples", _serving_rows(), source="test", now=now)
    con = finops.connect(path)
    yield con
    con.close()


def _charts(db) -> dict[str, alt.TopLevelMixin]:
    w = "2026-W47"
    return {
        "utilization": ch.utilization_over_time(fc.utilization(db, week=w)),
        "idle": ch.idle_heatmap(fc.idle(db, week=w)),
        "idle_small": ch.idle_heatmap(fc.idle(db, week=w), tier="small", value="idle_share"),
        "cost": ch.cost_bars(fc.by_tenant(db, week=w)),
        "cost_tokens": ch.cost_bars(fc.by_feature(db, week=w), value="usd_per_1m_input_tokens"),
        "leakage": ch.leakage_waterfall(fc.leakage(db, week=w)),
        "cache": ch.cache_savings_bars(fc.cache_savings(db, week=w)),
        "tokens": ch.token_distribution_chart(fc.token_distribution(db, caps={"chat": 300})),
    }


def _has_tooltip(spec: dict) -> bool:
    if isinstance(spec, dict):
        if "tooltip" in spec.get("encoding", {}):
            return True
        return any(_has_tooltip(v) for v in spec.values())
    if isinstance(spec, list):
        return any(_has_tooltip(v) for v in spec)
    return False


def test_charts_render_to_svg_with_tooltips(db, artifacts_dir: Path) -> None:
    for name, chart in _charts(db).items():
        spec = chart.to_dict()
        assert _has_tooltip(spec), name
        svg = ch.to_svg(chart)
        assert svg.lstrip().startswith("<svg") and "</svg>" in svg, name
        assert len(svg) > 2000, name  # marks were drawn, not an empty canvas
        (artifacts_dir / f"chart_{name}.svg").write_text(svg)


def test_chart_data_matches_costs(db) -> None:
    leak = fc.leakage(db, week="2026-W47")
    spec = ch.leakage_waterfall(leak).to_dict()
    rows = next(iter(spec["datasets"].values()))
    bill = next(r for r in rows if r["category"] == "GPU bill")
    assert bill["end"] == pytest.approx(fc.totals(db, week="2026-W47")["gpu_cost"], abs=0.005)
    heat = ch.idle_heatmap(fc.idle(db, week="2026-W47")).to_dict()
    cells = next(iter(heat["datasets"].values()))
    assert sum(c["idle_cost"] for c in cells) == pytest.approx(
        fc.totals(db, week="2026-W47")["idle_capacity_cost"]
    )
    assert {c["day"] for c in cells} == {"Mon"}
    util = ch.utilization_over_time(fc.utilization(db, week="2026-W47")).to_dict()
    assert "SM activity" in json.dumps(util) and "GPU_UTIL" in json.dumps(util)


def test_bad_frames_name_the_columns(db) -> None:
    with pytest.raises(ValueError, match=r"idle_heatmap: frame lacks column\(s\)"):
        ch.idle_heatmap(pl.DataFrame({"x": [1]}))
    with pytest.raises(ValueError, match="no tier 'huge'"):
        ch.idle_heatmap(fc.idle(db), tier="huge")
    with pytest.raises(ValueError, match="value must be"):
        ch.idle_heatmap(fc.idle(db), value="cost")
    with pytest.raises(ValueError, match="leakage_waterfall"):
        ch.leakage_waterfall(fc.by_tenant(db))
