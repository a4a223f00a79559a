"""Price catalog checks: one price per (GPU model, pricing kind), finite prices, and a
file that cannot be read or has no rows is one `error:` line, never a traceback or a
silent $0 / $nan bill."""

from __future__ import annotations

import math
from pathlib import Path

import polars as pl
import pytest
from typer.testing import CliRunner

from finops.cli import app
from finops.lake import Lake
from finops.prices import DEFAULT_PRICES, PriceCatalogError, load_prices

HEADER = "gpu_model,pricing_kind,usd_per_gpu_hour"
runner = CliRunner()


def _csv(tmp_path: Path, *rows: str, name: str = "prices.csv") -> Path:
    p = tmp_path / name
    p.write_text("\n".join([HEADER, *rows]) + "\n")
    return p


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("H100 80GB HBM3", "H100 80GB HBM3"),  # a new price appended, the old one kept
        ("H100", "NVIDIA H100"),  # the same name once the `NVIDIA ` prefix is stripped
        ("NVIDIA L4", " L4 "),
    ],
)
def test_two_prices_for_one_model_and_kind_are_refused(
    tmp_path: Path, first: str, second: str
) -> None:
    p = tmp_path / "prices.csv"
    p.write_text(
        "gpu_model,pricing_kind,usd_per_gpu_hour,as_of\n"
        f"{first},on_demand,3.90,2026-03\n"
        "A100 80GB PCIe,on_demand,2.25,2026-05\n"
        f"{second},on_demand,2.00,2026-06\n"
    )
    with pytest.raises(PriceCatalogError) as e:
        load_prices(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:4: GPU model {second!r} has a second on_demand price"), msg
    assert "line 2 already prices it" in msg and f"{first!r} at $3.9/GPU-hour" in msg, msg
    assert "as_of 2026-03" in msg and "as_of 2026-06" in msg, msg
    assert "keep one row per gpu model and pricing kind" in msg.lower(), msg
    assert "remove or edit the older price" in msg, msg


def test_one_model_at_several_kinds_or_names_is_one_price_each(tmp_path: Path) -> None:
    """Not duplicates: other pricing kinds, and a longer name (the more specific row wins)."""
    p = _csv(
        tmp_path,
        "H100,on_demand,3.90",
        "H100,reserved,2.45",
        "H100,spot,2.25",
        "H100 80GB HBM3,on_demand,4.10",
    )
    assert load_prices(p).height == 4


@pytest.mark.parametrize("name", ["", "  "])
def test_a_row_without_a_gpu_model_name_is_refused(tmp_path: Path, name: str) -> None:
    """A blank name matches no GPU: the row's price would be dropped without a word."""
    p = _csv(tmp_path, "H100,on_demand,3.90", f"{name},on_demand,1.00")
    with pytest.raises(PriceCatalogError) as e:
        load_prices(p)
    assert str(e.value).startswith(f"{p}:3: field 'gpu_model': expected a GPU model name"), e.value


def test_parquet_catalog_errors_name_the_row_not_a_line(tmp_path: Path) -> None:
    """A Parquet file has no header line: its first row is row 1, not line 2."""
    p = tmp_path / "prices.parquet"
    pl.DataFrame(
        {
            "gpu_model": ["H100", "L4", "NVIDIA H100"],
            "pricing_kind": ["on_demand", "on_demand", "on_demand"],
            "usd_per_gpu_hour": [3.9, 0.8, 4.0],
        }
    ).write_parquet(p)
    with pytest.raises(PriceCatalogError) as e:
        load_prices(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: row 3: GPU model 'NVIDIA H100' has a second"), msg
    assert "row 1 already prices it" in msg, msg
    pl.DataFrame(
        {
            "gpu_model": ["H100", None],
            "pricing_kind": ["on_demand"] * 2,
            "usd_per_gpu_hour": [1.0, 2.0],
        }
    ).write_parquet(p)
    with pytest.raises(PriceCatalogError, match=r": row 2: field 'gpu_model'"):
        load_prices(p)


def test_the_committed_catalog_has_one_price_per_model_and_kind() -> None:
    df = load_prices(DEFAULT_PRICES)
    assert df.height > 0
    keys = df.select(
        pl.col("gpu_model").str.strip_chars().str.replace(r"^NVIDIA\s+", ""), "pricing_kind"
    )
    assert keys.n_unique() == df.height


@pytest.mark.parametrize("raw", ["NaN", "nan", "inf", "-inf", "Infinity"])
def test_a_price_that_is_not_a_finite_number_is_refused(tmp_path: Path, raw: str) -> None:
    p = _csv(tmp_path, "NVIDIA L4,on_demand,0.75", f"H100 80GB HBM3,on_demand,{raw}")
    with pytest.raises(PriceCatalogError) as e:
        load_prices(p)
    assert str(e.value) == (
        f"{p}:3: field 'usd_per_gpu_hour': expected a non-negative number, got {raw!r}"
    )


def test_a_parquet_nan_price_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "prices.parquet"
    pl.DataFrame(
        {"gpu_model": ["H100"], "pricing_kind": ["on_demand"], "usd_per_gpu_hour": [math.nan]}
    ).write_parquet(p)
    with pytest.raises(
        PriceCatalogError,
        match=r"prices.parquet: row 1: field 'usd_per_gpu_hour': expected a non-negative number, got nan",
    ):
        load_prices(p)


def _broken(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A catalog that cannot price anything, and the words its error must carry."""
    expected = "expected a CSV or Parquet file with columns gpu_model,pricing_kind,usd_per_gpu_hour"
    if kind == "empty":
        p = tmp_path / "prices.csv"
        p.write_text("")
        return p, f"{p}: cannot read the price catalog (empty CSV); {expected}"
    if kind == "unbalanced quote":
        p = tmp_path / "prices.csv"
        p.write_text(f'{HEADER}\n"H100,on_demand,3.9\n')
        return p, f"{p}: cannot read the price catalog (invalid csv file"
    if kind == "not parquet":
        p = tmp_path / "prices.parquet"
        p.write_bytes(b"PAR1\n")
        return p, f"{p}: cannot read the price catalog (parquet:"
    if kind == "directory":
        p = tmp_path / "prices"
        p.mkdir()
        return p, f"{p}: cannot read the price catalog (not a file); {expected}"
    p = _csv(tmp_path)  # header only
    return p, f"{p}: the price catalog has no prices (no rows below the header)"


KINDS = ["empty", "unbalanced quote", "not parquet", "directory", "header only"]


@pytest.mark.parametrize("kind", KINDS)
def test_an_unreadable_or_empty_catalog_is_a_price_catalog_error(tmp_path: Path, kind: str) -> None:
    p, needle = _broken(tmp_path, kind)
    with pytest.raises(PriceCatalogError) as e:
        load_prices(p)
    assert str(e.value).startswith(needle), str(e.value)
    assert "\n" not in str(e.value)


@pytest.fixture
def lake_dir(tmp_path: Path) -> Path:
    lake = Lake(tmp_path / "lake", fsync=False)
    lake.append(
        "requests",
        [{"request_id": "r-1", "ts": "2026-11-17T10:00:00Z", "tenant": "acme"}],
        source="test",
    )
    return lake.path


def _cli_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    dup = _csv(tmp_path, "H100 80GB HBM3,on_demand,3.90", "H100 80GB HBM3,on_demand,2.00")
    nan = _csv(tmp_path, "H100 80GB HBM3,on_demand,NaN", name="nan.csv")
    return {
        "duplicate": (dup, f"{dup}:3: GPU model 'H100 80GB HBM3' has a second on_demand price"),
        "nan": (nan, f"{nan}:2: field 'usd_per_gpu_hour': expected a non-negative number"),
    }


@pytest.mark.parametrize("kind", ["duplicate", "nan", *KINDS])
def test_finops_costs_with_a_bad_catalog_is_one_error_line(
    tmp_path: Path, lake_dir: Path, kind: str
) -> None:
    (tmp_path / "c").mkdir()
    cases = _cli_cases(tmp_path / "c")
    prices, needle = cases[kind] if kind in cases else _broken(tmp_path, kind)
    res = runner.invoke(
        app,
        ["costs", "--week", "2026-W47", "--headline", "--lake", str(lake_dir)],
        env={"FINOPS_PRICES": str(prices)},
    )
    assert res.exit_code == 2, res.output
    assert res.stderr.startswith(f"error: {needle}"), res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.output, res.output
    assert res.stdout == ""
