"""The FOCUS 1.3 export (finops/report/focus.py) on a real demo lake: pricing kinds and
commitment columns, one SKU per row, free GPUs, idle capacity on the usage basis, the
schema metadata, untiered GPUs, formula-safe CSV text and the FOCUS 1.3 split cost allocation
columns (Allocated*)."""

from __future__ import annotations

import glob
import json
import shutil
from pathlib import Path
from urllib.parse import unquote

import polars as pl
import pyarrow.parquet as pq
import pytest

import finops
import finops.costs as fc
from finops.prices import load_prices, price_for
from finops.report.focus import (
    ALLOCATED_METHOD_ID,
    COLUMNS,
    FOCUS_VERSION,
    focus_rows,
    origin_charges,
    split_allocation_problems,
    write_focus,
)

WEEK = "2026-W47"
IN_WEEK = (
    "hour >= TIMESTAMPTZ '2026-11-16 00:00:00+00' AND hour < TIMESTAMPTZ '2026-11-23 00:00:00+00'"
)
EXAMPLE_DEPLOYMENTS = Path(__file__).resolve().parent.parent / "data" / "deployments.example.toml"
ALLOCATION_COLUMNS = (
    "AllocatedMethodId",
    "AllocatedMethodDetails",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
)
ORIGIN = ["ChargePeriodStart", "x_Tier", "x_GpuModel", "x_PricingKind"]  # one origin charge


def one(db, sql: str):
    return db.sql(sql).fetchall()[0][0]


def _copy(src: Path, dst: Path, table: str, change) -> Path:
    """A copy of the lake with `change` applied to every Parquet file of `table`."""
    shutil.copytree(src, dst)
    for f in glob.glob(f"{dst}/{table}/*/*.parquet"):
        pl.read_parquet(f).pipe(change).write_parquet(f)
    return dst


def test_reserved_and_spot_gpus_are_committed_and_dynamic(demo_lake: Path) -> None:
    db = finops.connect(demo_lake)
    fc.load_deployments(db, EXAMPLE_DEPLOYMENTS)  # large reserved, mid on-demand, small spot
    df = focus_rows(db, WEEK)
    prices = load_prices()
    by_tier = {t: df.filter(pl.col("x_Tier") == t) for t in ("large", "mid", "small")}
    assert set(by_tier["large"]["PricingCategory"]) == {"Committed"}
    assert set(by_tier["mid"]["PricingCategory"]) == {"Standard"}
    assert set(by_tier["small"]["PricingCategory"]) == {"Dynamic"}
    for tier, kind in (("large", "reserved"), ("mid", "on_demand"), ("small", "spot")):
        rows = by_tier[tier]
        model = rows["x_GpuModel"][0]
        paid, listed = price_for(prices, model, kind), price_for(prices, model, "on_demand")
        assert set(rows["ListUnitPrice"]) == {listed}, tier
        assert rows["ListCost"].to_list() == pytest.approx(
            (rows["PricingQuantity"] * listed).to_list(), abs=1e-6
        )
        assert rows["BilledCost"].to_list() == pytest.approx(
            (rows["PricingQuantity"] * paid).to_list(), abs=1e-6
        )
        assert (rows["BilledCost"] == rows["EffectiveCost"]).all()
        if kind == "reserved":  # the spec: ContractedUnitPrice excludes commitment discounts
            assert set(rows["ContractedUnitPrice"]) == {listed}
            assert rows["ListCost"].sum() > rows["EffectiveCost"].sum()
        else:
            assert set(rows["ContractedUnitPrice"]) == {paid}
    committed = by_tier["large"]
    assert committed["CommitmentDiscountId"].null_count() == 0
    assert set(committed["CommitmentDiscountStatus"]) == {"Used"}
    assert set(committed["CommitmentDiscountCategory"]) == {"Usage"}
    assert committed["CommitmentDiscountType"].null_count() == 0
    assert set(committed["CommitmentDiscountUnit"]) == {"GPU-Hours"}
    assert (
        committed["CommitmentDiscountQuantity"].to_list() == committed["PricingQuantity"].to_list()
    )
    others = df.filter(pl.col("PricingCategory") != "Committed")
    for c in COLUMNS:
        if c.startswith("CommitmentDiscount"):
            assert others[c].null_count() == others.height, c


