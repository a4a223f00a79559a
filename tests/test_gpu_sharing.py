"""A GPU shared by pods, and per-code counter series: every series lands, the GPU-hour is
split between the pods that held it, and device-level figures are not multiplied.

dcgm-exporter with `--kubernetes-virtual-gpus` (time-slicing, MPS) repeats each device
field once per pod, with that pod's labels and a `vgpu` label; XID and clock-event
counters come as one series per code. Before the series became the key, one pod's row
of each instant was kept and its tier was billed the whole GPU.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from test_collector_compat import TEXT, collect, serve

import finops
from finops.lake import Lake

UUID = "GPU-4c226d4d-8129-a7cf-fecd-daa9018b4b48"
H100 = "NVIDIA H100 80GB HBM3"
DEVICE = f'gpu="0",UUID="{UUID}",device="nvidia0",modelName="{H100}",Hostname="node-a"'


def _shared_payload(ts_ms: int, energy_mj: float) -> bytes:
    """One scrape of a time-sliced GPU held by a small-tier and a large-tier pod."""
    lines = []
    for field, value in (
        ("DCGM_FI_PROF_SM_ACTIVE", 0.4),
        ("DCGM_FI_DEV_POWER_USAGE", 250.0),
        ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", energy_mj),
    ):
        lines.append(f"# TYPE {field} {'counter' if 'ENERGY' in field else 'gauge'}")
        for vgpu, pod, tier in (("0", "vllm-small-0", "small"), ("1", "vllm-large-0", "large")):
            lines.append(
                f'{field}{{{DEVICE},container="vllm",namespace="llm",pod="{pod}",'
                f'vgpu="{vgpu}",tier="{tier}"}} {value} {ts_ms}'
            )
    lines.append("# TYPE DCGM_EXP_XID_ERRORS_COUNT gauge")
    for xid, n in (("13", 2), ("31", 1)):
        lines.append(
            f'DCGM_EXP_XID_ERRORS_COUNT{{{DEVICE},xid="{xid}",window_size_in_ms="300000"}} '
            f"{n} {ts_ms}"
        )
    return ("\n".join(lines) + "\n").encode()


def test_time_sliced_gpu_keeps_every_pod_and_splits_its_hour(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    hour = dt.datetime.now(dt.UTC).replace(minute=0, second=0, microsecond=0)
    hour -= dt.timedelta(hours=1)
    ms = int(hour.timestamp() * 1000)
    for minute, energy in ((10, 1.0e9), (40, 1.0e9 + 3.6e9)):  # 1 kWh between the scrapes
        with serve({"/metrics": (TEXT, _shared_payload(ms + minute * 60_000, energy))}) as base:
            collect(lake, "--dcgm", f"{base}/metrics")
    db = finops.connect(lake)
    # every series of both scrapes is in the lake, and scrape_health's count is what loaded
    assert db.sql("SELECT count(*) FROM clean.gpu_samples").fetchall() == [(16,)]
    assert db.sql("SELECT sum(samples) FROM raw.scrape_health").fetchall() == [(16,)]
    xids = db.sql(
        "SELECT labels->>'xid', max(value) FROM clean.gpu_samples "
        "WHERE field = 'DCGM_EXP_XID_ERRORS_COUNT' GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert xids == [("13", 2.0), ("31", 1.0)]
    # the GPU-hour is billed once, half to each tier; utilization is the device's own
    cost = db.sql(
        "SELECT pod, tier, gpu_hours, gpu_cost, util FROM marts.gpu_cost_hourly ORDER BY pod"
    ).fetchall()
    assert cost == [
        ("vllm-large-0", "large", 0.5, 1.95, 0.4),
        ("vllm-small-0", "small", 0.5, 1.95, 0.4),
    ]
    tiers = db.sql("SELECT tier, gpus, gpu_hours FROM marts.tier_cost_hourly ORDER BY 1")
    assert tiers.fetchall() == [("large", 1, 0.5), ("small", 1, 0.5)]
    # the energy counter is the device's: one kWh, not one per pod
    assert db.sql("SELECT energy_kwh, power_w FROM marts.gpu_hourly").fetchall() == [(1.0, 250.0)]


def _rows(t0: dt.datetime, holders_at: list[list[str | None]], **extra: object) -> list[dict]:
    rows = []
    for i, pods in enumerate(holders_at):
        for pod in pods:
            labels = {"tier": pod.split("-")[0]} if pod else {}
            rows.append(
                {
                    "ts": t0 + dt.timedelta(minutes=i),
                    "source": "dcgm",
                    "host": "node-a",
                    "gpu_uuid": UUID,
                    "gpu_model": H100,
                    "namespace": "llm" if pod else None,
                    "pod": pod,
                    "labels": json.dumps(labels, sort_keys=True),
                    "field": "DCGM_FI_PROF_SM_ACTIVE",
                    "value": 0.5,
                    **extra,
                }
            )
    return rows


def _shares(db) -> list[tuple]:
    return db.sql(
        "SELECT pod, round(gpu_hours, 4) FROM marts.gpu_cost_hourly ORDER BY pod NULLS FIRST"
    ).fetchall()


def test_each_instant_is_split_between_the_pods_holding_it(tmp_path: Path) -> None:
    """A pod there all hour next to one there for its first half carries 3/4."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    held = [["small-a", "large-b"] if i < 30 else ["small-a"] for i in range(60)]
    lake.append("gpu_samples", _rows(t0, held))
    assert _shares(finops.connect(tmp_path)) == [("large-b", 0.25), ("small-a", 0.75)]


