"""Growth simulation prices a replica at the GPU-hours the cost mart bills it: a MIG
instance's slice share, a time-sliced pod's share, never a whole GPU per replica."""

from __future__ import annotations

import datetime as dt
import json

import polars as pl
import pytest
from typer.testing import CliRunner

import finops
import finops.costs as fc
from finops.cli import app
from finops.lake import Lake
from finops.models.simulate import Simulator, load_trace
from finops.models.synthetic import SyntheticSpec, TierTruth, write_synthetic_lake
from finops.prices import price_for

H100 = "NVIDIA H100 80GB HBM3"
SPEC = SyntheticSpec(
    days=2,
    scrape_s=180,
    tiers={
        # each replica on a 3g.40gb instance of its own H100
        "mig": TierTruth(
            vmax=60.0, k=6.0, replicas=2, gpu_model=H100, peak_concurrency=8.0, mean_output=300.0
        ),
        # both replicas time-slice one L4
        "sliced": TierTruth(vmax=120.0, k=12.0, replicas=2, peak_concurrency=20.0),
    },
)
TIER = pl.col("labels").str.json_path_match("$.tier")


def _frames(lake_path) -> dict[str, pl.DataFrame]:
    db = finops.connect(lake_path)
    out = {}
    for table in ("gpu_samples", "serving_samples", "requests"):
        df = db.sql(f"SELECT * FROM raw.{table}").pl()
        out[table] = df.select([c for c in df.columns if c not in ("date", "_file")])
    return out


def _partition(g: pl.DataFrame) -> pl.DataFrame:
    """'mig' pods onto 3g.40gb instances (the 4g.40gb rest of each H100 held by a batch
    pod with no vLLM metrics); both 'sliced' pods onto one shared L4."""
    mig = g.filter(TIER == "mig").with_columns(
        mig_instance=pl.lit("1"), mig_profile=pl.lit("3g.40gb")
    )
    batch = mig.with_columns(
        mig_instance=pl.lit("2"),
        mig_profile=pl.lit("4g.40gb"),
        pod=pl.col("pod").str.replace("vllm-mig", "batch"),
        labels=pl.lit(json.dumps({"app": "batch", "tier": "batch"})),
    )
    sliced = g.filter(TIER == "sliced").with_columns(gpu_uuid=pl.lit("GPU-shared-L4"))
    return pl.concat([mig, batch, sliced], how="diagonal_relaxed")


def _write(path, frames: dict[str, pl.DataFrame]) -> Lake:
    lake = Lake(path)
    for table, df in frames.items():
        lake.append(table, df, source="copy")
    return lake


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    lake = Lake(tmp_path_factory.mktemp("simmig") / "src")
    write_synthetic_lake(lake, SPEC)
    return _frames(lake.path)


@pytest.fixture(scope="module")
def shared_lake(tmp_path_factory: pytest.TempPathFactory, src):
    frames = {**src, "gpu_samples": _partition(src["gpu_samples"])}
    return _write(tmp_path_factory.mktemp("simmig") / "lake", frames).path


@pytest.fixture(scope="module")
def sim(shared_lake) -> Simulator:
    return Simulator.from_lake(finops.connect(shared_lake), slo_ttft_p95_ms=1000)


def _billed(db, per) -> dict[str, dict]:
    rows = db.sql(
        f"""SELECT tier, sum(gpu_hours) AS gpu_hours, sum(gpu_cost) AS gpu_cost
            FROM marts.gpu_cost_hourly WHERE {per.where()} GROUP BY tier"""
    ).pl()
    return {r["tier"]: r for r in rows.to_dicts()}


