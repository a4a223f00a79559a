"""The week's GPU costs as FOCUS 1.3 rows (FinOps Open Cost and Usage Specification).

Rows are per day x tier x GPU model x pricing kind (one real SKU and price each):
one per tenant x feature for the GPU time its requests' work took, and one for the idle
capacity no request carried (x_IdleCapacity). Every row is priced and consumed in
GPU-hours (PricingUnit = ConsumedUnit "GPU-Hours"); the tokens behind a tenant row are
x_ columns (x_Tokens: the uncached input + output tokens the GPUs computed, x_InputTokens
...) and the UsageQuantity of its AllocatedMethodDetails. Tenant rows use the usage basis
(`cost_usage` of `marts.request_costs`: the busy share of the GPU bill, split by token
work), so idle capacity is its own
line, never spread over tenants (as DESIGN.md asks, and as OpenCost reports it by
default); tenants + idle add up to the GPU bill to the cent. GPU-hours come from the
GPU marts, never from cost / price, so free GPUs keep theirs. GPUs with no tier are
idle rows named by their deployment (x_Tier null).

Prices: BilledCost = EffectiveCost = what was paid (catalog price of the GPU's pricing
kind); ListUnitPrice is the catalog's on-demand price of the GPU model (the paid price
when the catalog has none). Reserved GPUs are PricingCategory "Committed" with the
CommitmentDiscount* columns (Status "Used", Category "Usage", GPU-hours) and, as the
spec excludes commitment discounts from it, ContractedUnitPrice = the list price; spot
GPUs are "Dynamic" and on-demand ones "Standard", with ContractedUnitPrice = the price paid.

Split cost allocation (FOCUS 1.3 Allocated* columns): a tier's GPU-day of one SKU is the
origin charge (ORIGIN_KEY: ChargePeriodStart x ResourceId x SkuPriceId), split by the
data generator's method ALLOCATED_METHOD_ID
("finops-token-work-usage-v1": each tier-hour's busy GPU cost split over its requests by
token work, `marts.request_costs.pool_share`; prefill / decode split by the measured
vLLM phase times, else R = finops_output_token_weight; idle capacity not allocated). Its
tenant rows are allocated charges: AllocatedResourceId / Name name the tenant x feature
the cost went to (ResourceId stays the shared tier), AllocatedTags hold its tenant /
feature. The idle row is the unallocated portion: it keeps AllocatedMethodId and its
AllocatedMethodDetails (its ratio), with AllocatedResourceId, AllocatedResourceName and
AllocatedTags null, as the spec asks. AllocatedMethodDetails' Elements (AllocatedRatio: the row's share of the
origin charge's GPU-hours, = its cost share as one SKU has one price) add up to 1 per
origin charge. Untiered GPUs are split by nothing: all five columns null.

The spec's Data Generator-Calculated Split Cost Allocation Handling: every allocated row
of an origin charge carries the origin's dimensions (ChargeDescription names the tier-day's
SKU, not the tenant; SubAccountId / SubAccountName are null throughout, the fleet having
no sub-account construct; Tags are the origin's, {"tier": ...}; ConsumedUnit "GPU-Hours")
and unit prices, and its summable metrics (costs, PricingQuantity, ConsumedQuantity,
CommitmentDiscountQuantity) add up to the origin's, so `origin_charges` rebuilds the
tier-day from its rows; `split_allocation_problems` lists where they do not. The tenant
and feature are in AllocatedResourceId / AllocatedResourceName / AllocatedTags (and
x_Tenant / x_Feature), never in a FOCUS dimension the origin charge has.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import duckdb
import polars as pl

import finops.costs as fc
from finops.prices import PriceCatalogError, price_for
from finops.report.figures import sql

FOCUS_VERSION = "1.3"
DATA_GENERATOR = "finops"
PROVIDER = "Self-hosted (finops)"
SERVICE_NAME = "vLLM inference"
PRICE_DECIMALS = 6  # unit prices: catalog prices have cents, 6 decimals drops float residue
PRICING_CATEGORY = {"on_demand": "Standard", "reserved": "Committed", "spot": "Dynamic"}
# FOCUS 1.3 split cost allocation: the one method the tenant rows come from (documented in
# the module docstring and the README); a new id for any change to what it splits or how.
ALLOCATED_METHOD_ID = "finops-token-work-usage-v1"
RATIO_DECIMALS = 12  # AllocatedRatio: the ratios of an origin charge still sum to 1
JSON_COLUMNS = ("Tags", "AllocatedMethodDetails", "AllocatedTags")
# One origin charge of the split: a tier's (or an untiered deployment's) GPU-day of one SKU price.
ORIGIN_KEY = ("ChargePeriodStart", "ResourceId", "SkuPriceId")
# FOCUS metrics: summable ones add up over an origin's allocated rows, non-summable ones
# (unit prices) repeat the origin's; every other FOCUS column but the allocation's own
# (ALLOCATION_COLUMNS) is a dimension, one value per origin charge.
SUMMABLE_METRICS = (
    "BilledCost",
    "EffectiveCost",
    "ListCost",
    "ContractedCost",
    "PricingQuantity",
    "ConsumedQuantity",
    "CommitmentDiscountQuantity",
)
NON_SUMMABLE_METRICS = ("ListUnitPrice", "ContractedUnitPrice")
ALLOCATION_COLUMNS = (
    "AllocatedMethodId",
    "AllocatedMethodDetails",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
)
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
    "CommitmentDiscountCategory",
    "CommitmentDiscountId",
    "CommitmentDiscountName",
    "CommitmentDiscountQuantity",
    "CommitmentDiscountStatus",
    "CommitmentDiscountType",
    "CommitmentDiscountUnit",
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
    "AllocatedMethodId",
    "AllocatedMethodDetails",
    "AllocatedResourceId",
    "AllocatedResourceName",
    "AllocatedTags",
    "x_Tenant",
    "x_Feature",
    "x_Tier",
    "x_GpuModel",
    "x_PricingKind",
    "x_GpuHours",
    "x_Requests",
    "x_Tokens",
    "x_InputTokens",
    "x_OutputTokens",
    "x_CachedInputTokens",
    "x_IdleCapacity",
    "x_CostBasis",
)


def focus_rows(
    db: duckdb.DuckDBPyConnection, week: str, *, account: str = "finops"
) -> pl.DataFrame:
    """FOCUS rows for `week` (empty frame with all columns when the week has no GPU data).

    A tier-hour's GPUs of several models or pricing kinds give one row each: a tenant's
    usage cost and GPU-hours follow its share of the tier-hour's work
    (`marts.request_costs.pool_share`) times each GPU row's busy cost and
    busy GPU-hours; its requests and tokens split by the rows' busy GPU-hours."""
    per = fc.period(week)
    assert per.start is not None and per.end is not None
    where = per.where()
    df = sql(
        db,
        f"""
        WITH gpu AS (
            SELECT hour, tier,
                   CASE WHEN tier IS NULL
                        THEN coalesce('deployment/' || deployment, 'host/' || host) END
                       AS resource,
                   gpu_model, pricing_kind, max(usd_per_gpu_hour) AS unit_price,
                   sum(gpu_hours) AS gpu_hours, sum(gpu_cost) AS gpu_cost,
                   sum(busy_gpu_hours) AS busy_gpu_hours, sum(busy_cost) AS busy_cost
            FROM marts.gpu_cost_hourly WHERE {where} AND usd_per_gpu_hour IS NOT NULL
            GROUP BY ALL
        ),
        work AS (  -- each request's share of its tier-hour (marts.request_costs), and
                   -- its prefill / decode / per-request parts (31_costs_requests.sql)
            SELECT hour, tier, tenant, feature, input_tokens, output_tokens,
                   cached_input_tokens, work_in, work_out, work_in + work_out AS work_tokens,
                   pool_share AS share, split_method,
                   CASE WHEN split_method = 'per_request' THEN 0.0
                        ELSE input_share
                             * coalesce(work_in / nullif(sum(work_in) OVER th, 0), 0.0)
                   END AS share_in,
                   CASE WHEN split_method = 'per_request' THEN 0.0
                        ELSE (1 - input_share)
                             * coalesce(work_out / nullif(sum(work_out) OVER th, 0), 0.0)
                   END AS share_out,
                   CASE WHEN split_method = 'per_request' THEN pool_share ELSE 0.0 END
                       AS share_req
            FROM marts.request_costs WHERE {where} AND worked AND NOT unpriced
            WINDOW th AS (PARTITION BY hour, tier)
        ),
        tenant_hour AS (
            SELECT hour, tier, tenant, feature, split_method, count(*) AS requests,
                   sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens,
                   sum(cached_input_tokens) AS cached_input_tokens,
                   sum(work_tokens) AS work_tokens, sum(share) AS share,
                   sum(work_in) AS work_in, sum(work_out) AS work_out,
                   count(*) FILTER (split_method = 'per_request') AS req_n,
                   sum(share_in) AS share_in, sum(share_out) AS share_out,
                   sum(share_req) AS share_req
            FROM work GROUP BY ALL
        ),
        carried AS (SELECT hour, tier, sum(share) AS share FROM tenant_hour GROUP BY ALL),
        gw AS (
            SELECT g.*, coalesce(c.share, 0.0) AS carried,
                   coalesce(g.busy_gpu_hours / nullif(sum(g.busy_gpu_hours) OVER th, 0),
                            g.gpu_hours / nullif(sum(g.gpu_hours) OVER th, 0)) AS w
            FROM gpu g LEFT JOIN carried c ON c.hour = g.hour AND c.tier = g.tier
            WINDOW th AS (PARTITION BY g.hour, g.tier)
        ),
        usage_rows AS (
            SELECT CAST(g.hour AS DATE) AS day, g.tier, g.resource, g.gpu_model,
                   g.pricing_kind, g.unit_price, t.tenant, t.feature,
                   sum(t.requests * g.w) AS requests,
                   sum(t.input_tokens * g.w) AS input_tokens,
                   sum(t.output_tokens * g.w) AS output_tokens,
                   sum(t.cached_input_tokens * g.w) AS cached_input_tokens,
                   sum(t.work_tokens * g.w) AS work_tokens,
                   sum(t.share * g.busy_gpu_hours) AS gpu_hours,
                   sum(t.share * g.busy_cost) AS cost, false AS idle,
                   sum(t.work_in * g.w) AS work_in, sum(t.work_out * g.w) AS work_out,
                   sum(t.req_n * g.w) AS req_n,
                   sum(t.share_in * g.busy_gpu_hours) AS gpu_in,
                   sum(t.share_out * g.busy_gpu_hours) AS gpu_out,
                   sum(t.share_req * g.busy_gpu_hours) AS gpu_req,
                   list_sort(list_distinct(list(t.split_method))) AS split_methods
            FROM tenant_hour t JOIN gw g ON g.hour = t.hour AND g.tier = t.tier
            GROUP BY ALL
        ),
        idle_rows AS (
            SELECT CAST(hour AS DATE) AS day, tier, resource, gpu_model, pricing_kind,
                   unit_price, NULL AS tenant, NULL AS feature, 0.0 AS requests,
                   0.0 AS input_tokens, 0.0 AS output_tokens, 0.0 AS cached_input_tokens,
                   0.0 AS work_tokens,
                   sum(gpu_hours - carried * busy_gpu_hours) AS gpu_hours,
                   sum(gpu_cost - carried * busy_cost) AS cost, true AS idle,
                   0.0 AS work_in, 0.0 AS work_out, 0.0 AS req_n, 0.0 AS gpu_in,
                   0.0 AS gpu_out, 0.0 AS gpu_req, CAST(NULL AS VARCHAR[]) AS split_methods
            FROM gw GROUP BY ALL
        )
        SELECT * FROM usage_rows
        UNION ALL BY NAME
        -- GPU-hours, not cost: a free GPU's idle hours stay; float residue of a fully
        -- used tier-day goes
        SELECT * FROM idle_rows WHERE gpu_hours > 1e-9
        ORDER BY day, tier NULLS LAST, resource, gpu_model, pricing_kind, idle,
                 tenant NULLS FIRST, feature NULLS FIRST
        """,
    ).pl()
    if df.height == 0:
        return pl.DataFrame(schema={c: _dtype(c) for c in COLUMNS})
    df = df.join(_list_prices(db, df), on=["gpu_model", "unit_price"], how="left")
    day_start = pl.col("day").cast(pl.Datetime("us", "UTC"))
    gpu_hours = pl.col("gpu_hours").clip(lower_bound=0.0).round(10)
    committed = pl.col("pricing_kind") == "reserved"
    list_price = pl.col("list_price").round(PRICE_DECIMALS)
    contracted_price = (
        pl.when(committed).then(pl.col("list_price")).otherwise(pl.col("unit_price"))
    ).round(PRICE_DECIMALS)
    tiered = pl.col("tier").is_not_null()
    allocated = ~pl.col("idle")
    # the origin charge: the day's GPU-hours of one SKU of a tier (tenant rows + idle row)
    origin = gpu_hours.sum().over("day", "tier", "resource", "gpu_model", "pricing_kind")
    weight = db.execute(
        "SELECT coalesce(CAST(getvariable('finops_output_token_weight') AS DOUBLE), 4.0)"
    ).fetchall()[0][0]
    details = pl.struct(
        "idle",
        "work_in",
        "work_out",
        "req_n",
        "split_methods",
        *(
            (pl.col(c).clip(lower_bound=0.0) / origin).fill_nan(0.0).alias(f"r_{c}")
            for c in ("gpu_in", "gpu_out", "gpu_req")
        ),
        (gpu_hours / origin).fill_nan(0.0).alias("r_idle"),
        gpu_hours.alias("gpu_hours"),
    ).map_elements(lambda r: _method_details(r, weight), return_dtype=pl.String)
    tenant_feature = pl.struct(pl.col("tenant").alias("tenant"), pl.col("feature").alias("feature"))
    # the origin charge's tags (its tier); the tenant / feature are AllocatedTags, which the
    # spec keeps apart from Tags
    tags = pl.struct(pl.col("tier").alias("tier")).map_elements(_tags, return_dtype=pl.String)
    where_ = (
        pl.when(tiered)
        .then(pl.format("tier {}", "tier"))
        .otherwise(pl.format("{} (no tier)", "resource"))
    )
    cost = pl.col("cost").round(10)
    commit = {
        "CommitmentDiscountCategory": pl.lit("Usage"),
        "CommitmentDiscountId": pl.format("{}/reserved/{}", pl.lit(account), "gpu_model"),
        "CommitmentDiscountName": pl.format("Reserved {} GPUs", "gpu_model"),
        "CommitmentDiscountQuantity": gpu_hours,
        "CommitmentDiscountStatus": pl.lit("Used"),
        "CommitmentDiscountType": pl.lit("Reserved GPU capacity"),
        "CommitmentDiscountUnit": pl.lit("GPU-Hours"),
    }
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
        # the origin charge's: the same on its tenant rows and its idle row
        pl.when(tiered)
        .then(
            pl.format(
                "GPU-hours of vLLM {} ({}, {}): LLM inference, split over tenant x feature "
                "by token work, idle capacity apart",
                where_,
                "gpu_model",
                "pricing_kind",
            )
        )
        .otherwise(
            pl.format(
                "GPU-hours of {} ({}, {}): idle capacity", where_, "gpu_model", "pricing_kind"
            )
        )
        .alias("ChargeDescription"),
        pl.lit("Usage-Based").alias("ChargeFrequency"),
        cost.alias("BilledCost"),
        cost.alias("EffectiveCost"),
        (list_price * gpu_hours).round(10).alias("ListCost"),
        (contracted_price * gpu_hours).round(10).alias("ContractedCost"),
        list_price.alias("ListUnitPrice"),
        contracted_price.alias("ContractedUnitPrice"),
        pl.col("pricing_kind")
        .replace_strict(PRICING_CATEGORY, default="Other", return_dtype=pl.String)
        .alias("PricingCategory"),
        gpu_hours.alias("PricingQuantity"),
        pl.lit("GPU-Hours").alias("PricingUnit"),
        pl.lit("USD").alias("PricingCurrency"),
        gpu_hours.alias("ConsumedQuantity"),  # the origin's unit: its rows add up to it
        pl.lit("GPU-Hours").alias("ConsumedUnit"),
        *(pl.when(committed).then(v).alias(k) for k, v in commit.items()),
        pl.lit("AI and Machine Learning").alias("ServiceCategory"),
        pl.lit("Generative AI").alias("ServiceSubcategory"),
        pl.lit(SERVICE_NAME).alias("ServiceName"),
        pl.lit(PROVIDER).alias("ServiceProviderName"),
        pl.lit(PROVIDER).alias("HostProviderName"),
        pl.lit(PROVIDER).alias("ProviderName"),
        pl.lit(PROVIDER).alias("PublisherName"),
        pl.lit(PROVIDER).alias("InvoiceIssuerName"),
        pl.when(tiered)
        .then(pl.format("vllm/{}", "tier"))
        .otherwise(pl.col("resource"))
        .alias("ResourceId"),
        pl.when(tiered)
        .then(pl.format("vLLM {} tier", "tier"))
        .otherwise(pl.col("resource").str.replace(r"^[a-z]+/", ""))
        .alias("ResourceName"),
        pl.lit("GPU inference deployment").alias("ResourceType"),
        pl.lit(None, dtype=pl.String).alias("RegionId"),
        pl.lit(None, dtype=pl.String).alias("RegionName"),
        pl.format("gpu/{}", "gpu_model").alias("SkuId"),
        pl.format("gpu/{}/{}", "gpu_model", "pricing_kind").alias("SkuPriceId"),
        # no sub-account construct: a tenant is where the cost went (Allocated*), not a
        # grouping the origin charge's GPUs belong to
        pl.lit(None, dtype=pl.String).alias("SubAccountId"),
        pl.lit(None, dtype=pl.String).alias("SubAccountName"),
        tags.alias("Tags"),
        pl.when(tiered).then(pl.lit(ALLOCATED_METHOD_ID)).alias("AllocatedMethodId"),
        pl.when(tiered).then(details).alias("AllocatedMethodDetails"),
        pl.when(allocated)
        .then(tenant_feature.map_elements(_allocated_id, return_dtype=pl.String))
        .alias("AllocatedResourceId"),
        pl.when(allocated)
        .then(
            pl.format(
                "{} / {}",
                pl.col("tenant").fill_null("(none)"),
                pl.col("feature").fill_null("(none)"),
            )
        )
        .alias("AllocatedResourceName"),
        pl.when(allocated)
        .then(tenant_feature.map_elements(_tags, return_dtype=pl.String))
        .alias("AllocatedTags"),
        pl.col("tenant").alias("x_Tenant"),
        pl.col("feature").alias("x_Feature"),
        pl.col("tier").alias("x_Tier"),
        pl.col("gpu_model").alias("x_GpuModel"),
        pl.col("pricing_kind").alias("x_PricingKind"),
        gpu_hours.alias("x_GpuHours"),
        *(
            pl.col(c).round(0).cast(pl.Int64).alias(x)
            for c, x in (
                ("requests", "x_Requests"),
                ("work_tokens", "x_Tokens"),
                ("input_tokens", "x_InputTokens"),
                ("output_tokens", "x_OutputTokens"),
                ("cached_input_tokens", "x_CachedInputTokens"),
            )
        ),
        pl.col("idle").alias("x_IdleCapacity"),
        pl.lit("usage").alias("x_CostBasis"),
    )
    return out.select(COLUMNS)