def test_a_tier_of_mixed_gpus_gets_one_real_sku_per_row(demo_lake: Path, tmp_path: Path) -> None:
    rules = tmp_path / "mixed.toml"
    rules.write_text(
        '[[deployment]]\nname = "large-reserved"\ntier = "large"\npricing_kind = "reserved"\n'
        'match = { namespace = "llm-serving", pod = "vllm-large-0" }\n\n'
        '[[deployment]]\nname = "mid-as-large"\ntier = "large"\n'
        'match = { namespace = "llm-serving", pod = "vllm-mid-0" }\n'
    )
    db = finops.connect(demo_lake)
    fc.load_deployments(db, rules)
    df = focus_rows(db, WEEK)
    large = df.filter(pl.col("x_Tier") == "large")
    catalog = {
        (m, k): p
        for m, k, p in db.sql(
            f"SELECT DISTINCT gpu_model, pricing_kind, usd_per_gpu_hour FROM marts.gpu_cost_hourly"
            f" WHERE tier = 'large' AND {IN_WEEK}"
        ).fetchall()
    }
    assert len(catalog) == 3  # H100 reserved, H100 on-demand, L4 on-demand
    assert set(large["SkuPriceId"]) == {f"gpu/{m}/{k}" for m, k in catalog}
    for (m, k), paid in catalog.items():
        rows = large.filter((pl.col("x_GpuModel") == m) & (pl.col("x_PricingKind") == k))
        assert rows["BilledCost"].to_list() == pytest.approx(
            (rows["PricingQuantity"] * paid).to_list(), abs=1e-6
        )
        gpu_hours = one(
            db,
            f"SELECT sum(gpu_hours) FROM marts.gpu_cost_hourly WHERE tier = 'large'"
            f" AND gpu_model = '{m}' AND pricing_kind = '{k}' AND {IN_WEEK}",
        )
        assert rows["PricingQuantity"].sum() == pytest.approx(gpu_hours)
    again = focus_rows(db, WEEK)  # deterministic (floats up to summation order)
    for c in df.columns:
        if df[c].dtype == pl.Float64:
            assert again[c].fill_null(-1).to_list() == pytest.approx(
                df[c].fill_null(-1).to_list(), rel=1e-12
            ), c
        else:
            assert again[c].equals(df[c]), c


def test_a_free_gpu_keeps_its_gpu_hours(demo_lake: Path, tmp_path: Path) -> None:
    prices = tmp_path / "prices.csv"
    catalog = load_prices().with_columns(
        pl.when(pl.col("gpu_model") == "NVIDIA L4")
        .then(0.0)
        .otherwise(pl.col("usd_per_gpu_hour"))
        .alias("usd_per_gpu_hour")
    )
    catalog.write_csv(prices)
    db = finops.connect(demo_lake, prices=prices)
    df = focus_rows(db, WEEK)
    assert df["PricingQuantity"].is_finite().all() and df["x_GpuHours"].is_finite().all()
    free = df.filter(pl.col("x_GpuModel") == "NVIDIA L4")
    assert free.filter(pl.col("x_IdleCapacity")).height > 0
    assert (free["BilledCost"] == 0).all() and (free["ListUnitPrice"] == 0).all()
    gpu_hours = one(db, f"SELECT sum(gpu_hours) FROM marts.gpu_cost_hourly WHERE {IN_WEEK}")
    assert df["PricingQuantity"].sum() == pytest.approx(gpu_hours, rel=1e-9)


def test_idle_capacity_is_its_own_rows_on_the_usage_basis(demo_lake: Path) -> None:
    db = finops.connect(demo_lake)
    df = focus_rows(db, WEEK)
    assert set(df["x_CostBasis"]) == {"usage"}
    bill = one(db, f"SELECT sum(gpu_cost) FROM marts.gpu_cost_hourly WHERE {IN_WEEK}")
    usage = one(
        db, f"SELECT sum(cost_usage) FROM marts.request_costs WHERE {IN_WEEK} AND NOT unpriced"
    )
    idle = one(db, f"SELECT sum(idle_cost) FROM marts.gpu_cost_hourly WHERE {IN_WEEK}")
    tenants = df.filter(~pl.col("x_IdleCapacity"))["BilledCost"].sum()
    idle_rows = df.filter(pl.col("x_IdleCapacity"))["BilledCost"].sum()
    assert round(tenants, 2) == round(usage, 2)
    assert round(tenants + idle_rows, 2) == round(bill, 2)
    assert idle_rows >= idle - 0.005  # the report's idle capacity is all in the idle rows


