"""CLI error paths shared by several commands: a bad price catalog, hints that name --lake."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake

ROOT = Path(__file__).resolve().parent.parent
PRICES = ROOT / "data" / "prices.csv"
runner = CliRunner()


@pytest.fixture
def lake_dir(tmp_path: Path) -> Path:
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append(
        "requests",
        [
            {"request_id": f"r-{i}", "ts": f"2026-11-17T1{i}:00:00Z", "tenant": "acme"}
            for i in range(3)
        ],
        source="test",
    )
    return lake.path


def _bad_catalog(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A broken price catalog and the words its error must carry."""
    lines = PRICES.read_text().splitlines()
    bad = tmp_path / "prices.csv"
    if kind == "bad value":
        bad.write_text("\n".join([lines[0], "NVIDIA L4,on_demand,abc,x,y,2026", *lines[1:]]))
        return bad, f"{bad}:2: field 'usd_per_gpu_hour': expected a non-negative number"
    if kind == "missing column":
        bad.write_text("gpu_model,pricing_kind\nNVIDIA L4,on_demand\n")
        return bad, f"{bad}: missing column(s) ['usd_per_gpu_hour']"
    return tmp_path / "nowhere.csv", f"{tmp_path / 'nowhere.csv'}: price catalog not found"


@pytest.mark.parametrize("kind", ["bad value", "missing column", "missing file"])
@pytest.mark.parametrize(
    "args",
    [
        ["costs", "--week", "2026-W47", "--headline"],
        ["sql", "SELECT 1"],
        ["report", "--week", "2026-W47", "--no-growth"],
    ],
    ids=["costs", "sql", "report"],
)
def test_a_bad_price_catalog_is_one_error_line(
    tmp_path: Path, lake_dir: Path, kind: str, args: list[str]
) -> None:
    prices, needle = _bad_catalog(tmp_path, kind)
    extra = ["--out", str(tmp_path / "rep")] if args[0] == "report" else []
    res = runner.invoke(
        app, [*args, "--lake", str(lake_dir), *extra], env={"FINOPS_PRICES": str(prices)}
    )
    assert res.exit_code == 2, res.output
    assert res.stderr == f"error: {res.stderr.removeprefix('error: ')}"
    assert needle in res.stderr and res.stderr.count("\n") == 1, res.stderr
    assert "Traceback" not in res.output


def _run_hint(line: str) -> dict:
    """Run the `finops sql "..." [--lake ...]` a hint line suggests; its JSON rows."""
    cmd = shlex.split(line[line.index("finops sql") :].rstrip(")"))
    res = runner.invoke(app, [*cmd[1:], "--format", "json"])
    assert res.exit_code == 0, (line, res.output)
    return json.loads(res.stdout)


def test_the_ingest_rejects_hint_names_a_lake_that_is_not_the_default(tmp_path: Path) -> None:
    log = tmp_path / "requests.jsonl"
    log.write_text(
        '{"request_id": "a", "ts": "2026-11-17T10:00:00Z", "tenant": "acme"}\n{"broken\n'
    )
    lake = tmp_path / "my lake"
    res = runner.invoke(app, ["ingest", "requests", str(log), "--lake", str(lake)])
    assert res.exit_code == 0, res.output
    hint = [x for x in res.stderr.splitlines() if "finops sql" in x]
    assert len(hint) == 1 and shlex.quote(str(lake)) in hint[0], res.stderr
    assert [r["location"] for r in _run_hint(hint[0])] == [f"{log}:2"]
    # the default lake ($FINOPS_LAKE here) needs no --lake
    res = runner.invoke(
        app, ["ingest", "requests", str(log), "--lake", str(lake)], env={"FINOPS_LAKE": str(lake)}
    )
    hint = [x for x in res.stderr.splitlines() if "finops sql" in x]
    assert hint == ['  finops sql "SELECT location, reason FROM rejects ORDER BY ts DESC LIMIT 50"']


@pytest.mark.slow
def test_the_demo_hint_names_a_lake_that_is_not_the_default(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    res = runner.invoke(
        app, ["demo", "--lake", str(lake), "--days", "1", "--gpus", "6", "--scale", "0.2"]
    )
    assert res.exit_code == 0, res.output
    last = res.stdout.strip().splitlines()[-1]
    assert f"--lake {lake}" in last, last
    assert _run_hint(last)  # the suggested query reads the demo's lake: rows come back
