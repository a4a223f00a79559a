"""The week's GPU costs as FOCUS 1.3 rows (FinOps Open Cost and Usage Specification).

One row per day x tier x tenant x feature for cost allocated to requests (token
work, ConsumedUnit "Tokens"), and one row per day x tier for idle capacity (the
part of the GPU bill no request carried, ConsumedUnit "GPU-Hours"). Costs come
from `marts.request_costs` (allocation basis) and `marts.gpu_cost_hourly`, so the
rows add up to the GPU bill to the cent. The fleet is self-hosted: list, billed,
effective and contracted cost are the same catalog price x GPU-hours.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl

import finops.costs as fc
from finops.report.figures import sql

FOCUS_VERSION = "1.3"
PROVIDER = "Self-hosted (finops)"
SERVICE_NAME = "vLLM inference"
# Columns in output order: the FOCUS ones this dataset carries, then x_ extensions.
COLUMNS = (
    "BillingAccountId",
    "BillingAccountName",
    "BillingCurrency",
    "BillingPeriodStart",
    "BillingPeriodEnd",
    "ChargePeriodStart",
    "ChargePeriodEnd",
    "ChargeCategory",
    "ChargeClass",
    "ChargeDescription",
    "ChargeFrequency",
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "ListUnitPrice",
    "ContractedUnitPrice",
    "PricingCategory",
    "PricingQuantity",
    "PricingUnit",
    "PricingCurrency",
    "ConsumedQuantity",
    "ConsumedUnit",
    "ServiceCategory",
    "ServiceSubcategory",
    "ServiceName",
    "ServiceProviderName",
    "HostProviderName",
    "ProviderName",
    "PublisherName",
    "InvoiceIssuerName",
    "ResourceId",
    "ResourceName",
    "ResourceType",
    "RegionId",
    "RegionName",
    "SkuId",
    "SkuPriceId",
    "SubAccountId",
    "SubAccountName",
    "Tags",
    "x_Tenant",
    "x_Feature",
    "x_Tier",
    "x_GpuModel",
    "x_GpuHours",
    "x_Requests",
    "x_InputTokens",
    "x_OutputTokens",
    "x_CachedInputTokens",
    "x_IdleCapacity",
    "x_CostBasis",
)


def focus_rows(
    db: duckdb.DuckDBPyConnection, week: str, *, account: str = "finops"
) -> pl.DataFrame:
    """FOCUS rows for `week` (empty frame with all columns when the week has no GPU data)."""
    per = fc.period(week)
    assert per.start is not None and per.end is not None
    where = per.where()
    df = sql(
        db,
        f"""
        WITH tierday AS (
            SELECT CAST(hour AS DATE) AS day, coalesce(tier, '(untiered)') AS tier,
                   string_agg(DISTINCT gpu_model, ', ' ORDER BY gpu_model) AS gpu_model,
                   sum(gpu_hours) AS gpu_hours, sum(gpu_cost) AS gpu_cost,
                   sum(busy_gpu_hours) AS busy_gpu_hours,
                   any_value(pricing_kind) AS pricing_kind
            FROM marts.gpu_cost_hourly WHERE {where} AND usd_per_gpu_hour IS NOT NULL
            GROUP BY ALL
        ),
        alloc AS (
            SELECT CAST(hour AS DATE) AS day, tier, tenant, feature,
                   count(*) AS requests,
                   sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                   sum(cached_input_tokens) AS cached_input_tokens,
                   sum(work_in + work_out) AS work_tokens,
                   sum(cost_allocation) AS cost
            FROM marts.request_costs
            WHERE {where} AND worked AND NOT unpriced AND tier IS NOT NULL
            GROUP BY ALL
        ),
        alloc_day AS (SELECT day, tier, sum(cost) AS cost FROM alloc GROUP BY ALL),
        usage_rows AS (
            SELECT a.day, a.tier, a.tenant, a.feature, t.gpu_model, t.pricing_kind,
                   a.requests, a.input_tokens, a.output_tokens, a.cached_input_tokens,
                   a.work_tokens, a.cost, t.gpu_cost / t.gpu_hours AS unit_price,
                   false AS idle
            FROM alloc a JOIN tierday t USING (day, tier)
        ),
        idle_rows AS (
            SELECT t.day, t.tier, NULL AS tenant, NULL AS feature, t.gpu_model, t.pricing_kind,
                   0 AS requests, 0 AS input_tokens, 0 AS output_tokens,
                   0 AS cached_input_tokens, 0 AS work_tokens,
                   t.gpu_cost - coalesce(d.cost, 0) AS cost,
                   t.gpu_cost / t.gpu_hours AS unit_price, true AS idle
            FROM tierday t LEFT JOIN alloc_day d USING (day, tier)
        )
        SELECT * FROM usage_rows
        UNION ALL
        SELECT * FROM idle_rows WHERE cost > 1e-6  -- drop float residue of fully used tier-days
        ORDER BY day, tier, idle, tenant, feature
        """,
    ).pl()
    if df.height == 0:
        return pl.DataFrame(schema={c: _dtype(c) for c in COLUMNS})
    day_start = pl.col("day").cast(pl.Datetime("us", "UTC"))
    gpu_hours = pl.col("cost") / pl.col("unit_price")
    tags = pl.struct(
        pl.col("tenant").alias("tenant"),
        pl.col("feature").alias("feature"),
        pl.col("tier").alias("tier"),
    ).struct.json_encode()
    cost = pl.col("cost").round(10)
    out = df.select(
        pl.lit(account).alias("BillingAccountId"),
        pl.lit(account).alias("BillingAccountName"),
        pl.lit("USD").alias("BillingCurrency"),
        pl.lit(per.start).alias("BillingPeriodStart"),
        pl.lit(per.end).alias("BillingPeriodEnd"),
        day_start.alias("ChargePeriodStart"),
        (day_start + pl.duration(days=1)).alias("ChargePeriodEnd"),
        pl.lit("Usage").alias("ChargeCategory"),
        pl.lit(None, dtype=pl.String).alias("ChargeClass"),
        pl.when(pl.col("idle"))
        .then(pl.format("Idle GPU capacity of tier {} ({})", "tier", "gpu_model"))
        .otherwise(
            pl.format(
                "LLM inference on tier {} ({}) for {} / {}",
                "tier",
                "gpu_model",
                pl.col("tenant").fill_null("(none)"),
                pl.col("feature").fill_null("(none)"),
            )
        )
        .alias("ChargeDescription"),
        pl.lit("Usage-Based").alias("ChargeFrequency"),
        cost.alias("BilledCost"),
        cost.alias("EffectiveCost"),
        cost.alias("ListCost"),
        cost.alias("ContractedCost"),
        pl.col("unit_price").alias("ListUnitPrice"),
        pl.col("unit_price").alias("ContractedUnitPrice"),
        pl.lit("Standard").alias("PricingCategory"),
        gpu_hours.alias("PricingQuantity"),
        pl.lit("GPU-Hours").alias("PricingUnit"),
        pl.lit("USD").alias("PricingCurrency"),
        pl.when(pl.col("idle"))
        .then(gpu_hours)
        .otherwise(pl.col("work_tokens").cast(pl.Float64))
        .alias("ConsumedQuantity"),
        pl.when(pl.col("idle"))
        .then(pl.lit("GPU-Hours"))
        .otherwise(pl.lit("Tokens"))
        .alias("ConsumedUnit"),
        pl.lit("AI and Machine Learning").alias("ServiceCategory"),
        pl.lit("Generative AI").alias("ServiceSubcategory"),
        pl.lit(SERVICE_NAME).alias("ServiceName"),
        pl.lit(PROVIDER).alias("ServiceProviderName"),
        pl.lit(PROVIDER).alias("HostProviderName"),
        pl.lit(PROVIDER).alias("ProviderName"),
        pl.lit(PROVIDER).alias("PublisherName"),
        pl.lit(PROVIDER).alias("InvoiceIssuerName"),
        pl.format("vllm/{}", "tier").alias("ResourceId"),
        pl.format("vLLM {} tier", "tier").alias("ResourceName"),
        pl.lit("GPU inference deployment").alias("ResourceType"),
        pl.lit(None, dtype=pl.String).alias("RegionId"),
        pl.lit(None, dtype=pl.String).alias("RegionName"),
        pl.format("gpu/{}/{}", "gpu_model", "pricing_kind").alias("SkuId"),
        pl.format("gpu/{}/{}", "gpu_model", "pricing_kind").alias("SkuPriceId"),
        pl.col("tenant").alias("SubAccountId"),
        pl.col("tenant").alias("SubAccountName"),
        tags.alias("Tags"),
        pl.col("tenant").alias("x_Tenant"),
        pl.col("feature").alias("x_Feature"),
        pl.col("tier").alias("x_Tier"),
        pl.col("gpu_model").alias("x_GpuModel"),
        gpu_hours.alias("x_GpuHours"),
        pl.col("requests").cast(pl.Int64).alias("x_Requests"),
        pl.col("input_tokens").cast(pl.Int64).alias("x_InputTokens"),
        pl.col("output_tokens").cast(pl.Int64).alias("x_OutputTokens"),
        pl.col("cached_input_tokens").cast(pl.Int64).alias("x_CachedInputTokens"),
        pl.col("idle").alias("x_IdleCapacity"),
        pl.lit("allocation").alias("x_CostBasis"),
    )
    return out.select(COLUMNS)


def _dtype(col: str) -> pl.DataType:
    if col.endswith(("Start", "End")):
        return pl.Datetime("us", "UTC")
    if col in ("x_Requests", "x_InputTokens", "x_OutputTokens", "x_CachedInputTokens"):
        return pl.Int64()
    if col == "x_IdleCapacity":
        return pl.Boolean()
    if col.endswith(("Cost", "Price", "Quantity")) or col == "x_GpuHours":
        return pl.Float64()
    return pl.String()


def write_focus(df: pl.DataFrame, out_dir: Path, week: str) -> tuple[Path, Path]:
    """Write `focus-<week>.csv` (ISO 8601 UTC 'Z' datetimes) and `.parquet`."""
    csv, parquet = out_dir / f"focus-{week}.csv", out_dir / f"focus-{week}.parquet"
    df.write_parquet(parquet)
    iso = "%Y-%m-%dT%H:%M:%SZ"
    df.with_columns(
        pl.col(c).dt.strftime(iso) for c in df.columns if c.endswith(("Start", "End"))
    ).write_csv(csv)
    return csv, parquet


__all__ = ["COLUMNS", "FOCUS_VERSION", "focus_rows", "write_focus"]