def test_a_mig_tier_costs_its_slice_share_as_billed(shared_lake, sim) -> None:
    db = finops.connect(shared_lake)
    bill = _billed(db, sim.trace.period)
    p = sim.trace.profiles["mig"]
    assert p.observed_replicas == 2
    assert p.gpus_per_replica == pytest.approx(3 / 7)  # the instance's share, not 1 GPU
    plan = sim.plan(1.0)
    t = plan.tiers.filter(pl.col("tier") == "mig").row(0, named=True)
    assert t["peak_replicas"] == 2  # the observed fleet meets the SLO: the bill is the plan
    assert t["gpu_hours"] == pytest.approx(bill["mig"]["gpu_hours"], rel=1e-9)
    assert t["cost_usd"] == pytest.approx(bill["mig"]["gpu_cost"], rel=1e-9)  # was 7/3 of it
    # the whole plan at 1x is what `finops costs` bills for the week
    assert plan.totals["cost_usd"] == pytest.approx(
        fc.totals(db, per=sim.trace.period)["gpu_cost"], rel=1e-9
    )
    # a grown plan multiplies the same per-replica price
    grown = sim.plan(5.0)
    g = grown.tiers.filter(pl.col("tier") == "mig").row(0, named=True)
    replica_hours = grown.hourly.filter(pl.col("tier") == "mig")["replicas"].sum()
    assert g["peak_replicas"] > 2
    assert g["cost_usd"] == pytest.approx(
        replica_hours * 3 / 7 * price_for(sim.trace.prices, H100), rel=1e-9
    )
    assert g["gpu_hours"] == pytest.approx(replica_hours * 3 / 7, rel=1e-9)


def test_a_time_sliced_tier_costs_its_share_and_counts_pods(shared_lake, sim) -> None:
    bill = _billed(finops.connect(shared_lake), sim.trace.period)
    p = sim.trace.profiles["sliced"]
    assert (p.observed_replicas, p.gpus_per_replica) == (2, pytest.approx(0.5))
    t = sim.plan(1.0).tiers.filter(pl.col("tier") == "sliced").row(0, named=True)
    assert t["peak_replicas"] == 2
    assert t["cost_usd"] == pytest.approx(bill["sliced"]["gpu_cost"], rel=1e-9)  # was 2x


def test_a_pod_replaced_mid_hour_is_no_extra_replica(src, tmp_path) -> None:
    """A rollout renames a time-sliced pod half-way through an hour: the fleet is still two
    replicas of half an L4 each, and the 1x plan still costs what the week was billed."""
    g = _partition(src["gpu_samples"])
    at = SPEC.start + dt.timedelta(hours=30, minutes=30)
    g = g.with_columns(
        pod=pl.when((pl.col("pod") == "vllm-sliced-1") & (pl.col("ts") >= at))
        .then(pl.lit("vllm-sliced-1-new"))
        .otherwise(pl.col("pod"))
    )
    db = finops.connect(_write(tmp_path / "lake", {**src, "gpu_samples": g}).path)
    tr = load_trace(db, tiers=["sliced"])
    p = tr.profiles["sliced"]
    assert (p.observed_replicas, p.gpus_per_replica) == (2, pytest.approx(0.5))  # not 3 pods
    t = Simulator(tr, slo_ttft_p95_ms=1000).plan(1.0).tiers.row(0, named=True)
    assert t["cost_usd"] == pytest.approx(_billed(db, tr.period)["sliced"]["gpu_cost"], rel=1e-9)


def test_simulate_cli_baseline_matches_the_bill(shared_lake) -> None:
    args = ["simulate", "--lake", str(shared_lake), "--growth", "1", "--format", "json"]
    r = CliRunner().invoke(app, [*args, "--slo-ttft-p95-ms", "1000"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    db = finops.connect(shared_lake)
    billed = fc.totals(db, week=out["period"])["gpu_cost"]
    assert out["before"]["cost_usd"] == pytest.approx(billed, rel=1e-9)
    tiers = {t["tier"]: t for t in out["before"]["tiers"]}
    assert tiers["mig"]["gpus_per_replica"] == pytest.approx(3 / 7)