def test_the_export_carries_focus_schema_metadata(demo_lake: Path, tmp_path: Path) -> None:
    df = focus_rows(finops.connect(demo_lake), WEEK)
    _csv, parquet = write_focus(df, tmp_path, WEEK)
    kv = {k.decode(): v.decode() for k, v in pq.read_metadata(parquet).metadata.items()}
    assert kv["FocusVersion"] == FOCUS_VERSION == "1.3"
    assert kv["DataGenerator"] == "finops"
    meta = json.loads((tmp_path / f"focus-{WEEK}.metadata.json").read_text())
    assert meta["FocusVersion"] == "1.3" and meta["DataGenerator"] == "finops"
    assert meta["CreationDate"].endswith("Z") and meta["SchemaId"] == kv["SchemaId"]
    assert [c["ColumnName"] for c in meta["ColumnDefinition"]] == list(COLUMNS)
    types = {c["ColumnName"]: c["DataType"] for c in meta["ColumnDefinition"]}
    assert types["BilledCost"] == "DECIMAL" and types["ChargePeriodStart"] == "DATETIME"
    assert types["Tags"] == "JSON" and types["BillingAccountId"] == "STRING"


def test_untiered_gpus_get_no_placeholder(demo_lake: Path, tmp_path: Path) -> None:
    def untier(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(
            pl.when(pl.col("pod") == "vllm-mid-3")
            .then(pl.lit("{}"))
            .otherwise(pl.col("labels"))
            .alias("labels")
        )

    lake = _copy(demo_lake, tmp_path / "lake", "gpu_samples", untier)
    df = focus_rows(finops.connect(lake), WEEK)
    untiered = df.filter(pl.col("x_Tier").is_null())
    assert untiered.height > 0 and untiered["x_IdleCapacity"].all()
    assert set(untiered["ResourceId"]) == {"deployment/vllm-mid-3"}
    assert set(untiered["ResourceName"]) == {"vllm-mid-3"}
    assert untiered["Tags"].null_count() == untiered.height
    for c in ALLOCATION_COLUMNS:  # no split of an untiered GPU: not an allocation at all
        assert untiered[c].null_count() == untiered.height, c
    for c in df.columns:
        if df[c].dtype == pl.String:
            assert not df[c].str.contains("untiered").any(), c
    for t in df["Tags"].drop_nulls():
        assert None not in json.loads(t).values()


def test_the_csv_neutralises_formulas(demo_lake: Path, tmp_path: Path) -> None:
    def rename(df: pl.DataFrame) -> pl.DataFrame:
        return df.with_columns(
            pl.col("tenant").replace({"acme-support": "=1+1"}),
            pl.col("feature").replace({"chat-assistant": "@SUM(A1)"}),
        )

    lake = _copy(demo_lake, tmp_path / "lake", "requests", rename)
    df = focus_rows(finops.connect(lake), WEEK)
    assert "=1+1" in set(df["x_Tenant"])  # the Parquet keeps the real name
    csv, parquet = write_focus(df, tmp_path, WEEK)
    text = pl.read_csv(csv, infer_schema_length=0)
    assert "'=1+1" in set(text["x_Tenant"])
    # the tenant is in the allocated resource now (SubAccountId is the origin's: null)
    assert text["AllocatedResourceName"].drop_nulls().str.starts_with("'=1+1 / ").any()
    assert text["SubAccountId"].null_count() == text.height
    assert "'@SUM(A1)" in set(text["x_Feature"])
    for c in text.columns:
        assert not text[c].drop_nulls().str.contains(r"^[=+\-@]").any(), c
    assert "=1+1" in set(pl.read_parquet(parquet)["x_Tenant"])


def _ratios(details: str | None, unit: str | None = None) -> float:
    """The sum of a row's AllocatedRatio values (of one UsageUnit when given)."""
    if details is None:
        return 0.0
    elements = json.loads(details)["Elements"]
    return float(
        sum(e["AllocatedRatio"] for e in elements if unit is None or e["UsageUnit"] == unit)
    )


def test_tenant_rows_carry_the_split_cost_allocation_columns(
    demo_lake: Path, tmp_path: Path
) -> None:
    db = finops.connect(demo_lake)
    df = focus_rows(db, WEEK)
    csv, parquet = write_focus(df, tmp_path, WEEK)
    pq_df = pl.read_parquet(parquet)
    text = pl.read_csv(csv, infer_schema_length=0)
    meta = json.loads((tmp_path / f"focus-{WEEK}.metadata.json").read_text())
    types = {c["ColumnName"]: c["DataType"] for c in meta["ColumnDefinition"]}
    for c in ALLOCATION_COLUMNS:  # FOCUS 1.3: String, or JSON (serialized as a String)
        assert c in COLUMNS and c in text.columns, c
        assert pq_df[c].dtype == pl.String, c
        assert types[c] == (
            "JSON" if c in ("AllocatedMethodDetails", "AllocatedTags") else "STRING"
        )
    for frame, name in ((pq_df, "parquet"), (text, "csv")):
        tenants = frame.filter(
            pl.col("x_IdleCapacity").cast(pl.String).str.to_lowercase() == "false"
        )
        idle = frame.filter(pl.col("x_IdleCapacity").cast(pl.String).str.to_lowercase() == "true")
        idle_tiered = idle.filter(pl.col("x_Tier").is_not_null())
        assert tenants.height > 0 and idle_tiered.height > 0, name
        for c in ALLOCATION_COLUMNS:  # allocated charges: all five set
            assert tenants[c].null_count() == 0, f"{name}: {c} null on a tenant row"
        assert set(tenants["AllocatedMethodId"]) == {ALLOCATED_METHOD_ID}, name
        # the idle row is the unallocated portion of the same split: method and details,
        # no allocated resource (the spec: AllocatedResourceId MUST be null there)
        assert set(idle_tiered["AllocatedMethodId"]) == {ALLOCATED_METHOD_ID}, name
        assert idle_tiered["AllocatedMethodDetails"].null_count() == 0, name
        for c in ("AllocatedResourceId", "AllocatedResourceName", "AllocatedTags"):
            assert idle_tiered[c].null_count() == idle_tiered.height, f"{name}: {c} on idle"
        for row in tenants.iter_rows(named=True):
            tags = json.loads(row["AllocatedTags"])
            assert isinstance(tags, dict), f"{name}: AllocatedTags {row['AllocatedTags']!r}"
            want = {"tenant": row["x_Tenant"], "feature": row["x_Feature"]}
            assert tags == {k: v for k, v in want.items() if v is not None}, (name, tags)
            assert row["AllocatedResourceName"] == f"{row['x_Tenant']} / {row['x_Feature']}"
        for d in frame["AllocatedMethodDetails"].drop_nulls():
            details = json.loads(d)
            assert isinstance(details, dict) and details["Elements"], (name, d)
            for e in details["Elements"]:
                assert 0 <= e["AllocatedRatio"] <= 1 and isinstance(e["UsageUnit"], str), e
                assert isinstance(e["UsageQuantity"], int | float), e
            assert all(k == "Elements" or k.startswith("x_") for k in details), details
    tenants = df.filter(~pl.col("x_IdleCapacity"))
    # the cost goes to a tenant x feature; the charge's resource stays the shared tier
    assert (tenants["ResourceId"] == "vllm/" + tenants["x_Tier"]).all()
    assert (
        tenants.group_by(*ORIGIN, "AllocatedResourceId").len()["len"].max() == 1
    )  # locally unique within the origin charge
    details = json.loads(tenants["AllocatedMethodDetails"][0])
    assert details["x_Basis"] == "usage" and details["x_OutputTokenWeight"] == 4.0
    assert set(details["x_SplitMethods"]) <= {"prefill_decode_time", "token_ratio", "per_request"}
    # AllocatedRatio: the row's share of its origin charge; an origin charge's add up to 1
    tiered = df.filter(pl.col("x_Tier").is_not_null()).with_columns(
        ratio=pl.col("AllocatedMethodDetails").map_elements(_ratios, return_dtype=pl.Float64),
        origin_cost=pl.col("BilledCost").sum().over(ORIGIN),
        origin_hours=pl.col("PricingQuantity").sum().over(ORIGIN),
    )
    sums = tiered.group_by(ORIGIN).agg(pl.col("ratio").sum())["ratio"]
    assert sums.to_list() == pytest.approx([1.0] * len(sums), abs=1e-9)
    assert tiered["ratio"].to_list() == pytest.approx(
        (tiered["PricingQuantity"] / tiered["origin_hours"]).to_list(), abs=1e-9
    )
    # the prefill / decode parts are the request-level split of marts.request_costs
    part = {
        u: (
            tiered["AllocatedMethodDetails"].map_elements(
                lambda d, u=u: _ratios(d, u), return_dtype=pl.Float64
            )
            * tiered["origin_cost"]
        ).sum()
        for u in ("Prefill Tokens", "Decode Tokens", "Requests")
    }
    priced = f"{IN_WEEK} AND worked AND NOT unpriced"
    input_cost = one(db, f"SELECT sum(input_cost_usage) FROM marts.request_costs WHERE {priced}")
    output_cost = one(db, f"SELECT sum(output_cost_usage) FROM marts.request_costs WHERE {priced}")
    assert part["Prefill Tokens"] + part["Requests"] == pytest.approx(input_cost, rel=1e-6)
    assert part["Decode Tokens"] == pytest.approx(output_cost, rel=1e-6)

    def quantity(unit: str) -> float:
        return sum(
            e["UsageQuantity"]
            for d in tenants["AllocatedMethodDetails"]
            for e in json.loads(d)["Elements"]
            if e["UsageUnit"] == unit
        )

    work_in = one(db, f"SELECT sum(work_in) FROM marts.request_costs WHERE {priced}")
    work_out = one(db, f"SELECT sum(work_out) FROM marts.request_costs WHERE {priced}")
    assert quantity("Prefill Tokens") == pytest.approx(work_in, rel=1e-6)
    assert quantity("Decode Tokens") == pytest.approx(work_out, rel=1e-6)
    # the method's parameters are the ones the costs were computed with
    db2 = finops.connect(demo_lake)
    fc.configure(db2, output_token_weight=2.0)
    weights = {
        json.loads(d)["x_OutputTokenWeight"]
        for d in focus_rows(db2, WEEK).filter(~pl.col("x_IdleCapacity"))["AllocatedMethodDetails"]
    }
    assert weights == {2.0}


# ------------------------------------------- FOCUS 1.3 split cost allocation handling
# The spec (Data Generator-Calculated Split Cost Allocation Handling): in the allocated
# charges of one origin charge (a tier's GPU-day of one SKU price), dimensions and
# non-summable metrics match the origin's, summable metrics add up to the origin's.

SUMMABLE = ("BilledCost", "EffectiveCost", "ListCost", "ContractedCost", "PricingQuantity")
SPLIT_KEY = ["ChargePeriodStart", "ResourceId", "SkuPriceId"]  # the origin charge


@pytest.fixture(scope="module")
def split(demo_lake: Path):
    """(db, focus rows) of the demo lake with reserved, on-demand and spot tiers."""
    db = finops.connect(demo_lake)
    fc.load_deployments(db, EXAMPLE_DEPLOYMENTS)  # large reserved, mid on-demand, small spot
    return db, focus_rows(db, WEEK)


def _marts_origins(db) -> pl.DataFrame:
    """marts.gpu_cost_hourly per origin charge: GPU-hours and cost of a tier-day's SKU."""
    return (
        db.sql(
            f"""SELECT CAST(CAST(hour AS DATE) AS TIMESTAMP) AS ChargePeriodStart,
                   CASE WHEN tier IS NULL THEN coalesce('deployment/' || deployment,
                        'host/' || host) ELSE 'vllm/' || tier END AS ResourceId,
                   'gpu/' || gpu_model || '/' || pricing_kind AS SkuPriceId,
                   sum(gpu_hours) AS gpu_hours, sum(gpu_cost) AS gpu_cost
            FROM marts.gpu_cost_hourly WHERE {IN_WEEK} AND usd_per_gpu_hour IS NOT NULL
            GROUP BY ALL"""
        )
        .pl()
        .with_columns(pl.col("ChargePeriodStart").dt.replace_time_zone("UTC"))
    )


def _dimensions() -> list[str]:
    """Every FOCUS column but the summable metrics and the allocation's own: dimensions
    and unit prices (non-summable), one value per origin charge."""
    metrics = {*SUMMABLE, "ConsumedQuantity", "CommitmentDiscountQuantity"}
    allocation = set(ALLOCATION_COLUMNS) - {"AllocatedMethodId"}
    return [c for c in COLUMNS if not c.startswith("x_") and c not in metrics | allocation]


def test_allocated_rows_carry_their_origin_charges_dimensions(split) -> None:
    _db, df = split
    tiered = df.filter(pl.col("x_Tier").is_not_null())
    assert tiered.group_by(SPLIT_KEY).len()["len"].max() > 2  # tenants + idle per origin
    dimensions = _dimensions()
    assert {"ChargeDescription", "SubAccountId", "SubAccountName", "ConsumedUnit", "Tags"} <= set(
        dimensions
    )
    assert {"ListUnitPrice", "ContractedUnitPrice"} <= set(dimensions)  # non-summable: same
    dimensions = [c for c in dimensions if c not in SPLIT_KEY]
    n = df.group_by(SPLIT_KEY).agg(pl.col(c).n_unique() for c in dimensions)
    for c in dimensions:
        assert n[c].max() == 1, f"{c} differs within an origin charge"
    assert split_allocation_problems(df) == []
    # the tenant is in no FOCUS dimension: not a sub account, not in Tags
    assert df["SubAccountId"].null_count() == df["SubAccountName"].null_count() == df.height
    for t in df["Tags"].drop_nulls():
        assert set(json.loads(t)) == {"tier"}
    # the check finds a row that differs from its origin
    broken = df.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit("something else"))
        .otherwise(pl.col("ChargeDescription"))
        .alias("ChargeDescription")
    )
    assert [p.split(":")[0] for p in split_allocation_problems(broken)] == ["ChargeDescription"]


