"""Notebook 01 on a fleet the catalog prices in part: each dollar figure says it covers
the priced GPUs only, next to time shares that count every GPU."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

import finops
import finops.charts as ch
import finops.costs as fc
from tests.test_notebook_odd_lakes import _run
from tests.test_planner_fixes import _no_l4

NB01 = Path(__file__).resolve().parent.parent / "notebooks" / "01_gpu_utilization.ipynb"


@pytest.mark.slow
def test_nb01_says_its_dollars_cover_the_priced_gpus(demo_lake: Path, tmp_path: Path) -> None:
    errors, text = _run(NB01, demo_lake, FINOPS_PRICES=str(_no_l4(tmp_path)))
    assert not errors, errors
    assert "the dollars cover the" in text and "priced GPU-hours only" in text, text
    assert "of the bill)** paid for idle capacity" in text, text
    assert "on the priced GPUs (NVIDIA L4 unpriced)" in text, text


def test_idle_heatmap_keeps_unpriced_cells_unknown(
    demo_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FINOPS_PRICES", str(_no_l4(tmp_path)))
    idle = fc.idle(finops.connect(demo_lake))
    small = ch.idle_heatmap(idle, tier="small")  # L4s only: every cell unknown, not $0
    assert small.data["idle_cost"].null_count() == small.data.height
    fleet = ch.idle_heatmap(idle)
    assert fleet.data["idle_cost"].null_count() == 0 and (fleet.data["idle_cost"] > 0).all()
    assert "priced GPUs only" in fleet.to_dict()["title"]
    assert pl.DataFrame(small.data)["idle_share"].is_not_null().all()  # time counts every GPU
