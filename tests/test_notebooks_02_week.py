"""Notebook 02 reads one period, `$FINOPS_WEEK`, in every section (costs, fits, simulation,
autoscaling), not the whole lake in some and the latest week in others."""

from __future__ import annotations

import datetime as dt
import os
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

import finops
import finops.costs as fc
from finops.demo import generate

NB = Path(__file__).resolve().parent.parent / "notebooks" / "02_unit_economics_and_growth.ipynb"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def two_week_lake(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Sat 2026-11-21 .. Tue 2026-11-24: two days of 2026-W47 and two of 2026-W48 (the
    default week, a tie goes to the later one), a small fleet at 2% of the traffic."""
    path = tmp_path_factory.mktemp("two_weeks") / "lake"
    generate(path, days=4, seed=5, gpus=6, scale=0.02, start=dt.date(2026, 11, 21))
    return path


def _run(lake: Path, week: str) -> tuple[list[str], str]:
    nb = nbformat.read(NB, as_version=4)
    env = {k: v for k, v in os.environ.items() if k not in ("FINOPS_WEEK", "FINOPS_PRICES")}
    env.update(FINOPS_LAKE=str(lake), FINOPS_WEEK=week)
    NotebookClient(
        nb,
        timeout=600,
        kernel_name="python3",
        allow_errors=True,
        resources={"metadata": {"path": str(NB.parent)}},
    ).execute(env=env)
    outs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [f"{o['ename']}: {o['evalue']}" for o in outs if o.get("output_type") == "error"]
    text = "\n".join(
        [o["text"] for o in outs if "text" in o]
        + [
            o["data"][k]
            for o in outs
            for k in ("text/markdown", "text/plain")
            if k in o.get("data", {})
        ]
    )
    return errors, text


def test_notebook_02_reads_finops_week_in_every_section(two_week_lake: Path) -> None:
    db = finops.connect(two_week_lake)
    assert fc.latest_whole_week(db) == "2026-W48"  # so FINOPS_WEEK is what picks W47
    week = fc.totals(db, week="2026-W47")
    assert week["gpu_cost"] < fc.totals(db)["gpu_cost"]  # the week is not all the data
    db.close()

    errors, text = _run(two_week_lake, "2026-W47")
    assert not errors, errors
    assert "period: 2026-W47 (every section below)" in text
    # 1: the bill is the week's, not the lake's
    assert f"In **2026-W47** the GPU bill is **${week['gpu_cost']:,.2f}** " in text
    assert f"for {week['requests']:,} requests" in text
    # 2, 3: leakage and cache savings
    assert re.search(r"In 2026-W47, leakage|Leakage in 2026-W47|No leakage\*\*: 2026-W47", text)
    assert "what the caches saved in 2026-W47:" in text
    # 4: the fits
    assert "Fitted on 2026-W47." in text
    # 5, 6: the simulation and the autoscaling comparison
    assert "Planned from 2026-W47: **5x growth:" in text
    assert "Over 2026-W47 a fixed fleet costs" in text
    # the simulated idle share says it is modelled, next to the measured one
    assert "idle as simulated (modelled busy time" in text
    assert "DCGM measured" in text
    # no section falls back to another period
    assert "2026-W48" not in text
    assert "all data" not in text
