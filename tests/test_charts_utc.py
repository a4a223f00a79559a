"""Charts labelled UTC draw UTC whatever the viewer's time zone.

Vega-Lite draws `:T` fields in the renderer's local zone unless the scale is
utc (axes) or the time unit is utc (tooltips): under TZ=America/Los_Angeles the
first day tick used to sit 8 hours into the axis.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest

import finops.charts as ch
from finops.models.charts import latency_fit_chart, replicas_chart, throughput_fit_chart
from finops.models.latency import LatencyFit
from finops.models.regressors import hill
from finops.models.simulate import Levers, Plan
from finops.models.throughput import fit_frame

T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)  # a Monday
HOURS = [T0 + dt.timedelta(hours=h) for h in range(48)]


def _temporal(spec: Any, channel: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (channel, field definition) of type temporal in a Vega-Lite spec."""
    if isinstance(spec, dict):
        if spec.get("type") == "temporal" and "field" in spec:
            yield channel, spec
        for k, v in spec.items():
            if k != "datasets":
                yield from _temporal(v, k if k not in ("items",) else channel)
    elif isinstance(spec, list):
        for v in spec:
            yield from _temporal(v, channel)


def _not_utc(spec: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Temporal fields drawn in local time: a tooltip needs a utc time unit, an axis a utc scale."""
    bad = []
    for channel, enc in _temporal(spec):
        utc_unit = str(enc.get("timeUnit", "")).startswith("utc")
        utc_scale = (enc.get("scale") or {}).get("type") == "utc"
        if not (utc_unit if channel in ("tooltip", "text") else utc_scale or utc_unit):
            bad.append((channel, enc))
    return bad


def _util() -> pl.DataFrame:
    n = len(HOURS)
    return pl.DataFrame(
        {"hour": HOURS, "tier": ["small"] * n, "gpus": [1] * n}
        | {"sm_active": [0.1] * n, "gpu_util": [0.5] * n}
    )


def _intervals() -> pl.DataFrame:
    t = [T0 + dt.timedelta(minutes=5 * i) for i in range(2 * 288)]
    c = np.linspace(1, 40, len(t))
    return pl.DataFrame(
        {"t": t, "tier": "x", "concurrency": c, "mean_prompt": 600.0, "mean_output": 200.0}
        | {"gen_tps": hill(c, 120.0, 12.0, 1.0)}
    ).with_columns(day=pl.col("t").dt.date())


def _charts() -> dict[str, Any]:
    df = _intervals()
    lat = LatencyFit(
        tier="x", metric="ttft", quantile="q95", model=None, mape_holdout=0.1, n_train=1,  # type: ignore[arg-type]
        n_test=1, data=df.select("t", load="concurrency", observed=pl.lit(0.1),
                                 predicted=pl.lit(0.1), split=pl.lit("train")),
    )  # fmt: skip
    hourly = pl.DataFrame(
        {"hour": HOURS, "tier": "small", "rate_rps": 1.0, "replicas": 1, "gpus": 1, "util": 0.5}
    )
    plan = Plan(1.0, Levers(autoscale=True), 1000.0, hourly, pl.DataFrame(), {})
    return {
        "utilization_over_time": ch.utilization_over_time(_util()),
        "throughput_fit_chart": throughput_fit_chart(fit_frame(df, tier="x")),
        "latency_fit_chart": latency_fit_chart(lat),
        "replicas_chart": replicas_chart(plan),
    }


@pytest.mark.parametrize("name", list(_charts()))
def test_every_temporal_field_of_a_chart_is_utc(name: str) -> None:
    spec = _charts()[name].to_dict()
    assert list(_temporal(spec)), f"{name}: expected temporal fields to check"
    assert not _not_utc(spec), f"{name}: drawn in local time: {_not_utc(spec)}"


def _first_tick_x(svg: str, label: str) -> float:
    m = re.search(rf'<text[^>]*transform="translate\(([-\d.]+),[-\d.]+\)"[^>]*>{label}</text>', svg)
    assert m, f"no {label!r} tick in the SVG"
    return float(m.group(1))


RENDER = """
import datetime as dt, sys
import polars as pl
import finops.charts as ch
hours = [dt.datetime(2026, 11, 16, tzinfo=dt.UTC) + dt.timedelta(hours=h) for h in range(48)]
n = len(hours)
util = pl.DataFrame({"hour": hours, "tier": ["small"] * n, "gpus": [1] * n,
                     "sm_active": [0.1] * n, "gpu_util": [0.5] * n})
sys.stdout.write(ch.to_svg(ch.utilization_over_time(util)))
"""


def test_svg_axis_starts_at_utc_midnight_in_a_west_coast_time_zone() -> None:
    """The report renders through vl-convert in the process's zone: midnight UTC is x=0."""
    env = {**os.environ, "TZ": "America/Los_Angeles"}
    svg = subprocess.run(
        [sys.executable, "-c", RENDER], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert _first_tick_x(svg, "Mon 16") == 0.0
    assert "Tue 17" in svg


@pytest.fixture(scope="module")
def lake_w49(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """W49 whole (Mon 30 Nov .. Sun 6 Dec 2026) and Mon 7 Dec of W50."""
    from finops.demo import generate

    lake = tmp_path_factory.mktemp("w49") / "lake"
    generate(lake, days=8, seed=1, gpus=6, scale=0.02, start=dt.date(2026, 11, 30))
    return lake


def _run_notebook_04(tmp_path: Path) -> str:
    import papermill as pm

    from finops.report.build import NOTEBOOK

    executed = tmp_path / "run.ipynb"
    pm.execute_notebook(
        str(NOTEBOOK), str(executed), kernel_name="python3", progress_bar=False, cwd=str(tmp_path)
    )
    return executed.read_text().replace("\\n", "\n").replace('\\"', '"')


def test_notebook_04_reports_the_lakes_latest_whole_week_in_utc(
    lake_w49: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened on another lake (FINOPS_LAKE, no week given), notebook 04 reports that lake's
    latest whole week, not a hard-coded one; its hourly chart starts at UTC midnight."""
    monkeypatch.setenv("FINOPS_LAKE", str(lake_w49))
    monkeypatch.setenv("TZ", "America/Los_Angeles")
    monkeypatch.delenv("FINOPS_WEEK", raising=False)
    text = _run_notebook_04(tmp_path)
    assert "GPU cost report 2026-W49" in text
    hourly = next(s for s in re.findall(r"<svg.*?</svg>", text, re.S) if "Requests per hour" in s)
    assert _first_tick_x(hourly, "Mon 30") == 0.0


def test_notebook_04_takes_the_week_from_finops_week(
    lake_w49: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINOPS_LAKE", str(lake_w49))
    monkeypatch.setenv("FINOPS_WEEK", "2026-W50")
    assert "GPU cost report 2026-W50" in _run_notebook_04(tmp_path)
