"""marts.gpu_gap_hourly: GPU-hours an exporter or collector outage drops from the bill are said."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake
from finops.report import figures

T0 = dt.datetime(2026, 11, 16, tzinfo=dt.UTC)  # Monday of 2026-W47
H100 = 4.00
NOTE = "have no GPU samples although the GPU reported before and after"


def _prices(tmp_path: Path) -> Path:
    p = tmp_path / "prices.csv"
    p.write_text(
        "gpu_model,pricing_kind,usd_per_gpu_hour\n"
        f"H100 80GB HBM3,on_demand,{H100}\nA100-SXM4-80GB,on_demand,2.00\n"
    )
    return p


def _samples(
    uuid: str,
    hours: list[int],
    *,
    model: str = "NVIDIA H100 80GB HBM3",
    mig: str | None = None,
    profile: str | None = None,
    pods: tuple[str, ...] = ("vllm-large-0",),
    host: str = "node-1",
) -> list[dict]:
    """Two SM-activity samples per hour per pod holding the GPU (a shared GPU repeats them)."""
    return [
        {
            "ts": T0 + dt.timedelta(hours=h, minutes=m),
            "source": "dcgm",
            "host": host,
            "gpu_uuid": uuid,
            "gpu_model": model,
            "mig_instance": mig,
            "mig_profile": profile,
            "namespace": "llm-serving",
            "pod": pod,
            "container": "vllm",
            "labels": json.dumps({"tier": "large"}),
            "field": "DCGM_FI_PROF_SM_ACTIVE",
            "value": 0.5,
        }
        for h in hours
        for m in (0, 30)
        for pod in pods
    ]


def _health(down: range, hours: range = range(9)) -> list[dict]:
    """A dcgm-exporter target scraped every 30 min, refusing connections in `down` hours."""
    return [
        {
            "ts": T0 + dt.timedelta(hours=h, minutes=m),
            "target": "http://node-1:9400/metrics",
            "kind": "dcgm",
            "up": h not in down,
            "duration_ms": 3.0,
            "samples": 0 if h in down else 10,
            "error": "cannot connect: connection refused" if h in down else None,
        }
        for h in hours
        for m in (0, 30)
    ]


def _gap_note(notes: list[str]) -> str:
    """The one note about unobserved GPU-hours among finops.costs.sources' notes."""
    found = [n for n in notes if NOTE in n]
    assert len(found) == 1, f"expected one sources() note containing {NOTE!r}, got {notes}"
    return found[0]


def _gaps(db) -> list[tuple]:
    return db.sql(
        "SELECT hour(hour), gpu_uuid, mig_instance, est_gpu_hours, est_cost FROM "
        "marts.gpu_gap_hourly ORDER BY gpu_uuid, mig_instance, hour"
    ).fetchall()


