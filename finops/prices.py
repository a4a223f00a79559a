"""The GPU price catalog: $/GPU-hour by GPU model and pricing kind.

Committed as `data/prices.csv` with a source and date on every row, because
a cost figure is only as good as the price behind it. Teams override it with
their own negotiated rates: `finops.connect(prices="my_prices.csv")` or
`$FINOPS_PRICES`. GPU model names match what DCGM/NVML report
(`modelName` label / `nvmlDeviceGetName`). One matching rule, shared with the
SQL cost marts (finops/sql/marts/30_costs_gpu.sql): names compare with the
`NVIDIA ` prefix stripped, exactly, or the catalog name is a prefix of the
reported name ending on a word boundary, so catalog `H100` finds `NVIDIA H100
80GB HBM3` but `L4` never finds `L40S` and `A100` never finds `A10`. An exact
match wins, then the longest catalog name; a blank name matches nothing. So the
catalog holds one row per (model, pricing kind): `load_prices` refuses a second one.
"""

from __future__ import annotations

import math
import os
import re
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


EXPECTED = (
    "a CSV or Parquet file with columns gpu_model,pricing_kind,usd_per_gpu_hour"
    "[,provider,source,as_of]"
)


def load_prices(path: str | os.PathLike[str] | None = None) -> pl.DataFrame:
    """Read and check a price catalog (CSV or Parquet); errors name the row.

    Every reader of prices (`finops.connect`'s `ref.prices`, the router's fallback)
    comes through here, so a catalog the matching rule cannot price one way is refused
    before any dollar is computed: no rows, a price that is not a finite non-negative
    number, or two rows for one (GPU model, pricing kind)."""
    p = Path(path or os.environ.get("FINOPS_PRICES") or DEFAULT_PRICES)
    if not p.exists():
        raise PriceCatalogError(f"{p}: price catalog not found")
    df = _read(p)
    missing = [c for c in ("gpu_model", "pricing_kind", "usd_per_gpu_hour") if c not in df.columns]
    if missing:
        raise PriceCatalogError(f"{p}: missing column(s) {missing}; expected {list(COLUMNS)}")
    if df.height == 0:
        raise PriceCatalogError(
            f"{p}: the price catalog has no prices (no rows below the header); expected one "
            "row per GPU model and pricing kind, e.g. 'H100 80GB HBM3,on_demand,3.90'"
        )
    for col in COLUMNS:
        if col not in df.columns:
            df = df.with_columns(pl.lit(None, dtype=pl.String).alias(col))
    price = df["usd_per_gpu_hour"].cast(pl.Float64, strict=False)
    for i, (raw, val, kind, model) in enumerate(
        zip(df["usd_per_gpu_hour"], price, df["pricing_kind"], df["gpu_model"], strict=True)
    ):
        at = _at(p, i)
        if not isinstance(model, str) or not model_key(model):
            # a blank name matches no GPU: the row would price nothing, silently
            raise PriceCatalogError(
                f"{at}: field 'gpu_model': expected a GPU model name as the exporter reports "
                f"it (e.g. 'H100 80GB HBM3'), got {model!r}"
            )
        if val is None or not math.isfinite(val) or val < 0:
            raise PriceCatalogError(
                f"{at}: field 'usd_per_gpu_hour': expected a non-negative number, got {raw!r}"
            )
        if kind not in PRICING_KINDS:
            raise PriceCatalogError(
                f"{at}: field 'pricing_kind': expected one of {PRICING_KINDS}, got {kind!r}"
            )
    out = df.with_columns(price.alias("usd_per_gpu_hour")).select(
        [pl.col(c).cast(t) for c, t in COLUMNS.items()]
    )
    _check_one_price_each(p, out)
    return out


def _row_name(p: Path, i: int) -> str:
    """Row i (0-based) of the catalog as a person finds it: a CSV's line (the header is
    line 1), a Parquet file's row (1-based: it has no header line)."""
    return f"row {i + 1}" if p.suffix == ".parquet" else f"line {i + 2}"


def _at(p: Path, i: int) -> str:
    """`file:line` for a CSV row, `file: row N` for a Parquet one."""
    return f"{p}: row {i + 1}" if p.suffix == ".parquet" else f"{p}:{i + 2}"