# x_ columns that describe the origin charge (one value per origin, like its dimensions)
ORIGIN_EXTENSIONS = ("x_Tier", "x_GpuModel", "x_PricingKind", "x_CostBasis")


def _origin_columns(columns: list[str]) -> list[str]:
    """The columns an origin charge has one value of: FOCUS dimensions, non-summable
    metrics and ORIGIN_EXTENSIONS (not the allocation's own columns)."""
    return [
        c
        for c in columns
        if c not in ORIGIN_KEY
        and c not in SUMMABLE_METRICS
        and c not in ALLOCATION_COLUMNS
        and (not c.startswith("x_") or c in ORIGIN_EXTENSIONS)
    ]


def origin_charges(df: pl.DataFrame) -> pl.DataFrame:
    """The origin charges rebuilt from `focus_rows`' allocated charges: one row per
    ORIGIN_KEY with its dimensions and unit prices (the first row's: `split_allocation_problems`
    says when the rows disagree), its summable metrics summed over the rows (null where all
    are null) and x_AllocatedCharges, how many rows it was split into."""
    return df.group_by(ORIGIN_KEY, maintain_order=True).agg(
        *(pl.col(c).first() for c in _origin_columns(df.columns)),
        *(
            pl.when(pl.col(c).is_null().all()).then(None).otherwise(pl.col(c).sum()).alias(c)
            for c in SUMMABLE_METRICS
            if c in df.columns
        ),
        pl.len().alias("x_AllocatedCharges"),
    )