def test_a_pod_replaced_mid_hour_carries_its_part(tmp_path: Path) -> None:
    """An unshared GPU whose pod was replaced: each pod its own minutes, never the whole hour."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    lake.append("gpu_samples", _rows(t0, [["small-old"]] * 20 + [["large-new"]] * 40))
    assert _shares(finops.connect(tmp_path)) == [("large-new", 0.6667), ("small-old", 0.3333)]


def test_rows_without_a_pod_next_to_pods_are_no_holder(tmp_path: Path) -> None:
    """A field the exporter does not attribute to pods leaves the hour with the pods;
    minutes when no pod held the GPU are billed to nobody's pod (a null-pod row)."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    held = [["small-a", None] if i < 45 else [None] for i in range(60)]
    lake.append("gpu_samples", _rows(t0, held))
    db = finops.connect(tmp_path)
    assert _shares(db) == [(None, 0.25), ("small-a", 0.75)]
    assert db.sql("SELECT sum(gpu_hours) FROM marts.gpu_cost_hourly").fetchall() == [(1.0,)]


def test_a_shared_mig_instance_splits_its_slice_share(tmp_path: Path) -> None:
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    shared = _rows(t0, [["small-a", "small-b"]] * 60, mig_instance="1", mig_profile="3g.40gb")
    alone = _rows(t0, [["large-c"]] * 60, mig_instance="2", mig_profile="4g.40gb")
    lake.append("gpu_samples", shared + alone)
    got = _shares(finops.connect(tmp_path))
    assert got == [("large-c", round(4 / 7, 4)), ("small-a", 0.2143), ("small-b", 0.2143)]


def test_a_sample_loaded_twice_changes_no_share(tmp_path: Path) -> None:
    """The shares read raw samples; a re-loaded file must not move the split."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    held = [["small-a", "large-b"] if i < 30 else ["small-a"] for i in range(60)]
    lake.append("gpu_samples", _rows(t0, held))
    lake.append("gpu_samples", _rows(t0, held[:10]))  # a partial re-send of the first scrapes
    assert _shares(finops.connect(tmp_path)) == [("large-b", 0.25), ("small-a", 0.75)]


def test_nvml_next_to_dcgm_names_no_holder(tmp_path: Path) -> None:
    """`finops collect --nvml` beside dcgm-exporter: NVML rows never name a pod, at their
    own instants; the pod dcgm-exporter names holds the whole hour whatever NVML's rate."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    dcgm = _rows(t0, [["small-a"]] * 60)
    nvml = [
        {
            "ts": t0 + dt.timedelta(seconds=10 * i + 1),
            "source": "nvml",
            "host": "node-a",
            "gpu_uuid": UUID,
            "gpu_model": H100,
            "field": "nvml_gpu_util_percent",
            "value": 50.0,
        }
        for i in range(360)
    ]
    lake.append("gpu_samples", dcgm + nvml)
    assert _shares(finops.connect(tmp_path)) == [("small-a", 1.0)]


def test_device_utilization_weighs_each_instant_once(tmp_path: Path) -> None:
    """Two pods at SM 0.8 for the first half hour, one at 0.2 after: the device averaged
    0.5, not 0.6 (its copies weighted by how many pods held it)."""
    t0 = dt.datetime(2026, 11, 16, 10, tzinfo=dt.UTC)
    lake = Lake(tmp_path, fsync=False)
    busy = [r | {"value": 0.8} for r in _rows(t0, [["small-a", "large-b"]] * 30)]
    quiet = _rows(t0 + dt.timedelta(minutes=30), [["small-a"]] * 30, value=0.2)
    lake.append("gpu_samples", busy + quiet)
    db = finops.connect(tmp_path)
    assert db.sql("SELECT round(util, 6), samples FROM marts.gpu_hourly").fetchall() == [(0.5, 60)]
    got = db.sql("SELECT DISTINCT round(util, 6) FROM marts.gpu_cost_hourly").fetchall()
    assert got == [(0.5,)]
