"""Notebooks 01 and 02 on valid but incomplete lakes: they run top to bottom and say what
is missing, and the utilization prose names the signal the GPUs actually reported."""

from __future__ import annotations

import os
import re
from pathlib import Path

import nbformat
import polars as pl
import pytest
from nbclient import NotebookClient

import finops
from finops import Lake, schemas
from finops.demo import generate

NB_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NB01 = NB_DIR / "01_gpu_utilization.ipynb"
NB02 = NB_DIR / "02_unit_economics_and_growth.ipynb"
TABLES = ("gpu_samples", "serving_samples", "requests", "cache_events")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One day of a 6-GPU demo fleet at 2% of the request volume (the lake is shorter
    than the two days the throughput fit needs to hold out a whole day)."""
    path = tmp_path_factory.mktemp("odd") / "base"
    generate(path, days=1, seed=3, gpus=6, scale=0.02)
    return path


def _copy(src: Path, dest: Path, **keep: pl.Expr | None) -> Path:
    """A lake holding only the tables named in `keep`, each filtered by its expression."""
    by_name = {s.name: s for s in vars(schemas).values() if isinstance(s, schemas.TableSchema)}
    lake = Lake(dest)
    for table, expr in keep.items():
        df = pl.concat(
            [pl.read_parquet(f) for f in sorted(src.glob(f"{table}/date=*/*.parquet"))],
            how="diagonal_relaxed",
        )
        df = df.select([c for c in by_name[table].columns if c in df.columns])
        lake.append(table, df if expr is None else df.filter(expr), source="test-copy")
    return dest


def _run(nb_path: Path, lake: Path, **extra: str) -> tuple[list, str]:
    """Execute the notebook on `lake` (with `extra` environment variables; FINOPS_WEEK and
    FINOPS_PRICES only from there): (error outputs, all text it printed or displayed)."""
    nb = nbformat.read(nb_path, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("FINOPS_WEEK", "FINOPS_PRICES")}
    env.update(FINOPS_LAKE=str(lake), **extra)
    client = NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(nb_path.parent)}},
    )
    client.execute(env=env)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [f"{o['ename']}: {o['evalue']}" for o in outs if o.get("output_type") == "error"]
    text = "\n".join(
        [o["text"] for o in outs if "text" in o]
        + [o["data"][k] for o in outs for k in ("text/markdown",) if k in o.get("data", {})]
    )
    return errors, text


GPU_UTIL = pl.col("field") == "DCGM_FI_DEV_GPU_UTIL"


def test_nb01_gpu_util_only_lake_names_the_signal(base: Path, tmp_path: Path) -> None:
    """NVML / DCGM without profiling: no SM activity, so no 'SM' claims and no comparison."""
    lake = _copy(
        base,
        tmp_path / "lake",
        gpu_samples=~pl.col("field").str.starts_with("DCGM_FI_PROF"),
        serving_samples=None,
        requests=None,
    )
    errors, text = _run(NB01, lake)
    assert not errors, errors
    assert re.search(r"By \*\*GPU_UTIL\*\*, the GPUs were busy \*\*[\d.]+%\*\*", text)
    assert "No GPU reported both SM activity and GPU_UTIL" in text
    assert "SMs were active" not in text
    assert "while SM activity is" not in text


def test_nb01_mixed_fleet_compares_only_gpus_with_both_signals(base: Path, tmp_path: Path) -> None:
    """The large tier lacks GPU_UTIL (e.g. MIG): its GPU-hours must not dilute the mean."""
    lake = _copy(
        base,
        tmp_path / "lake",
        gpu_samples=~(GPU_UTIL & pl.col("pod").str.contains("large")),
        serving_samples=None,
        requests=None,
    )
    errors, text = _run(NB01, lake)
    assert not errors, errors
    got = re.search(r"overstates the work done by \*\*([\d.]+)×\*\*", text)
    assert got, text
    gpu_util, sm = (
        finops.connect(lake)
        .sql(
            "SELECT sum(gpu_util * gpu_hours) / sum(gpu_hours), "
            "sum(busy_gpu_hours) / sum(gpu_hours) FROM marts.gpu_cost_hourly "
            "WHERE gpu_util IS NOT NULL AND util_signal = 'DCGM_FI_PROF_SM_ACTIVE'"
        )
        .fetchall()[0]
    )
    assert float(got.group(1)) == pytest.approx(gpu_util / sm, abs=0.051)
    assert re.search(r"report both signals \(\d+% of the fleet's\)", text)


def test_util_signal_gap_compares_only_gpu_hours_with_both(base: Path, tmp_path: Path) -> None:
    """The API behind the notebook's sentence: a tier without GPU_UTIL has no row, the
    fleet row covers the others' share, and tier_utilization (all GPU-hours) differs."""
    from finops import costs as fc

    db = finops.connect(
        _copy(
            base, tmp_path / "lake", gpu_samples=~(GPU_UTIL & pl.col("pod").str.contains("large"))
        )
    )
    gap = fc.util_signal_gap(db)
    assert gap["tier"].to_list()[-1] == "(all)" and "large" not in gap["tier"].to_list()
    tiers = fc.tier_utilization(db)
    fleet = gap.row(-1, named=True)
    assert fleet["gpu_hours"] == pytest.approx(gap["gpu_hours"][:-1].sum())
    large = tiers.filter(pl.col("tier") == "large")["gpu_hours"].sum()
    assert fleet["share"] == pytest.approx(1 - large / tiers["gpu_hours"].sum())
    for row in gap.iter_rows(named=True):
        assert row["flatter"] == pytest.approx(row["gpu_util"] / row["sm"])
    assert gap["flatter"][:-1].to_list() == sorted(gap["flatter"][:-1], reverse=True)
    # on a fleet without profiling metrics there is nothing to compare
    bare = _copy(
        base, tmp_path / "bare", gpu_samples=~pl.col("field").str.starts_with("DCGM_FI_PROF")
    )
    assert fc.util_signal_gap(finops.connect(bare)).is_empty()