def _read(p: Path) -> pl.DataFrame:
    """The catalog file as read, all CSV fields as text; an unreadable file (empty, a
    broken quote, not Parquet after all) is a PriceCatalogError, never a traceback."""

    def unreadable(reason: str) -> PriceCatalogError:
        return PriceCatalogError(
            f"{p}: cannot read the price catalog ({reason}); expected {EXPECTED}"
        )

    if not p.is_file():
        raise unreadable("not a file")
    try:
        if p.suffix == ".parquet":
            return pl.read_parquet(p)
        return pl.read_csv(p, infer_schema_length=0)
    except (pl.exceptions.PolarsError, OSError, UnicodeDecodeError) as exc:
        # polars appends tuning advice (infer_schema_length, ignore_errors) that does
        # not apply to a catalog; its original error is the reason
        msg = str(exc).split("Original error:", 1)[-1].replace("`" * 3, "")
        msg = re.sub(r"`([^`]*?)\s+`", r"`\1`", msg)  # a quoted field's own newline
        msg = " ".join(msg.split())
        raise unreadable(msg or type(exc).__name__) from None


def _check_one_price_each(p: Path, prices: pl.DataFrame) -> None:
    """Refuse two rows for one (model key, pricing kind): the matching rule (exact, then the
    longest name) cannot choose between them, so each GPU-hour would take either price."""
    seen: dict[tuple[str, str], int] = {}
    for i, (model, kind) in enumerate(
        zip(prices["gpu_model"], prices["pricing_kind"], strict=True)
    ):
        first = seen.setdefault((model_key(model), kind), i)
        if first == i:
            continue
        raise PriceCatalogError(
            f"{_at(p, i)}: GPU model {model!r} has a second {kind} price "
            f"({_describe(prices, i)}); {_row_name(p, first)} already prices it "
            f"({_describe(prices, first)}). Keep one row per GPU model and pricing kind "
            "(names compare without the 'NVIDIA ' prefix): the catalog has no effective "
            "dates, so remove or edit the older price"
        )


def _describe(prices: pl.DataFrame, i: int) -> str:
    """A catalog row as a duplicate error quotes it: name, price, as_of when given."""
    as_of = prices["as_of"][i]
    head = f"{prices['gpu_model'][i]!r} at ${prices['usd_per_gpu_hour'][i]:g}/GPU-hour"
    return head + (f", as_of {as_of}" if as_of else "")


def model_key(name: str | None) -> str:
    """A GPU model name as the matching rule compares it (`NVIDIA ` stripped)."""
    return re.sub(r"^NVIDIA\s+", "", (name or "").strip())


def model_matches(catalog_name: str | None, reported_name: str | None) -> bool:
    """Whether a catalog row prices a reported GPU; same rule as the SQL marts.

    One direction only: a more specific catalog name never prices a vaguer
    report, and the prefix must end on a word boundary (`L4` is not `L40S`)."""
    cat, name = model_key(catalog_name), model_key(reported_name)
    if not cat or not name:
        return False
    return name == cat or (
        name.startswith(cat) and re.match(r"[A-Za-z0-9]", name[len(cat)]) is None
    )


def price_for(prices: pl.DataFrame, gpu_model: str, kind: str = "on_demand") -> float:
    """$/GPU-hour for a model name as reported by DCGM/NVML (see `model_matches`)."""
    rows = prices.filter(pl.col("pricing_kind") == kind)
    name = model_key(gpu_model)
    hits = [
        (model_key(r["gpu_model"]) == name, len(model_key(r["gpu_model"])), r["usd_per_gpu_hour"])
        for r in rows.iter_rows(named=True)
        if model_matches(r["gpu_model"], gpu_model)
    ]
    if hits:
        # exact first, then the most specific catalog name (as the SQL ORDER BY)
        return float(max(hits, key=lambda h: (h[0], h[1]))[2])
    have = {
        k: sorted(set(prices.filter(pl.col("pricing_kind") == k)["gpu_model"].drop_nulls()))
        for k in PRICING_KINDS
    }
    others = "; ".join(f"{k} prices for {v}" for k, v in have.items() if k != kind and v)
    raise PriceCatalogError(
        f"no {kind} price for GPU model {gpu_model!r}; the catalog has {kind} prices for "
        f"{have.get(kind, [])}" + (f"; it also has {others}" if others else "")
    )
