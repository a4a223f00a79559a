"""The GPU price catalog: $/GPU-hour by GPU model and pricing kind.

Committed as `data/prices.csv` with a source and date on every row, because
a cost figure is only as good as the price behind it. Teams override it with
their own negotiated rates: `finops.connect(prices="my_prices.csv")` or
`$FINOPS_PRICES`. GPU model names match what DCGM/NVML report
(`modelName` label / `nvmlDeviceGetName`); lookups also match on a prefix so
`NVIDIA H100 80GB HBM3` finds `H100 80GB HBM3`.
"""

from __future__ import annotations

import os
from pathlib import Path

import polars as pl

DEFAULT_PRICES = Path(__file__).resolve().parent.parent / "data" / "prices.csv"
PRICING_KINDS = ("on_demand", "reserved", "spot")
COLUMNS = {
    "gpu_model": pl.String,
    "pricing_kind": pl.String,
    "usd_per_gpu_hour": pl.Float64,
    "provider": pl.String,
    "source": pl.String,
    "as_of": pl.String,
}


class PriceCatalogError(ValueError):
    pass


def load_prices(path: str | os.PathLike[str] | None = None) -> pl.DataFrame:
    """Read and check a price catalog (CSV or Parquet); errors name the row."""
    p = Path(path or os.environ.get("FINOPS_PRICES") or DEFAULT_PRICES)
    if not p.exists():
        raise PriceCatalogError(f"{p}: price catalog not found")
    df = pl.read_parquet(p) if p.suffix == ".parquet" else pl.read_csv(p, infer_schema_length=0)
    missing = [c for c in ("gpu_model", "pricing_kind", "usd_per_gpu_hour") if c not in df.columns]
    if missing:
        raise PriceCatalogError(f"{p}: missing column(s) {missing}; expected {list(COLUMNS)}")
    for col in COLUMNS:
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(col))
    price = df["usd_per_gpu_hour"].cast(pl.Float64, strict=False)
    for i, (raw, val, kind) in enumerate(
        zip(df["usd_per_gpu_hour"], price, df["pricing_kind"], strict=True)
    ):
        line = i + 2  # header is line 1
        if val is None or val < 0:
            raise PriceCatalogError(
                f"{p}:{line}: field 'usd_per_gpu_hour': expected a non-negative number, got {raw!r}"
            )
        if kind not in PRICING_KINDS:
            raise PriceCatalogError(
                f"{p}:{line}: field 'pricing_kind': expected one of {PRICING_KINDS}, got {kind!r}"
            )
    return df.with_columns(price.alias("usd_per_gpu_hour")).select(
        [pl.col(c).cast(t) for c, t in COLUMNS.items()]
    )


def price_for(prices: pl.DataFrame, gpu_model: str, kind: str = "on_demand") -> float:
    """$/GPU-hour for a model name as reported by DCGM/NVML (prefix-tolerant)."""
    rows = prices.filter(pl.col("pricing_kind") == kind)
    name = gpu_model.removeprefix("NVIDIA ").strip()
    for candidate in rows.iter_rows(named=True):
        cat = candidate["gpu_model"].removeprefix("NVIDIA ").strip()
        if name == cat or name.startswith(cat) or cat.startswith(name):
            return float(candidate["usd_per_gpu_hour"])
    raise PriceCatalogError(
        f"no {kind} price for GPU model {gpu_model!r}; catalog has {sorted(set(rows['gpu_model']))}"
    )