def test_an_exporter_outage_is_listed_costed_and_said(tmp_path: Path) -> None:
    """Hours 0-2 and 6-8 reported, exporter down 3-5: 3 GPU-hours, about 3 x price, said."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("gpu_samples", _samples("GPU-1", [0, 1, 2, 6, 7, 8]), source="dcgm")
    # a GPU of another exporter that never stopped has no gap
    lake.append("gpu_samples", _samples("GPU-2", list(range(9)), host="node-2"), source="dcgm")
    lake.append("scrape_health", _health(down=range(3, 6)), source="dcgm")
    prices = _prices(tmp_path)
    db = finops.connect(lake.path, prices=prices)

    assert _gaps(db) == [(h, "GPU-1", "", 1.0, H100) for h in (3, 4, 5)]
    row = db.sql(
        "SELECT host, gpu_model, tier, usd_per_gpu_hour, hour(prev_hour), hour(next_hour), "
        "gpu_scrapes, down_attempts, down_targets, last_error FROM marts.gpu_gap_hourly "
        "WHERE hour(hour) = 4"
    ).fetchall()
    assert row == [
        ("node-1", "NVIDIA H100 80GB HBM3", "large", H100, 2, 6, 2, 2,
         ["http://node-1:9400/metrics"], "cannot connect: connection refused"),
    ]  # fmt: skip

    src = fc.sources(db, fc.period(week="2026-W47"))
    assert src["gap_gpu_hours"] == 3.0
    assert src["gap_cost"] == pytest.approx(3 * H100)
    assert src["gap_down_attempts"] == 6 and src["gpu_down_attempts"] == 6
    note = _gap_note(src["notes"])
    # which tier and when: a reader can tell an outage from a collector restart
    start, end = T0 + dt.timedelta(hours=3), T0 + dt.timedelta(hours=6)
    assert note.startswith(
        f"3 GPU-hours inside the period (tier large, {start:%Y-%m-%d %H:00} to "
        f"{end:%Y-%m-%d %H:00} UTC) {NOTE}"
    )
    assert "spend leaves out about $12.00" in note
    assert "failed 6 scrape attempts in those hours" in note
    # a period that does not hold the gap hours says nothing of them
    later = fc.Period(T0 + dt.timedelta(hours=6), T0 + dt.timedelta(hours=9), "later")
    assert not [n for n in fc.sources(db, later)["notes"] if NOTE in n]

    # the weekly report's missing-data list and figures carry it
    rep = figures._sources(db, fc.period(week="2026-W47"))
    assert any(m.startswith("3 GPU-hours inside the period") and m.endswith(".") for m in
               rep["missing"]), rep["missing"]  # fmt: skip
    assert rep["gpu_gap_hours"] == 3.0 and rep["gpu_gap_cost"] == pytest.approx(3 * H100)

    # and `finops costs` warns with it
    res = CliRunner().invoke(
        app,
        ["costs", "--lake", str(lake.path), "--week", "2026-W47"],
        env={"FINOPS_PRICES": str(prices)},
    )
    assert res.exit_code == 0, res.output
    assert "warning: 3 GPU-hours inside the period (tier large, " in res.stderr
    assert NOTE in res.stderr


def test_a_stopped_collector_leaves_a_gap_without_scrape_health(tmp_path: Path) -> None:
    """No rows at all for hours 3-5 (the collector itself stopped): still a gap, no attempts."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("gpu_samples", _samples("GPU-1", [0, 1, 2, 6, 7, 8]), source="dcgm")
    up = [r for r in _health(down=range(0)) if not 3 <= r["ts"].hour <= 5]
    lake.append("scrape_health", up, source="dcgm")
    db = finops.connect(lake.path, prices=_prices(tmp_path))
    got = db.sql(
        "SELECT hour(hour), gpu_scrapes, down_attempts, down_targets FROM marts.gpu_gap_hourly "
        "ORDER BY hour"
    ).fetchall()
    assert got == [(3, 0, 0, None), (4, 0, 0, None), (5, 0, 0, None)]
    src = fc.sources(db)
    note = _gap_note(src["notes"])
    assert "about $12.00" in note and "scrape attempts" not in note
    assert src["gap_down_attempts"] == 0 and src["gpu_down_attempts"] == 0


def test_no_gap_no_note_and_a_late_start_or_end_is_no_gap(tmp_path: Path) -> None:
    """A GPU that reported every hour, one that started later and one decommissioned early."""
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append("gpu_samples", _samples("GPU-1", list(range(9))), source="dcgm")
    lake.append("gpu_samples", _samples("GPU-late", list(range(5, 9))), source="dcgm")
    lake.append("gpu_samples", _samples("GPU-gone", list(range(4))), source="dcgm")
    # one failed scrape (hour 4) in an hour whose other scrape still brought the samples
    flaky = [r for r in _health(down=range(4, 5)) if r["up"] or r["ts"].minute == 30]
    lake.append("scrape_health", flaky, source="dcgm")
    db = finops.connect(lake.path, prices=_prices(tmp_path))
    assert _gaps(db) == []
    src = fc.sources(db, fc.period(week="2026-W47"))
    assert src["gap_gpu_hours"] == 0 and src["gap_cost"] == 0
    assert src["gpu_down_attempts"] == 1
    assert not [n for n in src["notes"] if NOTE in n], src["notes"]
    assert figures._sources(db, fc.period(week="2026-W47"))["gpu_gap_hours"] == 0.0