def split_allocation_problems(df: pl.DataFrame) -> list[str]:
    """Where `focus_rows`' output breaks FOCUS 1.3 Data Generator-Calculated Split Cost
    Allocation Handling (empty when it conforms): per origin charge (ORIGIN_KEY), every
    dimension, unit price, ORIGIN_EXTENSIONS column and AllocatedMethodId has one value
    (null counts as one), and the AllocatedRatio values of a split origin add up to 1.
    The summable metrics add up to the origin's by construction (`origin_charges`); compare
    those with the GPU marts to check the amounts."""
    if df.height == 0:
        return []
    cols = [*_origin_columns(df.columns), "AllocatedMethodId"]
    n = df.group_by(ORIGIN_KEY).agg(pl.col(c).n_unique() for c in cols)
    problems = []
    for c in cols:
        bad = n.filter(pl.col(c) > 1)
        if bad.height:
            key = dict(zip(ORIGIN_KEY, bad.row(0)[: len(ORIGIN_KEY)], strict=True))
            problems.append(
                f"{c}: several values in {bad.height} of {n.height} origin charges (e.g. {key})"
            )
    ratios = (
        df.filter(pl.col("AllocatedMethodId").is_not_null())
        .with_columns(
            r=pl.col("AllocatedMethodDetails").map_elements(
                lambda d: float(sum(e["AllocatedRatio"] for e in json.loads(d)["Elements"])),
                return_dtype=pl.Float64,
            )
        )
        .group_by(ORIGIN_KEY)
        .agg(pl.col("r").sum())
        .filter((pl.col("r") - 1).abs() > 1e-9)
    )
    if ratios.height:
        problems.append(f"AllocatedRatio: does not add up to 1 in {ratios.height} origin charges")
    return problems


