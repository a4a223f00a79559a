"""The demo's headline numbers, computed from the lake's views (not from the simulator).

Reading back through `finops.connect()` is deliberate: the summary then shows
what any analyst would get from the same lake, and it breaks loudly if the
views and the generator ever disagree.
"""

from __future__ import annotations

from typing import Any

import duckdb

from finops.prices import load_prices, price_for


def summarize(db: duckdb.DuckDBPyConnection, *, pricing_kind: str = "on_demand") -> dict[str, Any]:
    """Spend, requests, tokens, GPU utilization (and its signal), cost per 1k requests, top tenants.

    Spend is GPU-hours observed in `marts.gpu_hourly` times the catalog price
    (`ref.prices`) for each GPU model.
    """
    prices = db.sql("SELECT * FROM ref.prices").pl()
    gpu = db.sql(
        """
        SELECT gpu_model, count(*) AS gpu_hours, avg(util) AS util, avg(gpu_util) AS gpu_util,
               any_value(util_signal) AS util_signal, count(DISTINCT util_signal) AS signals,
               sum(energy_kwh) AS energy_kwh
        FROM marts.gpu_hourly GROUP BY gpu_model ORDER BY gpu_model
        """
    ).pl()
    spend = 0.0
    by_model = []
    for row in gpu.iter_rows(named=True):
        price = price_for(
            prices if prices.height else load_prices(), row["gpu_model"], pricing_kind
        )
        cost = row["gpu_hours"] * price
        spend += cost
        by_model.append({**row, "usd_per_gpu_hour": price, "spend_usd": cost})
    req = db.execute(
        """
        SELECT count(*) AS requests,
               count(*) FILTER (status_code >= 400) AS failed,
               -- tokens a model processed (no cache hits nor refusals), as finops costs
               -- and the report count them
               coalesce(sum(input_tokens) FILTER (processed), 0) AS input_tokens,
               coalesce(sum(output_tokens) FILTER (processed), 0) AS output_tokens,
               coalesce(sum(cached_input_tokens) FILTER (processed), 0) AS cached_input_tokens,
               min(ts) AS first_ts, max(ts) AS last_ts
        FROM marts.request_work
        """
    ).fetchall()[0]
    n_req = int(req[0]) if req else 0
    gpu_hours = float(gpu["gpu_hours"].sum()) if gpu.height else 0.0
    util = float((gpu["util"] * gpu["gpu_hours"]).sum() / gpu_hours) if gpu_hours else None
    gpu_util = float((gpu["gpu_util"] * gpu["gpu_hours"]).sum() / gpu_hours) if gpu_hours else None
    signals = sorted(set(gpu["util_signal"].drop_nulls())) if gpu.height else []
    top = db.sql(
        """
        SELECT tenant, CAST(sum(requests) AS BIGINT) AS requests,
               CAST(sum(input_tokens) AS BIGINT) AS input_tokens,
               CAST(sum(output_tokens) AS BIGINT) AS output_tokens
        FROM marts.tenant_daily GROUP BY tenant ORDER BY requests DESC, tenant LIMIT 5
        """
    ).pl()
    return {
        "pricing_kind": pricing_kind,
        "spend_usd": spend,
        "gpu_hours": gpu_hours,
        "gpus": by_model,
        "requests": n_req,
        "failed_requests": int(req[1]) if req else 0,
        "input_tokens": int(req[2]) if req else 0,
        "output_tokens": int(req[3]) if req else 0,
        "cached_input_tokens": int(req[4]) if req else 0,
        "first_ts": req[5] if req else None,
        "last_ts": req[6] if req else None,
        "gpu_utilization": util,
        "utilization_signal": signals[0] if len(signals) == 1 else ", ".join(signals) or None,
        "gpu_util_reported": gpu_util,
        "cost_per_1k_requests_usd": spend / n_req * 1000 if n_req else None,
        "top_tenants": top.to_dicts(),
    }