def test_mig_instances_and_shared_gpus_count_each_gpu_hour_once(tmp_path: Path) -> None:
    """A MIG GPU silent 3-5 misses 3 GPU-hours (its instances' shares), not one per slice; an
    instance silent while its sibling reported misses nothing (the sibling carries the hour);
    a GPU time-sliced by two pods misses 1 GPU-hour per hour, not one per pod."""
    a100 = {"model": "NVIDIA A100-SXM4-80GB"}
    lake = Lake(tmp_path / "lake", fsync=False)
    silent = [0, 1, 2, 6, 7, 8]
    rows = _samples("GPU-M", silent, mig="1", profile="3g.40gb", **a100)
    rows += _samples("GPU-M", silent, mig="2", profile="4g.40gb", pods=("vllm-b",), **a100)
    rows += _samples("GPU-S", list(range(9)), mig="1", profile="3g.40gb", **a100)
    rows += _samples("GPU-S", silent, mig="2", profile="4g.40gb", pods=("vllm-b",), **a100)
    rows += _samples("GPU-T", silent, pods=("vllm-a", "vllm-b"))
    lake.append("gpu_samples", rows, source="dcgm")
    db = finops.connect(lake.path, prices=_prices(tmp_path))

    got = db.sql(
        "SELECT gpu_uuid, mig_instance, count(*), sum(est_gpu_hours), sum(est_cost), "
        "bool_and(gpu_reported) FROM marts.gpu_gap_hourly GROUP BY ALL ORDER BY 1, 2"
    ).fetchall()
    assert got == [
        ("GPU-M", "1", 3, pytest.approx(3 * 3 / 7), pytest.approx(3 * 3 / 7 * 2.0), False),
        ("GPU-M", "2", 3, pytest.approx(3 * 4 / 7), pytest.approx(3 * 4 / 7 * 2.0), False),
        ("GPU-S", "2", 3, 0.0, 0.0, True),
        ("GPU-T", "", 3, pytest.approx(3.0), pytest.approx(3 * H100), False),
    ]
    src = fc.sources(db, fc.period(week="2026-W47"))
    assert src["gap_gpu_hours"] == pytest.approx(6.0)
    assert src["gap_cost"] == pytest.approx(3 * 2.0 + 3 * H100)
    note = _gap_note(src["notes"])
    assert note.startswith("6 GPU-hours") and "about $18.00" in note


def test_the_demo_lake_has_no_false_gaps(demo_lake: Path) -> None:
    """The demo's GPUs report every hour; its isolated failed dcgm scrapes make no gap."""
    db = finops.connect(demo_lake)
    db.execute("SET enable_progress_bar = false")
    assert db.sql("SELECT count(*) FROM marts.gpu_gap_hourly").fetchall() == [(0,)]
    src = fc.sources(db, fc.period(week="2026-W47"))
    assert src["gap_gpu_hours"] == 0 and src["gpu_down_attempts"] > 0
    assert not [n for n in src["notes"] if NOTE in n], src["notes"]


def test_gpu_hours_in_notes_read_as_numbers_not_exponents() -> None:
    """A year of a 200-GPU fleet is 1,752,000 GPU-hours, not '1.752e+06'."""
    assert [fc._hours(x) for x in (1_752_000.0, 1_234_567.891, 3.0, 0.43)] == [
        "1,752,000",
        "1,234,567.89",
        "3",
        "0.43",
    ]