def _tags(row: dict[str, str | None]) -> str | None:
    """The row's tier (Tags) or tenant / feature (AllocatedTags) as a JSON object, only the ones it has (no
    placeholder values); null when it has none."""
    tags = {k: v for k, v in row.items() if v is not None}
    return json.dumps(tags, separators=(",", ":")) if tags else None


def _allocated_id(row: dict[str, str | None]) -> str:
    """The tenant x feature a tenant row's cost went to, as `tenant/<t>/feature/<f>` (the
    names percent-encoded, so a / in one cannot fake another); never null on such a row."""
    parts = [f"{k}/{quote(v, safe='')}" for k, v in row.items() if v is not None]
    return "/".join(parts) or "unattributed"


def _method_details(row: dict[str, Any], weight: float) -> str:
    """AllocatedMethodDetails: the FOCUS 1.3 object (Elements of AllocatedRatio, UsageUnit,
    UsageQuantity; the ratios of an origin charge's rows sum to 1) plus x_ keys saying how
    the method ran. Tenant rows: one element per part of their share (prefill tokens,
    decode tokens, and requests of tier-hours without tokens, split equally); the idle row:
    its unallocated GPU-hours."""

    def element(ratio: float, unit: str, quantity: float) -> dict[str, Any]:
        return {
            "AllocatedRatio": round(ratio, RATIO_DECIMALS),
            "UsageUnit": unit,
            "UsageQuantity": round(quantity, 6),
        }

    if row["idle"]:
        elements = [element(row["r_idle"], "GPU-Hours", row["gpu_hours"])]
    else:
        elements = [
            element(row["r_gpu_in"], "Prefill Tokens", row["work_in"]),
            element(row["r_gpu_out"], "Decode Tokens", row["work_out"]),
        ]
        if row["r_gpu_req"]:
            elements.append(element(row["r_gpu_req"], "Requests", row["req_n"]))
    details: dict[str, Any] = {"Elements": elements, "x_Basis": "usage"}
    if row["idle"]:
        details["x_Unallocated"] = "idle capacity: GPU time no request carried"
    else:
        details["x_Pool"] = "busy GPU cost of each tier-hour"
        details["x_SplitMethods"] = row["split_methods"]
        details["x_OutputTokenWeight"] = weight
    return json.dumps(details, separators=(",", ":"))