def test_consumed_quantity_is_gpu_hours_that_add_up_to_the_origin(split) -> None:
    db, df = split
    units = df.group_by("SkuId").agg(pl.col("ConsumedUnit").unique())
    for sku, unit in units.iter_rows():
        assert unit == ["GPU-Hours"], sku  # one unit per SKU: its quantities add up
    assert set(df["PricingUnit"]) == {"GPU-Hours"}
    assert (df["ConsumedQuantity"] == df["PricingQuantity"]).all()
    assert (df["ConsumedQuantity"] >= 0).all()
    # the origin charge rebuilt from its allocated rows = the marts' tier-day of that SKU
    got = origin_charges(df).join(_marts_origins(db), on=SPLIT_KEY, how="full", coalesce=True)
    assert got.height == origin_charges(df).height > 0  # no origin charge missing either side
    assert got["ConsumedQuantity"].to_list() == pytest.approx(got["gpu_hours"].to_list(), abs=1e-6)
    assert got["PricingQuantity"].to_list() == pytest.approx(got["gpu_hours"].to_list(), abs=1e-6)
    by_sku = df.group_by("SkuId").agg(pl.col("ConsumedQuantity").sum()).sort("SkuId")
    want = db.sql(
        f"SELECT 'gpu/' || gpu_model AS SkuId, sum(gpu_hours) AS h FROM marts.gpu_cost_hourly"
        f" WHERE {IN_WEEK} AND usd_per_gpu_hour IS NOT NULL GROUP BY ALL ORDER BY 1"
    ).fetchall()
    assert by_sku["SkuId"].to_list() == [s for s, _ in want]
    assert by_sku["ConsumedQuantity"].to_list() == pytest.approx([h for _, h in want], rel=1e-9)
    # the tokens are x_ columns: x_Tokens = the computed (uncached input + output) tokens
    priced = f"{IN_WEEK} AND worked AND NOT unpriced"
    tokens = one(db, f"SELECT sum(work_in + work_out) FROM marts.request_costs WHERE {priced}")
    assert abs(df["x_Tokens"].sum() - tokens) <= df.height  # per-row rounding aside
    assert (df.filter(pl.col("x_IdleCapacity"))["x_Tokens"] == 0).all()


