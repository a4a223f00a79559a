"""One GPU for one hour: valid lakes that must not crash notebook 01 or mislabel the forecast.

An idle GPU (SM activity 0) has no finite GPU_UTIL / SM ratio, and a GPU model the price
catalog does not list has GPU metrics but no spend: the notebook and the report say so
instead of dividing by zero or blaming missing GPU metrics.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import pytest

import finops
import finops.costs as fc
from finops import Lake
from finops.report.build import summary_markdown
from finops.report.figures import _forecast, _takeaways, compute
from tests.test_notebook_odd_lakes import _run

NB01 = Path(__file__).resolve().parent.parent / "notebooks" / "01_gpu_utilization.ipynb"
WEEK = "2026-W49"
T0 = dt.datetime(2026, 11, 30, 23, 0, tzinfo=dt.UTC)  # the last hour of W49's Monday


def _lake(path: Path, *, sm: float | None, gpu_util: float = 0.0, requests: int = 0) -> Path:
    """One NVIDIA L4 sampled every 30 s for one hour (none when sm is None), and
    `requests` requests on its tier."""
    gpu = [
        dict(
            ts=T0 + dt.timedelta(seconds=30 * k),
            source="dcgm",
            host="node-1",
            gpu_uuid="GPU-0",
            gpu_index=0,
            gpu_model="NVIDIA L4",
            namespace="llm",
            pod="vllm-mid-0",
            labels='{"tier":"mid"}',
            field=field,
            value=value,
        )
        for k in range(120)
        for field, value in (("DCGM_FI_PROF_SM_ACTIVE", sm), ("DCGM_FI_DEV_GPU_UTIL", gpu_util))
    ]
    lake = Lake(path)
    if sm is not None:
        lake.append("gpu_samples", gpu, source="test")
    if requests:
        rows = [
            dict(
                request_id=f"r{i}",
                ts=T0 + dt.timedelta(minutes=10 * i),
                source="shim",
                tenant="acme",
                feature="chat",
                tier="mid",
                request_model="m",
                input_tokens=1000,
                output_tokens=100,
                cached_input_tokens=0,
                status_code=200,
                stream=False,
            )
            for i in range(requests)
        ]
        lake.append("requests", rows, source="test")
    return path


def _h100_only(tmp_path: Path) -> Path:
    """A valid catalog without an L4 price."""
    p = tmp_path / "h100_only.csv"
    p.write_text("gpu_model,pricing_kind,usd_per_gpu_hour\nH100 80GB HBM3,on_demand,3.90\n")
    return p


def _run_nb01(lake: Path, **env: str) -> tuple[list[str], str]:
    """Execute notebook 01 on `lake` as the other notebook tests do: (errors, printed text)."""
    return _run(NB01, lake, **env)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("gpu_util", "said"),
    [
        # all idle: both signals read 0, nothing is overstated
        (0.0, "reads 0% too: the GPUs did no SM work"),
        # a decode kernel keeps GPU_UTIL up while no SM works: no finite ratio
        (60.0, "reads 60% although the GPUs did no SM work: it overstates it without bound"),
    ],
)
def test_nb01_runs_on_a_gpu_with_no_sm_activity(tmp_path: Path, gpu_util: float, said: str) -> None:
    """SM_ACTIVE = 0 raised ZeroDivisionError in the GPU_UTIL vs SM cell (gpu_util / sm)."""
    errors, text = _run_nb01(_lake(tmp_path / "lake", sm=0.0, gpu_util=gpu_util))
    assert not errors, f"notebook 01 on an SM-idle L4 (GPU_UTIL {gpu_util}%) failed: {errors}"
    assert said in text, f"expected {said!r} in notebook 01's text:\n{text}"
    for bad in ("inf×", "nan×", "NaN"):
        assert bad not in text, f"notebook 01 printed a non-finite ratio {bad!r}:\n{text}"


@pytest.mark.slow
def test_nb01_runs_on_a_gpu_the_catalog_does_not_price(tmp_path: Path) -> None:
    """gpu_cost $0 / NULL raised ZeroDivisionError (idle share) and TypeError (None:,.2f)."""
    lake = _lake(tmp_path / "lake", sm=0.25, gpu_util=60.0, requests=3)
    errors, text = _run_nb01(lake, FINOPS_PRICES=str(_h100_only(tmp_path)))
    assert not errors, f"notebook 01 on an unpriced L4 failed: {errors}"
    assert "no catalog price for NVIDIA L4" in text, text
    assert "Idle dollars are unknown: the catalog has no price for NVIDIA L4" in text, text
    assert "overstates the work done by **2.4×**" in text, text


def test_forecast_on_an_unpriced_gpu_names_the_missing_price(tmp_path: Path) -> None:
    """GPU-hours without a catalog price: the forecast spend is unknown for that reason,
    not for 'no GPU metrics' (the JSON says gpu_samples = True in the same report)."""
    lake = _lake(tmp_path / "lake", sm=0.25, gpu_util=60.0, requests=3)
    db = finops.connect(lake, prices=_h100_only(tmp_path))
    r = compute(db, WEEK, growth=False)
    assert r["sources"]["gpu_samples"] is True
    fo = r["forecast"]
    assert fo["requests"] == pytest.approx(21.0), fo
    assert fo["spend_usd"] is None, f"forecast.spend_usd: expected None (unpriced), got {fo}"
    assert "no price for on_demand NVIDIA L4" in fo["spend_note"], fo
    summary = summary_markdown(r)
    line = next((s for s in summary.splitlines() if "Next week" in s), "")
    assert "no GPU metrics" not in line, f"summary.md blames missing GPU metrics: {line!r}"
    assert "GPU spend unknown: the price catalog has no price for on_demand NVIDIA L4" in line, (
        f"summary.md forecast line: {line!r}"
    )
    assert "data/prices.csv" in line and "$FINOPS_PRICES" in line, line


def test_forecast_without_gpu_samples_still_says_no_gpu_metrics(tmp_path: Path) -> None:
    """The other unknown: requests but no GPU samples at all."""
    r = compute(_lake(tmp_path / "lake", sm=None, requests=3), WEEK, growth=False)
    assert r["sources"]["gpu_samples"] is False
    assert r["forecast"]["spend_usd"] is None
    line = r["takeaways"]["forecast"]
    assert "; GPU spend unknown: no GPU metrics." in line, line


def test_forecast_with_some_gpus_unpriced_says_what_its_spend_leaves_out() -> None:
    """Priced and unpriced GPUs mixed: a spend is forecast, and the line names the GPU-hours
    it counts as $0 (hand-built series, as _hourly_series returns them)."""
    per = fc.period(WEEK)
    assert per.start is not None
    hours = 24
    series = pl.DataFrame(
        {
            "hour": [per.start + dt.timedelta(hours=h) for h in range(hours)],
            "requests": [10] * hours,
            "spend": [3.9] * hours,
            "has_gpu": [True] * hours,
            "priced": [True] * hours,
            "unpriced_gpu_hours": [0.5] * hours,
            "unpriced_models": [["on_demand NVIDIA L4"]] * hours,
        }
    )
    fo = _forecast(series, per)
    assert fo["spend_usd"] == pytest.approx(168 * 3.9), fo
    assert fo["spend_note"].startswith(
        "counts 12 GPU-hours of on_demand NVIDIA L4 in its history"
    ), fo
    r = {
        "headline": {"spend_usd": {"value": None}},
        "sources": {"gpu_samples": True},
        "breakdown": {},
        "idle": {"troughs": []},
        "cache": {"layers": []},
        "leakage": {"categories": []},
        "router": {},
        "anomalies": {"hours": [], "tenants": []},
        "forecast": fo,
    }
    line = _takeaways(r)["forecast"]
    # one day, no week before it: no trend to apply, and the day's hours stand for the week
    assert (
        "of GPU spend (no earlier week to measure a trend: none applied). "
        "The spend counts 12 GPU-hours" in line
    ), line
    assert line.endswith("It rests on 1 day of the week with traffic: the other days repeat "
                         "their hours."), line  # fmt: skip


def test_headline_and_report_dollars_are_unknown_when_no_gpu_is_priced(tmp_path: Path) -> None:
    """GPU-hours measured but none priced by the catalog: the headline and the report's
    headline said 'GPU bill $0.00' and '$0.00/1k' next to a forecast saying the spend is
    unknown. Every dollar figure is now unknown; the GPU-hours and utilization stay."""
    lake = _lake(tmp_path / "lake", sm=0.25, gpu_util=60.0, requests=3)
    db = finops.connect(lake, prices=_h100_only(tmp_path))
    h = fc.headline(db, week=WEEK)
    assert h["gpu_hours"] == pytest.approx(1.0) and h["utilization"] == pytest.approx(0.25)
    assert h["idle_time_share"] == pytest.approx(0.75)
    for key in ("gpu_cost", "idle_capacity_cost", "cost_per_1k_requests"):
        assert h[key] is None, f"headline[{key!r}]: expected None (unpriced), got {h[key]!r}"
    line = fc.format_headline(h)
    assert "GPU bill unknown for 1 GPU-hours" in line and "$0.00" not in line, line
    r = compute(db, WEEK, growth=False)
    head = r["headline"]
    assert head["spend_usd"]["value"] is None, head["spend_usd"]
    assert head["usd_per_1k_requests"]["value"] is None, head["usd_per_1k_requests"]
    assert head["gpu_hours"]["value"] == pytest.approx(1.0), head["gpu_hours"]