def _list_prices(db: duckdb.DuckDBPyConnection, df: pl.DataFrame) -> pl.DataFrame:
    """The catalog's on-demand $/GPU-hour per GPU model (`price_for`'s matching rule);
    the price paid where the catalog has no on-demand price for the model."""
    prices = db.sql("SELECT * FROM ref.prices").pl()
    rows = []
    for model, paid in df.select("gpu_model", "unit_price").unique().iter_rows():
        try:
            rows.append((model, paid, price_for(prices, model, "on_demand")))
        except PriceCatalogError:
            rows.append((model, paid, paid))
    return pl.DataFrame(rows, schema=["gpu_model", "unit_price", "list_price"], orient="row").cast(
        {"unit_price": pl.Float64, "list_price": pl.Float64}
    )


def _dtype(col: str) -> pl.DataType:
    if col.endswith(("Start", "End")):
        return pl.Datetime("us", "UTC")
    if col in ("x_Requests", "x_Tokens", "x_InputTokens", "x_OutputTokens", "x_CachedInputTokens"):
        return pl.Int64()
    if col == "x_IdleCapacity":
        return pl.Boolean()
    if col.endswith(("Cost", "Price", "Quantity")) or col == "x_GpuHours":
        return pl.Float64()
    return pl.String()


def _focus_type(col: str, dtype: pl.DataType) -> str:
    """A column's FOCUS data type name (as in the spec's ColumnDefinition examples)."""
    if col in JSON_COLUMNS:
        return "JSON"
    if dtype == pl.Datetime("us", "UTC"):
        return "DATETIME"
    if dtype == pl.Float64:
        return "DECIMAL"
    if dtype == pl.Int64:
        return "INTEGER"
    if dtype == pl.Boolean:
        return "BOOLEAN"
    return "STRING"


