-- Mart: requests per hour by tier/tenant/feature/model, with latency percentiles.
CREATE OR REPLACE VIEW marts.requests_hourly AS
SELECT
    date_trunc('hour', ts) AS hour,
    tier, tenant, feature, coalesce(response_model, request_model) AS model,
    count(*) AS requests,
    count(*) FILTER (status_code >= 400 OR error_type IS NOT NULL) AS failed,
    count(*) FILTER (retry_of IS NOT NULL) AS retries,
    count(*) FILTER (cache_status = 'hit') AS cache_hits,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    quantile_cont(ttft_ms, 0.5) AS ttft_p50_ms,
    quantile_cont(ttft_ms, 0.95) AS ttft_p95_ms,
    quantile_cont(latency_ms, 0.5) AS latency_p50_ms,
    quantile_cont(latency_ms, 0.95) AS latency_p95_ms
FROM clean.requests
GROUP BY ALL;

-- Mart: one row per tenant per day.
CREATE OR REPLACE VIEW marts.tenant_daily AS
SELECT
    CAST(ts AS DATE) AS date,
    tenant,
    count(*) AS requests,
    count(*) FILTER (status_code >= 400 OR error_type IS NOT NULL) AS failed,
    count(*) FILTER (retry_of IS NOT NULL) AS retries,
    sum(input_tokens) AS input_tokens,
    sum(output_tokens) AS output_tokens,
    sum(cached_input_tokens) AS cached_input_tokens,
    count(DISTINCT feature) AS features
FROM clean.requests
GROUP BY ALL;