def test_billed_cost_adds_up_to_the_origin_charges_cost(split) -> None:
    db, df = split
    marts = _marts_origins(db)
    # a consumer rebuilds the origin charges by grouping on the dimensions: one group each
    grouped = df.group_by(_dimensions(), maintain_order=True).agg(pl.col(c).sum() for c in SUMMABLE)
    assert grouped.height == marts.height > 0
    got = grouped.join(marts, on=SPLIT_KEY, how="inner")
    assert got.height == marts.height
    assert got["BilledCost"].to_list() == pytest.approx(got["gpu_cost"].to_list(), abs=1e-6)
    assert got["PricingQuantity"].to_list() == pytest.approx(got["gpu_hours"].to_list(), abs=1e-6)
    # origin_charges rebuilds the same (and the commitment quantity)
    origins = origin_charges(df)
    got = origins.join(marts, on=SPLIT_KEY, how="inner")
    assert got.height == origins.height == marts.height
    assert got["BilledCost"].to_list() == pytest.approx(got["gpu_cost"].to_list(), abs=1e-6)
    assert (got["EffectiveCost"] == got["BilledCost"]).all()
    for c, price in (("ListCost", "ListUnitPrice"), ("ContractedCost", "ContractedUnitPrice")):
        assert got[c].to_list() == pytest.approx(
            (got[price] * got["PricingQuantity"]).to_list(), abs=1e-6
        ), c
    committed = got.filter(pl.col("PricingCategory") == "Committed")
    assert committed.height > 0
    assert committed["CommitmentDiscountQuantity"].to_list() == pytest.approx(
        committed["PricingQuantity"].to_list()
    )
    assert (
        got.filter(pl.col("PricingCategory") != "Committed")["CommitmentDiscountQuantity"]
        .is_null()
        .all()
    )