def focus_metadata(
    df: pl.DataFrame,
    week: str,
    unpriced: Mapping[str, object] | None = None,
    gaps: Mapping[str, float] | None = None,
) -> dict[str, object]:
    """FOCUS schema metadata for the export: FocusVersion, DataGenerator, CreationDate and
    the ColumnDefinition list; SchemaId hashes the columns, so it changes with them.

    `unpriced` ({"gpu_hours": ..., "models": [...]}) names GPU-hours the price catalog
    has no price for, and `gaps` ({"gpu_hours": ..., "cost": ...}) GPU-hours with no
    samples between reporting ones (marts.gpu_gap_hourly: an exporter or collector down):
    neither has rows, and without these a consumer would read a complete-looking,
    smaller bill."""
    columns = [
        {"ColumnName": c, "DataType": _focus_type(c, t)}
        for c, t in zip(df.columns, df.dtypes, strict=True)
    ]
    schema_id = hashlib.sha256(json.dumps(columns).encode()).hexdigest()[:32]
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    meta: dict[str, object] = {
        "SchemaId": schema_id,
        "FocusVersion": FOCUS_VERSION,
        "DataGenerator": DATA_GENERATOR,
        "CreationDate": now,
        "DatasetInstanceName": f"focus-{week}",
        "ColumnDefinition": columns,
    }
    notes = []
    if unpriced and unpriced.get("gpu_hours"):
        meta["x_UnpricedGpuHours"] = unpriced["gpu_hours"]
        meta["x_UnpricedGpuModels"] = unpriced.get("models") or []
        notes.append(
            "GPU-hours without a catalog price are not in these rows: the BilledCost total "
            "is the priced part of the bill only."
        )
    if gaps and gaps.get("gpu_hours"):
        meta["x_GapGpuHours"] = round(float(gaps["gpu_hours"]), 3)
        meta["x_GapCostEstimate"] = round(float(gaps.get("cost") or 0.0), 2)
        notes.append(
            f"{gaps['gpu_hours']:,.0f} GPU-hours had no samples between reporting ones (an "
            "exporter or collector gap) and are not in these rows: about "
            f"${gaps.get('cost') or 0:,.2f} of spend at their GPUs' prices is missing."
        )
    if notes:
        meta["x_Note"] = " ".join(notes)
    return meta