@pytest.mark.parametrize(
    ("kind", "said"),
    [
        ("requests-only", "no GPU samples (gpu_samples) in this period"),
        ("SM-only", "No GPU reported both SM activity and GPU_UTIL"),
    ],
)
def test_nb01_runs_on_incomplete_lakes(base: Path, tmp_path: Path, kind: str, said: str) -> None:
    keep = (
        {"requests": None}
        if kind == "requests-only"
        else {"gpu_samples": ~GPU_UTIL, "serving_samples": None, "requests": None}
    )
    errors, text = _run(NB01, _copy(base, tmp_path / "lake", **keep))
    assert not errors, errors
    assert said in text


def test_nb02_runs_on_a_requests_only_lake(base: Path, tmp_path: Path) -> None:
    errors, text = _run(NB02, _copy(base, tmp_path / "lake", requests=None))
    assert not errors, errors
    assert "note: no GPU samples (gpu_samples) in this period" in text
    assert "No cost per request" in text
    assert "no vLLM token counters" in text
    assert "No growth simulation" in text


def test_nb02_clean_lake_has_no_leakage_and_states_the_holdout(base: Path, tmp_path: Path) -> None:
    """No failures, retries or duplicates; one day of data, so no whole day is held out."""
    clean = (
        (pl.col("status_code").fill_null(200) < 400)
        & pl.col("retry_of").is_null()
        & (pl.col("attempt").fill_null(1) <= 1)
        & pl.col("finish_reason").is_in(["stop", "length"]).fill_null(True)
        & (
            pl.col("prompt_fingerprint").is_null()
            | pl.col("prompt_fingerprint").is_first_distinct()
        )
    )
    lake = _copy(
        base,
        tmp_path / "lake",
        gpu_samples=None,
        serving_samples=None,
        cache_events=None,
        requests=clean,
    )
    errors, text = _run(NB02, lake)
    assert not errors, errors
    assert "**No leakage**" in text
    assert "held-out last quarter of the intervals" in text
    assert "Held-out-day MAPE" not in text


def test_nb02_without_request_logs_says_what_is_unknown(base: Path, tmp_path: Path) -> None:
    """GPU and vLLM metrics but no request logs: notebook 02 said "**No leakage**", blamed
    missing GPU data for the cost per request and vLLM metrics for the growth section."""
    lake = _copy(base, tmp_path / "lake", gpu_samples=None, serving_samples=None)
    errors, text = _run(NB02, lake)
    assert not errors, errors
    assert "has no request logs, so requests and what each cost are unknown" in text
    assert "**Leakage unknown**" in text and "**No leakage**" not in text
    assert "cache savings unknown" in text
    assert "it needs vLLM serving metrics and request logs" in text
    assert "it needs GPU data priced" not in text