def test_tenants_are_recoverable_from_the_allocated_columns(split) -> None:
    db, df = split
    tenants = df.filter(pl.col("AllocatedResourceId").is_not_null())
    idle = df.filter(pl.col("AllocatedResourceId").is_null())
    assert tenants.height > 0 and idle.height > 0
    assert not tenants["x_IdleCapacity"].any() and idle["x_IdleCapacity"].all()
    for origin_tags, allocated in tenants.select("Tags", "AllocatedTags").iter_rows():
        # the spec: AllocatedTags MUST NOT include the tags already present in Tags
        assert not set(json.loads(origin_tags)) & set(json.loads(allocated)), allocated
    tags = tenants["AllocatedTags"].map_elements(
        lambda t: json.loads(t).get("tenant"), return_dtype=pl.String
    )
    assert tags.to_list() == tenants["x_Tenant"].to_list()
    ids = tenants["AllocatedResourceId"].str.extract(r"^tenant/([^/]+)")
    assert ids.map_elements(unquote, return_dtype=pl.String).equals(tenants["x_Tenant"])
    by_tenant = dict(
        tenants.with_columns(tenant=tags).group_by("tenant").agg(pl.col("BilledCost").sum()).rows()
    )
    want = dict(
        db.sql(
            f"SELECT tenant, sum(cost_usage) FROM marts.request_costs"
            f" WHERE {IN_WEEK} AND worked AND NOT unpriced GROUP BY ALL"
        ).fetchall()
    )
    assert by_tenant.keys() == want.keys()
    for t, cost in want.items():
        assert by_tenant[t] == pytest.approx(cost, abs=1e-6), t
    bill = one(
        db,
        f"SELECT sum(gpu_cost) FROM marts.gpu_cost_hourly"
        f" WHERE {IN_WEEK} AND usd_per_gpu_hour IS NOT NULL",
    )
    busy, idle_cost = tenants["BilledCost"].sum(), idle["BilledCost"].sum()
    assert busy + idle_cost == pytest.approx(bill, abs=1e-6)
    assert round(busy + idle_cost, 2) == round(bill, 2)


def test_build_report_refuses_an_export_that_breaks_the_split(
    demo_lake: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tier-day whose rows disagree on a dimension would be written as FOCUS 1.3 that
    cannot rebuild its origin charge: the report stops, naming the column."""
    from finops.report import build
    from finops.report.figures import ReportError

    real = build.focus_rows

    def broken(db, week):  # one row's description differs from its origin's
        rows = real(db, week)
        return rows.with_columns(
            pl.when(pl.int_range(pl.len()) == 0)
            .then(pl.lit("something else"))
            .otherwise(pl.col("ChargeDescription"))
            .alias("ChargeDescription")
        )

    monkeypatch.setattr(build, "focus_rows", broken)
    with pytest.raises(ReportError, match="breaks split cost allocation: ChargeDescription"):
        build.build_report(demo_lake, WEEK, tmp_path / "out", growth=False)