def _csv_safe(df: pl.DataFrame) -> pl.DataFrame:
    """Text cells that start with = + - @ get a leading ' so a spreadsheet shows them
    as text instead of running them as a formula (tenant and feature names are client input)."""
    return df.with_columns(
        pl.when(pl.col(c).str.contains(r"^[=+\-@]"))
        .then(pl.lit("'") + pl.col(c))
        .otherwise(pl.col(c))
        .alias(c)
        for c, t in zip(df.columns, df.dtypes, strict=True)
        if t == pl.String
    )


def write_focus(
    df: pl.DataFrame,
    out_dir: Path,
    week: str,
    unpriced: Mapping[str, object] | None = None,
    gaps: Mapping[str, float] | None = None,
) -> tuple[Path, Path]:
    """Write `focus-<week>.csv` (ISO 8601 UTC 'Z' datetimes, formula-safe text),
    `.parquet` (FocusVersion etc. in its key-value metadata) and `.metadata.json`
    (the FOCUS schema metadata, retrievable without the data; `focus_metadata`)."""
    csv, parquet = out_dir / f"focus-{week}.csv", out_dir / f"focus-{week}.parquet"
    meta = focus_metadata(df, week, unpriced, gaps)
    df.write_parquet(
        parquet,
        metadata={k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()},
    )
    (out_dir / f"focus-{week}.metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    iso = "%Y-%m-%dT%H:%M:%SZ"
    _csv_safe(df).with_columns(
        pl.col(c).dt.strftime(iso) for c in df.columns if c.endswith(("Start", "End"))
    ).write_csv(csv)
    return csv, parquet


__all__ = [
    "ALLOCATED_METHOD_ID",
    "ALLOCATION_COLUMNS",
    "COLUMNS",
    "FOCUS_VERSION",
    "NON_SUMMABLE_METRICS",
    "ORIGIN_EXTENSIONS",
    "ORIGIN_KEY",
    "SUMMABLE_METRICS",
    "focus_metadata",
    "focus_rows",
    "origin_charges",
    "split_allocation_problems",
    "write_focus",
]
